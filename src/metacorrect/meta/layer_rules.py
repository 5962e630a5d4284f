"""The forward route's layer rules (see :mod:`metacorrect.meta`): primal outputs reused
from the step's real forward for linear layers, the closed-form BatchNorm tangent with the
real forward's saved statistics, embedding lookups as linear maps of their table, and the
RNG replay that keeps dropout consistent between the real forward and the JVP forward."""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F


_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _PrimalCache:
    """The forward route's JVP recomputes every primal activation alongside its tangent. For
    the layers that cost the most — ``nn.Linear`` and ``nn.ConvNd`` (exactly these types, not
    subclasses, whose ``forward`` may differ) — the primal output is the one the step's real
    forward of the same batch at the same weights already computed: :meth:`record` keeps
    those outputs (forward hooks), and inside :meth:`tangents_only` each such layer returns
    that output as the primal and computes only its tangent, ``layer(x_t; W) + layer(x; W_t, b_t)``
    (one product instead of two where the input carries no tangent, as for the first layer).
    Other operations (BatchNorm, activations, pooling, …) go through forward-mode AD as usual.
    """

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.modules = [m for m in model.modules() if type(m) in _LINEAR_TYPES and "forward" not in vars(m)
                        and getattr(m, "max_norm", None) is None and getattr(m, "mode", "sum") != "max"] \
            if enabled else []
        self.norms = [m for m in model.modules() if type(m) in _BN_TYPES and "forward" not in vars(m)] \
            if enabled else []
        self.key = tuple(id(m) for m in model.modules())
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.stats: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def stale(self, model: nn.Module) -> bool:
        return self.key != tuple(id(m) for m in model.modules())

    @contextlib.contextmanager
    def record(self):
        self.outputs = {id(m): [] for m in self.modules}
        self.stats = {id(m): [] for m in self.norms}

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.outputs[id(module)].append(output.detach())

        def norm_hook(module, args, output):
            self.stats[id(module)].append(_batch_stats(module, output))

        handles = [m.register_forward_hook(hook) for m in self.modules] \
            + [m.register_forward_hook(norm_hook) for m in self.norms]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def prune(self) -> None:
        """Forget the outputs that nothing else keeps alive (the autograd graph saves a layer's
        output when the next operation needs it, e.g. BatchNorm; after a ReLU it does not):
        keeping those would add their memory to the meta step's peak, so the JVP recomputes
        them instead. Keeps everything if the storage reference count cannot be read."""
        base = _alias_only_refs()
        if base is None:
            return
        for outs in self.outputs.values():
            for i, t in enumerate(outs):
                if t is not None and _storage_refs(t) <= base:
                    outs[i] = None

    @contextlib.contextmanager
    def tangents_only(self):
        for m in self.modules:
            m.forward = _TangentForward(m, self.outputs.get(id(m), []))
        for m in self.norms:
            m.forward = _BatchNormJvp(m, self.stats.get(id(m), []))
        try:
            yield
        finally:
            for m in self.modules + self.norms:
                vars(m).pop("forward", None)
            self.outputs, self.stats = {}, {}


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ALIAS_ONLY: list = []


def _alias_only_refs() -> int | None:
    """The storage reference count of a detached alias whose original tensor is gone (what
    :meth:`_PrimalCache.prune` compares with); ``None`` where torch does not expose it."""
    if not _ALIAS_ONLY:
        try:
            a = torch.empty(4)
            d = a.detach()
            del a
            _ALIAS_ONLY.append(_storage_refs(d))
        except (AttributeError, RuntimeError, TypeError):
            _ALIAS_ONLY.append(None)
    return _ALIAS_ONLY[0]


class _TangentForward:
    """A linear layer's forward inside the JVP pass, with its primal output taken from the
    real forward (see :class:`_PrimalCache`)."""

    def __init__(self, module: nn.Module, outputs: list):
        self.module, self.outputs = module, outputs

    def __call__(self, x, *rest, **kw):
        m = self.module
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return self._embedding(x, *rest, **kw)
        if rest or kw or not self.outputs:  # not a call the cache knows: compute it all
            return type(m).forward(m, x, *rest, **kw)
        out = self.outputs.pop(0)
        x_p, x_t = fwAD.unpack_dual(x)
        w_p, w_t = fwAD.unpack_dual(m.weight)
        b_p, b_t = fwAD.unpack_dual(m.bias) if m.bias is not None else (None, None)
        layer = F.linear if isinstance(m, nn.Linear) else m._conv_forward
        if out is None:  # not kept (see _PrimalCache.prune): the primal, computed on its own
            out = layer(x_p, w_p, b_p)
        elif out.shape[0] != x_p.shape[0]:
            return type(m).forward(m, x)
        tangent = None
        if w_t is not None or b_t is not None:
            w_zero = w_t if w_t is not None else torch.zeros_like(w_p)
            tangent = layer(x_p, w_zero, b_t)
        if x_t is not None:
            t_in = layer(x_t, w_p, None)
            tangent = t_in if tangent is None else tangent.add_(t_in)
        return out if tangent is None else fwAD.make_dual(out, tangent)

    def _embedding(self, ids, *rest, **kw):
        """Embedding lookups are linear in the table: the tangent is the same lookup in the
        table's tangent (torch has no forward-mode rule for ``embedding_bag``)."""
        m = self.module
        out = self.outputs.pop(0) if self.outputs else None
        w_p, w_t = fwAD.unpack_dual(m.weight)
        if isinstance(m, nn.Embedding):
            def look(w):
                return F.embedding(ids, w, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        else:
            args = dict(zip(("offsets", "per_sample_weights"), rest), **kw)
            psw = args.get("per_sample_weights")
            if psw is not None and fwAD.unpack_dual(psw).tangent is not None:
                return type(m).forward(m, ids, *rest, **kw)  # weights that carry a tangent: generic rule

            def look(w):
                return F.embedding_bag(ids, w, args.get("offsets"), None, m.norm_type, m.scale_grad_by_freq, m.mode,
                                       m.sparse, psw, m.include_last_offset, m.padding_idx)
        if out is None:
            out = look(w_p)
        return out if w_t is None else fwAD.make_dual(out, look(w_t))


_BATCH_NORM_NODES = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0")


def _batch_stats(module: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch mean and inverse standard deviation a BatchNorm layer in training mode just
    used, as its backward node saved them (``None`` where that node is of another kind or
    the layer normalised with running statistics). Torch's native kernel and cuDNN both save
    the batch mean and the inverse standard deviation as results 1 and 2."""
    node = getattr(output, "grad_fn", None)
    if not module.training or node is None or type(node).__name__ not in _BATCH_NORM_NODES:
        return None
    mean, invstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(invstd, torch.Tensor) or mean.numel() == 0:
        return None
    return mean.detach(), invstd.detach()


class _BatchNormJvp:
    """A BatchNorm layer's forward inside the JVP pass (batch statistics). With ``a = w·σ⁻¹``
    per channel, ``x̂ = (x − μ)·σ⁻¹`` and means over the ``n`` values of a channel:

        ẏ = a·(ẋ − mean(ẋ) − x̂·mean(ẋ·x̂)) + x̂·ẇ + ḃ  =  a·ẋ + x·c₁ + c₀,
        c₁ = σ⁻¹·(ẇ − a·mean(ẋ·x̂)),   c₀ = ḃ − a·mean(ẋ) − μ·c₁

    (``c₀``, ``c₁`` per channel). The two sums come from one reduction pass of the fused
    ``native_batch_norm_backward`` kernel (they are its weight and bias gradients for an
    incoming gradient ``ẋ``), and the tangent is two elementwise passes. The batch
    statistics come from the step's real forward of the same batch (:func:`_batch_stats`,
    recorded by :class:`_PrimalCache`), so the primal output is one ``addcmul`` instead of a
    second normalisation; where they were not recorded, one ``native_batch_norm`` call
    recomputes them with the output."""

    def __init__(self, module: nn.Module, stats: list | None = None):
        self.module = module
        self.stats = stats if stats is not None else []

    def __call__(self, x, *rest, **kw):
        m = self.module
        stats = self.stats.pop(0) if self.stats else None
        if rest or kw or not isinstance(x, torch.Tensor) or not (m.training or m.running_mean is None) \
                or (m.track_running_stats and m.running_mean is not None) or x.ndim < 2:
            return type(m).forward(m, x, *rest, **kw)  # running statistics in play: the generic rule
        x_p, x_t = fwAD.unpack_dual(x)
        w_p, w_t = fwAD.unpack_dual(m.weight) if m.weight is not None else (None, None)
        b_p, b_t = fwAD.unpack_dual(m.bias) if m.bias is not None else (None, None)
        shape = [1, -1] + [1] * (x_p.ndim - 2)
        recorded = stats is not None and stats[0].shape == (x_p.shape[1],) and stats[0].dtype == x_p.dtype
        if recorded:
            mean, invstd = stats
        else:
            y, mean, invstd = torch.native_batch_norm(x_p, w_p, b_p, None, None, True, 0.0, m.eps)
        a = invstd if w_p is None else invstd * w_p
        if recorded:
            shift = -mean * a if b_p is None else b_p - mean * a
            y = torch.addcmul(shift.view(shape), x_p, a.view(shape))
        if w_t is None and b_t is None and x_t is None:
            return y
        c1 = torch.zeros_like(a) if w_t is None else w_t.to(a.dtype).clone()
        c0 = torch.zeros_like(a) if b_t is None else b_t.to(a.dtype).clone()
        if x_t is not None:
            n = x_p.numel() // x_p.shape[1]
            # The sums asked for do not depend on the weight, but CUDA's kernel allocates the
            # weight gradient like the weight, so it must be a defined per-channel tensor.
            _, sum_tx, sum_t = torch.ops.aten.native_batch_norm_backward(
                x_t, x_p, invstd, None, None, mean, invstd, True, m.eps, [False, True, True])
            c1.sub_(a * sum_tx, alpha=1.0 / n)
            c0.sub_(a * sum_t, alpha=1.0 / n)
        c1.mul_(invstd)
        c0.sub_(mean * c1)
        tangent = torch.addcmul(c0.view(shape), x_p, c1.view(shape))
        if x_t is not None:
            tangent.addcmul_(x_t, a.view(shape))
        return fwAD.make_dual(y, tangent)


class _RngReplay:
    """Record the RNG state before a forward pass so that another pass can reuse the same
    random draws (dropout masks) and then restore the stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def restore(self):
        """Put the recorded state back (undo the draws made since)."""
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

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
