"""Write label-error results: the CSV, the cleanlab export and the terminal summary.

Every file is written atomically (a temporary file beside it, then a rename), so a failure
leaves no partial file.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from ..noise import to_cleanlab
from .scoring import LabelErrors

CSV_COLUMNS = ("index", "path", "given_label", "suggested_label", "given_name", "suggested_name",
               "error_probability", "is_suspected")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def csv_text(errors: LabelErrors, index: np.ndarray, class_names: list[str] | None = None,
             paths: list[str] | None = None) -> str:
    """The CSV (sorted by ``error_probability``, highest first): ``index`` (the example's row
    in the user's data), ``path`` (image folders only), ``given_label``, ``suggested_label``,
    ``given_name`` / ``suggested_name`` (when the dataset has class names other than the
    indices), ``error_probability`` and ``is_suspected`` (0/1)."""
    names = class_names if class_names and list(class_names) != [str(i) for i in range(len(class_names))] else None
    columns = [c for c in CSV_COLUMNS if (c != "path" or paths is not None)
               and (c not in ("given_name", "suggested_name") or names is not None)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for n in errors.order:
        g, s = int(errors.given[n]), int(errors.suggested[n])
        row = {"index": int(index[n]), "path": paths[n] if paths is not None else "", "given_label": g,
               "suggested_label": s, "given_name": names[g] if names else "", "suggested_name": names[s] if names else "",
               "error_probability": f"{errors.error_probability[n]:.6f}", "is_suspected": int(errors.is_suspected[n])}
        w.writerow([row[c] for c in columns])
    return buf.getvalue()


def write_csv(path, errors: LabelErrors, index, class_names=None, paths=None) -> Path:
    path = Path(path)
    atomic_write_bytes(path, csv_text(errors, np.asarray(index), class_names, paths).encode())
    return path


def export_pred_probs(path, probs: np.ndarray, errors: LabelErrors, index) -> Path:
    """An ``.npz`` for cleanlab: ``pred_probs`` (``N × C``, the probabilities the scorer used),
    ``labels`` (given) and ``index`` (rows in the user's data) — so that
    ``cleanlab.filter.find_label_issues(labels, pred_probs)`` runs on them directly — plus
    ``T`` (ours, rows = true class), ``noise_matrix`` (cleanlab's orientation, ``T``
    transposed) and ``posterior`` / ``error_probability`` / ``is_suspected`` (ours)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"--export-pred-probs expects a file name ending in .npz, got {str(path)!r}")
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    buf = io.BytesIO()
    np.savez(buf, pred_probs=probs, labels=errors.given.astype(np.int64), index=np.asarray(index, np.int64),
             T=errors.T, noise_matrix=to_cleanlab(errors.T), posterior=errors.posterior,
             error_probability=errors.error_probability, is_suspected=errors.is_suspected)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def summary_text(errors: LabelErrors, class_names: list[str], *, y_clean=None, top_confusions: int = 5) -> str:
    """The terminal summary: estimated noise rates (overall and per class), the largest
    confusions, how many were flagged and, when the clean labels are known (built-in
    datasets), precision and recall."""
    C = errors.num_classes
    names = [str(c) for c in class_names] if class_names else [str(i) for i in range(C)]
    width = max(5, max(len(n) for n in names))
    lines = [f"estimated noise rate: {100 * errors.noise_rate:.1f}% of the {errors.num_examples:,} scored labels "
             f"(~{errors.expected_errors:,.0f} wrong, the sum of the error probabilities; T̂ and the class priors "
             f"alone say {100 * errors.model_noise_rate:.1f}%)",
             f"  {'class':<{width}}  {'of its true examples, labelled otherwise':>40}  {'(1 − T̂ii)':>9}  "
             f"{'of its given labels, wrong':>26}"]
    wrong, flipped, t_flip = errors.wrong_rate_of_given_class, errors.flip_rate_of_true_class, 1 - np.diag(errors.T)

    def pct(v):
        return "—" if np.isnan(v) else f"{100 * v:.1f}%"

    for c in range(C):
        lines.append(f"  {names[c]:<{width}}  {pct(flipped[c]):>40}  {pct(t_flip[c]):>9}  {pct(wrong[c]):>26}")
    conf = errors.confusions(top_confusions)
    if conf:
        lines.append("largest confusions (true → given: estimated examples): "
                     + ", ".join(f"{names[i]} → {names[j]}: {n:,.0f}" for i, j, n in conf))
    if errors.rule == "count":
        rule = "as many per given label as T̂ and the priors say are wrong, highest error probability first"
    else:
        rule = f"error probability > {errors.threshold:g}" + (": more likely wrong than right"
                                                              if errors.threshold == 0.5 else "")
    lines.append(f"flagged {int(errors.is_suspected.sum()):,} of {errors.num_examples:,} as suspected label errors "
                 f"(rule: {rule})")
    if y_clean is not None:
        truth = np.asarray(y_clean) != errors.given
        flagged = errors.is_suspected
        tp = int((truth & flagged).sum())
        precision = tp / max(int(flagged.sum()), 1)
        recall = tp / max(int(truth.sum()), 1)
        lines.append(f"against the dataset's clean labels (known for this dataset; evaluation only): "
                     f"{int(truth.sum()):,} labels are wrong; precision {precision:.3f}, recall {recall:.3f}")
    return "\n".join(lines)
