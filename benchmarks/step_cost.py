"""Cost of one MLC training step relative to one plain cross-entropy step.

    python benchmarks/step_cost.py                      # MLP, LeNet, ResNet-8 on CPU (+ WRN-40-2 on a GPU)
    python benchmarks/step_cost.py --models mlp --steps 40
    python benchmarks/step_cost.py --no-tune-allocator  # glibc malloc left at its defaults

The **CE step** is one plain cross-entropy training step on the noisy batch of size B:
forward, ``F.cross_entropy``, backward and one Adam step (``ce_step`` of
``metacorrect.methods.base``, the step of the ``ce`` method). Each **MLC step** is one call
of ``MLC.step(ctx, noisy, trusted)`` — the full training step, through the same
``TrainContext.optimizer_step`` (Adam) — on the same noisy batch and a trusted batch of
the same size B, on a model of the same architecture. ``trusted_ce=off`` variants leave out
the cross-entropy on the trusted batch that MLC adds to its actual step by default, so the
meta-gradient's own cost shows; ``every-k`` is ``update_every=k`` (time per step averaged
over a cycle of k steps); ``meta_batch=m`` differentiates the clean loss on the first m
trusted examples only; ``reuse-grad`` is the ``reuse_virtual_grad`` approximation; ``head-only``
the ``meta_scope='head'`` approximation.

All variants run interleaved in one process (one step of each, in a rotating order, per
round) after a warm-up, so machine load affects them alike; the table reports medians.
Memory, measured separately after the timing:

* ``peak MB``: the allocation peak of one step above the tensor memory allocated before it
  (CPU: ``torch.profiler`` with ``profile_memory=True``, summing allocations and frees in
  time order; GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated before);
* ``RSS+ MB``: the growth of the process's peak resident set over 3 steps, from a reset
  high-water mark (``/proc/self/clear_refs``; Linux only), which the torch runtime and the
  allocator's caching dominate;
* ``minflt``: minor page faults per step (``getrusage``): the symptom of glibc's malloc
  returning memory to the system after every step (see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from metacorrect import perf
from metacorrect.methods import create_method
from metacorrect.methods.base import ce_step
from metacorrect.models import create_model
from metacorrect.train import TrainContext

C = 10
CPU_MODELS = {  # name: (registry name, input shape, batch size)
    "mlp": ("mlp", (1, 28, 28), 128),
    "lenet": ("lenet", (1, 28, 28), 128),
    "resnet8": ("resnet8", (3, 32, 32), 64),
}
GPU_MODELS = {"wrn40_2": ("wrn40_2", (3, 32, 32), 64)}


def variants(k_every: int, meta_batch: int | None):
    """(label, MLC options) for each MLC variant; ``None`` options = the CE step. Every variant
    but ``every-k`` sets ``update_every=1`` (a meta step on every step), whatever MLC's default."""
    every = dict(update_every=1)
    out = [
        ("CE step", None),
        ("MLC reference, trusted_ce on", dict(every, meta_mode="reference")),
        ("MLC reference, trusted_ce off", dict(every, meta_mode="reference", trusted_ce=False)),
        ("MLC fast, trusted_ce on", dict(every, meta_mode="fast")),
        ("MLC fast, trusted_ce off", dict(every, meta_mode="fast", trusted_ce=False)),
        ("MLC fast jvp=forward, trusted_ce off", dict(every, meta_mode="fast", meta_jvp="forward", trusted_ce=False)),
        ("MLC fast jvp=reverse, trusted_ce off", dict(every, meta_mode="fast", meta_jvp="reverse", trusted_ce=False)),
        (f"MLC fast every-{k_every}, trusted_ce on", dict(meta_mode="fast", update_every=k_every)),
        (f"MLC fast every-{k_every}, trusted_ce off", dict(meta_mode="fast", update_every=k_every, trusted_ce=False)),
    ]
    if meta_batch:
        out.append((f"MLC fast meta_batch={meta_batch}, trusted_ce on", dict(every, meta_mode="fast",
                                                                           meta_batch=meta_batch)))
    out += [
        ("MLC fast reuse-grad (approx.), trusted_ce on", dict(every, meta_mode="fast", reuse_virtual_grad=True)),
        ("MLC fast reuse-grad (approx.), trusted_ce off", dict(every, meta_mode="fast", reuse_virtual_grad=True,
                                                                trusted_ce=False)),
        ("MLC head-only (approx.), trusted_ce on", dict(every, meta_mode="fast", meta_scope="head")),
        ("MLC head-only (approx.), trusted_ce off", dict(every, meta_mode="fast", meta_scope="head",
                                                         trusted_ce=False)),
    ]
    return out


class Runner:
    """One variant: its own copy of the model and optimizer, stepping over a fixed pool of batches."""

    def __init__(self, label, options, model, batches, device):
        self.label, self.options = label, options
        self.model = copy.deepcopy(model).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-6)
        self.ctx = TrainContext(model=self.model, optimizer=self.opt, device=device, num_classes=C,
                                noisy_loader=[], trusted_loader=[], epochs=1, steps_per_epoch=1000)
        self.batches = batches
        self.i = 0
        self.cycle = 1
        self.method = None
        if options is not None:
            self.method = create_method("mlc", **options)
            self.method.setup(self.ctx)
            self.cycle = int(options.get("update_every", 1))

    def one(self):
        noisy, trusted = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.method is None:
            return ce_step(self.ctx, *noisy)
        return self.method.step(self.ctx, noisy, trusted)

    def run_cycle(self):
        for _ in range(self.cycle):
            self.one()

    def sample(self, sync, clock):
        """Seconds per step: one step, or the mean over a cycle of ``update_every`` steps."""
        sync()
        t = clock()
        self.run_cycle()
        sync()
        return (clock() - t) / self.cycle


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def cpu_peak_bytes(fn) -> int:
    """Allocation peak of ``fn()`` above the allocations live before it (CPU, profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    nodes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        if n.tag == _EventType.Allocation:
            nodes.append((n.start_time_ns, n.extra_fields.alloc_size))
        stack.extend(n.children)
    cur = peak = 0
    for _, size in sorted(nodes):
        cur += size
        peak = max(peak, cur)
    return peak


def gpu_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_growth_mb(fn) -> float | None:
    """Growth of the peak RSS during ``fn()`` from a reset high-water mark (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    hwm = _status_kb("VmHWM")
    return None if before is None or hwm is None else (hwm - before) / 1024


def minflt_per_step(fn, n) -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n


def bench_model(name, spec, device, args, out=print):
    reg, shape, B = spec
    torch.manual_seed(0)
    model = create_model(reg, shape, C).to(device)
    g = torch.Generator().manual_seed(1)

    def draw(n):
        return (torch.randn(n, *shape, generator=g).to(device), torch.randint(0, C, (n,), generator=g).to(device))

    batches = [(draw(B), draw(B)) for _ in range(4)]
    runners = []
    for label, opts in variants(args.every, args.meta_batch or B // 4):
        try:
            runners.append(Runner(label, opts, model, batches, device))
        except (ValueError, TypeError) as exc:  # an option this version of MLC does not have
            out(f"  (skipped {label}: {exc})")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = CLOCKS[args.clock]
    for _ in range(args.warmup):
        for r in runners:
            r.sample(sync, clock)
    times = {r.label: [] for r in runners}
    for rnd in range(args.steps):
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
        for r in order:
            times[r.label].append(r.sample(sync, clock))
    ce = statistics.median(times["CE step"])
    rows = []
    for r in runners:
        med = statistics.median(times[r.label])
        cycle = r.run_cycle  # every-k: the peak over a whole cycle (its meta step)
        peak = gpu_peak_bytes(cycle) if device.type == "cuda" else cpu_peak_bytes(cycle)
        rss = rss_growth_mb(lambda: [cycle() for _ in range(2)]) if device.type == "cpu" else None
        flt = minflt_per_step(cycle, 3) / r.cycle
        rows.append((r.label, med, peak, rss, flt))
    ce_peak = rows[0][2]
    out(f"\n{name}: {reg} {shape}, noisy batch {B}, trusted batch {B}, {device}, "
        f"{args.steps} interleaved rounds after {args.warmup} warm-up, clock {args.clock}")
    out(f"  {'variant':46s} {'median ms':>9s} {'× CE':>6s} {'peak MB':>8s} {'× CE':>6s} {'RSS+ MB':>8s} {'minflt':>7s}")
    for label, med, peak, rss, flt in rows:
        rss_s = f"{rss:8.1f}" if rss is not None else f"{'-':>8s}"
        out(f"  {label:46s} {med * 1e3:9.2f} {med / ce:6.2f} {peak / 2**20:8.2f} "
            f"{peak / max(ce_peak, 1):6.2f} {rss_s} {flt:7.0f}")
    return rows


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="subset of: " + ", ".join([*CPU_MODELS, *GPU_MODELS]))
    ap.add_argument("--steps", type=int, default=30, help="timed interleaved rounds (medians over these)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--every", type=int, default=3, help="k of the every-k variant")
    ap.add_argument("--meta-batch", type=int, default=None, help="m of the meta_batch variant (default B/4)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: time.perf_counter; cpu: CPU time of this process (time.process_time), "
                         "robust to other processes' load when --threads 1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="leave glibc malloc at its defaults (same as METACORRECT_NO_TUNE_ALLOCATOR=1)")
    args = ap.parse_args(argv)
    if args.no_tune_allocator:
        os.environ["METACORRECT_NO_TUNE_ALLOCATOR"] = "1"
    tuned = perf.tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"allocator tuning: {tuned}")
    try:
        print(f"load average: {os.getloadavg()}")
    except OSError:
        pass
    names = args.models or [*CPU_MODELS, *(GPU_MODELS if device.type == "cuda" else {})]
    for name in names:
        spec = CPU_MODELS.get(name) or GPU_MODELS.get(name)
        if spec is None:
            sys.exit(f"unknown model {name!r}")
        bench_model(name, spec, device, args)
    try:
        print(f"\nload average after: {os.getloadavg()}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
