"""Sweeps as submitit jobs (issue 14): the local executor gives the process pool's database and
report, a fake Slurm receives the job array we expect, preemption through submitit's own
signal handler requeues and resumes from the checkpoint, a killed run resumes where it
stopped, racing merges leave one correct database, TensorBoard holds the curves and T, and
bad cluster options fail before anything is submitted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metacorrect.cli import main
from metacorrect.experiments.cluster import ClusterOptionError, RunTask, parse_mem, parse_time, run_one
from metacorrect.experiments.collect import RESULT_NAME, collect_lock, read_result
from metacorrect.experiments.config import load_sweep_config
from metacorrect.experiments.packing import rounded
from metacorrect.experiments.store import DB_NAME, ResultsStore, load_json

GRID = """\
name = "tiny"
[grid]
datasets = ["digits"]
noises = ["flip"]
strengths = [0.2, 0.6]
trusted = [0.1]
methods = ["ce", "mlc"]
seeds = [0]
[run]
epochs = 2
batch_size = 32
"""
TIMING = ("epoch_s",)  # per-epoch fields that are measurements, not results


def _rows(out: Path) -> dict:
    con = sqlite3.connect(str(out / DB_NAME))
    con.row_factory = sqlite3.Row
    try:
        return {r["run_id"]: dict(r) for r in con.execute("SELECT * FROM runs ORDER BY ord")}
    finally:
        con.close()


def _events(out: Path, run_id: str) -> list[tuple[str, str | None]]:
    con = sqlite3.connect(str(out / DB_NAME))
    try:
        return [(e, d) for e, d in con.execute("SELECT event, detail FROM events WHERE run_id = ? ORDER BY id",
                                               (run_id,))]
    finally:
        con.close()


def _submissions(out: Path, run_id: str) -> list[str]:
    con = sqlite3.connect(str(out / DB_NAME))
    try:
        return [w for (w,) in con.execute("SELECT worker FROM events WHERE run_id = ? AND event = 'submitted' "
                                          "ORDER BY id", (run_id,))]
    finally:
        con.close()


def _results(row: dict) -> dict:
    """What a run produced (not when, where or how long it took)."""
    epochs = [{k: v for k, v in e.items() if k not in TIMING} for e in load_json(row["epochs_json"])]
    return {"status": row["status"], "test_acc": row["test_acc"], "test_error": row["test_error"],
            "t_error": row["t_error"], "T_hat": load_json(row["T_hat_json"]), "epochs": epochs,
            "epochs_done": row["epochs_done"], "fingerprint": row["fingerprint"]}


def _report_csvs(out: Path) -> dict:
    from metacorrect.report import write_report
    paths = write_report(out, figures=False)
    return {name: (paths["folder"] / name).read_text() for name in ("auc.csv", "t_error.csv")}


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def reference(grid_file, tmp_path_factory) -> Path:
    """The grid through the process pool (in this process, one thread)."""
    import torch

    from metacorrect.experiments.sweep import run_sweep
    out = tmp_path_factory.mktemp("pool") / "sweep"
    threads = torch.get_num_threads()
    try:
        result = run_sweep(load_sweep_config(grid_file), out, threads=1, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert result["done"] == result["total"] == 4
    return out


# ---------------------------------------------------------------------- option parsing

def test_slurm_time_and_memory_formats():
    assert [parse_time(t) for t in ("90", "1:30", "1:30:00", "1-12", "1-0:30", "2-00:00:01", 45)] == \
        [90, 2, 90, 2160, 1470, 2881, 45]
    assert [parse_mem(m) for m in ("16G", "16GB", "2T", "512M", "16000")] == [16, 16, 2048, 0.5, 16000 / 1024]
    for bad in ("4 hours", "1:2:3:4", "-5", "0", "1.5h", ""):
        with pytest.raises(ClusterOptionError, match="expected"):
            parse_time(bad)
    for bad in ("16Q", "1.5G", "-1G", "0", "lots"):
        with pytest.raises(ClusterOptionError, match="expected a memory size"):
            parse_mem(bad)


@pytest.mark.parametrize("args, message", [
    (["--launcher", "slurm", "--time", "4 hours"], "--time '4 hours': expected MINUTES, MINUTES:SECONDS"),
    (["--launcher", "slurm", "--time", "60", "--mem", "16Q"], "--mem '16Q': expected a memory size"),
    (["--launcher", "local", "--max-parallel", "0"], "--max-parallel 0: expected an integer >= 1"),
    (["--launcher", "slurm", "--time", "60", "--gpus-per-run", "2"], "multi-GPU (DDP) runs are not available"),
    (["--launcher", "slurm"], "--launcher slurm needs --time"),
    (["--launcher", "slurm", "--time", "60"], "needs Slurm's sbatch and srun on PATH"),
    (["--partition", "gpu"], "--partition apply to --launcher slurm or local"),
    (["--launcher", "local", "--workers", "2"], "--workers applies to --launcher pool"),
])
def test_bad_cluster_options_fail_before_anything_is_submitted(grid_file, tmp_path, monkeypatch, capsys, args,
                                                              message):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    out = tmp_path / "out"
    assert main(["sweep", str(grid_file), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # no folder, no database, no job


@pytest.mark.parametrize("table, message", [
    ('time = "soon"', "[cluster] time = 'soon': expected MINUTES"),
    ('gpus = 1', "unknown key(s) gpus in [cluster]"),
    ('max_parallel = 0', "[cluster] max_parallel = 0: expected an integer >= 1"),
])
def test_bad_cluster_table_is_a_clear_error(tmp_path, capsys, table, message):
    path = tmp_path / "s.toml"
    path.write_text(GRID + "[cluster]\n" + table + "\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- local executor end to end

@pytest.mark.slow
def test_local_launcher_gives_the_process_pools_database_and_report(grid_file, reference, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "local"
    assert main(["sweep", str(grid_file), "--out", str(out), "--launcher", "local", "--max-parallel", "2",
                 "--cpus-per-run", "1"]) == 0
    assert "4/4 runs done, 0 failed" in capsys.readouterr().out
    ref, got = _rows(reference), _rows(out)
    assert list(got) == list(ref)
    for run_id, row in got.items():
        assert _results(row) == _results(ref[run_id]), run_id
        assert row["worker"].startswith("local:") and row["attempts"] == 1
        assert [e for e, _ in _events(out, run_id)] == ["submitted", "start", "done"]
        record = read_result(out / row["run_dir"])  # the run's own result file, as documented
        assert record["status"] == "done" and record["fingerprint"] == row["fingerprint"]
        assert not (out / row["run_dir"] / "checkpoint.pt").exists()
    assert _report_csvs(out) == _report_csvs(reference)
    # the same command again finds everything done and submits nothing
    assert main(["sweep", str(grid_file), "--out", str(out), "--launcher", "local"]) == 0
    assert not any(e == "submitted" for e, _ in _events(out, next(iter(got)))[1:])


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even the run's failure handling)."""


def _stop_at_second_epoch(action):
    """A ``progress`` callback that calls ``action`` at the first step of the run's second
    epoch (epoch 1 is checkpointed by then, a step of epoch 2 is trained and lost)."""
    labels = []

    def progress(step, total, label):
        if label not in labels:
            labels.append(label)
            if len(labels) == 2:
                action()
    return progress


@pytest.mark.slow
def test_kill_then_resubmit_skips_finished_runs_and_resumes_the_interrupted_one(grid_file, reference, tmp_path):
    pytest.importorskip("submitit")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "killed"
    specs = load_sweep_config(grid_file, ["methods=mlc"]).runs()
    finished, interrupted = specs
    args = {s.run_id: (out, s.run_id, f"runs/{s.run_id}", s.config.to_dict(), s.config.fingerprint()) for s in specs}
    assert run_one(*args[finished.run_id], threads=1, tensorboard=True)["status"] == "done"

    def kill():
        raise _Killed()

    with pytest.raises(_Killed):
        run_one(*args[interrupted.run_id], threads=1, tensorboard=True, progress=_stop_at_second_epoch(kill))
    killed_dir = out / "runs" / interrupted.run_id
    assert (killed_dir / "checkpoint.pt").exists() and not (killed_dir / RESULT_NAME).exists()
    done_file = out / "runs" / finished.run_id / RESULT_NAME
    before = (done_file.stat().st_mtime_ns, done_file.read_text())

    assert main(["sweep", str(grid_file), "--set", "methods=mlc", "--out", str(out), "--launcher", "local",
                 "--cpus-per-run", "1", "--tensorboard"]) == 0
    rows, ref = _rows(out), _rows(reference)
    for run_id, row in rows.items():
        assert _results(row) == _results(ref[run_id]), run_id
    # the finished run was merged from its file, never submitted or run again
    assert (done_file.stat().st_mtime_ns, done_file.read_text()) == before
    assert [e for e, _ in _events(out, finished.run_id)] == ["start", "done"]
    # the interrupted one resumed from its checkpoint: only the unfinished epoch was trained again
    events = _events(out, interrupted.run_id)
    assert [e for e, _ in events] == ["start", "submitted", "resume", "done"]
    epochs = ref[interrupted.run_id]["epochs_done"]  # MLC: GLC's estimate phase, then its own
    assert events[2][1] == "from epoch 1" and events[3][1] == f"{epochs - 1} epoch(s) trained in this attempt"
    assert rows[interrupted.run_id]["attempts"] == 2
    # TensorBoard: the steps the killed attempt logged after its checkpoint were purged
    acc = EventAccumulator(str(killed_dir / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("step/train_loss")]
    assert steps == list(range(1, len(steps) + 1))
    assert [e.step for e in acc.Scalars("test_acc")] == list(range(1, epochs + 1))


# ---------------------------------------------------------------------- preemption

def test_preemption_through_submitits_signal_handler_requeues_and_resumes(grid_file, reference, tmp_path,
                                                                          monkeypatch):
    submitit = pytest.importorskip("submitit")
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, LocalJobEnvironment

    import metacorrect.experiments.run as run_mod
    spec = load_sweep_config(grid_file, ["methods=ce", "strengths=[0.6]"]).runs()[0]
    out = tmp_path / "preempt"
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "777", "SUBMITIT_LOCAL_GLOBALID": "0",
                       "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NTASKS": "1"}.items():
        monkeypatch.setenv(key, value)
    paths = JobPaths(tmp_path / "submitit", job_id="777", task_id=0)
    paths.folder.mkdir(parents=True)
    delayed = DelayedSubmission(RunTask(), str(out), spec.run_id, f"runs/{spec.run_id}", spec.config.to_dict(),
                                spec.config.fingerprint(), {"threads": 1})
    delayed.set_timeout(60, 3)
    delayed.dump(paths.submitted_pickle)
    real = run_mod.run_experiment
    sig = LocalJobEnvironment._usr_sig()

    def preempted(config, out_dir, **kwargs):  # the scheduler signals the job during epoch 2
        kwargs["progress"] = _stop_at_second_epoch(lambda: os.kill(os.getpid(), sig))
        return real(config, out_dir, **kwargs)

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, sig)}
    monkeypatch.setattr(run_mod, "run_experiment", preempted)
    try:
        LocalJobEnvironment()._handle_signals(paths, delayed)  # what submitit's job runner does
        with pytest.raises(SystemExit) as info:
            delayed.result()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert info.value.code == LOCAL_REQUEUE_RETURN_CODE  # submitit's "requeue me"
    run_dir = out / "runs" / spec.run_id
    assert (run_dir / "checkpoint.pt").exists() and read_result(run_dir) is None
    monkeypatch.setattr(run_mod, "run_experiment", real)

    requeued = DelayedSubmission.load(paths.submitted_pickle)  # what the requeued job runs
    assert isinstance(requeued.function, RunTask) and requeued._timeout_countdown == 3  # preempted: no time-out used
    outcome = requeued.result()
    assert outcome["status"] == "done" and outcome["epochs_trained"] == 1
    events = [(e["event"], e["detail"]) for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())]
    assert [e for e, _ in events] == ["start", "requeue", "resume", "done"]
    assert "resume from epoch 1" in events[1][1] and events[2][1] == "from epoch 1"
    record = read_result(run_dir)
    ref = _rows(reference)[spec.run_id]
    assert record["fields"]["test_acc"] == ref["test_acc"]
    assert [{k: v for k, v in e.items() if k not in TIMING} for e in rounded(record["fields"]["epochs_json"], 7)] \
        == _results(ref)["epochs"]  # the database keeps 7 significant digits of float32 metrics
    assert submitit.helpers.Checkpointable in type(requeued.function).__mro__


# ---------------------------------------------------------------------- Slurm, faked

FAKE_SBATCH = """#!/bin/sh
echo "$@" >> "$FAKE_SLURM/sbatch.calls"
n=$(wc -l < "$FAKE_SLURM/sbatch.calls")
cp "$1" "$FAKE_SLURM/batch-$n.sh"
echo "Submitted batch job 424$n"
"""
FAKE_SACCT = """#!/bin/sh
echo "$@" >> "$FAKE_SLURM/sacct.calls"
echo "JobID|State|NodeList"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch (records its arguments and the batch script, answers like Slurm), sacct,
    squeue, srun, scontrol and scancel on PATH."""
    bin_dir, log = tmp_path / "fake-bin", tmp_path / "slurm-log"
    bin_dir.mkdir()
    log.mkdir()
    scripts = {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT}
    for tool in ("sbatch", "sacct", "squeue", "srun", "scontrol", "scancel"):
        path = bin_dir / tool
        path.write_text(scripts.get(tool, f'#!/bin/sh\necho "$@" >> "$FAKE_SLURM/{tool}.calls"\n'))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(log))
    return log


def _sbatch_flags(script: str) -> dict:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def test_slurm_submits_one_array_with_the_resources_and_resubmits_only_unfinished_runs(
        grid_file, reference, tmp_path, fake_slurm, capsys):
    submitit = pytest.importorskip("submitit")
    out = tmp_path / "slurm"
    command = ["sweep", str(grid_file), "--out", str(out), "--launcher", "slurm", "--max-parallel", "2",
               "--gpus-per-run", "1", "--cpus-per-run", "4", "--mem", "16G", "--time", "1:30:00",
               "--partition", "gpu", "--account", "lab"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "submitted 4 run(s) as Slurm job 4241 (at most 2 at a time)" in printed and "--collect" in printed
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 1  # one job array
    script = (fake_slurm / "batch-1.sh").read_text()
    flags = _sbatch_flags(script)
    assert flags["array"] == "0-3%2"
    assert (flags["gpus-per-node"], flags["cpus-per-task"], flags["mem"], flags["time"]) == ("1", "4", "16GB", "90")
    assert (flags["partition"], flags["account"], flags["job-name"]) == ("gpu", "lab", "metacorrect-tiny")
    assert flags["nodes"] == flags["ntasks-per-node"] == "1" and flags["signal"] == "USR2@90"
    assert f"-m submitit.core._submit {out.resolve() / 'submitit' / '%j'}" in script and "srun" in script
    # each array task's pickled call: the run of the grid at that index, with its resources
    runs = list(_rows(reference))
    for i, run_id in enumerate(runs):
        delayed = submitit.core.utils.DelayedSubmission.load(
            out.resolve() / "submitit" / f"4241_{i}" / f"4241_{i}_submitted.pkl")
        assert isinstance(delayed.function, RunTask)
        assert delayed.args[1] == run_id and delayed.args[5]["threads"] == 4
        assert _submissions(out, run_id) == [f"slurm:4241_{i}"]
    assert all(r["status"] == "pending" for r in _rows(out).values())

    # two array tasks finish (their result files appear); the report merges them
    for run_id in runs[:2]:
        (out / "runs" / run_id).mkdir(parents=True)
        shutil.copy(reference / "runs" / run_id / RESULT_NAME, out / "runs" / run_id / RESULT_NAME)
    from metacorrect.report import write_report
    write_report(out, figures=False)
    assert [r["status"] for r in _rows(out).values()] == ["done", "done", "pending", "pending"]
    # resubmitting: an array of the two unfinished runs only
    assert main(command) == 0
    assert "submitted 2 run(s) as Slurm job 4242" in capsys.readouterr().out
    flags = _sbatch_flags((fake_slurm / "batch-2.sh").read_text())
    assert flags["array"] == "0-1%2"
    again = submitit.core.utils.DelayedSubmission.load(out.resolve() / "submitit" / "4242_0" / "4242_0_submitted.pkl")
    assert again.args[1] == runs[2]


def test_cluster_table_gives_the_resources_and_flags_win(tmp_path, fake_slurm, capsys):
    pytest.importorskip("submitit")
    path = tmp_path / "s.toml"
    path.write_text(GRID.replace('methods = ["ce", "mlc"]', 'methods = ["ce"]') + '[cluster]\npartition = "cpu"\n'
                    'account = "lab"\ncpus_per_run = 2\nmem = "500M"\ntime = "2-00:00:00"\nmax_parallel = 8\n'
                    'setup = ["echo setting up"]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--launcher", "slurm",
                 "--partition", "long"]) == 0
    script = (fake_slurm / "batch-1.sh").read_text()
    flags = _sbatch_flags(script)
    assert (flags["partition"], flags["account"], flags["cpus-per-task"], flags["mem"], flags["time"]) == \
        ("long", "lab", "2", "500MB", "2880")
    assert flags["array"] == "0-1%2" and "gpus-per-node" not in flags  # min(runs, cap); CPU runs
    assert "echo setting up" in script


# ---------------------------------------------------------------------- the one writer

def test_racing_collects_leave_one_correct_database(grid_file, reference, tmp_path):
    out = tmp_path / "race"
    shutil.copytree(reference / "runs", out / "runs")  # four finished runs' folders, result files included
    specs = load_sweep_config(grid_file).runs()
    with ResultsStore(out / DB_NAME, create=True) as store:
        store.register(specs)
    logged = specs[0].run_id  # one run brings its own log (as a cluster job writes it)
    (out / "runs" / logged / "events.jsonl").write_text(
        json.dumps({"event": "start", "at": time.time(), "worker": "slurm:1_0", "detail": None}) + "\n"
        + json.dumps({"event": "done", "at": time.time(), "worker": "slurm:1_0", "detail": "2 epoch(s)"}) + "\n")
    errs = [tmp_path / f"collect-{i}.err" for i in range(2)]
    procs = []
    with collect_lock(out):  # both merges start while a third holds the lock, so they must queue
        for err in errs:
            procs.append(subprocess.Popen([sys.executable, "-m", "metacorrect", "sweep", str(grid_file), "--out",
                                           str(out), "--collect"], stdout=subprocess.PIPE, stderr=open(err, "w"),
                                          text=True))
        deadline = time.time() + 120
        while not all("waiting for the merge lock" in e.read_text() for e in errs if e.exists()) \
                or not all(e.exists() for e in errs):
            assert time.time() < deadline, [e.read_text() for e in errs]
            assert all(p.poll() is None for p in procs), [e.read_text() for e in errs]
            time.sleep(0.05)
    outputs = sorted(p.communicate(timeout=120)[0] for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert "merged 0 finished" in outputs[0] and "merged 4 finished" in outputs[1]  # one did it all, once
    rows, ref = _rows(out), _rows(reference)
    for run_id, row in rows.items():
        assert _results(row) == _results(ref[run_id])
        kinds = [e for e, _ in _events(out, run_id)]
        assert kinds == (["start", "done"] if run_id == logged else ["done"])
    con = sqlite3.connect(str(out / DB_NAME))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# ---------------------------------------------------------------------- TensorBoard

def test_tensorboard_event_files_hold_the_metrics_and_T(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--method", "mlc", "--noise", "flip", "--strength", "0.6",
                 "--trusted", "0.1", "--epochs", "2", "--threads", "1", "--out", str(run), "--tensorboard"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("train_loss", "test_acc", "t_error", "epoch_s"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [m["epoch"] for m in metrics]
        assert [e.value for e in events] == pytest.approx([m[name] for m in metrics], rel=1e-6)
    steps = acc.Scalars("step/train_loss")
    assert [e.step for e in steps] == list(range(1, len(steps) + 1)) and len(steps) > 2 * len(metrics)
    assert [e.step for e in acc.Images("T")] == [m["epoch"] for m in metrics] and len(acc.Images("T_true")) == 1
    assert "T" in tags["images"]
