"""The information measures behind MLC's relative trusted weights (``'relative_debiased'``,
version 5, and ``'relative_tested'``, version 6), and the weights themselves: r = 1
for clean labels, r -> 0 for uninformative ones, the plug-in bias removed, the permutation
seeded (an exact resume), a trusted side without information beyond chance read as none,
bad options refused."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metacorrect.methods import create_method
from metacorrect.methods.information import (_mutual_information, carries_information, label_information_share,
                                             prediction_information, prediction_joint)
from metacorrect.methods.mlc import RELATIVE_SHARE_FLOOR, _relative_share
from metacorrect.train import TensorBatchLoader, TrainContext

from digits_fit import fit_digits_mlc


def _plug_in(probs, labels):
    return _mutual_information(prediction_joint(probs, labels))


def test_predictions_independent_of_the_labels_carry_about_no_information_once_debiased():
    # Twitter POS's shape: 23 classes, ~1,400 held-out tokens. The plug-in estimate is biased
    # upward (here ~0.07 nats for soft predictions); over 50 draws the debiased one had mean
    # 0.000 and SD 0.006, so 0.03 is five of its standard deviations
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels = torch.randint(0, 23, (1400,), generator=g)
        probs = torch.softmax(3 * torch.randn(1400, 23, generator=g), 1)
        assert _plug_in(probs, labels) > 0.05
        assert abs(prediction_information(probs, labels)) < 0.03


def test_perfect_predictions_carry_the_labels_entropy_and_the_permutation_is_seeded():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (2000,), generator=g)
    probs = F.one_hot(labels, 10).double()
    entropy = float(-(torch.bincount(labels) / 2000 * (torch.bincount(labels) / 2000).log()).sum())
    # less the permuted labels' plug-in bias, about (C - 1)^2 / 2N = 0.02 nats
    assert entropy - 0.05 < prediction_information(probs, labels) < entropy
    soft = torch.softmax(torch.randn(2000, 10, generator=g), 1)
    shuffled = torch.randperm(2000, generator=g)  # the examples in another order (distributed: rank by rank)
    assert prediction_information(soft, labels) == pytest.approx(prediction_information(soft[shuffled],
                                                                                         labels[shuffled]), abs=1e-12)


def test_relative_share_of_a_perfect_network_is_the_labels_share_of_information():
    # a network that names the true class: r = I(Y; noisy) / H(Y), the closed form
    g = torch.Generator().manual_seed(2)
    C, s, n = 10, 0.6, 2000
    T = (1 - s) * torch.eye(C) + s / C
    truth = label_information_share(T, torch.full((C,), 1 / C))  # 0.185
    for _ in range(3):
        y_heldout = torch.randint(0, C, (n,), generator=g)
        noisy = torch.multinomial(T[y_heldout], 1, generator=g)[:, 0]
        y_trusted = torch.randint(0, C, (n,), generator=g)
        r = _relative_share(prediction_information(F.one_hot(y_heldout, C).double(), noisy),
                            prediction_information(F.one_hot(y_trusted, C).double(), y_trusted))
        assert r == pytest.approx(truth, abs=0.03)  # SD of r over draws ~0.01
    assert _relative_share(0.4, 0.8) == 0.5 and _relative_share(-0.01, 0.8) == 0.0
    # no information on the trusted side: the noisy labels taught nothing about clean ones
    assert _relative_share(0.3, 0.0) == 0.0 and _relative_share(0.0, -0.02) == 0.0


def test_the_permutation_test_finds_information_only_where_there_is_some():
    g = torch.Generator().manual_seed(3)
    # the shape of MNIST's 0.1 % trusted set: 60 images, 10 classes. Predictions independent
    # of the labels: the test (p < 0.01) says "information" in 1 % of draws; seeded, these
    # five draws never do, while the debiased information is positive in some of them
    positive = 0
    for _ in range(5):
        labels = torch.randint(0, 10, (60,), generator=g)
        probs = torch.softmax(torch.randn(60, 10, generator=g), 1)
        assert not carries_information(probs, labels)
        positive += prediction_information(probs, labels) > 0
    assert positive >= 1  # what the sign of the debiased information alone would have taken for evidence
    # a network that names 60 % of the classes right (the rest at random) is clearly informative
    labels = torch.randint(0, 10, (60,), generator=g)
    guess = torch.where(torch.rand(60, generator=g) < 0.6, labels, torch.randint(0, 10, (60,), generator=g))
    assert carries_information(F.one_hot(guess, 10).double() * 0.9 + 0.01, labels)
    shuffled = torch.randperm(60, generator=g)  # and the answer does not depend on the examples' order
    probs = torch.softmax(torch.randn(60, 10, generator=g), 1)
    assert carries_information(probs, labels) == carries_information(probs[shuffled], labels[shuffled])


def _digits_fit(strength, epochs=3, trusted_weight="relative_debiased", **kw):
    result, _, balanced = fit_digits_mlc("uniform_mix", strength, epochs, trusted_weight=trusted_weight, **kw)
    return result, balanced


def _selected_r(result):
    estimates = [m for m in result.history if m["phase"] == "estimate"]
    return estimates[estimates[-1]["estimate_epoch"] - 1]["relative_information"]


@pytest.mark.parametrize("strength, low, high", [(0.0, 0.8, 1.2), (1.0, -0.05, 0.1)])
def test_relative_weight_on_digits_is_balanced_for_clean_labels_and_heavier_for_useless_ones(strength, low, high):
    result, balanced = _digits_fit(strength)
    r = _selected_r(result)
    # clean labels: a noisy label is worth a clean one (r = 1 but for the two sets' sampling
    # error); uniform_mix 1.0: the noisy labels are drawn independently of the class
    assert low < r < high
    assert result.method._weight == pytest.approx(balanced / min(max(r, RELATIVE_SHARE_FLOOR), 1.0), rel=1e-9)
    assert result.method.version == 5


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_version_6_weight_is_version_5s_where_the_trusted_side_carries_information(strength):
    # digits' trusted set (180 images) is informative to the estimate network at both
    # strengths (at 1.0 its random features still separate the digits): the test passes and
    # version 6 trains exactly as version 5
    v6, balanced = _digits_fit(strength, trusted_weight="relative_tested", noisy_evidence="ignored")
    v5, _ = _digits_fit(strength)
    assert v6.method.version == 6 and v5.method.version == 5
    assert all(e["information"][2] for e in v6.method._estimates)
    assert all(m["trusted_informative"] == 1.0 for m in v6.history if m["phase"] == "estimate")
    assert _selected_r(v6) == _selected_r(v5)
    assert v6.method._weight == v5.method._weight
    assert np.array_equal(v6.T, v5.T)


def test_version_6_reads_a_trusted_side_without_information_beyond_chance_as_none():
    mlc = create_method("mlc", trusted_weight="relative_tested")
    # the trusted side's debiased information is positive but not beyond chance: r = 0, where
    # version 5 divides by it (here r = 6: clamped to 1, the balanced weight)
    assert mlc._share_from((0.03, 0.005, False)) == 0.0
    assert mlc._share_from((0.03, 0.06, True)) == pytest.approx(0.5)
    v5 = create_method("mlc", trusted_weight="relative_debiased")
    assert v5._share_from((0.03, 0.005, False)) == pytest.approx(6.0)
    # a version 5 checkpoint's measurements have no test: taken as measured
    assert mlc._share_from((0.03, 0.06)) == pytest.approx(0.5)


@pytest.mark.parametrize("rule", ["relative_debiased", "relative_tested"])
def test_relative_weight_resumes_bit_exactly(tmp_path, rule):
    class Interrupt(Exception):
        pass

    full, _ = _digits_fit(0.6, trusted_weight=rule, checkpoint_path=tmp_path / "full.pt")

    def stop(metrics):
        if metrics["epoch"] == 4:  # inside the MLC phase, its weight computed from the estimates
            raise Interrupt

    with pytest.raises(Interrupt):
        _digits_fit(0.6, trusted_weight=rule, checkpoint_path=tmp_path / "cut.pt", callbacks=[stop])
    resumed, _ = _digits_fit(0.6, trusted_weight=rule, checkpoint_path=tmp_path / "cut.pt", resume=True)
    assert [e["information"] for e in resumed.method._estimates] == [e["information"] for e in full.method._estimates]
    assert resumed.method._weight == full.method._weight
    assert np.array_equal(resumed.T, full.T)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())
    # an MLC phase started from a checkpoint saved before the estimates held the information
    # (an older version's): the weight falls back to the geometric one, with a warning
    mlc = create_method("mlc", trusted_weight=rule)
    mlc._estimates = [{"epoch": 0, "losses": torch.ones(3), "T": torch.eye(3)}]
    ctx = TrainContext(model=full.model, optimizer=None, device=torch.device("cpu"), num_classes=10,
                       noisy_loader=TensorBatchLoader(torch.zeros(100, 2), torch.zeros(100, dtype=torch.long), 10),
                       trusted_loader=TensorBatchLoader(torch.zeros(20, 2), torch.zeros(20, dtype=torch.long), 10),
                       epochs=1, steps_per_epoch=10)
    with pytest.warns(UserWarning, match="using the 'geometric' weight instead"):
        assert mlc._trusted_weight(ctx) == pytest.approx(math.sqrt(5 * 20 / 100))


@pytest.mark.parametrize("rule", ["relative_debiased", "relative_tested"])
@pytest.mark.parametrize("options", [{"t_init": "identity"}, {"estimate_patience": 0}])
def test_relative_weight_needs_an_estimate_phase_that_holds_out_noisy_examples(options, rule):
    with pytest.raises(ValueError, match=f"trusted_weight='{rule}' .* needs t_init='glc' and "
                                         "estimate_patience >= 1"):
        create_method("mlc", trusted_weight=rule, **options)


def test_pooled_noisy_evidence_starts_T_from_identical_rows_where_the_noisy_labels_say_nothing():
    # uniform_mix 1.0: the noisy labels are drawn independently of the class, so the estimate
    # network's predictions carry nothing about the held-out ones (the test fails at every
    # epoch, seeded); T starts with every row the noisy labels' class frequencies and r = 0
    pooled, balanced = _digits_fit(1.0, trusted_weight="relative_tested", noisy_evidence="pooled")
    mlc = pooled.method
    assert mlc.version == 8
    selected = mlc._selected()
    assert selected["information"][3] is False
    assert [m["noisy_informative"] for m in pooled.history if m["phase"] == "estimate"] == [0.0] * len(mlc._estimates)
    frequencies = torch.bincount(pooled_noisy_labels(), minlength=10).float()
    frequencies /= frequencies.sum()
    assert torch.allclose(mlc.T_start, frequencies.expand(10, 10), atol=1e-6)
    # and T stays there: no meta step can improve on rows that labels without information make equal
    assert np.allclose(pooled.T, frequencies.expand(10, 10).numpy(), atol=1e-6)
    assert mlc.updater is None
    assert _selected_r(pooled) == 0.0
    assert mlc._weight == pytest.approx(balanced / RELATIVE_SHARE_FLOOR, rel=1e-9)
    # version 6 on the same data starts from GLC's estimate, whose rows differ
    v6, _ = _digits_fit(1.0, trusted_weight="relative_tested", noisy_evidence="ignored")
    assert (v6.method.T_start - v6.method.T_start.mean(0)).abs().max() > 0.01


def pooled_noisy_labels():
    from metacorrect.data import load_dataset
    from metacorrect.data.splits import make_problem
    return make_problem(load_dataset("digits"), "uniform_mix", 1.0, 0.1, 0).tensors("noisy")[1]


def test_pooled_noisy_evidence_changes_nothing_where_the_noisy_labels_are_informative():
    pooled, _ = _digits_fit(0.0, trusted_weight="relative_tested", noisy_evidence="pooled")
    v6, _ = _digits_fit(0.0, trusted_weight="relative_tested", noisy_evidence="ignored")
    assert all(e["information"][3] for e in pooled.method._estimates)
    assert pooled.method._weight == v6.method._weight
    assert np.array_equal(pooled.T, v6.T)
    # a checkpoint of version 6 holds three measurements per epoch: read as an informative noisy side
    mlc = create_method("mlc", noisy_evidence="pooled")
    assert not mlc._uninformative_noisy((0.03, 0.06, True))
    assert mlc._share_from((0.03, 0.06, True)) == pytest.approx(0.5)
    assert mlc._share_from((0.03, 0.06, True, False)) == 0.0


def test_pooled_noisy_evidence_resumes_bit_exactly(tmp_path):
    class Interrupt(Exception):
        pass

    options = {"trusted_weight": "relative_tested", "noisy_evidence": "pooled"}
    full, _ = _digits_fit(1.0, checkpoint_path=tmp_path / "full.pt", **options)

    def stop(metrics):
        if metrics["epoch"] == 4:  # inside the MLC phase, T started from the pooled rows
            raise Interrupt

    with pytest.raises(Interrupt):
        _digits_fit(1.0, checkpoint_path=tmp_path / "cut.pt", callbacks=[stop], **options)
    resumed, _ = _digits_fit(1.0, checkpoint_path=tmp_path / "cut.pt", resume=True, **options)
    assert np.array_equal(resumed.T, full.T)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())


def test_bounded_noisy_evidence_takes_r_1_where_only_the_noisy_side_shows_information():
    bounded, pooled = create_method("mlc", noisy_evidence="bounded"), create_method("mlc", noisy_evidence="pooled")
    assert (bounded.version, pooled.version) == (10, 8)
    assert create_method("mlc", noisy_evidence="bounded", t_evidence="trusted_batches").version == 11
    # (noisy side's information, trusted side's, trusted side beyond chance, noisy side beyond chance)
    # the trusted side fails its test, the held-out noisy side passes: its information bounds the
    # trusted side's from below (data processing), so r = 1, where version 8 reads r = 0
    assert bounded._share_from((0.03, 0.005, False, True)) == 1.0
    assert pooled._share_from((0.03, 0.005, False, True)) == 0.0
    # both sides informative: measured as before; the noisy side uninformative: pooled rows, r = 0
    assert bounded._share_from((0.03, 0.06, True, True)) == pytest.approx(0.5)
    assert bounded._share_from((0.03, 0.005, False, False)) == 0.0
    assert bounded._uninformative_noisy((0.03, 0.005, False, False))
    # a version 6 checkpoint (no noisy-side test): the noisy side is not known to be informative
    assert bounded._share_from((0.03, 0.005, False)) == 0.0
    # without the trusted-side test (version 5's weight) a trusted side with no positive information
    # is bounded the same way
    v5 = create_method("mlc", trusted_weight="relative_debiased", noisy_evidence="bounded")
    assert v5._share_from((0.03, -0.01, True, True)) == 1.0


@pytest.mark.parametrize("options, message", [
    ({"noisy_evidence": "drop"}, "noisy_evidence must be one of ('ignored', 'pooled', 'bounded'), got 'drop'"),
    ({"noisy_evidence": "pooled", "trusted_weight": "geometric"},
     "noisy_evidence='pooled' reads the estimate phase's held-out noisy side, measured for a relative trusted "
     "weight: it needs trusted_weight='relative_tested' or 'relative_debiased', got trusted_weight='geometric'"),
])
def test_bad_noisy_evidence_is_refused_naming_the_allowed_values(options, message):
    import re
    with pytest.raises(ValueError, match=re.escape(message)):
        create_method("mlc", **options)
