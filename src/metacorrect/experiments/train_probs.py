"""Predictions on the training examples averaged over the last epochs (``keep_train_probs``).

A training-time observer, not a change to the algorithm: after each of the last ``N``
epochs of a run's final phase it takes the network's softmax over the noisy training
examples — in evaluation mode, without gradients, with the deterministic test transform, so
no random number is drawn and no weight or statistic moves — and keeps their running sum.
When training ends, the mean is written to ``train_probs.npy`` in the run folder: a float32
``N_noisy × C`` array whose row ``k`` belongs to the example ``labels.npz["noisy_idx"][k]``,
columns = classes (the network's estimate of the *clean* class, ``p(true = i | x)``, for the
corrected-loss methods). ``metacorrect errors --probs averaged`` scores label errors from it.

Resume: the running sum is checkpointed atomically to ``train_probs.partial.npz`` after each
kept epoch (with the epochs it holds), so a run resumed with ``--resume`` continues the
average exactly; an epoch run again after an interruption is not counted twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

FILE = "train_probs.npy"
PARTIAL = "train_probs.partial.npz"


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader: Iterable, device) -> np.ndarray:
    """Softmax outputs (float64 ``N × C``) of ``model`` over ``loader``, in evaluation mode;
    the model's training mode is restored."""
    was_training = model.training
    model.eval()
    out = []
    for x, _ in loader:
        x = x.to(device) if isinstance(x, torch.Tensor) else x
        out.append(torch.softmax(model(x).float(), 1).double().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)


class TrainProbsKeeper:
    """An epoch callback for :func:`metacorrect.train.fit` (see the module docstring).

    Args:
        model: the network being trained.
        loader: the noisy training examples in ``noisy_idx`` order, unshuffled, with the
            test transform.
        last: ``N``, the number of final epochs to average (≥ 1).
        final_phase: the name of the method's last phase; epochs: epochs per phase.
        out_dir: the run folder; fingerprint: the run's, stored with the partial sum.
        resume: continue a partial sum of the same run (else start afresh).
    """

    def __init__(self, model, loader, last: int, final_phase: str, epochs: int, out_dir, device,
                 fingerprint: str, resume: bool):
        self.model, self.loader, self.device = model, loader, device
        self.last, self.final_phase, self.epochs = int(last), final_phase, int(epochs)
        self.out = Path(out_dir)
        self.fingerprint = fingerprint
        self.sum: np.ndarray | None = None
        self.kept: list[int] = []
        partial = self.out / PARTIAL
        if resume and partial.exists():
            with np.load(partial) as z:
                if str(z["fingerprint"]) == fingerprint:
                    self.sum, self.kept = z["sum"].copy(), [int(e) for e in z["epochs"]]
        elif partial.exists():
            partial.unlink()

    def __call__(self, metrics: dict) -> None:
        if metrics.get("phase") != self.final_phase or metrics["phase_epoch"] <= self.epochs - self.last:
            return
        if metrics["epoch"] in self.kept:  # an epoch run again after an interruption
            return
        probs = predict_probs(self.model, self.loader, self.device)
        self.sum = probs if self.sum is None else self.sum + probs
        self.kept.append(int(metrics["epoch"]))
        _atomic_save(self.out / PARTIAL, lambda tmp: np.savez(
            tmp, sum=self.sum, epochs=np.asarray(self.kept), fingerprint=np.asarray(self.fingerprint)))

    def finish(self) -> np.ndarray:
        """Write ``train_probs.npy`` (the mean over the kept epochs) and return it."""
        if self.sum is None or len(self.kept) != self.last:
            raise RuntimeError(f"keep_train_probs: kept {len(self.kept)} of the last {self.last} epochs "
                               f"({self.kept}); the run did not finish its final phase")
        mean = (self.sum / len(self.kept)).astype(np.float32)
        _atomic_save(self.out / FILE, lambda tmp: np.save(tmp, mean))
        (self.out / PARTIAL).unlink(missing_ok=True)
        return mean
