"""Wall time per epoch of MLC relative to plain cross-entropy, and MLC's accuracy, on the
MNIST setting of the MLC issue (GLC's): MLP 784-128-128-10, Adam lr 1e-3, weight decay
1e-6, batch 32 (trusted batch 32), 5 % trusted, seed 0.

    # per-epoch time ratio, CE and MLC configurations interleaved epoch by epoch in one process
    python benchmarks/epoch_cost.py timing --configs update_every=1 update_every=8 --rounds 3
    # final test accuracy after 10 epochs (one full run per configuration and noise setting)
    python benchmarks/epoch_cost.py accuracy --configs update_every=8 --noise flip:0.6 uniform_mix:0.8

A configuration is a space-free list of MLC options, ``key=value[,key=value...]``
(``default`` = MLC's defaults). ``ce`` is the ``ce`` method: all training data (noisy and
trusted batches interleaved) in batches of 32, so its epoch has ~5 % more steps than an MLC
epoch (one per noisy batch, each paired with a trusted batch).

Timing: each round runs one epoch of CE and one epoch of every configuration, each through
``fit(..., epochs=1)`` on its own model and optimizer that carry over between rounds (T
restarts every epoch: irrelevant to the time); the reported time is the median ``epoch_s``
(the training loop only, no evaluation), or with ``--clock cpu`` the process's CPU time
for the epoch (use with ``--threads 1`` on a loaded machine: wall time then measures the
other processes as much as this one).
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from metacorrect.data import load_dataset, make_problem
from metacorrect.models import create_model
from metacorrect.train import TensorBatchLoader, fit

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = os.environ.get("METACORRECT_DATA", str(HERE.parent.parent / "shared" / "data"))


def parse_config(text: str) -> tuple[str, dict]:
    if text in ("ce", "default"):
        return text, {}
    opts = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key] = value
    return text, opts


def setting(ds, noise: str, strength: float, seed: int):
    p = make_problem(ds, noise, strength, 0.05, seed=seed)
    xn, yn = p.tensors("noisy")
    xt, yt = p.tensors("trusted")
    xs, ys = p.tensors("test")
    return p, (xn, yn), (xt, yt), (xs, ys)


def new_run(ds, seed: int):
    torch.manual_seed(seed)
    model = create_model("mlp", ds.input_shape, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    return model, opt


def run_fit(model, opt, noisy, trusted, name, opts, epochs, seed, test=None, T_true=None, callbacks=()):
    nl = TensorBatchLoader(*noisy, 32, seed=seed + 1)
    tl = TensorBatchLoader(*trusted, 32, seed=seed + 2)
    method = "ce" if name == "ce" else "mlc"
    te = TensorBatchLoader(*test, 1000, shuffle=False) if test is not None else None
    return fit(model, opt, nl, tl, method, epochs=epochs, num_classes=10, test_loader=te, T_true=T_true,
               device="cpu", seed=seed, callbacks=callbacks, **opts)


def header(args):
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()}")


def timing(args, ds):
    _, noisy, trusted, _ = setting(ds, args.noise[0].split(":")[0], float(args.noise[0].split(":")[1]), args.seed)
    configs = [("ce", {})] + [parse_config(c) for c in args.configs]
    runs = {name: new_run(ds, args.seed) for name, _ in configs}
    times = {name: [] for name, _ in configs}
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
        for name, opts in order:
            model, opt = runs[name]
            marks = []
            t0 = time.process_time()
            r = run_fit(model, opt, noisy, trusted, name, opts, 1, args.seed + rnd,
                        callbacks=[lambda m: marks.append(time.process_time())])
            times[name].append(r.history[-1]["epoch_s"] if args.clock == "wall" else marks[0] - t0)
            print(f"  round {rnd + 1}: {name:40s} {times[name][-1]:7.2f} s", flush=True)
    ce = statistics.median(times["ce"])
    print(f"\nper-epoch {'wall' if args.clock == 'wall' else 'CPU'} time, median of {args.rounds} interleaved rounds "
          f"({args.noise[0]}, seed {args.seed}); "
          f"load average after {os.getloadavg()}")
    print("  × CE: ratio of the medians; paired: median over rounds of (this epoch / the CE epoch of the same round)")
    print(f"  {'configuration':40s} {'s/epoch':>8s} {'× CE':>6s} {'paired':>6s}   all epochs (s)")
    for name, _ in configs:
        med = statistics.median(times[name])
        paired = statistics.median(t / c for t, c in zip(times[name], times["ce"]))
        print(f"  {name:40s} {med:8.2f} {med / ce:6.2f} {paired:6.2f}   {' '.join(f'{t:.2f}' for t in times[name])}")


def accuracy(args, ds):
    rows = []
    for spec in args.noise:
        noise, strength = spec.split(":")
        p, noisy, trusted, test = setting(ds, noise, float(strength), args.seed)
        for name, opts in [parse_config(c) for c in args.configs]:
            model, opt = new_run(ds, args.seed)
            t = time.perf_counter()
            r = run_fit(model, opt, noisy, trusted, name, opts, args.epochs, args.seed, test=test, T_true=p.T_true,
                        callbacks=[lambda m: print(f"    {m['epoch']:2d} acc {m.get('test_acc', 0):.4f} "
                                                   f"t_error {m.get('t_error', float('nan')):.3f} "
                                                   f"{m['epoch_s']:6.2f} s", flush=True)])
            acc = r.history[-1]["test_acc"]
            per_epoch = statistics.median(h["epoch_s"] for h in r.history)
            rows.append((spec, name, acc, per_epoch, time.perf_counter() - t))
            print(f"  {spec} {name}: test accuracy {acc:.4f}, median epoch {per_epoch:.2f} s", flush=True)
    print(f"\nfinal test accuracy after {args.epochs} epochs, seed {args.seed}; load average after {os.getloadavg()}")
    print(f"  {'noise':16s} {'configuration':40s} {'accuracy':>8s} {'s/epoch':>8s}")
    for spec, name, acc, per_epoch, _ in rows:
        print(f"  {spec:16s} {name:40s} {acc * 100:7.2f}% {per_epoch:8.2f}")


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("timing", "accuracy"))
    ap.add_argument("--configs", nargs="+", default=["default"])
    ap.add_argument("--noise", nargs="+", default=["flip:0.6"], help="noise:strength, e.g. flip:0.6 uniform_mix:0.8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="timing: wall = fit's epoch_s; cpu = the process's CPU time for the epoch "
                         "(robust to other processes' load with --threads 1)")
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header(args)
    ds = load_dataset("mnist", args.data_dir)
    (timing if args.what == "timing" else accuracy)(args, ds)


if __name__ == "__main__":
    main()
