"""Long-tail losses and class statistics as pure functions of tensors.

Shared by every estimator. Class counts are training-fold counts aligned with the
encoded classes ``0..C-1``. Every loss takes logits ``(B, C)`` and integer targets
``(B,)`` and, where it accepts class ``weight``, reduces as
``torch.nn.functional.cross_entropy`` does: ``sum_b w[y_b] l_b / sum_b w[y_b]``.

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

import torch
import torch.nn.functional as F

__all__ = [
    "balanced_softmax_loss",
    "cross_entropy",
    "effective_number_weights",
    "focal_loss",
    "ldam_loss",
    "ldam_margins",
    "log_class_prior",
    "logit_adjusted_loss",
    "weighted_mean",
]


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


def weighted_mean(per_sample: torch.Tensor, target: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-sample losses like ``F.cross_entropy``: plain or class-weighted mean."""
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample.dtype)[target]
    return (w * per_sample).sum() / w.sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy with optional class weights (weighted-mean reduction)."""
    return F.cross_entropy(logits, target, weight=weight)


def ldam_loss(logits: torch.Tensor, target: torch.Tensor, *, margins: torch.Tensor,
              scale: float = 30.0, weight: torch.Tensor | None = None) -> torch.Tensor:
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
    """
    shift = torch.zeros_like(logits)
    shift.scatter_(1, target.unsqueeze(1), (scale * margins.to(logits.dtype)[target]).unsqueeze(1))
    return F.cross_entropy(logits - shift, target, weight=weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 1.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
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
    return weighted_mean(per_sample, target, weight)


def logit_adjusted_loss(logits: torch.Tensor, target: torch.Tensor, *,
                        log_prior: torch.Tensor, tau: float = 1.0,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Logit-adjusted cross-entropy ``CE(z + tau * log pi, y)`` [3]_.

    Trains ``z`` to estimate the balanced posterior, so ``argmax z`` at test time is
    Fisher-consistent for the balanced error when ``tau = 1``.
    """
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), target, weight=weight)


def balanced_softmax_loss(logits: torch.Tensor, target: torch.Tensor, *,
                          log_prior: torch.Tensor, weight: torch.Tensor | None = None
                          ) -> torch.Tensor:
    r"""Balanced Softmax [4]_: ``-log(n_y e^{z_y} / sum_j n_j e^{z_j})``.

    Equal to :func:`logit_adjusted_loss` with ``tau = 1`` (``log n_j`` and ``log pi_j``
    differ by a constant that cancels in the softmax); kept as its own name because
    the two papers are cited separately.
    """
    return logit_adjusted_loss(logits, target, log_prior=log_prior, tau=1.0, weight=weight)
