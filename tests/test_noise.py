"""Noise models: builders, corruption statistics, realised matrices, cleanlab orientation,
and the validation of bad inputs."""

import numpy as np
import pytest
import torch

from metacorrect import noise


def test_uniform_mix_is_glc_formula_and_keeps_the_true_label_possible():
    T = noise.uniform_mix(4, 0.8)
    assert np.allclose(T.sum(1), 1)
    assert np.isclose(T[0, 0], 0.2 + 0.8 / 4)
    assert np.isclose(T[0, 1], 0.8 / 4)
    assert np.allclose(noise.uniform_mix(4, 1.0), 0.25)


def test_symmetric_and_pair():
    S = noise.symmetric(5, 0.4)
    assert np.allclose(np.diag(S), 0.6) and np.isclose(S[0, 1], 0.1) and np.allclose(S.sum(1), 1)
    P = noise.pair(3, 0.3)
    assert np.allclose(P, [[0.7, 0.3, 0], [0, 0.7, 0.3], [0.3, 0, 0.7]])


def test_flip_puts_all_mass_on_one_other_class_and_matches_glc_seed():
    T = noise.flip(10, 0.6)
    assert np.allclose(T.sum(1), 1)
    assert np.allclose(np.diag(T), 0.4)
    off = T - np.diag(np.diag(T))
    assert np.all((off > 0).sum(1) == 1) and np.allclose(off.max(1), 0.6)
    # GLC's flip_labels_C: np.random.seed(1), then one choice per row among the other classes
    np.random.seed(1)
    rows = np.arange(10)
    expected = [np.random.choice(rows[rows != i]) for i in range(10)]
    assert list(off.argmax(1)) == expected
    assert not np.allclose(noise.flip(10, 0.6, seed=2), T)


def test_hierarchical_spreads_within_the_superclass_only():
    coarse = np.array([0, 0, 0, 1, 1, 2])
    T = noise.hierarchical(coarse, 0.5)
    assert np.allclose(T.sum(1), 1)
    assert np.allclose(T[0], [0.5, 0.25, 0.25, 0, 0, 0])
    assert np.allclose(T[3], [0, 0, 0, 0.5, 0.5, 0])
    assert np.allclose(T[5], [0, 0, 0, 0, 0, 1])  # alone in its superclass: keeps its label


@pytest.mark.parametrize("builder", [lambda: noise.uniform_mix(10, 0.7), lambda: noise.flip(10, 0.45),
                                     lambda: noise.symmetric(10, 0.3), lambda: noise.pair(10, 0.35)])
def test_corrupt_realises_T_within_four_binomial_standard_errors(builder):
    T = builder()
    n_per_class = 2500
    clean = np.repeat(np.arange(10), n_per_class)  # 25,000 samples
    noisy = noise.corrupt(clean, T, rng=123)
    R = noise.realised_matrix(clean, noisy, 10)
    se = np.sqrt(T * (1 - T) / n_per_class)
    assert np.all(np.abs(R - T) <= 4 * se + 1e-12)


def test_corrupt_exact_counts_and_determinism():
    T = noise.flip(5, 0.3)
    clean = np.repeat(np.arange(5), 100)
    noisy = noise.corrupt(clean, T, rng=0, exact=True)
    assert np.allclose(noise.realised_matrix(clean, noisy, 5), T)
    assert np.array_equal(noise.corrupt(clean, T, rng=7), noise.corrupt(clean, T, rng=7))
    assert not np.array_equal(noise.corrupt(clean, T, rng=7), noise.corrupt(clean, T, rng=8))


def test_corrupt_accepts_torch_tensors():
    T = torch.tensor(noise.symmetric(3, 0.2))
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    out = noise.corrupt(labels, T, rng=0)
    assert out.dtype == np.int64 and out.shape == (6,)


def test_cleanlab_converters_transpose_and_round_trip():
    T = noise.flip(4, 0.3)
    nm = noise.to_cleanlab(T)
    assert np.allclose(nm.sum(0), 1)  # cleanlab's columns sum to one
    assert np.isclose(nm[np.argmax(T[0, 1:]) + 1, 0], 0.3)  # noise_matrix[noisy][true]
    assert np.allclose(noise.from_cleanlab(nm), T)


def test_t_error_is_mean_row_l1():
    A = np.eye(3)
    B = noise.symmetric(3, 0.3)
    assert np.isclose(noise.t_error(A, B), 0.6)
    assert noise.t_error(B, B) == 0


# ---------------------------------------------------------------- bad inputs, messages asserted
@pytest.mark.parametrize("T, message", [
    (np.ones((3, 2)) / 2, "square"),
    (np.array([[1.2, -0.2], [0, 1]]), "negative entry"),
    (np.array([[np.nan, 1], [0, 1]]), "NaN or Inf"),
    (np.array([[0.5, 0.4], [0, 1]]), "row 0 sums to 0.9"),
    (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
    (np.array([[1.0]]), "at least 2 classes"),
])
def test_bad_transition_matrices_are_rejected_with_a_clear_message(T, message):
    with pytest.raises(ValueError, match=message):
        noise.corrupt(np.array([0, 1]), T)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 5]), "contains 5, out of range"),
    (np.array([0, -1]), "contains -1, out of range"),
    (np.array([0.0, 1.0]), "integer dtype"),
    (np.zeros((2, 2), dtype=int), "1-D array"),
])
def test_bad_labels_are_rejected_with_a_clear_message(labels, message):
    with pytest.raises(ValueError, match=message):
        noise.corrupt(labels, noise.symmetric(3, 0.1))


@pytest.mark.parametrize("call, message", [
    (lambda: noise.uniform_mix(10, 1.5), r"strength must be in \[0, 1\]"),
    (lambda: noise.flip(1, 0.2), "integer >= 2"),
    (lambda: noise.transition_matrix("salt", 10, 0.2), "unknown noise type 'salt'"),
    (lambda: noise.transition_matrix("hierarchical", 10, 0.2), "superclass"),
    (lambda: noise.realised_matrix([0, 1], [0], 2), "same length"),
    (lambda: noise.t_error(np.eye(3), np.eye(4)), "must be 3×3"),
])
def test_bad_noise_arguments_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
