"""The meta-gradient engine shared by MLC, L2RW and Meta-Weight-Net.

Modules: :mod:`~metacorrect.meta.engine` (:class:`MetaGradient`), :mod:`~metacorrect.meta.layer_rules`
(the forward route's layer rules), :mod:`~metacorrect.meta.loss_head` (the hypergradient over
the logits), :mod:`~metacorrect.meta.slots` (functional parameters, BatchNorm policy).

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

from .engine import CleanLoss, MetaGradient, MetaResult, NoisyLoss, VirtualUpdate, check_twice_differentiable, sgd_update
from .layer_rules import _BatchNormJvp, _PrimalCache, _batch_stats  # noqa: F401 (tests reach the rules)
from .loss_head import fast_head_hypergradient, head_hypergradient, loss_delta
from .slots import _ParamSlots, frozen_batchnorm_stats, swapped_parameters  # noqa: F401

__all__ = ["CleanLoss", "MetaGradient", "MetaResult", "NoisyLoss", "VirtualUpdate", "check_twice_differentiable",
           "fast_head_hypergradient", "frozen_batchnorm_stats", "head_hypergradient", "loss_delta", "sgd_update",
           "swapped_parameters"]
