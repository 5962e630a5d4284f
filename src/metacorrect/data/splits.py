"""The trusted / validation / noisy split of a training set (GLC's protocol).

``trusted`` is a fraction of the *whole* training set (MNIST: 60,000 images, so 0.05 means
3,000), drawn stratified by class; an integer ≥ 1 is a count instead (CIFAR-10N: 1,000,
i.e. 100 per class). Trusted examples keep their clean labels; the rest are corrupted with
``T`` (``T[i, j] = P(noisy=j | true=i)``) or take a dataset's real noisy label set. An
optional clean validation split is carved out of the trusted set and held out of training,
for early stopping or model selection; the test set is only ever used for reporting.

All randomness comes from ``seed``: the same seed gives the same split and the same noisy
labels. The split and the corruption draw from independent streams of one
``SeedSequence``, so changing the noise does not change the split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import noise as noise_models
from .._validation import check_fraction, check_transition_matrix
from .base import Dataset


@dataclass
class NoisyProblem:
    """A dataset with its training set split into trusted, validation and noisy parts.

    Indices refer to ``dataset.x_train``. ``y_noisy`` are the labels training sees for the
    noisy part; ``y_noisy_clean`` their clean labels when known (for evaluation only).
    ``T_true`` is the matrix the labels were drawn from (``T[i, j] = P(noisy=j | true=i)``)
    or, for real noise, the realised matrix; ``None`` when unknown.
    """

    dataset: Dataset
    noisy_idx: np.ndarray
    trusted_idx: np.ndarray
    val_idx: np.ndarray
    y_noisy: np.ndarray
    y_noisy_clean: np.ndarray | None
    T_true: np.ndarray | None
    T_realised: np.ndarray | None
    description: dict = field(default_factory=dict)
    missing_trusted_classes: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def y_trusted(self) -> np.ndarray:
        return self.dataset.y_train[self.trusted_idx]

    @property
    def y_val(self) -> np.ndarray:
        return self.dataset.y_train[self.val_idx]

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``'noisy'``, ``'trusted'``, ``'val'`` or ``'test'`` (labels int64)."""
        ds = self.dataset
        if part == "noisy":
            return ds.x_train[torch.from_numpy(self.noisy_idx)], torch.from_numpy(self.y_noisy)
        if part == "trusted":
            return ds.x_train[torch.from_numpy(self.trusted_idx)], torch.from_numpy(self.y_trusted)
        if part == "val":
            return ds.x_train[torch.from_numpy(self.val_idx)], torch.from_numpy(self.y_val)
        if part == "test":
            if ds.x_test is None:
                raise ValueError(f"dataset {ds.name!r} has no test set")
            return ds.x_test, torch.from_numpy(ds.y_test)
        raise ValueError(f"unknown part {part!r}: expected 'noisy', 'trusted', 'val' or 'test'")


def stratified_take(labels: np.ndarray, total: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``total`` examples drawn stratified by class: each class contributes in
    proportion to its size (largest remainder), chosen at random within the class."""
    counts = np.bincount(labels, minlength=num_classes)
    if total > counts.sum():
        raise ValueError(f"cannot take {total} examples from {counts.sum()}")
    raw = counts * (total / max(counts.sum(), 1))
    take = np.floor(raw).astype(np.int64)
    short = total - take.sum()
    if short:
        order = np.argsort(-(raw - take), kind="stable")
        order = [c for c in order if take[c] < counts[c]]
        take[order[:short]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[: take[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _count(value, n: int, name: str) -> int:
    """A fraction of ``n`` (float in [0, 1]) or a count (int ≥ 1)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        if value > n:
            raise ValueError(f"{name} = {value} examples, but only {n} are available")
        return int(value)
    return int(round(check_fraction(value, name) * n))


def make_problem(dataset: Dataset, noise: str = "none", strength: float = 0.0, trusted: float | int = 0.05,
                 seed: int = 0, *, validation: float = 0.0, label_set: str | None = None,
                 matrix_seed: int = 1, T=None, exact_counts: bool = False) -> NoisyProblem:
    """Split ``dataset``'s training set and corrupt the untrusted part.

    Args:
        noise: a name from :data:`metacorrect.noise.NOISE_TYPES` (ignored with ``label_set``
            or ``T``).
        strength: the corruption strength ``s`` in [0, 1].
        trusted: a fraction of the whole training set (float in [0, 1]) or a count (int ≥ 1),
            drawn stratified by class. Ignored when the dataset fixes its trusted examples.
        seed: seeds the split and the corruption.
        validation: fraction of the trusted set held out as a clean validation split.
        label_set: use the dataset's real noisy labels of this name (CIFAR-10N) instead of
            synthetic noise.
        matrix_seed: seed of the matrix structure (only ``flip``; GLC's code uses 1).
        T: an explicit transition matrix (``T[i, j] = P(noisy=j | true=i)``) instead of ``noise``.
        exact_counts: corrupt with exact counts rather than sampling (see :func:`noise.corrupt`).
    """
    C = dataset.num_classes
    labels = dataset.y_train
    n = len(labels)
    split_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    if dataset.trusted_mask is not None:
        trusted_all = np.flatnonzero(dataset.trusted_mask)
    else:
        trusted_all = stratified_take(labels, _count(trusted, n, "trusted"), C, split_rng)
    validation = check_fraction(validation, "validation", allow_one=False)
    if validation > 0:
        picked = stratified_take(labels[trusted_all], int(round(validation * trusted_all.size)), C, split_rng)
        val_idx = trusted_all[picked]
        trusted_idx = np.setdiff1d(trusted_all, val_idx)
    else:
        val_idx = np.zeros(0, dtype=np.int64)
        trusted_idx = trusted_all
    noisy_idx = np.setdiff1d(np.arange(n), trusted_all)

    missing = sorted(set(range(C)) - set(labels[trusted_idx].tolist()))
    if missing:
        names = [dataset.class_names[c] for c in missing]
        warnings.warn(f"the trusted set has no example of {len(missing)} class(es): {', '.join(map(str, names))} "
                      f"(indices {missing}); methods that estimate T from trusted data cannot see these rows "
                      f"(GLC gives them a uniform row; MLC leaves them at their initial value)", stacklevel=2)

    clean = labels[noisy_idx]
    T_true = None
    if not dataset.clean_labels_known:
        # a user's data: the labels are already noisy; the true T is known only if given
        y_noisy, y_noisy_clean = clean.copy(), None
        T_true = None if dataset.T_true is None else check_transition_matrix(dataset.T_true, "T_true", C)
        kind = "given"
    elif label_set is not None:
        if label_set not in dataset.noisy_label_sets:
            raise ValueError(f"dataset {dataset.name!r} has no noisy label set {label_set!r}; "
                             f"available: {', '.join(sorted(dataset.noisy_label_sets)) or 'none'}")
        y_noisy, y_noisy_clean = dataset.noisy_label_sets[label_set][noisy_idx].copy(), clean
        kind = f"real:{label_set}"
    else:
        if T is None:
            T_true = noise_models.transition_matrix(noise, C, strength, seed=matrix_seed,
                                                    coarse_of_fine=dataset.coarse_of_fine)
        else:
            T_true = check_transition_matrix(T, "T", C)
        y_noisy = noise_models.corrupt(clean, T_true, noise_rng, exact=exact_counts)
        y_noisy_clean = clean
        kind = noise if T is None else "custom"
    T_realised = None if y_noisy_clean is None else noise_models.realised_matrix(y_noisy_clean, y_noisy, C)
    if T_true is None and T_realised is not None:
        T_true = T_realised  # real noise: the realised matrix is the truth we can measure against

    return NoisyProblem(
        dataset=dataset, noisy_idx=noisy_idx, trusted_idx=trusted_idx, val_idx=val_idx,
        y_noisy=y_noisy.astype(np.int64), y_noisy_clean=y_noisy_clean, T_true=T_true, T_realised=T_realised,
        description={"dataset": dataset.name, "noise": kind, "strength": float(strength),
                     "trusted": trusted, "validation": validation, "seed": seed,
                     "n_noisy": int(noisy_idx.size), "n_trusted": int(trusted_idx.size), "n_val": int(val_idx.size)},
        missing_trusted_classes=missing)
