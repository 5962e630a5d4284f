"""MLC on MNIST under GLC's setting, three seeds, final-epoch test accuracy (issue: MLC).

Setting: MLP 784-128-128-10, Adam lr 1e-3, weight decay 1e-6, batch 32 (trusted batch 32),
10 epochs, 5 % trusted, seeds 0, 1, 2. Two noise settings:

* flip s = 0.6       — bar: MLC mean ≥ 94 %, plain cross-entropy < 50 %;
* uniform_mix s = 0.8 — bar: MLC mean ≥ cross-entropy mean + 3 points and ≥ trusted-only mean.

Every run goes through :func:`metacorrect.experiments.run_experiment`, exactly as
``metacorrect train`` does, so ``metacorrect train --dataset mnist --noise flip --strength 0.6
--trusted 0.05 --method mlc --epochs 10 --seed 0 --data-dir DATA`` gives the same number as
this script's seed-0 row. Run folders go to ``--runs`` and are resumed, so an interrupted
benchmark continues where it stopped.

    python benchmarks/mlc_mnist.py --data-dir ../shared/data [--set update_every=1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from metacorrect.cli import _options
from metacorrect.data import load_dataset
from metacorrect.experiments import RunConfig, run_experiment

SETTINGS = [("flip", 0.6, ("mlc", "ce")), ("uniform_mix", 0.8, ("mlc", "ce", "trusted_only"))]
SEEDS = (0, 1, 2)


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(here.parent.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(here / "runs" / "mlc_mnist"))
    parser.add_argument("--results", default=str(here / "results" / "mlc_mnist"))
    parser.add_argument("--set", dest="mlc_options", action="append", metavar="KEY=VALUE",
                        help="an MLC option (e.g. update_every=1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: as fast for this small MLP, and robust on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mlc_options = _options(args.mlc_options, "--set")

    dataset = load_dataset("mnist", args.data_dir)
    rows = []
    for noise, strength, methods in SETTINGS:
        for method in methods:
            for seed in args.seeds:
                cfg = RunConfig(dataset="mnist", data_dir=args.data_dir, noise=noise, strength=strength,
                                trusted=0.05, method=method, model="mlp", optimizer="adam", lr=1e-3,
                                weight_decay=1e-6, batch_size=32, epochs=10, seed=seed, device="cpu",
                                method_options=mlc_options if method == "mlc" else {})
                out = Path(args.runs) / f"{noise}{strength:g}-{method}-s{seed}"
                t0 = time.perf_counter()
                summary = run_experiment(cfg, out, resume=True, dataset=dataset)
                print(f"{noise} s={strength:g} {method:12} seed {seed}: test acc {100 * summary['final_test_acc']:.2f}%"
                      f"  t_error {summary['t_error'] if summary['t_error'] is None else round(summary['t_error'], 3)}"
                      f"  ({summary['wall_s']:.0f}s run, {time.perf_counter() - t0:.0f}s now)", flush=True)
                rows.append({"noise": noise, "strength": strength, "method": method, "seed": seed,
                             "test_acc": summary["final_test_acc"], "t_error": summary["t_error"],
                             "wall_s": summary["wall_s"]})

    lines = ["| noise | method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | mean wall s |",
             "|---|---|" + "---|" * (len(args.seeds) + 2)]
    means = {}
    for noise, strength, methods in SETTINGS:
        for method in methods:
            sel = [r for r in rows if r["noise"] == noise and r["method"] == method]
            mean = statistics.mean(r["test_acc"] for r in sel)
            means[noise, method] = mean
            lines.append(f"| {noise} s={strength:g} | {method} | "
                         + " | ".join(f"{100 * r['test_acc']:.2f}" for r in sel)
                         + f" | **{100 * mean:.2f}** | {statistics.mean(r['wall_s'] for r in sel):.0f} |")
    checks = [
        ("flip 0.6: MLC mean >= 94 %", means["flip", "mlc"] >= 0.94),
        ("flip 0.6: CE mean < 50 %", means["flip", "ce"] < 0.50),
        ("uniform_mix 0.8: MLC >= CE + 3 points", means["uniform_mix", "mlc"] >= means["uniform_mix", "ce"] + 0.03),
        ("uniform_mix 0.8: MLC >= trusted only", means["uniform_mix", "mlc"] >= means["uniform_mix", "trusted_only"]),
    ]
    table = "\n".join(lines) + "\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks)
    print("\n" + table)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(f"MLC options: {json.dumps(mlc_options) or '{}'} (others default)\n\n"
                                          + table + "\n")
    results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
