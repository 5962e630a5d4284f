"""How MLC moves T, given one hypergradient ``g = ∂L_clean(w')/∂T`` per meta step.

Orientation: ``T[i, j] = P(noisy = j | true = i)`` (rows = true class, rows sum to 1, or
columns with ``dim=0``). Every rule here keeps T stochastic through the projection
:func:`project_stochastic` (clamp at 0, renormalise).

Rules (``MLC(t_update=...)``):

* ``'tested'`` (the default): a step only where the data say T is wrong. Each
  hypergradient is scaled to unit root-mean-square over its entries (the raw scale varies
  by orders of magnitude between steps and datasets); the scaled hypergradients are
  averaged over a *block* of ``B`` meta steps, and at the end of each block an entry of T
  moves by ``meta_lr`` against the sign of its block mean only where that mean differs from
  zero by more than ``z_crit`` standard errors (a two-sided z-test per entry). When the
  hypergradient carries no signal T stops moving (each entry moves with probability
  ``2·(1 − Φ(z_crit))`` per block); where it says consistently that T is far from the
  truth, T gets there at ``meta_lr`` per block whatever the trusted set's size. ``B`` is
  computed from the run's length so that every run has ``blocks`` blocks
  (``B = max(min_block, ⌈N / blocks⌉)`` for ``N`` meta steps in all).
  ``independent`` caps the number of meta steps the standard error counts as independent
  (``None``: no cap). Every hypergradient is a clean loss on batches of one fixed trusted
  set: once the meta steps since an entry last moved have seen every trusted example, more
  of them add evidence about the noisy batches but none about the trusted set, and a
  pull particular to those few examples repeats in every step. MLC sets the cap to the
  number of disjoint trusted batches (the trusted set's size over its batch size), the
  most independent draws of the clean loss the set holds: the standard error of a mean is
  never taken below what that many independent steps give (conservative: it treats all of
  a step's variance as the trusted batch's).
* ``'adam'``: Adam on T (moments of the raw hypergradient) with ``meta_lr`` decayed to 0
  along a cosine over the run: the usual end-to-end T learner's optimiser. Kept for
  comparison.
* ``'v1'``: metacorrect 0.1's rule, ``T ← Π(T − meta_lr·g / max|g|)`` every meta step
  (constant step; a random walk once the hypergradient is noise).
* ``'released'``: the released MLC code's update, ``T ← Π(T − meta_lr·g)`` on the raw
  hypergradient (its other details — T reset to I every step, T on the logits, columns
  normalised, a summed loss — are set by :class:`~metacorrect.methods.mlc.MLC`).
"""

from __future__ import annotations

import math

import torch

T_UPDATES = ("tested", "adam", "v1", "released")
DEFAULT_META_LR = {"tested": 0.02, "adam": 0.01, "v1": 0.01, "released": 0.11}


def project_stochastic(T_new: torch.Tensor, T_old: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Π: clamp at 0 and renormalise along ``dim`` (1: rows, 0: columns); a row (column)
    whose mass vanishes keeps its previous value."""
    T_new = T_new.clamp_min(0)
    mass = T_new.sum(dim, keepdim=True)
    ok = mass > 1e-12
    return torch.where(ok, T_new / mass.clamp_min(1e-12), T_old)


class TUpdate:
    """One T-update rule with its state. ``step(T, g)`` returns the new T; ``total`` is the
    number of meta steps the run will make (computed by the method from the data)."""

    def __init__(self, rule: str, lr: float, total: int, dim: int = 1, *, blocks: int = 100,
                 min_block: int = 10, z_crit: float = 3.5, independent: float | None = None):
        if rule not in T_UPDATES:
            raise ValueError(f"mlc option t_update must be one of {T_UPDATES}, got {rule!r}")
        self.rule, self.lr, self.total, self.dim = rule, float(lr), max(int(total), 1), dim
        self.z_crit = float(z_crit)
        if independent is not None and not independent >= 1:
            raise ValueError(f"the tested rule's cap on independent meta steps must be >= 1 or None, got {independent!r}")
        self.independent = None if independent is None else float(independent)
        self.block = max(int(min_block), math.ceil(self.total / max(int(blocks), 1)))
        self.count = 0
        self.moves = 0  # entries moved by the tested rule so far (a diagnostic)
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.n: torch.Tensor | None = None
        self.step_size: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.n_in_block = 0

    # ------------------------------------------------------------------ rules
    def step(self, T: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.rule == "v1":
            return project_stochastic(T - self.lr * g / g.abs().max().clamp_min(1e-12), T, self.dim)
        if self.rule == "released":
            return project_stochastic(T - self.lr * g, T, self.dim)
        if self.rule == "adam":
            return self._adam(T, g)
        return self._tested(T, g)

    def _tested(self, T: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        rms = g.pow(2).mean().sqrt()
        if not torch.isfinite(rms) or rms <= 0:
            return T  # a hypergradient of zeros (or non-finite) says nothing
        x = g / rms
        if self.sum is None:
            self.sum, self.sum_sq, self.n = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
        self.sum += x
        self.sum_sq += x * x
        self.n += 1
        self.n_in_block += 1
        if self.n_in_block < self.block:
            return T
        # a look at the evidence: each entry's mean since it last moved, against its standard error
        self.n_in_block = 0
        n = self.n
        mean = self.sum / n
        var = (self.sum_sq / n - mean * mean).clamp_min(0) * n / (n - 1).clamp_min(1)
        counted = n if self.independent is None else n.clamp_max(self.independent)
        z = mean / (var / counted).sqrt().clamp_min(1e-12)
        moved = z.abs() > self.z_crit
        for acc in (self.sum, self.sum_sq, self.n):
            acc.masked_fill_(moved, 0.0)  # evidence about the old T says nothing about the new one
        # Rprop's step sizes: an entry that moves the same way again takes a longer step,
        # one that turns back a shorter one, so T closes in on where the evidence balances
        direction = torch.sign(mean) * moved
        if self.step_size is None:
            self.step_size, self.last = torch.full_like(T, self.lr), torch.zeros_like(T)
        same = (direction * self.last) > 0
        back = (direction * self.last) < 0
        self.step_size = torch.where(same, self.step_size * 1.5, torch.where(back, self.step_size * 0.5,
                                                                               self.step_size)).clamp(self.lr / 50, 4 * self.lr)
        self.last = torch.where(moved, direction, self.last)
        self.moves += int(moved.sum())
        return project_stochastic(T - self.step_size * direction, T, self.dim)

    def _adam(self, T: torch.Tensor, g: torch.Tensor, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8) -> torch.Tensor:
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros_like(g), torch.zeros_like(g)
        self.sum.mul_(b1).add_(g, alpha=1 - b1)
        self.sum_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        m = self.sum / (1 - b1 ** self.count)
        v = self.sum_sq / (1 - b2 ** self.count)
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(self.count / self.total, 1.0)))
        return project_stochastic(T - lr * m / (v.sqrt() + eps), T, self.dim)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"count": self.count, "moves": self.moves, "n_in_block": self.n_in_block, "block": self.block,
                "sum": None if self.sum is None else self.sum.detach().cpu().clone(),
                "sum_sq": None if self.sum_sq is None else self.sum_sq.detach().cpu().clone(),
                **{k: None if getattr(self, k) is None else getattr(self, k).detach().cpu().clone()
                   for k in ("n", "step_size", "last")}}

    def load_state_dict(self, state: dict, device) -> None:
        self.count = int(state.get("count", 0))
        self.moves = int(state.get("moves", 0))
        self.n_in_block = int(state.get("n_in_block", 0))
        self.block = int(state.get("block", self.block))
        self.sum = None if state.get("sum") is None else state["sum"].to(device)
        self.sum_sq = None if state.get("sum_sq") is None else state["sum_sq"].to(device)
        for k in ("n", "step_size", "last"):
            setattr(self, k, None if state.get(k) is None else state[k].to(device))
