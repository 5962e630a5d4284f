"""The meta-gradient engine shared by MLC, L2RW and Meta-Weight-Net.

All three methods have a hyper-parameter ``θ`` (MLC: the transition matrix ``T``; L2RW: a
weight per noisy example; MW-Net: the weight network's parameters) that enters training
only through the noisy loss ``L_noisy(f(x; w), ỹ; θ)``. One meta iteration:

1. **virtual step**  ``w' = w − α·∇_w L_noisy(w, θ)``  (plain SGD, virtual learning rate α);
2. **clean loss**    ``L_clean(w') = CE(f(x_c; w'), y_c)`` on a trusted batch;
3. **hypergradient** ``∇_θ L_clean(w')``.

Two exact ways to get (3):

* ``reference`` — the usual way: differentiate the virtual step with ``create_graph=True``
  and backpropagate ``L_clean(w')`` through it to θ (a double backward through the net),
  then forward the noisy batch again for the actual step.
* ``fast`` — because θ enters only through the loss head, with ``z = f(x; w)`` and
  ``δ(θ) = ∂L_noisy/∂z``, we have ``∇_w L_noisy = Jᵀδ(θ)`` and so
  ``∇_θ L_clean(w') = −α·∂/∂θ ⟨g_c, Jᵀδ(θ)⟩ = −α·∂/∂θ ⟨J g_c, δ(θ)⟩`` with
  ``g_c = ∇L_clean(w')``. Only ``u = J g_c`` (N×C) involves the network; the rest is a
  tiny computation over the N×C logits (in closed form for the two corrected losses of
  :mod:`metacorrect.methods.losses`, by a small autograd graph otherwise — which also
  handles a parametrised θ such as ``T = softmax(Θ)``). The noisy forward ``z`` (with its
  graph) is the one the actual step reuses. Two routes to ``u``, equal to float rounding:

  - ``jvp='forward'``: one forward-mode JVP of the network along ``g_c``
    (:mod:`torch.autograd.forward_ad`), keeping no graph. Three layer rules make it
    cheaper than generic forward-mode AD (:class:`_PrimalCache`): ``nn.Linear``/``nn.ConvNd``
    take their primal output from the step's real forward (when the graph keeps it alive
    anyway) and compute only their tangent; BatchNorm (batch statistics) has a closed-form
    tangent; embedding lookups (which torch cannot differentiate in forward mode nor
    twice) are linear in their table. Elsewhere primals are recomputed with the tangents.
  - ``jvp='reverse'``: the virtual step's backward is run as a VJP ``Jᵀv`` with the
    cotangent ``v = δ(θ)`` as a leaf and ``create_graph=True``; then ``u = ∂⟨g_c, Jᵀv⟩/∂v``
    is one backward through that backward graph. It reuses the noisy forward's saved
    activations instead of recomputing them (cheaper in arithmetic: two products per
    layer instead of three) but holds the backward graph until ``u`` is known (more
    memory). Random layers (dropout) need no replay here.

  ``jvp='auto'`` (default) picks by measurement (docs/PERFORMANCE.md): ``'forward'`` when
  the model has a convolution, a BatchNorm or an embedding layer, ``'reverse'`` otherwise.

**Head-only scope** (``scope='head'``, an approximation, off by default): the virtual step
moves only the model's output layer (its last ``nn.Linear``), and the hypergradient is the
exact one of that restricted problem. With ``h`` the head's input, ``z = h·Wᵀ + b``, every
piece is in closed form over the head: the virtual gradient is ``(δᵀh, Σδ)``, the clean
loss needs the trusted batch's features at the current weights (one forward without a
graph), and ``u = h·G_Wᵀ + g_b``. It costs about one extra forward instead of the exact
path's two backward passes and a JVP, but it ignores how the body's weights would move
(the issue that proposed it measured a cosine of 0.88 to the exact hypergradient once
training had started). ``reference`` mode honours the scope too (double backward
through the head's virtual step), which is how the fast head path is tested.

Both exact paths pass parameters functionally by swapping the model's parameter slots for
the duration of a pass (:func:`swapped_parameters`; same effect as
:func:`torch.func.functional_call`, with less per-call overhead; tied weights stay tied).

BatchNorm policy: every meta pass uses batch statistics and leaves the running statistics
untouched (:func:`frozen_batchnorm_stats`); in ``fast`` mode the one real forward of the
noisy batch updates them, exactly as a plain training step would. Dropout and other
random layers are made consistent by replaying the RNG state of the noisy forward in the
JVP forward.

Fallbacks (each switch logged once, reason in ``fallback_reason``): a custom
differentiable ``virtual_update`` (anything other than plain SGD) uses ``reference``. A
model operation without forward-mode AD support switches ``jvp='forward'`` to
``'reverse'``; one without double-backward support (including ``@once_differentiable``
backwards, which autograd would silently drop from a second derivative — checked on the
first call) switches ``'reverse'`` to ``'forward'``; when neither route works, ``auto``
mode uses ``reference`` and ``fast`` mode raises. A failed first attempt leaves no trace
(BatchNorm buffers and the RNG state are restored).

CPU allocator: creating an engine calls :func:`metacorrect.perf.tune_allocator` once per
process (glibc malloc thresholds; opt out with ``METACORRECT_NO_TUNE_ALLOCATOR=1``).
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
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import perf
from .distributed import SINGLE, World

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


class _ParamSlots:
    """Where each trainable parameter lives in the module tree, to swap tensors in and out."""

    def __init__(self, model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]):
        index = {id(p): i for i, p in enumerate(params)}
        self.key = tuple(id(p) for p in params)
        self.slots: list[tuple[dict, str, int]] = []
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in index:
                    self.slots.append((module._parameters, attr, index[id(p)]))
        self.names = list(names)


@contextlib.contextmanager
def swapped_parameters(slots: _ParamSlots, tensors: Sequence[torch.Tensor]):
    """Inside, the model computes with ``tensors`` (in the order of ``slots.names``) in place of
    its parameters; every slot of a tied parameter gets the same tensor. The parameters are
    put back on exit, whatever happens."""
    saved = [(d, attr, d[attr]) for d, attr, _ in slots.slots]
    try:
        for d, attr, i in slots.slots:
            d[attr] = tensors[i]
        yield
    finally:
        for d, attr, p in saved:
            d[attr] = p


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
                 x_clean, y_clean, *, shares: tuple[float, float] | None = None) -> MetaResult:
        hyper = tuple(hyper)
        if shares is not None and self.head is not None:
            raise ValueError("the head-only meta-gradient (scope='head') has no distributed form")
        if self.mode == "reference":
            return self.reference(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares)
        if self.head is not None:
            return self.fast_head(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean)
        if self._verified:
            return self.fast(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares)
        # Until one fast call has succeeded, a failure (an operation without forward-mode or
        # double-backward support) must leave no trace: keep the buffers (BatchNorm running
        # statistics) and the RNG state to restore before the next route is tried.
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        rng = _RngReplay(x_noisy.device)
        tried: list[str] = []
        while True:
            try:
                result = self.fast(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares)
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
                    return self.reference(noisy_loss, hyper, x_noisy, y_noisy, x_clean, y_clean, shares=shares)
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
             shares: tuple[float, float] | None = None) -> MetaResult:
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
                  shares: tuple[float, float] | None = None) -> MetaResult:
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
        if shares is not None:
            hypergrads = tuple(self.world.all_reduce([h.clone() for h in hypergrads]))
        # the actual step's forward, with the running-statistics update a plain step makes
        return MetaResult(hypergrads, clean.detach(), model(x_noisy), "reference")


# ---------------------------------------------------------------------- the loss head
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
    from .methods.losses import forward_corrected_loss, logit_corrected_loss
    if noisy_loss is forward_corrected_loss:
        return _probs_delta, _probs_head
    if noisy_loss is logit_corrected_loss:
        return _logits_delta, _logits_head
    return None


def _probs_parts(z, y, T):
    from .methods.losses import _TINY
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
