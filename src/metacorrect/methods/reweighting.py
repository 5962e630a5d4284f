"""Meta-learned example re-weighting: L2RW (Ren et al., ICML 2018) and Meta-Weight-Net
(Shu et al., NeurIPS 2019).

Both run one ``'paired'`` phase (each noisy batch with a trusted batch) and get their
hypergradient from the shared engine (:class:`~metacorrect.meta.MetaGradient`): a virtual
SGD step on the weighted noisy loss, the cross-entropy of a trusted batch at the virtual
weights, and its gradient with respect to the weighting's parameters. The actual step
reuses the engine's noisy logits (``result.noisy_logits``), so the noisy batch is forwarded
once per iteration.

Neither method has a transition matrix: ``estimated_T()`` is ``None``.

Virtual learning rate α: the engine takes a plain SGD step of size ``virtual_lr``
(default 0.1) whatever the real optimizer is; the model's own optimizer and learning rate
are not used for it. 0.1 is the reference codes' value (both use the model's SGD learning
rate, 0.1 for their CIFAR runs) and MLC's default here, so the three meta methods share it;
with Adam at 1e-3 a virtual step of that size would be nearly no step at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..distributed import SINGLE
from ..meta import MetaGradient
from . import register_method
from .base import Method, Phase


def l2rw_weights(grad: torch.Tensor) -> torch.Tensor:
    """L2RW's weights from the hypergradient ``∂L_clean/∂ε`` of the per-example weights
    ``ε = 0``: ``w = max(−grad, 0)``, normalised to sum 1 over the batch; a batch whose
    weights are all zero stays all zero (it then contributes no update)."""
    w = (-grad).clamp_min(0)
    total = w.sum()
    return w / total if total > 0 else w


def _weighted_ce(logits: torch.Tensor, targets: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``Σ_i ε_i·CE_i`` (L2RW's noisy loss)."""
    return (eps * F.cross_entropy(logits, targets, reduction="none")).sum()


@register_method
@dataclass
class L2RW(Method):
    """Learning to Re-Weight examples (Ren et al., ICML 2018).

    Per iteration: per-example weights ``ε = 0`` enter the noisy loss ``Σ_i ε_i ℓ_i``; the
    engine returns ``g = ∂L_clean(w − α∇_w Σ ε_i ℓ_i)/∂ε`` at ``ε = 0``; the weights are
    ``w_i = max(−g_i, 0) / Σ_j max(−g_j, 0)`` (all zero if every ``g_i ≥ 0``), and the
    actual optimizer step minimises ``Σ_i w_i ℓ_i``, a weighted mean.

    Options:
        virtual_lr: α of the virtual SGD step (see the module docstring; default 0.1).
        trusted_ce: also add cross-entropy on the trusted batch to the actual step (off,
            as in the paper, where the trusted set only steers the weights).
        meta_mode: ``'auto'``, ``'fast'`` or ``'reference'`` (see :mod:`metacorrect.meta`).
    """

    NAME = "l2rw"

    virtual_lr: float = 0.1
    trusted_ce: bool = False
    meta_mode: str = "auto"

    def __post_init__(self):
        self.name = self.NAME
        if not self.virtual_lr > 0:
            raise ValueError(f"l2rw option virtual_lr must be > 0, got {self.virtual_lr}")
        self.phases = (Phase("l2rw", "paired"),)
        self.last_weights: torch.Tensor | None = None  # the latest batch's weights, for inspection

    def setup(self, ctx):
        self.world = getattr(ctx, "world", SINGLE)
        self.engine = MetaGradient(ctx.model, self.virtual_lr, mode=self.meta_mode, world=self.world)

    def step(self, ctx, noisy, trusted):
        x_n, y_n = noisy
        x_c, y_c = trusted
        eps = torch.zeros(len(y_n), device=y_n.device, requires_grad=True)
        if not self.world.active:
            result = self.engine(_weighted_ce, (eps,), x_n, y_n, x_c, y_c)
            w = l2rw_weights(result.hypergrads[0].detach())
        else:
            # distributed: the noisy loss is a sum over all ranks' examples (share 1 for a rank
            # with examples); each rank's weights are its own examples', normalised over the
            # global batch
            has = 1.0 if len(y_n) else 0.0
            result = self.engine(_weighted_ce, (eps,), x_n, y_n, x_c, y_c, shares=(has, ctx.share("trusted")),
                                 per_example=True)
            w = (-result.hypergrads[0].detach()).clamp_min(0)
            total = self.world.all_reduce([w.sum().reshape(1)])[0]
            w = w / total if float(total) > 0 else w
        self.last_weights = w
        loss = _weighted_ce(result.noisy_logits, y_n, w)
        loss_c = F.cross_entropy(ctx.model(x_c), y_c) if self.trusted_ce else None
        if self.world.active and len(y_n):
            loss = loss / ctx.share("noisy")  # a sum over the global batch already: undo the share weighting
        ctx.optimizer_step(loss, loss_c)
        return ctx.reported(loss, loss_c)


class WeightNet(nn.Module):
    """Meta-Weight-Net's weighting function: an MLP ``1 → hidden → 1`` (ReLU, sigmoid output)
    mapping an example's loss to its weight in (0, 1)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.linear1 = nn.Linear(1, hidden)
        self.linear2 = nn.Linear(hidden, 1)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear2(F.relu(self.linear1(loss))))


@register_method
@dataclass
class MWNet(Method):
    """Meta-Weight-Net (Shu et al., NeurIPS 2019).

    A weight net ``V`` (:class:`WeightNet`, 1→100→1) maps each noisy example's loss
    ``ℓ_i`` (detached, as the released code's ``vnet(cost_v.data)``) to a weight. Per
    iteration:

    1. hypergradient of the trusted batch's loss after a virtual SGD step on the weighted
       noisy loss, with respect to ``V``'s parameters (engine; ``V`` is evaluated
       functionally with :func:`torch.func.functional_call` inside the noisy loss);
    2. one Adam step on ``V`` (lr 1e-3, weight decay 1e-4, the paper's code);
    3. the actual step on the noisy loss weighted by the *updated* ``V`` (weights
       detached).

    Weighted loss (``weight_norm``): ``'mean'`` (default) is ``Σ_i V_i ℓ_i / n``, what the
    released ``MW-Net.py`` does in both the virtual and the actual step; ``'sum'`` is
    ``Σ_i V_i ℓ_i / Σ_i V_i`` (plain ``Σ V_i ℓ_i`` if ``Σ V_i = 0``), the normalisation of
    an earlier version of that code. The same choice is used in both steps.

    Options:
        virtual_lr: α of the virtual SGD step (default 0.1, see the module docstring).
        hidden: width of the weight net's hidden layer (100).
        meta_lr: the weight net's Adam learning rate (1e-3).
        meta_weight_decay: the weight net's Adam weight decay (1e-4).
        weight_norm: ``'mean'`` or ``'sum'`` (see above).
        trusted_ce: also add cross-entropy on the trusted batch to the actual step (off,
            as in the paper).
        meta_mode: ``'auto'``, ``'fast'`` or ``'reference'`` (see :mod:`metacorrect.meta`).
    """

    NAME = "mwnet"

    virtual_lr: float = 0.1
    hidden: int = 100
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    weight_norm: str = "mean"
    trusted_ce: bool = False
    meta_mode: str = "auto"

    def __post_init__(self):
        self.name = self.NAME
        if self.weight_norm not in ("mean", "sum"):
            raise ValueError(f"mwnet option weight_norm must be 'mean' or 'sum', got {self.weight_norm!r}")
        if not self.virtual_lr > 0:
            raise ValueError(f"mwnet option virtual_lr must be > 0, got {self.virtual_lr}")
        if int(self.hidden) < 1:
            raise ValueError(f"mwnet option hidden must be >= 1, got {self.hidden}")
        self.phases = (Phase("mwnet", "paired"),)
        self._updates = 0  # weight-net updates so far (when to check the replicas agree)
        self.vnet: WeightNet | None = None
        self.vnet_optimizer: torch.optim.Optimizer | None = None
        self.last_weights: torch.Tensor | None = None  # the latest batch's weights, for inspection

    def setup(self, ctx):
        dtype = next(ctx.model.parameters()).dtype  # the weight net computes in the model's precision
        self.vnet = WeightNet(int(self.hidden)).to(ctx.device, dtype)
        self.vnet_optimizer = torch.optim.Adam(self.vnet.parameters(), lr=self.meta_lr,
                                               weight_decay=self.meta_weight_decay)
        self._names = [n for n, _ in self.vnet.named_parameters()]
        self.world = getattr(ctx, "world", SINGLE)
        if self.world.active:
            if self.weight_norm == "sum":
                raise ValueError("mwnet option weight_norm='sum' has no distributed form (its normaliser is a sum "
                                 "over the global batch inside the virtual step); use 'mean'")
            self.world.broadcast_module(self.vnet)  # one weight net, identical on every rank
        self.engine = MetaGradient(ctx.model, self.virtual_lr, mode=self.meta_mode, world=self.world)

    def _reduce(self, v: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        if self.weight_norm == "sum":
            total = v.sum()
            return (v * losses).sum() / total if float(total.detach()) != 0 else (v * losses).sum()
        return (v * losses).mean()

    def weighted_loss(self, logits: torch.Tensor, targets: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """The noisy loss with ``V`` given by ``params`` (in ``named_parameters`` order)."""
        losses = F.cross_entropy(logits, targets, reduction="none")
        v = functional_call(self.vnet, dict(zip(self._names, params)), (losses.detach().unsqueeze(1),)).squeeze(1)
        return self._reduce(v, losses)

    def step(self, ctx, noisy, trusted):
        x_n, y_n = noisy
        x_c, y_c = trusted
        params = [p for _, p in self.vnet.named_parameters()]
        distributed = {"shares": (ctx.share("noisy"), ctx.share("trusted"))} if self.world.active else {}
        result = self.engine(self.weighted_loss, params, x_n, y_n, x_c, y_c, **distributed)
        self.vnet_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, result.hypergrads):
            p.grad = g.detach().to(p.dtype)
        self.vnet_optimizer.step()
        self._updates += 1
        if self.world.active and self._updates % 100 == 1:  # one weight net on every replica
            self.world.check_identical(torch.cat([p.detach().reshape(-1) for p in params]), "MW-Net's weight net")

        losses = F.cross_entropy(result.noisy_logits, y_n, reduction="none")
        with torch.no_grad():
            v = self.vnet(losses.detach().unsqueeze(1)).squeeze(1)
        self.last_weights = v
        loss = self._reduce(v, losses)
        loss_c = F.cross_entropy(ctx.model(x_c), y_c) if self.trusted_ce else None
        ctx.optimizer_step(loss, loss_c)
        return ctx.reported(loss, loss_c)

    def state_dict(self) -> dict[str, Any]:
        return {"vnet": {k: v.detach().cpu().clone() for k, v in self.vnet.state_dict().items()},
                "vnet_optimizer": copy.deepcopy(self.vnet_optimizer.state_dict())}

    def load_state_dict(self, state):
        if "vnet" in state:
            self.vnet.load_state_dict(state["vnet"])
        if "vnet_optimizer" in state:
            self.vnet_optimizer.load_state_dict(state["vnet_optimizer"])
