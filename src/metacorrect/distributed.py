"""Data-parallel training over ``torch.distributed``, launched by ``torchrun``.

The rule that makes one configuration mean the same algorithm on 1 or N processes: every
rank draws the *same global batches* (each loader's shuffling generator is seeded alike on
every rank) and keeps a contiguous slice of each one (:func:`shard_bounds`: the first
``B mod N`` ranks get one example more; a rank may get none). The union of the ranks'
slices at a step is the batch one process would have drawn.

Every mean over a batch becomes ``Σ_r (n_r / n) · mean_r``: a rank scales the terms of its
loss (and of the meta step's gradients) by its share ``n_r / n`` of that stream's global
batch — separately for the noisy and the trusted batch of a paired step — and the ranks
*sum* their gradients (:class:`World.all_reduce`). A rank with an empty slice contributes
zeros and still takes part in every collective.

Gradients are synchronised by an explicit all-reduce after each backward, not by the
``DistributedDataParallel`` wrapper: DDP synchronises only inside ``.backward()`` through
the wrapper, and the meta step's gradients (``torch.autograd.grad``), its ``create_graph``
passes and its forward-mode JVP go around it (see :mod:`metacorrect.meta`). One
coalesced all-reduce per backward moves the same bytes as DDP's buckets, without DDP's
overlap of communication with the backward pass (which matters on GPUs, not on CPU).

Randomness: initialisation and the loaders' shuffles are seeded alike on every rank.
Dropout and augmentation draw from each rank's own torch generator, seeded
``seed + 1000·rank`` so that ranks do not draw the same masks for different examples; a
run with dropout or augmentation is therefore not equal to one process (the equality
tests leave them out). Evaluation runs on every rank over the whole test set (rank 0
reports it); rank 0 alone writes the run folder and checkpoints, which hold every rank's
RNG state.

BatchNorm: each rank normalises its own slice with that slice's statistics — in the
training steps and in the meta step's passes alike — so "equal to one process" means one
process that normalises each slice separately (a ghost batch norm over the same slices;
the tests check exactly that). ``torch.nn.SyncBatchNorm`` would normalise over the global
batch instead, with an all-reduce per layer in the forward; its backward is DDP's, and it
has no forward-mode (JVP) rule, so the meta step's fast path could not run through it.
Running statistics are each rank's own during an epoch; at each epoch's end rank 0's are
copied to every rank (as DDP's ``broadcast_buffers``), before evaluation and the checkpoint.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor over the ranks, in one coalesced all-reduce (in place; returned)."""
        if not self.active or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        out, start = [], 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[start:start + n].view_as(t))
            out.append(t)
            start += n
        return out

    def reduce_scaled(self, tensors, share: float) -> list[torch.Tensor]:
        """``Σ_r share_r · t_r`` for each tensor (``None`` entries count as zeros of no shape:
        they must be ``None`` on every rank). Returns new tensors."""
        scaled = [None if t is None else t.detach() * share for t in tensors]
        present = [t for t in scaled if t is not None]
        self.all_reduce(present)
        return scaled

    def differentiable_sum(self, tensors, share: float) -> list[torch.Tensor]:
        """``Σ_r share_r · t_r`` through autograd: the backward sums the ranks' cotangents
        (the adjoint of a sum over ranks), as the meta step's reference path needs."""
        return [None if t is None else (_SumOverRanks.apply(t * share) if self.active else t * share)
                for t in tensors]

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers to every rank."""
        if self.active:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=src)

    def broadcast_buffers(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s buffers (BatchNorm's running statistics) to every rank."""
        if self.active:
            with torch.no_grad():
                for t in module.buffers():
                    dist.broadcast(t.data, src=src)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def check_identical(self, tensor: torch.Tensor, what: str) -> None:
        """Raise when ``tensor`` differs between ranks (T, a weight network: replicas must agree)."""
        if not self.active:
            return
        hi, lo = tensor.detach().double().clone(), tensor.detach().double().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        if not torch.equal(hi, lo):
            raise RuntimeError(f"{what} differs between ranks (largest difference {float((hi - lo).abs().max()):.3g}); "
                               f"the replicas have diverged")


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the incoming gradients;
    differentiable twice (its backward is itself)."""

    @staticmethod
    def forward(ctx, t):
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad.contiguous())


SINGLE = World()


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """The slice ``[start, stop)`` of a batch of ``n`` that rank ``rank`` of ``size`` keeps:
    contiguous, the first ``n mod size`` ranks one longer (possibly empty)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def from_environment(device: torch.device | None = None, timeout_s: float = 600.0) -> World:
    """The world ``torchrun`` (or Slurm through it) describes in the environment —
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` — with the process group
    initialised (NCCL on CUDA, gloo on CPU); a single process when ``WORLD_SIZE`` is unset
    or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch with torchrun "
                           f"(torchrun --standalone --nproc_per_node {size} -m metacorrect train ...)")
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size())


def local_device(device: str) -> str:
    """With several processes on a node, each takes the GPU of its ``LOCAL_RANK``."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def shutdown(world: World) -> None:
    """Leave the process group (after a run, or when it fails)."""
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
