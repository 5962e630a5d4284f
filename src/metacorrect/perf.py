"""Process-level performance settings: the glibc malloc thresholds, and flushing
subnormal floats to zero.

Why: on CPU, torch allocates every tensor with ``malloc``. glibc serves blocks above its
mmap threshold (128 KiB at start, raised dynamically up to 32 MiB) with a fresh ``mmap``
and gives them back with ``munmap`` when the tensor dies, and it trims the top of its heap
whenever more than ``M_TRIM_THRESHOLD`` (128 KiB) is free there. A training step frees and
re-allocates the same activation-sized blocks every iteration, so the memory goes back to
the kernel after each step and is faulted in again, page by page, in the next one: the
meta steps of MLC (which hold several batch-sized activations at once) measured
4,000–80,000 minor page faults per step on a 2-core CPU, a plain CE step almost none.
Raising both thresholds keeps those blocks inside malloc's heap, where they are reused.

:func:`tune_allocator` applies this from inside the running process through
``mallopt`` (ctypes), so it needs no environment variable set before Python starts. It is
called once, automatically, when a :class:`metacorrect.meta.MetaGradient` is created on a
CPU model (MLC, L2RW, Meta-Weight-Net), and may be called by any entry point. It does
nothing (and says why) when:

* ``METACORRECT_NO_TUNE_ALLOCATOR=1`` is set (the opt-out);
* the C library is not glibc (musl, macOS, Windows) or has no ``mallopt``;
* another allocator is preloaded (``LD_PRELOAD`` names jemalloc, tcmalloc or mimalloc);
* the user has set glibc's own ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
  (or the ``GLIBC_TUNABLES`` equivalents): their choice wins.

Cost: freed memory below the thresholds is kept by the process instead of being returned
to the system (it is reused by the next step), so the resident set stays at the step's
high-water mark; blocks larger than the mmap threshold still come from ``mmap``.

**Subnormal floats** (:func:`flush_denormals`). Adam's first-moment estimate of a
parameter that stops receiving gradient decays by 0.9 per step and, after about a
thousand steps, becomes subnormal (below 1.2e-38 in float32), where x86 arithmetic is
tens of times slower: on the Twitter preset's embedding table the optimizer step went
from 4 to 80 ms after 1,600 steps, with 540,000 subnormal entries (74 s against 16 s for 2,000 steps)
(``benchmarks/optimizer_step.py --denormals``). ``torch.set_flush_denormal(True)``
(the CPU's flush-to-zero and denormals-are-zero modes) treats them as 0 — a change only
for magnitudes below 1.2e-38. :func:`metacorrect.train.fit` calls it on CPU;
``METACORRECT_KEEP_DENORMALS=1`` opts out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

OPT_OUT_ENV = "METACORRECT_NO_TUNE_ALLOCATOR"

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: blocks up to this size are served from the heap (glibc's maximum is 32 MiB on 64-bit)
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the top of the heap kept before trimming
TRIM_THRESHOLD = 512 * 2**20

_state: str | None = None


def _libc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    if not hasattr(libc, "mallopt"):
        return None
    return libc


def tune_allocator(force: bool = False) -> str:
    """Raise glibc malloc's mmap and trim thresholds for this process (once).

    Returns a one-line description of what was done (or why nothing was). Idempotent;
    ``force=True`` re-evaluates (for tests and benchmarks).
    """
    global _state
    if _state is not None and not force:
        return _state
    _state = _tune()
    log.info("metacorrect: allocator tuning: %s", _state)
    return _state


def _tune() -> str:
    if os.environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
        return f"off ({OPT_OUT_ENV} is set)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "off (another allocator is preloaded)"
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "off (glibc malloc settings already given in the environment)"
    libc = _libc()
    if libc is None:
        return "off (not glibc)"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not (ok_mmap and ok_trim):
        return "off (mallopt refused the thresholds)"
    return (f"on (glibc {libc.gnu_get_libc_version().decode()}: M_MMAP_THRESHOLD={MMAP_THRESHOLD >> 20} MiB, "
            f"M_TRIM_THRESHOLD={TRIM_THRESHOLD >> 20} MiB; opt out with {OPT_OUT_ENV}=1)")


def allocator_state() -> str | None:
    """What :func:`tune_allocator` did, or ``None`` if it has not run."""
    return _state


DENORMALS_ENV = "METACORRECT_KEEP_DENORMALS"


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on CPU (see the module docstring); returns whether the
    mode is on. Does nothing when ``METACORRECT_KEEP_DENORMALS=1`` is set or the CPU lacks
    the mode."""
    if os.environ.get(DENORMALS_ENV, "").strip() not in ("", "0"):
        return False
    import torch
    return bool(torch.set_flush_denormal(True))


AMP_MODES = ("none", "bf16", "fp16")


def autocast_forward(model, amp: str, device):
    """Run ``model``'s forward under ``torch.autocast`` (``amp``: ``'bf16'`` or ``'fp16'``),
    its outputs cast back to float32 so that losses are computed in full precision; the
    state dict and the parameters stay the model's own. Returns a function that undoes it.
    ``'none'`` changes nothing."""
    import torch
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "none":
        return lambda: None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    inner = model.forward

    def forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            out = inner(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    model.forward = forward

    def restore():
        if model.__dict__.get("forward") is forward:
            del model.forward
    return restore
