"""Progress bars (tqdm) for training steps, sweep runs and data decoding, and one-line
epoch reports.

tqdm is a dependency rather than an optional extra: it is pure Python with no
dependencies of its own, nearly every Python environment for machine learning already
has it, and one code path (no hand-written fallback) is less to keep right. Every bar
draws on stderr and only when stderr is a terminal (``disable=None``): logs, CI and
cluster jobs get the plain lines instead, as before.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def _enabled(stream) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class ProgressBar:
    """``bar(step, total, label)`` (the ``progress`` callback of :func:`metacorrect.fit`):
    one tqdm bar per label (one per epoch), cleared when its last step is done."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = _enabled(self.stream)
        self._bar = None
        self._label = None

    def __call__(self, step: int, total: int, label: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is None or label != self._label or step < self._bar.n:
            self.close()
            self._label = label
            self._bar = tqdm(total=total, desc=label, unit="step", leave=False, file=self.stream, dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RunsProgress:
    """The runs of a sweep: done / total with tqdm's rate and ETA (``update_to(done)``);
    ``write(line)`` prints a log line without breaking the bar."""

    def __init__(self, total: int, done: int = 0, desc: str = "runs", stream=None):
        self.stream = stream or sys.stderr
        self.enabled = _enabled(self.stream)
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="run", file=self.stream, dynamic_ncols=True,
                        disable=not self.enabled, smoothing=0.1)

    def update_to(self, done: int) -> None:
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


class CountProgress:
    """``progress(done, total)`` for long decodes (JPEG archives, image folders)."""

    def __init__(self, desc: str, unit: str = "image", stream=None):
        self.stream = stream or sys.stderr
        self.enabled = _enabled(self.stream)
        self.desc, self.unit = desc, unit
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, dynamic_ncols=True,
                             leave=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None


def line(text: str) -> None:
    """Print a log line to stdout; on a terminal, first clear the line a bar of another
    process (a sweep's parent) may be drawing on."""
    if _enabled(sys.stdout):
        sys.stdout.write("\r\x1b[K")
    print(text, flush=True)


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
