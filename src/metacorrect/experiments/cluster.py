"""Sweeps as submitit jobs: ``--launcher slurm`` (one Slurm job array) and ``--launcher
local`` (the same jobs through submitit's local executor, on this machine).

``pip install 'metacorrect[cluster]'`` (submitit). The submitting process is the only one
that writes ``results.sqlite``: it registers the grid, submits the runs not done yet —
each as a :class:`RunTask` that trains one run into its run folder and writes
``result.json`` there (:mod:`.collect`) — and merges the finished result files (at once
for ``local``, which waits for its jobs; later for ``slurm``: ``metacorrect sweep …
--collect``, or any later ``sweep`` or ``report`` call).

Resources of one run (flags, or a ``[cluster]`` table in the sweep file; flags win)::

    [cluster]
    max_parallel = 8          # runs at a time (the array's %CAP; local: jobs at a time)
    gpus_per_run = 1          # 0: CPU runs. More than 1 is an error for now (see below)
    cpus_per_run = 8          # also the run's torch threads
    mem = "32G"               # Slurm's format: a whole number and K, M, G or T (no unit: MB)
    time = "4:00:00"          # Slurm's formats: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC
    partition = "gpu"
    account = "mylab"
    setup = ["module load cuda/12.1", "source ~/venvs/metacorrect/bin/activate"]

Preemption and time-outs: :class:`RunTask` is a ``submitit.helpers.Checkpointable``. When
Slurm signals a job (``--signal=USR2@90``, written by submitit), submitit calls
:meth:`RunTask.checkpoint`, which records the interruption in the run's ``events.jsonl``
and hands submitit the same call to requeue; the requeued job resumes the run from the
``checkpoint.pt`` its run folder holds (written after every epoch), so at most the epoch in
progress is trained again. Requeues on time-out are capped by submitit (3 by default).

Resubmitting (the same command again) skips finished runs and resumes interrupted ones;
a run whose job is still queued may be submitted twice: whichever job comes second finds
the run finished (its ``result.json``) or running (an ``flock`` on ``RUN_DIR/.run.lock``)
and exits without touching it.

Several GPUs for one run: a run trains in one process on one device. Multi-GPU
data-parallel training (``metacorrect.distributed``, launched by ``torchrun``) is not wired
into sweeps yet, so ``--gpus-per-run`` above 1 is refused with an error rather than
silently leaving GPUs idle.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .collect import ResultFileError, merge_results, read_events, read_result, record_event, run_fields, write_result

LAUNCHERS = ("pool", "local", "slurm")
CLUSTER_KEYS = ("max_parallel", "gpus_per_run", "cpus_per_run", "mem", "time", "partition", "account", "setup")
INSTALL_HINT = "pip install 'metacorrect[cluster]'"
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills a job at its time-out (default 2 minutes)
SUBMITIT_DIR = "submitit"
TIME_FORMATS = ("MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES or "
                "DAYS-HOURS:MINUTES:SECONDS (Slurm's formats; e.g. 90, 4:00:00, 1-12)")


class ClusterOptionError(ValueError):
    """A cluster option is invalid (the message names it, what was given and what is expected)."""


# ---------------------------------------------------------------------- options

def parse_time(value, where: str = "--time") -> int:
    """Slurm's time formats → whole minutes (rounded up; at least 1)."""
    if isinstance(value, bool):
        raise ClusterOptionError(f"{where} {value!r}: expected {TIME_FORMATS}")
    if isinstance(value, int):
        if value < 1:
            raise ClusterOptionError(f"{where} {value}: expected a positive time limit, {TIME_FORMATS}")
        return value
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ClusterOptionError(f"{where} {text!r}: expected {TIME_FORMATS}")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    if seconds <= 0:
        raise ClusterOptionError(f"{where} {text!r}: expected a positive time limit, {TIME_FORMATS}")
    return max(1, -(-seconds // 60))


_MEM_UNITS = {"": 1 / 1024, "K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


def parse_mem(value, where: str = "--mem") -> float:
    """Slurm's memory format (``16G``, ``500M``, ``16000`` = MB) → gigabytes (submitit's ``mem_gb``)."""
    text = str(value).strip()
    m = re.fullmatch(r"(\d+)\s*([KkMmGgTt]?)[Bb]?", text) if not isinstance(value, bool) else None
    if not m or int(m.group(1)) <= 0:
        raise ClusterOptionError(f"{where} {text!r}: expected a memory size in Slurm's format, a positive whole "
                                 f"number with an optional unit K, M, G or T (e.g. 16G, 500M; no unit: megabytes)")
    return int(m.group(1)) * _MEM_UNITS[m.group(2).upper()]


def _positive_int(value, where: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError:
            raise ClusterOptionError(f"{where} {value!r}: expected an integer >= {minimum} ({what})") from None
    if value < minimum:
        raise ClusterOptionError(f"{where} {value}: expected an integer >= {minimum} ({what})")
    return value


@dataclass
class ClusterOptions:
    """How a submitit sweep runs its runs (validated: see :meth:`build`)."""

    launcher: str = "local"
    max_parallel: int | None = None
    gpus_per_run: int = 0
    cpus_per_run: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    partition: str | None = None
    account: str | None = None
    setup: list = field(default_factory=list)

    @classmethod
    def build(cls, launcher: str, table: dict | None = None, flags: dict | None = None) -> "ClusterOptions":
        """Options from a sweep file's ``[cluster]`` table and command-line flags (flags win;
        ``None`` values are unset). Raises :class:`ClusterOptionError`."""
        if launcher not in ("local", "slurm"):
            raise ClusterOptionError(f"launcher {launcher!r}: submitit sweeps run with 'local' or 'slurm'")
        table = dict(table or {})
        unknown = sorted(set(table) - set(CLUSTER_KEYS))
        if unknown:
            raise ClusterOptionError(f"unknown key(s) {', '.join(unknown)} in [cluster]; known: "
                                     f"{', '.join(CLUSTER_KEYS)}")
        values, where = {}, {}
        for key, value in table.items():
            values[key], where[key] = value, f"[cluster] {key} ="
        for key, value in (flags or {}).items():
            if value is not None:
                values[key], where[key] = value, "--" + key.replace("_", "-")
        opts = cls(launcher=launcher)
        if "max_parallel" in values:
            opts.max_parallel = _positive_int(values["max_parallel"], where["max_parallel"], 1,
                                              "the most runs at a time")
        if "gpus_per_run" in values:
            opts.gpus_per_run = _positive_int(values["gpus_per_run"], where["gpus_per_run"], 0, "GPUs of one run")
            if opts.gpus_per_run > 1:
                raise ClusterOptionError(
                    f"{where['gpus_per_run']} {opts.gpus_per_run}: a run trains in one process on one GPU; multi-GPU "
                    f"(DDP) runs are not available in sweeps yet. Use 1 (or 0 for CPU runs)")
        if "cpus_per_run" in values:
            opts.cpus_per_run = _positive_int(values["cpus_per_run"], where["cpus_per_run"], 1, "CPU cores of one run")
        if "mem" in values:
            opts.mem_gb = parse_mem(values["mem"], where["mem"])
        if "time" in values:
            opts.time_min = parse_time(values["time"], where["time"])
        for key in ("partition", "account"):
            if key in values:
                text = str(values[key]).strip()
                if not text or any(c.isspace() for c in text):
                    raise ClusterOptionError(f"{where[key]} {values[key]!r}: expected a Slurm {key} name")
                setattr(opts, key, text)
        if "setup" in values:
            setup = values["setup"]
            if isinstance(setup, str):
                setup = [setup]
            if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
                raise ClusterOptionError(f"{where['setup']} {setup!r}: expected a list of shell lines")
            opts.setup = list(setup)
        if launcher == "slurm" and opts.time_min is None:
            raise ClusterOptionError("--launcher slurm needs --time (or time = ... in [cluster]): the wall-clock "
                                     f"limit of one run, {TIME_FORMATS}")
        return opts

    def threads(self) -> int | None:
        return self.cpus_per_run


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise RuntimeError(f"--launcher local and --launcher slurm need submitit, an optional dependency: "
                           f"{INSTALL_HINT}") from None
    return submitit


def check_launcher(options: ClusterOptions) -> None:
    """Fail before anything is written when the launcher cannot work here."""
    require_submitit()
    if options.launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"--launcher slurm needs Slurm's {' and '.join(missing)} on PATH (not found): run the "
                               f"command on a login node of the cluster; --launcher local runs the same jobs here")


def make_executor(options: ClusterOptions, folder: Path, name: str):
    """A submitit executor with the resources of one run."""
    submitit = require_submitit()
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=options.launcher)
    params = {"name": name, "nodes": 1, "tasks_per_node": 1,
              "timeout_min": options.time_min or LOCAL_TIMEOUT_MIN}
    if options.cpus_per_run:
        params["cpus_per_task"] = options.cpus_per_run
    if options.gpus_per_run:
        params["gpus_per_node"] = options.gpus_per_run
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.account:
        params["slurm_account"] = options.account
    if options.max_parallel:
        params["slurm_array_parallelism"] = options.max_parallel
    if options.setup:
        params["slurm_setup"] = list(options.setup)
    ex.update_parameters(**params)
    return ex


# ---------------------------------------------------------------------- one run, inside a job

def worker_name() -> str:
    """Who runs this: ``slurm:<job id>``, ``local:<job id>`` or ``pid:<pid>``."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor:
        try:
            import submitit
            return f"{executor}:{submitit.JobEnvironment().job_id}"
        except Exception:  # noqa: BLE001 - outside a job, or an unknown environment
            pass
    return f"pid:{os.getpid()}"


def _try_lock(path: Path):
    """An exclusive non-blocking ``flock`` on ``path``: the open file, ``None`` when another
    process holds it. Where the filesystem has no locks, proceed unlocked (a warning)."""
    import errno
    import fcntl
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            fh.close()
            return None
        print(f"warning: cannot lock {path} ({exc}); running without the run lock", file=sys.stderr)
    return fh


def _checkpoint_epochs(path: Path) -> int:
    """Epochs recorded in a run's checkpoint (0: none or unreadable)."""
    if not path.exists():
        return 0
    try:
        import torch
        return len(torch.load(path, map_location="cpu", weights_only=False).get("history", []))
    except Exception:  # noqa: BLE001 - run_experiment reports an unusable checkpoint itself
        return 0


def run_one(sweep_dir: str | os.PathLike, run_id: str, run_dir: str, config: dict, fingerprint: str, *,
            data_dir: str | None = None, threads: int | None = None, keep_models: bool = True,
            tensorboard: str | bool | None = None, progress: Callable | None = None) -> dict:
    """Train one run of a sweep into ``SWEEP_DIR/run_dir`` and write its ``result.json``
    (never the database). A run already finished with this ``fingerprint`` is skipped; an
    interrupted one resumes from its checkpoint. Returns a small status record."""
    from ..tensorboard_logger import resolve_dir
    from ..train import CheckpointError
    from .run import RunConfig, run_experiment
    folder = Path(sweep_dir) / run_dir
    folder.mkdir(parents=True, exist_ok=True)
    lock = _try_lock(folder / ".run.lock")
    if lock is None:
        return {"run_id": run_id, "status": "busy", "detail": "another job is running it"}
    try:
        try:
            existing = read_result(folder)
        except ResultFileError:
            existing = None
        if existing and existing["status"] == "done" and existing.get("fingerprint") == fingerprint:
            return {"run_id": run_id, "status": "done", "skipped": True}
        import torch
        threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or None
        if threads:
            torch.set_num_threads(int(threads))
        worker = worker_name()
        cfg = RunConfig.from_dict(config)
        if data_dir is not None:
            cfg.data_dir = data_dir
        ckpt = folder / "checkpoint.pt"
        attempts = 1 + sum(1 for e in read_events(folder) if e.get("event") in ("start", "resume"))
        from_epoch = _checkpoint_epochs(ckpt)
        record_event(folder, "resume" if from_epoch else "start", worker,
                     f"from epoch {from_epoch}" if from_epoch else None)
        trained = [0]

        def on_epoch(metrics):
            trained[0] += 1

        t0 = time.perf_counter()
        board = resolve_dir(tensorboard, folder, run_id)
        try:
            try:
                summary = run_experiment(cfg, folder, resume=True, on_epoch=on_epoch, progress=progress,
                                         tensorboard=board)
            except CheckpointError as exc:
                record_event(folder, "restart", worker, f"checkpoint unusable, starting over: {exc}")
                summary = run_experiment(cfg, folder, resume=False, on_epoch=on_epoch, progress=progress,
                                         tensorboard=board)
            fields = run_fields(folder, summary)
            fields["run_wall_s"] = time.perf_counter() - t0
            write_result(folder, run_id=run_id, fingerprint=fingerprint, status="done", fields=fields, worker=worker,
                         attempts=attempts)
            record_event(folder, "done", worker, f"{trained[0]} epoch(s) trained in this attempt")
            ckpt.unlink(missing_ok=True)
            if not keep_models:
                (folder / "model.pt").unlink(missing_ok=True)
            return {"run_id": run_id, "status": "done", "test_error": fields["test_error"],
                    "t_error": fields["t_error"], "epochs_trained": trained[0]}
        except Exception:  # noqa: BLE001 - the failure is the run's result; the job itself succeeds
            error = traceback.format_exc()
            write_result(folder, run_id=run_id, fingerprint=fingerprint, status="failed",
                         fields={"run_wall_s": time.perf_counter() - t0}, error=error, worker=worker,
                         attempts=attempts)
            last = error.strip().splitlines()[-1]
            record_event(folder, "failed", worker, last[:500])
            return {"run_id": run_id, "status": "failed", "error": last}
    finally:
        lock.close()


def _checkpointable():
    try:
        from submitit.helpers import Checkpointable
    except ImportError:  # the class stays importable (and picklable) without the extra
        return object
    return Checkpointable


class RunTask(_checkpointable()):
    """The callable a job runs: :func:`run_one` with the call's arguments. On preemption or
    time-out submitit calls :meth:`checkpoint`: the same call is requeued, and it resumes
    from the run folder's ``checkpoint.pt``."""

    def __call__(self, sweep_dir: str, run_id: str, run_dir: str, config: dict, fingerprint: str,
                 settings: dict | None = None) -> dict:
        return run_one(sweep_dir, run_id, run_dir, config, fingerprint, **(settings or {}))

    def checkpoint(self, sweep_dir: str, run_id: str, run_dir: str, config: dict, fingerprint: str,
                   settings: dict | None = None):
        from submitit.helpers import DelayedSubmission
        folder = Path(sweep_dir) / run_dir
        epochs = _checkpoint_epochs(folder / "checkpoint.pt")
        record_event(folder, "requeue", worker_name(),
                     f"preempted or timed out; requeued to resume from epoch {epochs}")
        return DelayedSubmission(self, sweep_dir, run_id, run_dir, config, fingerprint, settings)


# ---------------------------------------------------------------------- the submitting process

def run_cluster_sweep(config, out_dir: str | os.PathLike, options: ClusterOptions, *, data_dir: str | None = None,
                      limit: int | None = None, threads: int | None = None, retry_failed: bool = True,
                      rerun_changed: bool = False, keep_models: bool = True, tensorboard: str | bool | None = None,
                      log: Callable[[str], None] | None = None, poll_s: float = 0.2) -> dict:
    """Submit (``slurm``) or run (``local``) every run of ``config`` not done yet as submitit
    jobs; return the database's counts (and, for ``slurm``, what was submitted)."""
    from ..progress import RunsProgress
    from .store import ResultsStore, db_path, load_json
    from .sweep import _acquire_lock, describe_start, prepare_sweep
    log = log or (lambda msg: print(msg, flush=True))
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    check_launcher(options)
    if tensorboard:
        from ..tensorboard_logger import require_tensorboard
        require_tensorboard()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(out)
    try:
        with ResultsStore(db_path(out), create=True) as store:
            prep = prepare_sweep(store, config, out, retry_failed=retry_failed, rerun_changed=rerun_changed,
                                 invocation={"launcher": options.launcher, "limit": limit,
                                             "max_parallel": options.max_parallel})
            id_set = set(prep["run_ids"])
            todo = [r for r in store.rows("pending") if r["run_id"] in id_set]
            if limit is not None:
                todo = todo[:limit]
            log(describe_start(config, out, prep) + f"; {len(todo)} to run through submitit's "
                f"{options.launcher} executor")
            if not (threads or options.threads()) and options.launcher == "local":
                from .sweep import default_threads
                threads = default_threads(options.max_parallel or 1)  # the cores shared by the jobs at a time
            # jobs may start in another folder: paths travel absolute
            if isinstance(tensorboard, str) and tensorboard:
                tensorboard = str(Path(tensorboard).expanduser().resolve())
            settings = {"data_dir": None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
                        "threads": threads or options.threads(), "keep_models": keep_models,
                        "tensorboard": tensorboard}
            calls = [(r["run_id"], (str(out), r["run_id"], r["run_dir"], load_json(r["config_json"]),
                                    r["fingerprint"], settings)) for r in todo]
            submitted = {}
            if calls:
                executor = make_executor(options, out / SUBMITIT_DIR, f"metacorrect-{config.name}")
                if options.launcher == "slurm":
                    submitted = _submit_array(executor, calls, store)
                else:
                    _run_local(executor, calls, options.max_parallel or 1, out, store, len(prep["specs"]),
                               prep["done"], config.name, RunsProgress, poll_s)
            merge_results(out, store=store)
            store.compact()
            rows = [r for r in store.rows() if r["run_id"] in id_set]
        result = {s: sum(1 for r in rows if r["status"] == s) for s in ("pending", "running", "done", "failed")}
        result["total"] = len(rows)
        result["failed_runs"] = [(r["run_id"], (r["error"] or "").strip().splitlines()[-1:] or [""])
                                 for r in rows if r["status"] == "failed"]
        result["submitted"] = submitted
        return result
    finally:
        lock.close()


def _submit_array(executor, calls, store) -> dict:
    """All calls as one job array; records a ``submitted`` event per run."""
    with executor.batch():
        jobs = [executor.submit(RunTask(), *args) for _, args in calls]
    with store.transaction() as con:
        for (run_id, _), job in zip(calls, jobs):
            con.execute("INSERT INTO events (run_id, event, at, worker, detail) VALUES (?, 'submitted', ?, ?, ?)",
                        (run_id, time.time(), f"slurm:{job.job_id}", f"logs in {job.paths.folder}"))
    array = jobs[0].job_id.split("_")[0]
    return {"job_id": array, "jobs": [j.job_id for j in jobs], "runs": [run_id for run_id, _ in calls]}


def _run_local(executor, calls, cap: int, out: Path, store, total: int, done: int, name: str, progress_cls,
               poll_s: float = 0.2) -> None:
    """Run the calls as local submitit jobs, at most ``cap`` at a time, merging each
    finished run at once."""
    from ..progress import line
    bar = progress_cls(total, done, desc=f"sweep {name}")
    queue = list(calls)
    running: dict = {}
    finished = 0
    try:
        while queue or running:
            while queue and len(running) < cap:
                run_id, args = queue.pop(0)
                job = executor.submit(RunTask(), *args)
                store.event(run_id, "submitted", f"local:{job.job_id}", f"logs in {job.paths.folder}")
                running[job] = run_id
            time.sleep(poll_s)
            for job in [j for j in running if j.done()]:
                run_id = running.pop(job)
                try:
                    outcome = job.result()
                except Exception as exc:  # noqa: BLE001 - the job died (killed, out of memory, ...)
                    outcome = {"status": "lost", "error": f"{type(exc).__name__}: {str(exc).strip()[-300:]}"}
                merge_results(out, store=store)
                finished += 1
                if outcome.get("status") == "done" and outcome.get("test_error") is not None:
                    what = f"test error {100 * outcome['test_error']:.2f}%"
                    if outcome.get("t_error") is not None:
                        what += f", T error {outcome['t_error']:.3f}"
                elif outcome.get("status") == "done":
                    what = "done"
                else:
                    what = f"{outcome.get('status', '?').upper()}: {outcome.get('error') or outcome.get('detail')}"
                text = f"[{done + finished}/{total}] {run_id}: {what} (job {job.job_id}, logs {job.paths.stdout})"
                bar.write(text) if bar.enabled else line(text)
                bar.update_to(done + finished)
    except KeyboardInterrupt:
        for job in running:
            job.cancel(check=False)  # the runs keep their checkpoints: the same command resumes them
        raise
    finally:
        bar.close()


__all__ = [
    "CLUSTER_KEYS",
    "LAUNCHERS",
    "ClusterOptionError",
    "ClusterOptions",
    "RunTask",
    "check_launcher",
    "make_executor",
    "parse_mem",
    "parse_time",
    "run_cluster_sweep",
    "run_one",
    "worker_name",
]
