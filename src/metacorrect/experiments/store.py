"""The results database of a sweep: one SQLite file (``results.sqlite``) in the sweep folder.

Embedded (standard-library ``sqlite3``), in WAL mode, every write a transaction. Tables:

* ``runs``   — one row per run of the grid: its axes (dataset, noise, strength, trusted,
  method, seed, label set), the run configuration as JSON and its fingerprint, the status
  (``pending`` → ``running`` → ``done`` or ``failed``), the resolved configuration
  (model, method options with their defaults) as the run saw it, per-epoch metrics (JSON),
  the final metrics, the learned/estimated T̂ and the true T (JSON), timings, the number of
  times the run was started (``attempts``), the versions of Python, torch, numpy and
  metacorrect, and the error text of a failure. The JSON columns (``PACKED_COLUMNS``:
  configuration, resolved configuration, versions, per-epoch and final metrics, T̂, true T)
  are stored packed as :mod:`metacorrect.experiments.packing` describes (zlib with a shared
  dictionary, floats rounded to the precision they carry; a BLOB: read them with
  :func:`load_json`, or from the CSV files of ``metacorrect report``), because the database
  is committed with the results. Rows written as plain JSON text, or packed otherwise, by
  older versions read the same and are repacked by :meth:`ResultsStore.compact`;
* ``events`` — one row per start, resume, finish and failure of a run (who and when);
* ``meta``   — the sweep's configuration and bookkeeping.

A run is *claimed* atomically (``BEGIN IMMEDIATE``: one writer at a time, so two workers
never take the same run) with a fresh claim token; its results are committed in one
transaction when it ends, and only while the token is still its own.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from .packing import PACKED_COLUMNS, load_json, pack_columns, pack_json

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    ord           INTEGER NOT NULL,
    dataset       TEXT NOT NULL,
    noise         TEXT NOT NULL,
    label_set     TEXT,
    strength      REAL,
    trusted       REAL NOT NULL,
    method        TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    config_json   TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    claim         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    worker        TEXT,
    run_dir       TEXT,
    resolved_json TEXT,
    epochs_done   INTEGER NOT NULL DEFAULT 0,
    epochs_json   TEXT,
    final_json    TEXT,
    test_acc      REAL,
    test_error    REAL,
    t_error       REAL,
    T_hat_json    TEXT,
    T_true_json   TEXT,
    versions_json TEXT,
    created_at    REAL,
    claimed_at    REAL,
    heartbeat_at  REAL,
    finished_at   REAL,
    wall_s        REAL,
    run_wall_s    REAL,
    error         TEXT
);
CREATE INDEX IF NOT EXISTS runs_status_ord ON runs (status, ord);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id   TEXT NOT NULL,
    event    TEXT NOT NULL,
    at       REAL NOT NULL,
    worker   TEXT,
    detail   TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""


IGNORED_SETTINGS = ("data_dir", "device")


def same_method_settings(a: dict, b: dict, defaults: dict | None) -> bool:
    """Whether two recorded option sets of one method ran the same algorithm: equal on every
    option both recorded, and an option only one of them recorded is one the library gained
    later at its current default (or dropped since, recorded as ``None``). Without the
    method's ``defaults`` only equal sets are the same."""
    if a == b:
        return True
    if defaults is None:
        return False
    for key in set(a) | set(b):
        if key in a and key in b:
            if a[key] != b[key]:
                return False
        else:
            value = a[key] if key in a else b[key]
            if value != defaults.get(key) and not (key not in defaults and value is None):
                return False
    return True


def same_settings(stored: dict, new: dict, resolved_method_options: dict | None = None) -> bool:
    """Whether a recorded run configuration and a new one give the same run: settings that
    do not change results (where the data lives, the device) are ignored, a setting the
    record lacks (one added to :class:`RunConfig` since) counts as its default, and method
    options are compared with the options the run resolved (defaults included) when it
    recorded them — so asking explicitly for the value a default had then is the same run.
    A run whose method's algorithm version (:meth:`metacorrect.methods.Method.algorithm_version`
    of its resolved options) differs from the version the new options give is never the same."""
    import dataclasses
    from .run import RunConfig
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(RunConfig)}
    keys = (set(stored) | set(new)) - set(IGNORED_SETTINGS) - {"method_options"}
    if not all(stored.get(k, defaults.get(k)) == new.get(k, defaults.get(k)) for k in keys):
        return False
    from ..methods import algorithm_version
    if resolved_method_options is not None:
        now = RunConfig.from_dict(new)
        if algorithm_version(new["method"], resolved_method_options) != now.method_version():
            return False  # the method's algorithm changed since the run
        resolved_now = now.resolved_method_options()
        if resolved_now is not None and not same_method_settings(resolved_method_options, resolved_now,
                                                                 resolved_now):
            return False  # a default changed since the run: it would run otherwise now
    old_opts, new_opts = stored.get("method_options") or {}, new.get("method_options") or {}
    if old_opts == new_opts:
        return True
    if resolved_method_options is None:
        return False
    # every option asked for now had that value then, and nothing asked for then is dropped now
    return set(old_opts) <= set(new_opts) and all(
        k in resolved_method_options and resolved_method_options[k] == v for k, v in new_opts.items())


# small pages: a packed row is 1-3 KB, and 4 KB pages left a third of the file empty
PAGE_SIZE = 1024


def db_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / DB_NAME


class ResultsStore:
    """A connection to a sweep's results database (one per process)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False, timeout: float = 120.0):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no results database at {self.path} (is it a sweep folder of `metacorrect sweep`?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
        self.con = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.con.row_factory = sqlite3.Row
        self.con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self.con.execute("PRAGMA journal_mode = WAL")
        self.con.execute("PRAGMA synchronous = NORMAL")
        if create:
            with self.transaction():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.con.execute(stmt)
                self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception)."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def checkpoint(self, passive: bool = False) -> None:
        """Fold the write-ahead log into the database file (so that the file alone is complete);
        ``passive`` never waits for other connections."""
        try:
            self.con.execute(f"PRAGMA wal_checkpoint({'PASSIVE' if passive else 'TRUNCATE'})")
        except sqlite3.OperationalError:  # pragma: no cover - busy: the next one will do
            pass

    def compact(self) -> None:
        """Repack the JSON columns of rows stored otherwise than :func:`pack_json` stores them
        now (plain text from older versions, another dictionary, other rounding), then rewrite
        the file without free pages (``VACUUM``): the database is committed with the results,
        so it should stay small. Repacking is idempotent (a packed row packs to the same
        bytes). Call it when no other process uses the database."""
        columns = ", ".join(PACKED_COLUMNS)
        rows = self.con.execute(f"SELECT run_id, {columns} FROM runs").fetchall()
        with self.transaction() as con:
            for r in rows:
                packed = pack_columns({c: load_json(r[c]) for c in PACKED_COLUMNS})
                changed = {c: v for c, v in packed.items() if v != r[c]}
                if changed:
                    con.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in changed)} WHERE run_id = ?",
                                (*changed.values(), r["run_id"]))
        self.checkpoint()
        try:  # the page size changes only outside WAL mode, with no other connection open
            self.con.execute("PRAGMA journal_mode = DELETE")
            self.con.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            self.con.execute("VACUUM")
        except sqlite3.OperationalError:  # pragma: no cover - another reader: keep the page size
            self.con.execute("VACUUM")
        finally:
            self.con.execute("PRAGMA journal_mode = WAL")

    # ------------------------------------------------------------------ meta
    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def get_meta(self, key: str, default=None):
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------ registration
    def register(self, specs: Iterable, *, on_changed: str = "error") -> dict:
        """Insert the grid's runs that are not there yet (``pending``) and refresh the order.

        A run already in the database with another fingerprint (its settings changed) is an
        error (``on_changed='error'``), or is reset to ``pending`` (``'rerun'``).
        Returns counts: ``{'new': n, 'changed': n, 'existing': n}``.
        """
        now = time.time()
        counts = {"new": 0, "changed": 0, "existing": 0}
        changed = []
        with self.transaction() as con:
            for spec in specs:
                cfg = spec.config
                cfg_json = pack_json(json.dumps(cfg.to_dict(), sort_keys=True, default=str))
                fp = cfg.fingerprint()
                row = con.execute("SELECT fingerprint, status FROM runs WHERE run_id = ?", (spec.run_id,)).fetchone()
                if row is None:
                    axes = spec.axes
                    con.execute(
                        "INSERT INTO runs (run_id, ord, dataset, noise, label_set, strength, trusted, method, seed, "
                        "config_json, fingerprint, status, created_at, run_dir) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                        (spec.run_id, spec.order, axes["dataset"], axes["noise"], axes["label_set"], axes["strength"],
                         axes["trusted"], axes["method"], axes["seed"], cfg_json, fp, now, f"runs/{spec.run_id}"))
                    counts["new"] += 1
                    continue
                counts["existing"] += 1
                full = con.execute("SELECT config_json, resolved_json, status FROM runs WHERE run_id = ?",
                                   (spec.run_id,)).fetchone()
                resolved = load_json(full["resolved_json"]).get("method_options") if full["resolved_json"] else None
                if row["fingerprint"] != fp and full["status"] == "pending":
                    # never finished: it simply runs with the new settings
                    con.execute("UPDATE runs SET config_json = ?, fingerprint = ? WHERE run_id = ?",
                                (cfg_json, fp, spec.run_id))
                elif row["fingerprint"] != fp and not same_settings(load_json(full["config_json"]), cfg.to_dict(),
                                                                    resolved):
                    changed.append(spec.run_id)
                    if on_changed == "rerun":
                        con.execute("UPDATE runs SET config_json = ?, fingerprint = ?, status = 'pending', claim = NULL, "
                                    "epochs_done = 0, epochs_json = NULL, final_json = NULL, test_acc = NULL, "
                                    "test_error = NULL, t_error = NULL, T_hat_json = NULL, error = NULL, "
                                    "finished_at = NULL, wall_s = NULL, run_wall_s = NULL WHERE run_id = ?",
                                    (cfg_json, fp, spec.run_id))
                        con.execute("INSERT INTO events (run_id, event, at, detail) VALUES (?, 'reset', ?, ?)",
                                    (spec.run_id, now, "settings changed"))
                con.execute("UPDATE runs SET ord = ? WHERE run_id = ?", (spec.order, spec.run_id))
            if changed and on_changed != "rerun":
                raise ValueError(
                    f"{len(changed)} run(s) in {self.path} were made with other settings than this sweep now gives "
                    f"them (e.g. {changed[0]}); use another --out folder, or pass --rerun-changed to run them again "
                    f"with the new settings")
        counts["changed"] = len(changed)
        return counts

    def recover(self, *, retry_failed: bool = True) -> dict:
        """At the start of a sweep (its folder lock held): runs left ``running`` by a killed
        sweep go back to ``pending`` (they resume from their checkpoint); failed runs too
        when ``retry_failed``."""
        now = time.time()
        with self.transaction() as con:
            stale = con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()
            for r in stale:
                con.execute("INSERT INTO events (run_id, event, at, detail) VALUES (?, 'interrupted', ?, ?)",
                            (r["run_id"], now, "found running when a sweep started; back to pending"))
            con.execute("UPDATE runs SET status = 'pending', claim = NULL WHERE status = 'running'")
            failed = 0
            if retry_failed:
                failed = con.execute("UPDATE runs SET status = 'pending', claim = NULL WHERE status = 'failed'").rowcount
        return {"interrupted": len(stale), "failed_retried": failed}

    # ------------------------------------------------------------------ the life of a run
    def claim(self, worker: str, run_ids: list[str] | None = None) -> sqlite3.Row | None:
        """Atomically take the first pending run (in grid order), or ``None`` when none is left."""
        token = uuid.uuid4().hex
        now = time.time()
        with self.transaction() as con:
            if run_ids is None:
                row = con.execute("SELECT run_id FROM runs WHERE status = 'pending' ORDER BY ord LIMIT 1").fetchone()
            else:
                marks = ",".join("?" * len(run_ids))
                row = con.execute(f"SELECT run_id FROM runs WHERE status = 'pending' AND run_id IN ({marks}) "
                                  f"ORDER BY ord LIMIT 1", run_ids).fetchone() if run_ids else None
            if row is None:
                return None
            con.execute("UPDATE runs SET status = 'running', claim = ?, worker = ?, claimed_at = ?, heartbeat_at = ?, "
                        "attempts = attempts + 1, error = NULL WHERE run_id = ?",
                        (token, worker, now, now, row["run_id"]))
            return con.execute("SELECT * FROM runs WHERE run_id = ?", (row["run_id"],)).fetchone()

    def event(self, run_id: str, event: str, worker: str | None = None, detail: str | None = None) -> None:
        with self.transaction() as con:
            con.execute("INSERT INTO events (run_id, event, at, worker, detail) VALUES (?, ?, ?, ?, ?)",
                        (run_id, event, time.time(), worker, detail))

    def heartbeat(self, run_id: str, claim: str, epochs_done: int) -> None:
        with self.transaction() as con:
            con.execute("UPDATE runs SET heartbeat_at = ?, epochs_done = ? WHERE run_id = ? AND claim = ?",
                        (time.time(), epochs_done, run_id, claim))

    def finish(self, run_id: str, claim: str, fields: dict, worker: str | None = None) -> bool:
        """Commit a finished run's results (one transaction); False when the claim was lost."""
        fields = dict(fields, status="done", finished_at=time.time(), error=None)
        return self._close_run(run_id, claim, fields, "done", worker)

    def fail(self, run_id: str, claim: str, error: str, fields: dict | None = None, worker: str | None = None) -> bool:
        fields = dict(fields or {}, status="failed", finished_at=time.time(), error=error)
        return self._close_run(run_id, claim, fields, "failed", worker, detail=error.strip().splitlines()[-1][:500]
                               if error.strip() else None)

    def _close_run(self, run_id, claim, fields, event, worker, detail=None) -> bool:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as con:
            cur = con.execute(f"UPDATE runs SET {cols}, claim = NULL WHERE run_id = ? AND claim = ?",
                              (*fields.values(), run_id, claim))
            if cur.rowcount != 1:
                return False
            con.execute("INSERT INTO events (run_id, event, at, worker, detail) VALUES (?, ?, ?, ?, ?)",
                        (run_id, event, time.time(), worker, detail))
        return True

    # ------------------------------------------------------------------ reading
    def rows(self, status: str | None = None) -> list[dict]:
        q = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY ord"
        return [dict(r) for r in self.con.execute(q, (status,) if status else ())]

    def counts(self) -> dict:
        out = {s: 0 for s in STATUSES}
        for status, n in self.con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            out[status] = n
        out["total"] = sum(out[s] for s in STATUSES)
        return out

    def events(self, run_id: str | None = None) -> list[dict]:
        q = "SELECT * FROM events" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY id"
        return [dict(r) for r in self.con.execute(q, (run_id,) if run_id else ())]


__all__ = ["DB_NAME", "PACKED_COLUMNS", "ResultsStore", "STATUSES", "db_path", "load_json", "pack_columns",
           "pack_json"]
