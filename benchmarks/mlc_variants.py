"""Compare MLC option sets on one cell of a sweep preset, choosing on clean validation data.

    python benchmarks/mlc_variants.py twitter --noise flip --strength 0.5 --trusted 0.05 \
        --variant default --variant meta_lr_schedule=cosine --variant t_init=glc \
        --data-dir ../shared/data --out /tmp/mlc_variants

Each variant is a comma-separated list of MLC options (``default``: the preset's own) laid
over the preset's ``[method_options.mlc]``. A fraction ``--validation`` of the trusted set
is held out (clean labels, never trained on) and the table ranks the variants by its
accuracy: the test column is printed for the record, **not** for choosing. Run folders go
under ``--out``; a finished variant is read back, not rerun, so the script resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from metacorrect.experiments.config import SweepConfigError, load_sweep_config, parse_override
from metacorrect.experiments.run import RunConfig, run_experiment
from metacorrect.train import CheckpointError


def parse_variant(text: str) -> dict:
    """``'default'`` → {}; ``'a=1,b=x'`` → {'a': 1, 'b': 'x'} (values read as ``--set`` reads them)."""
    if text == "default":
        return {}
    try:
        return {".".join(path): value for path, value in map(parse_override, text.split(","))}
    except SweepConfigError as e:
        sys.exit(f"variant {text!r}: {e}; expected KEY=VALUE items separated by commas, or 'default'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a sweep preset or TOML file (its run settings and MLC options are used)")
    ap.add_argument("--noise", default="flip")
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--trusted", type=float, default=0.05)
    ap.add_argument("--validation", type=float, default=0.2, help="fraction of the trusted set held out")
    ap.add_argument("--variant", action="append", default=[], help="MLC options KEY=VALUE[,...], or 'default'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="mlc_variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sweep = load_sweep_config(args.preset)
    base_options = dict(sweep.method_options.get("mlc", {}))
    dataset = sweep.grid["datasets"][0]
    rows = []
    for text in args.variant or ["default"]:
        options = {**base_options, **parse_variant(text)}
        config = RunConfig(**{**sweep.run, "dataset": dataset, "data_dir": args.data_dir, "noise": args.noise,
                              "strength": args.strength, "trusted": args.trusted, "validation": args.validation,
                              "method": "mlc", "method_options": options, "seed": args.seed})
        folder = Path(args.out) / f"{dataset}-{args.noise}-s{args.strength:g}-t{args.trusted:g}-{text}".replace("/", "_")
        try:
            summary = run_experiment(config, folder, resume=True)
        except CheckpointError:  # a checkpoint of another configuration (a default changed): start over
            summary = run_experiment(config, folder, resume=False)
        rows.append((text, summary))
        print(f"{text}: val {summary['final_val_acc']:.4f} test {summary['final_test_acc']:.4f} "
              f"T error {summary['t_error']:.3f} ({summary['wall_s']:.0f} s)", flush=True)
    print(f"\n{dataset}, {args.noise} s={args.strength:g}, trusted {args.trusted:g} "
          f"({args.validation:g} of it held out for validation), seed {args.seed}; ranked by validation accuracy")
    print("| variant | val acc | test acc | T error | s |\n|---|---:|---:|---:|---:|")
    for text, s in sorted(rows, key=lambda r: -r[1]["final_val_acc"]):
        print(f"| {text} | {100 * s['final_val_acc']:.2f} | {100 * s['final_test_acc']:.2f} | "
              f"{s['t_error']:.3f} | {s['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
