"""The baselines: forward, forward_gold, glc, confusion, forward_true (correction.py),
distillation, l2rw and mwnet (reweighting.py), on tiny synthetic data.

``T[i, j] = P(noisy = j | true = i)`` (rows sum to 1) throughout.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from metacorrect.meta import MetaGradient
from metacorrect.methods import create_method
from metacorrect.methods.reweighting import l2rw_weights
from metacorrect.train import TensorBatchLoader, fit

C = 3
T_FLIP = np.array([[0.6, 0.4, 0.0],
                   [0.0, 0.6, 0.4],
                   [0.4, 0.0, 0.6]])
TWO_PHASE = ["forward", "forward_gold", "glc", "confusion", "distillation"]
ALL_BASELINES = TWO_PHASE + ["forward_true", "l2rw", "mwnet"]
WITH_T = {"forward", "forward_gold", "glc", "confusion", "forward_true"}


class Interrupt(Exception):
    pass


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    centres = 2.0 * torch.eye(C, 4)
    return centres[y] + 0.7 * torch.randn(n, 4, generator=g), y


def corrupt(y, T, seed):
    rng = np.random.default_rng(seed)
    return torch.tensor([rng.choice(C, p=T[c]) for c in y.tolist()])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several (and kinder to a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    x_n, y_clean = blobs(240, 1)
    x_t, y_t = blobs(48, 2)
    return x_n, corrupt(y_clean, T_FLIP, 3), x_t, y_t


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, C))


def run(data, method, epochs=1, callbacks=(), checkpoint_path=None, resume=False, T_true=T_FLIP, **options):
    """A fresh model, optimizer and loaders with fixed seeds, then ``fit``."""
    x_n, y_n, x_t, y_t = data
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-6)
    result = fit(model, optimizer, TensorBatchLoader(x_n, y_n, 32, seed=11), TensorBatchLoader(x_t, y_t, 16, seed=12),
                 method, epochs=epochs, num_classes=C, T_true=T_true, device="cpu", callbacks=callbacks,
                 checkpoint_path=checkpoint_path, resume=resume, seed=0, **options)
    return result


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ALL_BASELINES)
def test_every_baseline_runs_end_to_end_and_returns_a_row_stochastic_T_where_it_has_one(data, name):
    method = create_method(name)
    result = run(data, method, epochs=1)
    assert len(result.history) == len(method.phases)
    assert all(np.isfinite(m["train_loss"]) for m in result.history)
    if name in WITH_T:
        assert result.T is not None and result.T.shape == (C, C)
        raw = method.estimated_T()
        assert np.all(raw >= 0) and np.allclose(raw.sum(1), 1, atol=1e-5)
        assert "t_error" in result.history[-1]
    else:
        assert result.T is None and method.estimated_T() is None


def test_phase_streams_follow_glc_code():
    streams = {name: tuple(p.stream for p in create_method(name).phases) for name in ALL_BASELINES}
    assert streams["forward"] == ("all", "all")
    assert streams["forward_gold"] == streams["glc"] == streams["confusion"] == ("noisy", "all")
    assert streams["distillation"] == ("trusted", "all")
    assert streams["forward_true"] == ("all",)
    assert streams["l2rw"] == streams["mwnet"] == ("paired",)


def test_forward_true_uses_the_true_T_and_without_one_errors_clearly(data):
    method = create_method("forward_true")
    run(data, method)
    assert np.allclose(method.estimated_T(), T_FLIP)
    with pytest.raises(ValueError, match="true transition matrix.*T_true"):
        run(data, "forward_true", T_true=None)


# ---------------------------------------------------------------------------------- estimates
class EndOfPhaseOne:
    """A callback keeping a copy of the model's weights after the last epoch of phase 1."""

    def __init__(self, model_holder, phase_name, epochs):
        self.holder, self.phase_name, self.epochs = model_holder, phase_name, epochs
        self.weights = None

    def __call__(self, metrics):
        if metrics["phase"] == self.phase_name and metrics["phase_epoch"] == self.epochs:
            self.weights = snapshot(self.holder["model"])


def run_with_phase_one_weights(data, name, epochs=2):
    """Run a two-phase method and also return the phase-1 network (what T̂ is estimated from)."""
    x_n, y_n, x_t, y_t = data
    model = tiny_model()
    holder = {"model": model}
    method = create_method(name)
    grab = EndOfPhaseOne(holder, method.phases[0].name, epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fit(model, optimizer, TensorBatchLoader(x_n, y_n, 32, seed=11), TensorBatchLoader(x_t, y_t, 16, seed=12),
        method, epochs=epochs, num_classes=C, T_true=T_FLIP, device="cpu", callbacks=[grab], seed=0)
    phase_one = tiny_model()
    phase_one.load_state_dict(grab.weights)
    return method, phase_one.eval()


def test_glc_T_is_the_per_class_mean_softmax_of_the_phase_one_network_on_trusted_data(data):
    method, net = run_with_phase_one_weights(data, "glc")
    _, _, x_t, y_t = data
    with torch.no_grad():
        probs = torch.softmax(net(x_t), 1).double()
    expected = torch.stack([probs[y_t == i].mean(0) for i in range(C)]).numpy()
    assert np.allclose(method.estimated_T(), expected, atol=1e-6)


def test_confusion_T_is_the_smoothed_confusion_matrix_of_the_phase_one_network(data):
    method, net = run_with_phase_one_weights(data, "confusion")
    _, _, x_t, y_t = data
    with torch.no_grad():
        pred = net(x_t).argmax(1)
    counts = np.zeros((C, C))
    np.add.at(counts, (y_t.numpy(), pred.numpy()), 1)
    expected = 0.99 * counts / counts.sum(1, keepdims=True) + 0.01 / C
    assert np.allclose(method.estimated_T(), expected, atol=1e-6)


class StubContext(SimpleNamespace):
    """Just enough of ``TrainContext`` for a method's ``estimate``: ``predict_proba``
    returns hand-made outputs for the noisy and trusted loaders."""

    def predict_proba(self, loader):
        probs, labels = self.outputs[loader]
        return torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels)


def anchor_probabilities():
    """40 rows: uniform filler plus, for each class i, four rows with p_i = 0.99 (an outlier),
    0.95, 0.90 and 0.80. With 40 values the 97th percentile ('higher') is the second largest,
    so the percentile rule drops 0.99 and 0.95 and picks the 0.90 row; the plain arg-max
    picks the 0.99 row. Class 2's special rows sit in the trusted part."""
    special = {}
    for i in range(C):
        rows = []
        for p, rest in ((0.99, (0.006, 0.004)), (0.95, (0.03, 0.02)), (0.90, (0.06, 0.04)), (0.80, (0.15, 0.05))):
            r = np.empty(C)
            r[i] = p
            r[[j for j in range(C) if j != i]] = rest
            rows.append(r)
        special[i] = rows
    filler = np.full((28, C), 1.0 / C)
    noisy = np.vstack([filler[:20], *special[0], *special[1]])  # 28 rows
    trusted = np.vstack([filler[20:24], *special[2], filler[24:28]])  # 12 rows
    return noisy, trusted, special


@pytest.mark.parametrize("percentile, pick", [(97.0, 2), (None, 0)])
def test_forward_anchor_rows_on_hand_made_probabilities(percentile, pick):
    noisy, trusted, special = anchor_probabilities()
    assert len(noisy) + len(trusted) == 40
    ctx = StubContext(num_classes=C, noisy_loader="noisy", trusted_loader="trusted",
                      outputs={"noisy": (noisy, np.zeros(len(noisy), int)),
                               "trusted": (trusted, np.zeros(len(trusted), int))})
    for name in ("forward", "forward_gold"):
        T = create_method(name, anchor_percentile=percentile).estimate(ctx)
        expected = np.stack([special[i][pick] for i in range(C)])
        assert np.allclose(T, expected, atol=1e-6), name


def test_confusion_smoothing_on_hand_made_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 2])
    probs = np.eye(C)[preds] * 0.8 + 0.2 / C  # arg-max = preds
    ctx = StubContext(num_classes=C, trusted_loader="trusted", outputs={"trusted": (probs, labels)})
    T = create_method("confusion").estimate(ctx)
    raw = np.array([[3 / 4, 1 / 4, 0], [0, 1 / 2, 1 / 2], [1 / 5, 0, 4 / 5]])
    assert np.allclose(T, 0.99 * raw + 0.01 / 3)
    assert np.allclose(T.sum(1), 1)


# ---------------------------------------------------------------------------------- re-initialisation
@pytest.mark.parametrize("name", TWO_PHASE)
def test_phase_two_starts_from_the_initial_weights_with_a_fresh_optimizer(data, name):
    x_n, y_n, x_t, y_t = data
    model = tiny_model()
    initial = snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = create_method(name)
    seen = {}
    begin, step = method.begin_phase, method.step

    def spy_begin(ctx, index):
        if index == 1:
            seen["before"] = snapshot(ctx.model)  # begin_phase sees the phase-1 network
        begin(ctx, index)

    def spy_step(ctx, noisy, trusted):
        if "before" in seen and "after" not in seen:  # the first step of phase 2
            seen.update(after=snapshot(ctx.model), opt_state=len(ctx.optimizer.state))
        return step(ctx, noisy, trusted)

    method.begin_phase, method.step = spy_begin, spy_step
    fit(model, optimizer, TensorBatchLoader(x_n, y_n, 32, seed=11), TensorBatchLoader(x_t, y_t, 16, seed=12),
        method, epochs=1, num_classes=C, T_true=T_FLIP, device="cpu", seed=0)
    assert not same_weights(seen["before"], initial)  # phase 1 trained the network
    assert same_weights(seen["after"], initial)
    assert seen["opt_state"] == 0
    if name != "distillation":
        assert method.estimated_T() is not None  # estimated before the weights were reset


def test_distillation_teacher_is_the_frozen_phase_one_network_and_targets_mix_labels(data):
    method, phase_one = run_with_phase_one_weights(data, "distillation")
    assert same_weights(snapshot(method.teacher), snapshot(phase_one))
    assert not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    x_n, y_n, _, _ = data
    x, y = x_n[:10], y_n[:10]
    with torch.no_grad():
        soft = torch.softmax(phase_one(x), 1)
    expected = method.lam * torch.nn.functional.one_hot(y, C) + (1 - method.lam) * soft
    assert torch.allclose(method.soft_targets(x, y, C), expected, atol=1e-6)
    with pytest.raises(ValueError, match="lam"):
        create_method("distillation", lam=1.5)


# ---------------------------------------------------------------------------------- re-weighting
def test_l2rw_weight_rule():
    w = l2rw_weights(torch.tensor([-2.0, 1.0, -1.0, 0.5]))
    assert torch.allclose(w, torch.tensor([2 / 3, 0, 1 / 3, 0]))
    assert torch.equal(l2rw_weights(torch.tensor([0.1, 0.0, 2.0])), torch.zeros(3))


def test_l2rw_weights_are_nonnegative_and_sum_to_one_or_zero_in_every_batch(data):
    method = create_method("l2rw")
    step = method.step
    weights = []

    def spy(ctx, noisy, trusted):
        loss = step(ctx, noisy, trusted)
        weights.append(method.last_weights.clone())
        return loss

    method.step = spy
    run(data, method, epochs=1)
    assert len(weights) == 8  # 240 noisy examples in batches of 32
    assert any(w.sum() > 0 for w in weights)
    for w in weights:
        assert torch.all(w >= 0)
        assert torch.isclose(w.sum(), torch.tensor(1.0), atol=1e-5) or torch.all(w == 0)


def test_mwnet_weight_net_gets_gradients_and_changes(data):
    method = create_method("mwnet")
    step = method.step
    grads = []

    def spy(ctx, noisy, trusted):
        loss = step(ctx, noisy, trusted)
        grads.append(sum(float(p.grad.abs().sum()) for p in method.vnet.parameters()))
        return loss

    method.step = spy
    setup = method.setup
    initial = {}

    def setup_spy(ctx):
        setup(ctx)
        initial.update(snapshot(method.vnet))

    method.setup = setup_spy
    run(data, method, epochs=1)
    assert all(g > 0 for g in grads)
    after = snapshot(method.vnet)
    assert all(not torch.equal(after[k], initial[k]) for k in initial)
    w = method.last_weights
    assert torch.all((w > 0) & (w < 1))


@pytest.mark.parametrize("weight_norm", ["mean", "sum"])
def test_mwnet_hypergradient_fast_equals_reference(data, weight_norm):
    x_n, y_n, x_t, y_t = data
    model = tiny_model().double()
    method = create_method("mwnet", weight_norm=weight_norm)
    method.setup(SimpleNamespace(device=torch.device("cpu"), model=model))
    method.vnet.double()
    params = [p for _, p in method.vnet.named_parameters()]
    args = (x_n[:32].double(), y_n[:32], x_t[:16].double(), y_t[:16])
    fast = MetaGradient(model, 0.1, mode="fast")(method.weighted_loss, params, *args).hypergrads
    ref = MetaGradient(model, 0.1, mode="reference")(method.weighted_loss, params, *args).hypergrads
    assert sum(float(g.abs().sum()) for g in ref) > 0
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name, kill_at", [("glc", 3), ("glc", 4), ("distillation", 3), ("distillation", 4),
                                           ("mwnet", 2)])
def test_resume_reproduces_the_uninterrupted_run(data, tmp_path, name, kill_at):
    """Two epochs per phase: killing at overall epoch 3 (before its checkpoint) resumes from
    the end of phase 1; at epoch 4, from inside phase 2 (T̂ / the teacher come from the
    checkpoint). MW-Net (one phase of 3 epochs) resumes with its weight net and its Adam."""
    epochs = 3 if name == "mwnet" else 2
    full = run(data, name, epochs=epochs)

    def kill(metrics):
        if metrics["epoch"] == kill_at:
            raise Interrupt

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):
        run(data, name, epochs=epochs, callbacks=[kill], checkpoint_path=ckpt)
    assert ckpt.exists()
    resumed = run(data, name, epochs=epochs, checkpoint_path=ckpt, resume=True)
    assert same_weights(snapshot(full.model), snapshot(resumed.model))
    assert [m["train_loss"] for m in full.history] == [m["train_loss"] for m in resumed.history]
    if name == "glc":
        assert np.array_equal(full.T, resumed.T)
    if name == "mwnet":
        assert same_weights(snapshot(full.method.vnet), snapshot(resumed.method.vnet))
