"""Which labels are wrong: a noise-model posterior over the true class of each example.

Orientation (as everywhere in metacorrect): ``T[i, j] = P(given = j | true = i)``, rows =
true class, each row sums to 1. ``probs[n, i] = p(true = i | x_n)`` is a network's estimate
of the *clean* class — the softmax of a network trained through the corrected loss
``−log((softmax(f(x))·T)[ỹ])`` (MLC, GLC, Forward, …). Bayes gives the posterior of the true
class given the input *and* the given label::

    P(true = i | x, given = j) = p(i | x) · T[i, j] / Σ_k p(k | x) · T[k, j]

and ``error_probability = 1 − P(true = given | x, given)``. The *suggested* label is the
most probable true class other than the given one.

Which examples are flagged (``is_suspected``), two rules:

* ``rule='threshold'`` (default): ``error_probability > threshold``, 0.5 by default — the
  given label is more likely wrong than right under the posterior (the Bayes decision that
  errs least per example).
* ``rule='count'``: as many as T̂ and the class priors say are wrong, per given label —
  cleanlab's count, computed from T̂ instead of a confident joint. With clean priors ``π``
  the estimated joint of (true, given) is ``π_i·T[i, j]``; of the ``n_j`` examples given
  label ``j``, ``n_j · (1 − π_j T[j, j] / Σ_k π_k T[k, j])`` are wrong, and the ones flagged
  are those with the highest ``error_probability`` among them. The number flagged does not
  depend on how confident the network is on each example (robust to the in-sample
  overconfidence of a network on its own training examples), but it inherits T̂'s error.

Why the threshold is the default (measured, ``benchmarks/label_error_variants.py`` and the
README): on the embedded digits (5 noise settings × 3 seeds, MLC's default) the mean F1 was
0.977 with the threshold against 0.876 with the count (T̂ from 144 trusted images
overstates the noise, so the count flags too many); on MNIST at 1 % trusted, 0.993 against
0.966 (flip 0.3, where T̂'s count was within 1.2 % of the true number of errors), 0.982
against 0.965 (uniform_mix 0.6) and 0.996 against 0.975 (flip 0.6).

``priors`` (the clean class distribution of the scored examples, for the count) default to
the mean of ``probs`` over them. The estimated number of errors per (true, given) pair
(:attr:`LabelErrors.pairs`) and the noise rates sum the per-example posteriors, whichever
rule flags (:attr:`LabelErrors.model_pairs` has the count's, from T̂ and the priors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validation import (check_fraction, check_labels, check_probabilities, check_probability_vector,
                           check_same_length, check_transition_matrix)

RULES = ("threshold", "count")
DEFAULT_RULE = "threshold"


@dataclass(frozen=True)
class LabelErrors:
    """Scores of ``N`` examples over ``C`` classes (arrays in the order the examples were given).

    Attributes:
        posterior: ``N × C``, ``P(true = i | x_n, given_n)``.
        given: ``N`` given labels; suggested: ``N``, the most probable true class ≠ given.
        error_probability: ``N``, ``1 − posterior[n, given_n]``.
        is_suspected: ``N`` booleans, by ``rule``.
        rule: ``'threshold'`` or ``'count'``; threshold: the cut of the threshold rule.
        priors: ``C``, the clean class distribution used by the count.
        T: the ``C × C`` noise model (``T[i, j] = P(given = j | true = i)``).
        pairs: ``C × C``, the estimated number of scored examples with true class ``i`` and
            given label ``j``: ``Σ`` over the examples given ``j`` of ``P(true = i | x, given)``;
            its off-diagonal sum, ``Σ error_probability``, is the estimated number of label
            errors. (Measured against the truth, off-diagonal L1 error: 13 on the digits
            setting of the tests, 179 of 17,591 errors on MNIST flip 0.3 — against 209 and
            2,539 for ``model_pairs``.)
        model_pairs: ``C × C``, the same from T̂ and the priors alone (``π_i T[i, j]`` scaled
            to the number given ``j``): what the count rule flags.
    """

    posterior: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    error_probability: np.ndarray
    is_suspected: np.ndarray
    rule: str
    threshold: float
    priors: np.ndarray
    T: np.ndarray
    pairs: np.ndarray
    model_pairs: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.given.size)

    @property
    def num_classes(self) -> int:
        return int(self.T.shape[0])

    @property
    def order(self) -> np.ndarray:
        """Positions sorted by ``error_probability``, highest first (ties: earlier first)."""
        return np.argsort(-self.error_probability, kind="stable")

    @property
    def expected_errors(self) -> float:
        """Estimated number of wrong labels among the scored examples (``Σ error_probability``)."""
        return float(self.pairs.sum() - np.trace(self.pairs))

    @property
    def noise_rate(self) -> float:
        """Estimated fraction of the scored labels that are wrong."""
        return self.expected_errors / max(self.num_examples, 1)

    @property
    def model_noise_rate(self) -> float:
        """The fraction wrong that T̂ and the priors alone imply."""
        return float(self.model_pairs.sum() - np.trace(self.model_pairs)) / max(self.num_examples, 1)

    @property
    def flip_rate_of_true_class(self) -> np.ndarray:
        """``C``: of the examples of true class ``i`` (estimated), the fraction given another
        label (NaN for a class with none)."""
        n = self.pairs.sum(1)
        return np.where(n > 0, (n - np.diag(self.pairs)) / np.where(n > 0, n, 1.0), np.nan)

    @property
    def wrong_rate_of_given_class(self) -> np.ndarray:
        """``C``: the estimated fraction of the labels given as ``j`` that are wrong (NaN for a
        class no scored example is given)."""
        n = self.pairs.sum(0)
        return np.where(n > 0, (n - np.diag(self.pairs)) / np.where(n > 0, n, 1.0), np.nan)

    def confusions(self, top: int = 5) -> list[tuple[int, int, float]]:
        """The ``top`` largest estimated (true, given, number) pairs off the diagonal."""
        off = self.pairs.copy()
        np.fill_diagonal(off, -np.inf)
        flat = np.argsort(-off, axis=None, kind="stable")[:top]
        return [(int(i), int(j), float(self.pairs[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape))
                if self.pairs[i, j] > 0]


def posterior(probs, labels, T) -> np.ndarray:
    """``P(true = i | x_n, given_n) ∝ probs[n, i] · T[i, labels[n]]`` (``N × C``, float64).

    Where the network and T give the given label probability 0 (a zero column of T where
    the network has its mass), the posterior is ``probs`` with the given class removed
    (renormalised; uniform over the other classes if nothing is left): that label is
    certainly wrong under the model. Inputs are validated as in :func:`find_label_errors`.
    """
    probs, labels, T = _checked(probs, labels, T)
    return _posterior(probs, labels, T)


def find_label_errors(probs, labels, T, *, rule: str = DEFAULT_RULE, threshold: float = 0.5,
                      priors=None) -> LabelErrors:
    """Score every example for a wrong label and flag the suspected ones.

    Args:
        probs: ``N × C`` array or tensor, ``p(true = i | x_n)`` (rows sum to 1) — the clean-class
            softmax of a network trained through the corrected loss, on the examples to score
            (out-of-sample where you have it: see the README on in-sample bias).
        labels: ``N`` given (possibly wrong) integer labels in ``[0, C)``.
        T: ``C × C`` noise model, ``T[i, j] = P(given = j | true = i)`` (rows = true class,
            row-stochastic) — e.g. a run's ``T.npy``. cleanlab's ``noise_matrix`` is its
            transpose: :func:`metacorrect.noise.from_cleanlab`.
        rule: ``'threshold'`` (default) or ``'count'`` (module docstring).
        threshold: the threshold rule's cut on ``error_probability``, in (0, 1).
        priors: ``C`` clean class distribution of these examples for the count (default: the
            mean of ``probs``).

    Returns:
        a :class:`LabelErrors`. Raises ``ValueError`` for bad shapes, labels out of range,
        NaN/Inf, a ``T`` that is not row-stochastic, or an unknown rule.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    threshold = check_fraction(threshold, "threshold", allow_zero=False, allow_one=False)
    probs, labels, T = _checked(probs, labels, T)
    C = T.shape[0]
    prior = probs.mean(0) if priors is None else check_probability_vector(priors, "priors", C)
    post = _posterior(probs, labels, T)
    err = 1.0 - post[np.arange(labels.size), labels]
    err = np.clip(err, 0.0, 1.0)
    masked = post.copy()
    masked[np.arange(labels.size), labels] = -np.inf
    suggested = masked.argmax(1)

    n_given = np.bincount(labels, minlength=C).astype(np.float64)
    joint = prior[:, None] * T  # π_i T[i, j]
    col = joint.sum(0)
    # share[i, j] = P(true = i | given = j); a label T̂ gives probability 0 yet some example has
    # is wrong wherever it occurs (its true class spread evenly over the others)
    share = np.where(col > 0, joint / np.where(col > 0, col, 1.0), (1 - np.eye(C)) / (C - 1))
    model_pairs = share * n_given[None, :]
    pairs = np.zeros((C, C))
    np.add.at(pairs.T, labels, post)  # pairs[:, j] += posterior of each example given j

    if rule == "threshold":
        flagged = err > threshold
    else:
        flagged = np.zeros(labels.size, dtype=bool)
        order = np.argsort(-err, kind="stable")
        for j in range(C):
            in_j = order[labels[order] == j]
            k = int(np.rint(n_given[j] - model_pairs[j, j]))
            flagged[in_j[:max(0, min(k, in_j.size))]] = True
    return LabelErrors(posterior=post, given=labels, suggested=suggested.astype(np.int64), error_probability=err,
                       is_suspected=flagged, rule=rule, threshold=threshold, priors=prior, T=T, pairs=pairs,
                       model_pairs=model_pairs)


def _checked(probs, labels, T):
    probs = check_probabilities(probs, "probs")
    if probs.shape[0] == 0:
        raise ValueError("probs has no rows: expected one row of class probabilities per example to score")
    if probs.shape[1] < 2:
        raise ValueError(f"probs must have one column per class (at least 2), got shape {probs.shape}")
    C = probs.shape[1]
    T = check_transition_matrix(T, "T", num_classes=C)
    labels = check_labels(labels, C, "labels")
    check_same_length(probs, labels, "probs", "labels")
    return probs, labels, T


def _posterior(probs: np.ndarray, labels: np.ndarray, T: np.ndarray) -> np.ndarray:
    num = probs * T[:, labels].T  # num[n, i] = p(i | x_n) · T[i, given_n]
    den = num.sum(1, keepdims=True)
    ok = den[:, 0] > 0
    post = np.empty_like(num)
    post[ok] = num[ok] / den[ok]
    if not ok.all():  # the given label is impossible under the network and T: certainly wrong
        bad = np.flatnonzero(~ok)
        rest = probs[bad].copy()
        rest[np.arange(bad.size), labels[bad]] = 0.0
        total = rest.sum(1, keepdims=True)
        uniform = (1.0 - np.eye(probs.shape[1])[labels[bad]]) / (probs.shape[1] - 1)
        post[bad] = np.where(total > 0, rest / np.where(total > 0, total, 1.0), uniform)
    return post
