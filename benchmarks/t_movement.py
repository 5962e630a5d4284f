"""How far MLC's T moves from where it starts, read from committed sweep databases.

    python benchmarks/t_movement.py benchmarks/sweeps/mnist benchmarks/sweeps/twitter \
        benchmarks/sweeps/sst benchmarks/sweeps/fashion-mnist

For every row of a grid (noise, trusted fraction), the mean T error (mean row L1 distance
to the T that made the noise) of MLC's T at the start of its MLC phase (the first MLC
epoch's record: T is held for the phase's first 30 %, so this is the estimate phase's GLC
estimate it starts from), of its final T, and of GLC's final T, over the strengths of the
row. It answers whether the meta-learning moves T toward the truth, or whether the start
decides the T error. Runs whose records lack a phase (older algorithm versions that start
from the identity) are skipped. Reads only; trains nothing.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from metacorrect.report.tables import load_results


def rows_of(sweep_dir: Path) -> tuple[dict, dict]:
    """``{(noise, trusted): ([start], [end])}`` for MLC and ``{(noise, trusted): [t_error]}`` for GLC,
    from the finished runs of the methods' current algorithm versions (the report's
    :func:`~metacorrect.report.tables.load_results` names older versions' runs ``mlc@vK``)."""
    mlc, glc = defaultdict(lambda: ([], [])), defaultdict(list)
    for run in load_results(sweep_dir).done:
        if run["t_error"] is None:
            continue
        cell = (run["noise"], run["trusted"])
        if run["method"] == "glc":
            glc[cell].append(run["t_error"])
        elif run["method"] == "mlc":
            phase = [e for e in run["epochs"] or [] if e.get("phase") == "mlc" and e.get("t_error") is not None]
            if phase:
                mlc[cell][0].append(phase[0]["t_error"])
                mlc[cell][1].append(run["t_error"])
    return mlc, glc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep folders (each holding results.sqlite)")
    args = ap.parse_args()
    print("| sweep | noise | trusted | runs | MLC start | MLC end | end − start | GLC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for folder in args.sweeps:
        try:
            mlc, glc = rows_of(Path(folder))
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        starts, ends, glcs = [], [], []
        for (noise, trusted), (start, end) in sorted(mlc.items()):
            g = glc.get((noise, trusted), [])
            starts += start
            ends += end
            glcs += g
            glc_cell = f"{statistics.mean(g):.3f}" if g else "—"
            print(f"| {Path(folder).name} | {noise} | {100 * trusted:g} % | {len(start)} | {statistics.mean(start):.3f} "
                  f"| {statistics.mean(end):.3f} | {statistics.mean(end) - statistics.mean(start):+.3f} | {glc_cell} |")
        if starts:
            print(f"| **{Path(folder).name}** | all | | {len(starts)} | **{statistics.mean(starts):.3f}** "
                  f"| **{statistics.mean(ends):.3f}** | {statistics.mean(ends) - statistics.mean(starts):+.3f} "
                  f"| **{statistics.mean(glcs):.3f}** |")


if __name__ == "__main__":
    main()
