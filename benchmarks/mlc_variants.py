"""Compare MLC option sets on cells of a sweep preset, choosing on clean validation data.

    python benchmarks/mlc_variants.py twitter --noise flip --strength 0.5 --trusted 0.05 \
        --variant default --variant meta_lr_schedule=cosine --variant t_init=glc \
        --data-dir ../shared/data --out /tmp/mlc_variants

    # pooled over cells and seeds, GLC beside for reference
    python benchmarks/mlc_variants.py sst --cell flip:0.3:0.01 --cell flip:0.3:0.05 \
        --seeds 0 1 --baseline glc --variant default --variant estimate_patience=0 \
        --data-dir ../shared/data --out /tmp/mlc_variants_sst

Each variant is a comma-separated list of MLC options (``default``: the preset's own) laid
over the preset's ``[method_options.mlc]``. A fraction ``--validation`` of the trusted set
is held out (clean labels, never trained on) and the table ranks the variants by its
accuracy: the test column is printed for the record, **not** for choosing. With several
cells (``--cell NOISE:STRENGTH:TRUSTED``, repeated; the default is the one cell of
``--noise/--strength/--trusted``) or seeds, each variant's row pools them: the accuracies
are means over the runs, and ``val SE`` is the standard error of the variant's validation
accuracy *paired* with the first variant's, run by run (the first variant's own row shows
the unpaired SE). ``--baseline METHOD`` adds rows of other methods (GLC, say) run on the
same splits, for reference. Run folders go under ``--out``; a finished run is read back,
not rerun, so the script resumes.
"""

from __future__ import annotations

import argparse
import statistics
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


def parse_cell(text: str) -> tuple[str, float, float]:
    """``'flip:0.3:0.01'`` → ('flip', 0.3, 0.01)."""
    try:
        noise, strength, trusted = text.split(":")
        return noise, float(strength), float(trusted)
    except ValueError:
        sys.exit(f"cell {text!r}: expected NOISE:STRENGTH:TRUSTED, for example flip:0.3:0.01")


def paired_se(values: list[float], reference: list[float]) -> float:
    """The standard error of the mean of ``values − reference`` (one pair per run)."""
    diffs = [v - r for v, r in zip(values, reference)]
    return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a sweep preset or TOML file (its run settings and MLC options are used)")
    ap.add_argument("--noise", default="flip")
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--trusted", type=float, default=0.05)
    ap.add_argument("--cell", action="append", default=[], help="NOISE:STRENGTH:TRUSTED (repeatable)")
    ap.add_argument("--validation", type=float, default=0.2, help="fraction of the trusted set held out")
    ap.add_argument("--variant", action="append", default=[], help="MLC options KEY=VALUE[,...], or 'default'")
    ap.add_argument("--baseline", action="append", default=[], help="another method run on the same splits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds (overrides --seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="mlc_variants")
    args = ap.parse_args()
    if not 0 < args.validation < 1:  # the variants are ranked by validation accuracy: there must be some
        ap.error(f"--validation must be a fraction of the trusted set in (0, 1), got {args.validation:g}")
    torch.set_num_threads(args.threads)

    sweep = load_sweep_config(args.preset)
    dataset = sweep.grid["datasets"][0]
    cells = [parse_cell(c) for c in args.cell] or [(args.noise, args.strength, args.trusted)]
    seeds = args.seeds if args.seeds is not None else [args.seed]
    settings = [("mlc", text) for text in args.variant or ["default"]] + [(m, "default") for m in args.baseline]
    rows = []
    for method, text in settings:
        options = {**sweep.method_options.get(method, {}), **parse_variant(text)}
        label = text if method == "mlc" else method
        summaries = []
        for noise, strength, trusted in cells:
            for seed in seeds:
                config = RunConfig(**{**sweep.run, "dataset": dataset, "data_dir": args.data_dir, "noise": noise,
                                      "strength": strength, "trusted": trusted, "validation": args.validation,
                                      "method": method, "method_options": options, "seed": seed})
                name = f"{dataset}-{noise}-s{strength:g}-t{trusted:g}-{label}" + (f"-seed{seed}" if seed else "")
                folder = Path(args.out) / name.replace("/", "_")
                try:
                    summary = run_experiment(config, folder, resume=True)
                except CheckpointError:  # a checkpoint of another configuration (a default changed): start over
                    summary = run_experiment(config, folder, resume=False)
                summaries.append(summary)
                t_err = summary["t_error"]
                print(f"{name}: val {summary['final_val_acc']:.4f} test {summary['final_test_acc']:.4f} "
                      f"T error {'-' if t_err is None else f'{t_err:.3f}'} ({summary['wall_s']:.0f} s)", flush=True)
        rows.append((label, summaries))

    where = (f"{cells[0][0]} s={cells[0][1]:g}, trusted {cells[0][2]:g}" if len(cells) == 1
             else f"{len(cells)} cells ({', '.join(':'.join(f'{v:g}' if isinstance(v, float) else v for v in c) for c in cells)})")
    print(f"\n{dataset}, {where}, seeds {' '.join(map(str, seeds))} ({args.validation:g} of the trusted set held out "
          f"for validation); ranked by validation accuracy, pooled over {len(cells) * len(seeds)} run(s)")
    print("| variant | val acc | val SE | test acc | T error | s |\n|---|---:|---:|---:|---:|---:|")
    reference = [s["final_val_acc"] for s in rows[0][1]]

    def mean(summaries, key):
        values = [s[key] for s in summaries if s.get(key) is not None]
        return statistics.fmean(values) if values else None

    for i, (label, summaries) in sorted(enumerate(rows), key=lambda r: -mean(r[1][1], "final_val_acc")):
        val = [s["final_val_acc"] for s in summaries]
        se = (statistics.stdev(val) / len(val) ** 0.5 if len(val) > 1 else float("nan")) if i == 0 \
            else paired_se(val, reference)
        t_err = mean(summaries, "t_error")
        print(f"| {label} | {100 * mean(summaries, 'final_val_acc'):.2f} | {100 * se:.2f} | "
              f"{100 * mean(summaries, 'final_test_acc'):.2f} | {'-' if t_err is None else f'{t_err:.3f}'} | "
              f"{sum(s['wall_s'] for s in summaries):.0f} |")


if __name__ == "__main__":
    main()
