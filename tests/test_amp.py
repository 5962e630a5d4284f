"""Mixed precision: the meta-gradient under bf16 autocast against float32, and every
method trains end to end with ``amp='bf16'`` on CPU.

Tolerance: bfloat16 keeps 8 bits of mantissa (unit roundoff 2⁻⁸ ≈ 3.9e-3); the autocast
region rounds the inputs and weights of each matrix product once and accumulates in
float32, so the hypergradient of these two-layer models is off by a few roundoffs:
measured 1.6e-3 to 2.2e-3 relative (L2) on both JVP routes and the reference path. The test
allows 2e-2 (five roundoffs) and checks that it is not exact (so autocast did run).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from metacorrect.meta import MetaGradient
from metacorrect.methods import method_names
from metacorrect.methods.losses import forward_corrected_loss
from metacorrect.perf import autocast_forward
from metacorrect.train import TensorBatchLoader, fit


def _models():
    torch.manual_seed(0)
    yield "mlp", nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    yield "bn_cnn", nn.Sequential(nn.Unflatten(1, (1, 4, 5)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(160, 5))


@pytest.mark.parametrize("route", ["forward", "reverse", "reference"])
def test_meta_gradient_under_bf16_autocast_matches_float32(route):
    g = torch.Generator().manual_seed(1)
    xn, yn = torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)
    xc, yc = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
    T = torch.eye(5) * 0.8 + 0.04
    for name, model in _models():
        kw = {"mode": "reference"} if route == "reference" else {"mode": "fast", "jvp": route}
        exact = MetaGradient(model, 0.1, **kw)(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads[0]
        restore = autocast_forward(model, "bf16", torch.device("cpu"))
        try:
            low = MetaGradient(model, 0.1, **kw)(forward_corrected_loss, (T,), xn, yn, xc, yc).hypergrads[0]
        finally:
            restore()
        rel = float((low - exact).norm() / exact.norm())
        assert 0 < rel < 2e-2, (name, route, rel)


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_with_bf16(method):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    result = fit(model, torch.optim.Adam(model.parameters(), 1e-2), TensorBatchLoader(x[:48], y[:48], 16),
                 TensorBatchLoader(x[48:], y[48:], 8), method, epochs=1, num_classes=3, device="cpu", amp="bf16",
                 test_loader=TensorBatchLoader(x, y, 64, shuffle=False), T_true=torch.eye(3) * 0.7 + 0.1)
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in result.history)
    assert "forward" not in model.__dict__  # the autocast wrapper is removed after training
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_amp_mode_is_named():
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast_forward(nn.Linear(2, 2), "fp8", torch.device("cpu"))


def test_channels_last_trains_a_cnn_with_the_meta_step():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    result = fit(model, torch.optim.Adam(model.parameters(), 1e-2), TensorBatchLoader(x[:32], y[:32], 16),
                 TensorBatchLoader(x[32:], y[32:], 8), "mlc", epochs=1, num_classes=3, device="cpu",
                 channels_last=True, t_update="v1", update_every=1)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
