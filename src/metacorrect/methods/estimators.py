"""Estimators of the transition matrix ``T[i, j] = P(noisy=j | true=i)`` from a trained
network's softmax outputs (used by ``forward``, ``forward_gold``, ``glc``, ``confusion``
and MLC's ``t_init='glc'``)."""

from __future__ import annotations

import warnings

import numpy as np

from .._validation import check_labels, check_probabilities


def glc_estimate(probs, labels, num_classes: int) -> np.ndarray:
    """GLC (Hendrycks et al. 2018): row ``i`` is the mean softmax over the trusted examples
    of clean class ``i``. A class absent from the trusted set gets a uniform row (as GLC)
    and a warning."""
    probs = check_probabilities(probs, "probs", num_classes)
    labels = check_labels(labels, num_classes)
    T = np.full((num_classes, num_classes), 1.0 / num_classes)
    missing = []
    for i in range(num_classes):
        rows = probs[labels == i]
        if len(rows):
            T[i] = rows.mean(0)
        else:
            missing.append(i)
    if missing:
        warnings.warn(f"GLC estimate: no trusted example of class(es) {missing}; their rows of T are uniform",
                      stacklevel=2)
    return T / T.sum(1, keepdims=True)


def anchor_estimate(probs, num_classes: int, percentile: float | None = 97.0) -> np.ndarray:
    """Forward (Patrini et al. 2017): row ``i`` is the softmax of class ``i``'s anchor, the
    example with the highest ``p_i``. As GLC's code, examples at or above the
    ``percentile``-th percentile of ``p_i`` are dropped first (robust to outliers);
    ``percentile=None`` takes the plain arg-max."""
    probs = check_probabilities(probs, "probs", num_classes)
    T = np.zeros((num_classes, num_classes))
    for i in range(num_classes):
        p_i = probs[:, i].copy()
        if percentile is not None:
            thresh = np.percentile(p_i, percentile, method="higher")
            p_i[p_i >= thresh] = 0
        T[i] = probs[int(np.argmax(p_i))]
    return T / T.sum(1, keepdims=True)


def confusion_estimate(predictions, labels, num_classes: int, smoothing: float = 0.01) -> np.ndarray:
    """The row-normalised confusion matrix of predictions on trusted data (rows = clean
    label), smoothed as GLC's code: ``(1 − ε)·T̂ + ε/C`` with ε = 0.01. A class with no
    trusted example gets a uniform row."""
    predictions = check_labels(predictions, num_classes, "predictions")
    labels = check_labels(labels, num_classes)
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (labels, predictions), 1)
    totals = counts.sum(1, keepdims=True)
    T = np.where(totals > 0, counts / np.maximum(totals, 1), 1.0 / num_classes)
    return T * (1 - smoothing) + smoothing / num_classes
