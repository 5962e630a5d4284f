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
--set method_options.mlc.update_every=5 (see metacorrect/experiments/config.py).

Launchers: --launcher pool (default) runs --workers processes here. --launcher slurm
submits the runs not done yet as one Slurm job array through submitit
(pip install 'metacorrect[cluster]'), e.g.
  metacorrect sweep cifar10 --launcher slurm --gpus-per-run 1 --cpus-per-run 8 \
      --mem 32G --time 4:00:00 --partition gpu --max-parallel 16
each run writing OUT/runs/<run_id>/result.json; `--collect` (or any later sweep or report
call) merges them into results.sqlite. --launcher local runs the same jobs on this
machine through submitit's local executor and waits for them."""


from .cluster import LAUNCHERS  # noqa: E402  (no heavy imports: submitit loads only when a launcher runs)

CLUSTER_FLAGS = ("max_parallel", "gpus_per_run", "cpus_per_run", "mem", "time", "partition", "account")


def add_commands(sub) -> None:
    from .config import preset_names
    p = sub.add_parser("sweep", help="run a grid of experiments, resumably, into a results database",
                       description=SWEEP_HELP.format(presets=", ".join(preset_names())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="a sweep TOML file or a preset name")
    p.add_argument("--out", default=None, help="sweep folder (default sweeps/<name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="--launcher pool: runs in parallel, one process each (default 1)")
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
    p.add_argument("--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
                   help="TensorBoard event files for every run: RUN_DIR/tensorboard, or DIR/<run_id> "
                        "(pip install 'metacorrect[tensorboard]'; then tensorboard --logdir OUT/runs)")
    g = p.add_argument_group("launchers (submitit: pip install 'metacorrect[cluster]')")
    g.add_argument("--launcher", choices=LAUNCHERS, default="pool",
                   help="pool: --workers processes here (default); slurm: one Slurm job array; local: the same "
                        "jobs through submitit's local executor, here")
    g.add_argument("--collect", action="store_true",
                   help="merge the result files of finished runs into results.sqlite and exit (one writer; "
                        "safe to run while jobs run)")
    g.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="runs at a time (the job array's %%CAP; local: jobs at a time, default 1)")
    g.add_argument("--gpus-per-run", type=int, default=None, metavar="N", help="GPUs of one run (0 or 1)")
    g.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                   help="CPU cores of one run (also its torch threads)")
    g.add_argument("--mem", default=None, help="memory of one run, Slurm's format (16G, 500M)")
    g.add_argument("--time", default=None, help="wall-clock limit of one run, Slurm's format (90, 4:00:00, 1-12); "
                                                "required for slurm")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--account", default=None, help="Slurm account")
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
    if args.collect:
        return _collect(out)
    options = None
    flags = {k: getattr(args, k) for k in CLUSTER_FLAGS}
    if args.launcher == "pool":
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        if given:
            print(f"error: {', '.join(given)} apply to --launcher slurm or local (submitit jobs); the process pool "
                  f"takes --workers and --threads", file=sys.stderr)
            return 2
    else:
        from .cluster import ClusterOptionError, ClusterOptions, check_launcher
        if args.workers is not None:
            print(f"error: --workers applies to --launcher pool; with --launcher {args.launcher} use --max-parallel",
                  file=sys.stderr)
            return 2
        try:
            options = ClusterOptions.build(args.launcher, config.cluster, flags)
            check_launcher(options)
        except (ClusterOptionError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.tensorboard:
        from ..tensorboard_logger import require_tensorboard
        require_tensorboard()
    t0 = time.perf_counter()
    try:
        if options is None:
            result = run_sweep(config, out, workers=args.workers or 1, data_dir=args.data_dir, limit=args.limit,
                               threads=args.threads, retry_failed=args.retry_failed,
                               rerun_changed=args.rerun_changed, keep_models=not args.discard_models,
                               tensorboard=args.tensorboard)
        else:
            from .cluster import run_cluster_sweep
            result = run_cluster_sweep(config, out, options, data_dir=args.data_dir, limit=args.limit,
                                       threads=args.threads, retry_failed=args.retry_failed,
                                       rerun_changed=args.rerun_changed, keep_models=not args.discard_models,
                                       tensorboard=args.tensorboard)
            if options.launcher == "slurm":
                return _report_submission(args, config, out, result, options)
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


def _collect(out: Path) -> int:
    from .collect import merge_results
    from .store import ResultsStore, db_path
    if not db_path(out).exists():
        print(f"error: no results database at {db_path(out)}: run the sweep (it registers the runs) before "
              f"--collect", file=sys.stderr)
        return 2
    merged = merge_results(out)
    with ResultsStore(db_path(out)) as store:
        counts = store.counts()
    print(f"merged {merged['done']} finished and {merged['failed']} failed run(s) into {db_path(out)}: "
          f"{counts['done']}/{counts['total']} done, {counts['failed']} failed, "
          f"{counts['pending'] + counts['running']} left")
    return 0


def _report_submission(args, config, out: Path, result: dict, options) -> int:
    sub = result.get("submitted") or {}
    command = f"metacorrect sweep {args.config} --out {out} --collect"
    if not sub:
        print(f"\nsweep {config.name}: nothing to submit ({result['done']}/{result['total']} runs done, "
              f"{result['failed']} failed).")
        return 0
    cap = options.max_parallel
    print(f"\nsubmitted {len(sub['runs'])} run(s) as Slurm job {sub['job_id']}"
          + (f" (at most {cap} at a time)" if cap else "")
          + f"; job logs in {out / 'submitit'}. Each run writes {out}/runs/<run_id>/result.json; merge the "
            f"finished ones into results.sqlite with\n  {command}\n(any later sweep or report call merges "
            f"too; running the sweep command again resubmits only unfinished runs)")
    return 0


def cmd_report(args) -> int:
    from ..report import write_report
    paths = write_report(args.sweep_dir, args.out, figures=not args.no_figures)
    print(f"report of {args.sweep_dir}: {paths['html']} ({paths['markdown'].name}, "
          f"{len(paths['csv'])} CSV files, {len(paths['figures'])} figures) in {paths['html'].parent}")
    return 0
