"""K-fold cross-fitting: out-of-sample clean-class probabilities for every scored example.

The run's noisy (non-trusted) examples are split into ``K`` folds, stratified by given
label (seeded by the run's seed). For each fold, the *same run configuration* is trained
again with that fold left out — the split, the trusted set and the other noisy labels stay
those of the run (:func:`metacorrect.experiments.run.run_experiment`'s ``exclude``) — and
its network predicts the held-out fold. Every scored example thus gets ``p(true | x)`` from
a network that never saw it. Costs ``K`` trainings of the run.

Layout (a sub-folder of the run folder, resumable — an interrupted cross-fit continues
where it stopped, finished folds are reused)::

    RUN_DIR/crossfit-K/folds.npz        noisy_idx and the fold (0..K-1) of each
    RUN_DIR/crossfit-K/fold-k/          an ordinary run folder (config.json, labels.npz with
                                        excluded_idx, model.pt, T.npy, summary.json, …)
    RUN_DIR/crossfit-K/fold-k/heldout.npz   probs of the held-out examples (noisy_idx order)

The posterior uses the run's own T (estimated from all of its data); each fold's T is
in its folder. ``K`` must be at least 2.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .run_folder import RunFolder, RunFolderError, load_model, predict_examples, training_seconds


@dataclass
class CrossFit:
    """``probs``: ``N × C`` out-of-sample softmax, rows in the run's ``noisy_idx`` order;
    ``fold``: ``N`` fold of each example; ``train_seconds``: the folds' training time
    (:func:`~.run_folder.training_seconds`), summed;
    ``folder``: ``RUN_DIR/crossfit-K``."""

    probs: np.ndarray
    fold: np.ndarray
    train_seconds: float
    folder: Path


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold in ``0..folds-1`` for each example, stratified by label: within each class the
    examples are shuffled (seeded) and dealt round-robin, so each fold holds ⌊n_c/K⌋ or
    ⌈n_c/K⌉ of class ``c``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0FF]))
    out = np.empty(labels.size, dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx] = (np.arange(idx.size) + start) % folds
        start += idx.size  # continue the deal where the last class ended: folds stay balanced overall
    return out


def crossfit_probs(run: RunFolder, folds: int, *, device: str = "auto",
                   log: Callable[[str], None] | None = None, progress=None) -> CrossFit:
    """Train the ``folds`` fold runs (reusing finished ones) and return the held-out
    probabilities (module docstring)."""
    from ..experiments.run import run_experiment
    from ..train import resolve_device
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    folds = int(folds)
    if folds > run.noisy_idx.size:
        raise ValueError(f"folds = {folds} is more than the {run.noisy_idx.size} examples to score")
    folder = run.path / f"crossfit-{folds}"
    fold = assign_folds(run.y_noisy, folds, run.config.seed)
    plan = folder / "folds.npz"
    if plan.exists():
        with np.load(plan) as z:
            same = np.array_equal(z["noisy_idx"], run.noisy_idx) and np.array_equal(z["fold"], fold)
        if not same:
            raise RunFolderError(f"{plan} was made for other examples than the run's; move {folder} away to "
                                 f"cross-fit afresh")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_savez(plan, noisy_idx=run.noisy_idx, fold=fold)
    config = dataclasses.replace(run.config, keep_train_probs=0, device=device,
                                 data_dir=run.config.data_dir)
    device_t = resolve_device(device)
    probs = np.zeros((run.noisy_idx.size, run.dataset.num_classes))
    seconds = 0.0
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        fold_dir = folder / f"fold-{k}"
        summary = run_experiment(config, fold_dir, resume=True, dataset=run.dataset, exclude=run.noisy_idx[held],
                                 progress=progress)
        seconds += training_seconds(summary) or 0.0
        cached = fold_dir / "heldout.npz"
        p = None
        if cached.exists():
            with np.load(cached) as z:
                if str(z["fingerprint"]) == summary["fingerprint"] and np.array_equal(z["positions"], held):
                    p = z["probs"]
        if p is None:
            import torch
            saved = torch.load(fold_dir / "model.pt", map_location="cpu", weights_only=False)
            p = predict_examples(load_model(saved, device_t), run.dataset, run.noisy_idx[held], device_t)
            _atomic_savez(cached, probs=p, positions=held, fingerprint=np.asarray(summary["fingerprint"]))
        probs[held] = p
        if log is not None:
            log(f"fold {k + 1}/{folds}: {held.size:,} held-out examples predicted "
                f"(trained {float(summary.get('wall_s') or 0):.1f}s; {fold_dir})")
    return CrossFit(probs=probs / probs.sum(1, keepdims=True), fold=fold, train_seconds=seconds, folder=folder)


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
