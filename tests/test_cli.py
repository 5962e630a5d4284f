"""The command line: train → run folder → predict; demo; data; clear errors."""

import csv
import json

import numpy as np
import pytest

from metacorrect.cli import main


def test_train_writes_the_run_folder_and_predict_applies_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "digits", "--noise", "flip", "--strength", "0.6", "--trusted", "0.1",
               "--method", "mlc", "--epochs", "2", "--seed", "0", "--out", str(out), "--set", "virtual_lr=0.1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final test accuracy" in text and "T estimation error" in text
    for name in ("config.json", "metrics.jsonl", "summary.json", "T.npy", "T.txt", "checkpoint.pt", "model.pt",
                 "labels.npz"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["method_options"]["virtual_lr"] == 0.1
    assert set(config["versions"]) >= {"python", "torch", "metacorrect"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]  # two phases of 2 epochs: GLC's estimate, then MLC
    assert all(0 <= m["test_acc"] <= 1 and "t_error" in m for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mlc" and summary["final_test_acc"] == metrics[-1]["test_acc"]
    assert {"t_error", "wall_s", "cpu_s"} <= set(summary)
    assert 0 < summary["cpu_s"]  # process CPU time of the training (a thread's time can exceed the wall's)
    T = np.load(out / "T.npy")
    assert np.allclose(T.sum(1), 1)

    assert main(["predict", str(out), "--out", str(tmp_path / "pred.csv")]) == 0
    with open(tmp_path / "pred.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 359 and {"predicted", "p_0", "p_9"} <= set(rows[0])
    acc = np.mean([int(r["predicted"]) == int(r["label"]) for r in rows])
    assert abs(acc - summary["final_test_acc"]) < 1e-9  # the same model, the same test set


def test_train_resume_on_a_finished_run_returns_it(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--method", "ce", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    first = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert main(args + ["--resume"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == first


def test_demo_runs_ce_and_mlc_and_prints_both_matrices(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "True T" in text and "T learned by MLC" in text and "cross-entropy" in text
    assert (tmp_path / "ce" / "summary.json").exists() and (tmp_path / "mlc" / "T.npy").exists()


def test_data_command_lists_the_embedded_dataset(capsys):
    assert main(["data", "--data-dir", "/nonexistent"]) == 0
    assert "digits" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["train", "--dataset", "digits", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--dataset", "digits", "--set", "bogus=1"], "has no option"),
    (["train", "--dataset", "digits", "--strength", "2"], r"strength must be in \[0, 1\]"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["predict", "/nonexistent/run"], "model.pt"),
])
def test_bad_command_lines_fail_with_a_clear_message(args, message, capsys, tmp_path):
    if args[0] == "train":
        args = args + ["--epochs", "1", "--out", str(tmp_path / "x")]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse-level and predict errors
        rc = exc.code
        err = str(exc.code) + capsys.readouterr().err
    else:
        err = capsys.readouterr().err
    assert rc not in (0, None)
    assert __import__("re").search(message, err), err
