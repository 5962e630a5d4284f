"""Large image sets streamed from disk: decoded and augmented per epoch by a ``DataLoader``
with workers, instead of decoded once into memory at 32×32.

* :class:`ImageFiles` — a dataset's images as file paths: it stands where an in-memory
  dataset has its ``x_train`` tensor (``len``, indexing by an index tensor gives a subset),
  so splits, noise and run folders work unchanged.
* :class:`ImageNetTransform` — the usual recipe for ImageNet-pretrained networks (and
  Clothing1M's): training — resize the shorter side to 256, a random 224×224 crop, a random
  horizontal flip; evaluation — resize to 256 and the centre 224×224 crop; then ImageNet's
  mean and standard deviation. Tensor operations on the decoded image (no torchvision).
* :class:`StreamLoader` — batches through ``torch.utils.data.DataLoader`` with ``workers``
  processes, drawn by the same seeded rule as the in-memory loader: each epoch a new
  permutation from the loader's own generator (checkpointed, so resume continues the same
  sequence of batches), and distributed, every rank keeps its slice of each global batch
  (:mod:`metacorrect.distributed`).

A file that does not decode is an error naming the file (:class:`ImageDecodeError`), not
skipped: skipping would silently change which examples the run trained on and shift the
indices that ``labels.npz`` and ``metacorrect errors`` report. Augmentation draws from each
worker's torch generator (seeded by the DataLoader from the run's seed), so with workers it
is reproducible for a fixed number of workers but not bit-exact across a resume.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from ..distributed import SINGLE, World, shard_bounds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(ValueError):
    """An image file is missing or cannot be decoded (the message names the file)."""


class ImageFiles:
    """Image files under ``root`` (``paths`` relative to it): a sequence that indexes like a
    tensor of examples (an integer gives one path; a slice, index tensor or array gives a
    subset)."""

    def __init__(self, root: str | Path, paths: Sequence[str]):
        self.root = Path(root)
        self.paths = np.asarray(list(paths), dtype=object)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.paths[int(index)]
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        sub = ImageFiles.__new__(ImageFiles)
        sub.root, sub.paths = self.root, self.paths[index]
        return sub

    def file(self, i: int) -> Path:
        return self.root / self.paths[i]


def decode_rgb(path: Path):
    """The image at ``path`` as an RGB PIL image (a clear error naming the file otherwise)."""
    from .cifar import require_pillow
    Image = require_pillow()
    if not path.is_file():
        raise ImageDecodeError(f"missing image file {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad data
        raise ImageDecodeError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


class ImageNetTransform:
    """PIL image → normalised float tensor ``3×size×size`` (see the module docstring)."""

    def __init__(self, train: bool, size: int = 224, resize: int = 256,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.train, self.size, self.resize = train, int(size), int(resize)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        w, h = image.size
        scale = self.resize / min(w, h)
        from .cifar import require_pillow
        Image = require_pillow()
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        _, H, W = x.shape
        if self.train:
            top = int(torch.randint(0, H - self.size + 1, ()))
            left = int(torch.randint(0, W - self.size + 1, ()))
        else:
            top, left = (H - self.size) // 2, (W - self.size) // 2
        x = x[:, top:top + self.size, left:left + self.size]
        if self.train and bool(torch.rand(()) < 0.5):
            x = x.flip(2)
        return (x.float().div_(255) - self.mean) / self.std


class FilesBatchTransform:
    """An :class:`ImageFiles` batch → a stacked float tensor, decoded in this process (the
    path the in-memory loader and evaluation take: ``Dataset.train_transform``)."""

    def __init__(self, transform: ImageNetTransform):
        self.transform = transform

    def __call__(self, files: ImageFiles) -> torch.Tensor:
        if not len(files):
            return torch.empty(0, 3, self.transform.size, self.transform.size)
        return torch.stack([self.transform(decode_rgb(files.file(i))) for i in range(len(files))])


class _Examples(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles, labels: torch.Tensor, transform: ImageNetTransform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(decode_rgb(self.files.file(i))), self.labels[i]


class _GlobalBatches(torch.utils.data.Sampler):
    """This rank's slice of each global batch of a fresh permutation per epoch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, shuffle: bool, world: World):
        self.n, self.batch_size, self.generator, self.shuffle, self.world = n, batch_size, generator, shuffle, world

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            start, stop = shard_bounds(len(idx), self.world.rank, self.world.size)
            yield idx[start:stop].tolist()


class StreamLoader:
    """Batches ``(x, y)`` of image files decoded by ``workers`` DataLoader processes.

    The same contract as :class:`metacorrect.train.TensorBatchLoader`: ``len`` (global
    batches per epoch), a ``generator`` that fixes the order (checkpointed by ``fit``), a
    ``world`` and ``last_count`` (this rank's and the global size of the latest batch)."""

    def __init__(self, files: ImageFiles, labels: torch.Tensor, batch_size: int, *, transform: ImageNetTransform,
                 seed: int = 0, shuffle: bool = True, workers: int = 0, world: World = SINGLE):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} image files but {len(labels)} labels")
        self.files, self.labels, self.batch_size = files, labels, int(batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.world, self.last_count = world, (0, 0)
        self.transform = transform
        self._sampler = _GlobalBatches(len(files), self.batch_size, self.generator, shuffle, world)
        self._loader = torch.utils.data.DataLoader(
            _Examples(files, labels, transform), batch_sampler=self._sampler, num_workers=int(workers),
            collate_fn=self._collate, generator=torch.Generator().manual_seed(seed + 1))

    def _collate(self, items):
        if not items:
            size = self.transform.size
            return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long)
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self):
        n = len(self.files)
        for b, batch in enumerate(self._loader):
            total = min(self.batch_size, n - b * self.batch_size)
            self.last_count = (len(batch[1]), total)
            yield batch
