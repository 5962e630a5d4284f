"""The fast meta-gradient: both JVP routes equal the reference, the closed-form loss heads
equal the generic autograd ones, dropout is replayed, the fallbacks trigger where they
must, and MLC's amortisation options do what they say."""

import copy
import math
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metacorrect import perf
from metacorrect.meta import (MetaGradient, _ParamSlots, fast_head_hypergradient, head_hypergradient, loss_delta,
                              swapped_parameters)
from metacorrect.methods import create_method
from metacorrect.methods.losses import forward_corrected_loss, logit_corrected_loss
from metacorrect.methods.t_update import project_stochastic
from metacorrect.models import create_model
from metacorrect.train import TensorBatchLoader, TrainContext

C = 4
ROUTES = ["forward", "reverse"]


def tiny_mlp(dropout=0.0):
    layers = [nn.Flatten(), nn.Linear(6, 5), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(5, C))


def tiny_cnn_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, C))


def batch(shape, n, seed, classes=C):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def random_T(seed, c=C):
    g = torch.Generator().manual_seed(seed)
    T = torch.rand(c, c, generator=g, dtype=torch.float64) + torch.eye(c, dtype=torch.float64) * 2
    return T / T.sum(1, keepdim=True)


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def hypergrads(model, mode, loss, hyper, xn, yn, xc, yc, jvp="auto", seed=None):
    """One engine call on a copy of ``model`` (so BatchNorm statistics start equal)."""
    m = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    return MetaGradient(m, 0.3, mode=mode, jvp=jvp)(loss, hyper, xn, yn, xc, yc).hypergrads


CASES = {
    "mlp": (tiny_mlp, (6,), 12),
    "cnn_bn": (tiny_cnn_bn, (1, 4, 4), 12),
    "lenet": (lambda: create_model("lenet", (1, 28, 28), C), (1, 28, 28), 6),
    "resnet8": (lambda: create_model("resnet8", (3, 32, 32), C), (3, 32, 32), 4),
}


def case_inputs(kind, seed):
    """A float64 model of ``CASES[kind]`` (initialised under ``seed``) with a noisy and a clean batch."""
    make, shape, n = CASES[kind]
    torch.manual_seed(seed)
    return make().double().train(), batch(shape, n, 1), batch(shape, n, 2)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, logit_corrected_loss], ids=["T_on_probs", "T_on_logits"])
@pytest.mark.parametrize("kind", list(CASES))
def test_fast_equals_reference_float64(kind, loss_fn, route):
    model, (xn, yn), (xc, yc) = case_inputs(kind, seed=0)
    T = random_T(3)
    (fast,) = hypergrads(model, "fast", loss_fn, (T,), xn, yn, xc, yc, jvp=route)
    (ref,) = hypergrads(model, "reference", loss_fn, (T,), xn, yn, xc, yc)
    assert ref.norm() > 1e-8  # not vacuous
    assert rel(fast, ref) < 1e-6


@pytest.mark.parametrize("route", ROUTES)
def test_fast_equals_reference_generic_loss_and_parametrised_T(route):
    """A loss the closed forms do not know (T = softmax(Θ)) goes through the generic head."""
    torch.manual_seed(3)
    model = tiny_cnn_bn().double().train()
    xn, yn = batch((1, 4, 4), 10, 1)
    xc, yc = batch((1, 4, 4), 10, 2)
    theta = torch.randn(C, C, dtype=torch.float64)

    def loss(z, y, th):
        return forward_corrected_loss(z, y, torch.softmax(th, 1))

    (fast,) = hypergrads(model, "fast", loss, (theta,), xn, yn, xc, yc, jvp=route)
    (ref,) = hypergrads(model, "reference", loss, (theta,), xn, yn, xc, yc)
    assert rel(fast, ref) < 1e-6


@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, logit_corrected_loss], ids=["probs", "logits"])
def test_closed_form_heads_equal_the_generic_autograd_head(loss_fn):
    g = torch.Generator().manual_seed(0)
    n = 50
    z = torch.randn(n, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (n,), generator=g)
    u = torch.randn(n, C, generator=g, dtype=torch.float64)
    T = random_T(1)
    T[0, 1] = 0.0  # zero entries keep a finite, exact gradient
    closed = fast_head_hypergradient(loss_fn, z, y, (T,), u, 0.7)[0]
    generic = head_hypergradient(loss_fn, z, y, (T,), u, 0.7)[0]
    assert rel(closed, generic) < 1e-12
    zl = z.clone().requires_grad_()
    (delta,) = torch.autograd.grad(loss_fn(zl, y, T), zl)
    assert rel(loss_delta(loss_fn, z, y, (T,)), delta) < 1e-12


def test_closed_form_probs_head_respects_the_clamp_of_q():
    """Where ``q = (p·T)[ỹ]`` falls below the loss's floor the loss is constant: no gradient."""
    z = torch.tensor([[40.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    T = torch.eye(C, dtype=torch.float64)  # q_0 = p_01 ≈ e^-40 < 1e-12: clamped
    u = torch.ones(2, C, dtype=torch.float64)
    closed = fast_head_hypergradient(forward_corrected_loss, z, y, (T,), u, 1.0)[0]
    generic = head_hypergradient(forward_corrected_loss, z, y, (T,), u, 1.0)[0]
    assert torch.allclose(closed, generic, rtol=1e-12, atol=1e-15)
    assert torch.allclose(loss_delta(forward_corrected_loss, z, y, (T,))[0], torch.zeros(C, dtype=torch.float64))


@pytest.mark.parametrize("route", ROUTES)
def test_dropout_is_replayed_and_matches_the_reference(route):
    torch.manual_seed(4)
    model = tiny_mlp(dropout=0.5).double().train()
    xn, yn = batch((6,), 16, 1)
    xc, yc = batch((6,), 16, 2)
    T = random_T(5)
    (fast,) = hypergrads(model, "fast", forward_corrected_loss, (T,), xn, yn, xc, yc, jvp=route, seed=11)
    (ref,) = hypergrads(model, "reference", forward_corrected_loss, (T,), xn, yn, xc, yc, seed=11)
    (other,) = hypergrads(model, "reference", forward_corrected_loss, (T,), xn, yn, xc, yc, seed=12)
    assert rel(other, ref) > 1e-3  # the masks matter: the check is not vacuous
    assert rel(fast, ref) < 1e-6


def test_tied_weights_stay_tied_in_the_meta_passes():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(C, C)
            self.b = nn.Linear(C, C)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(5)
    model = Tied().double()
    xn, yn = batch((C,), 10, 1)
    xc, yc = batch((C,), 10, 2)
    T = random_T(6)
    for route in ROUTES:
        (fast,) = hypergrads(model, "fast", forward_corrected_loss, (T,), xn, yn, xc, yc, jvp=route)
        (ref,) = hypergrads(model, "reference", forward_corrected_loss, (T,), xn, yn, xc, yc)
        assert rel(fast, ref) < 1e-6
    # the swap puts the parameters back
    params = dict(model.named_parameters())
    slots = _ParamSlots(model, list(params), list(params.values()))
    with swapped_parameters(slots, [torch.zeros_like(p) for p in params.values()]):
        assert torch.equal(model.a.weight, model.b.weight) and float(model.a.weight.abs().sum()) == 0
    assert model.a.weight is params["a.weight"] and model.b.weight is params["a.weight"]


class NoJvpTanh(torch.autograd.Function):
    """tanh with a (twice-differentiable) backward but no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh with a forward-mode rule but a backward that cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class NeitherTanh(OnceDifferentiableTanh):
    jvp = torch.autograd.Function.jvp  # back to "not implemented"


class CustomNet(nn.Module):
    def __init__(self, fn=None):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, C)
        self.fn = fn

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = self.fn.apply(h) if self.fn is not None else torch.tanh(h)
        return self.fc(h.flatten(1))


def test_op_without_forward_mode_falls_back_once_with_the_reason_and_the_reference_result(caplog):
    torch.manual_seed(6)
    model = CustomNet(NoJvpTanh).double().train()
    xn, yn = batch((1, 4, 4), 8, 1)
    xc, yc = batch((1, 4, 4), 8, 2)
    T = random_T(7)
    plain = copy.deepcopy(model)
    plain(xn)  # one ordinary forward: what the running statistics must see
    m = copy.deepcopy(model)
    engine = MetaGradient(m, 0.3, mode="auto", jvp="forward")
    with caplog.at_level(logging.WARNING, logger="metacorrect.meta"):
        first = engine(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads[0]
        for (name, b), b_plain in zip(m.named_buffers(), plain.buffers()):
            assert torch.equal(b, b_plain), f"buffer {name}: the failed attempt left a trace"
        for _ in range(2):
            engine(forward_corrected_loss, (T,), xn, yn, xc, yc)
    warnings = [r for r in caplog.records if r.name == "metacorrect.meta"]
    assert len(warnings) == 1, "the reason is logged once"
    assert "forward-mode" in warnings[0].getMessage() and "forward-mode" in engine.fallback_reason
    assert engine.jvp == "reverse"  # the other exact fast route; no extra forward
    (ref,) = hypergrads(model, "reference", forward_corrected_loss, (T,), xn, yn, xc, yc)
    assert rel(first, ref) < 1e-6
    # strict mode refuses instead of switching when nothing fast applies
    with pytest.raises(RuntimeError, match="fast meta-gradient cannot be used"):
        MetaGradient(copy.deepcopy(CustomNet(NeitherTanh).double()), 0.3, mode="fast", jvp="forward")(
            forward_corrected_loss, (T,), xn, yn, xc, yc)


def test_op_without_double_backward_uses_the_forward_route(caplog):
    torch.manual_seed(7)
    model = CustomNet(OnceDifferentiableTanh).double().train()
    twin = CustomNet(None).double().train()
    twin.load_state_dict(model.state_dict())  # the same network with torch.tanh
    xn, yn = batch((1, 4, 4), 8, 1)
    xc, yc = batch((1, 4, 4), 8, 2)
    T = random_T(8)
    engine = MetaGradient(copy.deepcopy(model), 0.3, mode="auto", jvp="reverse")
    with caplog.at_level(logging.WARNING, logger="metacorrect.meta"):
        (got,) = engine(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads
    assert engine.jvp == "forward" and "double-backward" in engine.fallback_reason
    assert sum(r.name == "metacorrect.meta" for r in caplog.records) == 1
    (ref,) = hypergrads(twin, "reference", forward_corrected_loss, (T,), xn, yn, xc, yc)
    assert rel(got, ref) < 1e-6


def test_custom_virtual_update_falls_back_to_the_reference_result(caplog):
    torch.manual_seed(8)
    model = tiny_mlp().double()
    xn, yn = batch((6,), 8, 1)
    xc, yc = batch((6,), 8, 2)
    T = random_T(9)
    with caplog.at_level(logging.WARNING, logger="metacorrect.meta"):
        engine = MetaGradient(model, 0.3, mode="auto", virtual_update=lambda p, g: {k: v - 0.3 * g[k] for k, v in p.items()})
    assert engine.mode == "reference" and "custom virtual update" in engine.fallback_reason
    assert sum(r.name == "metacorrect.meta" for r in caplog.records) == 1
    got = engine(forward_corrected_loss, (T,), xn, yn, xc, yc)
    assert got.mode == "reference"
    (fast,) = hypergrads(model, "fast", forward_corrected_loss, (T,), xn, yn, xc, yc)
    assert rel(got.hypergrads[0], fast) < 1e-6


def test_auto_route_choice():
    assert MetaGradient(tiny_mlp(), 0.1).jvp == "reverse"
    assert MetaGradient(tiny_cnn_bn(), 0.1).jvp == "forward"
    with pytest.raises(ValueError, match="jvp route"):
        MetaGradient(tiny_mlp(), 0.1, jvp="sideways")


# ---------------------------------------------------------------------- MLC's step
def _mlc_ctx(model, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainContext(model=model, optimizer=opt, device=torch.device("cpu"), num_classes=C, noisy_loader=[],
                        trusted_loader=[], epochs=1, steps_per_epoch=10)


def _expected_update(model, T, xn, yn, xc, yc, lr, trusted_ce=True, trusted_weight=1.0):
    m = copy.deepcopy(model)
    loss = forward_corrected_loss(m(xn), yn, T)
    if trusted_ce:
        loss = loss + trusted_weight * F.cross_entropy(m(xc), yc)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return [p.detach() - lr * g for p, g in zip(m.parameters(), grads)]


@pytest.mark.parametrize("reuse", [False, True])
def test_mlc_actual_step_uses_the_new_T_or_with_reuse_the_old_one(reuse):
    torch.manual_seed(9)
    model = tiny_mlp().double()
    before = copy.deepcopy(model)
    ctx = _mlc_ctx(model)
    mlc = create_method("mlc", reuse_virtual_grad=reuse, t_update="v1", meta_lr=0.05, update_every=1)
    mlc.setup(ctx)
    mlc.T = mlc.T.double()
    T_old = mlc.T.clone()
    xn, yn = batch((6,), 12, 1)
    xc, yc = batch((6,), 12, 2)
    mlc.step(ctx, (xn, yn), (xc, yc))
    assert not torch.equal(mlc.T, T_old)
    want = _expected_update(before, T_old if reuse else mlc.T, xn, yn, xc, yc, 0.05)
    other = _expected_update(before, mlc.T if reuse else T_old, xn, yn, xc, yc, 0.05)
    for p, w, o in zip(model.parameters(), want, other):
        assert torch.allclose(p.detach(), w, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(w, o, rtol=1e-10, atol=1e-12) for w, o in zip(want, other))


@pytest.mark.parametrize("meta_mode", ["fast", "reference"])
@pytest.mark.parametrize("trusted_weight", [1.0, 5.0])
def test_mlc_meta_step_that_leaves_T_unchanged_takes_the_exact_step(meta_mode, trusted_weight):
    # the tested rule moves T only at the end of a block: mid-block the fast path reuses the
    # virtual step's gradient for the actual step, which must be the exact step with that T
    # (the reference mode recomputes it), with the trusted cross-entropy weighted as asked
    torch.manual_seed(11)
    model = tiny_mlp().double()
    before = copy.deepcopy(model)
    ctx = _mlc_ctx(model)
    mlc = create_method("mlc", t_init="identity", t_warmup=0.0, update_every=1, meta_mode=meta_mode,
                        trusted_weight=trusted_weight)
    want, (T_old, xn, yn, xc, yc) = _assert_mid_block_step_is_exact(ctx, before, mlc, trusted_weight)
    assert mlc.updater.count == 1  # mid-block: evidence gathered, T kept
    if trusted_weight != 1.0:  # the weight acts: the unweighted step is elsewhere
        other = _expected_update(before, T_old, xn, yn, xc, yc, 0.05)
        assert any(not torch.allclose(w, o, rtol=1e-6) for w, o in zip(want, other))


def _assert_mid_block_step_is_exact(ctx, before, mlc, trusted_weight):
    """One step of ``mlc`` from a T mid-block: T stays and the model (``before`` it) takes
    the exact step with that T and the trusted cross-entropy at ``trusted_weight``."""
    mlc.setup(ctx)
    mlc.T = (0.8 * torch.eye(C) + 0.2 / C).double()
    T_old = mlc.T.clone()
    xn, yn = batch((6,), 12, 1)
    xc, yc = batch((6,), 12, 2)
    mlc.step(ctx, (xn, yn), (xc, yc))
    assert torch.equal(mlc.T, T_old)
    want = _expected_update(before, T_old, xn, yn, xc, yc, 0.05, trusted_weight=trusted_weight)
    for p, w in zip(ctx.model.parameters(), want):
        assert torch.allclose(p.detach(), w, rtol=1e-10, atol=1e-12)
    return want, (T_old, xn, yn, xc, yc)


@pytest.mark.parametrize("option, weight", [("balanced", 0.5), ("geometric", math.sqrt(0.5))])
def test_mlc_size_based_trusted_weights_take_the_exact_step_and_are_kept(option, weight):
    # 'balanced': update_every · n_trusted / n_noisy (here 2 · 30 / 120 = 0.5), each trusted
    # example counted as a noisy one; 'geometric' (version 4's default): its square root, the geometric
    # mean of the balanced weight and 1. The sizes of the sets are read from the loaders; the
    # step is the exact step with that weight, and the weight is kept for a resume
    torch.manual_seed(12)
    model = tiny_mlp().double()
    before = copy.deepcopy(model)
    ctx = _mlc_ctx(model)
    ctx.noisy_loader = TensorBatchLoader(torch.zeros(120, 6), torch.zeros(120, dtype=torch.long), 12)
    ctx.trusted_loader = TensorBatchLoader(torch.zeros(30, 6), torch.zeros(30, dtype=torch.long), 12)
    mlc = create_method("mlc", t_init="identity", t_warmup=0.0, update_every=2, trusted_weight=option)
    _assert_mid_block_step_is_exact(ctx, before, mlc, weight)
    assert mlc.state_dict()["trusted_weight"] == pytest.approx(weight)


def test_label_information_share_has_its_closed_forms():
    from metacorrect.methods.mlc import label_information_share
    prior = torch.tensor([0.2, 0.3, 0.5])
    assert label_information_share(torch.eye(3), prior) == pytest.approx(1.0)  # a clean label: all of it
    assert label_information_share(torch.full((3, 3), 1 / 3), prior) == pytest.approx(0.0, abs=1e-12)
    # a binary symmetric channel with flip rate 0.2, balanced classes: 1 − H(0.2) / log 2
    eps = 0.2
    h = -(eps * math.log(eps) + (1 - eps) * math.log(1 - eps))
    T = torch.tensor([[1 - eps, eps], [eps, 1 - eps]])
    assert label_information_share(T, torch.tensor([0.5, 0.5])) == pytest.approx(1 - h / math.log(2))
    # a permutation loses nothing: the noisy label names the class as well as the clean one
    assert label_information_share(torch.eye(3)[[1, 2, 0]], prior) == pytest.approx(1.0)


def test_mlc_information_trusted_weight_divides_the_balanced_one_by_the_share():
    from metacorrect.methods.mlc import label_information_share
    torch.manual_seed(12)
    model = tiny_mlp().double()
    ctx = _mlc_ctx(model)
    y_trusted = torch.arange(30) % C
    ctx.noisy_loader = TensorBatchLoader(torch.zeros(120, 6), torch.zeros(120, dtype=torch.long), 12)
    ctx.trusted_loader = TensorBatchLoader(torch.zeros(30, 6), y_trusted, 12)
    for T_start, expected in ((torch.eye(C), 0.5), (0.5 * torch.eye(C) + 0.5 / C, None)):
        mlc = create_method("mlc", t_init="identity", t_warmup=0.0, update_every=2, trusted_weight="information")
        mlc.setup(ctx)
        mlc.T_start = T_start
        share = label_information_share(T_start, torch.bincount(y_trusted, minlength=C).double() / 30)
        want = 0.5 / share if expected is None else expected  # balanced 2 · 30 / 120 = 0.5
        assert mlc._trusted_weight(ctx) == pytest.approx(min(1.0, want))
    assert 0.5 < mlc._trusted_weight(ctx) <= 1.0  # noisier labels: the trusted examples weigh more
    assert mlc.state_dict()["trusted_weight"] == mlc._trusted_weight(ctx)  # kept for a resume


def test_mlc_rejects_a_bad_trusted_weight():
    for bad in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(ValueError, match="trusted_weight must be a number > 0, 'balanced', 'information', 'geometric', 'relative_debiased' or 'relative_tested'"):
            create_method("mlc", trusted_weight=bad)


def test_mlc_meta_batch_slices_the_trusted_batch_for_the_meta_step_only():
    torch.manual_seed(10)
    model = tiny_mlp().double()
    xn, yn = batch((6,), 12, 1)
    xc, yc = batch((6,), 12, 2)
    engine = MetaGradient(copy.deepcopy(model), 0.1, mode="fast")
    T0 = torch.eye(C, dtype=torch.float64)
    (g,) = engine(forward_corrected_loss, (T0,), xn, yn, xc[:5], yc[:5]).hypergrads
    ctx = _mlc_ctx(model)
    mlc = create_method("mlc", meta_batch=5, update_every=1, t_update="v1")
    mlc.setup(ctx)
    mlc.T = T0.clone()
    mlc.step(ctx, (xn, yn), (xc, yc))
    assert torch.allclose(mlc.T, project_stochastic(T0 - mlc.meta_lr * g / g.abs().max(), T0), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="meta_batch"):
        create_method("mlc", meta_batch=0)


def test_tune_allocator_opt_out(monkeypatch):
    monkeypatch.setenv(perf.OPT_OUT_ENV, "1")
    assert perf.tune_allocator(force=True).startswith("off")
    monkeypatch.delenv(perf.OPT_OUT_ENV)
    state = perf.tune_allocator(force=True)
    assert state.startswith("on") or state.startswith("off (")
    assert perf.allocator_state() == state


@pytest.mark.parametrize("name", ["word_avg", "window_mlp"])
def test_embedding_models_get_an_exact_fast_hypergradient(name):
    """torch has neither a forward-mode rule nor a double backward for ``embedding_bag``; the
    engine's own rule for embedding lookups (linear in the table) makes the fast path exact."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = create_model(name, (5,), C, vocab_size=40).double()
    g = torch.Generator().manual_seed(1)
    xn, yn = torch.randint(0, 40, (10, 5), generator=g), torch.randint(0, C, (10,), generator=g)
    xc, yc = torch.randint(0, 40, (10, 5), generator=g), torch.randint(0, C, (10,), generator=g)
    xn[0, 3:] = 0  # padding
    T = random_T(2)
    engine = MetaGradient(copy.deepcopy(model), 0.5)
    (got,) = engine(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads
    assert engine.jvp == "forward" and engine.mode == "auto" and engine.fallback_reason is None
    params = dict(model.named_parameters())

    def clean_after_virtual_step(T):
        grads = torch.autograd.grad(forward_corrected_loss(model(xn), yn, T), list(params.values()))
        virtual = {k: p - 0.5 * gr for (k, p), gr in zip(params.items(), grads)}
        return F.cross_entropy(functional_call(model, virtual, (xc,)), yc)

    numeric = torch.zeros_like(T)
    for i in range(C):
        for j in range(C):
            d = torch.zeros_like(T)
            d[i, j] = 1e-6
            numeric[i, j] = (clean_after_virtual_step(T + d) - clean_after_virtual_step(T - d)) / 2e-6
    assert rel(got, numeric) < 1e-6


def test_primal_reuse_equals_plain_forward_mode_and_keeps_only_retained_outputs():
    torch.manual_seed(11)
    xn, yn = batch((1, 28, 28), 6, 1)
    xc, yc = batch((1, 28, 28), 6, 2)
    T = random_T(3)
    for name in ("lenet", "resnet8"):
        model = create_model(name, (1, 28, 28), C).double().train()
        fast = MetaGradient(copy.deepcopy(model), 0.3, mode="fast", jvp="forward")
        plain = MetaGradient(copy.deepcopy(model), 0.3, mode="fast", jvp="forward", reuse_primals=False)
        a = fast(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads[0]
        b = plain(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads[0]
        assert rel(a, b) < 1e-10
    # LeNet's convolutions feed ReLUs (which keep their outputs, not their inputs): the cache
    # must not hold those; ResNet's feed BatchNorm, which keeps them anyway
    from metacorrect.meta import _PrimalCache
    for name, kept in (("lenet", False), ("resnet8", True)):
        model = create_model(name, (1, 28, 28), C).train()
        cache = _PrimalCache(model)
        with cache.record():
            out = model(torch.randn(4, 1, 28, 28))
        cache.prune()
        convs = [m for m in cache.modules if isinstance(m, nn.Conv2d)]
        assert all((cache.outputs[id(m)][0] is not None) == kept for m in convs)
        del out


def test_mlc_v1_updates_T_every_third_step_starting_with_the_first():
    torch.manual_seed(12)
    model = tiny_mlp().double()
    ctx = _mlc_ctx(model)
    assert create_method("mlc").update_every == 5  # the tested rule's default
    mlc = create_method("mlc", t_update="v1")
    assert mlc.update_every == 3
    mlc.setup(ctx)
    mlc.T = mlc.T.double()
    calls = []
    engine = mlc.engine
    mlc.engine = lambda *a: calls.append(len(calls)) or engine(*a)
    xn, yn = batch((6,), 12, 1)
    xc, yc = batch((6,), 12, 2)
    for _ in range(7):
        mlc.step(ctx, (xn, yn), (xc, yc))
    assert len(calls) == 3  # steps 1, 4 and 7


class SharedNormNet(nn.Module):
    """One BatchNorm layer applied twice per forward, a BatchNorm without affine parameters
    and a BatchNorm1d: the JVP's BatchNorm rule must pair each call with its own statistics."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1, self.bn1d, self.fc2 = nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, C)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.bn(self.conv2(h)) + h)
        return self.fc2(torch.relu(self.bn1d(self.fc1(h.flatten(1)))))


@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, logit_corrected_loss], ids=["T_on_probs", "T_on_logits"])
def test_batchnorm_jvp_rule_with_recorded_statistics_equals_the_reference(loss_fn):
    from metacorrect.meta import _PrimalCache
    torch.manual_seed(5)
    model = SharedNormNet().double().train()
    xn, yn = batch((1, 4, 4), 10, 1)
    xc, yc = batch((1, 4, 4), 10, 2)
    T = random_T(4)
    ref = hypergrads(model, "reference", loss_fn, (T,), xn, yn, xc, yc)[0]
    fast = hypergrads(model, "fast", loss_fn, (T,), xn, yn, xc, yc, jvp="forward")[0]
    plain = MetaGradient(copy.deepcopy(model), 0.3, mode="fast", jvp="forward", reuse_primals=False)
    assert rel(fast, ref) < 1e-10
    assert rel(plain(loss_fn, (T,), xn, yn, xc, yc).hypergrads[0], ref) < 1e-10
    # the rule really runs on statistics recorded from the real forward: two per shared layer
    cache = _PrimalCache(model)
    with cache.record():
        model(xn)
    counts = {type(m).__name__ + str(m.num_features): len(cache.stats[id(m)]) for m in cache.norms}
    assert counts == {"BatchNorm2d3": 2, "BatchNorm1d5": 1}
    assert all(s is not None for m in cache.norms for s in cache.stats[id(m)])


@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, logit_corrected_loss], ids=["T_on_probs", "T_on_logits"])
@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_head_scope_closed_form_equals_its_reference_and_differs_from_the_exact_one(kind, loss_fn):
    model, (xn, yn), (xc, yc) = case_inputs(kind, seed=7)
    T = random_T(5)

    def run(mode, scope):
        engine = MetaGradient(copy.deepcopy(model), 0.3, mode=mode, scope=scope)
        return engine(loss_fn, (T,), xn, yn, xc, yc)

    fast, ref = run("fast", "head"), run("reference", "head")
    assert fast.mode == "head"
    assert rel(fast.hypergrads[0], ref.hypergrads[0]) < 1e-10
    assert abs(float(fast.clean_loss) - float(ref.clean_loss)) < 1e-12
    exact = run("reference", "all").hypergrads[0]
    assert rel(fast.hypergrads[0], exact) > 1e-3  # an approximation: the body's move is ignored


def test_head_scope_needs_a_linear_output_layer_called_once():
    with pytest.raises(ValueError, match="nn.Linear"):
        MetaGradient(nn.Sequential(nn.Conv2d(1, C, 3), nn.Flatten()), 0.1, scope="head")

    class TwiceHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(C, C)

        def forward(self, x):
            return self.fc(self.fc(x))

    xn, yn = batch((C,), 6, 1)
    engine = MetaGradient(TwiceHead().double(), 0.1, scope="head")
    with pytest.raises(ValueError, match="called 2 times"):
        engine(forward_corrected_loss, (random_T(1),), xn, yn, xn, yn)
    with pytest.raises(ValueError, match="scope"):
        MetaGradient(tiny_mlp(), 0.1, scope="body")
