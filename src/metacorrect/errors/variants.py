"""Where a run's scorer gets ``p(true | x)`` for the examples it scores: the in-sample
variants (``metacorrect errors --probs``).

* ``'model'``    — the run's final network on its own training examples (in-sample; free);
* ``'averaged'`` — the softmax averaged over the run's last epochs (``train_probs.npy``, kept
  by training with ``--keep-train-probs N``; in-sample, N extra forward passes);
* ``'crossfit'`` — K-fold cross-fitting (``--folds K``): out-of-sample, K more trainings
  (:mod:`metacorrect.errors.crossfit`).

A network scores its own training examples too confidently toward their given label. How
much that costs was measured (``benchmarks/label_error_variants.py``, the embedded digits, MLC's
default, 10 % trusted, 5 noise settings × 3 seeds, mean F1 of the flagged set with the
default rule): 10 epochs per phase — model 0.977, averaged 0.976, crossfit (5 folds) 0.978;
30 epochs, where the network has longer to memorise — 0.966, 0.966, 0.973 (the bias shows
on uniform_mix 0.3: 0.944 in-sample against 0.966 cross-fitted). The default is the cheapest
variant whose F1 is within 0.01 of the best: ``'model'``. On MNIST at 1 % trusted (10 epochs,
one seed) model and averaged gave F1 0.993 / 0.992 (flip 0.3), 0.982 / 0.982 (uniform_mix
0.6) and 0.996 / 0.997 (flip 0.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .run_folder import RunFolder

VARIANTS = ("model", "averaged", "crossfit")
DEFAULT_VARIANT = "model"
DESCRIPTIONS = {"model": "the final network's probabilities (in-sample)",
                "averaged": "probabilities averaged over the run's last epochs (train_probs.npy, in-sample)",
                "crossfit": "out-of-sample probabilities from {K}-fold cross-fitting ({folder})"}


@dataclass
class ScorerProbs:
    """``probs`` (``N × C``, rows in the run's ``noisy_idx`` order), the ``variant``, a
    description, and the training time the variant needed beyond the run's own
    (cross-fitting's folds; 0 otherwise)."""

    probs: np.ndarray
    variant: str
    description: str
    extra_train_seconds: float = 0.0


def scorer_probs(run: RunFolder, variant: str = "model", *, folds: int | None = None, device: str = "auto",
                 log=None, progress=None) -> ScorerProbs:
    """The probabilities of ``variant`` for ``run`` (``folds`` only for ``'crossfit'``)."""
    if variant not in VARIANTS:
        raise ValueError(f"probs variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "crossfit":
        from .crossfit import crossfit_probs
        if folds is None:
            raise ValueError("the crossfit variant needs the number of folds (--folds K, K >= 2)")
        cf = crossfit_probs(run, folds, device=device, log=log, progress=progress)
        return ScorerProbs(cf.probs, variant, DESCRIPTIONS[variant].format(K=folds, folder=cf.folder),
                           cf.train_seconds)
    if folds is not None:
        raise ValueError(f"--folds is for cross-fitting; it cannot be combined with --probs {variant}")
    if variant == "averaged":
        return ScorerProbs(run.train_probs(), variant, DESCRIPTIONS[variant])
    return ScorerProbs(run.predict(device), variant, DESCRIPTIONS[variant])
