"""``LongTailClassifier``: one expert trained with a standard long-tail loss."""

from __future__ import annotations

from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ltroute._base import LongTailNet
from ltroute._docstring import shared_docs
from ltroute.losses import (
    LogProbNLLLoss,
    balanced_softmax_loss,
    cross_entropy,
    focal_loss,
    ldam_loss,
    ldam_margins,
    log_class_prior,
    logit_adjusted_loss,
)
from ltroute.nn import ExpertNet

__all__ = ["LongTailClassifier"]

LOSSES = ("ce", "focal", "ldam", "logit_adjusted", "balanced_softmax")


@shared_docs
class LongTailClassifier(LongTailNet):
    """Single-expert classifier with a standard long-tail loss (the baselines).

    Parameters
    ----------
    loss : {"ce", "focal", "ldam", "logit_adjusted", "balanced_softmax"}, default="ce"
        Training loss on the logits ``z``:

        - ``"ce"``: cross-entropy.
        - ``"focal"``: ``(1 - p_y)^gamma * CE`` (Lin et al. 2017).
        - ``"ldam"``: ``CE(z - s m_y e_y)`` with ``m_c`` proportional to
          ``n_c^{-1/4}``, the rarest class at ``ldam_max_margin`` (Cao et al. 2019).
        - ``"logit_adjusted"``: ``CE(z + tau log pi)`` (Menon et al. 2021).
        - ``"balanced_softmax"``: ``CE(z + log n)`` (Ren et al. 2020); identical to
          ``"logit_adjusted"`` with ``tau=1``.

        Prediction is always ``argmax z``.

    drw_epoch : int, "auto" or None, default=None
        Deferred re-weighting (Cao et al. 2019): from the first epoch *after*
        ``drw_epoch`` (1-based, as in LDAM-DRW's ``epoch > 160`` of 200) every loss is
        class-weighted by effective-number weights ``(1 - beta) / (1 - beta^{n_c})``
        normalised to sum to ``C`` (Cui et al. 2019). ``"auto"`` is ``int(0.8 *
        max_epochs)`` (LDAM-DRW's 160 of 200); ``None`` disables DRW; ``0`` weights from
        the first epoch.

    drw_beta : float, default=0.9999
        ``beta`` of the effective-number weights.

    ldam_max_margin : float, default=0.5
        LDAM margin of the rarest class.

    focal_gamma : float, default=1.0
        Focusing parameter of the focal loss (LDAM-DRW's CIFAR-LT baseline uses 1).

    logit_adjust_tau : float, default=1.0
        ``tau`` of the logit-adjusted loss.

    cosine_head : bool or None, default=None
        Cosine classifier ``s * cos(f, w_c)`` with ``s = head_scale``; ``None`` uses it
        for ``loss="ldam"`` (as LDAM-DRW does) and a linear head otherwise. With a
        linear head, LDAM subtracts ``head_scale * m_y`` from the raw logit.

    %(network_parameters)s

    %(training_parameters)s

    Attributes
    ----------
    %(fitted_attributes)s

    See Also
    --------
    RIDEClassifier : Several diverse experts with an expert-assignment router.
    DQRouteClassifier : Difficulty-aware weighting and energy-routed region experts.

    References
    ----------
    .. [1] Cao et al. "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
       Loss", NeurIPS 2019.
    .. [2] Menon et al. "Long-tail learning via logit adjustment", ICLR 2021.
    .. [3] Ren et al. "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
       NeurIPS 2020.
    .. [4] Cui et al. "Class-Balanced Loss Based on Effective Number of Samples",
       CVPR 2019.

    Examples
    --------
    >>> from ltroute import LongTailClassifier
    >>> from ltroute.datasets import load_letter_lt
    >>> data = load_letter_lt()
    >>> clf = LongTailClassifier(loss="logit_adjusted", max_epochs=5, random_state=0)
    >>> clf.fit(data.X_train, data.y_train).classes_[:3]
    array(['A', 'B', 'C'], dtype=object)
    >>> clf.predict_proba(data.X_test[:2]).sum(axis=1).round(6)
    array([1., 1.], dtype=float32)
    """

    _parameter_constraints: dict[str, list] = {
        **LongTailNet._parameter_constraints,
        "loss": [StrOptions(set(LOSSES))],
        "drw_epoch": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"}), None],
        "drw_beta": [Interval(Real, 0, 1, closed="left")],
        "ldam_max_margin": [Interval(Real, 0, None, closed="neither")],
        "focal_gamma": [Interval(Real, 0, None, closed="left")],
        "logit_adjust_tau": [Interval(Real, None, None, closed="neither")],
        "cosine_head": ["boolean", None],
    }

    def __init__(
        self,
        module=ExpertNet,
        *,
        loss="ce",
        drw_epoch=None,
        drw_beta=0.9999,
        ldam_max_margin=0.5,
        focal_gamma=1.0,
        logit_adjust_tau=1.0,
        cosine_head=None,
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
        self.loss = loss
        self.drw_epoch = drw_epoch
        self.drw_beta = drw_beta
        self.ldam_max_margin = ldam_max_margin
        self.focal_gamma = focal_gamma
        self.logit_adjust_tau = logit_adjust_tau
        self.cosine_head = cosine_head

    def _module_params(self):
        cosine = self.loss == "ldam" if self.cosine_head is None else bool(self.cosine_head)
        return super()._module_params() | {"cosine_head": cosine}

    def _training_loss(self, logits: torch.Tensor, y: torch.Tensor,
                       sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        z = logits[:, 0]
        weights = {"weight": self._drw_weights(self.drw_epoch, self.drw_beta),
                   "sample_weight": sample_weight}
        if self.loss == "ce":
            return cross_entropy(z, y, **weights)
        if self.loss == "focal":
            return focal_loss(z, y, gamma=self.focal_gamma, **weights)
        if self.loss == "ldam":
            margins = self._count_statistic(ldam_margins, z.device,
                                            max_margin=self.ldam_max_margin)
            return ldam_loss(z, y, margins=margins, scale=self.head_scale, **weights)
        log_prior = self._count_statistic(log_class_prior, z.device)
        if self.loss == "logit_adjusted":
            return logit_adjusted_loss(z, y, log_prior=log_prior, tau=self.logit_adjust_tau,
                                       **weights)
        return balanced_softmax_loss(z, y, log_prior=log_prior, **weights)
