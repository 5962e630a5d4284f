"""The trusted / validation / noisy split: stratified, disjoint, deterministic."""

import numpy as np
import pytest
import torch

from metacorrect.data import Dataset, load_dataset, make_problem


def toy_dataset(counts=(50, 30, 20)):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    x = torch.arange(len(y), dtype=torch.float32).unsqueeze(1)
    return Dataset(name="toy", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5], num_classes=len(counts),
                   class_names=[f"c{i}" for i in range(len(counts))], description="toy")


def test_trusted_split_is_stratified_disjoint_and_deterministic():
    ds = toy_dataset()
    p = make_problem(ds, "flip", 0.5, 0.1, seed=3, validation=0.2)
    n = len(ds.y_train)
    parts = [set(p.noisy_idx), set(p.trusted_idx), set(p.val_idx)]
    assert sum(map(len, parts)) == n and set.union(*parts) == set(range(n))
    trusted_all = np.concatenate([p.trusted_idx, p.val_idx])
    assert len(trusted_all) == 10  # 10 % of 100
    assert np.array_equal(np.bincount(ds.y_train[trusted_all], minlength=3), [5, 3, 2])
    assert len(p.val_idx) == 2
    q = make_problem(ds, "flip", 0.5, 0.1, seed=3, validation=0.2)
    assert np.array_equal(p.trusted_idx, q.trusted_idx) and np.array_equal(p.y_noisy, q.y_noisy)
    r = make_problem(ds, "flip", 0.5, 0.1, seed=4, validation=0.2)
    assert not np.array_equal(p.trusted_idx, r.trusted_idx)


def test_trusted_examples_keep_clean_labels_and_noise_follows_T():
    ds = toy_dataset((400, 400, 400))
    p = make_problem(ds, "flip", 1.0, 0.05, seed=0)
    assert np.array_equal(p.y_trusted, ds.y_train[p.trusted_idx])
    assert np.all(p.y_noisy != ds.y_train[p.noisy_idx])  # s = 1: every untrusted label flipped
    assert np.allclose(p.T_realised, p.T_true)


def test_trusted_count_and_split_independent_of_noise():
    ds = toy_dataset()
    a = make_problem(ds, "uniform_mix", 0.3, 10, seed=1)
    b = make_problem(ds, "flip", 0.9, 10, seed=1)
    assert len(a.trusted_idx) == 10
    assert np.array_equal(a.trusted_idx, b.trusted_idx)


def test_a_class_without_trusted_examples_is_a_warning_naming_it():
    ds = toy_dataset((96, 2, 2))
    with pytest.warns(UserWarning, match=r"no example of 2 class\(es\): c1, c2"):
        p = make_problem(ds, "flip", 0.2, 0.02, seed=0)
    assert p.missing_trusted_classes == [1, 2]


def test_real_label_sets_and_bad_requests():
    ds = toy_dataset()
    ds.noisy_label_sets["human"] = (ds.y_train + 1) % 3
    p = make_problem(ds, trusted=0.1, seed=0, label_set="human")
    assert np.array_equal(p.y_noisy, (ds.y_train[p.noisy_idx] + 1) % 3)
    assert p.T_true is not None and np.isclose(p.T_true[0, 1], 1)
    with pytest.raises(ValueError, match="no noisy label set 'robot'"):
        make_problem(ds, trusted=0.1, label_set="robot")
    with pytest.raises(ValueError, match=r"trusted must be in \[0, 1\]"):
        make_problem(ds, "flip", 0.2, trusted=-0.1)
    with pytest.raises(ValueError, match="only 100 are available"):
        make_problem(ds, "flip", 0.2, trusted=500)


def test_dataset_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="3 training inputs but 2 labels"):
        Dataset(name="bad", x_train=torch.zeros(3, 1), y_train=np.array([0, 1]), x_test=None, y_test=None,
                num_classes=2, class_names=["a", "b"], description="")


def test_embedded_digits_ship_with_the_package():
    ds = load_dataset("digits")
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert float(ds.x_train.max()) == 1.0


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*digits"):
        load_dataset("imagenet")


def test_dataset_rejects_nan_inputs():
    x = torch.zeros(2, 3)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="training inputs contain NaN or Inf"):
        Dataset(name="bad", x_train=x, y_train=np.array([0, 1]), x_test=None, y_test=None,
                num_classes=2, class_names=["a", "b"], description="")
