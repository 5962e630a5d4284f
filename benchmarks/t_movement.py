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
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path

from metacorrect.experiments.store import load_json


def rows_of(db: Path) -> tuple[dict, dict]:
    """``{(noise, trusted): ([start], [end])}`` for MLC and ``{(noise, trusted): [t_error]}`` for GLC."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    mlc, glc = defaultdict(lambda: ([], [])), defaultdict(list)
    for noise, trusted, method, epochs, t_error in con.execute(
            "SELECT noise, trusted, method, epochs_json, t_error FROM runs "
            "WHERE status = 'done' AND method IN ('mlc', 'glc') AND t_error IS NOT NULL"):
        if method == "glc":
            glc[(noise, trusted)].append(t_error)
            continue
        phase = [e for e in load_json(epochs) or [] if e.get("phase") == "mlc" and e.get("t_error") is not None]
        if phase:
            mlc[(noise, trusted)][0].append(phase[0]["t_error"])
            mlc[(noise, trusted)][1].append(t_error)
    con.close()
    return mlc, glc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep folders (each holding results.sqlite)")
    args = ap.parse_args()
    print("| sweep | noise | trusted | runs | MLC start | MLC end | end − start | GLC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for folder in args.sweeps:
        db = Path(folder) / "results.sqlite"
        if not db.is_file():
            raise SystemExit(f"{db}: no results database there (expected a sweep folder)")
        mlc, glc = rows_of(db)
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
