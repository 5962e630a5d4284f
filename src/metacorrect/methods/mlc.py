"""Meta Loss Correction (Wang, Hu & Hu, CVPR 2020): learn T by meta-learning.

Orientation: ``T[i, j] = P(noisy = j | true = i)`` (rows = true class, rows sum to 1).

One iteration, in the paper's order (the defaults):

1. virtual step   ``w' = w − α·∇_w L_noisy(w, T)``, ``L_noisy = −log((softmax(f(x))·T)[ỹ])``;
2. meta step      ``T ← Π(T − β·∇_T L_clean(w'))`` on a trusted batch, where ``Π`` clamps
   at 0 and renormalises each row (a row that vanishes keeps its previous value);
3. actual step    an ordinary optimizer step on ``L_noisy(w, T_new)`` + cross-entropy on
   the trusted batch (``trusted_ce``, on by default: GLC trains on trusted data too).

By default this full iteration runs on every third step (``update_every=3``); the two
steps in between are optimizer steps on ``L_noisy(w, T)`` with the current T alone.
``update_every=1`` runs it on every step. The default was chosen by measurement on the
MNIST setting (MLP, Adam 1e-3, batch 32, 5 % trusted, 10 epochs, seed 0; 2-core CPU,
docs/PERFORMANCE.md): per-epoch time 1.40× plain cross-entropy at k=3 against 2.17× at
k=1, test accuracy 97.31 % (flip 0.6) and 93.81 % (uniform_mix 0.8) at k=3, against
94.56 % on uniform_mix 0.8 at k=1; k=2 cost 1.53×, k=4 lost accuracy on uniform_mix 0.8
(92.71 %). Each T update is exact (:mod:`metacorrect.meta`, fast mode).

Options that reproduce the released code's behaviour (each documented as such; the
published text of these details is not available to us):
``reset_each_step=True`` (T restarts from I every iteration), ``t_space='logits'``
(T multiplies the logits), ``normalise='columns'``, and a cross-entropy warm-up
(``warmup_epochs``, counted inside the epochs here).

Default step sizes, measured on MNIST (see docs/RESULTS.md): α = 0.1 and a T step of
``meta_lr = 0.01`` times the hypergradient divided by its largest absolute entry
(``grad_norm='max'``), so no entry of T moves by more than 0.01 per update. The best T
step is a per-dataset choice, best made on held-out clean data
(``benchmarks/mlc_variants.py``): on Twitter POS (about 4,500 steps in all) 0.05 beat 0.01
on validation, on SST 0.01 beat 0.05; where T must end far from the identity (MNIST flip
at s ≥ 0.9 with 60 trusted images) T started at 0.01 from the identity did not get there,
and ``meta_lr=0.05`` or ``t_init='glc'`` did.

A class absent from the trusted batch stream gets no direct signal: its row of T moves
only through its effect on the other classes' clean loss, and usually stays near its
initial value (the identity by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_transition_matrix
from ..meta import MetaGradient
from . import register_method
from .base import Method, Phase, ce_step
from .estimators import glc_estimate
from .losses import CORRECTED_LOSSES


def project_stochastic(T_new: torch.Tensor, T_old: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Π: clamp at 0 and renormalise along ``dim`` (1: rows, 0: columns); a row (column)
    whose mass vanishes keeps its previous value."""
    T_new = T_new.clamp_min(0)
    mass = T_new.sum(dim, keepdim=True)
    ok = mass > 1e-12
    return torch.where(ok, T_new / mass.clamp_min(1e-12), T_old)


@register_method
@dataclass
class MLC(Method):
    """Meta Loss Correction. See the module docstring for the algorithm and options.

    Options:
        virtual_lr: α of the virtual SGD step.
        meta_lr: β, the step size for T.
        meta_lr_schedule: ``'constant'`` or ``'cosine'`` (decays β to 0 over training).
        grad_norm: ``'max'`` divides the hypergradient by its largest absolute entry;
            ``'none'`` uses it raw.
        trusted_ce: add cross-entropy on the trusted batch to the actual step.
        t_init: ``'identity'``, ``'glc'`` (a GLC estimate from a first phase trained on the
            noisy data; the model is then re-initialised), or a C×C matrix.
        t_space: ``'probs'`` (``softmax(z)·T``) or ``'logits'`` (``z·T``, released code).
        normalise: ``'rows'`` (row-stochastic) or ``'columns'`` (released code).
        reset_each_step: restart T from the identity every iteration (released code).
        update_every: update T every k iterations (default 3, see the module docstring;
            the steps in between are ordinary corrected-loss steps on the noisy batch,
            without the trusted batch). Every update is exact; only its frequency changes.
        meta_batch: use only the first ``meta_batch`` examples of each trusted batch for the
            clean loss of the meta step (``None``: the whole trusted batch). Exact for the
            smaller batch; the actual step's trusted cross-entropy still uses the whole
            trusted batch. (The trusted batch size itself is set by whoever builds the
            trusted loader — e.g. ``TensorBatchLoader(x_t, y_t, batch_size)`` or the
            CLI's batch size.)
        reuse_virtual_grad: an approximation, off by default: the actual step reuses the
            virtual step's gradient ``∇_w L_noisy(w, T_old)`` instead of a new backward
            with the updated T — so the actual step uses T from *before* the meta step,
            unlike the algorithm above. Saves one backward pass per meta step. Needs the
            fast meta-gradient (with ``meta_mode='reference'`` it has no effect).
        warmup_epochs: epochs of plain cross-entropy (noisy + trusted) before MLC starts,
            counted inside ``epochs``.
        meta_mode: ``'auto'``, ``'fast'`` or ``'reference'`` (see :mod:`metacorrect.meta`).
        meta_jvp: the fast mode's route to the Jacobian-vector product: ``'auto'``,
            ``'forward'`` or ``'reverse'`` (see :mod:`metacorrect.meta`; equal results to
            float rounding, different speed and memory).
        meta_scope: ``'all'`` (default, exact) or ``'head'``: an approximation, off by
            default — the virtual step moves only the output layer (the last ``nn.Linear``),
            so the meta step costs about one forward of the trusted batch instead of two
            backward passes and a JVP, but T is learned as if the body were fixed
            (:mod:`metacorrect.meta`). ``reuse_virtual_grad`` has no effect with it.
    """

    NAME = "mlc"

    virtual_lr: float = 0.1
    meta_lr: float = 0.01
    meta_lr_schedule: str = "constant"
    grad_norm: str = "max"
    trusted_ce: bool = True
    t_init: Any = "identity"
    t_space: str = "probs"
    normalise: str = "rows"
    reset_each_step: bool = False
    update_every: int = 3
    meta_batch: int | None = None
    reuse_virtual_grad: bool = False
    warmup_epochs: int = 0
    meta_mode: str = "auto"
    meta_jvp: str = "auto"
    meta_scope: str = "all"

    def __post_init__(self):
        self.name = self.NAME
        for opt, value, allowed in (("meta_lr_schedule", self.meta_lr_schedule, ("constant", "cosine")),
                                    ("grad_norm", self.grad_norm, ("max", "none")),
                                    ("t_space", self.t_space, tuple(CORRECTED_LOSSES)),
                                    ("normalise", self.normalise, ("rows", "columns")),
                                    ("meta_scope", self.meta_scope, MetaGradient.SCOPES)):
            if value not in allowed:
                raise ValueError(f"mlc option {opt} must be one of {allowed}, got {value!r}")
        if int(self.update_every) < 1:
            raise ValueError(f"mlc option update_every must be >= 1, got {self.update_every}")
        if self.meta_batch is not None and int(self.meta_batch) < 1:
            raise ValueError(f"mlc option meta_batch must be >= 1 or None, got {self.meta_batch}")
        if self.meta_jvp not in MetaGradient.JVP_ROUTES:
            raise ValueError(f"mlc option meta_jvp must be one of {MetaGradient.JVP_ROUTES}, got {self.meta_jvp!r}")
        if not self.meta_lr > 0:
            raise ValueError(f"mlc option meta_lr must be > 0, got {self.meta_lr}")
        if isinstance(self.t_init, str) and self.t_init not in ("identity", "glc"):
            raise ValueError(f"mlc option t_init must be 'identity', 'glc' or a C×C matrix, got {self.t_init!r}")
        self.phases = ((Phase("estimate", "noisy"), Phase("mlc", "paired", reinit=True))
                       if isinstance(self.t_init, str) and self.t_init == "glc" else (Phase("mlc", "paired"),))
        self.loss_fn = CORRECTED_LOSSES[self.t_space]
        self.T: torch.Tensor | None = None
        self._iteration = 0

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if not isinstance(self.t_init, str):
            opts["t_init"] = "matrix"
        return opts

    def setup(self, ctx):
        C = ctx.num_classes
        if isinstance(self.t_init, str):
            T0 = np.eye(C)
        else:
            T0 = check_transition_matrix(self.t_init, "t_init", C)
        self.T = torch.tensor(T0, dtype=torch.float32, device=ctx.device)
        self.engine = MetaGradient(ctx.model, self.virtual_lr, mode=self.meta_mode, jvp=self.meta_jvp,
                                   scope=self.meta_scope)

    def begin_phase(self, ctx, index):
        if self.phases[index].name == "mlc" and len(self.phases) == 2:
            probs, labels = ctx.predict_proba(ctx.trusted_loader)
            T0 = glc_estimate(probs.numpy(), labels.numpy(), ctx.num_classes)
            self.T = torch.tensor(T0, dtype=torch.float32, device=ctx.device)

    def _meta_lr(self, ctx) -> float:
        if self.meta_lr_schedule == "cosine":
            total = max(ctx.epochs * ctx.steps_per_epoch, 1)
            return self.meta_lr * 0.5 * (1 + math.cos(math.pi * min(ctx.step_in_phase / total, 1.0)))
        return self.meta_lr

    def step(self, ctx, noisy, trusted):
        if self.phases[0].name == "estimate" and noisy is not None and trusted is None:
            return ce_step(ctx, *noisy)  # phase 1 of t_init='glc': cross-entropy on the noisy data
        x_n, y_n = noisy
        x_c, y_c = trusted
        if ctx.epoch_in_phase < self.warmup_epochs:
            loss = F.cross_entropy(ctx.model(x_n), y_n) + F.cross_entropy(ctx.model(x_c), y_c)
            ctx.optimizer_step(loss)
            return loss.detach()
        if self.reset_each_step:
            self.T = torch.eye(ctx.num_classes, device=ctx.device)
        meta_now = self._iteration % int(self.update_every) == 0
        self._iteration += 1
        if not meta_now:
            loss = self.loss_fn(ctx.model(x_n), y_n, self.T)
            ctx.optimizer_step(loss)
            return loss.detach()
        if self.meta_batch is not None and int(self.meta_batch) < len(y_c):
            x_m, y_m = x_c[:int(self.meta_batch)], y_c[:int(self.meta_batch)]
        else:
            x_m, y_m = x_c, y_c
        result = self.engine(self.loss_fn, (self.T,), x_n, y_n, x_m, y_m)
        T_old = self.T
        self.T = self.update_T(self.T, result.hypergrads[0], self._meta_lr(ctx))
        if self.reuse_virtual_grad and result.virtual_grads is not None:
            # approximation: the noisy part of the actual step is the virtual step's gradient
            # (T_old); a linear surrogate ⟨w, g⟩ hands it to the optimizer through backward
            params = [p for p in ctx.model.parameters() if p.requires_grad]
            value = self.loss_fn(result.noisy_logits.detach(), y_n, T_old)
            loss = sum((p * g).sum() for p, g in zip(params, result.virtual_grads) if g is not None)
            loss = loss - loss.detach() + value
        else:
            loss = self.loss_fn(result.noisy_logits, y_n, self.T)
        if self.trusted_ce:
            loss = loss + F.cross_entropy(ctx.model(x_c), y_c)
        ctx.optimizer_step(loss)
        return loss.detach()

    def update_T(self, T: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        """One projected step ``Π(T − lr·g)`` (``g`` normalised by its largest entry by default)."""
        if self.grad_norm == "max":
            grad = grad / grad.abs().max().clamp_min(1e-12)
        return project_stochastic(T - lr * grad, T, dim=1 if self.normalise == "rows" else 0)

    def estimated_T(self):
        return None if self.T is None else self.T.detach().cpu().double().numpy()

    def state_dict(self):
        return {"T": None if self.T is None else self.T.detach().cpu(), "iteration": self._iteration}

    def load_state_dict(self, state):
        if state.get("T") is not None:
            self.T = state["T"].to(self.T.device if self.T is not None else "cpu")
        self._iteration = state.get("iteration", 0)

