"""Sweeps: configuration checks, grid order, the results database, and a sweep killed by
SIGKILL part-way that resumes to the same table as an uninterrupted (parallel) sweep."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metacorrect.experiments.config import (SweepConfigError, load_sweep_config, parse_override, preset_names)
from metacorrect.experiments.store import DB_NAME, ResultsStore, load_json

TINY = """\
name = "tiny"
[grid]
datasets = ["digits"]
noises = ["flip"]
strengths = [0.2, 0.6]
trusted = [0.1]
methods = ["ce", "mlc"]
seeds = [0]
[run]
epochs = 3
batch_size = 32
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- configuration

def test_presets_load_and_have_the_papers_settings():
    names = preset_names()
    for name in ("mnist", "fashion-mnist", "twitter", "sst", "cifar10", "cifar10-reduced", "cifar10n",
                 "cifar10n-reduced"):
        assert name in names
        load_sweep_config(name, check_datasets=True)
    mnist = load_sweep_config("mnist")
    assert mnist.grid["trusted"] == [0.001, 0.01, 0.05]
    assert mnist.grid["strengths"] == [round(0.1 * i, 10) for i in range(11)]
    assert mnist.grid["noises"] == ["uniform_mix", "flip"]
    assert mnist.run == {"model": "mlp", "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-6, "batch_size": 32,
                         "epochs": 10, "scheduler": "none"}
    assert mnist.published["mnist"]["glc"] == 5.0
    assert len(mnist.runs()) == 2 * 3 * 11 * 8
    cifar10n = load_sweep_config("cifar10n-reduced")
    assert cifar10n.grid["trusted"] == [1000] and set(cifar10n.grid["label_sets"]) == {"aggre", "worse", "random1"}
    assert all(s.config.label_set and s.config.trusted == 1000 for s in cifar10n.runs())
    assert len(cifar10n.grid["seeds"]) >= 2


def test_grid_order_finishes_whole_rows_first(tmp_path):
    cfg = load_sweep_config(write(tmp_path, TINY), ["noises=[\"uniform_mix\",\"flip\"]", "trusted=[0.05,0.1]"])
    runs = cfg.runs()
    assert [r.order for r in runs] == list(range(len(runs)))
    axes = [(r.config.noise, r.config.trusted, r.config.strength, r.config.method) for r in runs]
    # methods innermost, then strengths, then trusted, then noises
    assert axes[:4] == [("uniform_mix", 0.05, 0.2, "ce"), ("uniform_mix", 0.05, 0.2, "mlc"),
                        ("uniform_mix", 0.05, 0.6, "ce"), ("uniform_mix", 0.05, 0.6, "mlc")]
    assert axes[4][:2] == ("uniform_mix", 0.1) and axes[8][:2] == ("flip", 0.05)
    assert len({r.run_id for r in runs}) == len(runs)


def test_overrides(tmp_path):
    path = write(tmp_path, TINY)
    cfg = load_sweep_config(path, ["epochs=1", "methods=ce,glc", "grid.strengths=[0.0]", "run.lr=0.01",
                                   "method_options.mlc.update_every=3", "seeds=[1, 2]"])
    assert cfg.run["epochs"] == 1 and cfg.run["lr"] == 0.01
    assert cfg.grid["methods"] == ["ce", "glc"] and cfg.grid["strengths"] == [0.0] and cfg.grid["seeds"] == [1, 2]
    assert cfg.method_options == {"mlc": {"update_every": 3}}
    assert parse_override("strengths={start=0, stop=1, step=0.5}")[1] == {"start": 0, "stop": 1, "step": 0.5}
    assert load_sweep_config(path, ["strengths={start=0, stop=1, step=0.5}"]).grid["strengths"] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("text, overrides, message", [
    ("colour = 1\n" + TINY, [], "unknown key(s) colour at the top level"),
    (TINY.replace("seeds = [0]", "seeds = [0]\nnoise_types = [\"flip\"]"), [], "unknown key(s) noise_types in [grid]"),
    (TINY + "learning_rate = 0.1\n", [], "unknown run setting(s) learning_rate in [run]"),
    (TINY, ["run.method=\"ce\""], "[run] may not set method"),
    (TINY.replace('"mlc"]', '"mlcc"]'), [], "unknown method 'mlcc'"),
    (TINY.replace('methods = ["ce", "mlc"]', "methods = []"), [], "the grid is empty: grid.methods has no values"),
    (TINY.replace("strengths = [0.2, 0.6]", "strengths = []"), [], "grid.strengths has no values"),
    (TINY, ["trusted=[]"], "grid.trusted has no values"),
    (TINY, ["noises=[\"flipp\"]"], "unknown noise 'flipp'"),
    (TINY, ["strengths=[1.5]"], "1.5 is outside [0, 1]"),
    (TINY, ["datasets=[\"nosuchdata\"]"], "unknown dataset 'nosuchdata'"),
    (TINY, ["method_options.mlc.nosuch=1"], "method 'mlc' has no option(s) nosuch"),
    (TINY, ["method_options.nosuch.x=1"], "[method_options.nosuch]: unknown method"),
    (TINY, ["label_sets=[\"aggre\"]"], "label_sets (real noisy labels) replace noises × strengths"),
    (TINY, ["optimizer=\"rmsprop\""], "optimizer must be one of"),
    (TINY, ["colour=1"], "--set colour: unknown key"),
    (TINY.replace("epochs = 3", "epochs = = 3"), [], "not valid TOML"),
])
def test_bad_configurations_are_clear_errors(tmp_path, text, overrides, message):
    with pytest.raises(SweepConfigError) as info:
        load_sweep_config(write(tmp_path, text), overrides)
    assert message in str(info.value)


def test_unknown_config_name():
    with pytest.raises(SweepConfigError, match="neither a sweep file nor a preset; presets: .*mnist"):
        load_sweep_config("no-such-preset")


def test_cli_reports_config_errors(tmp_path, capsys):
    from metacorrect.cli import main
    path = write(tmp_path, TINY.replace('"mlc"]', '"nope"]'))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: grid.methods: unknown method 'nope'" in err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(write(tmp_path, TINY)), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["digits-flip-s0.2-t0.1-ce-seed0", "digits-flip-s0.2-t0.1-mlc-seed0",
                                               "digits-flip-s0.6-t0.1-ce-seed0", "digits-flip-s0.6-t0.1-mlc-seed0"]


# ---------------------------------------------------------------------- the database

def test_store_claims_each_run_once_and_keeps_finished_rows(tmp_path):
    cfg = load_sweep_config(write(tmp_path, TINY))
    specs = cfg.runs()
    store = ResultsStore(tmp_path / DB_NAME, create=True)
    assert store.register(specs) == {"new": 4, "changed": 0, "existing": 0}
    assert store.register(specs)["existing"] == 4
    assert store.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = ResultsStore(tmp_path / DB_NAME)
    a, b = store.claim("a"), other.claim("b")
    assert a["run_id"] != b["run_id"] and a["ord"] == 0 and b["ord"] == 1
    assert store.finish(a["run_id"], a["claim"], {"test_acc": 0.5, "test_error": 0.5})
    assert not other.finish(a["run_id"], "stolen", {"test_acc": 0.9})  # a claim that is not yours changes nothing
    # a sweep killed with b running: the next sweep puts b back to pending, keeps a done
    assert store.recover() == {"interrupted": 1, "failed_retried": 0}
    assert {r["run_id"]: r["status"] for r in store.rows()}[a["run_id"]] == "done"
    assert store.counts()["pending"] == 3
    # a setting the record lacks (added to RunConfig later) counts as its default
    with store.transaction() as con:
        for r in store.rows():
            cfg_d = load_json(r["config_json"])
            cfg_d.pop("validation")
            con.execute("UPDATE runs SET config_json = ?, fingerprint = 'old' WHERE run_id = ?",
                        (json.dumps(cfg_d), r["run_id"]))  # as plain text, as older versions stored it
    assert store.register(specs)["changed"] == 0
    # asking explicitly for the option value a finished run resolved is the same run; pending runs
    # simply take new settings
    with store.transaction() as con:
        con.execute("UPDATE runs SET status = 'done', resolved_json = ? WHERE run_id = ?",
                    (json.dumps({"method_options": {"update_every": 1, "virtual_lr": 0.1, "t_update": "tested",
                                                     "estimate_patience": 2, "trusted_weight": "relative_tested",
                                                     "noisy_evidence": "pooled"}}),
                     b["run_id"]))
    mlc_one = load_sweep_config(write(tmp_path, TINY, "c.toml"), ["method_options.mlc.update_every=1"]).runs()
    assert store.register(mlc_one)["changed"] == 0
    # a run of an older algorithm (MLC before t_update existed: version 1) is never the same run,
    # even where the options asked for are equal
    with store.transaction() as con:
        con.execute("UPDATE runs SET resolved_json = ? WHERE run_id = ?",
                    (json.dumps({"method_options": {"update_every": 1, "virtual_lr": 0.1}}), b["run_id"]))
    with pytest.raises(ValueError, match="1 run"):
        store.register(mlc_one)
    # a run of the same algorithm version whose resolved options differ from what the
    # defaults give now (here: MLC's update_every, 3 when it ran, 5 now) is not the same run
    # either: a resumed sweep reruns it
    import json as _json
    from metacorrect.methods import create_method
    then = {**create_method("mlc").options(), "update_every": 3}
    with store.transaction() as con:
        con.execute("UPDATE runs SET resolved_json = ?, config_json = ?, fingerprint = 'then' WHERE run_id = ?",
                    (_json.dumps({"method_options": then}),
                     _json.dumps({**load_json(con.execute("SELECT config_json FROM runs WHERE run_id = ?",
                                                          (b["run_id"],)).fetchone()[0]), "method_options": {}}),
                     b["run_id"]))
    plain = load_sweep_config(write(tmp_path, TINY, "e.toml")).runs()
    with pytest.raises(ValueError, match="1 run"):
        store.register(plain)
    with store.transaction() as con:
        con.execute("UPDATE runs SET resolved_json = ? WHERE run_id = ?",
                    (json.dumps({"method_options": {"update_every": 1, "virtual_lr": 0.1, "t_update": "tested"}}),
                     b["run_id"]))
    mlc_two = load_sweep_config(write(tmp_path, TINY, "d.toml"), ["method_options.mlc.update_every=2"]).runs()
    with pytest.raises(ValueError, match="1 run"):
        store.register(mlc_two)
    # changed settings are refused unless asked for
    changed = load_sweep_config(write(tmp_path, TINY.replace("epochs = 3", "epochs = 4"), "b.toml")).runs()
    with pytest.raises(ValueError, match="made with other settings"):
        store.register(changed)
    assert store.register(changed, on_changed="rerun")["changed"] == 2  # the pending ones just take them
    assert store.counts()["done"] == 0
    store.close()
    other.close()


def test_compact_repacks_old_rows_rounds_them_and_leaves_a_self_contained_small_file(tmp_path):
    import zlib
    specs = load_sweep_config(write(tmp_path, TINY)).runs()
    store = ResultsStore(tmp_path / DB_NAME, create=True)
    store.register(specs)
    run = store.claim("a")
    T_hat = [[0.1 + 1e-12 * i + 1 / 3 for i in range(3)] for _ in range(3)]
    epochs = [{"epoch": 1, "train_loss": 2 / 3, "test_acc": 0.5, "phase": "train", "epoch_s": 1.23456789}]
    versions = {"python": "3.11.7", "torch": "2.13.0+cpu"}
    config = load_json(run["config_json"])
    with store.transaction() as con:  # a row as older versions stored it: plain text, or zlib without a dictionary
        con.execute("UPDATE runs SET epochs_json = ?, T_hat_json = ?, versions_json = ?, config_json = ? "
                    "WHERE run_id = ?", (json.dumps(epochs), zlib.compress(json.dumps(T_hat).encode()),
                                         json.dumps(versions), json.dumps(config), run["run_id"]))
    before = len(json.dumps(T_hat))
    store.compact()
    row = store.con.execute("SELECT epochs_json, T_hat_json, versions_json, config_json FROM runs WHERE run_id = ?",
                            (run["run_id"],)).fetchone()
    assert all(isinstance(row[c], bytes) for c in row.keys())  # packed
    assert load_json(row["T_hat_json"]) == [[0.43333] * 3] * 3 and len(row["T_hat_json"]) < 0.3 * before
    assert load_json(row["epochs_json"]) == [{"epoch": 1, "train_loss": 0.6666667, "test_acc": 0.5, "phase": "train",
                                              "epoch_s": 1.235}]
    assert load_json(row["versions_json"]) == versions and load_json(row["config_json"]) == config
    packed = dict(row)
    store.compact()  # a packed row is left as it is
    assert dict(store.con.execute("SELECT epochs_json, T_hat_json, versions_json, config_json FROM runs "
                                  "WHERE run_id = ?", (run["run_id"],)).fetchone()) == packed
    # the sweep still reads its configuration from the packed column: registering again changes nothing
    assert store.register(specs) == {"new": 0, "changed": 0, "existing": len(specs)}
    store.close()
    wal = tmp_path / (DB_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # everything is in the database file itself


def test_failed_runs_are_recorded_with_their_error(tmp_path, monkeypatch):
    from metacorrect.experiments import sweep as sweep_mod
    cfg = load_sweep_config(write(tmp_path, TINY), ["methods=ce", "strengths=[0.2]", "epochs=1"])

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("metacorrect.experiments.run.run_experiment", boom)
    result = sweep_mod.run_sweep(cfg, tmp_path / "s", threads=1, log=lambda m: None)
    assert result["failed"] == 1 and "disk on fire" in result["failed_runs"][0][1][0]
    with ResultsStore(tmp_path / "s" / DB_NAME) as store:
        row = store.rows()[0]
        assert row["status"] == "failed" and "RuntimeError: disk on fire" in row["error"]


# ---------------------------------------------------------------------- kill and resume

def _sweep_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metacorrect", "sweep", str(config), "--out", str(out), "--threads", "1", *extra]


def _db_rows(out: Path) -> list[dict]:
    path = out / DB_NAME
    if not path.exists():
        return []
    con = sqlite3.connect(str(path), timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY ord")]
    except sqlite3.OperationalError:  # the schema is being created
        return []
    finally:
        con.close()


def _db_events(out: Path) -> list[dict]:
    con = sqlite3.connect(str(out / DB_NAME), timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM events ORDER BY id")]
    finally:
        con.close()


def _table(out: Path) -> list[dict]:
    from metacorrect.report import write_report
    write_report(out, figures=False)
    with open(out / "report" / "auc.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = write(tmp_path, TINY)

    # the reference: an uninterrupted sweep, in two worker processes
    ref = tmp_path / "ref"
    done = subprocess.run(_sweep_cmd(config, ref, "--workers", "2"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ref_rows = _db_rows(ref)
    assert [r["status"] for r in ref_rows] == ["done"] * 4
    assert {r["worker"] for r in ref_rows} <= {"w0", "w1"}
    starts = [e for e in _db_events(ref) if e["event"] in ("start", "resume")]
    assert sorted(e["run_id"] for e in starts) == sorted(r["run_id"] for r in ref_rows)  # each run taken once

    # the same sweep, killed with SIGKILL once a run is done and another is part-way
    out = tmp_path / "killed"
    proc = subprocess.Popen(_sweep_cmd(config, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    in_flight = None
    try:
        while time.time() < deadline:
            rows = _db_rows(out)
            done_ids = {r["run_id"] for r in rows if r["status"] == "done"}
            partial = [r for r in rows if r["status"] != "done"
                       and (out / r["run_dir"] / "checkpoint.pt").exists()]
            if done_ids and partial:
                in_flight = partial[0]["run_id"]
                break
            if proc.poll() is not None:
                pytest.fail("the sweep ended before it could be killed: " + proc.stdout.read().decode())
            time.sleep(0.02)
        else:
            pytest.fail("timed out waiting for a finished run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {r["run_id"]: r for r in _db_rows(out)}
    finished_before = {i for i, r in before.items() if r["status"] == "done"}
    assert finished_before and len(finished_before) < 4
    running = [i for i, r in before.items() if r["status"] == "running"]  # left as the kill found it
    assert len(running) <= 1 and (running == [in_flight] or in_flight in finished_before)
    had_checkpoint = {i: (out / before[i]["run_dir"] / "checkpoint.pt").exists() for i in running}

    again = subprocess.run(_sweep_cmd(config, out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    after = _db_rows(out)
    assert [r["status"] for r in after] == ["done"] * 4
    events = _db_events(out)
    for run_id in finished_before:  # no finished run was run again
        assert [e["event"] for e in events if e["run_id"] == run_id] == ["start", "done"]
        assert {r["run_id"]: r for r in after}[run_id]["attempts"] == 1
    for run_id in running:  # the interrupted run went on from its checkpoint
        assert "interrupted to resume" in again.stdout
        kinds = [e["event"] for e in events if e["run_id"] == run_id]
        i = kinds.index("interrupted")
        assert kinds[:i] in (["start"], []) and kinds[i + 1:] == ["resume" if had_checkpoint[run_id] else "start",
                                                                 "done"]
    assert not any((out / r["run_dir"] / "checkpoint.pt").exists() for r in after)

    # same results, run by run and in the table
    ref_by_id = {r["run_id"]: r for r in ref_rows}
    for r in after:
        assert r["test_error"] == ref_by_id[r["run_id"]]["test_error"], r["run_id"]
        assert load_json(r["T_hat_json"]) == load_json(ref_by_id[r["run_id"]]["T_hat_json"])
    assert _table(out) == _table(ref)

    # a third call finds nothing to do and runs nothing
    third = subprocess.run(_sweep_cmd(config, out), env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "4/4 runs done" in third.stdout
    assert len(_db_events(out)) == len(events)


def test_one_sweep_per_folder(tmp_path):
    from metacorrect.experiments.sweep import SweepLockedError, _acquire_lock
    lock = _acquire_lock(tmp_path)
    try:
        cfg = load_sweep_config(write(tmp_path, TINY))
        from metacorrect.experiments.sweep import run_sweep
        with pytest.raises(SweepLockedError, match="another sweep is working in"):
            run_sweep(cfg, tmp_path, log=lambda m: None)
    finally:
        lock.close()
