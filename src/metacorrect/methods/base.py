"""What a training method is: phases of epochs over data streams, and a step.

A method declares its :class:`Phase` s. Each phase runs ``epochs`` epochs over one stream:

* ``'paired'``  — one epoch = one pass over the noisy loader, each noisy batch paired with a
  trusted batch (the trusted loader is cycled, reshuffled each pass): the meta methods;
* ``'all'``     — one pass over noisy *and* trusted batches, interleaved at random in
  proportion to their numbers (GLC concatenates both sets; each batch here is all-noisy
  or all-trusted, so every trusted example is seen once per epoch as in GLC);
* ``'noisy'``   — the noisy loader alone;
* ``'trusted'`` — the trusted loader alone.

``step(ctx, noisy, trusted)`` gets ``(x, y)`` tuples (either may be ``None`` in a single
stream) and returns the batch loss as a detached tensor. ``begin_phase`` runs once when a
phase starts (not again on resume), before a ``reinit`` phase re-initialises the model: it
can estimate T or keep a teacher from the network the previous phase trained.
"""

from __future__ import annotations

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

    def __post_init__(self):
        if self.stream not in STREAMS:
            raise ValueError(f"unknown stream {self.stream!r}; expected one of {STREAMS}")


@dataclass
class Method:
    """Base class. Subclasses set ``name``, ``phases`` and implement ``step``."""

    name: str = field(default="", init=False)
    phases: tuple[Phase, ...] = field(default=(), init=False)

    def setup(self, ctx) -> None:
        """Called once before training (also on resume, before the state is loaded)."""

    def begin_phase(self, ctx, index: int) -> None:
        """Called when phase ``index`` starts (after re-initialisation, if any)."""

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
