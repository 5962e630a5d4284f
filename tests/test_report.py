"""Reports: a tiny sweep's HTML page, figures and CSV files exist and agree with its database."""

from __future__ import annotations

import csv
import json
import sqlite3
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from metacorrect.experiments.config import load_sweep_config, sweep_config_from_dict
from metacorrect.experiments.store import DB_NAME, ResultsStore, load_json
from metacorrect.experiments.sweep import run_sweep
from metacorrect.report import CSV_FILES, write_report

SWEEP = """\
name = "tiny-report"
description = "a tiny sweep for the report tests"
notes = "tiny grids, one epoch"
[grid]
datasets = ["digits"]
noises = ["uniform_mix", "flip"]
strengths = [0.0, 0.5]
trusted = [0.1]
methods = ["trusted_only", "ce", "glc"]
seeds = [0, 1]
[run]
epochs = 1
batch_size = 64
[published]
source = "made-up numbers for a test"
label = "GLC"
[published.digits]
ce = 12.5
glc = 3.0
confusion = 7.0
"""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    import torch
    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "sweep.toml").write_text(SWEEP)
    out = tmp / "sweep"
    # a third of the runs, then the rest: the report of a partial sweep first
    cfg = load_sweep_config(tmp / "sweep.toml")
    try:
        run_sweep(cfg, out, threads=1, limit=4, log=lambda m: None)
        partial = write_report(out, tmp / "partial")
        assert "†" in partial["markdown"].read_text()
        result = run_sweep(cfg, out, threads=1, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert result["done"] == result["total"] == 2 * 2 * 3 * 2
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def db_rows(sweep: Path) -> list[dict]:
    con = sqlite3.connect(str(sweep / DB_NAME))
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM runs WHERE status = 'done'")]
    con.close()
    return rows


def test_report_files_exist_and_agree_with_the_database(sweep_dir):
    paths = write_report(sweep_dir)
    folder = sweep_dir / "report"
    assert paths["html"] == folder / "index.html" and paths["markdown"] == folder / "report.md"
    for name in CSV_FILES:
        assert (folder / name).exists(), name
    html = paths["html"].read_text()
    md = paths["markdown"].read_text()
    assert html.startswith("<!DOCTYPE html>") and "</html>" in html

    # figures: every one exists, is a PNG, and the page shows it
    assert paths["figures"]
    kinds = {p.name.split("-")[0] for p in paths["figures"]}
    assert kinds == {"curve", "T", "time"}
    for fig in paths["figures"]:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="figures/{fig.name}"' in html
        assert f"(figures/{fig.name})" in md
    assert len([p for p in paths["figures"] if p.name.startswith("curve")]) == 2  # one per noise × trusted

    rows = db_rows(sweep_dir)
    # runs.csv: one line per run, same numbers as the database
    runs = {r["run_id"]: r for r in read_csv(folder / "runs.csv")}
    assert set(runs) == {r["run_id"] for r in rows}
    for r in rows:
        assert float(runs[r["run_id"]]["test_error"]) == pytest.approx(r["test_error"], abs=1e-12)
        assert runs[r["run_id"]]["status"] == "done"

    # auc.csv: mean over strengths, then over seeds, recomputed from the database
    per = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per[(r["noise"], r["trusted"], r["method"])][r["seed"]].append(100 * r["test_error"])
    auc = read_csv(folder / "auc.csv")
    row_recs = [a for a in auc if a["kind"] == "row"]
    assert len(row_recs) == len(per) == 2 * 3
    for a in row_recs:
        seeds = per[(a["noise"], float(a["trusted"]), a["method"])]
        means = [statistics.fmean(v) for v in seeds.values()]
        assert float(a["mean_error"]) == pytest.approx(statistics.fmean(means))
        assert float(a["std"]) == pytest.approx(statistics.stdev(means))
        assert a["n_seeds"] == "2" and a["n_strengths"] == "2" and a["complete"] == "True"
        # the Markdown table shows the same number
        assert f"{float(a['mean_error']):.1f} ± {float(a['std']):.1f}" in md
    for a in (a for a in auc if a["kind"] == "mean"):
        mine = [float(b["mean_error"]) for b in row_recs if b["method"] == a["method"]]
        assert float(a["mean_error"]) == pytest.approx(statistics.fmean(mine))

    # curves.csv: one point per noise × trusted × method × strength
    curves = read_csv(folder / "curves.csv")
    assert len(curves) == 2 * 3 * 2
    for c in curves:
        errs = [100 * r["test_error"] for r in rows if r["noise"] == c["noise"] and r["method"] == c["method"]
                and r["strength"] == float(c["strength"])]
        assert float(c["test_error"]) == pytest.approx(statistics.fmean(errs))

    # T.csv holds every estimated and true matrix; t_error.csv the mean errors
    T = read_csv(folder / "T.csv")
    glc = [r for r in rows if r["method"] == "glc"]
    assert len([t for t in T if t["matrix"] == "estimated"]) == len(glc) * 100
    some = glc[0]
    T_hat = load_json(some["T_hat_json"])
    assert float(next(t["value"] for t in T if t["run_id"] == some["run_id"] and t["matrix"] == "estimated"
                      and t["row"] == "3" and t["col"] == "4")) == pytest.approx(T_hat[3][4])
    t_err = read_csv(folder / "t_error.csv")
    assert {t["method"] for t in t_err} == {"glc"}

    # epochs.csv: every epoch of every run
    epochs = read_csv(folder / "epochs.csv")
    assert len(epochs) == sum(len(load_json(r["epochs_json"])) for r in rows)

    # timing
    timing = {t["method"]: t for t in read_csv(folder / "timing.csv")}
    for m in ("trusted_only", "ce", "glc"):
        walls = [r["wall_s"] for r in rows if r["method"] == m]
        assert int(timing[m]["runs"]) == len(walls)
        assert float(timing[m]["mean_train_s"]) == pytest.approx(statistics.fmean(walls))

    # published numbers beside ours, labelled
    pub = read_csv(folder / "published.csv")
    assert {(p["method"], float(p["mean_error"])) for p in pub} == {("ce", 12.5), ("glc", 3.0), ("confusion", 7.0)}
    assert "| digits | published | (GLC) | — | 12.5 | 3.0 |" in md
    assert '<tr class="published"><td>digits</td><td>published</td>' in html
    assert "made-up numbers for a test" in md and "Confusion matrix 7.0" in md
    # the settings the runs recorded
    assert '"anchor_percentile"' in md or "glc:" in md


def test_report_without_matplotlib_is_a_clear_error(sweep_dir, tmp_path, monkeypatch, capsys):
    from metacorrect.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from metacorrect.report.figures import ReportDependencyError
    with pytest.raises(ReportDependencyError, match=r"pip install 'metacorrect\[report\]'"):
        write_report(sweep_dir, tmp_path / "r1")
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "r2")]) == 2
    assert "metacorrect[report]" in capsys.readouterr().err
    # tables alone need no matplotlib
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "r3"), "--no-figures"]) == 0
    assert (tmp_path / "r3" / "index.html").exists() and not (tmp_path / "r3" / "figures").exists()


def test_report_of_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is it a sweep folder"):
        write_report(tmp_path)


def test_label_set_table_mean_and_std_over_seeds(tmp_path):
    """Real noisy labels (CIFAR-10N style): accuracy per label set × method, mean ± std over seeds
    (rows written straight into a database: no training needed)."""
    cfg = sweep_config_from_dict({"name": "real", "grid": {"datasets": ["digits"], "label_sets": ["aggre", "worse"],
                                                          "trusted": [50], "methods": ["ce", "mlc"], "seeds": [0, 1]}})
    specs = cfg.runs()
    assert all(s.config.label_set in ("aggre", "worse") and s.config.trusted == 50 for s in specs)
    acc = {}
    with ResultsStore(tmp_path / DB_NAME, create=True) as store:
        store.register(specs)
        store.set_meta("config", cfg.to_dict())
        for i, s in enumerate(specs):
            row = store.claim("w")
            acc[row["run_id"]] = 0.5 + 0.01 * i
            store.finish(row["run_id"], row["claim"], {"test_acc": acc[row["run_id"]],
                                                       "test_error": 1 - acc[row["run_id"]], "wall_s": 1.0,
                                                       "run_wall_s": 1.5})
    paths = write_report(tmp_path, figures=False)
    table = read_csv(tmp_path / "report" / "label_sets.csv")
    assert len(table) == 4
    for t in table:
        vals = [100 * a for run_id, a in acc.items() if f"-{t['label_set']}-" in run_id
                and f"-{t['method']}-" in run_id]
        assert float(t["test_acc"]) == pytest.approx(statistics.fmean(vals))
        assert float(t["std"]) == pytest.approx(statistics.stdev(vals))
        assert t["n_seeds"] == "2"
    md = paths["markdown"].read_text()
    assert "Real noisy labels: test accuracy (%)" in md
    first = next(t for t in table if t["label_set"] == "aggre" and t["method"] == "ce")
    assert f"{float(first['test_acc']):.2f} ± {float(first['std']):.2f} (2)" in md
    assert read_csv(tmp_path / "report" / "auc.csv") == []


def test_option_sets_that_differ_only_by_later_defaults_are_one_setting():
    from metacorrect.methods import create_method
    from metacorrect.report.tables import SweepResults, method_options_by_method, same_method_settings

    now = create_method("mlc").options()
    before = {k: v for k, v in now.items() if k not in ("meta_scope", "meta_jvp")}  # options added since
    before["T"] = None  # an option dropped since, recorded at None
    assert same_method_settings(before, now, now)
    assert not same_method_settings(before, {**now, "meta_lr": now["meta_lr"] * 2}, now)
    assert not same_method_settings(before, {**now, "meta_scope": "head"}, now)  # added, but not at its default
    assert not same_method_settings({**before, "T": [[1.0]]}, now, now)  # dropped, but it was set
    assert not same_method_settings(before, now, None)  # unknown method: only equal sets match

    def row(opts):
        return {"status": "done", "test_error": 0.1, "method": "mlc", "resolved": {"method_options": opts}}

    other = {**now, "meta_lr": now["meta_lr"] * 2}
    results = SweepResults(Path("."), {}, [row(before), row(now), row(other)])
    variants = method_options_by_method(results)["mlc"]
    assert variants == [now, other]  # the record spelled as the method is now is kept


def test_runs_of_an_older_algorithm_version_are_reported_apart_under_their_own_name():
    from metacorrect.methods import create_method
    from metacorrect.report.tables import auc_table, method_label, versioned_method

    now = create_method("mlc").options()
    v1 = {k: v for k, v in now.items() if k not in ("t_update", "t_blocks", "z_crit", "t_warmup")}  # before t_update
    assert versioned_method("mlc", now) == "mlc" and versioned_method("mlc", v1) == "mlc@v1"
    assert versioned_method("mlc", {**now, "t_update": "v1"}) == "mlc@v1"
    # version 2: the tested rule from the last estimate epoch, recorded before estimate_patience existed
    v2 = {k: v for k, v in now.items() if k not in ("estimate_patience", "estimate_holdout", "estimate_epochs",
                                                     "trusted_weight")}
    assert versioned_method("mlc", v2) == "mlc@v2" and method_label("mlc@v2") == "MLC (v2)"
    assert versioned_method("mlc", {**now, "estimate_patience": 0, "estimate_holdout": 0.0}) == "mlc@v2"
    assert versioned_method("glc", create_method("glc").options()) == "glc"
    assert method_label("mlc@v1") == "MLC (v1)"

    def row(opts, strength, err):
        return {"status": "done", "test_error": err, "method": versioned_method("mlc", opts), "dataset": "d",
                "noise": "flip", "trusted": 0.1, "seed": 0, "strength": strength, "label_set": None,
                "resolved": {"method_options": opts}}

    from metacorrect.report.tables import SweepResults
    results = SweepResults(Path("."), {"grid": {"methods": ["mlc"], "strengths": [0.0, 0.5]}},
                           [row(v1, 0.0, 0.4), row(v1, 0.5, 0.6), row(now, 0.0, 0.1)])
    assert results.methods() == ["mlc", "mlc@v1"]
    rows = {r["method"]: r for r in auc_table(results) if r["kind"] == "row"}
    assert rows["mlc@v1"]["mean_error"] == pytest.approx(50.0) and rows["mlc"]["mean_error"] == pytest.approx(10.0)
