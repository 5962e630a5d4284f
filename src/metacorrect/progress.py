"""A dependency-free progress bar for the terminal and one-line epoch reports."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """``bar(step, total, label)`` redraws one line on stderr, at most 10 times a second,
    and only when stderr is a terminal (logs and CI get the epoch lines instead)."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._t0 = time.perf_counter()
        self._label = None

    def __call__(self, step: int, total: int, label: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if label != self._label:
            self._label, self._t0 = label, now
        if step < total and now - self._last < 0.1:
            return
        self._last = now
        frac = step / max(total, 1)
        filled = int(self.width * frac)
        rate = step / max(now - self._t0, 1e-9)
        self.stream.write(f"\r{label} [{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:5.1f}% "
                          f"{rate:7.1f} it/s")
        if step >= total:
            self.stream.write("\r" + " " * (len(label) + self.width + 30) + "\r")
        self.stream.flush()


def epoch_line(metrics: dict) -> str:
    """A short readable line for one epoch's metrics."""
    parts = [f"epoch {metrics['epoch']:>3} ({metrics['phase']})", f"loss {metrics['train_loss']:.4f}"]
    if "test_acc" in metrics:
        parts.append(f"test acc {100 * metrics['test_acc']:.2f}%")
    if "val_acc" in metrics:
        parts.append(f"val acc {100 * metrics['val_acc']:.2f}%")
    if "t_error" in metrics:
        parts.append(f"T error {metrics['t_error']:.3f}")
    parts.append(f"{metrics['epoch_s']:.1f}s")
    return " | ".join(parts)
