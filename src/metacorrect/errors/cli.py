"""``metacorrect errors RUN_DIR``: suspected label errors of a finished run (argument parsing
and the order of the steps only; the work is in the sibling modules).

Everything is loaded, checked and computed before the first file is written, so a refused
run or bad input leaves the run folder as it was (cross-fitting's fold runs, ``--folds``,
are training output and are kept for resuming).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .variants import DEFAULT_VARIANT, VARIANTS

HELP = "suspected label errors of a finished run, from its model and T: a CSV, pages and a summary"

EPILOG = """\
The posterior of the true class given the input and the given label is
P(true = i | x, given = j) ∝ p(i | x) · T[i, j] (the run's network and T.npy, T[i, j] =
P(given = j | true = i)). The CSV (default RUN_DIR/label_errors.csv) lists every non-trusted
training example, highest error probability first: index (its row in your data), path (image
folders), given_label, suggested_label, given_name/suggested_name (named classes),
error_probability = 1 − P(true = given | x, given) and is_suspected (0/1). Works for runs of
mlc (default rule), glc, confusion, forward, forward_gold, forward_true; a run whose T is not a
noise model (MLC with t_update=released, t_space=logits or reset_each_step) is refused."""


def add_command(sub) -> None:
    p = sub.add_parser("errors", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run folder of `metacorrect train`")
    p.add_argument("--dataset", default=None, help="dataset name or path (default: the one the run names)")
    p.add_argument("--data-dir", default=None, help="data root (default: the run's, else $METACORRECT_DATA, ...)")
    p.add_argument("--out", default=None, help="CSV file (default RUN_DIR/label_errors.csv)")
    p.add_argument("--probs", default=None, choices=VARIANTS,
                   help=f"where p(true | x) comes from: model (the final network, in-sample), averaged (the mean "
                        f"over the last epochs, train_probs.npy of a run trained with --keep-train-probs N), "
                        f"crossfit (--folds K). Default: {DEFAULT_VARIANT} (measured: README)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="K-fold cross-fitting: K trainings of the run's configuration, each predicting its held-out "
                        "fold (out-of-sample; resumable, in RUN_DIR/crossfit-K/)")
    p.add_argument("--rule", default="threshold", choices=["threshold", "count"],
                   help="which examples are flagged: threshold (default: error_probability > --threshold) or count "
                        "(as many per given label as T̂ and the class priors say are wrong, most probable first)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="the threshold rule's cut on error_probability (default 0.5: more likely wrong than right)")
    p.add_argument("--export-pred-probs", default=None, metavar="FILE.npz",
                   help="also write pred_probs, labels and index for cleanlab (plus T and cleanlab's noise_matrix)")
    p.add_argument("--no-pages", action="store_true", help="skip label_errors.html/.md and the figure")
    p.add_argument("--top", type=int, default=48, help="suspected errors shown on the pages (default 48)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=cmd_errors)


def cmd_errors(args) -> int:
    from .output import atomic_write_bytes, csv_text, export_pred_probs, summary_text
    from .pages import THUMBS_DIR, build_pages, commit_files
    from .run_folder import load_run
    from .scoring import find_label_errors
    from .variants import scorer_probs

    run = load_run(args.run_dir, dataset=args.dataset, data_dir=args.data_dir)
    out = Path(args.out) if args.out else run.path / "label_errors.csv"
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    if args.export_pred_probs is not None and not str(args.export_pred_probs).endswith(".npz"):
        raise ValueError(f"--export-pred-probs expects a file name ending in .npz, got {args.export_pred_probs!r}")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    variant = args.probs or ("crossfit" if args.folds is not None else DEFAULT_VARIANT)
    if variant == "crossfit" and args.folds is None:
        raise ValueError("--probs crossfit needs --folds K (K >= 2)")
    sp = scorer_probs(run, variant, folds=args.folds, device=args.device, log=lambda s: print(s, flush=True))
    errors = find_label_errors(sp.probs, run.y_noisy, run.T, rule=args.rule, threshold=args.threshold)
    index, paths = run.source_index(), run.source_paths()
    names = run.class_names

    head = (f"metacorrect errors: {run.path} ({run.method} on {run.config.dataset}); scored the "
            f"{errors.num_examples:,} non-trusted training examples with {sp.description}; T̂ = {run.path / 'T.npy'}")
    body = summary_text(errors, names, y_clean=run.y_clean)
    text = csv_text(errors, index, names, paths)
    pages, note = ({}, None)
    if not args.no_pages:
        pages, note = build_pages(errors, index, names, title=f"Suspected label errors: {run.path.name}",
                                  summary=head + "\n" + body, images=run.dataset.x_train, image_rows=run.noisy_idx,
                                  paths=paths, top=args.top)
    # everything computed: now write
    atomic_write_bytes(out, text.encode())
    written = [out]
    if args.export_pred_probs is not None:
        written.append(export_pred_probs(args.export_pred_probs, sp.probs, errors, index))
    if pages:
        written += commit_files(run.path, pages, replace_dirs=(THUMBS_DIR,))
    print(head)
    print(body)
    if note:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
