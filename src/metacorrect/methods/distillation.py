"""Distillation (Li et al., ICCV 2017), as the baseline in GLC's released code
(``MNIST_convex_combo.py``, Hendrycks et al. 2018).

1. **teacher** — train the network on the trusted set alone (``'trusted'`` stream);
2. **distill** — keep a frozen copy of it (the teacher), re-initialise the network and a
   fresh optimizer, and train on all data (``'all'`` stream): a noisy batch ``(x, ỹ)``
   gets the soft target ``λ·onehot(ỹ) + (1 − λ)·softmax(teacher(x))`` and the soft-target
   cross-entropy ``−Σ_k target_k·log softmax_k(f(x))`` (batch mean); a trusted batch gets
   plain cross-entropy.

Soft labels are per example. The noisy loader yields ``(x, y)`` batches without example
indices, so instead of a table of precomputed soft labels the teacher (a deep copy of
the phase-1 network taken when phase 2 begins, kept in evaluation mode and evaluated
under ``no_grad``) computes them on the fly for each batch. With a deterministic network
(no dropout or augmentation) this gives exactly the table's values. The teacher's weights
are part of the method's state, so a resumed run distils from the same teacher.

Differences from GLC's script, on purpose: the teacher is trained for ``epochs`` epochs
on the whole trusted set (GLC: at least 2,000 updates on three quarters of it, keeping
the other quarter to estimate λ), and trusted examples get plain cross-entropy in phase 2
(GLC applies the convex combination to them as well, with their clean label as ``ỹ``).

No transition matrix: ``estimated_T()`` is ``None``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import register_method
from .base import Method, Phase, ce_step


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_n −Σ_k target[n, k]·log softmax(logits)[n, k]`` (``target`` rows sum to 1)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@register_method
@dataclass
class Distillation(Method):
    """Distillation with a teacher trained on the trusted set (see the module docstring).

    Options:
        lam: λ, the weight of the noisy label in the target
            ``λ·onehot(ỹ) + (1 − λ)·soft``; ``1 − λ`` goes to the teacher's soft label.
            Default 0.5: of the three choices GLC's MNIST script offers
            (``--lambda_choice``: Li et al.'s heuristic ``AP_clean/(AP_clean + AP_noisy)``,
            one minus it, or 0.5; the script sets no default), the fixed 0.5 is the one
            that needs no held-out trusted split to measure average precisions.
    """

    NAME = "distillation"

    lam: float = 0.5

    def __post_init__(self):
        self.name = self.NAME
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"distillation option lam must be in [0, 1], got {self.lam}")
        # fit() re-initialises the student after begin_phase has copied the teacher
        self.phases = (Phase("teacher", "trusted"), Phase("distill", "all", reinit=True))
        self.teacher: torch.nn.Module | None = None

    def setup(self, ctx):
        self._model = ctx.model

    def _freeze(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def begin_phase(self, ctx, index):
        if self.phases[index].name == "distill":
            self.teacher = self._freeze(copy.deepcopy(ctx.model))

    @torch.no_grad()
    def soft_targets(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``λ·onehot(y) + (1 − λ)·softmax(teacher(x))``."""
        soft = F.softmax(self.teacher(x).float(), dim=1)
        return self.lam * F.one_hot(y, num_classes).to(soft.dtype) + (1.0 - self.lam) * soft

    def step(self, ctx, noisy, trusted):
        if self.teacher is None or noisy is None:  # phase 1, or a trusted batch in phase 2
            return ce_step(ctx, *(trusted if trusted is not None else noisy))
        x, y = noisy
        loss = soft_cross_entropy(ctx.model(x), self.soft_targets(x, y, ctx.num_classes))
        ctx.optimizer_step(loss)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else copy.deepcopy(self.teacher.state_dict())}

    def load_state_dict(self, state):
        if state.get("teacher") is not None:
            teacher = copy.deepcopy(self._model)
            teacher.load_state_dict(state["teacher"])
            self.teacher = self._freeze(teacher)
        else:
            self.teacher = None
