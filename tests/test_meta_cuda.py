"""The fast meta-gradient on a GPU: equal to the reference there too (cuDNN's BatchNorm and
torch's CUDA kernels take other code paths than on the CPU). Skipped without CUDA; CI has
none, so these run on a GPU machine: ``pytest tests/test_meta_cuda.py``."""

import copy

import pytest
import torch
import torch.nn as nn

from metacorrect.meta import MetaGradient, _batch_stats
from metacorrect.methods.losses import forward_corrected_loss, logit_corrected_loss

from test_meta_fast import CASES, ROUTES, case_inputs, random_T, rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

# float32 sums over a batch: relative error of a few 1e-5 expected; float64 as on the CPU.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, logit_corrected_loss], ids=["T_on_probs", "T_on_logits"])
@pytest.mark.parametrize("kind", list(CASES))
def test_fast_equals_reference_on_cuda(kind, loss_fn, route, dtype):
    model, (xn, yn), (xc, yc) = case_inputs(kind, seed=0)
    dev = torch.device("cuda")
    model = model.to(dev, dtype)
    xn, xc = xn.to(dev, dtype), xc.to(dev, dtype)
    yn, yc = yn.to(dev), yc.to(dev)
    T = random_T(3).to(dev, dtype)
    results = {}
    for mode in ("fast", "reference"):
        engine = MetaGradient(copy.deepcopy(model), 0.3, mode=mode, jvp=route)
        (results[mode],) = engine(loss_fn, (T,), xn, yn, xc, yc).hypergrads
    assert results["reference"].norm() > 1e-8
    assert rel(results["fast"], results["reference"]) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_recorded_batch_norm_statistics_are_the_batch_mean_and_inverse_std_on_cuda(dtype):
    """``_batch_stats`` reads the saved results of whichever backward node the GPU used
    (cuDNN's for float32 in training mode): they must be the batch mean and 1/sqrt(var+eps)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).to("cuda", dtype).train()
    x = torch.randn(8, 5, 6, 6, device="cuda", dtype=dtype) * 3 + 1
    out = bn(x)
    stats = _batch_stats(bn, out)
    assert stats is not None, f"no statistics recorded from a {type(out.grad_fn).__name__} node"
    mean, invstd = stats
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.allclose(invstd, (var + bn.eps).rsqrt(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", list(CASES))
def test_meta_gradient_under_autocast_on_cuda_matches_float32(kind, route, amp):
    """Autocast rounds each matrix product's inputs once (bf16: 2⁻⁸, fp16: 2⁻¹¹ unit
    roundoff) and accumulates in float32: a few roundoffs of relative error; 5e-2 allowed."""
    from metacorrect.perf import autocast_forward
    model, (xn, yn), (xc, yc) = case_inputs(kind, seed=0)
    dev = torch.device("cuda")
    model = model.to(dev)
    xn, xc, yn, yc = xn.to(dev).float(), xc.to(dev).float(), yn.to(dev), yc.to(dev)
    T = random_T(seed=1).to(dev).float()
    exact = MetaGradient(model, 0.1, mode="fast", jvp=route)(forward_corrected_loss, (T,), xn, yn, xc, yc)
    restore = autocast_forward(model, amp, dev)
    try:
        low = MetaGradient(model, 0.1, mode="fast", jvp=route)(forward_corrected_loss, (T,), xn, yn, xc, yc)
    finally:
        restore()
    assert rel(low.hypergrads[0], exact.hypergrads[0]) < 5e-2
