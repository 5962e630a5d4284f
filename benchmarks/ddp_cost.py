"""Time per training step on 1 against N processes (CPU, gloo; or one GPU per process).

    python benchmarks/ddp_cost.py --procs 1 2 --steps 40 --warmup 10 --batch 128

Each configuration spawns its processes, trains MLC (exact meta step every iteration,
``t_update='v1'`` so T moves every step) and plain cross-entropy on a synthetic
MNIST-sized problem (784 inputs, GLC's MLP 784-128-128-10) with the *global* batch
``--batch`` split across the ranks, and reports the median time per step on rank 0 (each
process pinned to ``--threads`` torch threads), with the share spent in the all-reduces
(the synchronised gradient of the real step, and the meta step's three reductions),
measured by timing each collective. The all-reduce volume per step is printed from the
model's size: the exact meta step moves two parameter-sized vectors plus C², the real step
one more parameter-sized vector.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, size, port, args, out):
    from metacorrect import distributed
    from metacorrect.distributed import World
    from metacorrect.train import TensorBatchLoader, fit
    torch.set_num_threads(args.threads)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    world = World(rank, size)
    comm = [0.0]
    inner = World.all_reduce

    def timed(self, tensors):
        t0 = time.perf_counter()
        r = inner(self, tensors)
        comm[0] += time.perf_counter() - t0
        return r

    World.all_reduce = timed
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + args.warmup)
    x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    results = {}
    for method, options in (("ce", {}), ("mlc", {"t_update": "v1", "update_every": 1})):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        times = []
        stamp = [time.perf_counter()]
        comm[0] = 0.0
        comms = []

        class Clock:  # one step = one progress call
            def __call__(self, step, total, label):
                now = time.perf_counter()
                times.append(now - stamp[0])
                comms.append(comm[0])
                comm[0] = 0.0
                stamp[0] = now

        noisy = TensorBatchLoader(x, y, args.batch, seed=1, world=world)
        trusted = TensorBatchLoader(x[: args.batch * 4], y[: args.batch * 4], args.batch, seed=2, world=world)
        fit(model, torch.optim.Adam(model.parameters(), 1e-3), noisy, trusted, method, epochs=1, num_classes=10,
            device="cpu", world=world, progress=Clock() if rank == 0 else None, **options)
        if rank == 0:
            steady = times[args.warmup:]
            results[method] = (statistics.median(steady), statistics.median(comms[args.warmup:]))
    # the other way to synchronise a real step: torch's DistributedDataParallel wrapper, which
    # all-reduces inside backward (bucketed, overlapped); for MLC it would cost one more forward
    # of the noisy slice per meta step (the fast path's forward runs outside the wrapper)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    net = torch.nn.parallel.DistributedDataParallel(model) if size > 1 else model
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = TensorBatchLoader(x, y, args.batch, seed=1, world=world)
    times, fwd = [], []
    for xb, yb in loader:
        t0 = time.perf_counter()
        logits = net(xb)
        t1 = time.perf_counter()
        loss = nn.functional.cross_entropy(logits, yb) * (world.size * loader.last_count[0] / loader.last_count[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        fwd.append(t1 - t0)
    if rank == 0:
        results["ce_ddp_wrapper"] = (statistics.median(times[args.warmup:]), 0.0)
        results["forward"] = (statistics.median(fwd[args.warmup:]), 0.0)
        torch.save(results, out)
    distributed.shutdown(world)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    params = 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    print(f"MLP 784-128-128-10: {params} parameters ({4 * params / 1e6:.2f} MB in float32); all-reduced per MLC "
          f"step: meta 2 x {4 * params / 1e6:.2f} MB + 400 B, real step {4 * params / 1e6:.2f} MB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.procs:
            out = os.path.join(tmp, f"r{size}.pt")
            mp.spawn(_run, args=(size, _free_port(), args, out), nprocs=size, join=True)
            rows.append((size, torch.load(out)))
    base = dict(rows).get(1)
    print(f"\nglobal batch {args.batch}, {args.threads} thread(s) per process, median of {args.steps} steps "
          f"after {args.warmup}")
    print("| processes | CE ms/step (all-reduce after backward) | CE ms/step (DDP wrapper) | forward ms | "
          "MLC ms/step | MLC / CE | MLC in all-reduce ms (incl. waiting) | MLC speed-up vs 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, r in rows:
        ce, mlc = r["ce"][0] * 1e3, r["mlc"][0] * 1e3
        speedup = f"{base['mlc'][0] / r['mlc'][0]:.2f}x" if base else "-"
        print(f"| {size} | {ce:.2f} | {r['ce_ddp_wrapper'][0] * 1e3:.2f} | {r['forward'][0] * 1e3:.2f} | {mlc:.2f} | "
              f"{mlc / ce:.2f}x | {r['mlc'][1] * 1e3:.2f} | {speedup} |")


if __name__ == "__main__":
    main()
