"""cProfile of one short run of a method on the MNIST setting (MLP, Adam 1e-3, batch 32),
printing the process CPU time and the top functions by own time — where a method's time goes.

    python benchmarks/profile_run.py glc --epochs 2 --data-dir ../shared/data
    python benchmarks/profile_run.py mlc --epochs 2 --data-dir ../shared/data --set t_warmup=0.0
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from metacorrect.data import load_dataset, make_problem
from metacorrect.experiments.config import parse_override
from metacorrect.methods import create_method
from metacorrect.models import create_model
from metacorrect.train import TensorBatchLoader, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--noise", default="flip")
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--trusted", type=float, default=0.01)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("mnist", args.data_dir)
    problem = make_problem(ds, args.noise, args.strength, args.trusted, 0)
    options = {".".join(k): v for k, v in map(parse_override, args.set)}
    torch.manual_seed(0)
    model = create_model("mlp", ds.input_shape, ds.num_classes)
    noisy = TensorBatchLoader(*problem.tensors("noisy"), 32, seed=1, transform=ds.train_transform)
    trusted = TensorBatchLoader(*problem.tensors("trusted"), 32, seed=2, transform=ds.train_transform)
    profile = cProfile.Profile()
    t0 = time.process_time()
    profile.enable()
    fit(model, torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-6), noisy, trusted,
        create_method(args.method, **options), epochs=args.epochs, num_classes=ds.num_classes, device="cpu")
    profile.disable()
    print(f"{args.method} {options}: {time.process_time() - t0:.1f} s CPU for {args.epochs} epochs per phase")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
