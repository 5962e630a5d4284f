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
    over the trusted set, or several when ``min_updates`` asks for more updates than
    ``epochs`` passes make (GLC's gold-only scripts train at least 2,000 updates:
    ``max(epochs, 1 + 2000 // batches)`` epochs; the GLC-protocol presets set
    ``min_updates=2000``)."""

    NAME = "trusted_only"
    min_updates: int = 0

    def __post_init__(self):
        self.name = self.NAME
        if not float(self.min_updates).is_integer():
            raise ValueError(f"min_updates must be a whole number of updates, got {self.min_updates!r}")
        self.phases = (Phase("train", "trusted", min_updates=int(self.min_updates)),)

    def step(self, ctx, noisy, trusted):
        return ce_step(ctx, *trusted)
