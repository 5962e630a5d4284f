"""A user's own noisily-labelled data: ``.npz``, ``.csv`` or image folders.

The labels are taken as given (already noisy, ``clean_labels_known=False``); a trusted part
with verified labels is required, and a true transition matrix ``T_true``
(``T[i, j] = P(noisy=j | true=i)``) may be given for evaluation. ``x_train`` is the noisy
part followed by the trusted part; ``trusted_mask`` marks the trusted part.

Layouts:

* ``.npz``: ``x_noisy``, ``y_noisy``, ``x_trusted``, ``y_trusted`` (required), ``x_test`` +
  ``y_test`` and ``T_true`` (optional), ``class_names`` (optional). Features become float32.
* ``.csv`` (header row): numeric feature columns, a ``label`` column (integers 0..C-1, or
  strings mapped to the sorted class names), ``trusted`` (1 = verified, 0 or empty = noisy),
  optional ``split`` (``train``/``test``, empty = train). Features become float32.
* image folders: ``root/train/<class>/…`` (noisy), ``root/trusted/<class>/…``, optional
  ``root/test/<class>/…``; classes = sorted folder names. Images are converted to RGB,
  resized to ``image_size`` (``(height, width)`` or an int; default: the first training
  image's size) and kept as uint8 ``N×3×H×W``; the transforms scale them to [0, 1].

Bad input raises ``ValueError`` naming the problem; a trusted set lacking a class only warns.

Where each training example came from is kept in ``dataset.extra`` (for
``metacorrect errors``, which reports suspected label errors by the user's own row):
``extra["source_rows"][k]`` is, for training example ``k`` (a row of ``x_train``), its row in
the user's data — the row of ``x_noisy`` or ``x_trusted`` (``.npz``), the data row of the file
(``.csv``: 0 = the first data row after the header, blank lines skipped, as
``pandas.read_csv`` numbers them), or its position among the files of its sub-folder in the
loader's order (image folders: class folders sorted, then file names sorted);
``extra["source_paths"][k]`` is the image file's absolute path (image folders only).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._validation import check_transition_matrix
from .base import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TRUE_WORDS = {"1", "true", "yes", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "n", "f", ""}


def load_user_data(path: str | os.PathLike, *, num_classes: int | None = None, name: str | None = None,
                   image_size: int | tuple[int, int] | None = None, label_column: str = "label") -> Dataset:
    """Load a ``.npz`` file, a ``.csv`` file or an image-folder root (see module doc).

    ``num_classes`` fixes the number of classes (default: from ``class_names``, ``T_true``
    or the largest label + 1).
    """
    path = Path(path).expanduser()
    name = name or path.stem
    if path.is_dir():
        return _from_image_folders(path, name, image_size)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, name, num_classes)
    if suffix == ".csv":
        return _from_csv(path, name, num_classes, label_column)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected a .npz file, a .csv file or a folder "
                     f"with train/ and trusted/ image sub-folders")


# ----------------------------------------------------------------------------- shared checks
def _int_labels(arr, what: str, source: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise ValueError(f"{source}: {what} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            raise ValueError(f"{source}: {what} must have an integer dtype, got {arr.dtype} "
                             f"(cast with .astype(int) if the values are class indices)")
        raise ValueError(f"{source}: {what} must hold integer class labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{source}: {what} contains {int(arr.min())}, out of range: labels must be >= 0")
    return arr.astype(np.int64)


def _features(arr, what: str, source: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{source}: {what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{source}: {what} must have one row per example (at least 2-D), got shape {arr.shape}")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ValueError(f"{source}: {what} contains NaN or Inf ({int(bad.sum())} value(s); first in row "
                         f"{int(first[0])}); remove or impute them")
    return arr


def _build(name: str, source: Path, parts: dict, num_classes: int | None, class_names: list[str] | None,
           T_true, kind: str, source_rows: dict | None = None, source_paths: dict | None = None,
           **fields) -> Dataset:
    """``parts`` maps 'noisy', 'trusted', 'test' to ``(x, y)`` (test may be absent);
    ``source_rows`` / ``source_paths`` map 'noisy' and 'trusted' to each example's row / file
    in the user's data (default: the row within its part)."""
    xn, yn = parts["noisy"]
    xt, yt = parts["trusted"]
    if len(yt) == 0:
        raise ValueError(f"{source}: no trusted examples; methods need a few examples with verified labels "
                         f"(npz: x_trusted/y_trusted; csv: a 'trusted' column with 1; folders: trusted/<class>/)")
    for part, (x, y) in parts.items():
        if len(x) != len(y):
            raise ValueError(f"{source}: {part} part has {len(x)} inputs but {len(y)} labels")
    shapes = {part: tuple(x.shape[1:]) for part, (x, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{source}: inputs differ in shape between parts: {shapes}")
    all_labels = np.concatenate([y for _, y in parts.values()])
    if T_true is not None:
        T_true = check_transition_matrix(T_true, f"{source}: T_true")
    C = num_classes or (len(class_names) if class_names else None) or (len(T_true) if T_true is not None else None)
    if C is None:
        C = max(int(all_labels.max()) + 1 if all_labels.size else 0, 2)
    if class_names is not None and len(class_names) != C:
        raise ValueError(f"{source}: {len(class_names)} class names for {C} classes")
    if T_true is not None and len(T_true) != C:
        raise ValueError(f"{source}: T_true is {len(T_true)}×{len(T_true)} but there are {C} classes")
    for part, (_, y) in parts.items():
        if y.size and y.max() >= C:
            raise ValueError(f"{source}: {part} labels contain {int(y.max())}, out of range: expected class "
                             f"indices in [0, {C - 1}] for {C} classes")
    missing = sorted(set(range(C)) - set(yt.tolist()))
    names = class_names or [str(c) for c in range(C)]
    if missing:
        warnings.warn(f"{source}: the trusted set has no example of class(es) "
                      f"{', '.join(names[c] for c in missing)}; T cannot be estimated well for them", stacklevel=3)
    test = parts.get("test")
    rows = source_rows or {part: np.arange(len(parts[part][1])) for part in ("noisy", "trusted")}
    extra = {"source_rows": np.concatenate([np.asarray(rows["noisy"], np.int64),
                                            np.asarray(rows["trusted"], np.int64)])}
    if source_paths is not None:
        extra["source_paths"] = list(source_paths["noisy"]) + list(source_paths["trusted"])
    return Dataset(
        name=name, x_train=torch.from_numpy(np.concatenate([xn, xt])), y_train=np.concatenate([yn, yt]),
        x_test=None if test is None else torch.from_numpy(test[0]), y_test=None if test is None else test[1],
        num_classes=C, class_names=list(names),
        description=(f"user data from {source.name} ({kind}): {len(yn):,} noisy + {len(yt):,} trusted train"
                     + ("" if test is None else f" / {len(test[1]):,} test") + f", {C} classes"),
        trusted_mask=np.r_[np.zeros(len(yn), bool), np.ones(len(yt), bool)], T_true=T_true,
        clean_labels_known=False, licence="user data", extra=extra, **fields)


# ----------------------------------------------------------------------------- .npz
def _from_npz(path: Path, name: str, num_classes: int | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    required = ["x_noisy", "y_noisy", "x_trusted", "y_trusted"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing required array(s) {', '.join(missing)} (found: "
                         f"{', '.join(sorted(arrays)) or 'none'}); expected {', '.join(required)}, "
                         f"optional x_test, y_test, T_true, class_names")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path}: x_test and y_test must be given together")
    parts = {"noisy": (_features(arrays["x_noisy"], "x_noisy", path), _int_labels(arrays["y_noisy"], "y_noisy", path)),
             "trusted": (_features(arrays["x_trusted"], "x_trusted", path),
                         _int_labels(arrays["y_trusted"], "y_trusted", path))}
    if "x_test" in arrays:
        parts["test"] = (_features(arrays["x_test"], "x_test", path), _int_labels(arrays["y_test"], "y_test", path))
    class_names = [str(c) for c in arrays["class_names"].tolist()] if "class_names" in arrays else None
    return _build(name, path, parts, num_classes, class_names, arrays.get("T_true"), "npz")


# ----------------------------------------------------------------------------- .csv
def _from_csv(path: Path, name: str, num_classes: int | None, label_column: str) -> Dataset:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file; expected a header row with a {label_column!r} column")
        header = [h.strip() for h in header]
        if label_column not in header:
            raise ValueError(f"{path}: no {label_column!r} column in the header {header}")
        li = header.index(label_column)
        ti = header.index("trusted") if "trusted" in header else None
        si = header.index("split") if "split" in header else None
        fi = [i for i in range(len(header)) if i not in (li, ti, si)]
        if not fi:
            raise ValueError(f"{path}: no feature columns besides {label_column!r}/trusted/split")
        feats, labels, trusted, test, lines = [], [], [], [], []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
            values = []
            for i in fi:
                try:
                    v = float(row[i])
                except ValueError:
                    raise ValueError(f"{path}, line {line}: column {header[i]!r} holds {row[i]!r}, "
                                     f"not a number") from None
                if not math.isfinite(v):
                    raise ValueError(f"{path}, line {line}: column {header[i]!r} is {row[i].strip()!r}; "
                                     f"features must be finite numbers (no NaN or Inf)")
                values.append(v)
            feats.append(values)
            lines.append(line)
            labels.append(row[li].strip())
            flag = row[ti].strip().lower() if ti is not None else "0"
            if flag not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(f"{path}, line {line}: trusted = {row[ti]!r}; expected 1 (verified) or 0")
            trusted.append(flag in TRUE_WORDS)
            split = row[si].strip().lower() if si is not None else ""
            if split not in ("", "train", "test"):
                raise ValueError(f"{path}, line {line}: split = {row[si]!r}; expected 'train' or 'test'")
            test.append(split == "test")
    if not labels:
        raise ValueError(f"{path}: no data rows")
    if any(lab == "" for lab in labels):
        raise ValueError(f"{path}, line {lines[labels.index('')]}: empty {label_column!r}")
    y, class_names = _csv_labels(labels, path)
    x = np.asarray(feats, dtype=np.float32)
    trusted, test = np.asarray(trusted), np.asarray(test)
    noisy_m, trusted_m = ~trusted & ~test, trusted & ~test
    parts = {"noisy": (x[noisy_m], y[noisy_m]), "trusted": (x[trusted_m], y[trusted_m])}
    if test.any():
        parts["test"] = (x[test], y[test])
    data_row = np.arange(len(labels))  # 0 = the first data row after the header (blank lines skipped)
    return _build(name, path, parts, num_classes, class_names, None, "csv",
                  source_rows={"noisy": data_row[noisy_m], "trusted": data_row[trusted_m]})


def _csv_labels(labels: list[str], path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as given, or strings mapped to the sorted class names."""
    def as_int(s):
        try:
            return int(s)
        except ValueError:
            return None
    ints = [as_int(s) for s in labels]
    if all(v is not None for v in ints):
        y = np.asarray(ints, dtype=np.int64)
        if y.min() < 0:
            raise ValueError(f"{path}: label {int(y.min())} out of range: labels must be >= 0")
        return y, None
    numeric = []
    for s in labels:
        try:
            numeric.append(float(s))
        except ValueError:
            break
    else:  # all numbers but some not integers
        bad = next(s for s, v in zip(labels, ints) if v is None)
        raise ValueError(f"{path}: non-integer label {bad!r}; labels must be integers or class names")
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[s] for s in labels], dtype=np.int64), names


# ----------------------------------------------------------------------------- image folders
def _from_image_folders(root: Path, name: str, image_size) -> Dataset:
    from .cifar import require_pillow

    for required in ("train", "trusted"):
        if not (root / required).is_dir():
            raise ValueError(f"{root}: no {required}/ folder; expected root/train/<class>/…, "
                             f"root/trusted/<class>/… and optionally root/test/<class>/…")
    splits = [s for s in ("train", "trusted", "test") if (root / s).is_dir()]
    files = {s: {d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
                 for d in sorted((root / s).iterdir()) if d.is_dir()} for s in splits}
    class_names = sorted({c for s in splits for c in files[s]})
    if len(class_names) < 2:
        raise ValueError(f"{root}: found {len(class_names)} class folder(s) {class_names}; need at least 2")
    Image = require_pillow()
    first = next((f for c in class_names for f in files["train"].get(c, [])), None)
    if first is None:
        raise ValueError(f"{root}/train: no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
    if image_size is None:
        with Image.open(first) as im:
            width, height = im.size
    elif isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = (int(v) for v in image_size)

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except Exception as exc:  # PIL raises many types for bad data
            raise ValueError(f"{path}: cannot read image ({exc})") from None

    parts, paths = {}, {}
    for split, part in (("train", "noisy"), ("trusted", "trusted"), ("test", "test")):
        if split not in files:
            continue
        listed = [(f, c) for c, cls in enumerate(class_names) for f in files[split].get(cls, [])]
        x = np.stack([read(f) for f, _ in listed]) if listed else np.zeros((0, 3, height, width), np.uint8)
        parts[part] = (x, np.asarray([c for _, c in listed], dtype=np.int64))
        paths[part] = [str(f.resolve()) for f, _ in listed]
    from .cifar import ImageTransform
    to_unit = ImageTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return _build(name, root, parts, None, class_names, None, f"image folders, {height}×{width} RGB",
                  source_paths=paths, train_transform=to_unit, test_transform=to_unit)
