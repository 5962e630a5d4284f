"""Diagnostic for the label-error benchmark: how much of the F1 gap is T̂, how much the network.

Rescores finished MLC runs of ``benchmarks/label_errors.py`` (``RUNS_DIR/CASE/mlc``) with the
default scorer twice, once with the run's T̂ and once with the true T of its noisy labels
(``labels.npz``'s ``T_true``: an oracle no user has), and prints precision, recall, F1 and
AUROC beside the network's plain "argmax ≠ given". It trains nothing and chooses nothing;
it only explains a result.

    python benchmarks/label_errors_oracle_t.py --cases cifar10n-worse cifar10n-aggre \\
        --runs-dir runs/label_errors6 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np

from label_errors import auroc, case_folder, flag_metrics
from metacorrect.errors.run_folder import load_run
from metacorrect.errors.scoring import find_label_errors
from metacorrect.errors.variants import scorer_probs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    for case in args.cases:
        folder = case_folder(args.runs_dir, case) / "mlc"
        run = load_run(folder, data_dir=args.data_dir)
        with np.load(folder / "labels.npz") as z:
            if "T_true" not in z.files:
                raise SystemExit(f"{folder}/labels.npz holds no T_true: this diagnostic needs known noise")
            T_true = z["T_true"]
        probs = scorer_probs(run, "model", device="cpu").probs
        truth = run.y_clean != run.y_noisy
        print(f"{case}: the network's accuracy on the clean labels of the scored examples "
              f"{(probs.argmax(1) == run.y_clean).mean():.3f}")
        for name, T in (("T̂ (the run's)", run.T), ("true T (oracle)", T_true)):
            e = find_label_errors(probs, run.y_noisy, T)
            prec, rec, f1 = flag_metrics(e.is_suspected, truth)
            print(f"  {name:16s} P {prec:.3f} R {rec:.3f} F1 {f1:.3f} AUROC {auroc(e.error_probability, truth):.3f}")
        prec, rec, f1 = flag_metrics(probs.argmax(1) != run.y_noisy, truth)
        print(f"  {'argmax ≠ given':16s} P {prec:.3f} R {rec:.3f} F1 {f1:.3f}")


if __name__ == "__main__":
    main()
