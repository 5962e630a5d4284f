"""Whole-run cost of two methods on one sweep cell, side by side: MLC (all its phases)
against GLC (both of its phases), each run in its own process with one torch thread, in
interleaved rounds; the figure is the process CPU time (user + system) of each run, and
the ratio is taken per round and as the ratio of medians.

    python benchmarks/run_cost.py mnist --noise flip --strength 0.6 --trusted 0.01 \
        --methods glc mlc --rounds 3 --data-dir ../shared/data

The cell's settings are the preset's (``[run]`` and ``[method_options]``), as a sweep
would run it. Run folders go to a temporary directory and are deleted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from metacorrect.experiments.config import load_sweep_config
from metacorrect.experiments.run import RunConfig, run_experiment
a = json.loads(sys.argv[1])
sweep = load_sweep_config(a["preset"])
config = RunConfig(**{**sweep.run, "dataset": sweep.grid["datasets"][0], "data_dir": a["data_dir"],
                      "noise": a["noise"], "strength": a["strength"], "trusted": a["trusted"],
                      "method": a["method"], "method_options": sweep.method_options.get(a["method"], {}),
                      "seed": a["seed"], "device": "cpu"})
s = run_experiment(config, a["out"])
print(json.dumps({"test_acc": s["final_test_acc"], "t_error": s["t_error"], "wall_s": s["wall_s"]}))
"""


def child_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--noise", default="flip")
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--trusted", type=float, default=0.01)
    ap.add_argument("--methods", nargs=2, default=["glc", "mlc"], help="baseline, then the method compared")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    cpu = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.methods if r % 2 == 0 else args.methods[::-1]  # alternate who goes first
            for m in order:
                spec = {"preset": args.preset, "data_dir": args.data_dir, "noise": args.noise,
                        "strength": args.strength, "trusted": args.trusted, "method": m, "seed": args.seed,
                        "out": str(Path(tmp) / f"{m}-{r}")}
                before = child_cpu_seconds()
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1]
                cpu[m].append(child_cpu_seconds() - before)
                info = json.loads(out)
                print(f"round {r + 1} {m}: {cpu[m][-1]:.1f} s CPU, test acc {100 * info['test_acc']:.2f} %, "
                      f"T error {info['t_error'] if info['t_error'] is None else round(info['t_error'], 3)}",
                      flush=True)
    base, other = args.methods
    ratios = [o / b for o, b in zip(cpu[other], cpu[base])]
    print(f"\n{args.preset} {args.noise} s={args.strength:g} trusted {args.trusted:g}, {args.rounds} rounds, "
          f"one thread, process CPU time")
    print(f"| method | median CPU s | runs |\n|---|---:|---|")
    for m in args.methods:
        print(f"| {m} | {statistics.median(cpu[m]):.1f} | {', '.join(f'{x:.1f}' for x in cpu[m])} |")
    print(f"\n{other} / {base}: median of per-round ratios {statistics.median(ratios):.3f} "
          f"({', '.join(f'{x:.3f}' for x in ratios)}); ratio of medians "
          f"{statistics.median(cpu[other]) / statistics.median(cpu[base]):.3f}")


if __name__ == "__main__":
    main()
