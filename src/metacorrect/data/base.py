"""What a dataset is, where its files live, and the registry of loaders.

A loader turns files on disk into a :class:`Dataset`: train and test inputs with their
labels, the number of classes, class names and a one-line description. Loaders never
download: a missing file raises :class:`MissingDataError` naming the file, where it was
looked for and where it comes from.

Data location, in order: an explicit ``data_dir`` argument (CLI ``--data-dir``), the
environment variable ``METACORRECT_DATA``, then the per-user folder
``~/.local/share/metacorrect/data`` (``$XDG_DATA_HOME`` respected). The data root holds
one folder per dataset in the layout of the project's ``shared/data`` (``ROOT/mnist/…``,
``ROOT/cifar10/…``). Decoded caches go to :func:`cache_dir`, never into the data root,
which may be read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._validation import check_labels


class MissingDataError(FileNotFoundError):
    """A dataset file is not where it was looked for."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "metacorrect" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir``, else ``$METACORRECT_DATA``, else the per-user folder."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("METACORRECT_DATA")
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def cache_dir() -> Path:
    """A writable folder for decoded caches (``$METACORRECT_CACHE``, else ``$XDG_CACHE_HOME``
    or ``~/.cache``, under ``metacorrect``)."""
    env = os.environ.get("METACORRECT_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "metacorrect"
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_file(path: Path, source: str) -> Path:
    """Return ``path`` if it exists, else raise a :class:`MissingDataError` that says where it
    was looked for and where the file comes from."""
    if not path.exists():
        raise MissingDataError(
            f"missing data file {path.name!r}: looked for {path} (data root {path.parent.parent}; set it with "
            f"--data-dir or METACORRECT_DATA). It comes from {source}. metacorrect never downloads: "
            f"place the file there yourself.")
    return path


BatchTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Dataset:
    """Inputs and labels of one dataset, held in memory.

    ``x_train``/``x_test`` are tensors whose first dimension indexes examples; image data
    may be kept as uint8 and turned into floats batch by batch with ``train_transform`` /
    ``test_transform`` (which may also augment). ``y_train`` holds the clean labels when
    they are known (benchmark datasets); for a user's own data they are the labels as
    given (``clean_labels_known=False``).

    Real noisy labels (CIFAR-10N) sit in ``noisy_label_sets`` by name; a user's data may
    fix which training examples are trusted (``trusted_mask``) and may know the true
    transition matrix ``T_true`` (``T[i, j] = P(noisy=j | true=i)``), for evaluation only.
    """

    name: str
    x_train: torch.Tensor
    y_train: np.ndarray
    x_test: torch.Tensor | None
    y_test: np.ndarray | None
    num_classes: int
    class_names: list[str]
    description: str
    coarse_of_fine: np.ndarray | None = None
    noisy_label_sets: dict[str, np.ndarray] = field(default_factory=dict)
    trusted_mask: np.ndarray | None = None
    T_true: np.ndarray | None = None
    clean_labels_known: bool = True
    train_transform: BatchTransform | None = None
    test_transform: BatchTransform | None = None
    licence: str = ""
    extra: dict = field(default_factory=dict)  # e.g. {"vocab_size": V} for token inputs; default model name

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        self.y_train = check_labels(self.y_train, self.num_classes, f"{self.name} train labels")
        if len(self.x_train) != len(self.y_train):
            raise ValueError(f"{self.name}: {len(self.x_train)} training inputs but {len(self.y_train)} labels")
        if self.y_test is not None:
            self.y_test = check_labels(self.y_test, self.num_classes, f"{self.name} test labels")
            if self.x_test is None or len(self.x_test) != len(self.y_test):
                raise ValueError(f"{self.name}: test inputs and labels differ in number")
        for part, x in (("training", self.x_train), ("test", self.x_test)):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{self.name}: the {part} inputs contain NaN or Inf; expected finite features")
        for key, labels in self.noisy_label_sets.items():
            self.noisy_label_sets[key] = check_labels(labels, self.num_classes, f"{self.name} noisy labels {key!r}")
        if self.trusted_mask is not None:
            self.trusted_mask = np.asarray(self.trusted_mask, dtype=bool)
            if self.trusted_mask.shape != self.y_train.shape:
                raise ValueError(f"{self.name}: trusted mask has shape {self.trusted_mask.shape}, "
                                 f"expected {self.y_train.shape}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one (transformed) input, as the model sees it."""
        sample = self.x_train[:1]
        if self.test_transform is not None:
            sample = self.test_transform(sample)
        return tuple(sample.shape[1:])

    @property
    def input_dtype(self) -> torch.dtype:
        sample = self.x_train[:1]
        if self.test_transform is not None:
            sample = self.test_transform(sample)
        return sample.dtype


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: how to load a dataset and what files it needs."""

    name: str
    loader: Callable[..., Dataset]
    description: str
    folder: str  # sub-folder of the data root ('' for embedded data)
    files: tuple[str, ...]  # files the loader needs, relative to the folder
    source: str
    licence: str


REGISTRY: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    REGISTRY[info.name] = info
    return info
