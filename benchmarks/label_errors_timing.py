"""The label-error benchmark's time ratio, measured fairly: both sides' trainings interleaved in one process.

``benchmarks/label_errors.py`` times each side's trainings when it runs them, one side after the
other, so the machine's load can differ between the sides (on a shared VM it moved MNIST's ratio
from 0.49 to 0.81 between sessions). This script repeats only the trainings, alternating the
sides round by round (ours first in odd rounds, cleanlab's first in even ones), and prints every
round's ratio and their median, in process CPU seconds:

* ours: the default MLC run of the case (``label_errors.case_config``);
* cleanlab's: the 5 cross-entropy trainings on 4/5 of the noisy and trusted examples each.

Nothing is scored; the trainings go to a temporary folder and are removed.

    python benchmarks/label_errors_timing.py --cases mnist-flip0.3 mnist-uniform_mix0.6 --rounds 3 \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from label_errors import CASES, case_config, train_cleanlab_folds
from metacorrect.data import load_dataset
from metacorrect.errors.run_folder import load_run, training_seconds
from metacorrect.experiments.run import run_experiment


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", required=True, choices=list(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--avg-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.cases:
        config = case_config(name, args)
        ds = load_dataset(config.dataset, config.data_dir)
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            split = {}  # the first MLC run, whose split cleanlab's side trains on

            def ours(r: int) -> float:
                folder = Path(tmp) / f"mlc-{r}"
                seconds = training_seconds(run_experiment(config, folder, dataset=ds))
                split.setdefault("run", load_run(folder, dataset=ds))
                return seconds

            def theirs(r: int) -> float:
                return sum(seconds for *_, seconds in train_cleanlab_folds(
                    config, ds, split["run"], Path(tmp) / f"cleanlab-{r}", args.folds, args.seed))

            for r in range(args.rounds):  # round 1 (r = 0) makes the split, so ours goes first
                if r % 2 == 0:
                    a, b = ours(r), theirs(r)
                else:
                    b, a = theirs(r), ours(r)
                ratios.append(a / b)
                print(f"{name} round {r + 1}: ours {a:.1f} s, cleanlab's {b:.1f} s, ratio {a / b:.3f}", flush=True)
        print(f"{name}: median ratio {statistics.median(ratios):.3f} over {len(ratios)} rounds "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)


if __name__ == "__main__":
    main()
