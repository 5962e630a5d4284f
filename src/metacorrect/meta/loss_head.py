"""The loss head of the fast path: ``δ = ∂L_noisy/∂z`` and the hypergradient
``−α·∂/∂θ ⟨u, δ(θ)⟩`` over the N×C logits, in closed form for the two corrected losses of
:mod:`metacorrect.methods.losses` and by a small autograd graph otherwise."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NoisyLoss = Callable[..., torch.Tensor]  # (logits, targets, *hyper) -> scalar


def loss_delta(noisy_loss: NoisyLoss, logits: torch.Tensor, targets: torch.Tensor,
               hyper: Sequence[torch.Tensor]) -> torch.Tensor:
    """``δ = ∂L_noisy(z, θ)/∂z`` at ``z = logits`` (N×C), in closed form for the corrected
    losses of :mod:`metacorrect.methods.losses`, by autograd otherwise."""
    closed = _closed_form(noisy_loss, hyper)
    if closed is not None:
        return closed[0](logits.detach(), targets, hyper[0].detach())
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        (delta,) = torch.autograd.grad(noisy_loss(z, targets, *(h.detach() for h in hyper)), z)
    return delta


def head_hypergradient(noisy_loss: NoisyLoss, logits: torch.Tensor, targets: torch.Tensor,
                       hyper: Sequence[torch.Tensor], u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """``−α·∂/∂θ ⟨u, ∂L_noisy(z, θ)/∂z⟩`` at ``z = logits``: the hypergradient given the JVP
    ``u = J·g_clean``. A tiny graph over the N×C logits only (generic: any loss, any θ)."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        leaves = tuple(h.detach().requires_grad_() for h in hyper)
        (delta,) = torch.autograd.grad(noisy_loss(z, targets, *leaves), z, create_graph=True)
        grads = torch.autograd.grad((u * delta).sum(), leaves, allow_unused=True)
    return tuple(torch.zeros_like(h) if g is None else -alpha * g for h, g in zip(leaves, grads))


def fast_head_hypergradient(noisy_loss: NoisyLoss, logits: torch.Tensor, targets: torch.Tensor,
                            hyper: Sequence[torch.Tensor], u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """:func:`head_hypergradient`, in closed form when the loss is one of the corrected losses
    of :mod:`metacorrect.methods.losses` with a raw C×C matrix, generically otherwise."""
    closed = _closed_form(noisy_loss, hyper)
    if closed is None:
        return head_hypergradient(noisy_loss, logits, targets, hyper, u, alpha)
    with torch.no_grad():
        g = closed[1](logits.detach(), targets, hyper[0].detach(), u)
        return (g.mul_(-alpha).to(hyper[0].dtype),)


def _closed_form(noisy_loss, hyper):
    if len(hyper) != 1 or hyper[0].ndim != 2 or hyper[0].shape[0] != hyper[0].shape[1]:
        return None
    from ..methods.losses import forward_corrected_loss, logit_corrected_loss
    if noisy_loss is forward_corrected_loss:
        return _probs_delta, _probs_head
    if noisy_loss is logit_corrected_loss:
        return _logits_delta, _logits_head
    return None


def _probs_parts(z, y, T):
    from ..methods.losses import _TINY
    p = torch.softmax(z, 1)
    a = T.to(z.dtype).t()[y]  # a[i, j] = T[j, ỹ_i]
    q = (p * a).sum(1)
    keep = (q >= _TINY).to(z.dtype) / len(y)  # the loss clamps q at _TINY: no gradient below
    return p, a, q.clamp_min(_TINY), keep


def _probs_delta(z, y, T):
    """``∂/∂z`` of ``mean_i −log((softmax(z_i)·T)[ỹ_i])``: ``(p − p⊙a/q)/N``."""
    p, a, q, keep = _probs_parts(z, y, T)
    return (p - p * a / q[:, None]) * keep[:, None]


def _probs_head(z, y, T, u):
    """``∂/∂T ⟨u, δ(T)⟩``: entry ``[k, c] = Σ_{i: ỹ_i=c} p_ik (r_i/q_i² − u_ik/q_i) / N`` with
    ``r_i = Σ_j u_ij p_ij a_ij``."""
    p, a, q, keep = _probs_parts(z, y, T)
    pu = p * u
    r = (pu * a).sum(1)
    m = (p * (r / q.square())[:, None] - pu / q[:, None]) * keep[:, None]
    return torch.zeros_like(T, dtype=z.dtype).index_add_(1, y, m.t())


def _logits_delta(z, y, T):
    """``∂/∂z`` of ``mean_i CE(z_i·T, ỹ_i)``: ``(softmax(zT) − Y)·Tᵀ/N``."""
    T = T.to(z.dtype)
    s = torch.softmax(z @ T, 1)
    s[torch.arange(len(y), device=y.device), y] -= 1
    return (s @ T.t()) / len(y)


def _logits_head(z, y, T, u):
    """``∂/∂T ⟨u, δ(T)⟩ = (Uᵀ(S − Y) + Zᵀ(S⊙(W − ⟨S, W⟩)))/N`` with ``S = softmax(zT)``,
    ``W = uT``."""
    T = T.to(z.dtype)
    s = torch.softmax(z @ T, 1)
    w = u @ T
    sw = s * w
    m = sw - s * sw.sum(1, keepdim=True)
    s[torch.arange(len(y), device=y.device), y] -= 1
    return (u.t() @ s + z.t() @ m) / len(y)
