"""Loss correction with an estimated (or the true) transition matrix.

Orientation everywhere: ``T[i, j] = P(noisy = j | true = i)`` (rows = true class, each row
sums to 1). The corrected loss on a noisy example is ``−log Σ_k softmax_k(f(x))·T[k, ỹ]``
(:func:`~metacorrect.methods.losses.forward_corrected_loss`), averaged over the batch.

Two-phase methods, following GLC's released code (Hendrycks et al. 2018):

1. **estimate** — train the network with cross-entropy, then estimate ``T̂`` from its
   softmax outputs;
2. **corrected** — re-initialise the network and a fresh optimizer, and train again with
   the corrected loss.

=================  ===================  ==========================================  ==========================
method             phase 1 (CE) stream  ``T̂``                                       phase 2 (``'all'`` stream)
=================  ===================  ==========================================  ==========================
``forward``        ``'all'``            anchors over all training data (Patrini)    corrected on every batch
``forward_gold``   ``'noisy'``          anchors over all training data              corrected on noisy, CE on trusted
``glc``            ``'noisy'``          per-class mean softmax on the trusted set   corrected on noisy, CE on trusted
``confusion``      ``'noisy'``          smoothed confusion matrix on trusted data   corrected on noisy, CE on trusted
``forward_true``   —                    the true ``T`` (oracle, one phase)          corrected on noisy, CE on trusted
=================  ===================  ==========================================  ==========================

Re-initialisation: the corrected phase is a ``Phase(reinit=True)``; :func:`metacorrect.train.fit`
calls ``begin_phase`` (which estimates ``T̂`` with the phase-1 network) *before* it restores
the initial weights and a fresh optimizer, so phase 2 starts from the very initial weights
as in GLC. On resume the estimate is not recomputed: ``T̂`` travels in the checkpoint
(``state_dict``).

Losses are per-batch means (GLC sums over a mixed batch and divides by the batch size;
here every batch is all-noisy or all-trusted, so that is the mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import check_transition_matrix
from . import register_method
from .base import Method, Phase, ce_step
from .estimators import anchor_estimate, confusion_estimate, glc_estimate
from .losses import forward_corrected_loss


def training_probs(ctx) -> np.ndarray:
    """Softmax outputs of the current network over all training data (noisy, then
    trusted), in evaluation mode."""
    p_noisy, _ = ctx.predict_proba(ctx.noisy_loader)
    p_trusted, _ = ctx.predict_proba(ctx.trusted_loader)
    return torch.cat([p_noisy, p_trusted]).double().numpy()


def _T_tensor(T: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(T), dtype=torch.float32, device=device)


@dataclass
class _CorrectionMethod(Method):
    """Shared machinery: a fixed ``T̂`` (``T[i, j] = P(noisy=j | true=i)``) used by the
    forward-corrected loss, estimated at the start of the corrected phase.

    Subclasses set ``NAME``, ``ESTIMATE_STREAM`` (phase-1 stream), ``CORRECT_TRUSTED``
    (``True``: the corrected loss also on trusted batches, as ``forward``; ``False``: plain
    cross-entropy on trusted batches, as GLC) and implement :meth:`estimate`.
    """

    ESTIMATE_STREAM = "noisy"
    CORRECT_TRUSTED = False

    def __post_init__(self):
        self.name = self.NAME
        self.phases = (Phase("estimate", self.ESTIMATE_STREAM),
                       Phase("corrected", "all", reinit=True))
        self.T: torch.Tensor | None = None

    def estimate(self, ctx) -> np.ndarray:
        """``T̂`` (C×C, rows sum to 1, ``T[i, j] = P(noisy=j | true=i)``) from the phase-1
        network."""
        raise NotImplementedError

    def begin_phase(self, ctx, index):
        if self.phases[index].name == "corrected":
            T_hat = check_transition_matrix(self.estimate(ctx), f"{self.name} estimate", ctx.num_classes)
            self.T = _T_tensor(T_hat, ctx.device)

    def step(self, ctx, noisy, trusted):
        if self.T is None:  # phase 1 (T̂ is set when the corrected phase begins): cross-entropy
            x, y = noisy if noisy is not None else trusted
            return ce_step(ctx, x, y)
        if noisy is not None:
            x, y = noisy
            loss = forward_corrected_loss(ctx.model(x), y, self.T)
        elif self.CORRECT_TRUSTED:
            x, y = trusted
            loss = forward_corrected_loss(ctx.model(x), y, self.T)
        else:
            return ce_step(ctx, *trusted)
        ctx.optimizer_step(loss)
        return loss.detach()

    def estimated_T(self):
        return None if self.T is None else self.T.detach().cpu().double().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"T": None if self.T is None else self.T.detach().cpu()}

    def load_state_dict(self, state):
        T = state.get("T")
        self.T = None if T is None else T.to(self._device)

    def setup(self, ctx):
        self._device = ctx.device


@register_method
@dataclass
class Forward(_CorrectionMethod):
    """Forward correction with anchor points (Patrini et al., CVPR 2017), as GLC's code.

    Phase 1: cross-entropy on all training data (noisy and trusted, labels as given).
    Then ``T̂`` (``T[i, j] = P(noisy=j | true=i)``): row ``i`` is the softmax of class
    ``i``'s anchor over all training data (:func:`~metacorrect.methods.estimators.anchor_estimate`).
    Phase 2: re-initialise, then the forward-corrected loss on every batch, trusted ones
    included (GLC's ``forward``; the trusted labels get no special treatment).

    Options:
        anchor_percentile: examples whose ``p_i`` is at or above this percentile are
            dropped before the arg-max (GLC's code: 97, ``interpolation='higher'``);
            ``None`` takes the plain arg-max.
    """

    NAME = "forward"
    ESTIMATE_STREAM = "all"
    CORRECT_TRUSTED = True

    anchor_percentile: float | None = 97.0

    def estimate(self, ctx):
        return anchor_estimate(training_probs(ctx), ctx.num_classes, percentile=self.anchor_percentile)


@register_method
@dataclass
class ForwardGold(Forward):
    """GLC's ``forward_gold``: ``T̂`` by anchor points as ``forward`` (over all training
    data, ``T[i, j] = P(noisy=j | true=i)``), from a network trained on the noisy data
    only; phase 2 as ``glc`` (corrected loss on noisy batches, cross-entropy on trusted).

    Options:
        anchor_percentile: as ``forward`` (97; ``None`` = plain arg-max).
    """

    NAME = "forward_gold"
    ESTIMATE_STREAM = "noisy"
    CORRECT_TRUSTED = False


@register_method
@dataclass
class GLC(_CorrectionMethod):
    """Gold Loss Correction (Hendrycks et al., NeurIPS 2018).

    Phase 1: cross-entropy on the noisy data only. ``T̂`` (``T[i, j] = P(noisy=j | true=i)``):
    row ``i`` is the mean softmax of the phase-1 network over the trusted examples of
    class ``i`` (:func:`~metacorrect.methods.estimators.glc_estimate`; a class absent from
    the trusted set gets a uniform row and a warning). Phase 2: re-initialise, then the
    corrected loss on noisy batches and cross-entropy on trusted batches.
    """

    NAME = "glc"

    def estimate(self, ctx):
        probs, labels = ctx.predict_proba(ctx.trusted_loader)
        return glc_estimate(probs.double().numpy(), labels.numpy(), ctx.num_classes)


@register_method
@dataclass
class Confusion(_CorrectionMethod):
    """GLC's ``confusion`` baseline: ``T̂`` (``T[i, j] = P(noisy=j | true=i)``) is the
    row-normalised confusion matrix of the phase-1 network's arg-max predictions on the
    trusted data (rows = clean label), smoothed ``(1 − ε)·T̂ + ε/C``
    (:func:`~metacorrect.methods.estimators.confusion_estimate`). Phases as ``glc``.

    Options:
        smoothing: ε (GLC's code: 0.01).
    """

    NAME = "confusion"

    smoothing: float = 0.01

    def estimate(self, ctx):
        probs, labels = ctx.predict_proba(ctx.trusted_loader)
        return confusion_estimate(probs.argmax(1).numpy(), labels.numpy(), ctx.num_classes,
                                  smoothing=self.smoothing)


@register_method
@dataclass
class ForwardTrue(Method):
    """Oracle forward correction with the *true* transition matrix (GLC's ``ideal``): an
    upper bound for every method that has to estimate ``T``, not a usable method.

    ``T = ctx.T_true`` (``T[i, j] = P(noisy=j | true=i)``; pass ``T_true=`` to ``fit``).
    One phase on the ``'all'`` stream, as GLC's phase 2: the corrected loss on noisy
    batches, cross-entropy on trusted batches. ``estimated_T()`` returns the true ``T``
    it trains with (so its ``t_error`` is 0).
    """

    NAME = "forward_true"

    def __post_init__(self):
        self.name = self.NAME
        self.phases = (Phase("corrected", "all"),)
        self.T: torch.Tensor | None = None

    def setup(self, ctx):
        if ctx.T_true is None:
            raise ValueError("method 'forward_true' is an oracle that trains with the true transition matrix, "
                             "but none is known: pass T_true= to fit() (a dataset with synthetic noise "
                             "provides it as problem.T_true)")
        T = check_transition_matrix(ctx.T_true, "T_true", ctx.num_classes)
        self.T = _T_tensor(T, ctx.device)

    def step(self, ctx, noisy, trusted):
        if noisy is None:
            return ce_step(ctx, *trusted)
        x, y = noisy
        loss = forward_corrected_loss(ctx.model(x), y, self.T)
        ctx.optimizer_step(loss)
        return loss.detach()

    def estimated_T(self):
        return None if self.T is None else self.T.detach().cpu().double().numpy()
