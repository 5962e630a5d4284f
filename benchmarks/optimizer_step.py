"""Where a training step of the text models spends its time, with torch's default Adam
and with the fused kernel (``RunConfig.fused_optimizer``).

    python benchmarks/optimizer_step.py --data-dir ../shared/data
    python benchmarks/optimizer_step.py --denormals --data-dir ../shared/data


For each preset's model (Twitter: ``window_mlp`` over the feature table, batch 64;
SST: ``word_avg``, batch 50) on random ids of the dataset's vocabulary size, the median
CPU time (one thread) of the forward, the backward and the optimizer step over
``--steps`` plain cross-entropy steps, for ``foreach=False`` (torch's CPU default),
``foreach=True`` and ``fused=True``.

``--denormals``: the Twitter model trained 2,000 steps with fused Adam on its first
960 tokens (15 batches, cycled), with subnormal floats kept and then flushed to zero
(``torch.set_flush_denormal``): the optimizer step's time and the count of subnormal
entries in Adam's moment estimates of the embedding table every 400 steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from epoch_cost import DEFAULT_DATA
from metacorrect.data import load_dataset
from metacorrect.models import create_model

SETTINGS = {  # dataset: (model, batch size, lr, weight decay) as in the presets
    "twitter_pos": ("window_mlp", 64, 1e-3, 5e-5),
    "sst": ("word_avg", 50, 5e-4, 0.0),
}
KINDS = {"default": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure(name, ds, kind, steps):
    model_name, batch, lr, wd = SETTINGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, ds.input_shape, ds.num_classes, vocab_size=ds.extra["vocab_size"])
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, **KINDS[kind])
    x = torch.as_tensor(ds.x_train[:batch])
    y = torch.as_tensor(ds.y_train[:batch]).long()
    parts = {"forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 3):
        t0 = time.process_time()
        loss = F.cross_entropy(model(x), y)
        t1 = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.process_time()
        opt.step()
        t3 = time.process_time()
        if i >= 3:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
    params = sum(p.numel() for p in model.parameters())
    return {k: statistics.median(v) * 1e3 for k, v in parts.items()}, params


def denormals(ds, steps: int = 2000):
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        torch.manual_seed(0)
        model = create_model("window_mlp", ds.input_shape, ds.num_classes, vocab_size=ds.extra["vocab_size"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-5, fused=True)
        x, y = torch.as_tensor(ds.x_train[:960]), torch.as_tensor(ds.y_train[:960]).long()
        tiny = torch.finfo(torch.float32).tiny
        print(f"subnormals {'flushed to zero' if flush else 'kept'}:")
        start = time.process_time()
        for i in range(steps):
            b = slice((i % 15) * 64, (i % 15 + 1) * 64)
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t = time.process_time()
            opt.step()
            dt = time.process_time() - t
            if i % 400 == 0 or i == steps - 1:
                state = opt.state[model.embed.weight]
                counts = [int(((z != 0) & (z.abs() < tiny)).sum()) for z in (state["exp_avg"], state["exp_avg_sq"])]
                print(f"  step {i:5d}: optimizer step {dt * 1e3:6.1f} ms, subnormal entries exp_avg {counts[0]:,} "
                      f"exp_avg_sq {counts[1]:,}")
        print(f"  {steps} steps: {time.process_time() - start:.1f} s CPU")
    torch.set_flush_denormal(False)


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--denormals", action="store_true", help="the subnormal-float measurement instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.denormals:
        return denormals(load_dataset("twitter_pos", args.data_dir))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median CPU ms per step over {args.steps}")
    for name in SETTINGS:
        ds = load_dataset(name, args.data_dir)
        for kind in KINDS:
            ms, params = measure(name, ds, kind, args.steps)
            total = sum(ms.values())
            print(f"  {name:12s} {SETTINGS[name][0]:11s} ({params:,} parameters) Adam {kind:8s} "
                  f"forward {ms['forward']:6.2f}  backward {ms['backward']:6.2f}  optimizer {ms['optimizer']:6.2f}"
                  f"  step {total:6.2f}")


if __name__ == "__main__":
    main()
