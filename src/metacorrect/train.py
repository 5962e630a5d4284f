"""The training loop: phases, epochs, evaluation, metrics, checkpoints and exact resume.

``fit(model, optimizer, noisy_loader, trusted_loader, method=…)`` is the Python API. It
accepts any iterables of ``(x, y)`` batches with a length (``torch.utils.data.DataLoader``
works); :class:`TensorBatchLoader` is a fast in-memory loader whose shuffling is seeded
by its own generator.

Resume is exact on CPU: a checkpoint is written at the end of every epoch with the model,
optimizer, scheduler, method state (T, …) and every RNG state (torch, CUDA, each loader's
generator and the stream interleaving generator), so a run killed at any moment continues
from its last finished epoch and ends with the same weights and T as an uninterrupted run.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import noise as noise_models
from . import perf
from ._validation import check_transition_matrix
from .distributed import SINGLE, World, shard_bounds
from .methods import Method, create_method

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, or from another configuration)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TensorBatchLoader:
    """Batches of in-memory tensors ``(x, y)``, shuffled by its own seeded generator.

    ``transform`` is applied to each input batch (e.g. uint8 → float, augmentation).
    ``rows``: the loader draws from these rows of ``x`` and ``y`` only (a view, not a copy:
    :meth:`split` makes its parts this way).
    Much cheaper per batch than a ``DataLoader`` over a ``TensorDataset`` (one index
    operation instead of one per example), which matters for small models on CPU.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, transform: Callable | None = None, drop_last: bool = False,
                 world: World = SINGLE, rows: torch.Tensor | None = None):
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in number: {len(x)} and {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.transform = transform
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        # distributed: every rank draws the same global batches and keeps its slice
        # (metacorrect.distributed); ``last_count`` is (this rank's, the global) batch size
        self.world = world
        self.last_count = (0, 0)

    @property
    def num_examples(self) -> int:
        return len(self.y) if self.rows is None else len(self.rows)

    def __len__(self) -> int:
        n = self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def split(self, fraction: float, seed: int) -> tuple["TensorBatchLoader", "TensorBatchLoader"]:
        """A fixed random ``fraction`` of the examples set apart (drawn with ``seed``): the
        rest, batched and shuffled as this loader is, and the fraction, in order."""
        n = self.num_examples
        k = int(round(fraction * n))
        if not 0 < k < n:
            raise ValueError(f"cannot set {fraction} of {n} examples apart: it must leave at least one on each side")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, kept = perm[:k].sort().values, perm[k:].sort().values

        def part(idx, shuffle, part_seed):
            return TensorBatchLoader(self.x, self.y, self.batch_size, shuffle=shuffle, seed=part_seed,
                                     transform=self.transform, drop_last=self.drop_last and shuffle,
                                     world=self.world, rows=idx if self.rows is None else self.rows[idx])
        return part(kept, self.shuffle, seed + 1), part(held, False, 0)

    def __iter__(self):
        n = self.num_examples
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = torch.arange(n)[sl] if order is None else order[sl]
            global_n = len(idx)
            if self.world.active:
                start, stop = shard_bounds(global_n, self.world.rank, self.world.size)
                idx = idx[start:stop]
            self.last_count = (len(idx), global_n)
            if order is None and not self.world.active and self.rows is None:
                x, y = self.x[sl], self.y[sl]
            else:
                idx = idx if self.rows is None else self.rows[idx]
                x, y = self.x[idx], self.y[idx]
            yield (self.transform(x) if self.transform is not None else x), y


@dataclass
class TrainContext:
    """What a method's step sees: the model, its optimizer and helpers."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    num_classes: int
    noisy_loader: Iterable
    trusted_loader: Iterable
    scheduler_factory: Callable | None = None
    scheduler: Any = None
    T_true: np.ndarray | None = None
    epochs: int = 0
    steps_per_epoch: int = 0
    step_in_phase: int = 0
    epoch_in_phase: int = 0
    world: World = SINGLE
    scaler: Any = None  # torch.amp.GradScaler with amp='fp16'
    channels_last: bool = False
    # this step's (local, global) batch sizes per stream, and the stream of a single-stream step
    counts: dict = field(default_factory=dict)
    primary_stream: str = "noisy"
    # the noisy examples a phase with ``holdout`` keeps out of training (Phase.holdout)
    holdout_loader: Iterable | None = None
    _initial_model: dict = field(default_factory=dict, repr=False)
    _initial_optimizer: dict = field(default_factory=dict, repr=False)

    def share(self, stream: str) -> float:
        """This rank's share ``n_r / n`` of the step's global batch of ``stream`` (1 in one process)."""
        local, total = self.counts.get(stream, (1, 1))
        return local / total if total else 0.0

    def optimizer_step(self, loss: torch.Tensor, trusted_loss: torch.Tensor | None = None) -> None:
        """One optimizer step on ``loss`` (+ ``trusted_loss``): ``loss`` is a batch mean over the
        step's noisy batch (on a single-stream step: over its one batch), ``trusted_loss`` one
        over the paired trusted batch. Distributed, each term is weighted by this rank's share
        of its global batch and the gradients are summed over the ranks, which makes the step
        the one process would take on the union of the ranks' batches."""
        self.optimizer.zero_grad(set_to_none=True)
        scale = (lambda t: t) if self.scaler is None else self.scaler.scale
        if not self.world.active:
            scale(loss if trusted_loss is None else loss + trusted_loss).backward()
        else:
            terms = [(loss, self.primary_stream)] + ([] if trusted_loss is None else [(trusted_loss, "trusted")])
            weighted = [t * self.share(s) for t, s in terms if self.share(s) > 0]  # an empty slice adds nothing
            if weighted:
                scale(sum(weighted)).backward()
            self.sync_gradients()
        if self.scaler is None:
            self.optimizer.step()
        else:  # fp16: skips the step when a gradient overflowed (the same on every rank: summed first)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    def reported(self, loss: torch.Tensor, trusted_loss: torch.Tensor | None = None) -> torch.Tensor:
        """The step's loss to report, detached: ``loss`` (+ ``trusted_loss``), leaving out a
        term over an empty slice of this rank (a mean over no example is NaN)."""
        terms = [(loss, self.primary_stream)] + ([] if trusted_loss is None else [(trusted_loss, "trusted")])
        kept = [t for t, s in terms if self.share(s) > 0]
        return sum(kept).detach() if kept else torch.zeros((), device=self.device)

    def sync_gradients(self) -> None:
        """Sum the parameters' gradients over the ranks (one coalesced all-reduce); a
        parameter no rank has a gradient for keeps ``None`` (as one process would, so the
        optimizer skips it alike)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=self.device)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        self.world.all_reduce([has] + grads)
        for p, g, h in zip(params, grads, has.tolist()):
            p.grad = g if h > 0 else None

    def reinitialise(self) -> None:
        """Restore the model's initial weights and a fresh optimizer (methods that retrain
        from scratch in a later phase)."""
        self.model.load_state_dict(self._initial_model)
        self.optimizer.load_state_dict(self._initial_optimizer)
        self.optimizer.state.clear()

    def batches(self, loader: Iterable):
        for x, y in loader:
            yield self.to_device(x), y.to(self.device, non_blocking=True)

    def to_device(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if self.channels_last and x.ndim == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    @torch.no_grad()
    def predict_proba(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax outputs and labels over a loader, in evaluation mode (CPU tensors)."""
        was_training = self.model.training
        self.model.eval()
        probs, labels = [], []
        for x, y in self.batches(loader):
            probs.append(torch.softmax(self.model(x).float(), 1).cpu())
            labels.append(y.cpu())
        self.model.train(was_training)
        probs, labels = torch.cat(probs), torch.cat(labels)
        if self.world.active and getattr(loader, "world", SINGLE).active:
            # a sharded loader gave this rank its slices: every rank gets every rank's (in rank
            # order; the estimates built on them do not depend on the order)
            parts = self.world.gather_objects((probs, labels))
            probs, labels = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
        return probs, labels


@dataclass
class FitResult:
    model: nn.Module
    T: np.ndarray | None
    history: list[dict]
    method: Method
    wall_s: float
    cpu_s: float = 0.0  # process CPU time of the training (all its threads), resumed parts included


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _loader_generators(loaders: dict[str, Iterable]) -> dict[str, torch.Generator]:
    return {k: getattr(v, "generator") for k, v in loaders.items()
            if isinstance(getattr(v, "generator", None), torch.Generator)}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a killed process leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str | None) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); it was left in "
                              f"place — move it away to start the run afresh") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a metacorrect checkpoint (format "
                              f"{payload.get('format') if isinstance(payload, dict) else '?'}, expected {CHECKPOINT_FORMAT})")
    if fingerprint is not None and payload.get("fingerprint") != fingerprint:
        raise CheckpointError(f"checkpoint {path} comes from another configuration (fingerprint "
                              f"{payload.get('fingerprint')}, this run {fingerprint}); use another --out folder "
                              f"or start without --resume")
    return payload


def _interleave(noisy: Iterable, trusted: Iterable, generator: torch.Generator):
    """Yield ``(noisy_batch, None)`` and ``(None, trusted_batch)`` in a random order, each
    loader once."""
    n_noisy, n_trusted = len(noisy), len(trusted)
    order = torch.randperm(n_noisy + n_trusted, generator=generator) < n_noisy
    it_noisy, it_trusted = iter(noisy), iter(trusted)
    for is_noisy in order.tolist():
        yield (next(it_noisy), None) if is_noisy else (None, next(it_trusted))


def _cycle(loader: Iterable):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the trusted loader is empty")


def _steps(kind: str, noisy: Iterable, trusted: Iterable) -> int:
    """Steps in one epoch of a stream (from the loaders' lengths: no iterator is created, so no
    loader draws from an RNG here)."""
    return {"paired": len(noisy), "all": len(noisy) + len(trusted), "noisy": len(noisy)}.get(kind, len(trusted))


def _stream(kind: str, noisy: Iterable, trusted: Iterable, generator: torch.Generator):
    """The (noisy, trusted) batch pairs of one epoch."""
    if kind == "paired":
        return zip(noisy, _cycle(trusted))
    if kind == "all":
        return _interleave(noisy, trusted, generator)
    if kind == "noisy":
        return ((b, None) for b in noisy)
    return ((None, b) for b in trusted)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x = x.to(device) if isinstance(x, torch.Tensor) else x
        pred = model(x).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, noisy_loader: Iterable, trusted_loader: Iterable,
        method: str | Method = "mlc", *, epochs: int = 10, num_classes: int | None = None,
        test_loader: Iterable | None = None, val_loader: Iterable | None = None, T_true=None,
        device: str | torch.device = "auto", scheduler: Callable | None = None,
        callbacks: Sequence[Callable[[dict], None]] = (), progress: Callable[[int, int, str], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None, resume: bool = False, fingerprint: str | None = None,
        seed: int = 0, world: World = SINGLE, on_step: Callable[[int, float], None] | None = None,
        amp: str = "none", channels_last: bool = False, **method_options) -> FitResult:
    """Train ``model`` with a noisy-label method and return the model, the learned/estimated
    T (``T[i, j] = P(noisy=j | true=i)``) and the per-epoch metric history.

    Args:
        noisy_loader, trusted_loader: iterables of ``(x, y)`` batches with ``len``; the noisy
            labels are untrusted, the trusted ones are clean.
        method: a name (``'mlc'``, ``'ce'``, ``'glc'``, …) or a :class:`Method`; extra keyword
            arguments go to the method (e.g. ``virtual_lr=0.1``).
        epochs: epochs per training phase.
        num_classes: number of classes (inferred from ``T_true`` when given).
        test_loader, val_loader: evaluated after every epoch (``test_acc``, ``val_acc``).
        T_true: the true transition matrix, when known, for ``t_error`` (evaluation only).
        scheduler: optional ``factory(optimizer, total_steps) -> LR scheduler``, stepped
            every iteration and rebuilt at the start of each phase.
        callbacks: called with each epoch's metrics dict.
        progress: called as ``progress(step, steps_in_epoch, label)``.
        on_step: called after every training step as ``on_step(global_step, loss)`` (the
            step counted from 1 over the whole run, resumes included; e.g. TensorBoard).
        checkpoint_path: where to checkpoint after every epoch; with ``resume=True`` an
            existing checkpoint is continued (it must carry the same ``fingerprint``).
        seed: seeds torch's global RNG (initialisation, dropout, augmentation) and the
            interleaving of streams.
        world: the training processes (:mod:`metacorrect.distributed`; default one
            process). Distributed, the loaders must be built with the same ``world`` (each
            rank keeps its slice of every global batch); the model must start identical on
            every rank; rank 0 alone calls ``callbacks`` and ``progress`` and writes the
            checkpoint, which holds every rank's RNG state. Resuming needs the same number of
            processes.
        amp: mixed precision for the training forward passes (evaluation stays float32):
            ``'bf16'`` (CPU and CUDA) or ``'fp16'`` (with a gradient scaler for the optimizer
            steps; the meta step's own gradients are not loss-scaled, so prefer bf16);
            ``'none'`` (default). The meta-gradient runs under the same autocast (tested
            against float32 to bf16's precision).
        channels_last: the channels-last memory format for a convolutional model and its
            4-D inputs.

    On CPU, ``fit`` turns on torch's flush-to-zero mode for subnormal floats for the
    process (:func:`metacorrect.perf.flush_denormals`; opt out with
    ``METACORRECT_KEEP_DENORMALS=1``): optimizer states that decay into subnormals made
    steps about 20× slower.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    device = resolve_device(device)
    if T_true is not None:
        T_true = check_transition_matrix(T_true, "T_true")
        num_classes = num_classes or T_true.shape[0]
    if num_classes is None:
        raise ValueError("fit() needs num_classes (or T_true)")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    for name, loader in (("noisy", noisy_loader), ("trusted", trusted_loader)):
        if loader is None or len(loader) == 0:
            raise ValueError(f"the {name} loader is empty: every method needs at least one {name} batch")
    method = create_method(method, **method_options) if isinstance(method, str) else method
    if method_options and not isinstance(method, Method):
        raise ValueError("method options were given with a Method instance; set them on the instance")

    torch.manual_seed(seed + 1000 * world.rank)  # dropout and augmentation draw per rank
    if not world.is_main:
        callbacks, progress, on_step = (), None, None
    if device.type == "cpu":
        perf.flush_denormals()  # optimizer states decaying into subnormals slow CPU steps ~20x
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    world.broadcast_module(model)  # every replica starts from rank 0's weights
    restore_forward = perf.autocast_forward(model, amp, device)
    ctx = TrainContext(model=model, optimizer=optimizer, device=device, num_classes=int(num_classes),
                       noisy_loader=noisy_loader, trusted_loader=trusted_loader, scheduler_factory=scheduler,
                       T_true=T_true, epochs=epochs, world=world, channels_last=channels_last,
                       scaler=torch.amp.GradScaler(device.type) if amp == "fp16" else None)
    ctx._initial_model = copy.deepcopy(model.state_dict())
    ctx._initial_optimizer = copy.deepcopy(optimizer.state_dict())
    interleave_gen = torch.Generator().manual_seed(seed + 7919)
    loaders = {"noisy": noisy_loader, "trusted": trusted_loader}
    # phases that keep a fixed fraction of the noisy examples out of training (Phase.holdout):
    # (the loader they train on, the held-out loader); the former's shuffling is checkpointed
    holdouts: dict[int, tuple[Iterable, Iterable]] = {}
    for i, ph in enumerate(method.phases):
        if ph.holdout > 0:
            if isinstance(noisy_loader, TensorBatchLoader):
                holdouts[i] = noisy_loader.split(ph.holdout, seed + 104729 + i)
                loaders[f"noisy-phase{i}"] = holdouts[i][0]
            else:
                warnings.warn(f"phase {ph.name!r} asks for {ph.holdout:g} of the noisy examples held out, which "
                              f"needs in-memory data (TensorBatchLoader); it trains on all of them instead")
    method.setup(ctx)

    history: list[dict] = []
    first_phase, first_epoch = 0, 0
    resumed_scheduler = None
    elapsed_before = cpu_before = 0.0
    global_step = 0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = load_checkpoint(ckpt, fingerprint)
        if state.get("world_size", 1) != world.size:
            raise CheckpointError(f"checkpoint {ckpt} was written by a run of {state.get('world_size', 1)} "
                                  f"process(es); this one has {world.size}. Resume with the same number of "
                                  f"processes (the global batches would be sharded differently otherwise)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        ctx._initial_model = state["initial_model"]
        ctx._initial_optimizer = state["initial_optimizer"]
        _set_rng_state(state["rng_ranks"][world.rank] if "rng_ranks" in state else state["rng"], device)
        interleave_gen.set_state(state["interleave"])
        for k, g in _loader_generators(loaders).items():
            if k in state["loaders"]:
                g.set_state(state["loaders"][k])
        history = state["history"]
        first_phase, first_epoch = state["phase"], state["epoch"]
        elapsed_before = state.get("elapsed", 0.0)
        cpu_before = state.get("cpu_elapsed", 0.0)
        global_step = state.get("global_step", 0)
        resumed_scheduler = state.get("scheduler")

    checked_width = False
    for p_index in range(first_phase, len(method.phases)):
        phase = method.phases[p_index]
        phase_epochs = phase.epochs_of(epochs)
        if p_index == first_phase and first_epoch >= phase_epochs:
            first_epoch = 0  # the checkpoint ended this phase: the next one begins afresh
            continue
        phase_noisy, ctx.holdout_loader = holdouts.get(p_index, (noisy_loader, None))
        steps_per_pass = _steps(phase.stream, phase_noisy, trusted_loader)
        passes = phase.passes_per_epoch(phase_epochs, steps_per_pass)
        steps = passes * steps_per_pass
        ctx.steps_per_epoch = steps
        ctx.scheduler = scheduler(optimizer, steps * phase_epochs) if scheduler is not None else None
        resuming_here = p_index == first_phase and first_epoch > 0
        if resuming_here:
            if ctx.scheduler is not None and resumed_scheduler is not None:
                ctx.scheduler.load_state_dict(resumed_scheduler)
        else:
            # begin_phase first: it may still need the previous phase's network (to estimate T,
            # to keep a teacher); the re-initialisation comes after it
            method.begin_phase(ctx, p_index)
            if phase.reinit:
                ctx.reinitialise()
                if ctx.scheduler is not None:
                    ctx.scheduler = scheduler(optimizer, steps * phase_epochs)
        for epoch in range(first_epoch if p_index == first_phase else 0, phase_epochs):
            ctx.epoch_in_phase = epoch
            t0 = time.perf_counter()
            total = torch.zeros((), device=device)
            pairs = itertools.chain.from_iterable(_stream(phase.stream, phase_noisy, trusted_loader, interleave_gen)
                                                  for _ in range(passes))
            for i, (nb, tb) in enumerate(pairs):
                nb = None if nb is None else (ctx.to_device(nb[0]), nb[1].to(device, non_blocking=True))
                tb = None if tb is None else (ctx.to_device(tb[0]), tb[1].to(device, non_blocking=True))
                if not checked_width:
                    _check_output_width(model, nb or tb, ctx.num_classes)
                    checked_width = True
                ctx.step_in_phase = epoch * steps + i
                ctx.counts = {}
                for stream, batch, loader in (("noisy", nb, phase_noisy), ("trusted", tb, trusted_loader)):
                    if batch is not None:
                        ctx.counts[stream] = getattr(loader, "last_count", None) or (len(batch[1]),) * 2
                ctx.primary_stream = "noisy" if nb is not None else "trusted"
                step_loss = method.step(ctx, nb, tb)
                if ctx.share(ctx.primary_stream) > 0:  # a rank's empty slice has no loss to report
                    total = total + step_loss
                global_step += 1
                if on_step is not None:
                    on_step(global_step, float(step_loss))
                if progress is not None:
                    progress(i + 1, steps, f"{phase.name} epoch {epoch + 1}/{phase_epochs}")
            mean_loss = float(total) / max(steps, 1)
            epoch_s = time.perf_counter() - t0
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"the training loss became {mean_loss} in phase {phase.name!r}, epoch {epoch + 1} "
                    f"(method {method.name}); the last good checkpoint is kept"
                    f"{f' at {ckpt}' if ckpt is not None else ''}. Lower the learning rate or check the inputs "
                    f"for NaN/Inf.")
            # BatchNorm's running statistics: each rank kept its own slices'; rank 0's go to every
            # rank (as DDP's broadcast_buffers), so the replicas evaluate and checkpoint alike
            world.broadcast_buffers(model)
            metrics: dict[str, Any] = {"epoch": len(history) + 1, "phase": phase.name, "phase_epoch": epoch + 1,
                                       "train_loss": mean_loss, "epoch_s": epoch_s}
            if test_loader is not None:
                metrics["test_acc"] = accuracy(model, test_loader, device)
            if val_loader is not None:
                metrics["val_acc"] = accuracy(model, val_loader, device)
            T_hat = method.estimated_T()
            if T_hat is not None and T_true is not None:
                metrics["t_error"] = noise_models.t_error(_as_stochastic(T_hat), T_true)
            ends_phase = bool(method.end_epoch(ctx, p_index, epoch, metrics))
            history.append(metrics)
            for cb in callbacks:
                cb(metrics)
            rng_ranks = world.gather_objects(_rng_state(device)) if world.active else None
            if ckpt is not None and world.is_main:
                gens = _loader_generators(loaders)
                save_checkpoint(ckpt, {
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "phase": p_index,
                    "epoch": phase_epochs if ends_phase else epoch + 1,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else None,
                    "method": method.state_dict(), "rng": _rng_state(device), "world_size": world.size,
                    **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
                    "interleave": interleave_gen.get_state(), "loaders": {k: g.get_state() for k, g in gens.items()},
                    "initial_model": ctx._initial_model, "initial_optimizer": ctx._initial_optimizer,
                    "history": history, "global_step": global_step,
                    "elapsed": elapsed_before + time.perf_counter() - start,
                    "cpu_elapsed": cpu_before + time.process_time() - cpu_start})
            if ends_phase:
                break
        first_epoch = 0
    restore_forward()
    T_final = method.estimated_T()
    return FitResult(model=model, T=None if T_final is None else _as_stochastic(T_final), history=history,
                     method=method, wall_s=elapsed_before + time.perf_counter() - start,
                     cpu_s=cpu_before + time.process_time() - cpu_start)


def _as_stochastic(T: np.ndarray) -> np.ndarray:
    """Estimates are row-stochastic up to float error (or column-stochastic in MLC's
    released-code option): renormalise rows for reporting."""
    T = np.asarray(T, dtype=np.float64)
    return T / T.sum(1, keepdims=True).clip(min=1e-12)


def _check_output_width(model: nn.Module, batch, num_classes: int) -> None:
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out = model(batch[0][:2])
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ValueError(f"the model outputs shape {tuple(out.shape)} for a batch of 2, but the data has "
                         f"{num_classes} classes: expected (2, {num_classes}) logits")
