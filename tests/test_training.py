"""The training loop and MLC end to end on the embedded digits: exact resume, T stays
row-stochastic, MLC beats cross-entropy under strong flip noise, faults fail clearly."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from metacorrect.experiments import RunConfig, run_experiment
from metacorrect.train import CheckpointError, NonFiniteLossError, TensorBatchLoader, fit


class Interrupt(Exception):
    pass


def small_config(**kw):
    base = dict(dataset="digits", noise="flip", strength=0.6, trusted=0.1, method="mlc", epochs=3, seed=0,
                device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_resume_after_interruption_reproduces_the_uninterrupted_run_exactly(tmp_path):
    config = small_config(epochs=3)
    full = run_experiment(config, tmp_path / "full")

    def stop_after_second_epoch(metrics):
        if metrics["epoch"] == 5:
            # MLC's phase 2 (after GLC's estimate), killed after its second epoch's metrics and
            # before its checkpoint: resumes from epoch 4, mid-way through the T updater's evidence
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(config, tmp_path / "cut", on_epoch=stop_after_second_epoch)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run_experiment(config, tmp_path / "cut", resume=True)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(np.load(tmp_path / "full" / "T.npy"), np.load(tmp_path / "cut" / "T.npy"))
    assert resumed["final_test_acc"] == full["final_test_acc"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_two_phase_method_reproduces_the_run(tmp_path):
    config = small_config(epochs=2, method="mlc", method_options={"t_init": "glc"})
    run_experiment(config, tmp_path / "full")

    def stop_in_phase_two(metrics):
        if metrics["epoch"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(config, tmp_path / "cut", on_epoch=stop_in_phase_two)
    run_experiment(config, tmp_path / "cut", resume=True)
    assert np.array_equal(np.load(tmp_path / "full" / "T.npy"), np.load(tmp_path / "cut" / "T.npy"))


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    run_experiment(small_config(epochs=1), tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(CheckpointError, match="another configuration"):
        run_experiment(small_config(epochs=1, strength=0.3), tmp_path / "run", resume=True)


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
    run_experiment(small_config(epochs=1), tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        run_experiment(small_config(epochs=1), tmp_path / "run", resume=True)
    assert ckpt.read_bytes() == b"not a checkpoint"


def test_mlc_keeps_T_row_stochastic_and_beats_cross_entropy_under_strong_flip_noise(tmp_path):
    seen = []
    config = small_config(epochs=15, trusted=0.1)
    mlc = run_experiment(config, tmp_path / "mlc", on_epoch=lambda m: seen.append(m))
    ce = run_experiment(small_config(epochs=15, trusted=0.1, method="ce"), tmp_path / "ce")
    T = np.load(tmp_path / "mlc" / "T.npy")
    assert np.all(T >= 0) and np.allclose(T.sum(1), 1)
    # flip s = 0.6 on digits: CE learns the flipped labels (measured ~0.5); MLC ~0.95
    assert mlc["final_test_acc"] > ce["final_test_acc"] + 0.25
    assert mlc["final_test_acc"] > 0.85
    assert seen[-1]["t_error"] < seen[0]["t_error"]  # T moves towards the truth


def _loaders(n=64, classes=3, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)
    return TensorBatchLoader(x, y, 16, seed=1), TensorBatchLoader(x[:16], y[:16], 8, seed=2)


def test_nan_loss_stops_with_a_clear_message():
    noisy, trusted = _loaders()
    noisy.x[0, 0] = float("nan")
    model = nn.Linear(4, 3)
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), noisy, trusted, "ce", epochs=1, num_classes=3,
            device="cpu")


def test_model_output_width_must_match_the_classes():
    noisy, trusted = _loaders()
    model = nn.Linear(4, 5)
    with pytest.raises(ValueError, match=r"data has 3 classes: expected \(2, 3\) logits"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), noisy, trusted, "mlc", epochs=1, num_classes=3,
            device="cpu")


def test_split_parts_are_views_that_batch_as_copies_would():
    # TensorBatchLoader.split sets a fraction apart without copying the tensors; each part
    # draws exactly the batches a loader over copies of its rows would (shuffled and in order)
    x, y = torch.randn(50, 4), torch.arange(50) % 3
    kept, held = TensorBatchLoader(x, y, 8, seed=3).split(0.2, seed=11)
    assert kept.x is x and held.x is x  # views: the rows are indices into the same tensors
    assert (kept.num_examples, held.num_examples, len(kept), len(held)) == (40, 10, 5, 2)
    rows = torch.cat([kept.rows, held.rows]).sort().values
    assert torch.equal(rows, torch.arange(50))  # the two parts cover every example once
    for part, shuffle, seed in ((kept, True, 12), (held, False, 0)):
        copy_ = TensorBatchLoader(x[part.rows], y[part.rows], 8, shuffle=shuffle, seed=seed)
        for (xa, ya), (xb, yb) in zip(part, copy_, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again, _ = kept.split(0.5, seed=1)  # a part of a part: rows of the original tensors
    assert again.x is x and set(again.rows.tolist()) <= set(kept.rows.tolist())


def test_empty_loader_is_refused():
    noisy, _ = _loaders()
    empty = TensorBatchLoader(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 8)
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="trusted loader is empty"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), noisy, empty, "mlc", epochs=1, num_classes=3)


def test_unknown_method_and_option_are_named():
    noisy, trusted = _loaders()
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        fit(model, opt, noisy, trusted, "magic", epochs=1, num_classes=3)
    with pytest.raises(ValueError, match="has no option\\(s\\) warp_speed; its options are:.*virtual_lr"):
        fit(model, opt, noisy, trusted, "mlc", epochs=1, num_classes=3, warp_speed=9)


def test_python_api_returns_model_T_and_history_with_any_dataloader():
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 4, generator=g), torch.randint(0, 3, (96,), generator=g)
    noisy = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    trusted = DataLoader(TensorDataset(x[:24], y[:24]), batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    seen = []
    result = fit(model, torch.optim.Adam(model.parameters(), 1e-2), noisy, trusted, "mlc", epochs=2, num_classes=3,
                 test_loader=trusted, callbacks=[seen.append], device="cpu")
    # MLC's default has two phases of 2 epochs (GLC's estimate, then MLC)
    assert result.model is model and result.T.shape == (3, 3) and len(result.history) == 4 == len(seen)
    assert 0 <= result.history[-1]["test_acc"] <= 1


def test_begin_phase_sees_the_trained_network_before_a_reinit_phase_restores_the_initial_one():
    from dataclasses import dataclass

    from metacorrect.methods.base import Method, Phase, ce_step

    @dataclass
    class Recorder(Method):
        def __post_init__(self):
            self.name = "recorder"
            self.phases = (Phase("one", "noisy"), Phase("two", "noisy", reinit=True))
            self.seen = {}

        def begin_phase(self, ctx, index):
            self.seen[index] = copy.deepcopy(ctx.model.state_dict())

        def step(self, ctx, noisy, trusted):
            if ctx.epoch_in_phase == 0 and ctx.step_in_phase == 0 and 1 in self.seen and "two" not in self.seen:
                self.seen["two"] = copy.deepcopy(ctx.model.state_dict())
            return ce_step(ctx, *noisy)

    noisy, trusted = _loaders()
    model = nn.Linear(4, 3)
    initial = copy.deepcopy(model.state_dict())
    method = Recorder()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.5), noisy, trusted, method, epochs=1, num_classes=3)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(method.seen[0], initial)
    assert not same(method.seen[1], initial)  # begin_phase(1) sees the network phase 1 trained
    assert same(method.seen["two"], initial)  # and phase 2 then starts from the initial weights


def test_mlc_glc_initialisation_starts_from_the_glc_estimate_of_the_phase_one_network():
    from metacorrect.methods.estimators import glc_estimate

    noisy, trusted = _loaders(n=256)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    captured = {}

    from metacorrect.methods.mlc import MLC

    class SpyMLC(MLC):
        def begin_phase(self, ctx, index):
            super().begin_phase(ctx, index)
            if index == 1:
                probs, labels = ctx.predict_proba(ctx.trusted_loader)
                captured["expected"] = glc_estimate(probs.numpy(), labels.numpy(), 3)
                captured["T0"] = self.T.cpu().double().numpy()

    fit(model, torch.optim.Adam(model.parameters(), 1e-2), noisy, trusted,
        SpyMLC(t_init="glc", noisy_evidence="ignored"), epochs=2, num_classes=3)
    assert np.allclose(captured["T0"], captured["expected"], atol=1e-6)
    assert np.abs(captured["T0"] - 1 / 3).max() > 0.05  # not the near-uniform T of a fresh network


def test_trusted_only_min_updates_adds_passes_per_epoch_and_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    steps = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, inp):
            if self.training and torch.is_grad_enabled():
                steps.append(len(inp))
            return self.lin(inp)

    def train(min_updates, epochs=2, **kw):
        steps.clear()
        torch.manual_seed(0)
        model = Counting()
        result = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatchLoader(x, y, 8),
                     TensorBatchLoader(x, y, 16, seed=1), method="trusted_only", min_updates=min_updates,
                     epochs=epochs, num_classes=3, device="cpu", **kw)
        return result, list(steps)

    _, plain = train(0)
    assert len(plain) == 2 * 3  # 2 epochs of 3 batches
    result, more = train(50)
    assert len(more) == 2 * 3 * 9  # ⌈50 / (2·3)⌉ = 9 passes per epoch: 54 updates >= 50
    assert [m["phase_epoch"] for m in result.history] == [1, 2]  # still two epochs
    # interrupted after its first epoch's checkpoint and resumed: the same weights
    full = train(50, epochs=3, checkpoint_path=tmp_path / "full.pt")[0].model.state_dict()

    def stop(metrics):
        if metrics["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(50, epochs=3, checkpoint_path=tmp_path / "cut.pt", callbacks=[stop])
    resumed = train(50, epochs=3, checkpoint_path=tmp_path / "cut.pt", resume=True)[0].model.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(ValueError, match="min_updates"):
        fit(Counting(), torch.optim.SGD(Counting().parameters(), lr=0.1), TensorBatchLoader(x, y, 8),
            TensorBatchLoader(x, y, 16), method="trusted_only", min_updates=-1, num_classes=3, device="cpu")


def test_mlc_estimate_epochs_shortens_the_estimate_phase_only_and_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)

    def train(epochs=4, **kw):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        return fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatchLoader(x, y, 8),
                   TensorBatchLoader(x[:24], y[:24], 8, seed=1), method="mlc", t_init="glc", t_warmup=0.0,
                   update_every=2, estimate_epochs=0.5, epochs=epochs, num_classes=3, device="cpu", **kw)

    result = train()
    assert [(m["phase"], m["phase_epoch"]) for m in result.history] == \
        [("estimate", 1), ("estimate", 2), ("mlc", 1), ("mlc", 2), ("mlc", 3), ("mlc", 4)]
    # interrupted inside the short estimate phase and at its end, resumed: the same weights and T
    full = train(checkpoint_path=tmp_path / "full.pt")
    for cut in (1, 2):
        def stop(metrics, cut=cut):
            if metrics["epoch"] == cut:
                raise Interrupt

        with pytest.raises(Interrupt):
            train(checkpoint_path=tmp_path / f"cut{cut}.pt", callbacks=[stop])
        resumed = train(checkpoint_path=tmp_path / f"cut{cut}.pt", resume=True)
        assert len(resumed.history) == 6
        assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())
        assert np.array_equal(full.T, resumed.T)
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match="estimate_epochs must be a fraction in"):
            fit(
                nn.Linear(6, 3), torch.optim.SGD(nn.Linear(6, 3).parameters(), lr=0.1), TensorBatchLoader(x, y, 8),
                TensorBatchLoader(x, y, 8), method="mlc", estimate_epochs=bad, num_classes=3, device="cpu")


def test_mlc_estimate_patience_stops_the_estimate_phase_and_starts_T_from_its_best_epoch(tmp_path):
    from metacorrect.methods.mlc import MLC
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    # scripted held-out losses by epoch of the estimate phase (5 examples each): epoch 2 is the
    # best; epoch 3 is within one standard error of it (chosen: the later of the two); epochs 4
    # and 5 are clearly worse (more than two), so the phase stops after its 5th epoch
    best = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9], dtype=torch.float64)
    script = [best + 1.0, best, best + torch.tensor([0.2, -0.1, 0.1, -0.15, 0.0], dtype=torch.float64),
              best + 0.3 + torch.tensor([0.01, -0.01, 0.0, 0.02, -0.02], dtype=torch.float64),
              best + 0.4 + torch.tensor([0.01, -0.01, 0.0, 0.02, -0.02], dtype=torch.float64), best - 1.0]
    trained_on = []

    class Scripted(MLC):
        def _holdout_losses(self, ctx):
            assert ctx.holdout_loader.num_examples == 5  # estimate_holdout=0.1 of the 50 noisy examples
            return script[ctx.epoch_in_phase], 0.5, True

        def _trusted_estimate(self, ctx):
            e = ctx.epoch_in_phase
            return np.full((3, 3), 0.1) + np.eye(3) * (0.7 - 0.1 * e), 0.5, 1.0, True

        def step(self, ctx, noisy, trusted):
            if trusted is None:
                trained_on.append({tuple(r.tolist()) for r in noisy[0]})
            return super().step(ctx, noisy, trusted)

    def train(**kw):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        return fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatchLoader(x, y, 8),
                   TensorBatchLoader(x[:24], y[:24], 8, seed=1),
                   Scripted(t_init="glc", t_warmup=0.0, update_every=2, estimate_patience=2),
                   epochs=6, num_classes=3, device="cpu", **kw)

    full = train(checkpoint_path=tmp_path / "full.pt")
    assert [m["phase"] for m in full.history] == ["estimate"] * 5 + ["mlc"] * 6
    assert [m["holdout_nll"] for m in full.history[:5]] == pytest.approx([float(t.mean()) for t in script[:5]])
    assert [m["estimate_epoch"] for m in full.history[:5]] == [1, 2, 3, 3, 3]
    assert np.allclose(full.method.T_start.numpy(), np.full((3, 3), 0.1) + np.eye(3) * 0.5)  # epoch 3's
    # the same 45 examples trained on in every estimate epoch: the 5 held out never are
    seen = set().union(*trained_on)
    assert len(seen) == 45

    def stop(metrics):
        if metrics["epoch"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(checkpoint_path=tmp_path / "cut.pt", callbacks=[stop])
    resumed = train(checkpoint_path=tmp_path / "cut.pt", resume=True)
    assert [m["phase"] for m in resumed.history] == [m["phase"] for m in full.history]
    assert np.array_equal(resumed.method.T_start.numpy(), full.method.T_start.numpy())
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())
    for bad, match in ((-1, "estimate_patience must be an integer >= 0"), (1.5, "estimate_patience must be"),
                       (True, "estimate_patience must be")):
        with pytest.raises(ValueError, match=match):
            MLC(estimate_patience=bad)
    with pytest.raises(ValueError, match="estimate_holdout must be a fraction"):
        MLC(estimate_patience=2, estimate_holdout=1.0)
    with pytest.raises(ValueError, match="needs estimate_holdout > 0"):
        MLC(estimate_patience=2, estimate_holdout=0.0)


def test_fused_optimizer_setting_builds_the_fused_kernel_and_keeps_old_fingerprints():
    import hashlib
    from metacorrect.experiments.run import build_optimizer
    plain, fused = small_config(method="ce"), small_config(method="ce", fused_optimizer=True)
    d = plain.to_dict()
    for key in ("data_dir", "device", *RunConfig.ADDED_LATER):  # settings added later, at their defaults
        d.pop(key)
    # a run recorded before the setting existed keeps its fingerprint (and its checkpoint)
    assert plain.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fused.fingerprint() != plain.fingerprint()
    model = nn.Linear(3, 2)
    assert build_optimizer(fused, model).defaults["fused"] is True
    assert not build_optimizer(plain, model).defaults.get("fused")


def test_fit_flushes_subnormal_floats_on_cpu_unless_opted_out(monkeypatch):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    subnormal = torch.tensor(1e-39)  # below float32's smallest normal number, 1.18e-38

    def train():
        model = nn.Linear(4, 2)
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatchLoader(x, y, 8),
            TensorBatchLoader(x, y, 8), method="ce", epochs=1, num_classes=2, device="cpu")

    try:
        monkeypatch.setenv("METACORRECT_KEEP_DENORMALS", "1")
        train()
        assert float(subnormal * 1.0) != 0.0
        monkeypatch.delenv("METACORRECT_KEEP_DENORMALS")
        train()
        assert float(subnormal * 1.0) == 0.0
    finally:
        torch.set_flush_denormal(False)
