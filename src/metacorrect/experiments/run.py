"""One experiment from a plain configuration: data → noise → split → model → method →
trainer → run folder. The CLI's ``train`` and every sweep run go through
:func:`run_experiment`.

A run folder holds:

* ``config.json``   — the resolved configuration, seeds, fingerprint and versions;
* ``labels.npz``    — the split and the noisy labels training saw (reproducibility);
* ``metrics.jsonl`` — one JSON object per epoch (``epoch``, ``test_acc`` in [0, 1],
  ``val_acc`` when a validation split exists, ``t_error`` when the true T is known, …);
* ``summary.json``  — ``method``, ``final_test_acc``, ``t_error``, ``wall_s``, …;
* ``T.npy`` / ``T.txt`` — the learned or estimated T (``T[i, j] = P(noisy=j | true=i)``)
  beside the true one when known;
* ``checkpoint.pt`` — model, optimizer, scheduler, method state and RNG states, after
  every epoch (``resume=True`` continues from it); ``model.pt`` — the final model for
  ``metacorrect predict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..data import Dataset, load_dataset, make_problem
from ..methods import create_method
from ..models import create_model
from ..noise import format_matrix
from ..train import TensorBatchLoader, fit, resolve_device

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("none", "cosine")


@dataclass
class RunConfig:
    """Everything that defines one run. Defaults follow GLC's MNIST setting."""

    dataset: str = "digits"
    data_dir: str | None = None
    noise: str = "flip"
    strength: float = 0.6
    trusted: float = 0.05
    validation: float = 0.0
    label_set: str | None = None
    method: str = "mlc"
    method_options: dict = field(default_factory=dict)
    model: str | None = None  # None: the dataset's default model
    model_options: dict = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    nesterov: bool = False
    # torch's fused optimizer kernel (``fused=True``, torch >= 2.4 on CPU): the same update up
    # to float rounding, much faster for large, sparsely-used tables (the text models'
    # embeddings: Adam's step was 86 % of a Twitter step); off by default
    fused_optimizer: bool = False
    scheduler: str = "none"
    batch_size: int = 32
    trusted_batch_size: int | None = None  # None: the batch size
    epochs: int = 10
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.batch_size < 1 or (self.trusted_batch_size is not None and self.trusted_batch_size < 1):
            raise ValueError("batch sizes must be >= 1")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # settings added after the first runs were recorded: they enter the fingerprint only when
    # set away from their default, so the checkpoints of those runs stay valid
    ADDED_LATER = {"fused_optimizer": False}

    def method_version(self) -> int:
        """The version of the method's algorithm these options resolve to
        (:meth:`metacorrect.methods.Method.algorithm_version`)."""
        from ..methods import create_method
        try:
            return create_method(self.method, **self.method_options).version
        except (ValueError, TypeError):
            return 1  # invalid options fail where the method is built, with their own message

    def fingerprint(self) -> str:
        """A hash of everything that changes the result (not where the data lives)."""
        d = self.to_dict()
        d.pop("data_dir")
        d.pop("device")
        for key, default in self.ADDED_LATER.items():
            if d.get(key) == default:
                d.pop(key)
        version = self.method_version()
        if version != 1:  # version 1 is every run recorded before versions existed
            d["method_version"] = version
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


DEFAULT_MODELS = {"digits": "mlp", "mnist": "mlp", "fashion-mnist": "mlp", "cifar10": "resnet20",
                  "cifar10n": "resnet20", "cifar100": "resnet20", "clothing1m": "resnet20",
                  "sst": "word_avg", "twitter_pos": "window_mlp"}


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "metacorrect": __version__, "platform": platform.platform()}


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def build_model(config: RunConfig, dataset: Dataset):
    name = config.model or dataset.extra.get("default_model") or DEFAULT_MODELS.get(dataset.name, "mlp")
    options = dict(config.model_options)
    if "vocab_size" in dataset.extra and name in ("word_avg", "window_mlp"):
        options.setdefault("vocab_size", dataset.extra["vocab_size"])
    return name, options, create_model(name, dataset.input_shape, dataset.num_classes, **options)


def build_optimizer(config: RunConfig, model):
    extra = {"fused": True} if config.fused_optimizer else {}
    try:
        if config.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **extra)
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay, **extra)
    except (RuntimeError, ValueError, TypeError) as exc:
        if not extra:
            raise
        raise ValueError(f"fused_optimizer: torch {torch.__version__} has no fused {config.optimizer} for these "
                         f"parameters ({exc}); it needs torch >= 2.4 on CPU. Turn fused_optimizer off.") from exc


def build_scheduler(config: RunConfig) -> Callable | None:
    if config.scheduler == "cosine":
        return lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    return None


def run_experiment(config: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                   progress: Callable | None = None, on_epoch: Callable[[dict], None] | None = None,
                   dataset: Dataset | None = None) -> dict:
    """Run one configuration, writing the run folder ``out_dir``; return the summary.

    With ``resume=True`` an interrupted run continues from its last checkpoint (the
    configuration must be the same); a finished run (``summary.json`` present) is
    returned as it is.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    if resume and summary_path.exists():
        done = json.loads(summary_path.read_text())
        if done.get("fingerprint") == config.fingerprint():
            return done
    if not resume:
        for stale in ("checkpoint.pt", "summary.json", "metrics.jsonl"):
            (out / stale).unlink(missing_ok=True)

    dataset = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    problem = make_problem(dataset, config.noise, config.strength, config.trusted, config.seed,
                           validation=config.validation, label_set=config.label_set)
    torch.manual_seed(config.seed)
    model_name, model_options, model = build_model(config, dataset)
    optimizer = build_optimizer(config, model)
    method = create_method(config.method, **config.method_options)

    seeds = {"split_and_noise": config.seed, "torch": config.seed, "noisy_loader": config.seed * 1000 + 1,
             "trusted_loader": config.seed * 1000 + 2}
    x_n, y_n = problem.tensors("noisy")
    x_t, y_t = problem.tensors("trusted")
    noisy_loader = TensorBatchLoader(x_n, y_n, config.batch_size, seed=seeds["noisy_loader"],
                                     transform=dataset.train_transform)
    trusted_loader = TensorBatchLoader(x_t, y_t, config.trusted_batch_size or config.batch_size,
                                       seed=seeds["trusted_loader"], transform=dataset.train_transform)
    test_loader = None
    if dataset.x_test is not None:
        test_loader = TensorBatchLoader(*problem.tensors("test"), 1000, shuffle=False,
                                        transform=dataset.test_transform)
    val_loader = None
    if len(problem.val_idx):
        val_loader = TensorBatchLoader(*problem.tensors("val"), 1000, shuffle=False, transform=dataset.test_transform)

    resolved = config.to_dict()
    resolved.update(model=model_name, model_options=model_options,
                    method_options={**method.options(), **config.method_options})
    write_json(out / "config.json", {"config": resolved, "fingerprint": config.fingerprint(), "seeds": seeds,
                                     "problem": problem.description, "versions": versions(),
                                     "device": str(resolve_device(config.device)),
                                     "num_classes": dataset.num_classes, "class_names": dataset.class_names,
                                     "input_shape": list(dataset.input_shape)})
    np.savez_compressed(out / "labels.npz", noisy_idx=problem.noisy_idx, y_noisy=problem.y_noisy,
                        trusted_idx=problem.trusted_idx, val_idx=problem.val_idx,
                        **({"T_true": problem.T_true} if problem.T_true is not None else {}))

    metrics_path = out / "metrics.jsonl"

    def record(metrics: dict):
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if on_epoch is not None:
            on_epoch(metrics)

    result = fit(model, optimizer, noisy_loader, trusted_loader, method, epochs=config.epochs,
                 num_classes=dataset.num_classes, test_loader=test_loader, val_loader=val_loader,
                 T_true=problem.T_true, device=config.device, scheduler=build_scheduler(config),
                 callbacks=[record], progress=progress, checkpoint_path=out / "checkpoint.pt",
                 resume=resume, fingerprint=config.fingerprint(), seed=config.seed)
    # the callback appends as epochs finish; the final file is rewritten from the history so that
    # a resumed run lists every epoch exactly once
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in result.history))
    os.replace(tmp, metrics_path)

    last = result.history[-1]
    summary = {"method": config.method, "dataset": config.dataset, "noise": problem.description["noise"],
               "strength": config.strength, "trusted": config.trusted, "seed": config.seed,
               "final_test_acc": last.get("test_acc"), "final_val_acc": last.get("val_acc"),
               "t_error": last.get("t_error"), "wall_s": result.wall_s,
               "epochs": len(result.history), "fingerprint": config.fingerprint()}
    if result.T is not None:
        np.save(out / "T.npy", result.T)
        text = "Learned/estimated T (rows = true class, T[i, j] = P(noisy=j | true=i)):\n" + format_matrix(result.T)
        if problem.T_true is not None:
            text += "\n\nTrue T:\n" + format_matrix(problem.T_true)
        (out / "T.txt").write_text(text + "\n")
    torch.save({"model": model_name, "model_options": model_options, "state_dict": model.state_dict(),
                "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
                "class_names": dataset.class_names, "dataset": config.dataset}, out / "model.pt")
    write_json(summary_path, summary)
    return summary
