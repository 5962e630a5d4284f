"""In-sample bias, measured: which probabilities and which flagging rule should
``metacorrect errors`` use by default? On the embedded digits (cheap: minutes on 2 cores).

    python benchmarks/label_error_variants.py                      # the grid below, 3 seeds
    python benchmarks/label_error_variants.py --seeds 0 --epochs 10

For every setting × seed: the library's default MLC run (``keep_train_probs``) and its
scorers — ``model`` (the final network on its own training examples, in-sample),
``averaged`` (softmax averaged over the last ``--avg-epochs`` epochs, in-sample), ``crossfit``
(K-fold cross-fitting, out-of-sample, K more trainings) — each with the rules ``count``
(as many per given label as T̂ and the priors say are wrong) and ``threshold``
(error probability > 0.5, the default), plus ``expected`` for reference (the top ⌊Σ error probability⌉
examples overall: the count the per-example posterior itself implies). Scored against the
true labels: F1 of the flagged set and AUROC. Writes ``--out`` (CSV of every row) and a
Markdown table of the means beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_errors import auroc, flag_metrics  # noqa: E402

from metacorrect.data import load_dataset  # noqa: E402
from metacorrect.errors import find_label_errors  # noqa: E402
from metacorrect.errors.run_folder import load_run  # noqa: E402
from metacorrect.errors.variants import scorer_probs  # noqa: E402
from metacorrect.experiments.run import RunConfig, run_experiment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [("flip", 0.2), ("flip", 0.4), ("uniform_mix", 0.3), ("uniform_mix", 0.6), ("flip", 0.6)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 30], help="epochs per phase (several: each)")
    p.add_argument("--trusted", type=float, default=0.1)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--avg-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "label_error_variants"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_error_variants.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset("digits")
    rows = []
    for epochs in args.epochs:
        for noise, strength in SETTINGS:
            for seed in args.seeds:
                config = RunConfig(dataset="digits", noise=noise, strength=strength, trusted=args.trusted,
                                   method="mlc", epochs=epochs, seed=seed, device="cpu",
                                   keep_train_probs=args.avg_epochs)
                folder = Path(args.runs_dir) / f"e{epochs}-{noise}{strength:g}-s{seed}"
                run_experiment(config, folder, resume=True, dataset=ds)
                run = load_run(folder, dataset=ds)
                truth = run.y_clean != run.y_noisy
                for variant in ("model", "averaged", "crossfit"):
                    sp = scorer_probs(run, variant, folds=args.folds if variant == "crossfit" else None,
                                      device="cpu")
                    for rule in ("count", "threshold", "expected"):
                        e = find_label_errors(sp.probs, run.y_noisy, run.T,
                                              rule="threshold" if rule == "threshold" else "count")
                        flagged = e.is_suspected
                        if rule == "expected":
                            flagged = np.zeros_like(flagged)
                            flagged[e.order[:int(round(e.error_probability.sum()))]] = True
                        prec, rec, f1 = flag_metrics(flagged, truth)
                        rows.append({"epochs": epochs, "noise": noise, "strength": strength, "seed": seed,
                                     "variant": variant, "rule": rule, "precision": prec, "recall": rec, "f1": f1,
                                     "auroc": auroc(e.error_probability, truth), "true_errors": int(truth.sum()),
                                     "flagged": int(flagged.sum()),
                                     "train_seconds": run.train_seconds + sp.extra_train_seconds})
                print(f"e{epochs} {noise} {strength} seed {seed}: " + " ".join(
                    f"{r['variant']}/{r['rule']} {r['f1']:.3f}" for r in rows[-9:]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    os.replace(tmp, out)
    lines = ["# Label-error scorers on the embedded digits: in-sample bias and flagging rules\n",
             f"`python benchmarks/label_error_variants.py {' '.join(sys.argv[1:])}`; MLC default, trusted "
             f"{args.trusted:g}, seeds {args.seeds}; mean over seeds. F1 of the flagged set / AUROC of the error "
             f"probability, against the true labels.\n"]
    for epochs in args.epochs:
        lines.append(f"## {epochs} epochs per phase\n")
        combos = [(v, r) for v in ("model", "averaged", "crossfit") for r in ("count", "threshold", "expected")]
        lines.append("| setting | " + " | ".join(f"{v}/{r}" for v, r in combos) + " |")
        lines.append("|---|" + "---:|" * len(combos))
        for noise, strength in SETTINGS + [("mean (diagonal-dominant)", None)]:
            cells = []
            for v, r in combos:
                sel = [x for x in rows if x["epochs"] == epochs and x["variant"] == v and x["rule"] == r
                       and ((x["noise"], x["strength"]) == (noise, strength) if strength is not None
                            else (x["noise"], x["strength"]) != ("flip", 0.6))]
                cells.append(f"{np.mean([x['f1'] for x in sel]):.3f} / {np.mean([x['auroc'] for x in sel]):.3f}")
            name = f"{noise} {strength:g}" if strength is not None else noise
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    md = out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
