"""Result files of runs, and the one writer that merges them into ``results.sqlite``.

On a cluster, many jobs writing one SQLite file over a network filesystem corrupt it, so a
run never writes the database there: it writes its outcome atomically (a temporary file,
then ``os.replace``) as one JSON file in its own run folder, and one process merges the
finished files into the database (:func:`merge_results`). Every sweep writes these files,
whatever launcher ran it, so that a run counts as finished exactly when its file exists.

``SWEEP_DIR/runs/<run_id>/result.json`` (``RESULT_FORMAT`` 1)::

    {"format": 1, "run_id": "...", "fingerprint": "<RunConfig.fingerprint()>",
     "status": "done" | "failed", "finished_at": <unix time>, "worker": "slurm:4242_3",
     "attempts": <starts of the run, resumes included>,
     "fields": {"test_acc": ..., "test_error": ..., "t_error": ..., "epochs_json": [...],
                "T_hat_json": [[...]], "T_true_json": [[...]], "final_json": {...},
                "resolved_json": {...}, "versions_json": {...}, "epochs_done": n,
                "wall_s": ..., "run_wall_s": ...},     # the database columns, as plain JSON
     "error": "<traceback>" | null}

``SWEEP_DIR/runs/<run_id>/events.jsonl`` is the run's own append-only log (one JSON object
a line: ``event`` in start / resume / requeue / restart / done / failed, ``at``, ``worker``,
``detail``), merged into the database's ``events`` table.

The merge is serialised by an exclusive ``flock`` on ``SWEEP_DIR/.collect.lock`` (a second
merge waits for the first) and is idempotent: it only touches rows that are not ``done``
and not ``running`` (a row ``running`` belongs to a live process-pool worker), only imports a
file whose fingerprint is the row's, and remembers how many event lines of each run it has
imported (``meta.merged_events``).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from .packing import json_default, pack_columns
from .store import ResultsStore, db_path

RESULT_NAME = "result.json"
RESULT_FORMAT = 1
EVENTS_NAME = "events.jsonl"
COLLECT_LOCK = ".collect.lock"
RETIRED_NAME = "result.failed.json"  # a failed result set aside when the run is retried


class ResultFileError(ValueError):
    """A result file cannot be read (the message names the file and why)."""


# ---------------------------------------------------------------------- a finished run's fields

def run_fields(run_dir: Path, summary: dict) -> dict:
    """The database fields of a finished run folder, as plain JSON values (the columns of
    :data:`metacorrect.experiments.store.PACKED_COLUMNS` unpacked)."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    epochs = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    T_hat = np.load(run_dir / "T.npy").tolist() if (run_dir / "T.npy").exists() else None
    T_true = None
    labels = run_dir / "labels.npz"
    if labels.exists():
        with np.load(labels) as z:
            if "T_true" in z.files:
                T_true = z["T_true"].tolist()
    acc = summary.get("final_test_acc")
    resolved = dict(cfg.get("config", {}))
    resolved.pop("data_dir", None)
    resolved["problem"] = cfg.get("problem")
    resolved["seeds"] = cfg.get("seeds")
    resolved["device"] = cfg.get("device")
    versions = dict(cfg.get("versions", {}))
    versions.setdefault("git", git_revision())
    return {"resolved_json": resolved, "epochs_json": epochs, "epochs_done": len(epochs), "final_json": summary,
            "test_acc": acc, "test_error": None if acc is None else 1.0 - acc, "t_error": summary.get("t_error"),
            "T_hat_json": T_hat, "T_true_json": T_true, "versions_json": versions,
            "wall_s": summary.get("wall_s")}


_GIT: list = []


def git_revision() -> str | None:
    """The metacorrect source's git commit (and '+dirty'), when it runs from a checkout."""
    if not _GIT:
        import subprocess
        here = Path(__file__).resolve().parent
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                 timeout=5)
            value = rev.stdout.strip() or None
            if value:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                                       cwd=here, capture_output=True, text=True, timeout=5)
                if dirty.stdout.strip():
                    value += "+dirty"
        except (OSError, subprocess.SubprocessError):
            value = None
        _GIT.append(value)
    return _GIT[0]


# ---------------------------------------------------------------------- the files of one run

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on a network filesystem the rename must not overtake the data
    os.replace(tmp, path)


def write_result(run_dir: Path, *, run_id: str, fingerprint: str, status: str, fields: dict | None = None,
                 error: str | None = None, worker: str | None = None, attempts: int = 1) -> Path:
    """Write ``run_dir/result.json`` atomically; ``status`` is ``'done'`` or ``'failed'``."""
    if status not in ("done", "failed"):
        raise ValueError(f"a result's status is 'done' or 'failed', got {status!r}")
    path = Path(run_dir) / RESULT_NAME
    record = {"format": RESULT_FORMAT, "run_id": run_id, "fingerprint": fingerprint, "status": status,
              "finished_at": time.time(), "worker": worker, "attempts": int(attempts), "fields": fields or {},
              "error": error}
    _atomic_write(path, json.dumps(record, default=json_default) + "\n")
    return path


def read_result(run_dir: Path) -> dict | None:
    """The run's result record, or ``None`` when it has none yet."""
    path = Path(run_dir) / RESULT_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultFileError(f"{path} is not valid JSON ({exc}); move it away to run the run again") from None
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT \
            or record.get("status") not in ("done", "failed"):
        raise ResultFileError(f"{path} is not a metacorrect result file (format {RESULT_FORMAT}, status done or "
                              f"failed expected)")
    return record


def retire_failed_result(run_dir: Path) -> bool:
    """Set a failed result aside (``result.failed.json``) so that the run is run again;
    True when there was one."""
    try:
        record = read_result(run_dir)
    except ResultFileError:
        record = {"status": "failed"}
    if record is None or record.get("status") != "failed":
        return False
    os.replace(Path(run_dir) / RESULT_NAME, Path(run_dir) / RETIRED_NAME)
    return True


def record_event(run_dir: Path, event: str, worker: str | None = None, detail: str | None = None) -> None:
    """Append one line to the run's ``events.jsonl`` (one ``write`` of one line, so a kill
    leaves whole lines)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "at": time.time(), "worker": worker, "detail": detail}) + "\n"
    with open(Path(run_dir) / EVENTS_NAME, "a") as fh:
        fh.write(line)


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write: the rest is still good
            continue
    return out


# ---------------------------------------------------------------------- the merge

@contextmanager
def collect_lock(sweep_dir: Path, log: Callable[[str], None] | None = None):
    """Hold the exclusive merge lock of a sweep folder (waiting for another merge)."""
    path = Path(sweep_dir) / COLLECT_LOCK
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            (log or _stderr)(f"waiting for the merge lock of {sweep_dir} ({holder})")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def merge_results(sweep_dir: str | os.PathLike, *, store: ResultsStore | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Merge the result files and run logs of a sweep folder into its database.

    Returns counts: ``{'done': n, 'failed': n, 'events': n, 'skipped': n}`` — rows newly
    done or failed, event lines imported, files left out (unreadable, or made with other
    settings than the row's, each reported through ``log``).
    """
    out = Path(sweep_dir)
    log = log or _stderr
    counts = {"done": 0, "failed": 0, "events": 0, "skipped": 0}
    own = store is None
    if own:
        if not db_path(out).exists():
            return counts
        store = ResultsStore(db_path(out))
    try:
        with collect_lock(out, log):
            rows = store.con.execute("SELECT run_id, run_dir, fingerprint, status, finished_at, attempts FROM runs "
                                     "WHERE status IN ('pending', 'failed') ORDER BY ord").fetchall()
            merged = store.get_meta("merged_events", {}) or {}
            updates = []
            for row in rows:
                run_dir = out / (row["run_dir"] or f"runs/{row['run_id']}")
                if not run_dir.is_dir():
                    continue
                events = read_events(run_dir)
                seen = merged.get(row["run_id"], 0)
                if seen > len(events):  # the log was replaced: start over
                    seen = 0
                try:
                    record = read_result(run_dir)
                except ResultFileError as exc:
                    log(f"warning: {exc}")
                    counts["skipped"] += 1
                    record = None
                if record is not None and (record.get("run_id") != row["run_id"]
                                           or record.get("fingerprint") != row["fingerprint"]):
                    log(f"warning: {run_dir / RESULT_NAME} was made with other settings than the sweep now gives "
                        f"{row['run_id']}; left out (the run runs again)")
                    counts["skipped"] += 1
                    record = None
                if record is not None and row["status"] == "failed" and record["status"] == "failed" \
                        and (row["finished_at"] or 0) >= record["finished_at"]:
                    record = None  # this failure is recorded already
                if record is None and seen == len(events):
                    continue
                updates.append((row, record, events[seen:], len(events)))
            if not updates:
                return counts
            with store.transaction() as con:
                for row, record, new_events, n_events in updates:
                    for e in new_events:
                        con.execute("INSERT INTO events (run_id, event, at, worker, detail) VALUES (?, ?, ?, ?, ?)",
                                    (row["run_id"], str(e.get("event")), float(e.get("at") or time.time()),
                                     e.get("worker"), e.get("detail")))
                    counts["events"] += len(new_events)
                    merged[row["run_id"]] = n_events
                    if record is None:
                        continue
                    known = set(store_columns(con))
                    fields = {k: v for k, v in record.get("fields", {}).items() if k in known}
                    values = dict(pack_columns(fields), status=record["status"], finished_at=record["finished_at"],
                                  error=record.get("error"), worker=record.get("worker"),
                                  attempts=max(int(record.get("attempts") or 0), int(row["attempts"] or 0)))
                    con.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)}, claim = NULL "
                                f"WHERE run_id = ?", (*values.values(), row["run_id"]))
                    if not any(e.get("event") == record["status"] for e in new_events):
                        # a result without its log line (e.g. written by a process-pool worker that was
                        # killed before it reached the database)
                        last = (record.get("error") or "").strip().splitlines()[-1:] or [None]
                        con.execute("INSERT INTO events (run_id, event, at, worker, detail) VALUES (?, ?, ?, ?, ?)",
                                    (row["run_id"], record["status"], record["finished_at"], record.get("worker"),
                                     last[0] if record["status"] == "failed" else f"merged from {RESULT_NAME}"))
                        counts["events"] += 1
                    counts[record["status"]] += 1
                con.execute("INSERT OR REPLACE INTO meta VALUES ('merged_events', ?)", (json.dumps(merged),))
            store.checkpoint(passive=True)
            return counts
    finally:
        if own:
            store.close()


def store_columns(con) -> list[str]:
    return [r[1] for r in con.execute("PRAGMA table_info(runs)")]


__all__ = ["COLLECT_LOCK", "EVENTS_NAME", "RESULT_FORMAT", "RESULT_NAME", "ResultFileError", "collect_lock",
           "git_revision", "merge_results", "read_events", "read_result", "record_event", "retire_failed_result",
           "run_fields", "write_result"]
