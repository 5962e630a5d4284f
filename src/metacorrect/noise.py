"""Label-noise models: transition matrices, corruption, and estimation error.

Orientation (used everywhere in metacorrect)::

    T[i, j] = P(noisy label = j | true label = i)

Rows index the true class and sum to one. A clean posterior row-vector ``p`` becomes the
noisy-label posterior ``p @ T``. cleanlab uses the transpose (its
``noise_matrix[i][j] = P(noisy = i | true = j)``, columns sum to one); convert at the
edges with :func:`to_cleanlab` and :func:`from_cleanlab`.

All builders accept a number of classes ``C`` and a strength in [0, 1] and return a
float64 NumPy array. Functions that take a matrix accept NumPy arrays and torch tensors.
"""

from __future__ import annotations

import numpy as np

from ._validation import (as_numpy, check_fraction, check_labels, check_num_classes,
                          check_transition_matrix)

NOISE_TYPES = ("none", "uniform_mix", "symmetric", "flip", "pair", "hierarchical")


def identity(num_classes: int) -> np.ndarray:
    """No noise: ``T = I`` (``T[i, j] = P(noisy=j | true=i)``)."""
    return np.eye(check_num_classes(num_classes))


def uniform_mix(num_classes: int, strength: float) -> np.ndarray:
    """GLC's uniform noise: ``T = s·(1/C)·11ᵀ + (1−s)·I``.

    With probability ``s`` the label is replaced by one drawn uniformly from all ``C``
    classes (so it may survive): the diagonal is ``1 − s + s/C``.
    Orientation: ``T[i, j] = P(noisy=j | true=i)``.
    """
    C = check_num_classes(num_classes)
    s = check_fraction(strength, "strength")
    return s * np.full((C, C), 1.0 / C) + (1 - s) * np.eye(C)


def symmetric(num_classes: int, rate: float) -> np.ndarray:
    """Symmetric noise: diagonal ``1 − r``, every off-diagonal entry ``r/(C−1)``.

    Orientation: ``T[i, j] = P(noisy=j | true=i)``.
    """
    C = check_num_classes(num_classes)
    r = check_fraction(rate, "rate")
    T = np.full((C, C), r / (C - 1))
    np.fill_diagonal(T, 1 - r)
    return T


def flip(num_classes: int, strength: float, seed: int = 1) -> np.ndarray:
    """GLC's flip noise: diagonal ``1 − s``, mass ``s`` on one random other class per row.

    The other class of each row is drawn as GLC's released code does
    (``np.random.seed(seed)`` then one ``np.random.choice`` per row), so the default
    ``seed=1`` reproduces GLC's matrices. Orientation: ``T[i, j] = P(noisy=j | true=i)``.
    """
    C = check_num_classes(num_classes)
    s = check_fraction(strength, "strength")
    rng = np.random.RandomState(seed)  # legacy generator: matches np.random.seed() in GLC
    T = np.eye(C) * (1 - s)
    rows = np.arange(C)
    for i in range(C):
        T[i, rng.choice(rows[rows != i])] += s
    return T


def pair(num_classes: int, rate: float) -> np.ndarray:
    """Pair noise: class ``i`` becomes ``(i + 1) mod C`` with probability ``r``.

    Orientation: ``T[i, j] = P(noisy=j | true=i)``.
    """
    C = check_num_classes(num_classes)
    r = check_fraction(rate, "rate")
    T = np.eye(C) * (1 - r)
    T[np.arange(C), (np.arange(C) + 1) % C] += r
    return T


def hierarchical(coarse_of_fine, strength: float) -> np.ndarray:
    """GLC's CIFAR-100 noise: mass ``s`` spread evenly over the *other* fine classes of
    the same superclass.

    ``coarse_of_fine[i]`` is the superclass of fine class ``i``. A fine class alone in its
    superclass keeps its label. Orientation: ``T[i, j] = P(noisy=j | true=i)``.
    """
    coarse = as_numpy(coarse_of_fine, "coarse_of_fine")
    if coarse.ndim != 1 or coarse.size < 2 or not np.issubdtype(coarse.dtype, np.integer):
        raise ValueError("coarse_of_fine must be a 1-D integer array giving the superclass of each "
                         f"fine class, got shape {tuple(coarse.shape)} and dtype {coarse.dtype}")
    s = check_fraction(strength, "strength")
    C = coarse.size
    T = np.eye(C)
    for i in range(C):
        siblings = np.flatnonzero((coarse == coarse[i]) & (np.arange(C) != i))
        if siblings.size:
            T[i, i] = 1 - s
            T[i, siblings] = s / siblings.size
    return T


def transition_matrix(noise: str, num_classes: int, strength: float, *, seed: int = 1,
                      coarse_of_fine=None) -> np.ndarray:
    """Build a transition matrix by noise name (one of :data:`NOISE_TYPES`).

    ``seed`` only matters for ``flip``; ``coarse_of_fine`` is needed for ``hierarchical``.
    Orientation: ``T[i, j] = P(noisy=j | true=i)``.
    """
    if noise == "none":
        return identity(num_classes)
    if noise == "uniform_mix":
        return uniform_mix(num_classes, strength)
    if noise == "symmetric":
        return symmetric(num_classes, strength)
    if noise == "flip":
        return flip(num_classes, strength, seed=seed)
    if noise == "pair":
        return pair(num_classes, strength)
    if noise == "hierarchical":
        if coarse_of_fine is None:
            raise ValueError("hierarchical noise needs the superclass of each class (coarse labels); "
                             "this dataset has none — use a dataset with coarse labels such as cifar100")
        T = hierarchical(coarse_of_fine, strength)
        if T.shape[0] != num_classes:
            raise ValueError(f"coarse_of_fine has {T.shape[0]} entries but the dataset has {num_classes} classes")
        return T
    raise ValueError(f"unknown noise type {noise!r}; expected one of {', '.join(NOISE_TYPES)}")


def corrupt(labels, T, rng: np.random.Generator | int | None = None, *, exact: bool = False) -> np.ndarray:
    """Corrupt clean ``labels`` with transition matrix ``T`` (``T[i, j] = P(noisy=j | true=i)``).

    By default each example's noisy label is drawn independently from row ``T[y]``
    (as GLC and Patrini et al. do). With ``exact=True`` the counts are exact instead: of
    the ``n_i`` examples of class ``i``, ``n_i·T[i, j]`` (rounded by largest remainder)
    get label ``j``, assigned to a random subset — useful when the realised noise must
    equal ``T`` as closely as the counts allow.

    ``rng`` is a NumPy ``Generator`` or a seed. Returns an int64 array.
    """
    T = check_transition_matrix(T)
    C = T.shape[0]
    y = check_labels(labels, C)
    rng = np.random.default_rng(rng)
    noisy = y.copy()
    for i in range(C):
        idx = np.flatnonzero(y == i)
        if idx.size == 0:
            continue
        if exact:
            raw = T[i] * idx.size
            counts = np.floor(raw).astype(np.int64)
            short = idx.size - counts.sum()
            if short:
                counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
            noisy[rng.permutation(idx)] = np.repeat(np.arange(C), counts)
        else:
            # inverse-CDF sampling, vectorised per class
            cdf = np.cumsum(T[i])
            cdf[-1] = 1.0
            noisy[idx] = np.searchsorted(cdf, rng.random(idx.size), side="right")
    return noisy


def realised_matrix(clean, noisy, num_classes: int) -> np.ndarray:
    """The empirical transition matrix of a corruption: row ``i`` is the distribution of
    noisy labels among examples whose clean label is ``i``.

    Orientation: ``T[i, j] = P(noisy=j | true=i)``. A class with no examples gets the
    identity row (no evidence of corruption).
    """
    C = check_num_classes(num_classes)
    clean = check_labels(clean, C, "clean")
    noisy = check_labels(noisy, C, "noisy")
    if clean.shape != noisy.shape:
        raise ValueError(f"clean and noisy must have the same length, got {clean.size} and {noisy.size}")
    counts = np.zeros((C, C))
    np.add.at(counts, (clean, noisy), 1)
    totals = counts.sum(axis=1, keepdims=True)
    out = np.where(totals > 0, counts / np.maximum(totals, 1), np.eye(C))
    return out


def t_error(T_hat, T_true) -> float:
    """Estimation error of a transition matrix: ``Σ|T̂ − T| / C``, the L1 distance of
    each row averaged over the rows (0 = exact, at most 2)."""
    a = check_transition_matrix(T_hat, "T_hat")
    b = check_transition_matrix(T_true, "T_true", num_classes=a.shape[0])
    return float(np.abs(a - b).sum() / a.shape[0])


def to_cleanlab(T) -> np.ndarray:
    """Convert our ``T[i, j] = P(noisy=j | true=i)`` to cleanlab's ``noise_matrix``
    (``noise_matrix[i][j] = P(noisy=i | true=j)``, columns sum to 1): the transpose."""
    return check_transition_matrix(T).T.copy()


def from_cleanlab(noise_matrix) -> np.ndarray:
    """Convert cleanlab's ``noise_matrix[i][j] = P(noisy=i | true=j)`` (columns sum to 1)
    to our ``T[i, j] = P(noisy=j | true=i)`` (rows sum to 1): the transpose."""
    arr = as_numpy(noise_matrix, "noise_matrix")
    if arr.ndim != 2:
        raise ValueError(f"noise_matrix must be a square matrix, got shape {tuple(arr.shape)}")
    return check_transition_matrix(arr.T, "noise_matrix (transposed; its columns must sum to 1)")


def format_matrix(T, digits: int = 2, labels=None) -> str:
    """A readable fixed-width table of a matrix (rows = true class)."""
    T = as_numpy(T, "T")
    C = T.shape[0]
    labels = [str(i) for i in range(C)] if labels is None else [str(x)[:6] for x in labels]
    width = max(digits + 3, max(len(s) for s in labels))
    head = " " * (width + 1) + " ".join(s.rjust(width) for s in labels)
    rows = [labels[i].rjust(width) + " " + " ".join(f"{v:{width}.{digits}f}" for v in T[i]) for i in range(C)]
    return "\n".join([head, *rows])
