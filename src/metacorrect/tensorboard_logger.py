"""TensorBoard event files of a run (``--tensorboard``), written with torch's ``SummaryWriter``.

One folder per run (default ``RUN_DIR/tensorboard``; a sweep's runs then sit side by side
under ``SWEEP_DIR/runs`` for ``tensorboard --logdir SWEEP_DIR/runs``), holding:

* ``step/train_loss`` — the training loss of every step, at the run's global step;
* every numeric metric of ``metrics.jsonl`` under the same name (``train_loss``,
  ``test_acc``, ``val_acc``, ``t_error``, ``epoch_s``, …), at the epoch number;
* ``T`` — the learned/estimated T each epoch as a grayscale image (rows = true classes,
  white = 1), and ``T_true`` once when the true T is known.

Resumed runs append to the same folder: the writer is opened with ``purge_step`` set to
the first step it logs, so steps logged after the last checkpoint by the interrupted
attempt are discarded by TensorBoard (they are trained again). Needs the ``tensorboard``
package: ``pip install 'metacorrect[tensorboard]'``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install 'metacorrect[tensorboard]'"
SKIPPED_METRICS = ("epoch", "phase_epoch")


def require_tensorboard():
    """torch's ``SummaryWriter`` class, or a clear error naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError(f"--tensorboard needs the tensorboard package, an optional dependency: {INSTALL_HINT} "
                           f"({exc})") from None
    return SummaryWriter


def image_of(T: np.ndarray, cell: int | None = None) -> np.ndarray:
    """``T`` as an ``H×W`` float image in [0, 1], each entry a ``cell × cell`` block. Rows are
    renormalised first (an estimate is row-stochastic only up to float error, or
    column-stochastic in MLC's released-code option), as for ``T.npy``."""
    T = np.asarray(T, dtype=np.float64)
    T = np.clip(T / T.sum(1, keepdims=True).clip(min=1e-12), 0.0, 1.0).astype(np.float32)
    cell = cell or max(1, 256 // max(T.shape))
    return np.kron(T, np.ones((cell, cell), dtype=np.float32))


class TensorBoardLogger:
    """Writes one run's curves and T; the writer opens lazily at the first step logged."""

    def __init__(self, log_dir: str | os.PathLike, T_true: np.ndarray | None = None):
        self.SummaryWriter = require_tensorboard()
        self.log_dir = Path(log_dir)
        self.T_true = T_true
        self.writer = None

    def _open(self, first_step: int):
        if self.writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = self.SummaryWriter(str(self.log_dir), purge_step=first_step)
        return self.writer

    def step(self, global_step: int, loss: float) -> None:
        """The loss of training step ``global_step`` (1-based over the whole run)."""
        self._open(global_step).add_scalar("step/train_loss", loss, global_step)

    def epoch(self, metrics: dict, T: np.ndarray | None = None) -> None:
        """One epoch's metrics (a ``metrics.jsonl`` line) and the T estimated after it."""
        w = self._open(1)
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key in SKIPPED_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            w.add_scalar(key, value, epoch)
        if T is not None:
            w.add_image("T", image_of(T), epoch, dataformats="HW")
        if self.T_true is not None and epoch == 1:
            w.add_image("T_true", image_of(self.T_true), 0, dataformats="HW")
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def resolve_dir(option, run_dir: Path, run_id: str | None = None) -> Path | None:
    """Where a run's event files go: ``None`` (off), ``''``/``True`` → ``RUN_DIR/tensorboard``,
    a folder → that folder (``FOLDER/<run_id>`` for a run of a sweep)."""
    if option is None or option is False:
        return None
    if option is True or option == "":
        return Path(run_dir) / "tensorboard"
    return Path(option) / run_id if run_id else Path(option)


__all__ = ["INSTALL_HINT", "TensorBoardLogger", "image_of", "require_tensorboard", "resolve_dir"]
