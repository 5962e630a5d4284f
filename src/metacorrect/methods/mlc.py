"""Meta Loss Correction (Wang, Hu & Hu, CVPR 2020): learn T by meta-learning.

Orientation: ``T[i, j] = P(noisy = j | true = i)`` (rows = true class, rows sum to 1).

One iteration, in the paper's order:

1. virtual step   ``w' = w − α·∇_w L_noisy(w, T)``, ``L_noisy = −log((softmax(f(x))·T)[ỹ])``;
2. meta step      the hypergradient ``g = ∇_T L_clean(w')`` on a trusted batch, exact
   (:mod:`metacorrect.meta`, fast mode), handed to the T-update rule
   (:mod:`metacorrect.methods.t_update`), which keeps T stochastic (``Π``: clamp at 0,
   renormalise each row);
3. actual step    an ordinary optimizer step on ``L_noisy(w, T_new)`` + cross-entropy on
   the trusted batch (``trusted_ce``, on by default: GLC trains on trusted data too).

The full iteration runs on every ``update_every``-th step (5 by default, 3 with the older
rules); the steps in between are optimizer steps on ``L_noisy(w, T)`` with the current T
alone.

**The default (algorithm version 8)**, the same for every dataset (no preset overrides it):

* ``t_init='glc'``: a first phase trains the network on the noisy data with cross-entropy
  (GLC's phase 1); T starts from GLC's estimate on the trusted set and the network is
  re-initialised for the MLC phase;
* ``estimate_patience=2``, ``estimate_holdout=0.1``: that first phase keeps 10 % of the
  noisy examples out of training and measures, after every epoch, how well the network
  predicts their noisy labels (held-out likelihood: the quality of its ``P(noisy | x)``,
  which GLC's estimate assumes). T starts from the estimate of the latest epoch within one
  standard error of the best; the phase stops once two epochs in a row are clearly worse
  (overfitting the noisy labels). On a plateau it runs to the end, as version 2 did;
* ``t_warmup=0.3``: T is held for the first 30 % of the MLC phase (corrected loss and
  trusted cross-entropy, no meta step): on a network that has not fitted yet the
  hypergradient is biased — measured on MNIST with clean labels, it moved T from I to a T
  error of 0.56 within the first epoch, toward the classes the young network confuses;
* ``t_update='tested'`` with ``meta_lr=0.02``: T moves only where the hypergradient's
  evidence says it is wrong (a per-entry z-test over blocks of meta steps, Rprop step sizes
  from ``meta_lr``; the block length is computed from the run's length). With no signal T
  stays where it is; with a consistent signal it gets anywhere in the simplex;
* ``update_every=5``: a meta step on every fifth iteration (docs/PERFORMANCE.md §8 for
  the cost against GLC);
* ``trusted_weight='relative_tested'``: the trusted cross-entropy weighs GLC's balanced
  weight ``update_every · n_trusted / n_noisy`` divided by r, the share of a clean label's
  information that a noisy label carries, measured at the selected estimate epoch: the
  information the network's predictions carry about the held-out noisy labels over what
  they carry about the trusted labels, each less the same with the labels permuted (the
  plug-in bias), r clamped to ``[0.01, 1]``. r is the floor where the predictions carry no
  information about the trusted labels beyond chance (a permutation test): the noisy
  labels taught nothing. A trusted example then weighs ``1/r`` noisy ones. The method
  computes it from the sizes of the two sets and the estimate phase's predictions.
* ``noisy_evidence='pooled'``: where the estimate network's predictions carry no information
  beyond chance about the held-out noisy labels (the same permutation test), the noisy labels
  say nothing about the class and no row of T can be told from another: T starts with every
  row the noisy labels' class frequencies and stays there (every T with unequal rows is then
  wrong, so there is no meta step: the corrected loss has no gradient and the network learns
  from the trusted cross-entropy), and r = 0.

Why it won (chosen on held-out clean validation data — 20 % of the trusted set, never the
test set — and on T error against the T that made the noise; the tables are in
``benchmarks/results/mlc_t_update.md``):

* the older rule (``t_update='v1'``: ``meta_lr·g / max|g|`` every step) random-walked — T
  error 0.69 at s = 0 where the truth is I; the tested rule from the identity still
  drifted (0.54), the hypergradient being biased rather than only noisy; from GLC's
  estimate without the hold it drifted to 0.12–0.16; with the hold it stayed at 0.046
  (s = 0), 0.049 (flip s = 1.0) and 0.117 (uniform_mix 0.6), all at 1 % trusted;
  ``meta_lr=0.05`` was behind on validation; every fifth iteration had the higher mean
  validation accuracy than every third at the same T error (version 2);
* version 2 fell far behind the older rule on Twitter POS under uniform noise (validation
  71.1 % against 76.8 % at uniform_mix 0.6, 5 % trusted). Its T barely moves after the
  start, so the start decides: the first phase's network had overfitted the noisy labels
  (its accuracy on the clean validation split fell from 72 % at epoch 4 to 47 % at the
  last, 15th), and GLC's estimate from it had rows with almost no diagonal. Selecting the epoch on held-out noisy examples (version 3)
  gave 76.3 % there and 71.8 % against 56.4 % at 1 % trusted, with lower T errors;
  selecting on the trusted set's accuracy instead was as good on Twitter but picks nonsense
  under flip noise (the network predicts the noisy class) and raised the T error of the
  MNIST flip 0.6, 5 % cell from 0.12 to 0.21. On MNIST version 3 is level on validation (four cells, within
  two images of 120) at a higher T error (mean 0.105 against 0.084): the last epoch's
  network gives the sharper estimate there although its held-out likelihood is worse.
  More meta steps (every iteration) or a heavier trusted cross-entropy did not close the
  Twitter gap; the older rule's advantage there comes from T moving on every iteration;
* the trusted cross-entropy's weight (version 4). Version 3 gave it the noisy batch's
  weight, 1, which makes a trusted example weigh ``n_noisy / (5·n_trusted)`` noisy ones
  (20 at 1 % trusted). On SST that overfits the small trusted set and is why version 3
  trailed GLC there. GLC's balanced weight (each trusted example one noisy one) was 1.6
  points better on SST's validation data but 1.4 worse on Twitter's, where the heavier
  trusted loss is part of MLC's lead. The geometric mean of the two was the one weight
  that helped SST (+1.1 points, about 2.5 standard errors) without a loss beyond its
  standard error on Twitter (−0.55 ± 0.44) or MNIST (level over 12 runs). A weight set by
  the noisy labels' information did not help SST: its T estimates are smooth, so the
  weight stayed near 1.

* the weight's dependence on the noise (version 5). The geometric weight is one weight
  per pair of set sizes, whatever the labels say; on Twitter POS under heavy uniform noise
  (s ≥ 0.8) version 4 was far below Trusted only, its trusted examples counted as a few
  noisy ones where a noisy label carries almost nothing. A weight from the share of
  information in T's estimate (``'information'``) took SST's smooth estimates (a weak
  network) for noisy labels and lost there; r divides the network's own weakness out (it
  appears on both sides when the noise does not depend on x given the class), and the
  permutation removes the plug-in bias of a 23 × 23 joint over ~1,400 held-out tokens,
  which had kept r too high at s = 1. On validation, paired with version 4, it was level
  on SST and ahead on Twitter POS and MNIST (docs/RESULTS.md, "MLC algorithm version 5").
* the trusted side's test (version 6). r is a ratio, and where the trusted side's
  information is a small number of either sign — a network that learned nothing, a small
  trusted set — it comes out anywhere (6 and 15 where the truth is 0, in version 5's
  grids), and the weight with it. Version 5 read only a non-positive trusted side as "no
  information"; version 6 asks for information beyond chance (p < 0.01). The test cannot
  tell noisy labels that taught nothing from a network too weak to show what they taught
  on a small trusted set: in the grids it fired on three of SST's 0.1 % runs (68 trusted
  sentences) and their T error rose (docs/RESULTS.md, version 6's grids). A floor of
  ``√balanced`` under the weight, tried beside it for MNIST's 0.1 % T drift, cost SST about
  a point on validation and was dropped (docs/RESULTS.md, "MLC algorithm version 6").

* the held-out noisy side's test (version 8). Where the noisy labels are drawn independently
  of the class (uniform_mix s = 1), GLC's estimate from a network that learned nothing has
  rows that differ by the trusted set's sampling error alone (Twitter POS at 1 % trusted: 25
  classes of about five trusted tokens each), and the corrected loss with
  such a T pulls every prediction toward one distribution, against the trusted cross-entropy.
  Pooled rows leave the trusted cross-entropy alone, as long as the meta step does not move
  them (it did: T error 0.03 → 0.15 and test accuracy 55.7 → 42.8 % over the MLC phase of the
  Twitter grid's run), so T is held there. On validation, paired with version 6:
  pooled rows (before the hold) Twitter POS +5.9 points over 12 pairs, SST +0.3 over 8, MNIST
  −0.6 ± 1.1 over 4; held, at uniform_mix 1.0: Twitter 1 % +44, +28, +26, 5 % +2.1, +0.5, +4.6,
  SST +1.5, +1.5, +0.7, +1.6, MNIST −2.5, +3.3, −0.3, +0.3 (docs/RESULTS.md, "MLC algorithm version 8").

Other algorithms, one option each:

* ``noisy_evidence='ignored'``: version 6 (T from GLC's estimate whatever the noisy side says);
* ``noisy_evidence='bounded'``: version 10 (r = 1 rather than the floor where only the held-out
  noisy side shows information; tried on SST's 0.1 % cells, not adopted, round 13);

* ``trusted_weight=1``: version 3 (the trusted cross-entropy at the noisy batch's weight);
* ``trusted_weight='relative_debiased'``: version 5 (r's trusted side taken as measured);
* ``trusted_weight='geometric'``: version 4 (``√balanced``, set by the sizes alone);
* ``t_update='v1'``: metacorrect 0.1's MLC (T from I, ``meta_lr=0.01`` times the
  hypergradient over its largest entry on every meta step);
* ``t_update='released'``: the released code's algorithm — T reset to I every iteration,
  the raw hypergradient with step 0.11, T multiplying the logits (``t_space='logits'``),
  columns normalised, a virtual step of lr 1e-3 on a loss summed over a batch of 64 (here
  ``virtual_lr=0.064`` on the batch mean) and T updated every iteration. It used the whole
  500-image clean set in every meta step: set the trusted batch size to the trusted set's
  size (``--trusted-batch-size``) for that. T there is a one-step correction, not an
  estimate: :meth:`estimated_T` returns it all the same;
* ``t_update='adam'``: Adam on T with a cosine-decayed step (the end-to-end T learners'
  optimiser), for comparison.
* ``t_evidence='trusted_batches'``: the tested rule counts at most the trusted set's
  disjoint batches as independent meta steps, so that a pull of a few reused trusted
  examples cannot pass its test (:mod:`~metacorrect.methods.t_update`). It holds T at
  GLC's estimate on small trusted sets: it removed MNIST's T drift at 0.1 % trusted but
  cost Twitter POS at 1 % on validation, where the moving T is a correction the network
  needs; not adopted (``benchmarks/results/mlc_t_update.md``, round 11).

A class absent from the trusted set gets a uniform row from GLC's estimate (with a
warning); the tested rule moves it only where the hypergradient says so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_transition_matrix
from ..meta import MetaGradient
from . import register_method
from .base import Method, Phase, ce_step
from .estimators import glc_estimate
from .information import carries_information, label_information_share, prediction_information  # noqa: F401 (re-exported)
from .losses import CORRECTED_LOSSES
from .t_update import DEFAULT_META_LR, T_UPDATES, TUpdate, project_stochastic  # noqa: F401 (re-exported)


# the released code's virtual step: SGD at lr 1e-3 on a loss summed over its batch of 64,
# which is lr 0.064 on the batch mean this library uses
RELEASED_VIRTUAL_LR = 1e-3 * 64

# the estimate phase's epoch selection (MLC.end_epoch), in standard errors of the paired
# difference of held-out losses: an epoch within SELECT_WITHIN_SE of the best can be chosen;
# the phase stops when its last epochs are all beyond STOP_BEYOND_SE
SELECT_WITHIN_SE, STOP_BEYOND_SE = 1.0, 2.0

# the trusted cross-entropy's weights computed from the data (MLC._trusted_weight); a number is the other kind
TRUSTED_WEIGHT_RULES = ("balanced", "information", "geometric", "relative_debiased", "relative_tested")
# the rules that measure r on the estimate phase's held-out noisy examples
RELATIVE_RULES = ("relative_debiased", "relative_tested")
# 'relative_*': the share r of a clean label's information a noisy one carries is
# clamped to [RELATIVE_SHARE_FLOOR, 1] (a trusted example weighs at most 100 noisy ones)
RELATIVE_SHARE_FLOOR = 0.01
# the tested rule's count of independent evidence (MLC._independent_steps): every meta step
# ('meta_steps'), or at most the trusted set's disjoint batches ('trusted_batches')
T_EVIDENCE = ("meta_steps", "trusted_batches")
# what the MLC phase reads from a held-out noisy side whose information is not beyond chance
# (MLC._uninformative_noisy): nothing ('ignored', version 6), or that the noisy labels carry no
# information about the class ('pooled': T starts from identical rows, r = 0); 'bounded' also reads
# a noisy side that does show information as a lower bound on the trusted side's (r = 1 where
# the trusted side cannot show its own)
NOISY_EVIDENCE = ("ignored", "pooled", "bounded")


def _examples(loader) -> int:
    """The number of examples a loader draws from: ``num_examples`` where it knows it
    (``TensorBatchLoader``; distributed, all ranks'), else its batches times its batch size."""
    if hasattr(loader, "num_examples"):
        return int(loader.num_examples)
    return len(loader) * int(getattr(loader, "batch_size", 1) or 1)


def _class_prior(loader, num_classes: int) -> torch.Tensor:
    """The class frequencies of a loader's labels where it holds them (``TensorBatchLoader``),
    else uniform."""
    y = getattr(loader, "y", None)
    if y is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    rows = getattr(loader, "rows", None)
    counts = torch.bincount(y if rows is None else y[rows], minlength=num_classes).double()
    return counts / counts.sum().clamp_min(1)


def _paired_z(losses: torch.Tensor, best: torch.Tensor) -> float:
    """How many standard errors the mean of ``losses − best`` (paired by example) is above 0."""
    d = losses - best
    mean = float(d.mean())
    se = float(d.std()) / math.sqrt(max(len(d), 1)) if len(d) > 1 else 0.0
    if se == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / se


def _relative_share(noisy_information: float, clean_information: float) -> float:
    """r = I(Ŷ; Ỹ) / I(Ŷ; Y): the information the estimate network's predictions carry about
    held-out noisy labels, as a share of what they carry about trusted (clean) labels — how
    many clean labels' worth of evidence a noisy label is, for this network, measured rather
    than inferred from T's estimate (both debiased, :func:`prediction_information`). 0 where
    the trusted labels' information is not positive: a network trained on the noisy labels
    that says nothing about clean ones means those labels taught nothing (its weight is then
    the floor's; chosen on validation, docs/RESULTS.md, version 5)."""
    if not clean_information > 0:
        return 0.0
    return max(noisy_information, 0.0) / clean_information


@register_method
@dataclass
class MLC(Method):
    """Meta Loss Correction. See the module docstring for the algorithm and options.

    Options:
        virtual_lr: α of the virtual SGD step.
        t_update: the T-update rule: ``'tested'`` (default), ``'v1'``, ``'released'`` or
            ``'adam'`` (:mod:`metacorrect.methods.t_update`).
        meta_lr: the rule's step for T (``None``: the rule's default — tested 0.02, v1 0.01,
            released 0.11, adam 0.01).
        t_blocks, z_crit: the tested rule's number of looks at the evidence over the run
            and its threshold in standard errors.
        t_evidence: what the tested rule's standard error counts as independent:
            ``'meta_steps'`` (default: every meta step) or ``'trusted_batches'`` (at most the
            trusted set's disjoint batches, :meth:`_independent_steps`).
        noisy_evidence: what a held-out noisy side without information beyond chance means
            (the estimate network's predictions at the selected epoch against the held-out
            noisy labels, :func:`~metacorrect.methods.information.carries_information`):
            ``'ignored'`` (nothing) or ``'pooled'`` — the noisy labels say nothing
            about the class, so no row of T can be told from another: T is every row the noisy
            labels' class frequencies for the whole MLC phase (no meta step: the corrected
            loss has no gradient), and r = 0 (the floor's trusted weight).
            ``'bounded'``: ``'pooled'``, and where the noisy side does show information
            that the trusted side cannot (its test fails, or its information is not
            positive), r = 1: under class-conditional noise the predictions cannot say more
            about the noisy labels than about the true ones (data processing), so the
            trusted side's information is at least the noisy side's (tried, not adopted:
            ``benchmarks/results/mlc_t_update.md``, round 13).
            Needs a relative trusted weight (the held-out measurements). ``None``: ``'pooled'``
            with the ``'relative_tested'`` weight (version 8), ``'ignored'`` otherwise.
        t_warmup: fraction of the MLC phase at its start during which T is held (``None``:
            0.3 for the tested rule, 0 for the others).
        trusted_ce: add cross-entropy on the trusted batch to the actual step.
        trusted_weight: the weight of that cross-entropy on the steps that carry it (the
            meta steps, and every ``update_every``-th step while T is held); ``None``:
            ``'relative_tested'`` for the tested rule from GLC's estimate with an epoch
            selection (``'geometric'`` for the tested rule otherwise), 1 for the others.
            ``'balanced'``: ``update_every · n_trusted / n_noisy``, which gives each trusted
            example the weight of a noisy one over an epoch, as GLC's phase 2 does (the
            trusted batches carry a ``1/update_every`` share of the steps, each a batch mean).
            ``'information'``: the balanced weight divided by the share of a clean label's
            information that a noisy label carries, ``I(Y; Ỹ) / H(Y)`` under the T the MLC
            phase starts from and the trusted set's class prior (a trusted example counts as
            ``H(Y) / I(Y; Ỹ)`` noisy ones), at most 1 (the noisy batch's weight).
            ``'geometric'``: the geometric mean of the balanced weight and 1, ``√balanced``
            (a trusted example weighs ``1/√balanced`` noisy ones: about 4.5 at 1 % trusted,
            where the weight 1 makes it 20 and the balanced weight 1).
            ``'relative_debiased'``: the balanced weight divided by r, the information the
            estimate network's predictions carry about the held-out noisy labels as a share
            of what they carry about the trusted labels (both debiased by a seeded label
            permutation, :func:`~metacorrect.methods.information.prediction_information`),
            at the selected estimate epoch, clamped to ``[0.01, 1]``: a trusted example
            weighs ``1/r`` noisy ones — one where the noisy labels are clean, up to 100 where
            they say nothing. Needs ``t_init='glc'`` and ``estimate_patience >= 1``; with
            streamed data (no hold-out) the geometric weight, with a warning.
            ``'relative_tested'``: ``'relative_debiased'`` with r = 0 (the floor) where the
            predictions' information about the trusted labels is not beyond chance (a
            permutation test, :func:`~metacorrect.methods.information.carries_information`).
            Same needs.
        t_init: ``'identity'``, ``'glc'`` (a GLC estimate from a first phase trained on the
            noisy data; the model is then re-initialised), or a C×C matrix (``None``:
            ``'glc'`` for the tested rule, ``'identity'`` for the others).
        estimate_epochs: with ``t_init='glc'``, the estimate phase's length as a fraction of
            the run's epochs per phase (at least one epoch; ``None``: 1, the same as GLC's).
        estimate_holdout, estimate_patience: with ``t_init='glc'``, which epoch of the estimate
            phase T starts from. A fixed ``estimate_holdout`` fraction of the noisy examples is
            kept out of that phase's training; after every epoch the network's likelihood of
            their (noisy) labels is measured — how well its softmax estimates
            ``P(noisy | x)``, which GLC's estimate assumes — and T starts from the GLC estimate
            of the latest epoch within one standard error of the best (:meth:`end_epoch`).
            The phase ends once its last ``estimate_patience`` epochs are all more than two
            standard errors worse than the best. ``estimate_patience=0``: no selection, all
            noisy examples, T from the last epoch's network (algorithm version 2). ``None``:
            2 and 0.1 with ``t_init='glc'``. The hold-out needs in-memory data
            (``TensorBatchLoader``); with streamed data (Clothing1M) the phase trains on every
            noisy example and T starts from its last epoch, with a warning.
        t_space: ``'probs'`` (``softmax(z)·T``) or ``'logits'`` (``z·T``, released code).
        normalise: ``'rows'`` (row-stochastic) or ``'columns'`` (released code).
        reset_each_step: restart T from the identity every iteration (released code).
        update_every: update T every k iterations (``None``: 5 for the tested rule, 3 for
            v1 and adam, 1 for released; see the module docstring;
            the steps in between are ordinary corrected-loss steps on the noisy batch,
            without the trusted batch). Every update is exact; only its frequency changes.
        meta_batch: use only the first ``meta_batch`` examples of each trusted batch for the
            clean loss of the meta step (``None``: the whole trusted batch). Exact for the
            smaller batch; the actual step's trusted cross-entropy still uses the whole
            trusted batch. (The trusted batch size itself is set by whoever builds the
            trusted loader — e.g. ``TensorBatchLoader(x_t, y_t, batch_size)`` or the
            CLI's batch size.)
        reuse_virtual_grad: an approximation, off by default: the actual step reuses the
            virtual step's gradient ``∇_w L_noisy(w, T_old)`` instead of a new backward
            with the updated T — so the actual step uses T from *before* the meta step,
            unlike the algorithm above. Saves one backward pass per meta step. Needs the
            fast meta-gradient (with ``meta_mode='reference'`` it has no effect).
        warmup_epochs: epochs of plain cross-entropy (noisy + trusted) before MLC starts,
            counted inside ``epochs``.
        meta_mode: ``'auto'``, ``'fast'`` or ``'reference'`` (see :mod:`metacorrect.meta`).
        meta_jvp: the fast mode's route to the Jacobian-vector product: ``'auto'``,
            ``'forward'`` or ``'reverse'`` (see :mod:`metacorrect.meta`; equal results to
            float rounding, different speed and memory).
        meta_scope: ``'all'`` (default, exact) or ``'head'``: an approximation, off by
            default — the virtual step moves only the output layer (the last ``nn.Linear``),
            so the meta step costs about one forward of the trusted batch instead of two
            backward passes and a JVP, but T is learned as if the body were fixed
            (:mod:`metacorrect.meta`). ``reuse_virtual_grad`` has no effect with it.
    """

    NAME = "mlc"
    # 11: version 10 with the evidence cap of version 7;
    # 10 (tried, not adopted): version 8 with r = 1 where only the held-out noisy side shows
    # information (``noisy_evidence='bounded'``);
    # 9: version 8 with the evidence cap of version 7;
    # 8: a held-out noisy side without information beyond chance read as labels that say
    # nothing (``noisy_evidence='pooled'``: T from identical rows, r = 0);
    # 7 (tried, not adopted): the tested rule's evidence capped at the trusted set's disjoint
    # batches (``t_evidence='trusted_batches'``, with any trusted weight);
    # 6: the relative weight with its trusted side tested (``trusted_weight='relative_tested'``);
    # 5: the trusted cross-entropy's weight from the relative information of the noisy labels
    # (``trusted_weight='relative_debiased'``);
    # 4: the trusted cross-entropy at the geometric weight (``trusted_weight='geometric'``);
    # 3: the estimate phase's epoch selected on held-out noisy examples (``estimate_patience``);
    # 2: the tested T update (``t_update='tested'``) from the last estimate epoch; 1:
    # metacorrect 0.1's rule, which every run recorded before ``t_update`` existed used
    VERSION = 8

    @classmethod
    def algorithm_version(cls, options):
        options = options or {}
        if options.get("t_update", "v1") == "v1":
            return 1
        if "estimate_patience" not in options:
            return 2  # recorded before the estimate phase selected its epoch
        # a run that starts from GLC's estimate of the last estimate epoch is version 2's algorithm
        no_selection = options.get("t_init") == "glc" and not options["estimate_patience"]
        if no_selection:
            return 2
        evidence = options.get("noisy_evidence", "ignored")
        if options.get("t_evidence", "meta_steps") == "trusted_batches":
            return {"pooled": 9, "bounded": 11}.get(evidence, 7)
        if evidence != "ignored":
            return {"pooled": 8, "bounded": 10}[evidence]
        # version 3 gave the trusted cross-entropy the noisy batch's weight (1), or any other
        # than the versions' own
        return {"geometric": 4, "relative_debiased": 5, "relative_tested": 6}.get(options.get("trusted_weight"), 3)

    virtual_lr: float = 0.1
    meta_lr: float | None = None
    t_update: str = "tested"
    t_blocks: int = 100
    t_evidence: str = "meta_steps"
    noisy_evidence: str | None = None
    t_warmup: float | None = None
    z_crit: float = 3.5
    trusted_ce: bool = True
    trusted_weight: float | None = None
    t_init: Any = None
    estimate_epochs: float | None = None
    estimate_holdout: float | None = None
    estimate_patience: int | None = None
    t_space: str = "probs"
    normalise: str = "rows"
    reset_each_step: bool = False
    update_every: int | None = None
    meta_batch: int | None = None
    reuse_virtual_grad: bool = False
    warmup_epochs: int = 0
    meta_mode: str = "auto"
    meta_jvp: str = "auto"
    meta_scope: str = "all"

    def __post_init__(self):
        self.name = self.NAME
        for opt, value, allowed in (("t_update", self.t_update, T_UPDATES),
                                    ("t_space", self.t_space, tuple(CORRECTED_LOSSES)),
                                    ("normalise", self.normalise, ("rows", "columns")),
                                    ("meta_scope", self.meta_scope, MetaGradient.SCOPES)):
            if value not in allowed:
                raise ValueError(f"mlc option {opt} must be one of {allowed}, got {value!r}")
        if self.update_every is None:
            self.update_every = {"tested": 5, "released": 1}.get(self.t_update, 3)
        if int(self.update_every) < 1:
            raise ValueError(f"mlc option update_every must be >= 1, got {self.update_every}")
        if self.meta_batch is not None and int(self.meta_batch) < 1:
            raise ValueError(f"mlc option meta_batch must be >= 1 or None, got {self.meta_batch}")
        if self.meta_jvp not in MetaGradient.JVP_ROUTES:
            raise ValueError(f"mlc option meta_jvp must be one of {MetaGradient.JVP_ROUTES}, got {self.meta_jvp!r}")
        if self.t_update == "released":
            # the released code's algorithm, all of it (see the module docstring)
            self.reset_each_step, self.t_space, self.normalise = True, "logits", "columns"
            self.update_every, self.t_init, self.virtual_lr = 1, "identity", RELEASED_VIRTUAL_LR
        # defaults that depend on the rule: the tested rule starts from GLC's estimate and holds
        # T for the first 30 % of the MLC phase; the older rules start from I at once
        if self.meta_lr is None:
            self.meta_lr = DEFAULT_META_LR[self.t_update]
        if self.t_init is None:
            self.t_init = "glc" if self.t_update == "tested" else "identity"
        if self.t_warmup is None:
            self.t_warmup = 0.3 if self.t_update == "tested" else 0.0
        if not (isinstance(self.meta_lr, (int, float)) and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"mlc option meta_lr must be a number > 0, got {self.meta_lr!r}")
        if self.t_evidence not in T_EVIDENCE:
            raise ValueError(f"mlc option t_evidence must be one of {T_EVIDENCE}, got {self.t_evidence!r}")
        if self.t_evidence != "meta_steps" and self.t_update != "tested":
            raise ValueError(f"mlc option t_evidence={self.t_evidence!r} caps the evidence of the tested rule's "
                             f"z-test; it needs t_update='tested', got t_update={self.t_update!r}")
        if int(self.t_blocks) < 1:
            raise ValueError(f"mlc option t_blocks must be >= 1, got {self.t_blocks}")
        if not 0.0 <= float(self.t_warmup) < 1.0:
            raise ValueError(f"mlc option t_warmup must be a fraction in [0, 1), got {self.t_warmup}")
        if not self.z_crit >= 0:
            raise ValueError(f"mlc option z_crit must be >= 0, got {self.z_crit}")
        if isinstance(self.t_init, str) and self.t_init not in ("identity", "glc"):
            raise ValueError(f"mlc option t_init must be 'identity', 'glc' or a C×C matrix, got {self.t_init!r}")
        if self.estimate_epochs is None:
            self.estimate_epochs = 1.0
        if not (isinstance(self.estimate_epochs, (int, float)) and 0 < self.estimate_epochs <= 1):
            raise ValueError(f"mlc option estimate_epochs must be a fraction in (0, 1], got {self.estimate_epochs!r}")
        from_glc = isinstance(self.t_init, str) and self.t_init == "glc"  # an estimate phase first
        if self.estimate_patience is None:  # an estimate phase selects its epoch (version 3)
            self.estimate_patience = 2 if from_glc else 0
        if isinstance(self.estimate_patience, bool) or not isinstance(self.estimate_patience, int) \
                or self.estimate_patience < 0:
            raise ValueError(f"mlc option estimate_patience must be an integer >= 0, got {self.estimate_patience!r}")
        if self.estimate_holdout is None:
            self.estimate_holdout = 0.1 if self.estimate_patience else 0.0
        if not (isinstance(self.estimate_holdout, (int, float)) and 0 <= self.estimate_holdout < 1):
            raise ValueError(f"mlc option estimate_holdout must be a fraction in [0, 1), got {self.estimate_holdout!r}")
        if self.estimate_patience and not self.estimate_holdout:
            raise ValueError("mlc option estimate_patience needs estimate_holdout > 0 (the held-out noisy examples "
                             "it selects the epoch on)")
        # the estimate phase holds noisy examples out and selects its epoch on them
        selects_epoch = from_glc and bool(self.estimate_patience)
        if self.trusted_weight is None:
            # version 6: the relative information where the estimate phase measures it (the
            # tested rule's own defaults); the geometric weight where it cannot
            self.trusted_weight = ("relative_tested" if selects_epoch else "geometric") if self.t_update == "tested" else 1.0
        if self.trusted_weight not in TRUSTED_WEIGHT_RULES and not (
                isinstance(self.trusted_weight, (int, float)) and not isinstance(self.trusted_weight, bool)
                and math.isfinite(self.trusted_weight) and self.trusted_weight > 0):
            *first, last = (repr(rule) for rule in TRUSTED_WEIGHT_RULES)
            raise ValueError(f"mlc option trusted_weight must be a number > 0, {', '.join(first)} or {last}, "
                             f"got {self.trusted_weight!r}")
        if self.trusted_weight in RELATIVE_RULES and not selects_epoch:
            raise ValueError(f"mlc option trusted_weight={self.trusted_weight!r} measures the noisy labels' information "
                             "on the estimate phase's held-out noisy examples: it needs t_init='glc' and "
                             f"estimate_patience >= 1, got t_init={self.t_init if isinstance(self.t_init, str) else 'a matrix'!r} "
                             f"and estimate_patience={self.estimate_patience!r}")
        if self.noisy_evidence is None:  # version 8: read the noisy side where version 6's weight is measured
            self.noisy_evidence = "pooled" if self.trusted_weight == "relative_tested" else "ignored"
        if self.noisy_evidence not in NOISY_EVIDENCE:
            raise ValueError(f"mlc option noisy_evidence must be one of {NOISY_EVIDENCE}, got {self.noisy_evidence!r}")
        if self.noisy_evidence != "ignored" and self.trusted_weight not in RELATIVE_RULES:
            raise ValueError(f"mlc option noisy_evidence={self.noisy_evidence!r} reads the estimate phase's held-out "
                             "noisy side, measured for a relative trusted weight: it needs trusted_weight="
                             f"'relative_tested' or 'relative_debiased', got trusted_weight={self.trusted_weight!r}")
        self.phases = ((Phase("estimate", "noisy", epoch_fraction=float(self.estimate_epochs),
                              holdout=float(self.estimate_holdout) if self.estimate_patience else 0.0),
                        Phase("mlc", "paired", reinit=True))
                       if from_glc else (Phase("mlc", "paired"),))
        self.loss_fn = CORRECTED_LOSSES[self.t_space]
        self.T: torch.Tensor | None = None
        self.updater: TUpdate | None = None
        self._updater_state: dict | None = None
        self._iteration = 0
        # the estimate phase's epoch selection: per epoch, the held-out losses and GLC's estimate
        self._estimates: list[dict] = []
        self._weight: float | None = None  # the trusted cross-entropy's weight, once computed
        self._held: bool | None = None  # T held at pooled rows for the whole MLC phase (_holds_T)

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if not isinstance(self.t_init, str):
            opts["t_init"] = "matrix"
        return opts

    def setup(self, ctx):
        C = ctx.num_classes
        if isinstance(self.t_init, str):
            T0 = np.eye(C)
        else:
            T0 = check_transition_matrix(self.t_init, "t_init", C)
        self.T = torch.tensor(T0, dtype=torch.float32, device=ctx.device)
        self.T_start = self.T.clone()  # where the MLC phase's T started (a diagnostic)
        if ctx.world.active:
            unsupported = [name for name, on in (("reuse_virtual_grad", self.reuse_virtual_grad),
                                                 ("meta_batch", self.meta_batch is not None),
                                                 ("meta_scope='head'", self.meta_scope == "head")) if on]
            if unsupported:
                raise ValueError(f"mlc option(s) {', '.join(unsupported)} are not available in distributed "
                                 f"training (they act on one process's batch); leave them at their defaults")
        self.updater, self._estimates, self._weight, self._held = None, [], None, None
        self.engine = MetaGradient(ctx.model, self.virtual_lr, mode=self.meta_mode, jvp=self.meta_jvp,
                                   scope=self.meta_scope, world=ctx.world)

    def _trusted_estimate(self, ctx):
        """GLC's estimate of T from the current network on the trusted set, its accuracy
        there, the information its predictions carry about the trusted labels, and whether
        that information is more than chance (:func:`carries_information`)."""
        probs, labels = ctx.predict_proba(ctx.trusted_loader)
        T0 = glc_estimate(probs.numpy(), labels.numpy(), ctx.num_classes)
        return (T0, float((probs.argmax(1) == labels).double().mean()), prediction_information(probs, labels),
                carries_information(probs, labels))

    def _holdout_losses(self, ctx) -> tuple[torch.Tensor, float, bool]:
        """The network's negative log-likelihood of each held-out noisy example's label, the
        information its predictions carry about those labels, and whether that is beyond chance."""
        probs, labels = ctx.predict_proba(ctx.holdout_loader)
        losses = -probs.double().gather(1, labels[:, None]).clamp_min(1e-12).log()[:, 0]
        return losses, prediction_information(probs, labels), carries_information(probs, labels)

    def end_epoch(self, ctx, index, epoch, metrics):
        """The estimate phase's epoch selection (``estimate_patience``): the latest epoch whose
        held-out likelihood is within one standard error of the best epoch's (paired over the
        held-out examples) — on a plateau the longer-trained, more confident network, whose
        estimate is sharper; the phase stops once its last ``estimate_patience`` epochs are
        all clearly worse than the best (more than two standard errors: overfitting)."""
        if self.phases[index].name != "estimate" or not self.estimate_patience or ctx.holdout_loader is None:
            return False
        losses, noisy_information, noisy_informative = self._holdout_losses(ctx)
        T0, acc, clean_information, clean_informative = self._trusted_estimate(ctx)
        information = (noisy_information, clean_information, clean_informative, noisy_informative)
        metrics["holdout_nll"], metrics["trusted_acc"] = float(losses.mean()), acc
        metrics["relative_information"] = self._share_from(information)
        metrics["trusted_informative"] = float(clean_informative)  # the trusted side passed the permutation test
        metrics["noisy_informative"] = float(noisy_informative)  # and the held-out noisy side
        self._estimates.append({"epoch": epoch, "losses": losses, "T": torch.tensor(T0, dtype=torch.float32),
                                "information": information})
        z = self._z_from_best()
        metrics["estimate_epoch"] = self._selected(z)["epoch"] + 1
        patience = int(self.estimate_patience)
        return len(z) > patience and all(zi > STOP_BEYOND_SE for zi in z[-patience:])

    def _z_from_best(self) -> list[float]:
        """Each estimate epoch's held-out loss above the best epoch's, in standard errors."""
        best = min(self._estimates, key=lambda e: float(e["losses"].mean()))
        return [_paired_z(e["losses"], best["losses"]) for e in self._estimates]

    def _selected(self, z: list[float] | None = None) -> dict:
        """The estimate epoch T starts from: the latest within SELECT_WITHIN_SE of the best."""
        z = self._z_from_best() if z is None else z
        return self._estimates[max(i for i, zi in enumerate(z) if zi <= SELECT_WITHIN_SE)]

    def begin_phase(self, ctx, index):
        if self.phases[index].name == "mlc" and len(self.phases) == 2:
            self._held = None  # the estimates are complete now: decide whether T is held
            if self._holds_T():
                # the noisy labels say nothing about the class: every row their class frequencies
                T0 = _class_prior(ctx.noisy_loader, ctx.num_classes).float()[None, :].repeat(ctx.num_classes, 1)
            elif self._estimates:
                T0 = self._selected()["T"]  # GLC's estimate at the selected epoch
            else:
                T0 = torch.tensor(self._trusted_estimate(ctx)[0], dtype=torch.float32)
            self.T = T0.to(ctx.device)
            self.T_start = self.T.clone()

    def _phase_steps(self, ctx) -> int:
        return max(ctx.epochs - int(self.warmup_epochs), 1) * ctx.steps_per_epoch

    def _t_warmup_steps(self, ctx) -> int:
        """Iterations at the start of the MLC phase during which T is held (``t_warmup``)."""
        return int(float(self.t_warmup) * self._phase_steps(ctx))

    def _updater(self, ctx) -> TUpdate:
        """The T-update rule, built on the first meta step: its block length depends on the
        number of meta steps the MLC phase will make, known only once the loaders are."""
        if self.updater is None:
            steps = self._phase_steps(ctx) - self._t_warmup_steps(ctx)
            self.updater = TUpdate(self.t_update, self.meta_lr, math.ceil(steps / int(self.update_every)),
                                   dim=1 if self.normalise == "rows" else 0, blocks=int(self.t_blocks),
                                   z_crit=float(self.z_crit), independent=self._independent_steps(ctx))
            if self._updater_state is not None:
                self.updater.load_state_dict(self._updater_state, self.T.device)
        return self.updater

    def _independent_steps(self, ctx) -> float | None:
        """The tested rule's cap on the meta steps its standard error counts as independent
        (``t_evidence='trusted_batches'``): the number of disjoint trusted batches, each rank's
        loader's batches per pass (distributed, a global batch is one batch of every rank)."""
        if self.t_evidence == "meta_steps":
            return None
        return float(max(len(ctx.trusted_loader), 1))

    def step(self, ctx, noisy, trusted):
        if self.phases[0].name == "estimate" and noisy is not None and trusted is None:
            return ce_step(ctx, *noisy)  # phase 1 of t_init='glc': cross-entropy on the noisy data
        x_n, y_n = noisy
        x_c, y_c = trusted
        if ctx.epoch_in_phase < self.warmup_epochs:
            loss, loss_c = F.cross_entropy(ctx.model(x_n), y_n), F.cross_entropy(ctx.model(x_c), y_c)
            ctx.optimizer_step(loss, loss_c)
            return ctx.reported(loss, loss_c)
        if self.reset_each_step:
            self.T = torch.eye(ctx.num_classes, device=ctx.device)
        meta_now = self._iteration % int(self.update_every) == 0
        self._iteration += 1
        if not meta_now or self._iteration <= self._t_warmup_steps(ctx) or self._holds_T():
            # between meta steps, and while T is held at its initial value (t_warmup, or the
            # whole phase from pooled rows): the corrected loss with the current T (and the
            # trusted batch's cross-entropy while T waits)
            loss = self.loss_fn(ctx.model(x_n), y_n, self.T)
            loss_c = F.cross_entropy(ctx.model(x_c), y_c) if meta_now and self.trusted_ce else None
            return self._actual_step(ctx, loss, loss_c)
        if self.meta_batch is not None and int(self.meta_batch) < len(y_c):
            x_m, y_m = x_c[:int(self.meta_batch)], y_c[:int(self.meta_batch)]
        else:
            x_m, y_m = x_c, y_c
        distributed = {"shares": (ctx.share("noisy"), ctx.share("trusted"))} if ctx.world.active else {}
        result = self.engine(self.loss_fn, (self.T,), x_n, y_n, x_m, y_m, **distributed)
        T_old = self.T
        self.T = self._updater(ctx).step(self.T, result.hypergrads[0])
        # The noisy part of the actual step is ∇_w L_noisy(w, T_new). Where the update left T
        # as it was (the tested rule moves T only at the end of a block, ~100 times a run),
        # that is the virtual step's gradient, already computed: reusing it is exact and
        # saves a backward pass (in one process; distributed, the virtual gradient is
        # already summed over the ranks, so the step recomputes it). ``reuse_virtual_grad``
        # reuses it also where T moved: an approximation, off by default.
        unchanged = not ctx.world.active and torch.equal(self.T, T_old)
        if (self.reuse_virtual_grad or unchanged) and result.virtual_grads is not None:
            # a linear surrogate ⟨w, g⟩ hands the gradient g to the optimizer through backward
            params = [p for p in ctx.model.parameters() if p.requires_grad]
            value = self.loss_fn(result.noisy_logits.detach(), y_n, T_old)
            loss = sum((p * g).sum() for p, g in zip(params, result.virtual_grads) if g is not None)
            loss = loss - loss.detach() + value
        else:
            loss = self.loss_fn(result.noisy_logits, y_n, self.T)
        loss_c = F.cross_entropy(ctx.model(x_c), y_c) if self.trusted_ce else None
        reported = self._actual_step(ctx, loss, loss_c)
        if ctx.world.active and self.updater.count % 100 == 1:
            ctx.world.check_identical(self.T, "MLC's T")  # every replica must hold the same T
        return reported

    def _trusted_weight(self, ctx) -> float:
        """The trusted cross-entropy's weight (``trusted_weight``; the rules from the sizes of
        the two sets and, for the relative rules, the estimate phase's measurements)."""
        if not isinstance(self.trusted_weight, str):
            return float(self.trusted_weight)
        if self._weight is None:  # computed once, at the MLC phase's first trusted step
            n_noisy, n_trusted = _examples(ctx.noisy_loader), _examples(ctx.trusted_loader)
            weight = int(self.update_every) * n_trusted / max(n_noisy, 1)
            if self.trusted_weight in RELATIVE_RULES:
                share = self._selected_relative_share()
                weight = math.sqrt(weight) if share is None else weight / min(max(share, RELATIVE_SHARE_FLOOR), 1.0)
            elif self.trusted_weight == "information":
                share = label_information_share(self.T_start, _class_prior(ctx.trusted_loader, ctx.num_classes))
                weight = min(1.0, weight / max(share, 1e-12))
            elif self.trusted_weight == "geometric":
                weight = math.sqrt(weight)
            self._weight = weight
        return self._weight

    def _selected_relative_share(self) -> float | None:
        """The relative share r (:func:`_relative_share`) at the estimate epoch T starts from;
        ``None``, with a warning, where the estimate phase had no held-out noisy examples to
        measure it on (streamed data): the weight is then the geometric one."""
        selected = self._selected() if self._estimates else None
        if selected is None or "information" not in selected:
            warnings.warn(f"mlc trusted_weight={self.trusted_weight!r} measures the noisy labels' information on "
                          "held-out noisy examples, which this run's estimate phase did not have (streamed "
                          "data, or a checkpoint from before the weight existed); using the 'geometric' "
                          "weight instead", stacklevel=4)
            return None
        return self._share_from(selected["information"])

    def _holds_T(self) -> bool:
        """Whether T stays at the pooled rows for the whole MLC phase (``noisy_evidence='pooled'``
        where the selected estimate epoch's noisy side failed its test): labels that say nothing
        about the class make every T with unequal rows wrong, so no meta step can improve on
        them (computed once from the estimates, which a checkpoint holds)."""
        if self._held is None:
            self._held = bool(self._estimates) and self._uninformative_noisy(self._selected().get("information", ()))
        return self._held

    def _uninformative_noisy(self, information: tuple) -> bool:
        """``noisy_evidence='pooled'`` and an estimate epoch's measurements (``information``, as
        :meth:`end_epoch` records them) with a held-out noisy side without information beyond
        chance (the fourth entry, absent in checkpoints of versions before 8: informative)."""
        test = tuple(information)[3:]
        return self.noisy_evidence != "ignored" and bool(test) and not test[0]

    def _share_from(self, information: tuple) -> float:
        """r from an estimate epoch's measurements (noisy side's information, trusted side's,
        and whether the trusted side's is more than chance — absent in checkpoints of version
        5): ``'relative_tested'`` reads a trusted side without information beyond chance
        as none (r = 0, the floor's weight); ``'relative_debiased'`` uses its value as measured."""
        noisy_information, clean_information, *test = information
        if self._uninformative_noisy(information):
            return 0.0
        if self.trusted_weight == "relative_tested" and test and not test[0]:
            clean_information = 0.0
        if self.noisy_evidence == "bounded" and test[1:] and test[1] and not clean_information > 0:
            # the held-out noisy side shows information the trusted side cannot: under
            # class-conditional noise the predictions say at least as much about the true labels
            # (data processing), so the trusted side's is at least the noisy side's: r = 1
            return 1.0
        return _relative_share(noisy_information, clean_information)

    def _actual_step(self, ctx, loss, loss_c):
        """The optimizer step on the noisy loss plus the weighted trusted cross-entropy."""
        weight = self._trusted_weight(ctx)
        ctx.optimizer_step(loss, loss_c if loss_c is None or weight == 1 else weight * loss_c)
        return ctx.reported(loss, loss_c)

    def estimated_T(self):
        return None if self.T is None else self.T.detach().cpu().double().numpy()

    def state_dict(self):
        return {"T": None if self.T is None else self.T.detach().cpu(), "iteration": self._iteration,
                "t_update": None if self.updater is None else self.updater.state_dict(),
                "estimates": self._estimates, "trusted_weight": self._weight}

    def load_state_dict(self, state):
        if state.get("T") is not None:
            self.T = state["T"].to(self.T.device if self.T is not None else "cpu")
        self._iteration = state.get("iteration", 0)
        self._estimates = list(state.get("estimates", []))
        self._weight = state.get("trusted_weight")
        self.updater, self._updater_state = None, state.get("t_update")
        self._held = None

