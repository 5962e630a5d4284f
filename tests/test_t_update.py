"""MLC's T-update rules (metacorrect.methods.t_update) and MLC's options around them.

The statistical bounds: under a hypergradient of pure noise the tested rule looks at the
evidence ``K`` times (``blocks``) and moves an entry only where its mean differs from zero by
more than ``z_crit`` standard errors. Each look is a two-sided test on at least ``B``
scaled hypergradients, whose false-positive rate is at most ``p = P(|t_{B-1}| > z_crit)``
(Student's t, a conservative stand-in for the normal at small ``B``), so the expected number
of moves over the run is at most ``K·C²·p`` (union bound over looks and entries). Each move
changes a row's L1 distance by at most ``2·4·meta_lr`` (the largest Rprop step, moved in one
entry and renormalised), so ``E[T error] ≤ 8·meta_lr·K·C·p``; Markov's inequality then
bounds the chance that a fixed-seed draw exceeds ten times that at 10 %.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from metacorrect.methods import create_method
from metacorrect.methods.t_update import T_UPDATES, TUpdate
from metacorrect.noise import t_error

from digits_fit import fit_digits_mlc


def _t_tail(df: int, z: float) -> float:
    """Two-sided tail P(|t_df| > z), by numerical integration of the density (no scipy)."""
    xs = np.linspace(z, 200.0, 400_001)
    dens = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * \
        (1 + xs ** 2 / df) ** (-(df + 1) / 2)
    return float(2 * np.trapezoid(dens, xs))


def test_tested_rule_leaves_T_at_the_identity_when_the_hypergradient_is_noise():
    C, N, lr = 4, 3000, 0.05
    up = TUpdate("tested", lr, N)
    K = math.ceil(N / up.block)
    expected_moves = K * C * C * _t_tail(up.block - 1, up.z_crit)  # union bound: 2.4 here
    gen = torch.Generator().manual_seed(0)
    T = torch.eye(C, dtype=torch.float64)
    for _ in range(N):
        T = up.step(T, torch.randn(C, C, generator=gen, dtype=torch.float64) * 7.0)
    assert torch.allclose(T.sum(1), torch.ones(C, dtype=torch.float64))
    assert up.moves <= 4 * expected_moves  # Markov: a draw fails this with probability <= 1/4
    # a move is at most 4·lr in one entry, renormalised: at most 8·lr of L1 in its row
    assert t_error(T.numpy(), np.eye(C)) <= 8 * lr * up.moves / C + 1e-12
    assert t_error(T.numpy(), np.eye(C)) < 0.1


def test_v1_rule_random_walks_under_the_same_noise():
    # the behaviour the tested rule replaces: fixed-size steps drift far from I on pure noise
    C, N = 4, 3000
    up = TUpdate("v1", 0.01, N)
    gen = torch.Generator().manual_seed(0)
    T = torch.eye(C, dtype=torch.float64)
    for _ in range(N):
        T = up.step(T, torch.randn(C, C, generator=gen, dtype=torch.float64))
    assert t_error(T.numpy(), np.eye(C)) > 0.3


def test_tested_rule_reaches_a_far_T_from_a_consistent_signal_whatever_its_scale():
    # the hypergradient of 0.5·|T − T*|² plus noise ten times its size, at two overall scales
    C = 3
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.2, 0.8], [0.6, 0.0, 0.4]], dtype=torch.float64)
    for scale in (1e-4, 1e3):
        up = TUpdate("tested", 0.05, 4000)
        gen = torch.Generator().manual_seed(1)
        T = torch.eye(C, dtype=torch.float64)
        for _ in range(4000):
            g = (T - target) + 10 * 0.1 * torch.randn(C, C, generator=gen, dtype=torch.float64)
            T = up.step(T, scale * g)
        assert t_error(T.numpy(), target.numpy()) < 0.15, scale


def _moves_under(bias: float, independent, steps: int = 600) -> int:
    """Moves of the tested rule under a hypergradient of a fixed bias in one entry plus unit
    noise everywhere (a pull that repeats in every step, as a few reused trusted examples give)."""
    up = TUpdate("tested", 0.05, steps, independent=independent)
    gen = torch.Generator().manual_seed(3)
    T = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    for _ in range(steps):
        g = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        g[0, 1] += bias
        T = up.step(T, g)
    return up.moves


def test_capped_evidence_holds_T_against_a_small_repeated_pull_and_follows_a_large_one():
    # bias 0.5 standard deviations: over n steps since the last move z ≈ 0.5·√n, past 3.5 once
    # n ≥ 49 — without a cap the entry moves; capped at 2 independent steps z ≈ 0.5·√2 ≈ 0.7,
    # which noise lifts past 3.5 only in a tail (P(|t_9| > 3.5·√(10/2)) is ~1e-8 per look)
    assert _moves_under(0.5, None) >= 5
    assert _moves_under(0.5, 2.0) == 0
    # a pull 20 standard deviations strong passes even at one independent step: z ≈ 20 per look
    assert _moves_under(20.0, 1.0) >= 5


def test_capped_evidence_rejects_a_cap_below_one():
    with pytest.raises(ValueError, match="independent meta steps must be >= 1 or None, got 0.5"):
        TUpdate("tested", 0.05, 100, independent=0.5)


def test_mlc_caps_the_evidence_at_its_disjoint_trusted_batches_only_when_asked():
    from types import SimpleNamespace
    ctx = SimpleNamespace(trusted_loader=[None] * 7)  # a loader of 7 batches per pass
    assert create_method("mlc", t_evidence="trusted_batches")._independent_steps(ctx) == 7.0
    assert create_method("mlc")._independent_steps(ctx) is None  # the default counts every meta step


def test_tested_rule_state_resumes_bit_exactly():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, 3, generator=gen) + torch.tensor([[0.5, -0.5, 0], [0, 0, 0], [0, 0, 0]])
             for _ in range(300)]
    full = TUpdate("tested", 0.05, 300)
    T_full = torch.eye(3)
    for g in grads:
        T_full = full.step(T_full, g)
    first = TUpdate("tested", 0.05, 300)
    T = torch.eye(3)
    for g in grads[:137]:  # mid-block
        T = first.step(T, g)
    second = TUpdate("tested", 0.05, 300)
    second.load_state_dict(first.state_dict(), "cpu")
    for g in grads[137:]:
        T = second.step(T, g)
    assert torch.equal(T, T_full) and not torch.equal(T_full, torch.eye(3))


def test_a_switch_given_as_a_string_is_refused_not_read_as_true():
    # "False" from a command line or a variant list must not switch trusted cross-entropy on
    with pytest.raises(ValueError, match="option trusted_ce must be true or false, got 'False'"):
        create_method("mlc", trusted_ce="False")
    assert create_method("mlc", trusted_ce=False).trusted_ce is False


@pytest.mark.parametrize("options, message", [
    ({"meta_lr": 0}, "meta_lr must be a number > 0"),
    ({"meta_lr": -0.1}, "meta_lr must be a number > 0"),
    ({"meta_lr": float("nan")}, "meta_lr must be a number > 0"),
    ({"t_update": "sgd"}, re.escape(f"t_update must be one of {T_UPDATES}")),
    ({"t_space": "both"}, "t_space must be one of"),
    ({"t_init": "random"}, "t_init must be"),
    ({"t_warmup": 1.0}, r"t_warmup must be a fraction in \[0, 1\)"),
    ({"t_blocks": 0}, "t_blocks must be >= 1"),
    ({"z_crit": -1.0}, "z_crit must be >= 0"),
    ({"update_every": 0}, "update_every must be >= 1"),
    ({"t_evidence": "all"}, re.escape("t_evidence must be one of ('meta_steps', 'trusted_batches'), got 'all'")),
    ({"t_evidence": "trusted_batches", "t_update": "adam"},
     re.escape("t_evidence='trusted_batches' caps the evidence of the tested rule's z-test; it needs "
               "t_update='tested', got t_update='adam'")),
])
def test_bad_mlc_options_name_the_option_and_the_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("mlc", **options)


def test_released_and_v1_are_one_option_each_and_versioned():
    released = create_method("mlc", t_update="released")
    assert (released.reset_each_step, released.t_space, released.normalise, released.update_every) == \
        (True, "logits", "columns", 1)
    assert released.meta_lr == 0.11 and released.version == 3  # its algorithm has not changed since
    v1 = create_method("mlc", t_update="v1")
    assert v1.meta_lr == 0.01 and v1.version == 1
    assert create_method("mlc").version == 8
    assert create_method("mlc").noisy_evidence == "pooled"
    assert create_method("mlc", noisy_evidence="ignored").version == 6
    assert create_method("mlc").trusted_weight == "relative_tested"
    assert create_method("mlc", trusted_weight="relative_debiased").version == 5
    assert create_method("mlc", t_evidence="trusted_batches", noisy_evidence="ignored").version == 7  # not adopted
    assert create_method("mlc", t_evidence="trusted_batches").version == 9  # the cap beside version 8
    assert create_method("mlc", trusted_weight="geometric").version == 4
    # from the identity there is no estimate phase to measure r on: the geometric weight
    assert create_method("mlc", t_init="identity").trusted_weight == "geometric"
    assert create_method("mlc", trusted_weight=1.0).version == 3  # version 3: the noisy batch's weight
    assert create_method("mlc", estimate_patience=0).version == 2  # T from the last estimate epoch


def _digits_mlc(strength, epochs=30):
    result, T_true, _ = fit_digits_mlc("flip", strength, epochs)
    return result, T_true


def test_default_mlc_on_clean_labels_keeps_T_near_the_identity():
    # the bound: T starts at GLC's estimate and each move of the tested rule adds at most
    # 8·meta_lr / C to the mean row L1 (see the module docstring)
    result, T_true = _digits_mlc(0.0)
    mlc = result.method
    start = t_error(mlc.T_start.double().numpy(), T_true)
    final = t_error(result.T, T_true)
    assert final <= start + 8 * mlc.meta_lr * mlc.updater.moves / T_true.shape[0] + 1e-6
    assert final < 0.1


def test_default_mlc_learns_a_flip_far_from_the_identity():
    result, T_true = _digits_mlc(1.0)
    assert t_error(np.eye(10), T_true) == 2.0
    assert t_error(result.T, T_true) < 0.15
    assert result.history[-1]["test_acc"] > 0.9
