"""Datasets: offline loaders, a registry by name, and the trusted/noisy split.

``load_dataset(name_or_path, data_dir)`` returns a :class:`Dataset`; ``make_problem`` turns
it into a :class:`NoisyProblem` (trusted set with clean labels, the rest corrupted).
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import (REGISTRY, Dataset, DatasetInfo, MissingDataError, cache_dir, default_data_dir,
                   resolve_data_dir)
from . import embedded  # noqa: F401  (registers 'digits')
from .splits import NoisyProblem, make_problem

# Optional loader modules register themselves on import; a module that is not there yet
# simply contributes nothing.
for _module in ("mnist", "cifar", "clothing1m", "text"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a loader is missing
        if _exc.name != f"{__name__}.{_module}":
            raise

DEFAULT_DATASET = "digits"


def dataset_names() -> list[str]:
    return sorted(REGISTRY)


def load_dataset(name_or_path: str | os.PathLike, data_dir=None, **kwargs) -> Dataset:
    """Load a registered dataset by name, or a user's own data from a path
    (``.npz``, ``.csv`` or an image folder; see :mod:`metacorrect.data.user`)."""
    name = str(name_or_path)
    if name in REGISTRY:
        return REGISTRY[name].loader(data_dir=resolve_data_dir(data_dir), **kwargs)
    path = Path(name).expanduser()
    if path.exists():
        from .user import load_user_data
        return load_user_data(path, **kwargs)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(dataset_names())}, "
                     f"or a path to your own data (.npz, .csv or an image folder)")


__all__ = ["Dataset", "DatasetInfo", "MissingDataError", "NoisyProblem", "REGISTRY", "DEFAULT_DATASET",
           "cache_dir", "dataset_names", "default_data_dir", "load_dataset", "make_problem", "resolve_data_dir"]
