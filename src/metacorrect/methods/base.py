"""What a training method is: phases of epochs over data streams, and a step.

A method declares its :class:`Phase` s. Each phase runs ``epochs`` epochs over one stream:

* ``'paired'``  — one epoch = one pass over the noisy loader, each noisy batch paired with a
  trusted batch (the trusted loader is cycled, reshuffled each pass): the meta methods;
* ``'all'``     — one pass over noisy *and* trusted batches, interleaved at random in
  proportion to their numbers (GLC concatenates both sets; each batch here is all-noisy
  or all-trusted, so every trusted example is seen once per epoch as in GLC);
* ``'noisy'``   — the noisy loader alone;
* ``'trusted'`` — the trusted loader alone.

A phase may ask for ``min_updates``: each epoch then makes several passes over its stream
(``Phase.passes_per_epoch``), as GLC's gold-only baseline trains at least 2,000 updates
however small the trusted set.

``step(ctx, noisy, trusted)`` gets ``(x, y)`` tuples (either may be ``None`` in a single
stream) and returns the batch loss as a detached tensor. ``begin_phase`` runs once when a
phase starts (not again on resume), before a ``reinit`` phase re-initialises the model: it
can estimate T or keep a teacher from the network the previous phase trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

STREAMS = ("paired", "all", "noisy", "trusted")


@dataclass(frozen=True)
class Phase:
    name: str
    stream: str
    # re-initialise the model and optimizer when the phase begins, *after* ``begin_phase``
    # (which may still use the previous phase's network, e.g. to estimate T)
    reinit: bool = False
    # at least this many updates in the phase: when ``epochs`` passes over the stream make
    # fewer, each epoch makes ⌈min_updates / (epochs · steps per pass)⌉ passes (so the number
    # of epochs, evaluations and checkpoints stays as asked)
    min_updates: int = 0
    # this phase's epochs as a fraction of the run's ``epochs`` (at least one epoch), e.g.
    # MLC's estimate phase, which only has to produce T's starting point
    epoch_fraction: float = 1.0
    # a fixed fraction of the noisy examples kept out of this phase's training (in-memory
    # data only), for the method to evaluate on (``ctx.holdout_loader``, noisy labels)
    holdout: float = 0.0

    def __post_init__(self):
        if self.stream not in STREAMS:
            raise ValueError(f"unknown stream {self.stream!r}; expected one of {STREAMS}")
        if self.min_updates < 0:
            raise ValueError(f"min_updates must be >= 0, got {self.min_updates}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"a phase's holdout must be a fraction in [0, 1), got {self.holdout}")
        if not 0.0 < self.epoch_fraction <= 1.0:
            raise ValueError(f"a phase's epoch_fraction must be in (0, 1], got {self.epoch_fraction}")

    def epochs_of(self, epochs: int) -> int:
        """This phase's number of epochs in a run of ``epochs`` epochs per phase."""
        return max(1, round(epochs * self.epoch_fraction))

    def passes_per_epoch(self, epochs: int, steps_per_pass: int) -> int:
        if self.min_updates <= 0 or steps_per_pass <= 0:
            return 1
        return max(1, math.ceil(self.min_updates / (epochs * steps_per_pass)))


@dataclass
class Method:
    """Base class. Subclasses set ``name``, ``phases`` and implement ``step``."""

    name: str = field(default="", init=False)
    phases: tuple[Phase, ...] = field(default=(), init=False)

    # The algorithm's version: raised when a default changes what the method computes, so a
    # run made before (its resolved options recorded in config.json and the results
    # database) is told apart from one made after — see :meth:`algorithm_version`.
    VERSION = 1

    @classmethod
    def algorithm_version(cls, options: dict | None) -> int:
        """The version of the algorithm a run with these *resolved* options ran (options as
        :meth:`options` recorded them; a record from before versions existed is version 1
        unless the subclass can tell otherwise)."""
        return cls.VERSION

    @property
    def version(self) -> int:
        return self.algorithm_version(self.options())

    def setup(self, ctx) -> None:
        """Called once before training (also on resume, before the state is loaded)."""

    def begin_phase(self, ctx, index: int) -> None:
        """Called when phase ``index`` starts (after re-initialisation, if any)."""

    def end_epoch(self, ctx, index: int, epoch: int, metrics: dict) -> bool:
        """Called after each epoch of phase ``index`` (``epoch`` counted from 0) with the
        epoch's ``metrics`` (the method may add its own), before the checkpoint; return True
        to end the phase there (e.g. MLC's estimate phase, which stops once its network
        overfits the noisy labels of held-out examples)."""
        return False

    def step(self, ctx, noisy, trusted) -> torch.Tensor:
        raise NotImplementedError

    def estimated_T(self) -> np.ndarray | None:
        """The method's current estimate of ``T[i, j] = P(noisy=j | true=i)``, if it has one."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def options(self) -> dict[str, Any]:
        """The method's resolved options, for config.json."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}


def ce_step(ctx, x, y) -> torch.Tensor:
    """One plain cross-entropy step on ``(x, y)``."""
    loss = F.cross_entropy(ctx.model(x), y)
    ctx.optimizer_step(loss)
    return loss.detach()


def batch_of(noisy, trusted):
    """The one non-empty batch of a single-stream step."""
    return noisy if noisy is not None else trusted
