"""The ``metacorrect`` command line: argument parsing only; each command is a thin call
into the library."""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .noise import NOISE_TYPES, format_matrix

DESCRIPTION = """\
metacorrect trains neural networks on data whose labels are partly wrong. It learns how
labels were corrupted — the transition matrix T[i, j] = P(noisy label j | true label i) —
from a small trusted (clean) subset by Meta Loss Correction (MLC, Wang, Hu & Hu, CVPR 2020),
and compares it with the classic baselines (cross-entropy, Forward, GLC, ...).

Start with `metacorrect demo` (about a minute, no download)."""


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _options(pairs: list[str] | None, flag: str) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def _fraction_or_count(text: str):
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.run import RunConfig
    d = RunConfig()
    g = p.add_argument_group("data and noise")
    g.add_argument("--dataset", default="mnist",
                   help="dataset name (see `metacorrect data`) or a path to your own data (.npz, .csv or an "
                        "image folder; see the README). Default: mnist")
    g.add_argument("--data-dir", default=None, help="data root holding one folder per dataset "
                                                    "(default: $METACORRECT_DATA, else ~/.local/share/metacorrect/data)")
    g.add_argument("--noise", default=d.noise, choices=NOISE_TYPES, help="synthetic corruption of the untrusted labels")
    g.add_argument("--strength", type=float, default=d.strength, help="corruption strength s in [0, 1]")
    g.add_argument("--trusted", type=_fraction_or_count, default=d.trusted,
                   help="trusted examples: a fraction of the training set, or a count >= 1 (stratified by class)")
    g.add_argument("--validation", type=float, default=d.validation,
                   help="fraction of the trusted set held out as clean validation data (default 0)")
    g.add_argument("--label-set", default=None, help="use a dataset's real noisy labels (cifar10n: aggre, worse, "
                                                     "random1, random2, random3) instead of --noise")
    g = p.add_argument_group("method and model")
    g.add_argument("--method", default=d.method, help="mlc (default), ce, trusted_only, forward, forward_gold, glc, "
                                                      "confusion, distillation, forward_true, l2rw, mwnet")
    g.add_argument("--set", dest="method_options", action="append", metavar="KEY=VALUE",
                   help="a method option, e.g. --set virtual_lr=0.1 --set update_every=5 (repeatable)")
    g.add_argument("--model", default=None, help="network (mlp, lenet, resnet8, resnet20, wrn40_2, word_avg, "
                                                 "window_mlp); default: the dataset's usual model")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--fused-optimizer", action="store_true",
                   help="torch's fused optimizer kernel (torch >= 2.4): much faster for the text models' "
                        "embedding tables; equal to float rounding")
    g.add_argument("--scheduler", default=d.scheduler, choices=["none", "cosine"])
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--trusted-batch-size", type=int, default=None, help="default: the batch size")
    g.add_argument("--init-weights", default=None, metavar="PATH",
                   help="initial weights: a torchvision-format state dict (e.g. ImageNet-pretrained resnet50); "
                        "checked against the model, its output layer replaced when the classes differ")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="mixed precision for training (bf16 on CPU or GPU; fp16 on GPU, with a gradient scaler)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (convolutional models)")
    g.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader worker processes decoding a streamed image dataset (clothing1m-stream)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs per training phase")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest for small models "
                        "and on a busy machine)")
    g.add_argument("--keep-train-probs", type=int, default=d.keep_train_probs, metavar="N",
                   help="save train_probs.npy: the softmax over the noisy training examples averaged over the last "
                        "N epochs (for `metacorrect errors --probs averaged`; training is unchanged). Default 0: off")


def _config_from_args(args):
    from .experiments.run import RunConfig
    return RunConfig(dataset=args.dataset, data_dir=args.data_dir, noise=args.noise, strength=args.strength,
                     trusted=args.trusted, validation=args.validation, label_set=args.label_set,
                     method=args.method, method_options=_options(args.method_options, "--set"),
                     model=args.model, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                     fused_optimizer=args.fused_optimizer,
                     scheduler=args.scheduler, batch_size=args.batch_size,
                     trusted_batch_size=args.trusted_batch_size, epochs=args.epochs, seed=args.seed,
                     init_weights=args.init_weights, loader_workers=args.loader_workers,
                     amp=args.amp, channels_last=args.channels_last,
                     device=args.device, keep_train_probs=args.keep_train_probs)


def cmd_train(args) -> int:
    from .experiments.run import run_experiment
    from .progress import ProgressBar, epoch_line
    config = _config_from_args(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{Path(str(config.dataset)).stem}-{config.method}-{config.noise}{config.strength:g}"
               f"-t{config.trusted:g}-s{config.seed}")
    from . import distributed
    import dataclasses
    config = dataclasses.replace(config, device=distributed.local_device(config.device))
    world = distributed.from_environment(resolve_device_name(config.device))
    try:
        if world.is_main:
            print(f"metacorrect {__version__}: {config.method} on {config.dataset} ({config.noise} "
                  f"s={config.strength:g}, trusted {config.trusted:g}, seed {config.seed})"
                  f"{f', {world.size} processes' if world.active else ''} -> {out}", flush=True)
        board = None
        if args.tensorboard is not None:
            from .tensorboard_logger import require_tensorboard, resolve_dir
            require_tensorboard()
            board = resolve_dir(args.tensorboard, out)
        summary = run_experiment(config, out, resume=args.resume, progress=ProgressBar(), tensorboard=board,
                                 on_epoch=lambda m: print(epoch_line(m), flush=True), world=world)
        if world.is_main:
            print(_summary_text(summary, out))
    finally:
        distributed.shutdown(world)
    return 0


def resolve_device_name(device: str):
    from .train import resolve_device
    return resolve_device(device)


def _summary_text(summary: dict, out: Path) -> str:
    lines = ["", f"method {summary['method']}: final test accuracy "
             + (f"{100 * summary['final_test_acc']:.2f}%" if summary.get("final_test_acc") is not None else "n/a")]
    if summary.get("t_error") is not None:
        lines.append(f"T estimation error (mean row L1): {summary['t_error']:.3f}")
    lines.append(f"wall time {summary['wall_s']:.1f}s; run folder {out} (metrics.jsonl, summary.json, T.txt, model.pt)")
    return "\n".join(lines)


def cmd_predict(args) -> int:
    import torch
    from .data import load_dataset
    from .models import create_model
    from .train import TensorBatchLoader
    run = Path(args.run_dir)
    model_file = run / "model.pt"
    if not model_file.exists():
        raise SystemExit(f"error: {model_file} not found: is {run} a finished run folder of `metacorrect train`?")
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    ds = load_dataset(args.dataset or saved["dataset"], args.data_dir)
    if ds.num_classes != saved["num_classes"] or list(ds.input_shape) != list(saved["input_shape"]):
        raise SystemExit(f"error: the model was trained on {saved['num_classes']} classes with inputs "
                         f"{tuple(saved['input_shape'])}; dataset {ds.name!r} has {ds.num_classes} classes and "
                         f"inputs {ds.input_shape}")
    model = create_model(saved["model"], saved["input_shape"], saved["num_classes"], **saved["model_options"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    if args.split == "test":
        if ds.x_test is None:
            raise SystemExit(f"error: dataset {ds.name!r} has no test split; use --split train")
        x, y = ds.x_test, ds.y_test
    else:
        x, y = ds.x_train, ds.y_train
    loader = TensorBatchLoader(x, torch.from_numpy(np.asarray(y)), 1000, shuffle=False, transform=ds.test_transform)
    probs = []
    with torch.no_grad():
        for xb, _ in loader:
            probs.append(torch.softmax(model(xb), 1))
    probs = torch.cat(probs).numpy()
    out = Path(args.out or run / f"predictions-{ds.name}-{args.split}.csv")
    names = saved["class_names"]
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", "predicted", "predicted_name"] + [f"p_{c}" for c in range(len(names))])
        for i, p in enumerate(probs):
            k = int(p.argmax())
            w.writerow([i, int(y[i]), k, names[k]] + [f"{v:.6f}" for v in p])
    acc = float((probs.argmax(1) == np.asarray(y)).mean())
    print(f"wrote {len(probs)} predictions to {out} (accuracy against the dataset's labels: {100 * acc:.2f}%)")
    return 0


def cmd_data(args) -> int:
    try:
        from .data.catalog import describe_datasets, format_catalog
    except ModuleNotFoundError:
        from .data import REGISTRY
        for name, info in sorted(REGISTRY.items()):
            print(f"{name:15} {info.description}")
        return 0
    print(format_catalog(describe_datasets(args.data_dir, verify=args.verify)))
    return 0


def cmd_demo(args) -> int:
    """Cross-entropy beside MLC on the embedded digits with strong flip noise."""
    import torch
    from .experiments.run import RunConfig, run_experiment
    from .progress import ProgressBar
    out = Path(args.out)
    results = {}
    print(f"metacorrect demo: UCI digits (embedded, 1,438 train / 359 test), flip noise s={args.strength:g} "
          f"(most labels of each class moved to one other class), {args.trusted:g} of the training set trusted, "
          f"{args.epochs} epochs, seed {args.seed}\n", flush=True)
    for method in ("ce", "mlc"):
        cfg = RunConfig(dataset="digits", noise="flip", strength=args.strength, trusted=args.trusted, method=method,
                        epochs=args.epochs, seed=args.seed, device=args.device)
        t0 = time.perf_counter()
        results[method] = run_experiment(cfg, out / method, progress=ProgressBar())
        print(f"  {method:4} test accuracy {100 * results[method]['final_test_acc']:6.2f}%   "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    T_hat = np.load(out / "mlc" / "T.npy")
    T_true = np.load(out / "mlc" / "labels.npz")["T_true"]
    print("\nTrue T (rows = true class, T[i, j] = P(noisy=j | true=i)):")
    print(format_matrix(T_true, 1))
    print("\nT learned by MLC:")
    print(format_matrix(T_hat, 1))
    print(f"\nT estimation error (mean row L1, 0 = exact, 2 = disjoint): {results['mlc']['t_error']:.3f}")
    print(f"\ncross-entropy {100 * results['ce']['final_test_acc']:.2f}%  vs  MLC "
          f"{100 * results['mlc']['final_test_acc']:.2f}%  — run folders in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metacorrect", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"metacorrect {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (e.g. meta-gradient fallbacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="cross-entropy vs MLC on the embedded digits with strong label noise "
                                    "(no download, about a minute)")
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--trusted", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/demo", help="where the two run folders go (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one method on one dataset and write a run folder")
    _add_run_arguments(p)
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<method>-<noise>...)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
                   help="write TensorBoard event files (loss per step, the epoch metrics, T as an image) to DIR "
                        "(default RUN_DIR/tensorboard; pip install 'metacorrect[tensorboard]')")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="apply a trained run's model; write classes and probabilities to CSV")
    p.add_argument("run_dir", help="a run folder written by `metacorrect train`")
    p.add_argument("--dataset", default=None, help="dataset name or path (default: the one it was trained on)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--out", default=None, help="CSV file (default RUN_DIR/predictions-<dataset>-<split>.csv)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="list datasets, where their files are expected, whether they are present, "
                                    "and their licences (never downloads)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--verify", action="store_true", help="also check SHA-256 checksums (slow for big files)")
    p.set_defaults(func=cmd_data)

    from .errors.cli import add_command as add_errors_command
    add_errors_command(sub)

    try:
        import importlib
        importlib.import_module(f"{__package__}.experiments.cli").add_commands(sub)
    except ModuleNotFoundError as exc:  # pragma: no cover - only while sweeps are missing
        if exc.name != f"{__package__}.experiments.cli":
            raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    plain_format = warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished epochs are checkpointed; run again with --resume to continue",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain_format


if __name__ == "__main__":
    sys.exit(main())
