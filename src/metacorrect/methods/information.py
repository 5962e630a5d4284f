"""How much a label says about the class: the information measures MLC's trusted weight uses.

Orientation: ``T[i, j] = P(noisy = j | true = i)`` (rows = true class).

* :func:`label_information_share` — ``I(Y; Ỹ) / H(Y)`` under a given T and class prior
  (closed form; the ``'information'`` trusted weight);
* :func:`prediction_information` — the information a network's soft predictions carry
  about a set of labels, measured on examples it did not train on, with the plug-in
  estimator's bias removed by a label permutation (the ``'relative_debiased'`` and
  ``'relative_tested'`` weights compare it on held-out noisy labels and on trusted labels);
* :func:`carries_information` — a permutation test of whether those predictions carry
  any information about the labels at all (``'relative_tested'`` reads a trusted side
  without it as "the noisy labels taught nothing").
"""

from __future__ import annotations

import numpy as np
import torch

# the permutation that measures the plug-in bias is seeded: the same on every rank and resume
PERMUTATION_SEED = 7
# carries_information's permutation test: the observed information must exceed all of this
# many permuted ones (one-sided, p < 1 / (1 + TEST_PERMUTATIONS) = 0.01), seeded as above
TEST_PERMUTATIONS = 99


def _mutual_information(joint: torch.Tensor) -> float:
    """The mutual information (nats) of a joint distribution given as a non-negative matrix."""
    joint = joint.double() / joint.sum().clamp_min(1e-300)
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    present = joint > 0
    return float((joint[present] * (joint[present] / independent[present]).log()).sum())


def prediction_joint(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (unnormalised) joint of label and soft prediction: ``J[a, b] = Σ onehot(label)[a] · probs[b]``."""
    joint = torch.zeros(probs.shape[1], probs.shape[1], dtype=torch.float64)
    return joint.index_add_(0, labels, probs.double())


def label_information_share(T: torch.Tensor, prior: torch.Tensor) -> float:
    """``I(Y; Ỹ) / H(Y)``: the share of a clean label's information about the class that a
    noisy label drawn through ``T`` (``T[i, j] = P(noisy=j | true=i)``) carries, for classes
    drawn from ``prior``. 1 for ``T = I``, 0 for a T whose rows are all alike."""
    T, prior = T.double().cpu(), prior.double().cpu()
    mutual = _mutual_information(prior[:, None] * T)
    entropy = float(-(prior[prior > 0] * prior[prior > 0].log()).sum())
    return max(mutual, 0.0) / entropy if entropy > 0 else 1.0


def prediction_information(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The information (nats) a network's soft predictions carry about ``labels``, debiased.

    The plug-in mutual information of the joint ``J[a, b] = mean(onehot(label)[a] · probs[b])``
    is biased upward on a finite sample (it is positive even for predictions independent of
    the labels); the same quantity with the labels randomly permuted (seeded,
    ``PERMUTATION_SEED``, applied in a canonical order of the examples, so the result does
    not depend on their order) measures that bias and is subtracted. About 0 where the predictions
    say nothing about the labels; can be slightly negative by chance.

    ``probs``: (n, C) rows summing to 1; ``labels``: (n,) integer classes in ``[0, C)``.
    """
    probs, labels = _canonical(probs, labels, "prediction_information")
    generator = torch.Generator().manual_seed(PERMUTATION_SEED)
    permuted = labels[torch.randperm(len(labels), generator=generator)]
    return (_mutual_information(prediction_joint(probs, labels))
            - _mutual_information(prediction_joint(probs, permuted)))


def carries_information(probs: torch.Tensor, labels: torch.Tensor, permutations: int = TEST_PERMUTATIONS) -> bool:
    """Whether a network's soft predictions carry information about ``labels`` beyond chance:
    a permutation test, the plug-in mutual information of the labels as they are against its
    value with the labels permuted (``permutations`` seeded draws; true where it exceeds
    every one of them, a one-sided test at p < ``1 / (1 + permutations)``).

    Why a test and not the sign of :func:`prediction_information`: on a small trusted set
    (60 images at 0.1 % of MNIST) a network that knows nothing still gets a debiased
    information a little above 0 about half the time, and the ratio r of the noisy side's
    information to that near-zero number comes out anywhere, far above 1 where the truth is
    0 (docs/RESULTS.md, "MLC algorithm version 6").
    Same shapes and canonical order as :func:`prediction_information`."""
    probs, labels = _canonical(probs, labels, "carries_information")
    observed = _mutual_information(prediction_joint(probs, labels))
    generator = torch.Generator().manual_seed(PERMUTATION_SEED)
    return all(observed > _mutual_information(prediction_joint(probs, labels[torch.randperm(len(labels),
                                                                                          generator=generator)]))
               for _ in range(int(permutations)))


def _canonical(probs: torch.Tensor, labels: torch.Tensor, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples checked and put in a canonical order (by label, then by the prediction's
    entries), so that a seeded permutation pairs the same labels with the same predictions
    whatever order the examples came in — distributed, predict_proba gathers them rank by rank."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"{caller} needs probs of shape (n, C) and labels of shape (n,), "
                         f"got {tuple(probs.shape)} and {tuple(labels.shape)}")
    probs, labels = probs.double().cpu(), labels.long().cpu()
    order = torch.from_numpy(np.lexsort([*probs.numpy().T[::-1], labels.numpy()]))
    return probs[order], labels[order]
