"""Methods without correction: ``ce`` (all data, labels as given) and ``trusted_only``."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from .base import Method, Phase, batch_of, ce_step


@register_method
@dataclass
class CrossEntropy(Method):
    """No correction: plain cross-entropy on all training data with the labels as given
    (noisy and trusted batches interleaved; see :mod:`metacorrect.methods.base`)."""

    NAME = "ce"

    def __post_init__(self):
        self.name = self.NAME
        self.phases = (Phase("train", "all"),)

    def step(self, ctx, noisy, trusted):
        return ce_step(ctx, *batch_of(noisy, trusted))


@register_method
@dataclass
class TrustedOnly(Method):
    """Cross-entropy on the trusted set alone (GLC's "Trusted only"). An epoch is one pass
    over the trusted set."""

    NAME = "trusted_only"

    def __post_init__(self):
        self.name = self.NAME
        self.phases = (Phase("train", "trusted"),)

    def step(self, ctx, noisy, trusted):
        return ce_step(ctx, *trusted)
