"""The one place where inputs are checked.

Every public function that takes a transition matrix, labels or probabilities calls a
function from here, so that bad input fails early with a ``ValueError`` naming what was
wrong and what was expected. Unlike cleanlab, NaN probabilities and rows that do not sum
to one are rejected rather than silently accepted.

Convention for transition matrices everywhere in metacorrect:
``T[i, j] = P(noisy label = j | true label = i)``: rows are true classes and sum to one.
"""

from __future__ import annotations

import numpy as np
import torch

ROW_SUM_TOLERANCE = 1e-4


def as_numpy(value, name: str) -> np.ndarray:
    """Return ``value`` (NumPy array, torch tensor or nested list) as a NumPy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy raises many types
        raise ValueError(f"{name} must be array-like, got {type(value).__name__}") from exc


def check_num_classes(num_classes, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {num_classes}")
    return int(num_classes)


def check_fraction(value, name: str, *, allow_zero: bool = True, allow_one: bool = True) -> float:
    """A number in [0, 1] (ends optionally open)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    low_ok = value > 0 or (allow_zero and value == 0)
    high_ok = value < 1 or (allow_one and value == 1)
    if not (np.isfinite(value) and low_ok and high_ok):
        lo = "[" if allow_zero else "("
        hi = "]" if allow_one else ")"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value}")
    return value


def check_transition_matrix(T, name: str = "T", num_classes: int | None = None,
                            tolerance: float = ROW_SUM_TOLERANCE) -> np.ndarray:
    """Check that ``T`` is a row-stochastic C×C matrix and return it as float64 NumPy.

    ``T[i, j] = P(noisy = j | true = i)``; every row must sum to 1 within ``tolerance``.
    """
    arr = as_numpy(T, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square C×C matrix, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(arr.shape)}")
    if num_classes is not None and arr.shape[0] != num_classes:
        raise ValueError(f"{name} must be {num_classes}×{num_classes} for {num_classes} classes, "
                         f"got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN or Inf (first at [{bad[0]}, {bad[1]}]); "
                         f"expected finite probabilities")
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0]
        raise ValueError(f"{name} has a negative entry {arr[bad[0], bad[1]]:g} at [{bad[0]}, {bad[1]}]; "
                         f"expected probabilities >= 0")
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > tolerance
    if np.any(off):
        row = int(np.argmax(off))
        raise ValueError(f"{name} must be row-stochastic (T[i, j] = P(noisy=j | true=i), each row sums to 1): "
                         f"row {row} sums to {sums[row]:.6g}")
    return arr


def check_labels(labels, num_classes: int, name: str = "labels") -> np.ndarray:
    """Check integer class labels in ``[0, num_classes)`` and return them as int64 NumPy."""
    num_classes = check_num_classes(num_classes)
    arr = as_numpy(labels, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {tuple(arr.shape)}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and arr.size and np.all(np.isfinite(arr)) \
                and np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must have an integer dtype, got {arr.dtype} "
                             f"(cast with .astype(int) if the values are class indices)")
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains {bad}, out of range: expected class indices in "
                             f"[0, {num_classes - 1}] for {num_classes} classes")
    return arr.astype(np.int64)


def check_probabilities(probs, name: str = "probs", num_classes: int | None = None,
                        tolerance: float = ROW_SUM_TOLERANCE) -> np.ndarray:
    """Check an N×C matrix of per-example class probabilities (rows sum to 1)."""
    arr = as_numpy(probs, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an N×C matrix, got shape {tuple(arr.shape)}")
    if num_classes is not None and arr.shape[1] != num_classes:
        raise ValueError(f"{name} must have {num_classes} columns, got {arr.shape[1]}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; expected finite probabilities")
    if np.any(arr < 0):
        raise ValueError(f"{name} has negative entries; expected probabilities >= 0")
    sums = arr.sum(axis=1)
    if arr.size and np.any(np.abs(sums - 1) > tolerance):
        row = int(np.argmax(np.abs(sums - 1)))
        raise ValueError(f"{name} rows must sum to 1: row {row} sums to {sums[row]:.6g}")
    return arr


def check_finite_array(value, name: str) -> np.ndarray:
    arr = as_numpy(value, name)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return arr


def check_same_length(a, b, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


def check_probability_vector(value, name: str, num_classes: int | None = None,
                             tolerance: float = ROW_SUM_TOLERANCE) -> np.ndarray:
    """Check a length-C probability vector (finite, >= 0, sums to 1) and return it as float64."""
    arr = as_numpy(value, name)
    if arr.ndim != 1 or (num_classes is not None and arr.shape[0] != num_classes):
        want = f"length {num_classes}" if num_classes is not None else "1-D"
        raise ValueError(f"{name} must be a {want} probability vector (one entry per class), got shape "
                         f"{tuple(arr.shape)}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must hold finite probabilities >= 0, got {arr.tolist()}")
    if abs(arr.sum() - 1) > tolerance:
        raise ValueError(f"{name} must sum to 1, sums to {arr.sum():.6g}")
    return arr
