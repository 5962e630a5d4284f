"""How close the head-only approximation (MLC ``meta_scope='head'``) is to the exact
hypergradient while MLC trains, on the MNIST setting of the MLC issue (MLP 784-128-128-10,
Adam lr 1e-3, weight decay 1e-6, batch 32, 5 % trusted, seed 0).

    python benchmarks/head_scope.py --noise flip:0.6 --epochs 2 --every 250

MLC trains with its exact every-step meta-gradient (``update_every=1``). Every ``--every``
steps, before the step, both hypergradients ``∂L_clean(w')/∂T`` are computed on that
step's noisy and trusted batches with the current T and weights (each on a copy of the
model), and their cosine similarity is printed. The final test accuracy of the two
options is what ``benchmarks/epoch_cost.py accuracy --configs meta_scope=head`` measures.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from epoch_cost import DEFAULT_DATA, new_run, setting
from metacorrect.data import load_dataset
from metacorrect.meta import MetaGradient
from metacorrect.methods import create_method
from metacorrect.train import TensorBatchLoader, TrainContext


def hypergradient(model, method, scope, noisy, trusted):
    engine = MetaGradient(copy.deepcopy(model), method.virtual_lr, mode="fast", scope=scope)
    return engine(method.loss_fn, (method.T,), *noisy, *trusted).hypergrads[0].flatten()


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", default="flip:0.6", help="NOISE:STRENGTH")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=250, help="steps between comparisons")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset("mnist", args.data_dir)
    noise, strength = args.noise.split(":")
    _, noisy, trusted, _ = setting(ds, noise, float(strength), args.seed)
    model, opt = new_run(ds, args.seed)
    method = create_method("mlc", update_every=1)
    ctx = TrainContext(model=model, optimizer=opt, device=torch.device("cpu"), num_classes=10, noisy_loader=[],
                       trusted_loader=[], epochs=args.epochs, steps_per_epoch=len(noisy[1]) // 32 + 1)
    method.setup(ctx)
    noisy_loader = TensorBatchLoader(*noisy, 32, seed=args.seed + 1)
    trusted_loader = TensorBatchLoader(*trusted, 32, seed=args.seed + 2)
    print(f"MNIST {args.noise}, MLC exact every step; cosine(head-only hypergradient, exact hypergradient)")
    print(f"  {'epoch':>5s} {'step':>6s} {'cosine':>7s}")
    cosines, step = [], 0
    for epoch in range(args.epochs):
        trusted_iter = iter(trusted_loader)
        for nb in noisy_loader:
            tb = next(trusted_iter, None)
            if tb is None:
                trusted_iter = iter(trusted_loader)
                tb = next(trusted_iter)
            if step % args.every == 0:
                exact = hypergradient(model, method, "all", nb, tb)
                head = hypergradient(model, method, "head", nb, tb)
                cos = float(exact @ head / (exact.norm() * head.norm()).clamp_min(1e-30))
                cosines.append(cos)
                print(f"  {epoch + 1:5d} {step:6d} {cos:7.3f}")
            method.step(ctx, nb, tb)
            step += 1
    ordered = sorted(cosines)
    print(f"\n{len(cosines)} comparisons: median cosine {ordered[len(ordered) // 2]:.3f}, "
          f"min {ordered[0]:.3f}, max {ordered[-1]:.3f}")


if __name__ == "__main__":
    main()
