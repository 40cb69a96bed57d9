"""``DQRouteClassifier``: divide the classes among experts, weight them by difficulty,
route by energy.

Also the partition helper :func:`partition_classes` (the *Divide* step) and the small
module of learnable energy detectors used by ``ood_loss="logistic"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval, StrOptions
from skorch.callbacks import PrintLog
from torch import nn

from ltroute._base import LongTailNet
from ltroute._docstring import shared_docs
from ltroute.callbacks import DifficultyWeighting
from ltroute.fusion import FusionResult, fuse_experts
from ltroute.losses import (
    LogProbNLLLoss,
    energy_logistic_loss,
    energy_margin_loss,
    log_class_prior,
    logit_adjusted_loss,
    region_cross_entropy,
    region_logit_l2_loss,
)
from ltroute.nn import ExpertNet

__all__ = ["DQRouteClassifier", "EnergyDetector", "partition_classes"]

_PARTITIONS = ("quantile", "shots", "mass")
_OVERLAPS = ("none", "nested")
_HISTORY_LISTS = ["difficulty", "class_weights"]


# ----------------------------------------------------------------------------- Divide
def _shot_groups(counts: np.ndarray, thresholds: Sequence[int]) -> np.ndarray:
    """Group index of every class from decreasing shot thresholds ``t_1 > ... > t_{K-1}``.

    Group 0 holds ``n > t_1`` and the last group ``n < t_{K-1}``; a count equal to
    ``t_1`` falls below the first cut and one equal to ``t_j`` (j >= 2) above its cut,
    so that ``(100, 20)`` gives exactly the many / medium / few groups of
    :func:`ltroute.metrics.shot_groups`.
    """
    group = (counts <= thresholds[0]).astype(np.int64)
    for threshold in thresholds[1:]:
        group += counts < threshold
    return group


def _shot_group_rules(thresholds: Sequence[int]) -> list[str]:
    names = (["many", "medium", "few"] if len(thresholds) == 2
             else [f"group {j}" for j in range(len(thresholds) + 1)])
    bounds = [f"n_c > {thresholds[0]}"]
    for j in range(1, len(thresholds)):
        upper = "<=" if j == 1 else "<"
        bounds.append(f"{thresholds[j]} <= n_c {upper} {thresholds[j - 1]}")
    bounds.append(f"n_c < {thresholds[-1]}" if len(thresholds) > 1
                  else f"n_c <= {thresholds[0]}")
    return [f"{name} ({bound})" for name, bound in zip(names, bounds, strict=True)]


def _check_shot_thresholds(thresholds: Any, n_experts: int) -> tuple[int, ...]:
    values = tuple(np.asarray(thresholds).ravel().tolist())
    if (len(values) != n_experts - 1
            or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values)
            or any(v < 1 for v in values)
            or any(a <= b for a, b in zip(values, values[1:], strict=False))):
        raise ValueError(
            f"partition='shots' needs shot_thresholds to be n_experts - 1 = {n_experts - 1} "
            f"strictly decreasing positive ints; got {thresholds!r}.")
    return values


def _mass_cuts(sorted_counts: np.ndarray, n_experts: int) -> list[int]:
    """Cut positions of the ranking into contiguous groups of about equal sample mass."""
    cumulative = np.cumsum(sorted_counts)
    n_classes = len(sorted_counts)
    cuts = [0]
    for j in range(1, n_experts):
        target = j * cumulative[-1] / n_experts
        candidates = np.arange(cuts[-1] + 1, n_classes - (n_experts - j) + 1)
        cuts.append(int(candidates[np.argmin(np.abs(cumulative[candidates - 1] - target))]))
    return cuts + [n_classes]


def partition_classes(
    class_counts: Sequence[int] | np.ndarray,
    n_experts: int,
    *,
    partition: str = "quantile",
    shot_thresholds: Sequence[int] = (100, 20),
    region_overlap: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Divide the classes into the regions of ``n_experts`` experts by class frequency.

    Classes are ranked by training count, descending (ties by class index), and the
    ranking is cut into ``n_experts`` contiguous groups, head first.

    Parameters
    ----------
    class_counts : array-like of shape (n_classes,)
        Training samples per (encoded) class.
    n_experts : int
        Number of experts ``K``, ``1 <= K <= n_classes``.
    partition : {"quantile", "shots", "mass"}, default="quantile"
        ``"quantile"``: groups of (as nearly as possible) equal numbers of classes, the
        larger ones first; ``"shots"``: by the count thresholds ``shot_thresholds``;
        ``"mass"``: groups of about equal total sample count (the head group gets few
        classes).
    shot_thresholds : sequence of int, default=(100, 20)
        ``K - 1`` strictly decreasing thresholds for ``partition="shots"``; with
        ``K = 3``, ``(100, 20)`` gives the many (``n > 100``), medium
        (``20 <= n <= 100``) and few (``n < 20``) groups.
    region_overlap : {"none", "nested"}, default="none"
        ``"none"``: expert ``k`` covers group ``k``; ``"nested"``: expert ``k`` covers
        groups ``k, ..., K-1`` (ACE's layout: the first expert sees every class, the
        last one only the tail).

    Returns
    -------
    membership : ndarray of shape (n_experts, n_classes), dtype bool
        ``membership[k, c]``: class ``c`` is in expert ``k``'s region.
    group : ndarray of shape (n_classes,), dtype int64
        The group of each class, which is also the most specialised expert covering it.

    Raises
    ------
    ValueError
        If ``n_experts`` is not in ``[1, n_classes]``, if the thresholds are invalid, or
        if ``partition="shots"`` leaves a group empty (the message names the group).

    Examples
    --------
    >>> from ltroute.dqroute import partition_classes
    >>> membership, group = partition_classes([500, 120, 60, 30, 10, 5], 3)
    >>> group.tolist()
    [0, 0, 1, 1, 2, 2]
    >>> partition_classes([500, 120, 60, 30, 10, 5], 3, partition="shots")[1].tolist()
    [0, 0, 1, 1, 2, 2]
    >>> partition_classes([500, 120, 60, 30, 10, 5], 3, region_overlap="nested")[0].sum(1)
    array([6, 4, 2])
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D array, got shape {counts.shape}.")
    n_classes = len(counts)
    if isinstance(n_experts, bool) or not isinstance(n_experts, Integral) or not (
            1 <= n_experts <= n_classes):
        raise ValueError(f"n_experts must be an int between 1 and the number of classes "
                         f"({n_classes}); got n_experts={n_experts!r}.")
    if partition not in _PARTITIONS:
        raise ValueError(f"partition={partition!r} is not supported; expected one of "
                         f"{_PARTITIONS}.")
    if region_overlap not in _OVERLAPS:
        raise ValueError(f"region_overlap={region_overlap!r} is not supported; expected one "
                         f"of {_OVERLAPS}.")
    rank = np.lexsort((np.arange(n_classes), -counts))
    group = np.empty(n_classes, dtype=np.int64)
    if partition == "shots" and n_experts > 1:
        thresholds = _check_shot_thresholds(shot_thresholds, n_experts)
        group = _shot_groups(counts, thresholds)
        sizes = np.bincount(group, minlength=n_experts)
        if np.any(sizes == 0):
            rules = _shot_group_rules(thresholds)
            empty = ", ".join(rules[j] for j in np.flatnonzero(sizes == 0))
            raise ValueError(
                f"partition='shots' with shot_thresholds={thresholds} leaves the {empty} "
                f"group empty: the training counts range from {counts.min()} to "
                f"{counts.max()}. Use partition='quantile', other shot_thresholds or fewer "
                "experts.")
    else:
        if partition == "mass":
            cuts = _mass_cuts(counts[rank], n_experts)
        else:
            cuts = [int(c) for c in np.cumsum([0] + [len(a) for a in
                                                     np.array_split(rank, n_experts)])]
        for j in range(n_experts):
            group[rank[cuts[j]:cuts[j + 1]]] = j
    experts = np.arange(n_experts)[:, None]
    membership = (group[None, :] >= experts) if region_overlap == "nested" else (
        group[None, :] == experts)
    return membership, group


# ------------------------------------------------------------------------------ Route
class EnergyDetector(nn.Module):
    """Learnable per-expert detectors ``a_k (-E_k) + b_k`` on region energies.

    Used by ``ood_loss="logistic"`` (and ``fusion_confidence="detector"``): the
    probability that a sample lies in expert ``k``'s region is
    ``sigmoid(a_k (-E_k) + b_k)`` with ``a_k = softplus(raw_scale_k) > 0``.

    Parameters
    ----------
    n_experts : int
        Number of experts ``K``.
    bias : float, default=0.0
        Initial ``b_k``; ``a_k`` starts at 1.
    """

    def __init__(self, n_experts: int, bias: float = 0.0) -> None:
        super().__init__()
        self.raw_scale = nn.Parameter(torch.full((n_experts,), math.log(math.e - 1.0)))
        self.bias = nn.Parameter(torch.full((n_experts,), float(bias)))

    @property
    def scale(self) -> torch.Tensor:
        """``a_k = softplus(raw_scale_k)``, shape (K,)."""
        return F.softplus(self.raw_scale)

    def forward(self, energy: torch.Tensor) -> torch.Tensor:
        """Detector logits ``a_k (-E_k) + b_k`` of energies (B, K)."""
        return self.scale * (-energy) + self.bias


@shared_docs
class DQRouteClassifier(LongTailNet):
    """Region experts with difficulty-aware class weights and energy-based routing.

    DQRoute (Wei et al. 2025) in three steps. *Divide*: the classes are split by
    frequency into the regions of ``n_experts`` experts sharing one trunk; each expert
    classifies within its region. *Weight*: per-class difficulty, from the entropy and
    the accuracy history of the fused prediction, drives multiplicative class weights;
    the class-frequency prior enters as a logit adjustment. *Route*: each expert's
    energy over its own region is its in-distribution confidence, and the prediction is
    the confidence-weighted mixture of the experts, with no central router. All parts
    train together, end to end.

    Parameters
    ----------
    n_experts : int or "auto", default="auto"
        Number of experts ``K`` (at most the number of classes); ``"auto"`` is
        ``min(3, n_classes)``, so that two-class problems fit too.

    partition : {"quantile", "shots", "mass"}, default="quantile"
        How the frequency ranking of the classes is cut into groups; see
        :func:`partition_classes`.

    shot_thresholds : tuple of int, default=(100, 20)
        ``K - 1`` decreasing count thresholds for ``partition="shots"`` (with ``K = 3``
        the many / medium / few groups). A group without classes raises a
        ``ValueError`` naming it.

    region_overlap : {"none", "nested"}, default="nested"
        ``"nested"``: expert ``k`` covers groups ``k..K-1`` (the first expert every
        class, the last only the tail); ``"none"``: expert ``k`` covers group ``k``.

    difficulty_lambda : float, default=1.0
        ``lambda``, weight of the accuracy term in the difficulty ``d_c``.

    difficulty_gamma : float, default=0.1
        ``gamma``, step size of the multiplicative weight update; 0 keeps ``w = 1``.

    acc_ema : float, default=0.9
        ``beta_A`` of the (bias-corrected) EMA of the per-class accuracy.

    uncertainty : {"entropy", "one_minus_maxprob"}, default="entropy"
        Per-sample uncertainty averaged into ``H_c``.

    entropy_norm : {"max_observed", "log_C"}, default="max_observed"
        ``H_c`` is divided by ``max_c H_c`` or by its largest possible value.

    difficulty_update : {"multiplicative", "softmax"}, default="multiplicative"
        Cumulative Hedge steps, or ``w = C softmax(gamma d)`` from the current ``d``.

    weight_clip : float or None, default=10.0
        ``kappa``: the difficulty weights stay in ``[1/kappa, kappa]`` with mean 1.

    weight_warmup_epochs : int, default=5
        No weight update during the first epochs.

    weight_update_every : int, default=1
        Update at the epochs divisible by it.

    use_difficulty : bool, default=False
        ``True`` turns on the paper's difficulty weighting (the Hedge update of the
        class weights ``w`` from ``d_c``); ``False`` keeps the difficulty weights at 1
        (``difficulty_`` and its history are still recorded). Off by default because it
        showed no consistent gain where the paper claims one, the difficult classes:
        with the defaults of this release (30 epochs, seeds 0, 1, 2,
        ``python benchmarks/accuracy.py --suite dqroute``,
        ``benchmarks/results/dqroute_ablations.md``) the hardest third of the classes
        (ranked by a CE model's error on a validation split) gained 1.3 / 1.0 / 0.2
        points with it on letter-LT (73.7 %% against 72.9 %%, overall 84.4 both) but
        lost 0.1 / 0.7 / 0.1 on MNIST-LT (94.9 against 95.3 %%, overall 94.7 against
        94.9); the differences are within a standard deviation over seeds.

    use_prior : bool, default=True
        ``False`` leaves the class-frequency prior out everywhere: no logit adjustment
        (``fused_logit_adjust_tau`` and ``expert_logit_adjust_tau`` act as 0) and no
        prior weights (ablation).

    prior : {"effective_number", "inverse_frequency"}, default="effective_number"
        The prior weights ``f`` mixed into the class weights when
        ``prior_mix_alpha < 1``.

    prior_beta : float, default=0.9999
        ``beta`` of the effective-number prior.

    prior_mix_alpha : float, default=1.0
        ``alpha``, share of the difficulty weights in ``omega = alpha w + (1 - alpha)
        f`` once the prior weights are on; 1 (the default) never mixes them in, as the
        logit adjustment already accounts for the prior (see Notes).

    weight_combination : {"convex", "product"}, default="convex"
        ``alpha w + (1 - alpha) f`` or ``w^alpha f^(1 - alpha)`` (renormalised).

    prior_start_epoch : int or None, default=None
        The prior weights enter after this (1-based) epoch, as deferred re-weighting
        does; ``None`` means ``int(0.8 * max_epochs)``, ``0`` from the first epoch.

    ood_loss : {"margin", "logistic", "ace_l2"} or None, default=None
        Auxiliary loss of the experts' OOD detectors, with the samples of other regions
        as outliers: Liu et al.'s squared energy hinges, a balanced logistic loss on
        learnable detectors, or ACE's L2 suppression of out-of-region logits. ``None``
        (the default): the energies are trained by the fused loss only (see Notes).

    energy_T : float, default=1.0
        Temperature ``T`` of the region energies.

    energy_margins : "auto" or tuple of (float, float), default="auto"
        ``(m_in, m_out)`` of ``ood_loss="margin"``; ``"auto"`` is ``(-25, -7)``, scaled
        by ``head_scale / 30`` for cosine heads.

    lambda_ood : float, default=0.1
        Weight of the OOD loss.

    weight_ood : bool, default=False
        Also weight the OOD loss by the class weights ``omega``.

    routing_tau : float, default=1.0
        ``tau_r`` of the confidence weights ``softmax(-E / tau_r)``.

    routing : {"soft", "hard"}, default="soft"
        Inference: mix all experts, or keep only the most confident one (ablation).
        Training always uses the soft mixture.

    fusion_confidence : {"energy", "detector"}, default="energy"
        Confidence weights from the energies, or from the learnable detectors
        (``w_k`` proportional to ``sigmoid(a_k (-E_k) + b_k)``; needs
        ``ood_loss="logistic"``).

    energy_size_correction : bool, default=False
        Route on ``-E_k - T log |S_k|`` (log-mean-exp) instead of ``-E_k``.

    lambda_fuse : float, default=1.0
        Weight of the fused loss; 0 leaves the routing to the OOD loss (ablation).

    fused_logit_adjust_tau : float, default=1.0
        ``tau_f`` of the logit adjustment of the fused distribution in training,
        ``p~(y | x) propto p(y | x) pi_y^tau_f`` (Balanced Softmax at 1).

    expert_logit_adjust_tau : float, default=1.0
        ``tau_e`` of the logit adjustment ``z + tau_e log pi`` inside each region
        (training).

    expert_loss_reduction : {"sample_mean", "per_expert_mean"}, default="sample_mean"
        Each sample counts once, or each expert's weighted mean counts once.

    difficulty_source : {"train", "valid"}, default="train"
        Difficulty statistics from the training batches or from the internal
        validation split (needs ``train_split``).

    cosine_head : bool, default=False
        Cosine heads ``s cos(f, w_c)`` with ``s = head_scale`` (bounded logits, for the
        energy margins) instead of linear heads. Chosen on validation splits of the
        training data (``benchmarks/dqroute_search.py --configs linear cosine``, 30
        epochs): on MNIST-LT linear heads reached 96.1 %% balanced accuracy (80 / 20
        splits, seeds 0-4; cosine 91.9 %%, one seed collapsing to 76.5 %%) and 96.4 %% in
        5-fold cross-validation (seed 0; cosine 88.2 %%,
        ``benchmarks/results/dqroute_search_mnist_head*.md``); on letter-LT linear heads
        were better too (see Notes). On CIFAR-10-LT (small ConvNet, one 30-epoch
        validation run at an earlier commit) cosine heads were ahead, 61.4 against
        57.9 %% (``dqroute_search_cifar_30.md``): try ``True`` on such data.

    %(network_parameters)s

    %(training_parameters)s

    Attributes
    ----------
    %(fitted_attributes)s

    n_experts_ : int
        The number of experts ``K`` (``n_experts`` with ``"auto"`` resolved).

    membership_ : ndarray of shape (n_experts, n_classes), dtype bool
        ``membership_[k, c]``: class ``classes_[c]`` is in expert ``k``'s region.

    expert_classes_ : list of ndarray
        The (encoded) classes of each expert's region.

    region_of_class_ : ndarray of shape (n_classes,)
        The partition group of each class (its expert for disjoint regions, the most
        specialised expert covering it for nested ones).

    energy_margins_ : tuple of (float, float)
        The resolved ``(m_in, m_out)``.

    class_weights_ : ndarray of shape (n_classes,)
        Class weights ``omega`` after the last epoch (mean 1).

    difficulty_weights_ : ndarray of shape (n_classes,)
        Difficulty weights ``w`` after the last epoch (mean 1, within the clip).

    difficulty_ : ndarray of shape (n_classes,)
        Difficulty ``d_c`` at the last epoch.

    class_entropy_ : ndarray of shape (n_classes,)
        Mean uncertainty ``H_c`` at the last epoch.

    class_accuracy_ema_ : ndarray of shape (n_classes,)
        Bias-corrected EMA accuracy ``A_c`` at the last epoch.

    difficulty_history_ : ndarray of shape (n_epochs, n_classes)
        ``d_c`` at the end of every epoch (also in ``history_`` as ``difficulty``,
        beside ``class_weights``).

    detector_ : EnergyDetector
        The learnable detectors (only with ``ood_loss="logistic"``).

    See Also
    --------
    LongTailClassifier : One expert with a standard long-tail loss.
    RIDEClassifier : Several diverse experts with an expert-assignment router.
    partition_classes : The Divide step.
    ltroute.callbacks.DifficultyWeighting : The Weight step, as a skorch callback.
    ltroute.fusion.fuse_experts : The Route step.

    Notes
    -----
    Only the abstract of the paper could be read. What it or summaries of it state is
    marked *paper*; the rest is *designed* (the project's DQRoute specification, changed
    where measurements showed a designed part hurt). Notation: ``K`` experts with
    regions ``S_k``, expert logits ``z_k``, class prior ``pi_c = n_c / N``, class
    weights ``omega_c``.

    *Divide* (experts specialised in regions of the class distribution: paper; the
    split, designed after ACE [5]_ and LFME [6]_). The frequency ranking is cut into
    ``K`` groups and expert ``k`` covers groups ``k..K-1`` (nested, the default) or
    group ``k``. Each expert classifies within its region with a logit-adjusted softmax,
    ``L_cls = sum_i omega_{y_i} mean_{k: y_i in S_k} -log softmax_{c in S_k}(z_kc +
    tau_e log pi_c)[y_i] / sum_i omega_{y_i}``.

    *Weight* (difficulty and multiplicative update: paper, second-hand; the rest
    designed). Each epoch, on the training batches, from the fused prediction as the
    fused loss sees it, ``p~ propto p pi^tau_f``: ``H_c`` the mean entropy of class
    ``c``, ``A_c`` the bias-corrected EMA of its accuracy, and
    ``d_c = (H_c / max_j H_j + lambda (1 - A_c / max_j A_j)) / (1 + lambda)``. After
    the warm-up, ``w_c <- w_c exp(gamma d_c)``, rescaled to mean 1 and projected into
    ``[1/kappa, kappa]`` (the update is cumulative; without the clip the weights
    collapse onto the persistently hardest classes). ``omega = w`` unless
    ``prior_mix_alpha < 1`` mixes in prior weights after ``prior_start_epoch``
    (``omega = alpha w + (1 - alpha) f``, effective-number ``f`` [4]_).

    *Route* (an OOD detector per expert and confidence-weighted fusion without a
    router: paper; their form, designed after [2]_). Region energy
    ``E_k(x) = -T log sum_{c in S_k} exp(z_kc / T)``, confidence weights
    ``w_k(x) = softmax_k(-E_k / tau_r)`` and the prediction
    ``p(y | x) = sum_k w_k(x) softmax_{c in S_k}(z_k)[y]``
    (:func:`ltroute.fusion.fuse_experts`, in training too, so its Triton kernel serves
    both). With ``T = tau_r = 1``, ``p(y | x) = sum_{k: y in S_k} exp(z_ky) / sum_k
    sum_{c in S_k} exp(z_kc)``: for disjoint regions the softmax of the logits stitched
    from each class's own expert, for nested ones a log-sum-exp pooling over the experts
    covering ``y``. The energies are trained by the fused loss, whose ``-log
    w_{k(y)}`` part (disjoint regions) is a ``K``-way detection loss on them; an
    auxiliary one-vs-rest OOD loss is optional (``ood_loss``), e.g. Liu et al.'s
    ``(1/K) sum_k [mean_{y_i in S_k} relu(E_k - m_in)^2 + mean_{y_i not in S_k}
    relu(m_out - E_k)^2]``.

    *Joint objective* (designed): ``L = L_cls + lambda_fuse L_fuse + lambda_ood L_ood``
    with ``L_fuse = sum_i omega_{y_i} CE(log p(. | x_i) + tau_f log pi, y_i) /
    sum_i omega_{y_i}``, the Balanced Softmax [7]_ of the fused distribution: it makes
    the fused prediction an estimate of the class-balanced posterior.

    Changes to the specification's defaults, each measured on letter-LT (5 seeds, 30
    epochs, constant ``lr``, i.e. ``lr_schedule=None``, overall / few-shot accuracy in
    %%; ``python benchmarks/accuracy.py --suite dqroute`` gives the ablation table with
    the current defaults):

    - The prior enters as a logit adjustment (``tau_f = tau_e = 1``) and not as
      deferred prior weights (``alpha = 0.5`` from 80 %% of the epochs): the
      specification's defaults reached 77.7 / 57.8, no better than cross-entropy
      (78.8 / 57.6), the adjustment 82.9 / 68.3; prior weights on top of it count the
      prior twice (81.4 / 68.0, many-shot -3.3), hence ``prior_mix_alpha=1``.
    - Linear heads on feature vectors: cosine heads, there to bound the logits for the
      energy margins, cost 1.6 / 4.9 on letter-LT; on MNIST-LT too, linear heads are
      the better choice: see ``cosine_head``.
    - Nested regions: 83.9 / 70.9 against 82.9 / 68.3 for disjoint ones.
    - The difficulty statistics use ``p~``, not ``p``: under the logit adjustment ``p``
      moves probability from frequent to rare classes on the training samples on
      purpose, so the frequent classes looked hardest (rank correlation of ``d_c`` with
      the test error -0.76) and gained weight.
    - No auxiliary OOD loss by default: the margin loss with (-25, -7) forces an
      energy gap far larger than the logit adjustment (77.7 / 55.4), and the logistic
      and L2 forms cost 0.5-0.6 / 1.4-2 against the fused loss alone.

    Further deviations: ``routing="hard"`` applies at inference only (the fused loss of
    a hard-routed mixture is infinite whenever the chosen region misses the label);
    ``fusion_confidence="detector"`` and ``energy_size_correction`` shift each expert's
    logits by a per-sample constant, which leaves ``softmax_{S_k}(z_k)`` unchanged and
    moves the routing score exactly as specified; ``energies(X)`` always returns the
    uncorrected region energies.

    References
    ----------
    .. [1] Wei, Ouyang, Ye. "Divide, Weight, and Route: Difficulty-Aware Optimization
       with Dynamic Expert Fusion for Long-tailed Recognition", PRCV 2025,
       arXiv:2508.19630.
    .. [2] Liu, Wang, Owens, Li. "Energy-based Out-of-distribution Detection",
       NeurIPS 2020.
    .. [3] Sinha, Ohashi, Nakamura. "Class-Wise Difficulty-Balanced Loss for Solving
       Class-Imbalance", ACCV 2020.
    .. [4] Cui, Jia, Lin, Song, Belongie. "Class-Balanced Loss Based on Effective Number
       of Samples", CVPR 2019.
    .. [5] Cai, Wang, Hwang. "ACE: Ally Complementary Experts for Solving Long-Tailed
       Recognition in One-Shot", ICCV 2021.
    .. [6] Xiang, Ding, Han. "Learning From Multiple Experts: Self-paced Knowledge
       Distillation for Long-tailed Classification", ECCV 2020.
    .. [7] Ren, Yu, Sheng, Ma, Zhao, Yi, Li. "Balanced Meta-Softmax for Long-Tailed
       Visual Recognition", NeurIPS 2020.

    Examples
    --------
    >>> from ltroute import DQRouteClassifier
    >>> from ltroute.datasets import load_letter_lt
    >>> data = load_letter_lt()
    >>> clf = DQRouteClassifier(max_epochs=5, random_state=0)
    >>> clf.fit(data.X_train, data.y_train).membership_.sum(axis=1)
    array([26, 17,  8])
    >>> clf.route(data.X_test[:2]).shape
    (2, 3)
    >>> clf.predict_proba(data.X_test[:2]).sum(axis=1).round(6)
    array([1., 1.], dtype=float32)
    """

    _parameter_constraints: dict[str, list] = {
        **LongTailNet._parameter_constraints,
        "n_experts": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "partition": [StrOptions(set(_PARTITIONS))],
        "shot_thresholds": ["array-like"],
        "region_overlap": [StrOptions(set(_OVERLAPS))],
        "difficulty_lambda": [Interval(Real, 0, None, closed="left")],
        "difficulty_gamma": [Interval(Real, 0, None, closed="left")],
        "acc_ema": [Interval(Real, 0, 1, closed="left")],
        "uncertainty": [StrOptions({"entropy", "one_minus_maxprob"})],
        "entropy_norm": [StrOptions({"max_observed", "log_C"})],
        "difficulty_update": [StrOptions({"multiplicative", "softmax"})],
        "weight_clip": [Interval(Real, 1, None, closed="left"), None],
        "weight_warmup_epochs": [Interval(Integral, 0, None, closed="left")],
        "weight_update_every": [Interval(Integral, 1, None, closed="left")],
        "use_difficulty": ["boolean"],
        "use_prior": ["boolean"],
        "prior": [StrOptions({"effective_number", "inverse_frequency"})],
        "prior_beta": [Interval(Real, 0, 1, closed="left")],
        "prior_mix_alpha": [Interval(Real, 0, 1, closed="both")],
        "weight_combination": [StrOptions({"convex", "product"})],
        "prior_start_epoch": [Interval(Integral, 0, None, closed="left"), None],
        "ood_loss": [StrOptions({"margin", "logistic", "ace_l2"}), None],
        "energy_T": [Interval(Real, 0, None, closed="neither")],
        "energy_margins": [StrOptions({"auto"}), "array-like"],
        "lambda_ood": [Interval(Real, 0, None, closed="left")],
        "weight_ood": ["boolean"],
        "routing_tau": [Interval(Real, 0, None, closed="neither")],
        "routing": [StrOptions({"soft", "hard"})],
        "fusion_confidence": [StrOptions({"energy", "detector"})],
        "energy_size_correction": ["boolean"],
        "lambda_fuse": [Interval(Real, 0, None, closed="left")],
        "fused_logit_adjust_tau": [Interval(Real, None, None, closed="neither")],
        "expert_logit_adjust_tau": [Interval(Real, None, None, closed="neither")],
        "expert_loss_reduction": [StrOptions({"sample_mean", "per_expert_mean"})],
        "difficulty_source": [StrOptions({"train", "valid"})],
        "cosine_head": ["boolean"],
    }

    def __init__(
        self,
        module=ExpertNet,
        *,
        n_experts="auto",
        partition="quantile",
        shot_thresholds=(100, 20),
        region_overlap="nested",
        difficulty_lambda=1.0,
        difficulty_gamma=0.1,
        acc_ema=0.9,
        uncertainty="entropy",
        entropy_norm="max_observed",
        difficulty_update="multiplicative",
        weight_clip=10.0,
        weight_warmup_epochs=5,
        weight_update_every=1,
        use_difficulty=False,
        use_prior=True,
        prior="effective_number",
        prior_beta=0.9999,
        prior_mix_alpha=1.0,
        weight_combination="convex",
        prior_start_epoch=None,
        ood_loss=None,
        energy_T=1.0,
        energy_margins="auto",
        lambda_ood=0.1,
        weight_ood=False,
        routing_tau=1.0,
        routing="soft",
        fusion_confidence="energy",
        energy_size_correction=False,
        lambda_fuse=1.0,
        fused_logit_adjust_tau=1.0,
        expert_logit_adjust_tau=1.0,
        expert_loss_reduction="sample_mean",
        difficulty_source="train",
        cosine_head=False,
        backbone="auto",
        hidden_sizes=(256, 256),
        expert_hidden_sizes=(128,),
        head_scale=30.0,
        dropout=0.0,
        criterion=LogProbNLLLoss,
        optimizer=torch.optim.AdamW,
        lr=1e-3,
        max_epochs=30,
        lr_schedule="step",
        batch_size=128,
        train_split=None,
        callbacks=None,
        device="auto",
        verbose=0,
        random_state=None,
        backbone_weights=None,
        target_prior="uniform",
        **kwargs,
    ):
        super().__init__(
            module, backbone=backbone, hidden_sizes=hidden_sizes,
            expert_hidden_sizes=expert_hidden_sizes, head_scale=head_scale, dropout=dropout,
            criterion=criterion, optimizer=optimizer, lr=lr, max_epochs=max_epochs,
            batch_size=batch_size, train_split=train_split, callbacks=callbacks,
            device=device, verbose=verbose, random_state=random_state,
            lr_schedule=lr_schedule, backbone_weights=backbone_weights,
            target_prior=target_prior, **kwargs,
        )
        self.n_experts = n_experts
        self.partition = partition
        self.shot_thresholds = shot_thresholds
        self.region_overlap = region_overlap
        self.difficulty_lambda = difficulty_lambda
        self.difficulty_gamma = difficulty_gamma
        self.acc_ema = acc_ema
        self.uncertainty = uncertainty
        self.entropy_norm = entropy_norm
        self.difficulty_update = difficulty_update
        self.weight_clip = weight_clip
        self.weight_warmup_epochs = weight_warmup_epochs
        self.weight_update_every = weight_update_every
        self.use_difficulty = use_difficulty
        self.use_prior = use_prior
        self.prior = prior
        self.prior_beta = prior_beta
        self.prior_mix_alpha = prior_mix_alpha
        self.weight_combination = weight_combination
        self.prior_start_epoch = prior_start_epoch
        self.ood_loss = ood_loss
        self.energy_T = energy_T
        self.energy_margins = energy_margins
        self.lambda_ood = lambda_ood
        self.weight_ood = weight_ood
        self.routing_tau = routing_tau
        self.routing = routing
        self.fusion_confidence = fusion_confidence
        self.energy_size_correction = energy_size_correction
        self.lambda_fuse = lambda_fuse
        self.fused_logit_adjust_tau = fused_logit_adjust_tau
        self.expert_logit_adjust_tau = expert_logit_adjust_tau
        self.expert_loss_reduction = expert_loss_reduction
        self.difficulty_source = difficulty_source
        self.cosine_head = cosine_head

    # ------------------------------------------------------------------ inference
    def route(self, X) -> np.ndarray:
        """Confidence weights of the experts for each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W)
            Same kind of input as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_experts)
            ``softmax_k(-E_k / routing_tau)`` (rows sum to one); one-hot with
            ``routing="hard"``.
        """
        return self._fused_outputs(X)[2].numpy()

    def energies(self, X) -> np.ndarray:
        """Region energy ``E_k(x) = -T log sum_{c in S_k} exp(z_kc / T)`` of each expert.

        Lower means more in-distribution for that expert.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W)
            Same kind of input as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_experts)
        """
        return self._fused_outputs(X)[1].numpy()

    # ------------------------------------------------------------- skorch hooks
    @property
    def _default_callbacks(self):
        weighting = DifficultyWeighting(
            difficulty_lambda=self.difficulty_lambda, gamma=self.difficulty_gamma,
            acc_ema=self.acc_ema, uncertainty=self.uncertainty,
            entropy_norm=self.entropy_norm, update=self.difficulty_update,
            clip=self.weight_clip, warmup_epochs=self.weight_warmup_epochs,
            update_every=self.weight_update_every, use_difficulty=self.use_difficulty,
            prior=self.prior if self.use_prior and self.prior_mix_alpha < 1 else None,
            prior_beta=self.prior_beta,
            prior_mix_alpha=self.prior_mix_alpha, combination=self.weight_combination,
            prior_start_epoch=self.prior_start_epoch, source=self.difficulty_source,
            prior_adjust_tau=self._prior_tau(self.fused_logit_adjust_tau),
        )
        callbacks = []
        for name, callback in super()._default_callbacks:
            if name == "print_log":  # the weights first, so that the log shows them
                callbacks += [("difficulty", weighting),
                              ("print_log", PrintLog(keys_ignored=_HISTORY_LISTS))]
            else:
                callbacks.append((name, callback))
        return callbacks

    def _check_params(self) -> None:
        super()._check_params()
        if self.fusion_confidence == "detector" and self.ood_loss != "logistic":
            raise ValueError("fusion_confidence='detector' needs ood_loss='logistic' (the "
                             f"learnable detectors); got ood_loss={self.ood_loss!r}.")
        if self.difficulty_source == "valid" and self.train_split is None:
            raise ValueError("difficulty_source='valid' needs an internal validation split: "
                             "pass train_split=skorch.dataset.ValidSplit(...).")
        self._resolve_energy_margins()

    def _resolve_energy_margins(self) -> tuple[float, float]:
        """``(m_in, m_out)`` from ``energy_margins`` (validated) and the head type."""
        if isinstance(self.energy_margins, str):  # "auto", the only string allowed
            scale = float(self.head_scale) / 30.0 if self.cosine_head else 1.0
            return -25.0 * scale, -7.0 * scale
        margins = np.asarray(self.energy_margins, dtype=float).ravel()
        if margins.shape != (2,) or not np.all(np.isfinite(margins)) or not (
                margins[0] < margins[1]):
            raise ValueError("energy_margins must be 'auto' or two finite floats "
                             f"(m_in, m_out) with m_in < m_out; got {self.energy_margins!r}.")
        return float(margins[0]), float(margins[1])

    def _module_params(self) -> dict[str, Any]:
        return super()._module_params() | {"n_experts": self.n_experts_,
                                           "cosine_head": bool(self.cosine_head)}

    def initialize_module(self):
        """Divide the classes into regions, then build the experts (and detectors)."""
        self.n_experts_ = (min(3, len(self.classes_)) if self.n_experts == "auto"
                           else int(self.n_experts))
        membership, group = partition_classes(
            self.class_counts_, self.n_experts_, partition=self.partition,
            shot_thresholds=self.shot_thresholds, region_overlap=self.region_overlap)
        self.membership_ = membership
        self.region_of_class_ = group
        self.expert_classes_ = [np.flatnonzero(row) for row in membership]
        self.energy_margins_ = self._resolve_energy_margins()
        self.class_weights_ = np.ones(len(self.classes_), dtype=np.float32)  # until updated
        super().initialize_module()
        if self.ood_loss == "logistic":
            self.detector_ = EnergyDetector(self.n_experts_, bias=sum(self.energy_margins_) / 2)
        elif "detector" in self._modules:
            del self.detector_  # left from a fit with ood_loss="logistic"; skorch unregisters
        return self

    def _training_loss(self, logits: torch.Tensor, y: torch.Tensor,
                       sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        membership = self._membership(logits.device)
        in_region = membership[:, y].T
        weight = self._class_weights_on(logits.device, logits.dtype)
        log_prior = self._count_statistic(log_class_prior, logits.device)
        expert_logits = logits + self._prior_tau(self.expert_logit_adjust_tau) * log_prior
        loss = region_cross_entropy(expert_logits, y, membership, weight=weight,
                                    reduction=self.expert_loss_reduction,
                                    sample_weight=sample_weight)
        fused = self._fuse(logits, return_log_probs=True, routing="soft")
        if self.lambda_fuse:
            loss = loss + self.lambda_fuse * logit_adjusted_loss(
                fused.log_probs, y, log_prior=log_prior,
                tau=self._prior_tau(self.fused_logit_adjust_tau), weight=weight,
                sample_weight=sample_weight)
        if self.ood_loss is not None and self.lambda_ood:
            user_weight = sample_weight
            sample_weight = weight[y] if self.weight_ood else None
            if user_weight is not None:
                sample_weight = user_weight if sample_weight is None else (
                    sample_weight * user_weight)
            if self.ood_loss == "margin":
                m_in, m_out = self.energy_margins_
                ood = energy_margin_loss(fused.energy, in_region, m_in=m_in, m_out=m_out,
                                         sample_weight=sample_weight)
            elif self.ood_loss == "logistic":
                ood = energy_logistic_loss(fused.energy, in_region, scale=self.detector_.scale,
                                           bias=self.detector_.bias, sample_weight=sample_weight)
            else:
                ood = region_logit_l2_loss(logits, in_region, membership,
                                           sample_weight=sample_weight)
            loss = loss + self.lambda_ood * ood
        return loss

    def _fuse(self, logits: torch.Tensor, return_log_probs: bool = False,
              sample_mask: torch.Tensor | None = None, *,
              routing: str | None = None) -> FusionResult:
        """Energy-weighted mixture of the region softmaxes (see the class Notes).

        ``sample_mask`` (B, K) leaves experts out per sample (DQRoute itself passes none);
        ``routing`` overrides the ``routing`` parameter (training uses ``"soft"``). The
        returned energies are the uncorrected region energies ``E_k``.
        """
        membership = self._membership(logits.device)
        options = {"region_mask": membership, "combine": "prob",
                   "energy_temperature": float(self.energy_T),
                   "routing_temperature": float(self.routing_tau), "check_masks": False}
        shift = None  # per-expert logit shift that moves the routing score, not p_k
        energy = None
        if self.fusion_confidence == "detector":
            self._check_detector()
            # -E'_k / tau = log sigmoid(a_k (-E_k) + b_k) when z'_k = z_k + delta_k with
            # delta_k = tau log sigmoid(.) + E_k (p_k is invariant to the shift).
            energy = fuse_experts(logits, weighting="uniform", **options).energy
            shift = (float(self.routing_tau) * F.logsigmoid(self.detector_(energy))
                     + energy)
        elif self.energy_size_correction:
            sizes = membership.sum(dim=1).to(logits.dtype)
            shift = (-float(self.energy_T) * torch.log(sizes)).expand(logits.shape[0], -1)
        shifted = logits if shift is None else logits + shift.unsqueeze(2)
        fused = fuse_experts(shifted, sample_mask=sample_mask, weighting="energy",
                             return_log_probs=return_log_probs, **options)
        if (self.routing if routing is None else routing) == "hard":
            chosen = F.one_hot(fused.weights.argmax(dim=1), logits.shape[1]).bool()
            fused = fuse_experts(shifted, sample_mask=chosen, weighting="uniform",
                                 return_log_probs=return_log_probs, **options)
        if shift is not None:
            fused = fused._replace(energy=fused.energy + shift if energy is None else energy)
        # exp(log p) of a mixture sums to one only up to float32 rounding (~1e-6 off with
        # nested regions); scikit-learn's checks ask for 1e-6.
        return fused._replace(probs=fused.probs / fused.probs.sum(dim=1, keepdim=True))

    def _check_detector(self) -> None:
        """``fusion_confidence="detector"`` set after a fit that trained no detectors."""
        if getattr(self, "detector_", None) is None:
            raise ValueError(
                "fusion_confidence='detector' needs the learnable detectors trained by "
                "ood_loss='logistic', but this DQRouteClassifier was fitted with "
                f"ood_loss={self.ood_loss!r}: set fusion_confidence='energy', or fit again "
                "with ood_loss='logistic'.")

    def _prior_tau(self, tau: float) -> float:
        """A logit-adjustment strength, or 0 when the frequency prior is switched off."""
        return float(tau) if self.use_prior else 0.0

    def _membership(self, device: torch.device) -> torch.Tensor:
        """``membership_`` on ``device``, copied once per module initialisation."""
        membership = self.membership_
        return self._fit_constant("membership", device, membership,
                                  lambda: torch.as_tensor(membership))

    def _class_weights_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``class_weights_`` on ``device``, copied again only when the array is replaced
        (the difficulty callback assigns a new one per epoch)."""
        weights = self.class_weights_
        return self._fit_constant(("class_weights", dtype), device, weights,
                                  lambda: torch.as_tensor(weights, dtype=dtype))
