"""Long-tail losses and class statistics as pure functions of tensors.

Shared by every estimator. Class counts are training-fold counts aligned with the
encoded classes ``0..C-1``. Every loss takes logits ``(B, C)`` and integer targets
``(B,)`` and, where it accepts class ``weight``, reduces as
``torch.nn.functional.cross_entropy`` does: ``sum_b w[y_b] l_b / sum_b w[y_b]``. Where it
accepts per-sample ``sample_weight`` ``s`` (``fit``'s ``sample_weight``), those multiply
the class weights: ``sum_b s_b w[y_b] l_b / sum_b s_b w[y_b]`` (0 for a batch whose
weights are all 0).

References
----------
.. [1] Cao, Wei, Gaidon, Arechiga, Ma. "Learning Imbalanced Datasets with
   Label-Distribution-Aware Margin Loss", NeurIPS 2019 (LDAM, DRW).
.. [2] Cui, Jia, Lin, Song, Belongie. "Class-Balanced Loss Based on Effective Number
   of Samples", CVPR 2019.
.. [3] Menon, Jayasumana, Rawat, Jain, Veit, Kumar. "Long-tail learning via logit
   adjustment", ICLR 2021.
.. [4] Ren, Yu, Sheng, Ma, Zhao, Yi, Li. "Balanced Meta-Softmax for Long-Tailed
   Visual Recognition", NeurIPS 2020.
.. [5] Lin, Goyal, Girshick, He, Dollar. "Focal Loss for Dense Object Detection",
   ICCV 2017.
"""

from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F

__all__ = [
    "LogProbNLLLoss",
    "balanced_softmax_loss",
    "class_difficulty",
    "cross_entropy",
    "distribution_aware_temperature",
    "effective_number_weights",
    "energy_logistic_loss",
    "energy_margin_loss",
    "focal_loss",
    "frequency_prior_weights",
    "ldam_loss",
    "ldam_margins",
    "log_class_prior",
    "logit_adjusted_loss",
    "mix_class_weights",
    "multiplicative_weight_update",
    "prediction_uncertainty",
    "project_mean_one",
    "region_cross_entropy",
    "region_logit_l2_loss",
    "ride_diversity_loss",
    "router_loss",
    "router_targets",
    "weighted_mean",
]


class LogProbNLLLoss:
    """Mean negative log-likelihood of log-probabilities: ``-mean_b log_probs[b, y_b]``.

    The default ``criterion`` of ltroute's estimators: the validation loss of the fused
    prediction (``valid_loss``). A plain callable rather than a ``torch.nn.Module``: it
    has no parameters, and skorch's ``AccelerateMixin`` would hand a module to
    ``accelerator.prepare``, whose DistributedDataParallel wrapper refuses modules
    without parameters in multi-process runs.
    """

    def __call__(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(log_probs, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_counts(class_counts: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape "
                         f"{tuple(counts.shape)}.")
    if not torch.all(counts > 0):
        raise ValueError("class_counts must be positive for every class.")
    return counts


def ldam_margins(class_counts: torch.Tensor, *, max_margin: float = 0.5) -> torch.Tensor:
    r"""LDAM margins ``m_c = max_margin * n_c^{-1/4} / max_j n_j^{-1/4}``.

    The rarest class gets ``max_margin``; margins are in cosine units (multiply by the
    head scale before subtracting from scaled logits) [1]_.

    Parameters
    ----------
    class_counts : array-like of shape (C,)
        Training samples per class.
    max_margin : float, default=0.5
        Margin of the rarest class.

    Returns
    -------
    torch.Tensor of shape (C,), float32

    Examples
    --------
    >>> ldam_margins([500, 5]).tolist()  # doctest: +ELLIPSIS
    [0.158..., 0.5]
    """
    counts = _as_counts(class_counts)
    inv_quartic = counts.pow(-0.25)
    return (max_margin * inv_quartic / inv_quartic.max()).float()


def effective_number_weights(class_counts: torch.Tensor, *, beta: float = 0.9999
                             ) -> torch.Tensor:
    r"""Class-balanced weights ``w_c = (1 - beta) / (1 - beta^{n_c})``, summing to ``C``.

    The inverse "effective number of samples" [2]_; LDAM-DRW and RIDE use ``beta=0.9999``
    for deferred re-weighting (DRW) [1]_.

    Parameters
    ----------
    class_counts : array-like of shape (C,)
        Training samples per class.
    beta : float, default=0.9999
        In [0, 1). ``beta=0`` gives uniform weights; ``beta -> 1`` approaches inverse
        frequency.

    Returns
    -------
    torch.Tensor of shape (C,), float32

    Examples
    --------
    >>> w = effective_number_weights([500, 5])
    >>> round(float(w.sum()), 6), bool(w[1] > w[0])
    (2.0, True)
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}.")
    counts = _as_counts(class_counts)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights / weights.sum() * counts.numel()).float()


def log_class_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """Log of the empirical class prior ``log(n_c / sum_j n_j)``, float32, shape (C,)."""
    counts = _as_counts(class_counts)
    return torch.log(counts / counts.sum()).float()


def weighted_mean(per_sample: torch.Tensor, target: torch.Tensor | None,
                  weight: torch.Tensor | None = None,
                  sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-sample losses like ``F.cross_entropy``: plain or class-weighted mean,
    with per-sample weights multiplying the class weights."""
    if sample_weight is None:
        if weight is None:
            return per_sample.mean()
        w = weight.to(per_sample.dtype)[target]
        return (w * per_sample).sum() / w.sum()
    w = sample_weight.to(per_sample.dtype)
    if weight is not None:
        w = w * weight.to(per_sample.dtype)[target]
    return (w * per_sample).sum() / w.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)


def _weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                            weight: torch.Tensor | None,
                            sample_weight: torch.Tensor | None) -> torch.Tensor:
    """``F.cross_entropy`` (bit for bit without ``sample_weight``) or its sample-weighted
    mean."""
    if sample_weight is None:
        return F.cross_entropy(logits, target, weight=weight)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    return weighted_mean(per_sample, target, weight, sample_weight)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                  weight: torch.Tensor | None = None,
                  sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy with optional class and sample weights (weighted mean)."""
    return _weighted_cross_entropy(logits, target, weight, sample_weight)


def ldam_loss(logits: torch.Tensor, target: torch.Tensor, *, margins: torch.Tensor,
              scale: float = 30.0, weight: torch.Tensor | None = None,
              sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""LDAM: cross-entropy after subtracting ``scale * m_y`` from the true-class logit.

    With a cosine head ``z = s cos`` this is ``CE(s (cos_y - m_y), y)`` of [1]_ (RIDE
    applies the margin in the already scaled logit space the same way).

    Parameters
    ----------
    logits : torch.Tensor of shape (B, C)
        Scaled logits (``s * cos`` for a cosine head).
    target : torch.Tensor of shape (B,)
        Encoded labels.
    margins : torch.Tensor of shape (C,)
        Per-class margins in cosine units, see :func:`ldam_margins`.
    scale : float, default=30.0
        ``s``; must equal the cosine head's scale.
    weight : torch.Tensor of shape (C,), default=None
        Class weights (DRW).
    sample_weight : torch.Tensor of shape (B,), default=None
        Per-sample weights, multiplying the class weights.
    """
    shift = torch.zeros_like(logits)
    shift.scatter_(1, target.unsqueeze(1), (scale * margins.to(logits.dtype)[target]).unsqueeze(1))
    return _weighted_cross_entropy(logits - shift, target, weight, sample_weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 1.0,
               weight: torch.Tensor | None = None,
               sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Focal loss ``(1 - p_y)^gamma * (-log p_y)`` [5]_ with weighted-mean reduction.

    ``p_y`` is the unweighted softmax probability of the true class; class weights
    multiply the per-sample terms afterwards (the LDAM-DRW code instead feeds the
    weighted CE into the focal factor, which makes ``p_y`` depend on the weight).

    Parameters
    ----------
    gamma : float, default=1.0
        Focusing parameter; ``gamma=0`` is cross-entropy. LDAM-DRW's CIFAR-LT focal
        baseline uses 1.
    """
    log_p = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    per_sample = -torch.pow(1.0 - log_p.exp(), gamma) * log_p
    return weighted_mean(per_sample, target, weight, sample_weight)


def logit_adjusted_loss(logits: torch.Tensor, target: torch.Tensor, *,
                        log_prior: torch.Tensor, tau: float = 1.0,
                        weight: torch.Tensor | None = None,
                        sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Logit-adjusted cross-entropy ``CE(z + tau * log pi, y)`` [3]_.

    Trains ``z`` to estimate the balanced posterior, so ``argmax z`` at test time is
    Fisher-consistent for the balanced error when ``tau = 1``.
    """
    return _weighted_cross_entropy(logits + tau * log_prior.to(logits.dtype), target, weight,
                                   sample_weight)


def balanced_softmax_loss(logits: torch.Tensor, target: torch.Tensor, *,
                          log_prior: torch.Tensor, weight: torch.Tensor | None = None,
                          sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Balanced Softmax [4]_: ``-log(n_y e^{z_y} / sum_j n_j e^{z_j})``.

    Equal to :func:`logit_adjusted_loss` with ``tau = 1`` (``log n_j`` and ``log pi_j``
    differ by a constant that cancels in the softmax); kept as its own name because
    the two papers are cited separately.
    """
    return logit_adjusted_loss(logits, target, log_prior=log_prior, tau=1.0, weight=weight,
                               sample_weight=sample_weight)


# --------------------------------------------------------------------------------------
# RIDE (Wang et al., ICLR 2021): distribution-aware diversity and the router's targets
# --------------------------------------------------------------------------------------


def distribution_aware_temperature(class_counts: torch.Tensor, *,
                                   base_temperature: float = 1.0,
                                   reweight_factor: float = 0.05) -> torch.Tensor:
    r"""RIDE's per-class diversity temperature ``T_c = alpha * psi_c / max_j psi_j``.

    ``psi_c = gamma * C * p_c + (1 - gamma)`` with ``p_c = n_c / sum_j n_j``: the most
    frequent class gets ``alpha``, rarer classes a lower temperature (a sharper
    distribution, so disagreement on them weighs more). This is the official code's
    multiplicative normalisation; the paper writes the additive shift
    ``eta * psi_c + eta * (1 - max psi)``.

    Parameters
    ----------
    class_counts : array-like of shape (C,)
        Training samples per class.
    base_temperature : float, default=1.0
        ``alpha``, the temperature of the most frequent class.
    reweight_factor : float, default=0.05
        ``gamma`` in [0, 1]; ``0`` gives the constant temperature ``alpha``.

    Returns
    -------
    torch.Tensor of shape (C,), float32

    Examples
    --------
    >>> distribution_aware_temperature([500, 5], reweight_factor=0.05).tolist()
    [1.0, 0.9...]
    """
    if not base_temperature > 0:
        raise ValueError(f"base_temperature must be positive, got {base_temperature!r}.")
    if not 0.0 <= reweight_factor <= 1.0:
        raise ValueError(f"reweight_factor must be in [0, 1], got {reweight_factor!r}.")
    counts = _as_counts(class_counts)
    psi = reweight_factor * counts.numel() * counts / counts.sum() + (1.0 - reweight_factor)
    return (base_temperature * psi / psi.max()).float()


def ride_diversity_loss(expert_logits: torch.Tensor, *,
                        temperature: torch.Tensor | float = 1.0,
                        sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""RIDE's diversity term ``mean(T)^2 * sum_k KL(q || p_k)`` (summed over experts).

    ``p_k = softmax(z_k / T)`` and the target ``q = softmax(zbar / T)`` with
    ``zbar = mean_k z_k`` (every expert included), computed without gradient; each
    logit column ``c`` is divided by its own temperature ``T_c``. The KL sums over
    classes and averages over the batch ("batchmean"). ``mean(T)^2`` is the
    distillation-style gradient correction of the official code (a scalar).

    RIDE *subtracts* this term (its weight ``lambda`` is negative, -0.45 on
    CIFAR-100-LT), so minimising the total loss pushes every expert away from the
    ensemble. Gradients flow only through ``p_k``.

    Parameters
    ----------
    expert_logits : torch.Tensor of shape (B, K, C)
        Logits of the K experts.
    temperature : float or torch.Tensor of shape (C,), default=1.0
        Temperature, scalar or per class (see :func:`distribution_aware_temperature`).
    sample_weight : torch.Tensor of shape (B,), default=None
        Per-sample weights: the batch mean becomes their weighted mean.

    Returns
    -------
    torch.Tensor
        Scalar, non-negative.
    """
    if expert_logits.ndim != 3:
        raise ValueError(f"expert_logits must have shape (B, K, C), got "
                         f"{tuple(expert_logits.shape)}.")
    # A number divides directly: a tensor made from it on a GPU would be a host-to-device
    # copy, and a stream synchronisation, at every training step.
    if isinstance(temperature, Real):
        temp = float(temperature)
    elif isinstance(temperature, torch.Tensor):  # not copied when already on the device
        temp = temperature.to(device=expert_logits.device, dtype=expert_logits.dtype)
    else:  # per class, from an array or a list
        temp = torch.as_tensor(temperature, dtype=expert_logits.dtype,
                               device=expert_logits.device)
    scaled = expert_logits / temp
    with torch.no_grad():
        # mean_k(z_k / T) = zbar / T: the ensemble distribution at the same temperature.
        log_target = F.log_softmax(scaled.mean(dim=1, keepdim=True), dim=-1)
    log_probs = F.log_softmax(scaled, dim=-1)
    if sample_weight is None:
        kl = F.kl_div(log_probs, log_target.expand_as(log_probs), reduction="sum",
                      log_target=True) / expert_logits.shape[0]
    else:
        per_sample = F.kl_div(log_probs, log_target.expand_as(log_probs), reduction="none",
                              log_target=True).sum(dim=(1, 2))
        kl = weighted_mean(per_sample, None, sample_weight=sample_weight)
    return (temp.mean() if isinstance(temp, torch.Tensor) else temp) ** 2 * kl


def router_targets(expert_logits: torch.Tensor, target: torch.Tensor, *,
                   margins: torch.Tensor | None = None) -> torch.Tensor:
    r"""Targets of RIDE's K - 1 routing decisions from cumulative expert ensembles.

    Decision ``i`` (after experts ``0..i`` ran) should add expert ``i + 1`` exactly when
    the prefix ensemble ``argmax sum_{l <= i} z_l`` is wrong and some longer prefix
    ``argmax sum_{l <= j} z_l``, ``j > i``, is right (the official code).

    With ``margins``, a prefix counts as right only when it is right by its label's
    margin: ``argmax_c (zbar_{<=j, c} - m_y [c = y]) = y`` with ``zbar_{<=j}`` the mean
    logits of experts ``0..j`` (LDAM's adjustment of the logits, applied to the prefix
    ensemble). ``margins=None`` (or all zero) gives the official targets.

    Parameters
    ----------
    expert_logits : torch.Tensor of shape (B, K, C)
        Logits of the K experts, in routing order.
    target : torch.Tensor of shape (B,)
        Encoded labels.
    margins : torch.Tensor of shape (C,), optional
        Non-negative margin of each class, in logit units (e.g. ``head_scale *``
        :func:`ldam_margins`).

    Returns
    -------
    torch.Tensor of shape (B, K - 1), dtype bool

    Examples
    --------
    >>> z = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [3.0, 0.0]]])  # right by 1, 2, 2.33
    >>> router_targets(z, torch.tensor([0])).tolist()
    [[False, False]]
    >>> router_targets(z, torch.tensor([0]), margins=torch.tensor([1.5, 1.5])).tolist()
    [[True, False]]
    """
    cumulative = expert_logits.cumsum(dim=1)
    if margins is not None:
        counts = torch.arange(1, expert_logits.shape[1] + 1, device=cumulative.device,
                              dtype=cumulative.dtype)
        cumulative = cumulative / counts.view(1, -1, 1)
        label_margin = margins.to(cumulative)[target].view(-1, 1, 1)
        cumulative = cumulative - label_margin * F.one_hot(
            target, expert_logits.shape[2]).to(cumulative).unsqueeze(1)
    correct = cumulative.argmax(dim=2) == target.unsqueeze(1)
    correct_from = correct.flip(1).cumsum(dim=1).flip(1) > 0  # some prefix j >= i is right
    return ~correct[:, :-1] & correct_from[:, 1:]


def router_loss(router_logits: torch.Tensor, targets: torch.Tensor, *,
                pos_weight: float = 100.0) -> torch.Tensor:
    r"""Weighted binary cross-entropy of the routing decisions, averaged over all of them.

    ``-pos_weight * y log sigmoid(r) - (1 - y) log(1 - sigmoid(r))`` per decision,
    mean over samples and decisions (RIDE uses ``pos_weight=100``: "add an expert" is
    the rare class).

    Parameters
    ----------
    router_logits : torch.Tensor of shape (B, K - 1)
        Logits ``r`` of the decisions.
    targets : torch.Tensor of shape (B, K - 1)
        0/1 (or bool) targets, see :func:`router_targets`.
    pos_weight : float, default=100.0
        Weight of the positive targets.
    """
    return F.binary_cross_entropy_with_logits(
        router_logits, targets.to(router_logits.dtype),
        pos_weight=router_logits.new_tensor(pos_weight))


# --------------------------------------------------------------------------------------
# DQRoute (Wei et al., PRCV 2025): difficulty-aware class weights and region-expert losses
# --------------------------------------------------------------------------------------


def prediction_uncertainty(probs: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    r"""Uncertainty of each predicted distribution, ``(B, C) -> (B,)``.

    Parameters
    ----------
    probs : torch.Tensor of shape (B, C)
        Class probabilities (rows sum to one).
    kind : {"entropy", "one_minus_maxprob"}, default="entropy"
        ``"entropy"``: ``H(p) = -sum_c p_c log p_c`` (with ``0 log 0 = 0``), at most
        ``log C``; ``"one_minus_maxprob"``: ``1 - max_c p_c``, at most ``1 - 1/C``.

    Returns
    -------
    torch.Tensor of shape (B,)

    Examples
    --------
    >>> import torch
    >>> prediction_uncertainty(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist()
    [0.6931471824645996, 0.0]
    """
    if kind == "entropy":
        return torch.special.entr(probs).sum(dim=1)
    if kind == "one_minus_maxprob":
        return 1.0 - probs.amax(dim=1)
    raise ValueError(f"kind must be 'entropy' or 'one_minus_maxprob', got {kind!r}.")


def class_difficulty(uncertainty: torch.Tensor, accuracy: torch.Tensor, *,
                     lam: float = 1.0, uncertainty_scale: float | None = None,
                     eps: float = 1e-12) -> torch.Tensor:
    r"""Per-class difficulty ``d_c = (H_c / H_max + lam (1 - A_c / A_max)) / (1 + lam)``.

    DQRoute's score (Wei et al. 2025, as reported second-hand) from the mean predictive
    uncertainty ``H_c`` of a class and its (EMA) accuracy ``A_c``; the division by
    ``1 + lam`` keeps ``d_c`` in [0, 1]. ``H_max`` and ``A_max`` are the largest observed
    values (floored at ``eps``, so that all-zero accuracies make the accuracy term 1);
    ``uncertainty_scale`` replaces ``H_max`` by a fixed scale such as ``log C``.

    Parameters
    ----------
    uncertainty : torch.Tensor of shape (C,)
        Mean uncertainty of each class; ``nan`` for a class not observed yet.
    accuracy : torch.Tensor of shape (C,)
        Accuracy of each class in [0, 1]; ``nan`` for a class not observed yet.
    lam : float, default=1.0
        Weight ``lam >= 0`` of the accuracy term.
    uncertainty_scale : float or None, default=None
        Fixed normaliser of the uncertainty; ``None`` uses ``max_c H_c``.
    eps : float, default=1e-12
        Floor of the normalisers.

    Returns
    -------
    torch.Tensor of shape (C,)
        Difficulties in [0, 1]. Classes with a ``nan`` statistic get the mean difficulty
        of the others (0 when no class is observed).

    Examples
    --------
    >>> import torch
    >>> class_difficulty(torch.tensor([0.2, 0.4]), torch.tensor([1.0, 0.5])).tolist()
    [0.25, 0.75]
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}.")
    observed = torch.isfinite(uncertainty) & torch.isfinite(accuracy)
    if not bool(observed.any()):
        return torch.zeros_like(uncertainty)
    h_scale = uncertainty[observed].max() if uncertainty_scale is None else uncertainty_scale
    h_scale = torch.clamp(torch.as_tensor(h_scale, dtype=uncertainty.dtype), min=eps)
    a_max = torch.clamp(accuracy[observed].max(), min=eps)
    difficulty = (uncertainty / h_scale + lam * (1.0 - accuracy / a_max)) / (1.0 + lam)
    return torch.where(observed, difficulty, difficulty[observed].mean())


def project_mean_one(weights: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    r"""Rescale positive weights to mean 1 inside ``[1/clip, clip]``.

    Returns ``clip(s * w, 1/clip, clip)`` with the scalar ``s > 0`` for which the mean
    is 1 (found by bisection on ``log s``; the map is monotone). Unlike "clip, then
    renormalise", the result satisfies both constraints at once, and the order of the
    classes is kept.

    Parameters
    ----------
    weights : torch.Tensor of shape (C,)
        Positive weights.
    clip : float or None, default=None
        Bound ``kappa >= 1``; ``None`` only rescales to mean 1.

    Returns
    -------
    torch.Tensor of shape (C,), same dtype as ``weights``

    Examples
    --------
    >>> import torch
    >>> project_mean_one(torch.tensor([1.0, 1.0, 100.0]), clip=2.0).tolist()
    [0.5, 0.5, 2.0]
    """
    w = weights.double()
    if not bool(torch.all(w > 0)):
        raise ValueError("weights must be positive.")
    w = w / w.mean()
    if clip is None:
        return w.to(weights.dtype)
    if clip < 1:
        raise ValueError(f"clip must be >= 1, got {clip!r}.")
    low, high = 1.0 / clip, float(clip)
    log_w = torch.log(w)
    # Bracket of log s: all weights at the lower bound (mean < 1) ... all at the upper one.
    lo = float(torch.log(log_w.new_tensor(low)) - log_w.max())
    hi = float(torch.log(log_w.new_tensor(high)) - log_w.min())
    for _ in range(100):  # the mean of clip(s w) is continuous and nondecreasing in s
        mid = 0.5 * (lo + hi)
        if torch.exp(log_w + mid).clamp(low, high).mean() < 1.0:
            lo = mid
        else:
            hi = mid
    return torch.exp(log_w + 0.5 * (lo + hi)).clamp(low, high).to(weights.dtype)


def multiplicative_weight_update(weights: torch.Tensor, difficulty: torch.Tensor, *,
                                 gamma: float, clip: float | None = None) -> torch.Tensor:
    r"""One exponentiated-gradient (Hedge) step ``w_c <- w_c exp(gamma d_c)``.

    The result is rescaled to mean 1 and projected into ``[1/clip, clip]``
    (:func:`project_mean_one`). Starting from ``weights = 1`` it is
    ``C softmax(gamma d)``, DQRoute's non-cumulative variant.

    Parameters
    ----------
    weights : torch.Tensor of shape (C,)
        Current positive class weights.
    difficulty : torch.Tensor of shape (C,)
        Class difficulties ``d_c``.
    gamma : float
        Step size ``gamma >= 0``; 0 leaves the (rescaled) weights unchanged.
    clip : float or None, default=None
        Bound ``kappa`` of the projection.

    Returns
    -------
    torch.Tensor of shape (C,)

    Examples
    --------
    >>> import torch
    >>> w = multiplicative_weight_update(torch.ones(2), torch.tensor([0.0, 1.0]), gamma=1.0)
    >>> [round(v, 4) for v in w.tolist()]
    [0.5379, 1.4621]
    """
    log_w = torch.log(weights.double()) + gamma * difficulty.double()
    return project_mean_one(torch.exp(log_w - log_w.max()), clip).to(weights.dtype)


def frequency_prior_weights(class_counts: torch.Tensor, *, kind: str = "effective_number",
                            beta: float = 0.9999) -> torch.Tensor:
    r"""Class-frequency prior weights with mean 1.

    ``"effective_number"``: :func:`effective_number_weights` (Cui et al. 2019) [2]_;
    ``"inverse_frequency"``: ``1 / n_c`` rescaled to mean 1.

    Parameters
    ----------
    class_counts : array-like of shape (C,)
        Training samples per class.
    kind : {"effective_number", "inverse_frequency"}, default="effective_number"
        The prior.
    beta : float, default=0.9999
        ``beta`` of the effective number.

    Returns
    -------
    torch.Tensor of shape (C,), float32
    """
    if kind == "effective_number":
        return effective_number_weights(class_counts, beta=beta)
    if kind == "inverse_frequency":
        inverse = 1.0 / _as_counts(class_counts)
        return (inverse / inverse.mean()).float()
    raise ValueError(f"kind must be 'effective_number' or 'inverse_frequency', got {kind!r}.")


def mix_class_weights(difficulty_weights: torch.Tensor, prior_weights: torch.Tensor, *,
                      alpha: float, combination: str = "convex") -> torch.Tensor:
    r"""Combine difficulty weights ``w`` and prior weights ``f`` (both mean 1).

    ``"convex"``: ``alpha w + (1 - alpha) f`` (mean 1 by construction);
    ``"product"``: ``w^alpha f^(1 - alpha)`` rescaled to mean 1. ``alpha = 1`` returns
    ``w``.

    Parameters
    ----------
    difficulty_weights, prior_weights : torch.Tensor of shape (C,)
        Positive weights with mean 1.
    alpha : float
        Share of the difficulty weights, in [0, 1].
    combination : {"convex", "product"}, default="convex"
        How to combine.

    Returns
    -------
    torch.Tensor of shape (C,)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    w, f = difficulty_weights, prior_weights.to(difficulty_weights)
    if combination == "convex":
        return alpha * w + (1.0 - alpha) * f
    if combination == "product":
        mixed = torch.exp(alpha * torch.log(w) + (1.0 - alpha) * torch.log(f))
        return mixed / mixed.mean()
    raise ValueError(f"combination must be 'convex' or 'product', got {combination!r}.")


def _expert_means(values: torch.Tensor, mask: torch.Tensor,
                  sample_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``values`` (B, K) over the rows where ``mask`` (B, K) is True, per
    expert; returns the means (K,) (0 where no row) and which experts had a row (of
    positive weight)."""
    w = mask.to(values.dtype)
    if sample_weight is not None:
        w = w * sample_weight.to(values.dtype).unsqueeze(1)
    total = w.sum(dim=0)
    present = mask.any(dim=0) if sample_weight is None else total > 0
    summed = torch.where(mask, values, torch.zeros_like(values)).mul(w).sum(dim=0)
    return summed / torch.where(present, total, torch.ones_like(total)), present


def region_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                         region_mask: torch.Tensor, *, weight: torch.Tensor | None = None,
                         reduction: str = "sample_mean",
                         sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Cross-entropy of each expert within its own region of classes.

    ``p_k(c | x) = softmax_{c in S_k}(z_k)`` and ``l_ik = -log p_k(y_i | x_i)`` for the
    experts whose region ``S_k`` holds ``y_i``; other experts and out-of-region logits
    get no gradient.

    Parameters
    ----------
    logits : torch.Tensor of shape (B, K, C)
        Expert logits.
    target : torch.Tensor of shape (B,)
        Encoded labels.
    region_mask : torch.Tensor of shape (K, C), dtype bool
        ``S_k``; every class in at least one region, no region empty.
    weight : torch.Tensor of shape (C,), default=None
        Class weights ``omega``.
    reduction : {"sample_mean", "per_expert_mean"}, default="sample_mean"
        ``"sample_mean"``: ``sum_i omega_{y_i} mean_{k: y_i in S_k} l_ik / sum_i
        omega_{y_i}`` (each sample counts once); ``"per_expert_mean"``: the
        ``omega``-weighted mean within each expert, averaged over the experts with a
        sample in the batch (balances the regions).
    sample_weight : torch.Tensor of shape (B,), default=None
        Per-sample weights, multiplying ``omega_{y_i}``.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    masked = logits.masked_fill(~region_mask.unsqueeze(0), float("-inf"))
    log_p = torch.log_softmax(masked, dim=2)
    index = target.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    covered = region_mask[:, target].T  # (B, K): y_i in S_k
    nll = torch.where(covered, -log_p.gather(2, index).squeeze(2), torch.zeros_like(log_p[..., 0]))
    if reduction == "sample_mean":
        per_sample = nll.sum(dim=1) / covered.sum(dim=1).to(nll.dtype)
        return weighted_mean(per_sample, target, weight, sample_weight)
    if reduction == "per_expert_mean":
        combined = None if weight is None else weight.to(nll.dtype)[target]
        if sample_weight is not None:
            combined = sample_weight.to(nll.dtype) * (1.0 if combined is None else combined)
            if not bool(combined.gt(0).any()):  # a batch of zero weights: no loss
                return nll.sum() * 0.0
        means, present = _expert_means(nll, covered, combined)
        return means[present].mean()
    raise ValueError(f"reduction must be 'sample_mean' or 'per_expert_mean', got {reduction!r}.")


def energy_margin_loss(energy: torch.Tensor, in_region: torch.Tensor, *, m_in: float,
                       m_out: float, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Squared-hinge energy loss of Liu et al. (2020), per expert and averaged.

    ``L_k = mean_{i in} relu(E_ik - m_in)^2 + mean_{i out} relu(m_out - E_ik)^2``,
    ``L = (1/K) sum_k L_k``. In-region samples of expert ``k`` are its in-distribution
    data, the others its outliers; each mean is taken separately (a term is 0 when its
    set is empty), so both sets count equally whatever their sizes.

    Parameters
    ----------
    energy : torch.Tensor of shape (B, K)
        Region energies ``E_k(x) = -T logsumexp_{c in S_k}(z_kc / T)``.
    in_region : torch.Tensor of shape (B, K), dtype bool
        Whether ``y_i`` lies in ``S_k``.
    m_in, m_out : float
        Margins, ``m_in < m_out``: in-region energies are pushed below ``m_in``,
        out-of-region energies above ``m_out``.
    sample_weight : torch.Tensor of shape (B,), default=None
        Weights of the samples in the means.

    Returns
    -------
    torch.Tensor
        Scalar; exactly 0 when all in-region energies are ``<= m_in`` and all
        out-of-region energies ``>= m_out``.
    """
    loss_in, _ = _expert_means(torch.relu(energy - m_in).square(), in_region, sample_weight)
    loss_out, _ = _expert_means(torch.relu(m_out - energy).square(), ~in_region, sample_weight)
    return (loss_in + loss_out).mean()


def energy_logistic_loss(energy: torch.Tensor, in_region: torch.Tensor, *,
                         scale: torch.Tensor, bias: torch.Tensor,
                         sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Balanced logistic loss of a detector ``sigmoid(a_k (-E_k) + b_k)`` per expert.

    The VOS-style alternative to :func:`energy_margin_loss` (Du et al. 2022): binary
    cross-entropy with label 1 in-region and 0 out-of-region, the two parts averaged
    separately per expert and summed, then averaged over experts. It does not depend
    on the scale of the logits.

    Parameters
    ----------
    energy : torch.Tensor of shape (B, K)
        Region energies.
    in_region : torch.Tensor of shape (B, K), dtype bool
        Whether ``y_i`` lies in ``S_k``.
    scale, bias : torch.Tensor of shape (K,)
        ``a_k > 0`` and ``b_k`` of each detector.
    sample_weight : torch.Tensor of shape (B,), default=None
        Weights of the samples in the means.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    score = scale * (-energy) + bias
    loss_in, _ = _expert_means(F.softplus(-score), in_region, sample_weight)
    loss_out, _ = _expert_means(F.softplus(score), ~in_region, sample_weight)
    return (loss_in + loss_out).mean()


def region_logit_l2_loss(logits: torch.Tensor, in_region: torch.Tensor,
                         region_mask: torch.Tensor, *,
                         sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""ACE-style suppression: ``mean_{i out} |z_k(x_i)[S_k]|^2 / |S_k|``, averaged over k.

    Pushes an expert's in-region logits towards 0 on samples outside its region, so its
    region energy tends to ``-T log |S_k|`` there (Cai et al. 2021).

    Parameters
    ----------
    logits : torch.Tensor of shape (B, K, C)
        Expert logits.
    in_region : torch.Tensor of shape (B, K), dtype bool
        Whether ``y_i`` lies in ``S_k``.
    region_mask : torch.Tensor of shape (K, C), dtype bool
        ``S_k``.
    sample_weight : torch.Tensor of shape (B,), default=None
        Weights of the samples in the means.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    mask = region_mask.unsqueeze(0).to(logits.dtype)
    sq = (logits.square() * mask).sum(dim=2) / mask.sum(dim=2)
    loss_out, _ = _expert_means(sq, ~in_region, sample_weight)
    return loss_out.mean()
