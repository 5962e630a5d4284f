"""The numbers of a sweep report, computed from its results database.

Everything here is plain Python over the rows of ``results.sqlite`` (no matplotlib):

* :func:`auc_table` — GLC's table: per dataset × noise type × trusted fraction and method,
  the mean test error over the corruption strengths (GLC's "area under the error curve"),
  averaged over seeds (± standard deviation when there are several), plus the mean over
  the rows of each dataset;
* :func:`curves` — test error per strength (the error-versus-strength curves);
* :func:`label_set_table` — real noisy labels (CIFAR-10N): test accuracy per label set ×
  method, mean ± standard deviation over seeds;
* :func:`timing_table` — time per run;
* :func:`t_error_table` — T estimation error (mean row L1) averaged over strengths.

Errors and accuracies are in percent.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..experiments.store import DB_NAME, ResultsStore, load_json, same_method_settings

METHOD_LABELS = {"trusted_only": "Trusted only", "ce": "No correction", "forward": "Forward",
                 "forward_gold": "Forward Gold", "distillation": "Distillation", "confusion": "Confusion matrix",
                 "glc": "GLC", "mlc": "MLC", "forward_true": "Forward (true T)", "l2rw": "L2RW", "mwnet": "MW-Net"}
METHOD_ORDER = ["trusted_only", "ce", "forward", "forward_gold", "distillation", "confusion", "glc", "mlc",
                "forward_true", "l2rw", "mwnet"]

JSON_FIELDS = ("config_json", "resolved_json", "epochs_json", "final_json", "T_hat_json", "T_true_json",
               "versions_json")


def method_label(name: str) -> str:
    """``'mlc'`` → ``'MLC'``; a run of an older algorithm version, ``'mlc@v1'`` → ``'MLC (v1)'``."""
    base, _, version = name.partition("@")
    return METHOD_LABELS.get(base, base) + (f" ({version})" if version else "")


def method_sort_key(name: str):
    base = name.partition("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), name)


def versioned_method(method: str, resolved_options: dict | None) -> str:
    """The name a run's results are reported under: the method's name, or ``'NAME@vK'`` when
    the run's resolved options are of an older (or other) algorithm version than the
    method's current one, so a report never averages two algorithms under one name."""
    from ..methods import METHODS, algorithm_version  # torch: imported only when a report needs it
    cls = METHODS.get(method)
    if cls is None or resolved_options is None:
        return method
    version = algorithm_version(method, resolved_options)
    return method if version == cls.VERSION else f"{method}@v{version}"


@dataclass
class SweepResults:
    """A sweep's rows (JSON columns parsed) and its configuration."""

    sweep_dir: Path
    config: dict
    runs: list[dict]
    invocations: list = field(default_factory=list)

    @property
    def done(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "done" and r["test_error"] is not None]

    def counts(self) -> dict:
        out = defaultdict(int)
        for r in self.runs:
            out[r["status"]] += 1
        out["total"] = len(self.runs)
        return dict(out)

    def methods(self) -> list[str]:
        order = list(self.config.get("grid", {}).get("methods", []))
        extra = sorted({r["method"] for r in self.runs} - set(order), key=method_sort_key)
        present = [m for m in order if any(r["method"] == m for r in self.runs)]
        # an older version of a method sits beside it
        return sorted(present + extra, key=lambda m: (present.index(m.partition("@")[0])
                                                     if m.partition("@")[0] in present else len(present), m))

    def expected_strengths(self) -> int | None:
        s = self.config.get("grid", {}).get("strengths")
        return len(s) if s else None

    def published(self) -> dict:
        return self.config.get("published", {}) or {}


def load_results(sweep_dir: str | Path) -> SweepResults:
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / DB_NAME
    if not path.exists():
        raise FileNotFoundError(f"{sweep_dir} holds no {DB_NAME}: is it a sweep folder of `metacorrect sweep`?")
    with ResultsStore(path) as store:
        rows = store.rows()
        config = store.get_meta("config", {}) or {}
        invocations = store.get_meta("invocations", []) or []
    for r in rows:
        for key in JSON_FIELDS:
            r[key.removesuffix("_json")] = load_json(r[key]) if r.get(key) else None
        if r["status"] == "done":
            r["method"] = versioned_method(r["method"], (r.get("resolved") or {}).get("method_options"))
    return SweepResults(sweep_dir, config, rows, invocations)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def _synthetic(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["label_set"] is None and r["strength"] is not None]


def auc_table(results: SweepResults) -> list[dict]:
    """One record per dataset × noise × trusted × method (``kind='row'``) and per dataset ×
    method (``kind='mean'``: the mean of that method's rows), in percent.

    ``mean_error`` is the mean over seeds of the mean test error over the strengths done;
    ``n_strengths`` the fewest strengths any seed has; ``complete`` whether every seed has
    every strength of the grid.
    """
    expected = results.expected_strengths()
    cells: dict = defaultdict(lambda: defaultdict(dict))  # (ds, noise, trusted, method) -> seed -> strength -> err
    for r in _synthetic(results.done):
        cells[(r["dataset"], r["noise"], r["trusted"], r["method"])][r["seed"]][r["strength"]] = 100 * r["test_error"]
    records = []
    for (ds, noise, trusted, method), by_seed in cells.items():
        per_seed = [statistics.fmean(v.values()) for v in by_seed.values()]
        mean, std = _mean_std(per_seed)
        n_str = min(len(v) for v in by_seed.values())
        complete = expected is None or all(len(v) >= expected for v in by_seed.values())
        records.append({"kind": "row", "dataset": ds, "noise": noise, "trusted": trusted, "method": method,
                        "mean_error": mean, "std": std, "n_seeds": len(by_seed), "n_strengths": n_str,
                        "complete": complete})
    records.sort(key=lambda x: (x["dataset"], x["noise"], x["trusted"], method_sort_key(x["method"])))
    means = []
    by_ds_method = defaultdict(list)
    for rec in records:
        by_ds_method[(rec["dataset"], rec["method"])].append(rec)
    n_rows = {ds: len({(x["noise"], x["trusted"]) for x in records if x["dataset"] == ds})
              for ds in {x["dataset"] for x in records}}
    for (ds, method), recs in by_ds_method.items():
        means.append({"kind": "mean", "dataset": ds, "noise": "mean", "trusted": None, "method": method,
                      "mean_error": statistics.fmean(x["mean_error"] for x in recs), "std": None,
                      "n_seeds": min(x["n_seeds"] for x in recs), "n_strengths": min(x["n_strengths"] for x in recs),
                      "n_rows": len(recs),
                      "complete": all(x["complete"] for x in recs) and len(recs) == n_rows[ds]})
    means.sort(key=lambda x: (x["dataset"], method_sort_key(x["method"])))
    return records + means


def curves(results: SweepResults) -> list[dict]:
    """Test error (%) per dataset × noise × trusted × method × strength, mean ± std over seeds."""
    groups = defaultdict(list)
    for r in _synthetic(results.done):
        groups[(r["dataset"], r["noise"], r["trusted"], r["method"], r["strength"])].append(100 * r["test_error"])
    out = []
    for (ds, noise, trusted, method, strength), errs in groups.items():
        mean, std = _mean_std(errs)
        out.append({"dataset": ds, "noise": noise, "trusted": trusted, "method": method, "strength": strength,
                    "test_error": mean, "std": std, "n_seeds": len(errs)})
    out.sort(key=lambda x: (x["dataset"], x["noise"], x["trusted"], method_sort_key(x["method"]), x["strength"]))
    return out


def label_set_table(results: SweepResults) -> list[dict]:
    """Real noisy labels: test accuracy (%) per dataset × label set × trusted × method, mean ± std over seeds."""
    groups = defaultdict(list)
    for r in results.done:
        if r["label_set"] is not None:
            groups[(r["dataset"], r["label_set"], r["trusted"], r["method"])].append(100 * r["test_acc"])
    out = []
    for (ds, ls, trusted, method), accs in groups.items():
        mean, std = _mean_std(accs)
        out.append({"dataset": ds, "label_set": ls, "trusted": trusted, "method": method, "test_acc": mean,
                    "std": std, "n_seeds": len(accs)})
    order = {ls: i for i, ls in enumerate(results.config.get("grid", {}).get("label_sets", []))}
    out.sort(key=lambda x: (x["dataset"], order.get(x["label_set"], 99), x["label_set"], x["trusted"],
                            method_sort_key(x["method"])))
    return out


def timing_table(results: SweepResults) -> list[dict]:
    """Seconds per run (training wall time as the run folder reports it, and the worker's
    wall time including data preparation) per dataset × method."""
    groups = defaultdict(list)
    for r in results.done:
        groups[(r["dataset"], r["method"])].append(r)
    out = []
    for (ds, method), rs in groups.items():
        train = [r["wall_s"] for r in rs if r["wall_s"] is not None]
        total = [r["run_wall_s"] for r in rs if r["run_wall_s"] is not None]
        out.append({"dataset": ds, "method": method, "runs": len(rs),
                    "mean_train_s": statistics.fmean(train) if train else None,
                    "median_train_s": statistics.median(train) if train else None,
                    "max_train_s": max(train) if train else None,
                    "mean_run_s": statistics.fmean(total) if total else None,
                    "total_run_s": sum(total) if total else None})
    out.sort(key=lambda x: (x["dataset"], method_sort_key(x["method"])))
    return out


def t_error_table(results: SweepResults) -> list[dict]:
    """Mean T estimation error (mean row L1 between T̂ and the true T) over strengths."""
    groups = defaultdict(list)
    for r in _synthetic(results.done):
        if r["t_error"] is not None:
            groups[(r["dataset"], r["noise"], r["trusted"], r["method"])].append(r["t_error"])
    out = [{"dataset": ds, "noise": n, "trusted": t, "method": m, "mean_t_error": statistics.fmean(v), "n": len(v)}
           for (ds, n, t, m), v in groups.items()]
    out.sort(key=lambda x: (x["dataset"], x["noise"], x["trusted"], method_sort_key(x["method"])))
    return out


def published_rows(results: SweepResults) -> list[dict]:
    """Reference numbers from the sweep configuration's ``[published]`` table."""
    pub = results.published()
    source = pub.get("source", "published")
    out = []
    for ds, values in pub.items():
        if not isinstance(values, dict):
            continue
        for method, value in values.items():
            out.append({"dataset": ds, "method": method, "mean_error": float(value), "source": source})
    return out


def _current_defaults(method: str) -> dict | None:
    from ..methods import create_method  # torch: imported only when a report needs it
    try:
        return create_method(method).options()
    except Exception:  # an unknown or since-renamed method: no defaults to compare with
        return None


def method_options_by_method(results: SweepResults) -> dict[str, list[dict]]:
    """The distinct resolved method options each method ran with, one entry per setting that
    changes the algorithm (see :func:`same_method_settings`; of equivalent records the one
    spelled with the method's current options is kept, else the fullest). More than one
    entry means the method's settings changed during the sweep."""
    seen = defaultdict(list)
    defaults = {}
    for r in results.done:
        opts = (r.get("resolved") or {}).get("method_options")
        if opts is None:
            continue
        m = r["method"]
        if m not in defaults:
            defaults[m] = _current_defaults(m)
        current = set(defaults[m] or ())

        def fit(o):  # prefer the record spelled as the method is now, then the fullest
            return set(o) == current, len(o)

        for i, kept in enumerate(seen[m]):
            if same_method_settings(kept, opts, defaults[m]):
                if fit(opts) > fit(kept):
                    seen[m][i] = opts
                break
        else:
            seen[m].append(opts)
    return dict(seen)


def t_panels(results: SweepResults, target_strength: float = 0.6) -> list[dict]:
    """For each dataset × noise × trusted: the true T and each method's T̂ at the done
    strength closest to ``target_strength`` (lowest seed), for the heatmaps."""
    groups = defaultdict(list)
    for r in _synthetic(results.done):
        if r["T_hat"] is not None and r["T_true"] is not None:
            groups[(r["dataset"], r["noise"], r["trusted"])].append(r)
    out = []
    for (ds, noise, trusted), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        strengths = sorted({r["strength"] for r in rs})
        s = min(strengths, key=lambda v: (abs(v - target_strength), -v))
        chosen = {}
        for r in sorted((r for r in rs if r["strength"] == s), key=lambda r: r["seed"]):
            chosen.setdefault(r["method"], r)
        methods = sorted(chosen, key=method_sort_key)
        out.append({"dataset": ds, "noise": noise, "trusted": trusted, "strength": s,
                    "T_true": chosen[methods[0]]["T_true"],
                    "estimates": [(m, chosen[m]["T_hat"], chosen[m]["t_error"], chosen[m]["run_id"]) for m in methods]})
    return out


# ---------------------------------------------------------------------- formatting

def fmt_num(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def fmt_trusted(t) -> str:
    if t is None:
        return ""
    if isinstance(t, float) and t < 1:
        return f"{100 * t:g}%"
    return f"{int(t)}"


__all__ = ["METHOD_LABELS", "SweepResults", "auc_table", "curves", "fmt_num", "fmt_trusted", "label_set_table",
           "load_results", "method_label", "method_options_by_method", "method_sort_key", "published_rows",
           "same_method_settings", "t_error_table", "t_panels", "timing_table"]
