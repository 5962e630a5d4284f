"""The ``sweep`` and ``report`` commands (registered by :func:`metacorrect.cli.build_parser`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SWEEP_HELP = """\
Run a grid of experiments (datasets × noise types × strengths × trusted fractions × methods
× seeds) into a sweep folder with a results database (results.sqlite). Killed at any
moment, the same command resumes: finished runs are skipped, an interrupted run continues
from its checkpoint. Then `metacorrect report OUT` writes the tables and figures.

CONFIG is a TOML file or a shipped preset: {presets}.
Overrides: --set epochs=2 --set methods=ce,mlc --set strengths=[0.0,0.5]
--set method_options.mlc.update_every=5 (see metacorrect/experiments/config.py)."""


def add_commands(sub) -> None:
    from .config import preset_names
    p = sub.add_parser("sweep", help="run a grid of experiments, resumably, into a results database",
                       description=SWEEP_HELP.format(presets=", ".join(preset_names())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="a sweep TOML file or a preset name")
    p.add_argument("--out", default=None, help="sweep folder (default sweeps/<name>)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel, one process each (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: CPU cores / workers). On a shared or busy "
                        "machine use 1: more threads than free cores can make small models 10x slower")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of CONFIG (repeatable)")
    p.add_argument("--data-dir", default=None, help="data root (default: $METACORRECT_DATA, else "
                                                    "~/.local/share/metacorrect/data)")
    p.add_argument("--limit", type=int, default=None, help="run at most N runs now, then stop (resume later); 0 runs none but still tidies the database "
                        "(interrupted runs back to pending, log folded in, compacted: e.g. after a kill, before committing it)")
    p.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="leave runs that failed earlier as failed")
    p.add_argument("--rerun-changed", action="store_true",
                   help="run again the runs recorded with other settings than CONFIG now gives them")
    p.add_argument("--discard-models", action="store_true", help="delete each run's model.pt once recorded")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables (Markdown, HTML, CSV) and figures of a sweep folder",
                       description="Write the GLC-style table (mean test error over strengths per noise type × "
                                   "trusted fraction, one column per method), error-versus-strength curves, true "
                                   "beside estimated T heatmaps and time per run, as Markdown, an HTML page with "
                                   "PNG figures, and CSV of every number. Figures need matplotlib: "
                                   "pip install 'metacorrect[report]'.")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a folder written by `metacorrect sweep`")
    p.add_argument("--out", default=None, help="report folder (default SWEEP_DIR/report)")
    p.add_argument("--no-figures", action="store_true", help="tables only (no matplotlib needed)")
    p.set_defaults(func=cmd_report)


def cmd_sweep(args) -> int:
    from .config import SweepConfigError, load_sweep_config
    from .sweep import run_sweep
    try:
        config = load_sweep_config(args.config, args.overrides)
    except SweepConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    specs = config.runs()
    if args.dry_run:
        for s in specs:
            print(s.run_id)
        print(f"{len(specs)} runs", file=sys.stderr)
        return 0
    out = Path(args.out or f"sweeps/{config.name}")
    t0 = time.perf_counter()
    try:
        result = run_sweep(config, out, workers=args.workers, data_dir=args.data_dir, limit=args.limit,
                           threads=args.threads, retry_failed=args.retry_failed, rerun_changed=args.rerun_changed,
                           keep_models=not args.discard_models)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are in {out / 'results.sqlite'}; run the same command again to resume "
              f"(the interrupted run continues from its last finished epoch)", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    print(f"\nsweep {config.name}: {result['done']}/{result['total']} runs done, {result['failed']} failed, "
          f"{result['pending'] + result['running']} left ({wall:.0f}s in this call). "
          f"Tables and figures: metacorrect report {out}")
    for run_id, last in result["failed_runs"][:10]:
        print(f"  failed: {run_id}: {last[0] if last else ''}", file=sys.stderr)
    if result["failed"]:
        print(f"  ({result['failed']} failed; their tracebacks are in the database's runs.error; running the "
              f"same command again retries them)", file=sys.stderr)
    return 1 if result["failed"] else 0


def cmd_report(args) -> int:
    from ..report import write_report
    paths = write_report(args.sweep_dir, args.out, figures=not args.no_figures)
    print(f"report of {args.sweep_dir}: {paths['html']} ({paths['markdown'].name}, "
          f"{len(paths['csv'])} CSV files, {len(paths['figures'])} figures) in {paths['html'].parent}")
    return 0
