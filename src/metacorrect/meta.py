"""The meta-gradient engine shared by MLC, L2RW and Meta-Weight-Net.

All three methods have a hyper-parameter ``θ`` (MLC: the transition matrix ``T``; L2RW: a
weight per noisy example; MW-Net: the weight network's parameters) that enters training
only through the noisy loss ``L_noisy(f(x; w), ỹ; θ)``. One meta iteration:

1. **virtual step**  ``w' = w − α·∇_w L_noisy(w, θ)``  (plain SGD, virtual learning rate α);
2. **clean loss**    ``L_clean(w') = CE(f(x_c; w'), y_c)`` on a trusted batch;
3. **hypergradient** ``∇_θ L_clean(w')``.

Two exact ways to get (3):

* ``reference`` — the usual way: differentiate the virtual step with ``create_graph=True``
  and backpropagate ``L_clean(w')`` through it to θ (a double backward through the net).
* ``fast`` — because θ enters only through the loss head, with ``z = f(x; w)`` and
  ``δ(θ) = ∂L_noisy/∂z``, we have ``∇_w L_noisy = Jᵀδ(θ)`` and so
  ``∇_θ L_clean(w') = −α·∂/∂θ ⟨g_c, Jᵀδ(θ)⟩ = −α·∂/∂θ ⟨J g_c, δ(θ)⟩`` with
  ``g_c = ∇L_clean(w')``. ``u = J g_c`` is one forward-mode JVP of the network along
  ``g_c``; the rest is a tiny graph over the N×C logits. No double backward through the
  network, and the noisy forward ``z`` (with its graph) is reused by the actual step.
  A parametrised θ (e.g. ``T = softmax(Θ)``) is handled by the same tiny graph, since
  the loss head is differentiated with respect to θ by autograd.

BatchNorm policy: every meta pass uses batch statistics and leaves the running statistics
untouched (:func:`frozen_batchnorm_stats`); in ``fast`` mode the one real forward of the
noisy batch updates them, exactly as a plain training step would. Dropout and other
random layers are made consistent by replaying the RNG state of the noisy forward in the
JVP forward.

Fallbacks (logged once): a custom differentiable ``virtual_update`` (anything other than
plain SGD) and model operations without forward-mode AD support use ``reference``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

NoisyLoss = Callable[..., torch.Tensor]  # (logits, targets, *hyper) -> scalar
CleanLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VirtualUpdate = Callable[[dict, dict], dict]  # (params, grads) -> new params, differentiable


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Inside, BatchNorm layers in training mode normalise with batch statistics but do not
    update their running statistics (nor ``num_batches_tracked``)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class _RngReplay:
    """Record the RNG state before a forward pass so that another pass can reuse the same
    random draws (dropout masks) and then restore the stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        cpu_now = torch.get_rng_state()
        cuda_now = torch.cuda.get_rng_state(self.device) if self.cuda else None
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        try:
            yield
        finally:
            torch.set_rng_state(cpu_now)
            if self.cuda:
                torch.cuda.set_rng_state(cuda_now, self.device)


@dataclass
class MetaResult:
    """What one meta iteration returns.

    ``hypergrads[k] = ∂L_clean(w')/∂hyper[k]``. ``noisy_logits`` are ``f(x_noisy; w)`` with
    their autograd graph to the model's parameters, for the actual step to reuse
    (``loss(noisy_logits, …).backward()``); the forward that made them is the step's one
    BatchNorm running-statistics update.
    """

    hypergrads: tuple[torch.Tensor, ...]
    clean_loss: torch.Tensor
    noisy_logits: torch.Tensor
    mode: str


def sgd_update(params: dict, grads: dict, lr: float) -> dict:
    return {k: p - lr * grads[k] for k, p in params.items()}


class MetaGradient:
    """Computes the hypergradient of the clean loss after a virtual SGD step.

    Args:
        model: any ``nn.Module``; it is never mutated by the meta passes (weights are passed
            functionally through :func:`torch.func.functional_call`).
        virtual_lr: α, the learning rate of the virtual SGD step.
        mode: ``'fast'`` (forward-mode JVP, exact), ``'reference'`` (double backward,
            exact) or ``'auto'`` (fast, falling back to reference with the reason logged
            once when fast cannot apply).
        clean_loss: loss on the trusted batch at the virtual weights (default cross-entropy).
        virtual_update: optional differentiable ``(params, grads) -> params`` replacing plain
            SGD in the virtual step; forces the reference path.
    """

    MODES = ("auto", "fast", "reference")

    def __init__(self, model: nn.Module, virtual_lr: float, mode: str = "auto",
                 clean_loss: CleanLoss = F.cross_entropy, virtual_update: VirtualUpdate | None = None):
        if mode not in self.MODES:
            raise ValueError(f"meta-gradient mode must be one of {self.MODES}, got {mode!r}")
        if not virtual_lr > 0:
            raise ValueError(f"virtual learning rate must be > 0, got {virtual_lr}")
        self.model = model
        self.virtual_lr = float(virtual_lr)
        self.clean_loss = clean_loss
        self.virtual_update = virtual_update
        self.mode = mode
        self.fallback_reason: str | None = None
        if virtual_update is not None and mode != "reference":
            self._fall_back("a custom virtual update (not plain SGD) needs the double-backward reference path",
                            strict=mode == "fast")

    def _fall_back(self, reason: str, strict: bool = False):
        if strict:
            raise RuntimeError(f"the fast meta-gradient cannot be used: {reason}")
        if self.fallback_reason is None:
            log.warning("metacorrect: using the reference (double-backward) meta-gradient: %s", reason)
        self.fallback_reason = reason
        self.mode = "reference"

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def __call__(self, noisy_loss: NoisyLoss, hyper: Sequence[torch.Tensor], x_noisy, y_noisy,
                 x_clean, y_clean) -> MetaResult:
        hyper = tuple(hyper)
        if self.mode == "reference":
            return self.reference(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean)
        try:
            return self.fast(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean)
        except (NotImplementedError, RuntimeError) as exc:
            msg = str(exc)
            if self.mode == "fast" or "forward AD" not in msg and "forward-mode" not in msg \
                    and "jvp" not in msg.lower() and "not implemented" not in msg.lower():
                raise
            self._fall_back(f"an operation of the model has no forward-mode AD support ({msg.splitlines()[0]})")
            return self.reference(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean)

    # ------------------------------------------------------------------ fast, exact
    def fast(self, noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean) -> MetaResult:
        model, alpha = self.model, self.virtual_lr
        params = self._params()
        names = list(params)
        rng = _RngReplay(x_noisy.device)
        logits = model(x_noisy)  # the step's one real forward (updates BatchNorm running stats)
        fixed = tuple(h.detach() for h in hyper)
        grads = torch.autograd.grad(noisy_loss(logits, y_noisy, *fixed), [params[n] for n in names],
                                    retain_graph=True)
        virtual = {n: (params[n].detach() - alpha * g).requires_grad_() for n, g in zip(names, grads)}
        with frozen_batchnorm_stats(model):
            clean = self.clean_loss(functional_call(model, virtual, (x_clean,)), y_clean)
            g_clean = torch.autograd.grad(clean, [virtual[n] for n in names])
            with fwAD.dual_level(), rng.replay():
                duals = {n: fwAD.make_dual(params[n].detach(), t) for n, t in zip(names, g_clean)}
                u = fwAD.unpack_dual(functional_call(model, duals, (x_noisy,))).tangent
        if u is None:  # the output does not depend on the parameters along g_clean
            u = torch.zeros_like(logits)
        hypergrads = head_hypergradient(noisy_loss, logits.detach(), y_noisy, hyper, u.detach(), alpha)
        return MetaResult(hypergrads, clean.detach(), logits, "fast")

    # ------------------------------------------------------------------ reference, exact
    def reference(self, noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean) -> MetaResult:
        model = self.model
        params = self._params()
        names = list(params)
        leaves = tuple(h.detach().requires_grad_() for h in hyper)
        with frozen_batchnorm_stats(model):
            logits = model(x_noisy)
            grads = torch.autograd.grad(noisy_loss(logits, y_noisy, *leaves), [params[n] for n in names],
                                        create_graph=True)
            grads = dict(zip(names, grads))
            if self.virtual_update is None:
                virtual = sgd_update(params, grads, self.virtual_lr)
            else:
                virtual = self.virtual_update(params, grads)
            clean = self.clean_loss(functional_call(model, virtual, (x_clean,)), y_clean)
        hypergrads = torch.autograd.grad(clean, leaves, allow_unused=True)
        hypergrads = tuple(torch.zeros_like(h) if g is None else g for h, g in zip(leaves, hypergrads))
        # the actual step's forward, with the running-statistics update a plain step makes
        return MetaResult(hypergrads, clean.detach(), model(x_noisy), "reference")


def head_hypergradient(noisy_loss: NoisyLoss, logits: torch.Tensor, targets: torch.Tensor,
                       hyper: Sequence[torch.Tensor], u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """``−α·∂/∂θ ⟨u, ∂L_noisy(z, θ)/∂z⟩`` at ``z = logits``: the hypergradient given the JVP
    ``u = J·g_clean``. A tiny graph over the N×C logits only."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        leaves = tuple(h.detach().requires_grad_() for h in hyper)
        (delta,) = torch.autograd.grad(noisy_loss(z, targets, *leaves), z, create_graph=True)
        grads = torch.autograd.grad((u * delta).sum(), leaves, allow_unused=True)
    return tuple(torch.zeros_like(h) if g is None else -alpha * g for h, g in zip(leaves, grads))
