"""Distributed training on CPU: two processes spawned here on the gloo backend.

Exactness: one configuration on 2 processes is the one-process algorithm on the union of
the ranks' batches (metacorrect.distributed). In float64 the only difference is the order
of floating-point sums (a rank's share of a mean, then the all-reduce), about 1e-16
relative per operation. Adam divides each step by the root of the gradient's second
moment, which magnifies rounding in gradient entries near zero: measured, the weights
agreed to 1e-16 (MLC's default, MW-Net, GLC), 1.4e-10 (MLC with T moving every step) and
2.5e-9 (L2RW, whose per-example weights are normalised over the batch); the tests allow 1e-7 (T itself is float32: 1e-6), while a
wrong weighting (e.g. averaging the ranks' means when their slices differ in size) is off
by ~1e-2 — the tests would see it.
"""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from metacorrect.distributed import World, shard_bounds
from metacorrect.train import CheckpointError, TensorBatchLoader, fit

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups on Windows are not tested")

C = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(n_noisy=47, n_trusted=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_noisy + n_trusted, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, C, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(1)
    y_noisy = torch.where(torch.rand(n_noisy, generator=g) < 0.4, (y[:n_noisy] + 1) % C, y[:n_noisy])
    return (x[:n_noisy], y_noisy), (x[n_noisy:], y[n_noisy:])


class GhostBatchNorm(nn.Module):
    """One process's stand-in for BatchNorm under 2 ranks: normalises each rank's slice of
    the batch separately (the slices of metacorrect.distributed.shard_bounds)."""

    def __init__(self, bn: nn.Module, size: int = 2):
        super().__init__()
        self.bn, self.size = bn, size

    def forward(self, x):
        parts = [x[a:b] for a, b in (shard_bounds(len(x), r, self.size) for r in range(self.size)) if b > a]
        return torch.cat([self.bn(p) for p in parts])


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C))


def _bn_cnn(ghost=False):
    bn = nn.BatchNorm2d(3)
    return nn.Sequential(nn.Unflatten(1, (1, 5, 1)), nn.Conv2d(1, 3, (2, 1)), GhostBatchNorm(bn) if ghost else bn,
                         nn.ReLU(), nn.Flatten(), nn.Linear(12, C))


MODELS = {"mlp": _mlp, "bn_cnn": _bn_cnn, "bn_cnn_ghost": lambda: _bn_cnn(ghost=True)}


def _train(method, options, world: World, batch=10, epochs=2, n_noisy=47, n_trusted=13, checkpoint=None,
           resume=False, model="mlp"):
    (xn, yn), (xt, yt) = _problem(n_noisy, n_trusted)
    torch.manual_seed(0)
    model = MODELS[model]().double()
    noisy = TensorBatchLoader(xn, yn, batch, seed=1, world=world)
    trusted = TensorBatchLoader(xt, yt, batch, seed=2, world=world)
    result = fit(model, torch.optim.Adam(model.parameters(), 1e-2), noisy, trusted, method, epochs=epochs,
                 num_classes=C, device="cpu", world=world, checkpoint_path=checkpoint, resume=resume,
                 fingerprint="test", **options)
    return result


CASES = {
    # the old rule moves T on every meta step: the most sensitive check of the hypergradient
    "mlc_fast": ("mlc", {"t_update": "v1", "update_every": 1, "meta_lr": 0.05}, {}),
    "mlc_reference": ("mlc", {"t_update": "v1", "update_every": 1, "meta_lr": 0.05, "meta_mode": "reference"}, {}),
    "mlc_default": ("mlc", {}, {"epochs": 3}),
    # a last noisy batch of 1: rank 1's slice is empty at that step
    "mlc_empty_slice": ("mlc", {"t_update": "v1", "update_every": 1}, {"n_noisy": 41}),
    "glc": ("glc", {}, {}),
    "ce": ("ce", {}, {"batch": 7}),
    # per-example weights normalised over the global batch (L2RW); one weight net on every rank
    "l2rw": ("l2rw", {"trusted_ce": True}, {"n_noisy": 41}),
    "mwnet": ("mwnet", {}, {}),
    # the other baselines: single-stream phases, T estimates from gathered predictions, a teacher
    "forward": ("forward", {}, {"epochs": 1}),
    "forward_gold": ("forward_gold", {}, {"epochs": 1}),
    "confusion": ("confusion", {}, {"epochs": 1}),
    "distillation": ("distillation", {}, {"epochs": 1}),
    "trusted_only": ("trusted_only", {}, {"epochs": 1}),
    # BatchNorm: each rank normalises its slice; one process with a ghost batch norm over the
    # same slices is the algorithm it equals (fast path with the forward-mode BatchNorm rule)
    "bn_cnn": ("mlc", {"t_update": "v1", "update_every": 1, "meta_lr": 0.05}, {"batch": 12, "model": "bn_cnn"}),
}
ONE_PROCESS_MODEL = {"bn_cnn": "bn_cnn_ghost"}


def _state(result):
    return {"params": [p.detach().clone() for p in result.model.parameters()],
            "T": None if result.T is None else torch.as_tensor(result.T)}


def _worker(rank, size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    world = World(rank, size)
    try:
        results = {}
        for name, (method, options, kw) in CASES.items():
            results[name] = _state(_train(method, options, world, **kw))
        # kill-and-resume: every rank stops after the first epoch of three, then resumes
        ckpt = os.path.join(out_dir, "ckpt.pt")
        _train("mlc", {"t_update": "v1", "update_every": 1}, world, epochs=1, checkpoint=ckpt)
        resumed = _train("mlc", {"t_update": "v1", "update_every": 1}, world, epochs=3, checkpoint=ckpt,
                         resume=True)
        results["resumed"] = _state(resumed)
        results["uninterrupted"] = _state(_train("mlc", {"t_update": "v1", "update_every": 1}, world, epochs=3))
        # a mutant: every rank's mean counted alike, whatever the size of its slice
        from metacorrect.train import TrainContext
        share = TrainContext.share
        TrainContext.share = lambda self, stream: 1.0 / size
        try:
            method, options, kw = CASES["mlc_fast"]
            results["unweighted"] = _state(_train(method, options, world, **kw))
        finally:
            TrainContext.share = share
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


def _close(a, b, tol=1e-7):
    return all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_union_of_their_batches(two_process_results, case):
    ranks, _ = two_process_results
    method, options, kw = CASES[case]
    kw = {**kw, "model": ONE_PROCESS_MODEL.get(case, kw.get("model", "mlp"))}
    one = _state(_train(method, options, World(), **kw))
    for r in ranks:  # replicas identical, and equal to one process
        assert _close(r[case]["params"], one["params"]), case
        if one["T"] is not None:  # T is float32 (the methods keep it so): float32 rounding
            assert torch.allclose(r[case]["T"], one["T"], rtol=1e-6, atol=1e-7), case
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][case]["params"], ranks[1][case]["params"]))


def test_without_the_shares_the_ranks_would_not_equal_one_process(two_process_results):
    # the mutant that averages the ranks' means (slices of 4 and 3, 2 and 1 at the ends of
    # the epochs) is far from one process: the equality tests above can fail
    ranks, _ = two_process_results
    method, options, kw = CASES["mlc_fast"]
    one = _state(_train(method, options, World(), **kw))
    assert not _close(ranks[0]["unweighted"]["params"], one["params"], tol=1e-6)


def test_a_killed_two_process_run_resumes_exactly(two_process_results):
    ranks, _ = two_process_results
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"]["params"], r["uninterrupted"]["params"]))
        assert torch.equal(r["resumed"]["T"], r["uninterrupted"]["T"])


def test_resuming_with_another_number_of_processes_is_refused(two_process_results):
    _, out = two_process_results
    with pytest.raises(CheckpointError, match="2 process"):
        _train("mlc", {"t_update": "v1", "update_every": 1}, World(), epochs=3, checkpoint=out / "ckpt.pt",
               resume=True)


def test_world_of_one_is_the_plain_path():
    a = _state(_train("mlc", {"t_update": "v1", "update_every": 1}, World(0, 1)))
    b = _state(_train("mlc", {"t_update": "v1", "update_every": 1}, World()))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])) and torch.equal(a["T"], b["T"])


@pytest.mark.parametrize("n, size", [(10, 2), (7, 2), (1, 2), (5, 3), (0, 2)])
def test_shards_tile_the_batch_contiguously(n, size):
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert np.sum(sizes) == n


def test_torchrun_metacorrect_train_equals_one_process(tmp_path):
    import json
    import subprocess
    common = ["train", "--dataset", "digits", "--noise", "flip", "--strength", "0.6", "--trusted", "0.1",
              "--method", "mlc", "--epochs", "1", "--seed", "0", "--device", "cpu", "--threads", "1"]
    launcher_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_vars}, "OMP_NUM_THREADS": "1"}
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "metacorrect", *common, "--out", str(tmp_path / "two")],
                [sys.executable, "-m", "metacorrect", *common, "--out", str(tmp_path / "one")]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    two, one = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["final_test_acc"] == one["final_test_acc"]
    assert np.allclose(np.load(tmp_path / "two" / "T.npy"), np.load(tmp_path / "one" / "T.npy"), atol=1e-6)
