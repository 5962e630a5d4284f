"""The meta-gradient engine, :class:`MetaGradient`: the fast exact path, the head-only
approximation and the double-backward reference path (see :mod:`metacorrect.meta`)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .. import perf
from ..distributed import SINGLE, World
from .layer_rules import _PrimalCache, _RngReplay
from .loss_head import fast_head_hypergradient, loss_delta
from .slots import _ParamSlots, frozen_batchnorm_stats, swapped_parameters

log = logging.getLogger("metacorrect.meta")

NoisyLoss = Callable[..., torch.Tensor]  # (logits, targets, *hyper) -> scalar
CleanLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VirtualUpdate = Callable[[dict, dict], dict]  # (params, grads) -> new params, differentiable


def _output_layer(model: nn.Module) -> nn.Linear:
    """The model's output layer for ``scope='head'``: its last ``nn.Linear`` submodule."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or not any(p.requires_grad for p in linears[-1].parameters()):
        raise ValueError("meta-gradient scope 'head' needs a model whose output layer is a trainable nn.Linear "
                         f"(found {len(linears)} nn.Linear layers in {type(model).__name__})")
    return linears[-1]


@contextlib.contextmanager
def _head_inputs(head: nn.Module):
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out)))
    try:
        yield seen
    finally:
        handle.remove()


def _single_head_input(seen: list, logits: torch.Tensor) -> torch.Tensor:
    if len(seen) != 1 or seen[0][1] is not logits:
        raise ValueError("meta-gradient scope 'head' needs the last nn.Linear to be called once per forward and "
                         f"to produce the model's output (called {len(seen)} times"
                         + ("" if len(seen) != 1 else ", and its output is not the model's output") + ")")
    return seen[0][0]


@dataclass
class MetaResult:
    """What one meta iteration returns.

    ``hypergrads[k] = ∂L_clean(w')/∂hyper[k]``. ``noisy_logits`` are ``f(x_noisy; w)`` with
    their autograd graph to the model's parameters, for the actual step to reuse
    (``loss(noisy_logits, …).backward()``); the forward that made them is the step's one
    BatchNorm running-statistics update. ``virtual_grads`` (fast mode only, else ``None``)
    are ``∇_w L_noisy(w, θ)`` at the θ given, detached, in ``model.named_parameters()``
    order (trainable parameters only; ``None`` for a parameter the loss does not reach) —
    for an actual step that reuses the virtual step's gradient.
    """

    hypergrads: tuple[torch.Tensor, ...]
    clean_loss: torch.Tensor
    noisy_logits: torch.Tensor
    mode: str
    virtual_grads: tuple[torch.Tensor | None, ...] | None = None


def sgd_update(params: dict, grads: dict, lr: float) -> dict:
    return {k: p - lr * grads[k] for k, p in params.items()}


def _forward_mode_error(exc: BaseException) -> bool:
    msg = str(exc)
    low = msg.lower()
    return ("forward ad" in low or "forward-mode" in low or "forward mode" in low or "jvp" in low
            or ("not implemented" in low and "derivative" in low))


def _double_backward_error(exc: BaseException) -> bool:
    low = str(exc).lower()
    return ("once_differentiable" in low or "differentiate twice" in low or "double backward" in low
            or "not implemented" in low or isinstance(exc, NotImplementedError))


class _NotTwiceDifferentiable(RuntimeError):
    pass


def check_twice_differentiable(grads: Sequence[torch.Tensor | None]) -> None:
    """Raise if the graph of gradients made with ``create_graph=True`` contains an operation
    whose backward cannot be differentiated (``@once_differentiable``): autograd would not
    fail there but silently drop that path from the second derivative."""
    seen, stack = set(), [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Error" in type(node).__name__ or node.name() == "torch::autograd::Error":
            raise _NotTwiceDifferentiable("trying to differentiate twice: an operation of the model is "
                                          "@once_differentiable (its backward cannot be differentiated)")
        stack.extend(f for f, _ in node.next_functions)


class MetaGradient:
    """Computes the hypergradient of the clean loss after a virtual SGD step.

    Args:
        model: any ``nn.Module``; it is never mutated by the meta passes (weights are passed
            functionally, by swapping parameter tensors for the duration of a pass).
        virtual_lr: α, the learning rate of the virtual SGD step.
        mode: ``'fast'`` (exact, no second forward of the noisy batch, see the module
            docstring), ``'reference'`` (double backward through the virtual step, exact)
            or ``'auto'`` (fast, falling back with the reason logged once when it cannot
            apply).
        clean_loss: loss on the trusted batch at the virtual weights (default cross-entropy).
        virtual_update: optional differentiable ``(params, grads) -> params`` replacing plain
            SGD in the virtual step; forces the reference path.
        jvp: how the fast mode gets ``u = J·g_clean``: ``'forward'`` (forward-mode AD),
            ``'reverse'`` (a backward through the virtual step's backward) or ``'auto'``.
        reuse_primals: in the forward route, use the layer rules of :class:`_PrimalCache`
            (default); ``False`` runs plain forward-mode AD (for comparison and tests).
        scope: ``'all'`` (default: the virtual step moves every trainable parameter,
            exact) or ``'head'`` (only the last ``nn.Linear`` moves: the documented
            approximation of the module docstring).
        world: the training processes (:mod:`metacorrect.distributed`). Called with
            ``shares=(n_r/n, m_r/m)`` — this rank's shares of the global noisy and trusted
            batches — the engine is exact over the ranks: the virtual step's gradient, the
            clean loss's gradient at the virtual weights and the hypergradient are each
            summed over the ranks with those weights (three all-reduces, of two
            parameter-sized vectors and one the size of the hyperparameters), so every rank
            gets the hypergradient one process would compute on the union of the batches.
            ``per_example=True`` is for hyperparameters that belong to this rank's examples
            (L2RW's per-example weights): their hypergradient stays on the rank, and the
            noisy loss is a sum over examples (pass its share as 1, or 0 for an empty slice).
    """

    MODES = ("auto", "fast", "reference")
    JVP_ROUTES = ("auto", "forward", "reverse")
    SCOPES = ("all", "head")

    def __init__(self, model: nn.Module, virtual_lr: float, mode: str = "auto",
                 clean_loss: CleanLoss = F.cross_entropy, virtual_update: VirtualUpdate | None = None,
                 jvp: str = "auto", reuse_primals: bool = True, scope: str = "all", world: World = SINGLE):
        if scope not in self.SCOPES:
            raise ValueError(f"meta-gradient scope must be one of {self.SCOPES}, got {scope!r}")
        if mode not in self.MODES:
            raise ValueError(f"meta-gradient mode must be one of {self.MODES}, got {mode!r}")
        if jvp not in self.JVP_ROUTES:
            raise ValueError(f"meta-gradient jvp route must be one of {self.JVP_ROUTES}, got {jvp!r}")
        if not virtual_lr > 0:
            raise ValueError(f"virtual learning rate must be > 0, got {virtual_lr}")
        self.model = model
        self.world = world
        self.virtual_lr = float(virtual_lr)
        self.clean_loss = clean_loss
        self.virtual_update = virtual_update
        self.mode = mode
        self.jvp = self._auto_route(model) if jvp == "auto" else jvp
        self.fallback_reason: str | None = None
        self._slots: _ParamSlots | None = None
        self._verified = False  # a fast call has succeeded on this model
        self._verified_reference = False
        self._cache: _PrimalCache | None = None
        self.reuse_primals = bool(reuse_primals)
        self.scope = scope
        self.head = _output_layer(model) if scope == "head" else None
        if virtual_update is not None and mode != "reference":
            self._fall_back("a custom virtual update (not plain SGD) needs the double-backward reference path",
                            strict=mode == "fast")
        if next((p for p in model.parameters()), torch.empty(0)).device.type == "cpu":
            perf.tune_allocator()

    @staticmethod
    def _auto_route(model: nn.Module) -> str:
        # convolutions and BatchNorm: forward is faster (measured); embedding lookups have no
        # double backward in torch, and their forward-mode rule is supplied here
        forward = any(isinstance(m, (_ConvNd, _BatchNorm, nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
        return "forward" if forward else "reverse"

    def _fall_back(self, reason: str, strict: bool = False, to: str = "reference"):
        if strict:
            raise RuntimeError(f"the fast meta-gradient cannot be used: {reason}")
        target = "the reference (double-backward) meta-gradient" if to == "reference" else \
            f"the {to!r} JVP route of the fast meta-gradient"
        log.warning("metacorrect: using %s: %s", target, reason)  # once: the switch is permanent
        self.fallback_reason = reason
        if to == "reference":
            self.mode = "reference"
        else:
            self.jvp = to

    def _params(self) -> dict[str, torch.Tensor]:
        """The parameters the virtual step moves (all trainable ones, or the head's)."""
        if self.head is not None:
            mine = {id(p) for p in self.head.parameters()}
            return {n: p for n, p in self.model.named_parameters() if p.requires_grad and id(p) in mine}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _primal_cache(self) -> "_PrimalCache":
        if self._cache is None or self._cache.stale(self.model):
            self._cache = _PrimalCache(self.model, enabled=self.reuse_primals)
        return self._cache

    def _param_slots(self, names, plist) -> _ParamSlots:
        if self._slots is None or self._slots.key != tuple(id(p) for p in plist) or self._slots.names != names:
            self._slots = _ParamSlots(self.model, names, plist)
        return self._slots

    def __call__(self, noisy_loss: NoisyLoss, hyper: Sequence[torch.Tensor], x_noisy, y_noisy,
                 x_clean, y_clean, *, shares: tuple[float, float] | None = None,
                 per_example: bool = False) -> MetaResult:
        hyper = tuple(hyper)
        if shares is not None and self.head is not None:
            raise ValueError("the head-only meta-gradient (scope='head') has no distributed form")
        if self.mode == "reference":
            return self.reference(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares,
                                  per_example=per_example)
        if self.head is not None:
            return self.fast_head(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean)
        if self._verified:
            return self.fast(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares,
                             per_example=per_example)
        # Until one fast call has succeeded, a failure (an operation without forward-mode or
        # double-backward support) must leave no trace: keep the buffers (BatchNorm running
        # statistics) and the RNG state to restore before the next route is tried.
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        rng = _RngReplay(x_noisy.device)
        tried: list[str] = []
        while True:
            try:
                result = self.fast(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares,
                                   per_example=per_example)
                self._verified = True
                return result
            except (NotImplementedError, RuntimeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if self.jvp == "forward" and _forward_mode_error(exc):
                    reason = f"an operation of the model has no forward-mode AD support ({first})"
                elif self.jvp == "reverse" and _double_backward_error(exc):
                    reason = f"an operation of the model has no double-backward support ({first})"
                else:
                    raise
                tried.append(self.jvp)
                with torch.no_grad():
                    for b, saved in buffers:
                        b.copy_(saved)
                rng.restore()
                other = "reverse" if self.jvp == "forward" else "forward"
                if other in tried:
                    self._fall_back(reason, strict=self.mode == "fast")
                    return self.reference(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares,
                                          per_example=per_example)
                self._fall_back(reason, to=other)

    # ------------------------------------------------------------------ fast, exact
    def _over_ranks(self, tensors, share: float | None, empty: bool = False):
        """``Σ_r share_r · t_r`` over the ranks (unchanged in one process); a rank whose slice
        is empty (``share == 0``) contributes zeros, whatever its tensors hold (a mean over no
        example is NaN)."""
        if share is None:
            return list(tensors)
        local = [None if t is None else (torch.zeros_like(t) if share == 0 else t) for t in tensors]
        return self.world.reduce_scaled(local, share)

    def fast(self, noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, *, jvp: str | None = None,
             shares: tuple[float, float] | None = None, per_example: bool = False) -> MetaResult:
        model, alpha = self.model, self.virtual_lr
        route = jvp or self.jvp
        params = self._params()
        names = list(params)
        plist = [params[n] for n in names]
        slots = self._param_slots(names, plist)
        fixed = tuple(h.detach() for h in hyper)
        rng = _RngReplay(x_noisy.device) if route == "forward" else None
        cache = self._primal_cache() if route == "forward" else None
        with cache.record() if cache is not None else contextlib.nullcontext():
            logits = model(x_noisy)  # the step's one real forward (updates BatchNorm running stats)
        if cache is not None:
            cache.prune()  # while the graph holds what it needs
        z = logits.detach()
        if route == "reverse":
            delta = loss_delta(noisy_loss, z, y_noisy, fixed).requires_grad_()
            grads = torch.autograd.grad(logits, plist, delta, retain_graph=True, create_graph=True,
                                        allow_unused=True)
            if not self._verified:
                check_twice_differentiable(grads)
        else:
            grads = torch.autograd.grad(noisy_loss(logits, y_noisy, *fixed), plist, retain_graph=True,
                                        allow_unused=True)
        detached = [None if g is None else g.detach() for g in grads]
        n_share, c_share = shares if shares is not None else (None, None)
        detached = self._over_ranks(detached, n_share)
        virtual = [(p.detach() if g is None else torch.sub(p.detach(), g, alpha=alpha)).requires_grad_()
                   for p, g in zip(plist, detached)]
        with frozen_batchnorm_stats(model):
            with swapped_parameters(slots, virtual):
                clean = self.clean_loss(model(x_clean), y_clean)
            g_clean = torch.autograd.grad(clean, virtual, allow_unused=True)
            g_clean = [torch.zeros_like(v) if g is None else g for v, g in zip(virtual, g_clean)]
            g_clean = self._over_ranks(g_clean, c_share)
            if route == "reverse":
                pairs = [(g, gc) for g, gc in zip(grads, g_clean) if g is not None and g.requires_grad]
                u = None
                if pairs:
                    (u,) = torch.autograd.grad([g for g, _ in pairs], delta, [gc for _, gc in pairs],
                                               allow_unused=True)
                del grads, pairs
            else:
                with torch.no_grad(), fwAD.dual_level(), rng.replay():
                    duals = [fwAD.make_dual(p.detach(), t) for p, t in zip(plist, g_clean)]
                    with swapped_parameters(slots, duals), cache.tangents_only():
                        u = fwAD.unpack_dual(model(x_noisy)).tangent
        if u is None:  # the output does not depend on the parameters along g_clean
            u = torch.zeros_like(z)
        hypergrads = fast_head_hypergradient(noisy_loss, z, y_noisy, hyper, u.detach(), alpha)
        if not per_example:
            hypergrads = tuple(self._over_ranks(hypergrads, n_share))
        return MetaResult(hypergrads, clean.detach(), logits, "fast", tuple(detached))

    # ------------------------------------------------------------------ head only, closed form
    def fast_head(self, noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean) -> MetaResult:
        """``scope='head'``: the hypergradient when the virtual step moves the output layer
        only (see the module docstring), every part in closed form over the head."""
        model, head, alpha = self.model, self.head, self.virtual_lr
        fixed = tuple(h.detach() for h in hyper)
        with _head_inputs(head) as seen:
            logits = model(x_noisy)  # the step's one real forward (updates BatchNorm running stats)
        h_noisy = _single_head_input(seen, logits)
        with torch.no_grad(), frozen_batchnorm_stats(model), _head_inputs(head) as seen_clean:
            clean_out = model(x_clean)
        h_clean = _single_head_input(seen_clean, clean_out)
        z = logits.detach()
        delta = loss_delta(noisy_loss, z, y_noisy, fixed)
        weight, bias = head.weight, head.bias
        g_w = delta.t() @ h_noisy  # ∇_W L_noisy for z = h·Wᵀ + b
        w_virtual = (weight.detach() - alpha * g_w).requires_grad_()
        b_virtual = None if bias is None else (bias.detach() - alpha * delta.sum(0)).requires_grad_()
        with torch.enable_grad():
            clean = self.clean_loss(F.linear(h_clean, w_virtual, b_virtual), y_clean)
            grads = torch.autograd.grad(clean, [v for v in (w_virtual, b_virtual) if v is not None])
        u = F.linear(h_noisy, grads[0], grads[1] if bias is not None else None)
        hypergrads = fast_head_hypergradient(noisy_loss, z, y_noisy, hyper, u, alpha)
        # no virtual_grads: the body's gradient was never computed, so an actual step cannot reuse it
        return MetaResult(hypergrads, clean.detach(), logits, "head")

    # ------------------------------------------------------------------ reference, exact
    def reference(self, noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, *,
                  shares: tuple[float, float] | None = None, per_example: bool = False) -> MetaResult:
        model = self.model
        params = self._params()
        names = list(params)
        leaves = tuple(h.detach().requires_grad_() for h in hyper)
        with frozen_batchnorm_stats(model):
            logits = model(x_noisy)
            grads = torch.autograd.grad(noisy_loss(logits, y_noisy, *leaves), [params[n] for n in names],
                                        create_graph=True, allow_unused=True)
            if not self._verified_reference:
                check_twice_differentiable(grads)
                self._verified_reference = True
            grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}
            if shares is not None:
                # the virtual step's gradient summed over the ranks *through autograd*: the
                # backward sums the ranks' cotangents, so each rank's hypergradient is its share
                # of the whole one; an empty slice adds zeros (and no graph to T)
                local = [grads[n] if shares[0] > 0 else torch.zeros_like(params[n]) for n in names]
                grads = dict(zip(names, self.world.differentiable_sum(local, shares[0])))
            if self.virtual_update is None:
                virtual = sgd_update(params, grads, self.virtual_lr)
            else:
                virtual = self.virtual_update(params, grads)
            slots = self._param_slots(names, [params[n] for n in names])
            with swapped_parameters(slots, [virtual[n] for n in names]):
                clean = self.clean_loss(model(x_clean), y_clean)
            if shares is not None:
                # every rank must run the backward through the all-reduce: the term in the
                # virtual weights keeps the graph connected when this rank's clean slice is empty
                connect = sum((virtual[n] * 0).sum() for n in names)
                clean = (clean * shares[1] if shares[1] > 0 else 0.0) + connect
        hypergrads = torch.autograd.grad(clean, leaves, allow_unused=True)
        hypergrads = tuple(torch.zeros_like(h) if g is None else g for h, g in zip(leaves, hypergrads))
        if shares is not None and not per_example:
            hypergrads = tuple(self.world.all_reduce([h.clone() for h in hypergrads]))
        # the actual step's forward, with the running-statistics update a plain step makes
        return MetaResult(hypergrads, clean.detach(), model(x_noisy), "reference")
