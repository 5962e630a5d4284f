"""A finished run folder, ready for label-error scoring: its configuration, the dataset it
names (checked against the labels it recorded), its model and its T — refusing runs whose
T is not a noise model.

What "a noise model" means here: ``T[i, j] = P(given = j | true = i)`` (rows = true class,
row-stochastic), the matrix the network's clean softmax was pushed through in training.
Methods with one: ``mlc`` (the default rule; ``t_space='probs'``, rows normalised, T kept
across steps), ``glc``, ``confusion``, ``forward``, ``forward_gold`` and ``forward_true``.
Not one: MLC with ``t_update='released'``, ``t_space='logits'`` (T multiplies logits),
``reset_each_step=True`` (a one-step correction restarted from I every iteration) or
``normalise='columns'``; methods without a T (``ce``, ``trusted_only``, ``distillation``,
``l2rw``, ``mwnet``).

Where each scored example is in the user's own data (:meth:`RunFolder.source_index`): for a
built-in dataset its index in the training set as the loader orders it (``noisy_idx`` of
``labels.npz``; MNIST: the 60,000 training images in file order); for a user's ``.npz`` the
row of ``x_noisy``; for a CSV the data row (0 = the first after the header); for image
folders the position in the loader's order, and :meth:`RunFolder.source_paths` the files.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._validation import check_transition_matrix
from ..data import Dataset, load_dataset, make_problem

NOISE_MODEL_METHODS = ("mlc", "glc", "confusion", "forward", "forward_gold", "forward_true")
REQUIRED_FILES = ("config.json", "labels.npz", "model.pt")


class RunFolderError(ValueError):
    """A run folder that cannot be scored for label errors (missing files, T not a noise
    model, labels that do not match the dataset)."""


def check_noise_model(method: str, options: dict | None, where: str = "the run") -> None:
    """Raise :class:`RunFolderError` unless ``method`` with its resolved ``options`` learns
    a T that is a noise model ``T[i, j] = P(given = j | true = i)``."""
    options = options or {}
    if method not in NOISE_MODEL_METHODS:
        raise RunFolderError(f"{where} used method {method!r}, which has no noise model T; label errors need a run "
                             f"of {', '.join(NOISE_MODEL_METHODS)}")
    if method != "mlc":
        return
    why = []
    if options.get("t_update") == "released":
        why.append("t_update='released' (the released code's algorithm)")
    if options.get("t_space", "probs") != "probs":
        why.append(f"t_space={options['t_space']!r} (T multiplies the logits, not the class probabilities)")
    if options.get("reset_each_step", False):
        why.append("reset_each_step=True (T restarts from I every iteration: a one-step correction)")
    if options.get("normalise", "rows") != "rows":
        why.append(f"normalise={options['normalise']!r} (T is not row-stochastic in training)")
    if why:
        raise RunFolderError(f"{where}: MLC's T is not a noise model P(given | true) with {'; '.join(why)}. "
                             f"Score a run of MLC's default (t_update='tested', t_space='probs') or of glc, "
                             f"confusion, forward, forward_gold")


def training_seconds(summary: dict) -> float | None:
    """A run's training time from its ``summary.json``: the process CPU time (``cpu_s``) where
    recorded — with one torch thread that is the training's own cost, whatever else the
    machine was running — else the wall time (runs from before ``cpu_s`` existed)."""
    seconds = summary.get("cpu_s", summary.get("wall_s"))
    return None if seconds is None else float(seconds)


@dataclass
class RunFolder:
    """A loaded, checked run folder (see :func:`load_run`).

    ``noisy_idx`` (``N``) indexes ``dataset.x_train``; ``y_noisy`` are the labels training
    saw there; ``y_clean`` the dataset's clean labels of the same examples when known
    (built-in datasets; evaluation only), else ``None``. ``T`` is the run's ``T.npy``.
    """

    path: Path
    record: dict
    config: "RunConfig"  # noqa: F821
    dataset: Dataset
    noisy_idx: np.ndarray
    y_noisy: np.ndarray
    trusted_idx: np.ndarray
    y_clean: np.ndarray | None
    T: np.ndarray
    saved_model: dict = field(repr=False)
    summary: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def train_seconds(self) -> float | None:
        return training_seconds(self.summary)

    def source_index(self) -> np.ndarray:
        """``N``: each scored example's row in the user's own data (module docstring)."""
        rows = self.dataset.extra.get("source_rows")
        return self.noisy_idx.copy() if rows is None else np.asarray(rows, np.int64)[self.noisy_idx]

    def source_paths(self) -> list[str] | None:
        """``N`` file paths for image-folder data, else ``None``."""
        paths = self.dataset.extra.get("source_paths")
        return None if paths is None else [paths[int(k)] for k in self.noisy_idx]

    def model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The run's final network (``model.pt``), in evaluation mode."""
        return load_model(self.saved_model, device)

    def predict(self, device: str | torch.device = "auto") -> np.ndarray:
        """``N × C`` softmax of the final network over the scored examples (in-sample:
        the network was trained on them)."""
        from ..train import resolve_device
        device = resolve_device(device)
        return predict_examples(self.model(device), self.dataset, self.noisy_idx, device)

    def train_probs(self) -> np.ndarray:
        """``train_probs.npy``: the softmax averaged over the run's last epochs
        (``keep_train_probs``), rows in ``noisy_idx`` order."""
        path = self.path / "train_probs.npy"
        if not path.exists():
            raise RunFolderError(f"{path} not found: averaged predictions are kept only by runs trained with "
                                 f"--keep-train-probs N (RunConfig.keep_train_probs); retrain with it, or score "
                                 f"with --probs model or --folds K")
        probs = np.load(path).astype(np.float64)
        if probs.shape != (self.noisy_idx.size, self.dataset.num_classes):
            raise RunFolderError(f"{path} has shape {probs.shape}, expected ({self.noisy_idx.size}, "
                                 f"{self.dataset.num_classes}) for the run's noisy examples")
        return probs / probs.sum(1, keepdims=True)


def load_model(saved: dict, device="cpu") -> torch.nn.Module:
    from ..models import create_model
    model = create_model(saved["model"], saved["input_shape"], saved["num_classes"], **saved["model_options"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def predict_examples(model: torch.nn.Module, dataset: Dataset, idx: np.ndarray, device) -> np.ndarray:
    """Softmax (float64 ``len(idx) × C``) of ``model`` over ``dataset.x_train[idx]`` with the
    test transform."""
    from ..experiments.train_probs import predict_probs
    from ..train import TensorBatchLoader
    x = dataset.x_train[torch.from_numpy(np.asarray(idx, np.int64))]
    loader = TensorBatchLoader(x, torch.zeros(len(x), dtype=torch.int64), 1000, shuffle=False,
                               transform=dataset.test_transform)
    return predict_probs(model, loader, device)


def load_run(run_dir, *, dataset: str | Dataset | None = None, data_dir=None) -> RunFolder:
    """Load and check a finished run folder of ``metacorrect train``.

    ``dataset`` (a name, a path or a loaded :class:`Dataset`) replaces the one the run
    names; ``data_dir`` its data root. Raises :class:`RunFolderError` (a ``ValueError``) —
    before anything is written anywhere — when a file is missing, the method's T is not a
    noise model, ``T.npy`` is absent or not row-stochastic, or ``labels.npz`` does not match
    the dataset (other classes, inputs, sizes, split or labels).
    """
    from ..experiments.run import RunConfig
    run = Path(run_dir)
    if not run.is_dir():
        raise RunFolderError(f"{run}: no such run folder (expected a folder written by `metacorrect train`)")
    missing = [f for f in REQUIRED_FILES if not (run / f).exists()]
    if missing:
        raise RunFolderError(f"{run} is not a finished run folder: {', '.join(missing)} missing (a run folder of "
                             f"`metacorrect train` has {', '.join(REQUIRED_FILES)}, and T.npy)")
    try:
        record = json.loads((run / "config.json").read_text())
        config = RunConfig.from_dict(record["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunFolderError(f"{run}/config.json is not a run configuration ({exc})") from None
    check_noise_model(config.method, config.method_options, where=f"{run}")
    if not (run / "T.npy").exists():
        raise RunFolderError(f"{run}/T.npy not found: the run ({config.method}) saved no transition matrix; label "
                             f"errors need the run's T (T[i, j] = P(given = j | true = i))")
    num_classes = int(record.get("num_classes", 0))
    T = check_transition_matrix(np.load(run / "T.npy"), f"{run}/T.npy", num_classes=num_classes or None)

    if isinstance(dataset, Dataset):
        ds = dataset
    else:
        name = dataset if dataset is not None else config.dataset
        try:
            ds = load_dataset(name, data_dir if data_dir is not None else config.data_dir)
        except ValueError as exc:
            hint = "" if dataset is not None else " (pass the data it was trained on with --dataset/--data-dir)"
            raise RunFolderError(f"the run's dataset {name!r} cannot be loaded: {exc}{hint}") from None
    summary = {}
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    labels = _read_labels(run)
    noisy_idx, y_noisy, trusted_idx = _check_labels_match(run, record, config, ds, labels, saved)
    y_clean = ds.y_train[noisy_idx].copy() if ds.clean_labels_known else None
    return RunFolder(path=run, record=record, config=config, dataset=ds, noisy_idx=noisy_idx, y_noisy=y_noisy,
                     trusted_idx=trusted_idx, y_clean=y_clean, T=T, saved_model=saved, summary=summary)


def _read_labels(run: Path) -> dict:
    try:
        with np.load(run / "labels.npz") as z:
            labels = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise RunFolderError(f"{run}/labels.npz is unreadable ({exc})") from None
    need = [k for k in ("noisy_idx", "y_noisy", "trusted_idx") if k not in labels]
    if need:
        raise RunFolderError(f"{run}/labels.npz lacks {', '.join(need)}; expected noisy_idx, y_noisy, trusted_idx")
    return labels


def _check_labels_match(run: Path, record: dict, config, ds: Dataset, labels: dict, saved: dict):
    """The run's recorded split and labels must be those of ``ds`` under the run's config."""
    where = f"{run}/labels.npz does not match dataset {ds.name!r} as it loads now"
    C = ds.num_classes
    for what, recorded in (("classes", record.get("num_classes")), ("classes (model.pt)", saved.get("num_classes"))):
        if recorded is not None and int(recorded) != C:
            raise RunFolderError(f"{where}: the run has {recorded} {what.split()[0]}, the dataset {C}")
    shape = record.get("input_shape") or saved.get("input_shape")
    if shape is not None and tuple(shape) != tuple(ds.input_shape):
        raise RunFolderError(f"{where}: the run's inputs are {tuple(shape)}, the dataset's {tuple(ds.input_shape)}")
    noisy_idx = np.asarray(labels["noisy_idx"], np.int64)
    y_noisy = np.asarray(labels["y_noisy"], np.int64)
    trusted_idx = np.asarray(labels["trusted_idx"], np.int64)
    parts = [noisy_idx, trusted_idx, np.asarray(labels.get("val_idx", []), np.int64),
             np.asarray(labels.get("excluded_idx", []), np.int64)]
    n = len(ds.y_train)
    total = sum(p.size for p in parts)
    if noisy_idx.size != y_noisy.size:
        raise RunFolderError(f"{run}/labels.npz: {noisy_idx.size} noisy indices but {y_noisy.size} noisy labels")
    if total != n or any(p.size and (p.min() < 0 or p.max() >= n) for p in parts):
        raise RunFolderError(f"{where}: the run split {total:,} training examples, the dataset has {n:,}")
    if y_noisy.size and (y_noisy.min() < 0 or y_noisy.max() >= C):
        raise RunFolderError(f"{where}: noisy labels outside [0, {C - 1}]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a trusted class missing: already said at training time
        problem = make_problem(ds, config.noise, config.strength, config.trusted, config.seed,
                               validation=config.validation, label_set=config.label_set)
    expected_noisy, expected_y, expected_trusted = problem.noisy_idx, problem.y_noisy, problem.trusted_idx
    if parts[3].size:  # a cross-fitting run: some examples were left out of training
        keep = ~np.isin(expected_noisy, parts[3])
        expected_noisy, expected_y = expected_noisy[keep], expected_y[keep]
        expected_trusted = expected_trusted[~np.isin(expected_trusted, parts[3])]
    if not np.array_equal(expected_trusted, trusted_idx):
        raise RunFolderError(f"{where}: the trusted examples differ from those the run's configuration selects "
                             f"(was the run trained on other data, or has the data changed since?)")
    if not np.array_equal(expected_noisy, noisy_idx):
        raise RunFolderError(f"{where}: the noisy examples differ from those the run's configuration selects")
    if not np.array_equal(expected_y, y_noisy):
        bad = int(np.flatnonzero(expected_y != y_noisy)[0])
        raise RunFolderError(f"{where}: {int((expected_y != y_noisy).sum()):,} noisy labels differ (first: training "
                             f"example {int(noisy_idx[bad])}, recorded {int(y_noisy[bad])}, the dataset gives "
                             f"{int(expected_y[bad])}); was the run trained on other data, or has the data changed?")
    return noisy_idx, y_noisy, trusted_idx
