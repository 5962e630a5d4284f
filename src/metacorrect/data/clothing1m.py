"""Clothing1M (Xiao et al., CVPR 2015): 14 clothing classes, real noisy web labels.

Layout (``ROOT/clothing1m/``, as the dataset is distributed)::

    annotations/noisy_label_kv.txt      "images/0/00/123.jpg 3" per line (noisy labels)
    annotations/clean_label_kv.txt      the same format (verified labels)
    annotations/noisy_train_key_list.txt, clean_train_key_list.txt, clean_test_key_list.txt
    images/...                          the JPEGs the keys name (relative to ROOT/clothing1m/)

The training set is the noisy training keys (their noisy labels) followed by the clean
training keys (their verified labels, marked in ``trusted_mask``); a key in both lists is
kept once, as trusted. ``clean_labels_known=False``: ``y_train`` holds the labels as given.
``noisy_label_sets['noisy']`` holds each training image's noisy label where one exists, else
its given label. The test set is the clean test keys. ``clean_val_key_list.txt`` is not used.

Images are decoded once with Pillow, resized to ``image_size``×``image_size`` (default 32),
and kept in a uint8 cache under :func:`cache_dir` (resumable: an interrupted decoding keeps
what it finished). The whole dataset is held in memory as uint8 ``N×3×S×S`` (1M images at
32×32 ≈ 3 GB): use ``max_noisy`` to take only the first noisy training keys.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DatasetInfo, MissingDataError, cache_dir, register, require_file, resolve_data_dir
from .cifar import Progress, atomic_save, image_transforms, require_pillow

log = logging.getLogger(__name__)

CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket", "Downcoat",
           "Suit", "Shawl", "Dress", "Vest", "Underwear"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE = ("Clothing1M (T. Xiao et al., CVPR 2015), obtained from its authors on request "
          "(github.com/Cysu/noisy_label)")
ANNOTATIONS = ("noisy_label_kv.txt", "clean_label_kv.txt", "noisy_train_key_list.txt",
               "clean_train_key_list.txt", "clean_test_key_list.txt")


def read_kv(path: Path) -> dict[str, int]:
    """``key label`` lines as a dict; labels checked to be integers in 0..13."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}, line {n}: expected 'key label', got {line.strip()!r}")
            label = int(parts[1])
            if not 0 <= label < len(CLASSES):
                raise ValueError(f"{path}, line {n}: label {label} out of range 0..{len(CLASSES) - 1}")
            out[parts[0]] = label
    return out


def read_keys(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _labels_for(keys: list[str], kv: dict[str, int], kv_path: Path, list_path: Path) -> np.ndarray:
    missing = [k for k in keys if k not in kv]
    if missing:
        raise ValueError(f"{list_path}: {len(missing)} key(s) have no label in {kv_path}, e.g. {missing[0]!r}")
    return np.array([kv[k] for k in keys], dtype=np.int64)


def _read_split(folder: Path, max_noisy: int | None):
    """The annotation files' split: noisy, trusted and test keys with their labels, and the
    noisy label of each trusted image (its clean label where it has none)."""
    ann = folder / "annotations"
    paths = {name: require_file(ann / name, SOURCE) for name in ANNOTATIONS}
    noisy_kv = read_kv(paths["noisy_label_kv.txt"])
    clean_kv = read_kv(paths["clean_label_kv.txt"])
    trusted_keys = read_keys(paths["clean_train_key_list.txt"])
    trusted_set = set(trusted_keys)
    noisy_keys = [k for k in read_keys(paths["noisy_train_key_list.txt"]) if k not in trusted_set]
    if max_noisy is not None:
        noisy_keys = noisy_keys[:int(max_noisy)]
    test_keys = read_keys(paths["clean_test_key_list.txt"])
    if not trusted_keys:
        raise ValueError(f"{paths['clean_train_key_list.txt']}: no clean training keys (the trusted set)")
    y_noisy = _labels_for(noisy_keys, noisy_kv, paths["noisy_label_kv.txt"], paths["noisy_train_key_list.txt"])
    y_trusted = _labels_for(trusted_keys, clean_kv, paths["clean_label_kv.txt"], paths["clean_train_key_list.txt"])
    y_test = _labels_for(test_keys, clean_kv, paths["clean_label_kv.txt"], paths["clean_test_key_list.txt"])
    noisy_of_trusted = np.array([noisy_kv.get(k, c) for k, c in zip(trusted_keys, y_trusted)], dtype=np.int64)
    return noisy_keys, trusted_keys, test_keys, y_noisy, y_trusted, y_test, noisy_of_trusted


def decode_images(folder: Path, keys: list[str], size: int, progress: Progress | None = None) -> np.ndarray:
    """uint8 ``N×3×size×size`` images for ``keys`` (paths relative to ``folder``), decoded
    once into a resumable cache under :func:`cache_dir`."""
    digest = hashlib.sha256(f"{folder.resolve()}\n{size}\n".encode() + "\n".join(keys).encode()).hexdigest()[:16]
    cache = cache_dir() / f"clothing1m-{size}px-{digest}"
    cache.mkdir(parents=True, exist_ok=True)
    images_path, done_path = cache / "images.npy", cache / "done.npy"
    shape = (len(keys), 3, size, size)
    images = None
    if images_path.exists() and done_path.exists():
        try:
            images = np.lib.format.open_memmap(images_path, mode="r+")
            done = np.load(done_path)
            if images.shape != shape or done.shape != (len(keys),):
                raise ValueError("cache shape differs")
        except (OSError, ValueError):
            log.warning("rebuilding an unreadable cache in %s", cache)
            images = None
    if images is None:
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
        done = np.zeros(len(keys), dtype=bool)
    todo = np.flatnonzero(~done)
    if todo.size:
        Image = require_pillow()
        log.info("decoding %d Clothing1M images to %d×%d", todo.size, size, size)
        if progress is None:  # a tqdm bar on a terminal, silent otherwise
            from ..progress import CountProgress
            progress = CountProgress("decoding Clothing1M images")
        try:
            for n, i in enumerate(todo, 1):
                path = folder / keys[i]
                if not path.is_file():
                    raise MissingDataError(f"missing image {keys[i]!r}: looked for {path}. It comes from {SOURCE}.")
                try:
                    with Image.open(path) as im:
                        im.draft("RGB", (size, size))  # fast JPEG downscaling before the resize
                        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                        images[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
                except MissingDataError:
                    raise
                except Exception as exc:  # PIL raises many types for bad data
                    raise ValueError(f"{path}: cannot decode image ({exc})") from None
                done[i] = True
                if n % 2000 == 0 or n == todo.size:
                    images.flush()
                    atomic_save(done_path, done)
                    if progress is not None:
                        progress(n, int(todo.size))
        finally:
            images.flush()
            atomic_save(done_path, done)
    return np.array(images)


def load_clothing1m(data_dir=None, image_size: int = 32, max_noisy: int | None = None,
                    progress: Progress | None = None) -> Dataset:
    """Clothing1M as uint8 ``N×3×image_size×image_size``; noisy part + trusted clean part."""
    folder = resolve_data_dir(data_dir) / "clothing1m"
    noisy_keys, trusted_keys, test_keys, y_noisy, y_trusted, y_test, noisy_of_trusted = _read_split(folder, max_noisy)

    images = decode_images(folder, noisy_keys + trusted_keys + test_keys, int(image_size), progress)
    n_train = len(noisy_keys) + len(trusted_keys)
    train_t, test_t = image_transforms(IMAGENET_MEAN, IMAGENET_STD, padding=max(1, int(image_size) // 8))
    return Dataset(
        name="clothing1m", x_train=torch.from_numpy(images[:n_train]), y_train=np.concatenate([y_noisy, y_trusted]),
        x_test=torch.from_numpy(images[n_train:]), y_test=y_test, num_classes=len(CLASSES),
        class_names=list(CLASSES),
        description=(f"Clothing1M, {len(noisy_keys):,} noisy + {len(trusted_keys):,} trusted train / "
                     f"{len(test_keys):,} test, resized to {image_size}×{image_size} RGB"),
        noisy_label_sets={"noisy": np.concatenate([y_noisy, noisy_of_trusted])},
        trusted_mask=np.r_[np.zeros(len(noisy_keys), bool), np.ones(len(trusted_keys), bool)],
        clean_labels_known=False, train_transform=train_t, test_transform=test_t,
        licence="Clothing1M: for non-commercial research, by agreement with its authors")


def load_clothing1m_stream(data_dir=None, max_noisy: int | None = None) -> Dataset:
    """Clothing1M streamed from its JPEG folders (:mod:`metacorrect.data.streaming`): the same
    examples, labels and order as :func:`load_clothing1m`, each image decoded per epoch at
    full size and augmented by the usual recipe (resize 256, random 224 crop and flip,
    ImageNet normalisation; centre crop for evaluation)."""
    from .streaming import FilesBatchTransform, ImageFiles, ImageNetTransform
    folder = resolve_data_dir(data_dir) / "clothing1m"
    noisy_keys, trusted_keys, test_keys, y_noisy, y_trusted, y_test, noisy_of_trusted = _read_split(folder, max_noisy)
    missing = [k for k in noisy_keys + trusted_keys + test_keys if not (folder / k).is_file()]
    if missing:
        raise MissingDataError(f"{len(missing)} image file(s) the annotation lists name are missing under {folder}, "
                               f"e.g. {missing[0]!r}. They come from {SOURCE}.")
    train_t, eval_t = ImageNetTransform(train=True), ImageNetTransform(train=False)
    return Dataset(
        name="clothing1m-stream", x_train=ImageFiles(folder, noisy_keys + trusted_keys),
        y_train=np.concatenate([y_noisy, y_trusted]), x_test=ImageFiles(folder, test_keys), y_test=y_test,
        num_classes=len(CLASSES), class_names=list(CLASSES),
        description=(f"Clothing1M, {len(noisy_keys):,} noisy + {len(trusted_keys):,} trusted train / "
                     f"{len(test_keys):,} test, streamed from the JPEG files (224×224 crops)"),
        noisy_label_sets={"noisy": np.concatenate([y_noisy, noisy_of_trusted])},
        trusted_mask=np.r_[np.zeros(len(noisy_keys), bool), np.ones(len(trusted_keys), bool)],
        clean_labels_known=False, train_transform=FilesBatchTransform(train_t),
        test_transform=FilesBatchTransform(eval_t),
        licence="Clothing1M: for non-commercial research, by agreement with its authors",
        extra={"streamed": (train_t, eval_t), "default_model": "resnet50"})


register(DatasetInfo(name="clothing1m-stream", loader=load_clothing1m_stream,
                     description="Clothing1M streamed from its JPEG folders at 224×224 (ResNet-50 recipe)",
                     folder="clothing1m", files=tuple(f"annotations/{a}" for a in ANNOTATIONS),
                     source=SOURCE, licence="non-commercial research use, by agreement with the authors"))
register(DatasetInfo(name="clothing1m", loader=load_clothing1m,
                     description="Clothing1M, 14 clothing classes with real noisy web labels (held in memory)",
                     folder="clothing1m", files=tuple(f"annotations/{a}" for a in ANNOTATIONS),
                     source=SOURCE, licence="non-commercial research use, by agreement with the authors"))
