"""The embedded default dataset: UCI handwritten digits (8×8), shipped inside the package.

1,797 images in 10 classes (the copy scikit-learn ships as ``load_digits``; CC BY 4.0).
No file is needed, so ``metacorrect demo`` and the fast tests run anywhere. The split is a
fixed, seeded stratified 80/20 train/test split; pixels are scaled to [0, 1].
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from .base import Dataset, DatasetInfo, register

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits(data_dir=None) -> Dataset:
    """Load the embedded digits dataset (``data_dir`` is ignored)."""
    with resources.files(__package__).joinpath("embedded/digits.npz").open("rb") as fh:
        arrays = np.load(fh)
        images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(TEST_FRACTION * idx.size))]] = True
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # N×1×8×8
    return Dataset(
        name="digits", x_train=x[~test], y_train=labels[~test], x_test=x[test], y_test=labels[test],
        num_classes=10, class_names=[str(i) for i in range(10)],
        description="UCI handwritten digits, 8×8, 1,438 train / 359 test, embedded (no download)",
        licence="CC BY 4.0 (UCI ML Repository)")


register(DatasetInfo(
    name="digits", loader=load_digits, description="UCI handwritten digits 8×8 (embedded default, no files)",
    folder="", files=(), source="ships inside the metacorrect package", licence="CC BY 4.0"))
