"""Run a sweep: every run of a grid, resumably, in one or several processes.

``run_sweep(config, out_dir, workers=N)`` writes the sweep folder::

    OUT/results.sqlite      the results database (see :mod:`.store`)
    OUT/sweep.json          the sweep configuration as last run
    OUT/runs/<run_id>/      one run folder per run (see :mod:`.run`)

Killed at any moment (even by SIGKILL), a sweep loses at most the runs in flight: running
it again skips the finished runs and resumes each interrupted one from the checkpoint in
its run folder (``run_experiment(..., resume=True)``). One sweep at a time may work in a
folder (an ``flock`` on ``OUT/.lock``); ``workers`` processes ('spawn' context) claim runs
from the database atomically, each loading a dataset once and reusing it for its runs.

This is the process-pool launcher (``metacorrect sweep --launcher pool``, the default);
``--launcher local`` and ``--launcher slurm`` run the same runs as submitit jobs
(:mod:`.cluster`). Whatever the launcher, a finished run also writes
``runs/<run_id>/result.json`` (:mod:`.collect`), and every sweep first merges the result
files of runs that finished elsewhere into the database (:func:`prepare_sweep`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from .collect import git_revision, merge_results, retire_failed_result, run_fields, write_result
from .config import SweepConfig
from .store import ResultsStore, db_path, load_json, pack_columns

LOCK_NAME = ".lock"


class SweepLockedError(RuntimeError):
    """Another sweep is working in this folder."""


def _acquire_lock(out: Path):
    import fcntl
    fh = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise SweepLockedError(f"another sweep is working in {out} ({holder or 'unknown process'}); wait for it to "
                               f"end, or stop it and run this command again to resume") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_sweep(config: SweepConfig, out_dir: str | os.PathLike, *, workers: int = 1, data_dir: str | None = None,
              limit: int | None = None, threads: int | None = None, retry_failed: bool = True,
              rerun_changed: bool = False, keep_models: bool = True, tensorboard: str | bool | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) every run of ``config`` not yet done; return the database's counts.

    Args:
        workers: runs in parallel, each in its own process (1: in this process).
        data_dir: the data root (overrides the configuration; not part of a run's identity).
        limit: run at most this many runs in this call, then stop (the rest stay pending).
        threads: torch threads per worker (default: the CPU cores divided by ``workers``).
        retry_failed: run again the runs that failed in an earlier call.
        rerun_changed: runs already in the database with other settings are run again
            (otherwise that is an error).
        keep_models: keep each run's ``model.pt`` (its ``checkpoint.pt`` is always deleted
            once the run is recorded).
        tensorboard: TensorBoard event files for every run: ``True`` in ``RUN_DIR/tensorboard``,
            a folder for ``FOLDER/<run_id>``, ``None``: none.
    """
    log = log or (lambda msg: print(msg, flush=True))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(out)
    try:
        with ResultsStore(db_path(out), create=True) as store:
            prep = prepare_sweep(store, config, out, retry_failed=retry_failed, rerun_changed=rerun_changed,
                                 invocation={"workers": workers, "limit": limit})
        specs, run_ids, id_set = prep["specs"], prep["run_ids"], set(prep["run_ids"])
        log(describe_start(config, out, prep) + f"; {workers} worker(s)")
        threads = threads or default_threads(workers)
        bar = None
        from ..progress import RunsProgress
        if workers == 1:
            budget = _Budget(limit)
            bar = RunsProgress(len(specs), prep["done"], desc=f"sweep {config.name}")
            try:
                worker_loop(str(out), "w0", run_ids, data_dir, threads, keep_models, budget, len(specs),
                            watch_parent=False, tensorboard=tensorboard, bar=bar)
            finally:
                bar.close()
        else:
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            budget = _Budget(limit, ctx.Value("i", -1 if limit is None else limit))
            procs = [ctx.Process(target=worker_loop, name=f"metacorrect-sweep-w{i}",
                                 args=(str(out), f"w{i}", run_ids, data_dir, threads, keep_models, budget,
                                       len(specs)), kwargs={"watch_parent": True, "tensorboard": tensorboard})
                     for i in range(workers)]
            for p in procs:
                p.start()
            bar = RunsProgress(len(specs), prep["done"], desc=f"sweep {config.name}")
            try:
                while True:  # join, drawing the parent's bar (on a terminal) as runs finish
                    alive = [p for p in procs if p.is_alive()]
                    if not alive:
                        break
                    alive[0].join(timeout=1.0)
                    if bar.enabled:
                        bar.update_to(finished_count(out, id_set))
            except KeyboardInterrupt:
                for p in procs:
                    p.join(timeout=30)
                raise
            finally:
                bar.close()
            bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
            if bad:
                log(f"warning: {len(bad)} worker process(es) exited abnormally (exit codes {bad}); "
                    f"run the command again to resume")
        with ResultsStore(db_path(out)) as store:
            store.compact()  # every worker has stopped: fold the log in, small file to commit
            rows = [r for r in store.rows() if r["run_id"] in id_set]
        result = {s: sum(1 for r in rows if r["status"] == s) for s in ("pending", "running", "done", "failed")}
        result["total"] = len(rows)
        result["failed_runs"] = [(r["run_id"], (r["error"] or "").strip().splitlines()[-1:] or [""])
                                 for r in rows if r["status"] == "failed"]
        return result
    finally:
        lock.close()


def prepare_sweep(store: ResultsStore, config: SweepConfig, out: Path, *, retry_failed: bool = True,
                  rerun_changed: bool = False, invocation: dict | None = None) -> dict:
    """What every sweep call does first, whatever its launcher (the folder lock held):
    merge the result files of runs that finished since the last call (:mod:`.collect`),
    put runs left running by a killed sweep back to pending (and failed runs, when
    ``retry_failed``: their failed result files are set aside), register the grid, merge
    again (a rebuilt database finds the results already in the run folders), and record the
    configuration and this call. Returns the specs, run ids, counts and what was merged."""
    merged = merge_results(out, store=store)
    retried = [r["run_dir"] for r in store.rows("failed")] if retry_failed else []
    recovered = store.recover(retry_failed=retry_failed)  # runs left running are pending again
    for run_dir in retried:
        retire_failed_result(out / (run_dir or ""))
    specs = config.runs()
    counts = store.register(specs, on_changed="rerun" if rerun_changed else "error")
    late = merge_results(out, store=store)
    store.set_meta("config", config.to_dict())
    history = store.get_meta("invocations", [])
    history.append({"at": time.time(), "argv": sys.argv, **(invocation or {}), "pid": os.getpid()})
    store.set_meta("invocations", history)
    (out / "sweep.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    run_ids = [s.run_id for s in specs]
    id_set = set(run_ids)
    done = sum(1 for r in store.rows("done") if r["run_id"] in id_set)
    return {"specs": specs, "run_ids": run_ids, "counts": counts, "recovered": recovered, "done": done,
            "merged": merged["done"] + merged["failed"] + late["done"] + late["failed"]}


def describe_start(config: SweepConfig, out: Path, prep: dict) -> str:
    counts, recovered = prep["counts"], prep["recovered"]
    return (f"sweep {config.name}: {len(prep['specs'])} runs ({prep['done']} done, {counts['new']} new"
            + (f", {prep['merged']} merged from result files" if prep["merged"] else "")
            + (f", {recovered['interrupted']} interrupted to resume" if recovered["interrupted"] else "")
            + (f", {recovered['failed_retried']} failed to retry" if recovered["failed_retried"] else "")
            + f") -> {out}")


def finished_count(out: Path, id_set: set) -> int:
    """Runs of ``id_set`` done or failed in the database (for progress bars)."""
    try:
        with ResultsStore(db_path(out), timeout=5.0) as store:
            status = dict(store.con.execute("SELECT run_id, status FROM runs").fetchall())
    except Exception:  # noqa: BLE001 - busy or being rewritten: the next poll will do
        return 0
    return sum(1 for i in id_set if status.get(i) in ("done", "failed"))


class _Budget:
    """How many more runs this call may start (``None``: no limit); shared between processes."""

    def __init__(self, limit: int | None, shared=None):
        self.left = limit
        self.shared = shared

    def take(self) -> bool:
        if self.shared is not None:
            with self.shared.get_lock():
                if self.shared.value == -1:
                    return True
                if self.shared.value == 0:
                    return False
                self.shared.value -= 1
                return True
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _watch_parent() -> None:
    """In a worker process: exit when the sweep process that started it is gone (so that a
    killed sweep leaves no orphan writing into its folder)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_loop(sweep_dir: str, worker: str, run_ids: list[str], data_dir: str | None, threads: int,
                keep_models: bool, budget: _Budget, total: int, *, watch_parent: bool = False,
                tensorboard: str | bool | None = None, bar=None) -> None:
    """Claim and execute runs until none is left (or the budget is spent). ``bar``: a
    :class:`metacorrect.progress.RunsProgress` of this process (one worker)."""
    import torch
    from ..progress import line
    if watch_parent:
        _watch_parent()
    torch.set_num_threads(max(1, int(threads)))
    out = Path(sweep_dir)
    cache: dict = {}
    started = time.perf_counter()
    n_run = 0
    id_set = set(run_ids)
    with ResultsStore(db_path(out)) as store:
        while budget.take():
            row = store.claim(worker, run_ids)
            if row is None:
                break
            elapsed = execute_run(store, out, dict(row), worker, data_dir, cache, keep_models, tensorboard)
            n_run += 1
            status = dict(store.con.execute("SELECT run_id, status FROM runs").fetchall())
            done_here = sum(1 for i in id_set if status.get(i) == "done")
            failed = sum(1 for i in id_set if status.get(i) == "failed")
            rate = (time.perf_counter() - started) / n_run
            left = total - done_here - failed
            r = store.con.execute("SELECT status, test_error, t_error, error FROM runs WHERE run_id = ?",
                                  (row["run_id"],)).fetchone()
            if r["status"] == "done":
                what = f"test error {100 * r['test_error']:.2f}%" if r["test_error"] is not None else "done"
                if r["t_error"] is not None:
                    what += f", T error {r['t_error']:.3f}"
            else:
                last = (r["error"] or "").strip().splitlines()
                what = f"FAILED: {last[-1] if last else '?'}"
            text = (f"[{done_here + failed}/{total}] {row['run_id']}: {what} ({elapsed:.1f}s"
                    + (f"; about {_duration(rate * left)} left at this worker's pace" if left > 0 else "") + ")")
            if bar is not None:
                bar.write(text)
                bar.update_to(done_here + failed)
            else:
                line(text)
        store.checkpoint()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}min"
    return f"{seconds / 3600:.1f}h"


def _load(config, cache: dict):
    from ..data import load_dataset
    key = (str(config.dataset), str(config.data_dir))
    if key not in cache:
        cache.clear()  # one dataset at a time: the grid keeps a dataset's runs together
        cache[key] = load_dataset(config.dataset, config.data_dir)
    return cache[key]


def execute_run(store: ResultsStore, out: Path, row: dict, worker: str, data_dir: str | None, cache: dict,
                keep_models: bool = True, tensorboard: str | bool | None = None) -> float:
    """Run one claimed run to its end, write its result file and commit its row; returns the
    seconds it took here."""
    from ..tensorboard_logger import resolve_dir
    from ..train import CheckpointError
    from .run import RunConfig, run_experiment
    run_id, claim = row["run_id"], row["claim"]
    run_dir = out / row["run_dir"]
    t0 = time.perf_counter()
    resumed = (run_dir / "checkpoint.pt").exists() or (run_dir / "summary.json").exists()
    store.event(run_id, "resume" if resumed else "start", worker, f"attempt {row['attempts']}")
    try:
        config = RunConfig.from_dict(load_json(row["config_json"]))
        if data_dir is not None:
            config.data_dir = data_dir
        dataset = _load(config, cache)
        epochs = [0]

        def on_epoch(metrics):
            epochs[0] += 1
            store.heartbeat(run_id, claim, epochs[0])

        board = resolve_dir(tensorboard, run_dir, run_id)
        try:
            summary = run_experiment(config, run_dir, resume=True, on_epoch=on_epoch, dataset=dataset,
                                     tensorboard=board)
        except CheckpointError as exc:
            store.event(run_id, "restart", worker, f"checkpoint unusable, starting over: {exc}")
            summary = run_experiment(config, run_dir, resume=False, on_epoch=on_epoch, dataset=dataset,
                                     tensorboard=board)
        fields = run_fields(run_dir, summary)
        fields["run_wall_s"] = time.perf_counter() - t0
        # the file first: a run counts as finished once it exists (a kill before the database
        # commit loses nothing: the next sweep merges it)
        write_result(run_dir, run_id=run_id, fingerprint=row["fingerprint"], status="done", fields=fields,
                     worker=worker, attempts=row["attempts"])
        ok = store.finish(run_id, claim, pack_columns(fields), worker)
        store.checkpoint(passive=True)  # keep the database file itself complete (it may be copied or committed)
        if ok:
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)
            if not keep_models:
                (run_dir / "model.pt").unlink(missing_ok=True)
    except KeyboardInterrupt:
        with store.transaction() as con:
            con.execute("UPDATE runs SET status = 'pending', claim = NULL WHERE run_id = ? AND claim = ?",
                        (run_id, claim))
            con.execute("INSERT INTO events (run_id, event, at, worker, detail) VALUES (?, 'interrupted', ?, ?, ?)",
                        (run_id, time.time(), worker, "KeyboardInterrupt"))
        raise
    except Exception:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
        store.fail(run_id, claim, traceback.format_exc(), {"run_wall_s": time.perf_counter() - t0}, worker)
    return time.perf_counter() - t0


def collect_results(run_dir: Path, summary: dict) -> dict:
    """The database fields of a finished run folder (packed as the database stores them)."""
    return pack_columns(run_fields(run_dir, summary))


_git_revision = git_revision  # the name older code imports


__all__ = ["SweepLockedError", "collect_results", "default_threads", "describe_start", "execute_run",
           "finished_count", "prepare_sweep", "run_sweep", "worker_loop"]
