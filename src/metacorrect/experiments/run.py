"""One experiment from a plain configuration: data → noise → split → model → method →
trainer → run folder. The CLI's ``train`` and every sweep run go through
:func:`run_experiment`.

A run folder holds:

* ``config.json``   — the resolved configuration, seeds, fingerprint and versions;
* ``labels.npz``    — the split and the noisy labels training saw (reproducibility);
* ``metrics.jsonl`` — one JSON object per epoch (``epoch``, ``test_acc`` in [0, 1],
  ``val_acc`` when a validation split exists, ``t_error`` when the true T is known, …);
* ``summary.json``  — ``method``, ``final_test_acc``, ``t_error``, ``wall_s``, ``cpu_s`` (process CPU time), …;
* ``T.npy`` / ``T.txt`` — the learned or estimated T (``T[i, j] = P(noisy=j | true=i)``)
  beside the true one when known;
* ``checkpoint.pt`` — model, optimizer, scheduler, method state and RNG states, after
  every epoch (``resume=True`` continues from it); ``model.pt`` — the final model for
  ``metacorrect predict``;
* ``train_probs.npy`` — with ``keep_train_probs=N``, the network's softmax over the noisy
  training examples (rows in ``labels.npz["noisy_idx"]`` order) averaged over the last N
  epochs (:mod:`metacorrect.experiments.train_probs`; used by ``metacorrect errors``).
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
from ..distributed import SINGLE, World
from ..train import TensorBatchLoader, fit, resolve_device
from .packing import json_default

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
    # save train_probs.npy: the softmax over the noisy training examples averaged over the last
    # N epochs of the final phase (0: off). An observer only: training is the same with it on
    keep_train_probs: int = 0
    # streamed image datasets (clothing1m-stream): DataLoader worker processes decoding images
    loader_workers: int = 0
    # initial weights from a torchvision-format state dict (e.g. ImageNet-pretrained ResNet-50)
    init_weights: str | None = None
    # mixed precision for the training forward passes ("bf16", "fp16"; "none") and the
    # channels-last memory format for convolutional models
    amp: str = "none"
    channels_last: bool = False

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
        from ..perf import AMP_MODES
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ValueError(f"loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        if isinstance(self.keep_train_probs, bool) or not isinstance(self.keep_train_probs, int) \
                or not 0 <= self.keep_train_probs <= self.epochs:
            raise ValueError(f"keep_train_probs must be an integer number of final epochs in [0, epochs = "
                             f"{self.epochs}], got {self.keep_train_probs!r}")

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
    ADDED_LATER = {"fused_optimizer": False, "keep_train_probs": 0, "loader_workers": 0, "init_weights": None,
                   "amp": "none", "channels_last": False}

    def resolved_method_options(self) -> dict | None:
        """The method's options with its defaults filled in (``Method.options()``), or
        ``None`` when the options are invalid (they fail where the method is built)."""
        from ..methods import create_method
        try:
            return create_method(self.method, **self.method_options).options()
        except (ValueError, TypeError):
            return None

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
            # and the options the method resolves (defaults included): a default that changes
            # changes the run's identity, so an old checkpoint is not resumed under it
            d["method_version"] = version
            d["method_resolved"] = self.resolved_method_options()
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
    tmp.write_text(json.dumps(obj, indent=2, default=json_default) + "\n")
    os.replace(tmp, path)


_EVAL_BATCH = 1000


def _loader_factory(config: RunConfig, dataset: Dataset, world: World):
    """``loader(x, y, batch_size, seed=0, train=...)``: in-memory batches
    (:class:`~metacorrect.train.TensorBatchLoader`), or for a streamed image dataset a
    :class:`~metacorrect.data.streaming.StreamLoader` decoding with ``loader_workers``
    processes. Training loaders are sharded over ``world``; evaluation loaders are not
    (every rank evaluates the whole set)."""
    streamed = dataset.extra.get("streamed")

    def make(x, y, batch_size, seed=0, *, train: bool):
        shard = world if train else SINGLE
        if streamed:
            from ..data.streaming import StreamLoader
            return StreamLoader(x, y, batch_size if train else min(batch_size, 256), seed=seed, shuffle=train,
                                transform=streamed[0] if train else streamed[1], workers=config.loader_workers,
                                world=shard)
        return TensorBatchLoader(x, y, batch_size, seed=seed, shuffle=train, world=shard,
                                 transform=dataset.train_transform if train else dataset.test_transform)
    return make


def build_model(config: RunConfig, dataset: Dataset):
    name = config.model or dataset.extra.get("default_model") or DEFAULT_MODELS.get(dataset.name, "mlp")
    options = dict(config.model_options)
    if "vocab_size" in dataset.extra and name in ("word_avg", "window_mlp"):
        options.setdefault("vocab_size", dataset.extra["vocab_size"])
    model = create_model(name, dataset.input_shape, dataset.num_classes, **options)
    if config.init_weights:
        from ..models import load_init_weights
        load_init_weights(model, config.init_weights)  # checked against the architecture
    return name, options, model


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


def exclusion_fingerprint(fingerprint: str, exclude) -> str:
    """The fingerprint of a run of a configuration with the training examples ``exclude``
    left out (a K-fold cross-fitting run)."""
    digest = hashlib.sha256(np.sort(np.asarray(exclude, dtype=np.int64)).tobytes()).hexdigest()
    return hashlib.sha256(f"{fingerprint}|exclude:{digest}".encode()).hexdigest()[:16]


def run_experiment(config: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                   progress: Callable | None = None, on_epoch: Callable[[dict], None] | None = None,
                   dataset: Dataset | None = None, exclude=None, world: World = SINGLE,
                   tensorboard: str | os.PathLike | None = None) -> dict:
    """Run one configuration, writing the run folder ``out_dir``; return the summary.

    With ``resume=True`` an interrupted run continues from its last checkpoint (the
    configuration must be the same); a finished run (``summary.json`` present) is
    returned as it is.

    ``exclude``: indices of training examples (rows of ``dataset.x_train``, from the noisy or
    the trusted part) left out of training — the split and the noisy labels of the rest stay
    those of the full configuration (K-fold cross-fitting, :mod:`metacorrect.errors.crossfit`). The run's
    fingerprint then covers the exclusion, and ``labels.npz`` lists the examples trained on
    (``noisy_idx``) and those left out (``excluded_idx``).

    Distributed (``world``, :mod:`metacorrect.distributed`; launched by ``torchrun``):
    every rank builds the same problem and model and keeps its slice of each global batch
    (``batch_size`` stays the global batch); rank 0 alone writes the run folder, and
    ``summary.json`` records ``world_size``.

    ``tensorboard``: a folder for TensorBoard event files of the run (per-step loss, the
    epoch metrics, T as an image; :mod:`metacorrect.tensorboard_logger`), or ``None``.
    """
    out = Path(out_dir)
    main = world.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    fingerprint = config.fingerprint() if exclude is None else exclusion_fingerprint(config.fingerprint(), exclude)
    summary_path = out / "summary.json"
    if resume and summary_path.exists():
        done = json.loads(summary_path.read_text())
        if done.get("fingerprint") == fingerprint:
            return done
    if not resume and main:
        for stale in ("checkpoint.pt", "summary.json", "metrics.jsonl", "train_probs.npy", "train_probs.partial.npz"):
            (out / stale).unlink(missing_ok=True)

    dataset = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    problem = make_problem(dataset, config.noise, config.strength, config.trusted, config.seed,
                           validation=config.validation, label_set=config.label_set)
    excluded = np.zeros(0, dtype=np.int64)
    if exclude is not None:
        problem, excluded = _exclude(problem, exclude)
    torch.manual_seed(config.seed)
    model_name, model_options, model = build_model(config, dataset)
    optimizer = build_optimizer(config, model)
    method = create_method(config.method, **config.method_options)

    seeds = {"split_and_noise": config.seed, "torch": config.seed, "noisy_loader": config.seed * 1000 + 1,
             "trusted_loader": config.seed * 1000 + 2}
    x_n, y_n = problem.tensors("noisy")
    x_t, y_t = problem.tensors("trusted")
    loader = _loader_factory(config, dataset, world)
    noisy_loader = loader(x_n, y_n, config.batch_size, seed=seeds["noisy_loader"], train=True)
    trusted_loader = loader(x_t, y_t, config.trusted_batch_size or config.batch_size, seed=seeds["trusted_loader"],
                            train=True)
    test_loader = None
    if dataset.x_test is not None:
        test_loader = loader(*problem.tensors("test"), _EVAL_BATCH, train=False)
    val_loader = None
    if len(problem.val_idx):
        val_loader = loader(*problem.tensors("val"), _EVAL_BATCH, train=False)

    resolved = config.to_dict()
    resolved.update(model=model_name, model_options=model_options,
                    method_options={**method.options(), **config.method_options})
    if main:
        _write_inputs(out, resolved, fingerprint, seeds, problem, dataset, config, exclude, excluded)
    world.barrier()

    metrics_path = out / "metrics.jsonl"

    def record(metrics: dict):
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if on_epoch is not None:
            on_epoch(metrics)

    callbacks = [record]
    keeper = None
    if config.keep_train_probs:
        if world.active:
            raise ValueError("keep_train_probs is not available in distributed training yet")
        from .train_probs import TrainProbsKeeper
        keeper = TrainProbsKeeper(model, TensorBatchLoader(x_n, y_n, 1000, shuffle=False,
                                                           transform=dataset.test_transform),
                                  config.keep_train_probs, method.phases[-1].name, config.epochs, out,
                                  resolve_device(config.device), fingerprint, resume)
        callbacks.insert(0, keeper)
    board = None
    if tensorboard is not None and main:
        from ..tensorboard_logger import TensorBoardLogger
        board = TensorBoardLogger(tensorboard, problem.T_true)
        callbacks.append(lambda m: board.epoch(m, method.estimated_T()))
    try:
        result = fit(model, optimizer, noisy_loader, trusted_loader, method, epochs=config.epochs,
                     num_classes=dataset.num_classes, test_loader=test_loader, val_loader=val_loader,
                     T_true=problem.T_true, device=config.device, scheduler=build_scheduler(config),
                     callbacks=callbacks, progress=progress, checkpoint_path=out / "checkpoint.pt",
                     resume=resume, fingerprint=fingerprint, seed=config.seed, world=world, amp=config.amp,
                     channels_last=config.channels_last, on_step=None if board is None else board.step)
    finally:
        if board is not None:
            board.close()
    if keeper is not None:
        keeper.finish()
    last = result.history[-1]
    summary = {"method": config.method, "dataset": config.dataset, "noise": problem.description["noise"],
               "strength": config.strength, "trusted": config.trusted, "seed": config.seed,
               "final_test_acc": last.get("test_acc"), "final_val_acc": last.get("val_acc"),
               "t_error": last.get("t_error"), "wall_s": result.wall_s, "cpu_s": result.cpu_s,
               "epochs": len(result.history), "fingerprint": fingerprint, "world_size": world.size}
    if main:
        _write_outputs(out, result, problem, dataset, config, model_name, model_options, model, summary)
    world.barrier()
    return summary


def _write_inputs(out: Path, resolved, fingerprint, seeds, problem, dataset, config, exclude, excluded) -> None:
    """config.json and labels.npz: what the run is, written before training."""
    write_json(out / "config.json", {"config": resolved, "fingerprint": fingerprint, "seeds": seeds,
                                     "problem": problem.description, "versions": versions(),
                                     "device": str(resolve_device(config.device)),
                                     "num_classes": dataset.num_classes, "class_names": dataset.class_names,
                                     "input_shape": list(dataset.input_shape),
                                     **({"excluded": int(excluded.size)} if exclude is not None else {})})
    np.savez_compressed(out / "labels.npz", noisy_idx=problem.noisy_idx, y_noisy=problem.y_noisy,
                        trusted_idx=problem.trusted_idx, val_idx=problem.val_idx,
                        **({"T_true": problem.T_true} if problem.T_true is not None else {}),
                        **({"excluded_idx": excluded} if exclude is not None else {}))


def _write_outputs(out: Path, result, problem, dataset, config, model_name, model_options, model,
                   summary: dict) -> None:
    """metrics.jsonl (rewritten whole), T, model.pt and summary.json: what the run made."""
    metrics_path = out / "metrics.jsonl"
    # the callback appends as epochs finish; the final file is rewritten from the history so that
    # a resumed run lists every epoch exactly once
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in result.history))
    os.replace(tmp, metrics_path)

    if result.T is not None:
        np.save(out / "T.npy", result.T)
        text = "Learned/estimated T (rows = true class, T[i, j] = P(noisy=j | true=i)):\n" + format_matrix(result.T)
        if problem.T_true is not None:
            text += "\n\nTrue T:\n" + format_matrix(problem.T_true)
        (out / "T.txt").write_text(text + "\n")
    torch.save({"model": model_name, "model_options": model_options, "state_dict": model.state_dict(),
                "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
                "class_names": dataset.class_names, "dataset": config.dataset}, out / "model.pt")
    write_json(out / "summary.json", summary)


def _exclude(problem, exclude):
    """``problem`` without the training examples ``exclude`` (training-set indices from its
    noisy or trusted part; the validation split cannot be excluded)."""
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    keep_n = ~np.isin(problem.noisy_idx, exclude)
    keep_t = ~np.isin(problem.trusted_idx, exclude)
    if int((~keep_n).sum() + (~keep_t).sum()) != exclude.size:
        outside = np.setdiff1d(exclude, np.concatenate([problem.noisy_idx, problem.trusted_idx]))
        raise ValueError(f"exclude: {outside.size} of the {exclude.size} indices (first {int(outside[0])}) are not "
                         f"noisy or trusted training examples of this configuration")
    if not keep_n.any() or not keep_t.any():
        raise ValueError(f"exclude leaves no {'noisy' if not keep_n.any() else 'trusted'} training example")
    problem = dataclasses.replace(
        problem, noisy_idx=problem.noisy_idx[keep_n], y_noisy=problem.y_noisy[keep_n],
        y_noisy_clean=None if problem.y_noisy_clean is None else problem.y_noisy_clean[keep_n],
        trusted_idx=problem.trusted_idx[keep_t],
        description={**problem.description, "n_noisy": int(keep_n.sum()), "n_trusted": int(keep_t.sum()),
                     "excluded": int(exclude.size)})
    return problem, exclude
