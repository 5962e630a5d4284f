"""The meta-gradient engine: exact hypergradients (finite differences), fast == reference,
BatchNorm running statistics untouched by meta passes."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from metacorrect.meta import MetaGradient, frozen_batchnorm_stats
from metacorrect.methods.losses import forward_corrected_loss, logit_corrected_loss
from metacorrect.methods.mlc import project_stochastic

C = 4


def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C))


def tiny_cnn_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, C))


def batch(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 1, 4, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def random_T(seed):
    g = torch.Generator().manual_seed(seed)
    T = torch.rand(C, C, generator=g, dtype=torch.float64) + torch.eye(C, dtype=torch.float64) * 2
    return T / T.sum(1, keepdim=True)


def clean_loss_after_virtual_step(model, T, loss_fn, xn, yn, xc, yc, alpha):
    """L_clean(w − α∇_w L_noisy(w, T)) computed plainly (no engine), for finite differences."""
    params = dict(model.named_parameters())
    with frozen_batchnorm_stats(model):
        loss = loss_fn(model(xn), yn, T)
        grads = torch.autograd.grad(loss, list(params.values()))
        virtual = {k: p - alpha * g for (k, p), g in zip(params.items(), grads)}
        return F.cross_entropy(functional_call(model, virtual, (xc,)), yc)


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, logit_corrected_loss], ids=["probs", "logits"])
def test_hypergradient_matches_central_finite_differences(kind, mode, loss_fn):
    torch.manual_seed(0)
    model = (tiny_mlp() if kind == "mlp" else tiny_cnn_bn()).double().train()
    xn, yn = batch(kind, 8, 1)
    xc, yc = batch(kind, 6, 2)
    T = random_T(3)
    alpha = 0.5
    engine = MetaGradient(model, alpha, mode=mode)
    (grad,) = engine(loss_fn, (T,), xn, yn, xc, yc).hypergrads
    eps = 1e-6
    numeric = torch.zeros_like(T)
    for i in range(C):
        for j in range(C):
            d = torch.zeros_like(T)
            d[i, j] = eps
            plus = clean_loss_after_virtual_step(model, T + d, loss_fn, xn, yn, xc, yc, alpha)
            minus = clean_loss_after_virtual_step(model, T - d, loss_fn, xn, yn, xc, yc, alpha)
            numeric[i, j] = (plus - minus) / (2 * eps)
    rel = (grad - numeric).norm() / numeric.norm()
    assert numeric.norm() > 1e-6  # the check is not vacuous
    assert rel < 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_fast_hypergradient_equals_reference(kind):
    torch.manual_seed(1)
    model = (tiny_mlp() if kind == "mlp" else tiny_cnn_bn()).double().train()
    xn, yn = batch(kind, 16, 4)
    xc, yc = batch(kind, 16, 5)
    T = random_T(6)
    fast = MetaGradient(model, 0.1, mode="fast")(forward_corrected_loss, (T,), xn, yn, xc, yc)
    ref = MetaGradient(model, 0.1, mode="reference")(forward_corrected_loss, (T,), xn, yn, xc, yc)
    rel = (fast.hypergrads[0] - ref.hypergrads[0]).norm() / ref.hypergrads[0].norm()
    assert rel < 1e-10
    assert torch.allclose(fast.noisy_logits, ref.noisy_logits)


def test_meta_passes_leave_batchnorm_running_stats_to_one_real_forward():
    torch.manual_seed(2)
    model = tiny_cnn_bn().double().train()
    xn, yn = batch("cnn", 16, 7)
    xc, yc = batch("cnn", 16, 8)
    plain = copy.deepcopy(model)
    plain(xn)  # what one ordinary training forward of the noisy batch does to the statistics
    for mode in ("fast", "reference"):
        m = copy.deepcopy(model)
        MetaGradient(m, 0.1, mode=mode)(forward_corrected_loss, (random_T(0),), xn, yn, xc, yc)
        for (name, b_meta), b_plain in zip(m.named_buffers(), plain.buffers()):
            assert torch.equal(b_meta, b_plain), f"{mode}: buffer {name} differs from one plain forward"
    # inside the context manager, batch statistics are used and nothing is updated
    m = copy.deepcopy(model)
    before = [b.clone() for b in m.buffers()]
    with frozen_batchnorm_stats(m):
        m(xc)
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))
    assert all(mod.track_running_stats for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))


def test_meta_step_does_not_change_the_weights():
    model = tiny_mlp().double()
    before = copy.deepcopy(model.state_dict())
    xn, yn = batch("mlp", 8, 1)
    MetaGradient(model, 0.1, mode="fast")(forward_corrected_loss, (random_T(0),), xn, yn, xn, yn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parametrised_T_gets_the_chain_rule_in_the_fast_path():
    torch.manual_seed(3)
    model = tiny_mlp().double()
    xn, yn = batch("mlp", 8, 1)
    xc, yc = batch("mlp", 8, 2)
    theta = torch.randn(C, C, dtype=torch.float64)

    def loss(z, y, th):
        return forward_corrected_loss(z, y, torch.softmax(th, 1))

    fast = MetaGradient(model, 0.3, mode="fast")(loss, (theta,), xn, yn, xc, yc).hypergrads[0]
    ref = MetaGradient(model, 0.3, mode="reference")(loss, (theta,), xn, yn, xc, yc).hypergrads[0]
    assert (fast - ref).norm() / ref.norm() < 1e-10


def test_custom_virtual_update_falls_back_to_reference_with_reason(caplog):
    model = tiny_mlp().double()
    with caplog.at_level("WARNING"):
        engine = MetaGradient(model, 0.1, mode="auto", virtual_update=lambda p, g: {k: v - 0.1 * g[k] for k, v in p.items()})
    assert engine.mode == "reference"
    assert "custom virtual update" in engine.fallback_reason
    assert "reference" in caplog.text
    with pytest.raises(RuntimeError, match="fast meta-gradient cannot be used"):
        MetaGradient(model, 0.1, mode="fast", virtual_update=lambda p, g: p)


def test_projection_keeps_T_row_stochastic_and_restores_vanished_rows():
    old = torch.eye(3)
    new = torch.tensor([[0.5, -0.2, 0.9], [-1.0, -1.0, -0.5], [0.2, 0.2, 0.2]])
    out = project_stochastic(new, old)
    assert torch.all(out >= 0)
    assert torch.allclose(out.sum(1), torch.ones(3))
    assert torch.equal(out[1], old[1])  # a row that vanished keeps its previous value
    assert torch.allclose(out[0], torch.tensor([0.5, 0.0, 0.9]) / 1.4)
