"""Reports of sweeps: ``write_report(SWEEP_DIR)`` (the ``metacorrect report`` command).

Writes into ``SWEEP_DIR/report/`` (or ``out``):

* ``report.md`` and ``index.html`` — GLC's table (mean test error over the corruption
  strengths per dataset × noise type × trusted fraction, one column per method, the mean
  over the rows, and published numbers where the sweep's configuration gives them,
  labelled "published"), the real-noisy-label table (CIFAR-10N: test accuracy per label
  set × method, mean ± std over seeds), T estimation errors, time per run, the figures;
* ``figures/*.png`` — error-versus-strength curves, true beside estimated T heatmaps,
  time per run (matplotlib: ``pip install 'metacorrect[report]'``);
* CSV of every number: ``runs.csv`` (one row per run), ``auc.csv``, ``curves.csv``,
  ``label_sets.csv``, ``t_error.csv``, ``timing.csv``, ``published.csv``, ``epochs.csv``
  (every epoch of every run) and ``T.csv`` (every entry of every true and estimated T).
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path

from .html import to_html, to_markdown
from .tables import (SweepResults, auc_table, curves, fmt_num, fmt_trusted, label_set_table, load_results,
                     method_label, method_options_by_method, method_sort_key, published_rows, t_error_table,
                     timing_table)

CSV_FILES = ("runs.csv", "auc.csv", "curves.csv", "label_sets.csv", "t_error.csv", "timing.csv", "published.csv",
             "epochs.csv", "T.csv")


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def _last_line(text) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def write_csvs(results: SweepResults, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in results.runs:
        resolved = r.get("resolved") or {}
        versions = r.get("versions") or {}
        runs.append({**{k: r[k] for k in ("run_id", "status", "dataset", "noise", "label_set", "strength", "trusted",
                                          "method", "seed", "test_acc", "test_error", "t_error", "wall_s",
                                          "run_wall_s", "attempts", "epochs_done", "fingerprint")},
                     "model": resolved.get("model"),
                     "method_options": json.dumps(resolved.get("method_options"), sort_keys=True)
                     if resolved.get("method_options") is not None else None,
                     "python": versions.get("python"), "torch": versions.get("torch"),
                     "metacorrect": versions.get("metacorrect"), "git": versions.get("git"),
                     "error": _last_line(r.get("error"))})
    paths = [_write_csv(folder / "runs.csv", runs,
                        ["run_id", "status", "dataset", "noise", "label_set", "strength", "trusted", "method", "seed",
                         "test_acc", "test_error", "t_error", "wall_s", "run_wall_s", "attempts", "epochs_done",
                         "model", "method_options", "fingerprint", "python", "torch", "metacorrect", "git", "error"])]
    paths.append(_write_csv(folder / "auc.csv", auc_table(results),
                            ["kind", "dataset", "noise", "trusted", "method", "mean_error", "std", "n_seeds",
                             "n_strengths", "complete"]))
    paths.append(_write_csv(folder / "curves.csv", curves(results),
                            ["dataset", "noise", "trusted", "method", "strength", "test_error", "std", "n_seeds"]))
    paths.append(_write_csv(folder / "label_sets.csv", label_set_table(results),
                            ["dataset", "label_set", "trusted", "method", "test_acc", "std", "n_seeds"]))
    paths.append(_write_csv(folder / "t_error.csv", t_error_table(results),
                            ["dataset", "noise", "trusted", "method", "mean_t_error", "n"]))
    paths.append(_write_csv(folder / "timing.csv", timing_table(results),
                            ["dataset", "method", "runs", "mean_train_s", "median_train_s", "max_train_s",
                             "mean_run_s", "total_run_s"]))
    paths.append(_write_csv(folder / "published.csv", published_rows(results),
                            ["dataset", "method", "mean_error", "source"]))
    epochs, keys = [], ["run_id"]
    for r in results.done:
        for m in r.get("epochs") or []:
            for k in m:
                if k not in keys:
                    keys.append(k)
            epochs.append({"run_id": r["run_id"], **m})
    paths.append(_write_csv(folder / "epochs.csv", epochs, keys))
    entries = []
    for r in results.done:
        for which, T in (("true", r.get("T_true")), ("estimated", r.get("T_hat"))):
            for i, row in enumerate(T or []):
                for j, v in enumerate(row):
                    entries.append({"run_id": r["run_id"], "matrix": which, "row": i, "col": j, "value": v})
    paths.append(_write_csv(folder / "T.csv", entries, ["run_id", "matrix", "row", "col", "value"]))
    return paths


def _cell(rec, expected) -> str:
    text = fmt_num(rec["mean_error"])
    if rec.get("std") is not None:
        text += f" ± {fmt_num(rec['std'])}"
    if not rec["complete"]:
        text += "†"
    return text


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def build_document(results: SweepResults, figures: list[dict]) -> list:
    cfg = results.config
    counts = results.counts()
    methods = results.methods()
    blocks: list = [("h", 1, f"Sweep report: {cfg.get('name', results.sweep_dir.name)}")]
    if cfg.get("description"):
        blocks.append(("p", cfg["description"]))
    compute = sum(r["run_wall_s"] or 0 for r in results.runs if r["status"] in ("done", "failed"))
    starts = [r["claimed_at"] for r in results.runs if r.get("claimed_at")]
    ends = [r["finished_at"] for r in results.runs if r.get("finished_at")]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    versions = sorted({json.dumps({k: (r.get("versions") or {}).get(k) for k in ("python", "torch", "metacorrect",
                                                                                  "git")}, sort_keys=True)
                       for r in results.done})
    platforms = sorted({(r.get("versions") or {}).get("platform") for r in results.done} - {None})
    devices = sorted({str((r.get("resolved") or {}).get("device")) for r in results.done} - {"None"})
    blocks.append(("p", f"Runs: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
                        f"{counts.get('pending', 0) + counts.get('running', 0)} not yet run, of {counts['total']} "
                        f"(sweep folder {results.sweep_dir}; configuration: {cfg.get('source', '?')}). Compute: "
                        f"{_duration(compute)} of run time in total, {_duration(span)} of wall time from the "
                        f"first start to the last finish. Generated "
                        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."))
    if versions or platforms:
        blocks.append(("p", "Versions: " + "; ".join(
            ", ".join(f"{k} {v}" for k, v in json.loads(s).items() if v) for s in versions)
            + (f". Platform: {', '.join(platforms)}" if platforms else "")
            + (f". Device: {', '.join(devices)}" if devices else "") + "."))
    if cfg.get("notes"):
        blocks.append(("p", "Notes: " + cfg["notes"]))

    # ---- GLC table
    auc = auc_table(results)
    if auc:
        expected = results.expected_strengths()
        blocks.append(("h", 2, "Mean test error over corruption strengths (%) — GLC's area under the error curve"))
        blocks.append(("p", "Each cell: the test error after the last epoch, averaged over the corruption strengths "
                            + (f"({', '.join(f'{s:g}' for s in cfg['grid']['strengths'])})" if cfg.get("grid", {})
                               .get("strengths") else "") + " and then over seeds (± standard deviation over seeds "
                            "when there are several). Lower is better. The mean row averages a method's rows."))
        headers = ["dataset", "noise", "trusted"] + [method_label(m) for m in methods]
        table_methods = methods
        by_key = defaultdict(dict)
        for rec in auc:
            by_key[(rec["dataset"], rec["kind"], rec["noise"], rec["trusted"])][rec["method"]] = rec
        rows, notes = [], []
        partial = False
        pub = defaultdict(dict)
        for p in published_rows(results):
            pub[p["dataset"]][p["method"]] = p["mean_error"]
        datasets = sorted({rec["dataset"] for rec in auc})
        for ds in datasets:
            keys = sorted((k for k in by_key if k[0] == ds and k[1] == "row"), key=lambda k: (k[2], k[3]))
            for k in keys:
                row = [ds, k[2], fmt_trusted(k[3])]
                for m in table_methods:
                    rec = by_key[k].get(m)
                    row.append(_cell(rec, expected) if rec else "—")
                    partial |= bool(rec and not rec["complete"])
                rows.append(row)
            mean_key = (ds, "mean", "mean", None)
            if mean_key in by_key:
                row = [ds, "mean", "all"]
                for m in table_methods:
                    rec = by_key[mean_key].get(m)
                    row.append(_cell(rec, expected) if rec else "—")
                    partial |= bool(rec and not rec["complete"])
                rows.append(row)
            if ds in pub:
                label = results.published().get("label")
                rows.append([ds, "published", f"({label})" if label else ""]
                            + [fmt_num(pub[ds].get(m)) for m in table_methods])
        if partial:
            notes.append(f"† partial: not every strength ({expected or '?'} per row) or row has finished yet; the mean "
                         f"is over the runs done.")
        if pub:
            src = results.published().get("source", "")
            extra = sorted({m for d in pub.values() for m in d} - set(table_methods), key=method_sort_key)
            notes.append(f"published: {src}." + (f" Published methods not in this sweep: "
                                                   f"{', '.join(f'{method_label(m)} {pub[d][m]:.1f}' for d in pub for m in extra if m in pub[d])}."
                                                   if extra else ""))
        blocks.append(("table", headers, rows, notes))
        curve_figs = [f for f in figures if f["kind"] == "curve"]
        if curve_figs:
            blocks.append(("h", 3, "Test error versus corruption strength"))
            for f in curve_figs:
                blocks.append(("img", f"figures/{f['file']}",
                               f"{f['dataset']}, {f['noise']}, trusted {fmt_trusted(f['trusted'])}"))

    # ---- real noisy labels
    ls_rows = label_set_table(results)
    if ls_rows:
        blocks.append(("h", 2, "Real noisy labels: test accuracy (%)"))
        blocks.append(("p", "Each cell: the test accuracy after the last epoch, mean ± standard deviation over seeds "
                            "(number of seeds in brackets). Higher is better."))
        ls_methods = sorted({r["method"] for r in ls_rows}, key=method_sort_key)
        grouped = defaultdict(dict)
        for r in ls_rows:
            grouped[(r["dataset"], r["label_set"], r["trusted"])][r["method"]] = r
        rows = []
        for (ds, ls, trusted), by_m in grouped.items():
            row = [ds, ls, fmt_trusted(trusted)]
            for m in ls_methods:
                r = by_m.get(m)
                if r is None:
                    row.append("—")
                else:
                    row.append(fmt_num(r["test_acc"], 2) + (f" ± {fmt_num(r['std'], 2)}" if r["std"] is not None else "")
                               + f" ({r['n_seeds']})")
            rows.append(row)
        blocks.append(("table", ["dataset", "label set", "trusted"] + [method_label(m) for m in ls_methods], rows, []))

    # ---- T
    t_rows = t_error_table(results)
    if t_rows:
        blocks.append(("h", 2, "T estimation error"))
        blocks.append(("p", "Mean row L1 distance between the estimated T̂ and the true T (0 = exact, 2 = disjoint), "
                            "averaged over strengths, for the methods that estimate T."))
        t_methods = sorted({r["method"] for r in t_rows}, key=method_sort_key)
        grouped = defaultdict(dict)
        for r in t_rows:
            grouped[(r["dataset"], r["noise"], r["trusted"])][r["method"]] = r
        rows = [[ds, n, fmt_trusted(t)] + [fmt_num(by_m[m]["mean_t_error"], 3) if m in by_m else "—" for m in t_methods]
                for (ds, n, t), by_m in grouped.items()]
        blocks.append(("table", ["dataset", "noise", "trusted"] + [method_label(m) for m in t_methods], rows, []))
        t_figs = [f for f in figures if f["kind"] == "T"]
        if t_figs:
            blocks.append(("h", 3, "True T beside the estimates (rows = true class, T[i, j] = P(noisy = j | true = i))"))
            for f in t_figs:
                blocks.append(("img", f"figures/{f['file']}", f"{f['dataset']}, {f['noise']} s={f['strength']:g}, "
                                                               f"trusted {fmt_trusted(f['trusted'])}"))

    # ---- time
    timing = timing_table(results)
    if timing:
        blocks.append(("h", 2, "Time per run"))
        rows = [[t["dataset"], method_label(t["method"]), str(t["runs"]), fmt_num(t["mean_train_s"]),
                 fmt_num(t["median_train_s"]), fmt_num(t["max_train_s"]), fmt_num(t["mean_run_s"]),
                 _duration(t["total_run_s"] or 0)] for t in timing]
        blocks.append(("table", ["dataset", "method", "runs", "mean training s", "median", "max",
                                 "mean s incl. data prep", "total"], rows, []))
        for f in figures:
            if f["kind"] == "time":
                blocks.append(("img", f"figures/{f['file']}", f"{f['dataset']}: training time per run"))

    # ---- settings
    blocks.append(("h", 2, "Settings"))
    run = cfg.get("run", {})
    if run:
        blocks.append(("p", "Run settings: " + ", ".join(f"{k} = {v}" for k, v in run.items()) + "."))
    opts = method_options_by_method(results)
    if opts:
        lines = []
        for m in sorted(opts, key=method_sort_key):
            variants = opts[m]
            tag = "" if len(variants) == 1 else f"  ({len(variants)} different settings during the sweep!)"
            for v in variants:
                lines.append(f"{m}: {json.dumps(v, sort_keys=True)}{tag}")
        blocks.append(("p", "Resolved method options (defaults included) as the runs recorded them:"))
        blocks.append(("pre", "\n".join(lines)))
    failed = [r for r in results.runs if r["status"] == "failed"]
    if failed:
        blocks.append(("h", 2, "Failed runs"))
        blocks.append(("table", ["run", "error"], [[r["run_id"], _last_line(r["error"])] for r in failed], []))
    blocks.append(("p", "Every number above is in the CSV files beside this page: " + ", ".join(CSV_FILES) + "."))
    return blocks


def write_report(sweep_dir: str | Path, out: str | Path | None = None, *, figures: bool = True,
                 collect: bool = True) -> dict:
    """Write the report of a sweep folder; returns the paths written. With ``collect``, the
    result files of runs that finished since the last merge (cluster jobs) are merged into
    the database first (:func:`metacorrect.experiments.collect.merge_results`; skipped where
    the folder is read-only)."""
    if collect:
        from ..experiments.collect import merge_results
        try:
            merge_results(sweep_dir)
        except OSError:  # a read-only copy of a sweep folder: report what the database holds
            pass
    results = load_results(sweep_dir)
    folder = Path(out) if out is not None else Path(sweep_dir) / "report"
    figs = []
    if figures:
        from .figures import write_figures
        figs = write_figures(results, folder / "figures")
    csvs = write_csvs(results, folder)
    blocks = build_document(results, figs)
    md = folder / "report.md"
    md.write_text(to_markdown(blocks))
    page = folder / "index.html"
    page.write_text(to_html(blocks, f"metacorrect sweep report: {results.config.get('name', '')}"))
    return {"markdown": md, "html": page, "csv": csvs, "figures": [folder / "figures" / f["file"] for f in figs],
            "folder": folder}


__all__ = ["CSV_FILES", "build_document", "load_results", "write_csvs", "write_report"]
