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
from .t_update import DEFAULT_META_LR, T_UPDATES, TUpdate, project_stochastic  # noqa: F401 (re-exported)


# the released code's virtual step: SGD at lr 1e-3 on a loss summed over its batch of 64,
# which is lr 0.064 on the batch mean this library uses
RELEASED_VIRTUAL_LR = 1e-3 * 64


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
    # 2: the tested T update (``t_update='tested'``); 1: metacorrect 0.1's rule, which every
    # run recorded before ``t_update`` existed used
    VERSION = 2

    @classmethod
    def algorithm_version(cls, options):
        return 1 if (options or {}).get("t_update", "v1") == "v1" else cls.VERSION

    virtual_lr: float = 0.1
    meta_lr: float | None = None
    t_update: str = "tested"
    t_blocks: int = 100
    t_warmup: float | None = None
    z_crit: float = 3.5
    trusted_ce: bool = True
    t_init: Any = None
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
        for opt, value, allowed in (("t_update", self.t_update, T_UPDATES),
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
        if self.t_update == "released":
            # the released code's algorithm, all of it (see the module docstring)
            self.reset_each_step, self.t_space, self.normalise = True, "logits", "columns"
            self.update_every, self.t_init, self.virtual_lr = 1, "identity", RELEASED_VIRTUAL_LR
        # defaults that depend on the rule: the tested rule starts from GLC's estimate and holds
        # T for the first 30 % of the MLC phase; the older rules start from I at once
        if self.meta_lr is None:
            self.meta_lr = DEFAULT_META_LR[self.t_update]
        if self.t_init is None:
            self.t_init = "glc" if self.t_update == "tested" else "identity"
        if self.t_warmup is None:
            self.t_warmup = 0.3 if self.t_update == "tested" else 0.0
        if not (isinstance(self.meta_lr, (int, float)) and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"mlc option meta_lr must be a number > 0, got {self.meta_lr!r}")
        if int(self.t_blocks) < 1:
            raise ValueError(f"mlc option t_blocks must be >= 1, got {self.t_blocks}")
        if not 0.0 <= float(self.t_warmup) < 1.0:
            raise ValueError(f"mlc option t_warmup must be a fraction in [0, 1), got {self.t_warmup}")
        if not self.z_crit >= 0:
            raise ValueError(f"mlc option z_crit must be >= 0, got {self.z_crit}")
        if isinstance(self.t_init, str) and self.t_init not in ("identity", "glc"):
            raise ValueError(f"mlc option t_init must be 'identity', 'glc' or a C×C matrix, got {self.t_init!r}")
        self.phases = ((Phase("estimate", "noisy"), Phase("mlc", "paired", reinit=True))
                       if isinstance(self.t_init, str) and self.t_init == "glc" else (Phase("mlc", "paired"),))
        self.loss_fn = CORRECTED_LOSSES[self.t_space]
        self.T: torch.Tensor | None = None
        self.updater: TUpdate | None = None
        self._updater_state: dict | None = None
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
        self.updater = None
        self.engine = MetaGradient(ctx.model, self.virtual_lr, mode=self.meta_mode, jvp=self.meta_jvp,
                                   scope=self.meta_scope)

    def begin_phase(self, ctx, index):
        if self.phases[index].name == "mlc" and len(self.phases) == 2:
            probs, labels = ctx.predict_proba(ctx.trusted_loader)
            T0 = glc_estimate(probs.numpy(), labels.numpy(), ctx.num_classes)
            self.T = torch.tensor(T0, dtype=torch.float32, device=ctx.device)

    def _phase_steps(self, ctx) -> int:
        return max(ctx.epochs - int(self.warmup_epochs), 1) * ctx.steps_per_epoch

    def _t_warmup_steps(self, ctx) -> int:
        """Iterations at the start of the MLC phase during which T is held (``t_warmup``)."""
        return int(float(self.t_warmup) * self._phase_steps(ctx))

    def _updater(self, ctx) -> TUpdate:
        """The T-update rule, built on the first meta step: its block length depends on the
        number of meta steps the MLC phase will make, known only once the loaders are."""
        if self.updater is None:
            steps = self._phase_steps(ctx) - self._t_warmup_steps(ctx)
            self.updater = TUpdate(self.t_update, self.meta_lr, math.ceil(steps / int(self.update_every)),
                                   dim=1 if self.normalise == "rows" else 0, blocks=int(self.t_blocks),
                                   z_crit=float(self.z_crit))
            if self._updater_state is not None:
                self.updater.load_state_dict(self._updater_state, self.T.device)
        return self.updater

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
        if not meta_now or self._iteration <= self._t_warmup_steps(ctx):
            # between meta steps, and while T is held at its initial value (t_warmup): the
            # corrected loss with the current T (and the trusted batch's cross-entropy while T waits)
            loss = self.loss_fn(ctx.model(x_n), y_n, self.T)
            if meta_now and self.trusted_ce:
                loss = loss + F.cross_entropy(ctx.model(x_c), y_c)
            ctx.optimizer_step(loss)
            return loss.detach()
        if self.meta_batch is not None and int(self.meta_batch) < len(y_c):
            x_m, y_m = x_c[:int(self.meta_batch)], y_c[:int(self.meta_batch)]
        else:
            x_m, y_m = x_c, y_c
        result = self.engine(self.loss_fn, (self.T,), x_n, y_n, x_m, y_m)
        T_old = self.T
        self.T = self._updater(ctx).step(self.T, result.hypergrads[0])
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

    def estimated_T(self):
        return None if self.T is None else self.T.detach().cpu().double().numpy()

    def state_dict(self):
        return {"T": None if self.T is None else self.T.detach().cpu(), "iteration": self._iteration,
                "t_update": None if self.updater is None else self.updater.state_dict()}

    def load_state_dict(self, state):
        if state.get("T") is not None:
            self.T = state["T"].to(self.T.device if self.T is not None else "cpu")
        self._iteration = state.get("iteration", 0)
        self.updater, self._updater_state = None, state.get("t_update")

