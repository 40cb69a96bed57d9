"""``RIDEClassifier``: routing diverse distribution-aware experts (Wang et al., ICLR 2021).

Two stages inside one ``fit``:

1. skorch trains the shared trunk and ``K`` experts on the RIDE loss: per expert a
   classification term (LDAM with deferred re-weighting by default) plus the
   distribution-aware diversity KL, summed over experts. The ensemble is the mean of the
   expert logits.
2. ``_after_training`` trains the expert-assignment router on the frozen network: for
   each decision a small head reads the most recent expert's features and the top
   logits of the running ensemble and decides whether one more expert is worth running.

At prediction time experts run in order and each sample stops when the router says so;
its output is the mean of the logits of the experts it used, combined through
:func:`ltroute.fusion.fuse_experts` with a per-sample mask.
"""

from __future__ import annotations

import re
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from skorch.dataset import unpack_data
from skorch.utils import to_tensor
from torch import nn

from ltroute._base import LongTailNet
from ltroute._docstring import shared_docs
from ltroute._inputs import TrainingDataset, is_dataset_input
from ltroute._validation import rolls_back_on_error, split_sample_weight
from ltroute.augmentation import ImageAugmentation
from ltroute.losses import (
    LogProbNLLLoss,
    cross_entropy,
    distribution_aware_temperature,
    focal_loss,
    ldam_loss,
    ldam_margins,
    log_class_prior,
    logit_adjusted_loss,
    ride_diversity_loss,
    router_loss,
    router_targets,
)
from ltroute.nn import ExpertNet, count_macs

__all__ = ["RIDEClassifier", "RIDERouter", "RIDESGD"]

LOSSES = ("ldam", "ce", "focal", "logit_adjusted")


class RIDESGD(torch.optim.SGD):
    """SGD with the official RIDE settings: momentum 0.9, Nesterov, weight decay 5e-4.

    Both of RIDE's stages use them (stage 1 with lr 0.1, the router with 0.01). Any of
    them can be changed as usual, e.g. ``optimizer__weight_decay=2e-4``.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True, **kwargs) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)


class RIDERouter(nn.Module):
    """RIDE's expert-assignment module: ``K - 1`` yes/no decisions "run one more expert?".

    Decision ``i`` reads the feature vector ``h_i`` of expert ``i`` (the input of its
    head), L2-normalised, and the ``top_k`` largest running-mean logits ``a_i`` of
    experts ``0..i`` (sorted, descending). Its logit is
    ``r_i = w^T [a_i ; ReLU(A_i h_i + b_i)] + c``: a hidden layer per decision and an
    output layer shared by all decisions.

    Parameters
    ----------
    in_features : int
        Width ``D`` of the expert features.
    n_decisions : int
        ``K - 1``.
    top_k : int
        Number of top logits fed to the output layer.
    hidden_size : int, default=16
        Width of each decision's hidden layer.
    """

    def __init__(self, in_features: int, n_decisions: int, top_k: int,
                 hidden_size: int = 16) -> None:
        super().__init__()
        self.top_k = int(top_k)
        self.hidden = nn.ModuleList(nn.Linear(in_features, hidden_size)
                                    for _ in range(n_decisions))
        self.output = nn.Linear(self.top_k + hidden_size, 1)
        for layer in (*self.hidden, self.output):  # the CIFAR code's Kaiming init
            nn.init.kaiming_normal_(layer.weight)

    def forward(self, features: torch.Tensor, mean_logits: torch.Tensor,
                decision: int) -> torch.Tensor:
        """Logit ``r`` (B,) of ``decision`` from expert features (B, D) and the running
        mean logits (B, C) of the experts used so far."""
        hidden = F.relu(self.hidden[decision](F.normalize(features, dim=1)))
        top = torch.topk(mean_logits, k=self.top_k, dim=1).values
        return self.output(torch.cat((top, hidden), dim=1)).squeeze(1)


def _replace_parameter_docs(doc: str | None, **entries: str) -> str | None:
    """Replace numpydoc parameter entries (``name : ...`` up to the next blank line) of a
    class docstring, for the shared fragments whose defaults RIDE changes."""
    if doc is None:  # python -OO
        return doc
    for name, text in entries.items():
        doc, found = re.subn(rf"^    {name} : .*?(?=\n\n)", text.strip("\n"), doc,
                             count=1, flags=re.MULTILINE | re.DOTALL)
        if not found:
            raise RuntimeError(f"no parameter entry {name!r} to replace")
    return doc


def _class_balanced_schedule(y: np.ndarray, n_classes: int, n_draws: int,
                             device: torch.device) -> torch.Tensor:
    """Sample indices drawn class-balanced, as RIDE's stage-2 sampler: every draw picks a
    class uniformly and takes the next index of that class's shuffled list, reshuffled
    when exhausted. Uses the (seeded) global torch RNG."""
    draws = torch.randint(n_classes, (n_draws,))
    order = torch.empty(n_draws, dtype=torch.long)
    for c in range(n_classes):
        slots = torch.nonzero(draws == c).flatten()
        if len(slots) == 0:
            continue
        members = torch.as_tensor(np.flatnonzero(y == c))
        cycles = -(-len(slots) // len(members))
        sequence = [members[torch.randperm(len(members))] for _ in range(cycles)]
        order[slots] = torch.cat(sequence)[:len(slots)]
    return order.to(device)


@shared_docs
class RIDEClassifier(LongTailNet):
    r"""RIDE: a shared trunk, several diverse experts and an expert-assignment router.

    Stage 1 trains ``K`` experts (own late layers and cosine heads on a shared trunk)
    with, for each expert, a long-tail classification loss and a KL term that rewards
    disagreeing with the ensemble; stage 2 trains a small router on the frozen network
    that runs the experts in order and stops per sample once more experts are unlikely
    to help (Wang et al. 2021).

    Parameters
    ----------
    n_experts : int, default=3
        Number of experts ``K``.

    loss : {"ldam", "ce", "focal", "logit_adjusted"}, default="ldam"
        Classification term ``L_cls(z_k, y)`` of each expert ("RIDE + X" in the paper
        swaps this term only):

        - ``"ldam"``: ``CE(z_k - s m_y e_y)`` with ``m_c = ldam_max_margin *
          n_c^{-1/4} / max_j n_j^{-1/4}`` and ``s = head_scale`` (RIDE's default);
        - ``"ce"``: cross-entropy;
        - ``"focal"``: ``(1 - p_y)^focal_gamma * CE``;
        - ``"logit_adjusted"``: ``CE(z_k + log pi)`` with the training prior ``pi``
          (Menon et al. 2021; not in the official code). Usually with
          ``drw_epoch=None``, since it already targets the balanced error.

        DRW class weights (``drw_epoch``) apply to any of them.

    diversity_weight : float, default=-0.45
        ``lambda`` of the diversity term, in the **official code's sign convention**:
        the loss *adds* ``lambda * mean(T)^2 * KL(q || p_k)``, so a **negative** value
        rewards divergence from the ensemble (experts are pushed apart; the paper's
        ``-lambda/(K-1) sum KL`` with a positive ``lambda``). ``-0.45`` is the
        CIFAR-100-LT value, ``-0.2`` the ImageNet-LT/iNaturalist one. ``0`` switches the
        term off and keeps the individual losses (unlike the official code, which then
        silently trains the collaborative loss, see ``collaborative``); a positive value
        pulls the experts towards the ensemble.

    diversity_temperature : float, default=1.0
        ``alpha``, the base temperature of the diversity KL.

    reweight_factor : float, default=0.05
        ``gamma`` of the distribution-aware temperature. From the DRW epoch on, class
        column ``c`` is softened by ``T_c = alpha psi_c / max_j psi_j`` with ``psi_c =
        gamma C p_c + 1 - gamma`` (before it, ``T = alpha``). ``0`` keeps ``T = alpha``
        throughout (no per-class temperature).

    collaborative : bool, default=False
        Compute every expert's classification term on the ensemble logits ``zbar``
        instead of its own (``K`` identical copies), which is what the official code
        does when ``lambda = 0`` ("collaborative loss" of the ablation in issue #7).

    drw_epoch : int, "auto" or None, default="auto"
        Deferred re-weighting: from the first epoch *after* ``drw_epoch`` (1-based) the
        classification terms are weighted by ``w_c = (1 - beta) / (1 - beta^{n_c})``
        normalised to sum to ``C``, and the diversity temperature becomes per class.
        ``"auto"`` is ``int(0.8 * max_epochs)`` (the paper's 160 of 200); ``None``
        switches DRW off (and keeps ``T = alpha``), ``0`` re-weights from the start.

    drw_beta : float, default=0.9999
        ``beta`` of the effective-number weights.

    ldam_max_margin : float, default=0.5
        LDAM margin of the rarest class.

    focal_gamma : float, default=1.0
        Focusing parameter of ``loss="focal"``.

    cosine_head : bool, default=True
        Cosine heads ``z_k = s cos(f_k, w_c)`` with ``s = head_scale`` (RIDE's
        ``NormedLinear``); ``False`` gives linear heads with bias.

    reduce_dimension : bool, default=True
        ResNet-32 experts with layer2/layer3 widths 24/48 instead of 32/64, so that three
        experts cost about as much as one full ResNet-32; ResNet-50/ResNeXt-50 experts
        with layer3/layer4 planes 192/384 instead of 256/512 (RIDE's ImageNet-LT
        models). Other backbones ignore it.

    router : bool, default=True
        Train the expert-assignment router (stage 2) and route at prediction time;
        ``False`` always uses all experts. Can be switched off after ``fit``.

    router_epochs : int, default=5
        Stage-2 epochs (class-balanced sampling, cosine-annealed learning rate).

    router_threshold : float, default=0.5
        A sample runs expert ``i + 1`` when ``sigmoid(r_i) > router_threshold``; ``1``
        always stops after the first expert, lower values use more experts. Can be
        changed after ``fit``.

    router_pos_weight : float, default=100.0
        Weight ``omega_p`` of the positive ("add an expert") targets in the router's
        binary cross-entropy, the accuracy/compute knob (RIDE uses 100).

    router_margin : bool, float or "auto", default="auto"
        Router targets with margins (our addition, not in the official code): a prefix
        of experts counts as right only when its mean logits are right by
        ``router_margin`` times the label's LDAM margin ``head_scale * m_y`` (``m_y`` as
        for ``loss="ldam"``, from ``ldam_max_margin``); ``True`` is 1. ``False`` (or 0)
        gives the official targets (plain argmax). Margins turn more training samples
        into "add an expert" targets where the experts fit the training data (see
        Notes), so the router uses more experts. ``"auto"`` (the default) takes the
        official targets when the training stream is augmented (``augmentation``, or an
        :class:`~ltroute.augmentation.ImageAugmentation` as
        ``iterator_train__collate_fn``) and half the LDAM margin otherwise: the values
        that 5-fold cross-validation over the training split chose in each case
        (``benchmarks/results/router_search_folds_*.md``; see Notes). A dataset that
        augments inside its own ``__getitem__`` is not seen: give ``False`` there.
        ``router_margin_`` holds the value used. :meth:`fit_router` tries a value
        without refitting the experts.

    router_top_k : int, default=30
        Number of top running-mean logits the router reads (30 on CIFAR-100); clipped
        to the number of classes.

    router_lr : float, default=0.01
        Learning rate of the stage-2 :class:`RIDESGD` (momentum 0.9, Nesterov, weight
        decay 5e-4), cosine-annealed to 0 over ``router_epochs``, as the official code.

    router_batch_size : int, default=512
        Stage-2 mini-batch size.

    %(network_parameters)s

    %(training_parameters)s

    Attributes
    ----------
    %(fitted_attributes)s

    router_module_ : RIDERouter or None
        The trained router (``None`` when ``router=False`` or ``n_experts=1``). Its
        constructor takes extra arguments as ``router_module__*`` (e.g.
        ``router_module__hidden_size=32``).

    router_losses_ : ndarray of shape (router_epochs,) or None
        Mean weighted BCE of each stage-2 epoch.

    macs_ : dict
        Multiply-accumulates per sample of each part, counted on one sample with
        ``torch.utils.flop_counter`` (convolutions and matrix products; normalisation and
        activations excluded): ``"trunk"`` (int), ``"experts"`` (list of K ints),
        ``"router"`` (list of K - 1 ints, empty without router).

    router_margin_ : float
        The multiple of the LDAM margin the router's targets were computed with (0: the
        official targets), ``router_margin`` with ``"auto"`` resolved; absent without
        router.

    expert_usage_ : float
        Mean number of experts used per sample by the last ``predict``,
        ``predict_proba``, ``score`` or ``route`` call (after ``fit``: on the training
        data).

    relative_macs_ : float
        MACs of that call relative to running every expert on every sample (trunk,
        experts used and routing heads evaluated, over trunk plus all experts).

    See Also
    --------
    LongTailClassifier : One expert with a standard long-tail loss.
    DQRouteClassifier : Difficulty-aware weighting and energy-routed region experts.

    Notes
    -----
    Stage-1 loss (the official code's ``RIDELoss``), summed over experts, for expert
    logits ``z_k`` and the ensemble ``zbar = (1/K) sum_k z_k``:

    .. math::

        L = \sum_{k=1}^{K} \Big[ L_{cls}(z_k, y)
            + \lambda \, \bar T^2 \, \mathrm{KL}\big(\mathrm{softmax}(\bar z / T)
            \,\|\, \mathrm{softmax}(z_k / T)\big) \Big]

    with the ensemble distribution detached, ``T`` per class column after the DRW epoch
    and ``bar T = mean_c T_c``. The network's output in training and without router is
    ``zbar``. Stage 2 freezes the network (BatchNorm in inference mode) and trains the
    router on targets ``y_i = 1`` iff the prefix ensemble of experts ``0..i`` is wrong
    and a longer prefix is right, with a ``router_pos_weight``-weighted binary
    cross-entropy. At prediction time a sample's output is the mean logit of the prefix
    of experts it used.

    Differences between the paper and the official code (this class follows the code):
    the paper's pairwise ``KL(phi_k || phi_j)`` is one ``KL(ensemble || expert)`` per
    expert; the paper's additive temperature shift is a normalisation by the maximum,
    and the temperature is chosen per logit column, not by the sample's label; the
    ``bar T^2`` factor is not in the paper.

    Differences from the official code: ``diversity_weight=0`` keeps individual losses
    (``collaborative=True`` gives the code's behaviour); ``drw_epoch=None`` is a clean
    "no DRW" (the code crashes); routing features use ``F.normalize`` (the code divides
    by the norm without epsilon); in the network's inference mode dropout is off in
    stage 2 too (the code only freezes BatchNorm); no checkpoint is selected on the
    test set (the last epoch is kept); without augmentation the router's targets ask
    for half the label's LDAM margin by default (``router_margin=False`` gives the
    code's, see below). The
    optimiser and schedule are the official ones (SGD 0.1 with Nesterov momentum, weight
    decay 5e-4, warm-up and step decay), scaled to ``max_epochs``.

    Stage 2 (targets with ``router_margin=False``, router logits, loss and its gradients,
    class-balanced stream, BatchNorm in eval mode, SGD and cosine schedule) and routed
    inference match the official code (``tests/test_ride.py`` transcribes its EA
    forward). The router learns from the training stream, and with weighted BCE its
    logit is positive where the rate
    ``q`` of "this prefix is wrong and a longer one right" exceeds
    ``1 / (1 + router_pos_weight)`` (1 %% at 100). When the experts fit the training set
    (small data, no augmentation), ``q`` is far lower there than on unseen data
    (MNIST-LT, ConvNet, 30 epochs, seed 0: 0.13 %% of training samples, 0.6 %% of the
    class-balanced stream, against 2.2 %% of the test samples), so the router learns to
    stop after the first expert, as the official code does on such data; augmentation
    (the official CIFAR recipe) keeps training errors that resemble test errors.
    ``router_margin`` (not in the official code) counts a prefix as right only beyond a
    multiple of its label's LDAM margin, the training margin that LDAM's generalisation
    bound asks of a class with ``n_y`` samples, so the targets mark the training samples
    whose prefix is at risk on unseen data. The values were chosen by 5-fold
    cross-validation over the training split with one stage-1 network per fold and one
    router per value (``benchmarks/router_search.py --folds 5``: every training sample
    validated once; letter-LT and MNIST-LT seeds 0-2, 30 epochs; CIFAR-10-LT seeds 0
    and 1, 15 epochs with crop + flip), as the value that met our router goal (at most
    1.5 experts per sample, within 0.3 points of all experts) on the most (data set,
    seed) pairs: half the margin, 4 of 8, against 2 for the official targets and for
    the whole margin. Letter-LT: 80.6 %% balanced accuracy at 1.21 experts per sample
    (all experts 80.6 %%) against 80.2 %% at 1.06 for the official targets, half margins
    ahead on every seed; MNIST-LT: 93.0 %% at 1.00 for both (all experts 93.1 %%). With
    augmentation the official targets reach the same accuracy with fewer experts
    (CIFAR-10-LT seed 0: 56.5 %% at 1.56 experts against 56.4 %% at 2.57), a rule then
    confirmed on seed 1 against a criterion written down before it ran (56.0 %% at 1.50
    against 56.1 %% at 2.17), hence ``router_margin="auto"``: the official targets for
    an augmented training stream, half the margin otherwise. Without augmentation (a
    training set that stage 1 fits) the official targets sit at the router's decision
    threshold: on letter-LT's full training split they route 1.00 experts per sample
    at 2 torch threads, up to 0.75 points below all experts, where half margins route
    1.2-1.5 within 0.25 points. One 80 / 20 split per seed (one or two validation
    samples of a rare class) had favoured the official targets within its noise
    (``benchmarks/results/router_search_letter_mnist.md``,
    ``router_search_cifar10.md``). The registered configurations
    ``"ride-official-router"``, ``"ride-half-margin-router"`` and
    ``"ride-margin-router"`` use ``router_margin=False``, ``0.5`` and ``True``.
    ``expert_usage_`` and ``relative_macs_`` report what the router does;
    ``router_threshold`` trades accuracy for compute after ``fit``.

    References
    ----------
    .. [1] Wang, Lian, Miao, Liu, Yu. "Long-tailed Recognition by Routing Diverse
       Distribution-Aware Experts", ICLR 2021.
    .. [2] Cao et al. "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
       Loss", NeurIPS 2019.
    .. [3] Cui et al. "Class-Balanced Loss Based on Effective Number of Samples",
       CVPR 2019.

    Examples
    --------
    >>> from ltroute import RIDEClassifier
    >>> from ltroute.datasets import load_letter_lt
    >>> data = load_letter_lt()
    >>> clf = RIDEClassifier(max_epochs=5, random_state=0)
    >>> clf.fit(data.X_train, data.y_train).classes_[:3].tolist()
    ['A', 'B', 'C']
    >>> used = clf.route(data.X_test)
    >>> bool(1 <= used.min() and used.max() <= 3)
    True
    >>> # A new router with margin targets; the experts are not retrained.
    >>> margins = clf.set_params(router_margin=1.0).fit_router(data.X_train, data.y_train)
    >>> margins.router_losses_.shape
    (5,)
    >>> RIDEClassifier(router=False, max_epochs=2).fit(data.X_train, data.y_train).route(
    ...     data.X_test[:4]).tolist()
    [3, 3, 3, 3]
    """

    _parameter_constraints: dict[str, list] = {
        **LongTailNet._parameter_constraints,
        "n_experts": [Interval(Integral, 1, None, closed="left")],
        "loss": [StrOptions(set(LOSSES))],
        "diversity_weight": [Interval(Real, None, None, closed="neither")],
        "diversity_temperature": [Interval(Real, 0, None, closed="neither")],
        "reweight_factor": [Interval(Real, 0, 1, closed="both")],
        "collaborative": ["boolean"],
        "drw_epoch": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"}), None],
        "drw_beta": [Interval(Real, 0, 1, closed="left")],
        "ldam_max_margin": [Interval(Real, 0, None, closed="neither")],
        "focal_gamma": [Interval(Real, 0, None, closed="left")],
        "cosine_head": ["boolean"],
        "reduce_dimension": ["boolean"],
        "router": ["boolean"],
        "router_epochs": [Interval(Integral, 1, None, closed="left")],
        "router_threshold": [Interval(Real, 0, 1, closed="both")],
        "router_pos_weight": [Interval(Real, 0, None, closed="neither")],
        "router_margin": ["boolean", Interval(Real, 0, None, closed="left"),
                          StrOptions({"auto"})],
        "router_top_k": [Interval(Integral, 1, None, closed="left")],
        "router_lr": [Interval(Real, 0, None, closed="neither")],
        "router_batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        module=ExpertNet,
        *,
        n_experts=3,
        loss="ldam",
        diversity_weight=-0.45,
        diversity_temperature=1.0,
        reweight_factor=0.05,
        collaborative=False,
        drw_epoch="auto",
        drw_beta=0.9999,
        ldam_max_margin=0.5,
        focal_gamma=1.0,
        cosine_head=True,
        reduce_dimension=True,
        router=True,
        router_epochs=5,
        router_threshold=0.5,
        router_pos_weight=100.0,
        router_margin="auto",
        router_top_k=30,
        router_lr=0.01,
        router_batch_size=512,
        backbone="auto",
        hidden_sizes=(256, 256),
        expert_hidden_sizes=(128,),
        head_scale=30.0,
        dropout=0.0,
        criterion=LogProbNLLLoss,
        optimizer=RIDESGD,
        lr=0.1,
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
        self.loss = loss
        self.diversity_weight = diversity_weight
        self.diversity_temperature = diversity_temperature
        self.reweight_factor = reweight_factor
        self.collaborative = collaborative
        self.drw_epoch = drw_epoch
        self.drw_beta = drw_beta
        self.ldam_max_margin = ldam_max_margin
        self.focal_gamma = focal_gamma
        self.cosine_head = cosine_head
        self.reduce_dimension = reduce_dimension
        self.router = router
        self.router_epochs = router_epochs
        self.router_threshold = router_threshold
        self.router_pos_weight = router_pos_weight
        self.router_margin = router_margin
        self.router_top_k = router_top_k
        self.router_lr = router_lr
        self.router_batch_size = router_batch_size

    # ------------------------------------------------------------------ public
    def route(self, X) -> np.ndarray:
        """Number of experts each sample uses (a prefix ``0..n-1`` of the expert order).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W)
            Same kind of input as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,), int
            Between 1 and ``n_experts``; ``n_experts`` everywhere when ``router=False``.
        """
        return self._fused_outputs(X)[2].gt(0).sum(dim=1).numpy()

    @rolls_back_on_error
    def fit_router(self, X, y=None) -> RIDEClassifier:
        """Train the router (stage 2) again on the fitted experts; stage 1 is unchanged.

        The official code trains its expert-assignment module as a separate run from a
        stage-1 checkpoint; this is that run. It trains a new router, as ``fit`` does
        after stage 1 (the class-balanced training stream, the ``augmentation``, the
        current ``router_*`` parameters), on the labelled data given: the training data
        again after changing ``router_margin``, ``router_pos_weight`` or
        ``router_epochs``, or a network fitted with ``router=False`` (set
        ``router=True`` first), or samples that stage 1 did not see, whose mistakes the
        router then learns from where stage 1 fits its training data without error
        (``benchmarks/router_holdout.py`` measures it on MNIST-LT: a fifth held out of
        stage 1 cost it more accuracy than the router saved). The network, the
        normalisation statistics and the class counts (LDAM margins) stay those of
        ``fit``. Seeded by ``random_state``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W), or Dataset
            Same kind of input as in ``fit``.
        y : array-like of shape (n_samples,), optional
            Labels, all classes of the fitted estimator; may be omitted for a dataset of
            ``(image, label)`` items.

        Returns
        -------
        self : RIDEClassifier
            With ``router_module_``, ``router_losses_``, ``macs_``, ``expert_usage_``
            and ``relative_macs_`` (on ``X``) replaced.

        Raises
        ------
        ValueError
            When ``router=False``, the network has one expert, ``y`` has labels that are
            not classes or another length than ``X``, or ``X`` is an input ``fit``
            rejects. Nothing is changed then.
        """
        check_is_fitted(self, ["module_", "classes_"])
        self._check_params()
        name = type(self).__name__
        if not self.router or self.module_.n_experts == 1:
            raise ValueError(f"{name}.fit_router needs router=True and a network of "
                             f"several experts; got router={self.router!r} and "
                             f"{self.module_.n_experts} expert(s).")
        inputs = self._validate_predict_data(X)  # the fitted sample shape, normalised
        codes = self._encode_given_labels(X, y, f"{name}.fit_router")
        if is_dataset_input(X):  # training items: (image, encoded label)
            inputs = TrainingDataset(X, codes, self.input_shape_,
                                     normalization=self._normalization())
        if len(codes) != len(inputs):
            raise ValueError(f"{name}.fit_router: X has {len(inputs)} samples but y has "
                             f"{len(codes)} labels.")
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with self._runtime(seed=seed):
            router = self._new_router().to(self.device)
            losses = self._train_router(router, inputs, codes)
            with self._current_init_context("module"):  # skorch's guard on modules
                self.router_module_ = router
            self.router_losses_ = losses
            self.macs_ = self._count_macs()  # with this router's heads
            self._record_usage(self.forward(inputs, training=False)[2].gt(0).sum(dim=1))
        return self

    # ------------------------------------------------------------ skorch hooks
    #: The official schedule: 5 warm-up epochs, lr x0.01 at 80 % and 90 % (SGD 0.1).
    _lr_warmup_epochs = 5
    _lr_decay = 0.01

    def _module_params(self) -> dict[str, Any]:
        return super()._module_params() | {
            "n_experts": int(self.n_experts),
            "cosine_head": bool(self.cosine_head),
            "reduce_dimension": bool(self.reduce_dimension),
        }

    def initialize_module(self):
        """Build the network, then the router (``router_module_``) when it is used."""
        super().initialize_module()
        self.router_losses_ = None
        self.__dict__.pop("router_margin_", None)  # set again when a router is trained
        self.router_module_ = (self._new_router() if self.router and self.n_experts > 1
                               else None)
        return self

    def _new_router(self) -> RIDERouter:
        """An untrained router for the network ``module_`` (``router_module__*`` passed on)."""
        kwargs = {
            "in_features": self.module_.feature_dim,
            "n_decisions": self.module_.n_experts - 1,
            "top_k": min(int(self.router_top_k), len(self.classes_)),
        } | self.get_params_for("router_module")
        return RIDERouter(**kwargs)

    def get_all_learnable_params(self):
        """Parameters of stage 1's optimiser: everything but the router (stage 2)."""
        router = getattr(self, "router_module_", None)
        frozen = set(router.parameters()) if router is not None else set()
        for name, param in super().get_all_learnable_params():
            if param not in frozen:
                yield name, param

    def _inference_logits(self, batch, training=False):
        """Routed expert logits and used-expert mask once the router is trained; all
        experts otherwise."""
        if training or not self._routing():
            return super()._inference_logits(batch, training=training)
        self.check_is_fitted()
        Xi = split_sample_weight(unpack_data(batch)[0])[0]
        with torch.no_grad():
            self._set_training(False)
            return self._routed_logits(to_tensor(Xi, device=self.device))

    # ---------------------------------------------------------- method hooks
    def _training_loss(self, logits: torch.Tensor, y: torch.Tensor,
                       sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        _, n_experts, n_classes = logits.shape
        weight = self._drw_weights(self.drw_epoch, self.drw_beta)
        if self.collaborative:
            loss = n_experts * self._classification_loss(logits.mean(dim=1), y, weight,
                                                         sample_weight)
        else:
            # One call over the B*K rows: each expert sees the same labels, so K times
            # the (weighted) mean over rows is the sum of the per-expert losses.
            loss = n_experts * self._classification_loss(
                logits.reshape(-1, n_classes), y.repeat_interleave(n_experts), weight,
                None if sample_weight is None else sample_weight.repeat_interleave(n_experts))
        if self.diversity_weight != 0:
            temperature = self._temperature(per_class=weight is not None,
                                            device=logits.device)
            loss = loss + self.diversity_weight * ride_diversity_loss(
                logits, temperature=temperature, sample_weight=sample_weight)
        return loss

    def _after_training(self, X: np.ndarray, y: np.ndarray) -> None:
        """Stage 2 (router), then the compute counts and usage on the training data."""
        if self.router_module_ is not None:
            self.router_losses_ = self._train_router(self.router_module_, X, y)
        self.macs_ = self._count_macs()
        if self._routing():  # the usage on the training data (X is validated already)
            self._record_usage(self.forward(X, training=False)[2].gt(0).sum(dim=1))
        else:
            self._record_usage(torch.full((len(X),), self.module_.n_experts))

    # ------------------------------------------------------------- stage 1
    def _classification_loss(self, z: torch.Tensor, y: torch.Tensor,
                             weight: torch.Tensor | None,
                             sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        weights = {"weight": weight, "sample_weight": sample_weight}
        if self.loss == "ce":
            return cross_entropy(z, y, **weights)
        if self.loss == "focal":
            return focal_loss(z, y, gamma=self.focal_gamma, **weights)
        if self.loss == "logit_adjusted":
            return logit_adjusted_loss(
                z, y, log_prior=self._count_statistic(log_class_prior, z.device), **weights)
        margins = self._count_statistic(ldam_margins, z.device,
                                        max_margin=self.ldam_max_margin)
        return ldam_loss(z, y, margins=margins, scale=self.head_scale, **weights)

    def _temperature(self, per_class: bool, device=None) -> torch.Tensor | float:
        """Diversity temperature: the number ``alpha`` before DRW (no tensor made on the
        device at each step), per class on ``device`` from the DRW epoch (computed once
        per fit)."""
        if not per_class:
            return float(self.diversity_temperature)
        return self._count_statistic(
            distribution_aware_temperature, device,
            base_temperature=self.diversity_temperature, reweight_factor=self.reweight_factor)

    # ------------------------------------------------------------- stage 2
    def _train_router(self, router: RIDERouter, X, y: np.ndarray) -> np.ndarray:
        """Train ``router`` on the frozen experts (the official EA stage); return the mean
        weighted BCE of each epoch.

        As the official code, stage 2 reads the *training stream*: batches of
        ``router_batch_size`` drawn by the class-balanced sampler and collated by the
        training loader's ``collate_fn`` (so an ``iterator_train__collate_fn`` augmentation
        such as :class:`~ltroute.augmentation.ImageAugmentation` applies to the router as
        to stage 1, and so does the ``augmentation`` parameter, applied on the training
        device as in stage 1), every expert recomputed on each batch with BatchNorm in eval mode
        (frozen statistics, exactly the test-time network).

        The router can only learn to add experts from training samples on which a prefix
        of experts is wrong and a longer one right. On clean training data that stage 1
        has fitted (letter-LT: 99.8 % training accuracy, 0.07 % positive targets) it
        learns to stop after the first expert; augmentation (the official CIFAR recipe)
        or ``router_margin`` (a prefix is right only beyond the label's LDAM margin)
        supplies such samples.
        """
        n_samples = len(y)
        self.router_margin_ = self._resolved_router_margin()
        loader_params = {key: value for key, value in self.get_params_for("iterator_train")
                         .items() if key not in ("batch_size", "shuffle", "sampler",
                                                 "batch_sampler", "drop_last")}
        dataset = self.get_dataset(X, y)
        optimizer = RIDESGD(router.parameters(), lr=self.router_lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                               T_max=self.router_epochs)
        schedule = _class_balanced_schedule(y, len(self.classes_),
                                            self.router_epochs * n_samples, torch.device("cpu"))
        losses = []
        for epoch_order in schedule.split(n_samples):
            loader = self.iterator_train(dataset, batch_size=int(self.router_batch_size),
                                         sampler=epoch_order.tolist(), shuffle=False,
                                         **loader_params)
            total = 0.0  # a tensor on the loss's device after the first batch: read once
            for batch in loader:
                Xb, yb = unpack_data(batch)
                scores, targets = self._router_batch(router, split_sample_weight(Xb)[0], yb)
                loss = router_loss(scores, targets, pos_weight=self.router_pos_weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total = total + loss.detach() * len(targets)
            scheduler.step()
            losses.append(float(total) / n_samples)
            if self.verbose:
                print(f"router epoch {len(losses)}/{self.router_epochs}: "
                      f"weighted BCE {losses[-1]:.4f}")
        router.eval()
        return np.asarray(losses)

    def _resolved_router_margin(self) -> float:
        """``router_margin`` as a multiple of the LDAM margin, ``"auto"`` resolved: 0 (the
        official targets) for an augmented training stream, 0.5 otherwise."""
        if self.router_margin != "auto":
            return float(self.router_margin)
        augmented = (self.augmentation is not None or isinstance(
            self.get_params_for("iterator_train").get("collate_fn"), ImageAugmentation))
        return 0.0 if augmented else 0.5

    def _router_batch(self, router: RIDERouter, X, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (B, K - 1), with gradients for the router only, and targets
        (B, K - 1) of one stage-2 batch: every expert runs on every sample with the
        network frozen (BatchNorm in eval mode), decision ``i`` reads expert ``i``'s
        features and the mean logits of experts ``0..i``."""
        net = self.module_
        self._set_training(False)  # frozen network, BatchNorm in eval mode
        router.train()
        with torch.no_grad():
            shared = net.shared(self._router_inputs(X))
            features = torch.stack([net.expert_features(shared, k)
                                    for k in range(net.n_experts)], dim=1)
            logits = torch.stack([net.expert_logits(features[:, k], k)
                                  for k in range(net.n_experts)], dim=1)
            multiple = self._resolved_router_margin()
            margins = (multiple * self.head_scale * self._count_statistic(
                ldam_margins, logits.device, max_margin=self.ldam_max_margin)
                if multiple else None)
            targets = router_targets(logits, to_tensor(y, device=self.device).long(),
                                     margins=margins)
            counts = torch.arange(1, net.n_experts, device=logits.device, dtype=logits.dtype)
            running = logits.cumsum(dim=1)[:, :-1] / counts.view(1, -1, 1)
        scores = torch.stack([router(features[:, i], running[:, i], i)
                              for i in range(net.n_experts - 1)], dim=1)
        return scores, targets

    def _router_inputs(self, X) -> torch.Tensor:
        """One stage-2 batch as stage 1's training step feeds the network: the
        ``augmentation`` parameter's transform on the training device (the inputs are
        already normalised, as in stage 1, and padding takes a zero pixel's normalised
        value) and the ``channels_last`` layout."""
        X = (self._augment_batch(X) if self.augmentation is not None
             else to_tensor(X, device=self.device))
        if self.channels_last and X.ndim == 4:
            X = X.contiguous(memory_format=torch.channels_last)
        return X

    # ------------------------------------------------------------ inference
    def _routing(self) -> bool:
        """Whether inference routes: ``router=True`` and a router trained by ``fit``."""
        if not self.router or getattr(self, "module_", None) is None \
                or self.module_.n_experts == 1:
            return False
        if getattr(self, "router_module_", None) is None:
            raise ValueError("router=True, but this RIDEClassifier was fitted with "
                             "router=False; fit it again to train the router.")
        return self.router_losses_ is not None

    def _routed_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert logits (B, K, C), zero where unused, and the used-expert mask (B, K)."""
        net, router = self.module_, self.router_module_
        shared = net.shared(x)
        features = net.expert_features(shared, 0)
        first = net.expert_logits(features, 0)
        n_samples, n_classes = first.shape
        logits = first.new_zeros(n_samples, net.n_experts, n_classes)
        used = torch.zeros(n_samples, net.n_experts, dtype=torch.bool, device=first.device)
        logits[:, 0], used[:, 0] = first, True
        total = first.clone()
        active = torch.arange(n_samples, device=first.device)
        for k in range(1, net.n_experts):
            score = router(features, total[active] / k, k - 1)
            active = active[torch.sigmoid(score) > self.router_threshold]
            if active.numel() == 0:
                break
            features = net.expert_features(shared[active], k)
            z = net.expert_logits(features, k)
            logits[active, k], used[active, k] = z, True
            total[active] += z
        return logits, used

    def _count_macs(self) -> dict[str, Any]:
        """MACs per sample of the trunk, each expert and each routing head."""
        net = self.module_
        param = next(net.parameters())
        self._set_training(False)
        with torch.no_grad():
            trunk, shared = count_macs(net.shared, param.new_zeros(1, *self.input_shape_))
            experts = [count_macs(self._expert_head, shared, k)[0] for k in range(net.n_experts)]
            router = []
            if self.router_module_ is not None:
                features = param.new_zeros(1, net.feature_dim)
                mean_logits = param.new_zeros(1, len(self.classes_))
                router = [count_macs(self.router_module_, features, mean_logits, i)[0]
                          for i in range(net.n_experts - 1)]
        return {"trunk": int(trunk), "experts": [int(m) for m in experts],
                "router": [int(m) for m in router]}

    def _expert_head(self, shared: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of expert ``k`` from the trunk output."""
        return self.module_.expert_logits(self.module_.expert_features(shared, k), k)

    def _record_usage(self, n_used: torch.Tensor) -> None:
        """Set ``expert_usage_`` and ``relative_macs_`` from the experts used per sample."""
        macs = self.macs_
        n_experts = len(macs["experts"])
        expert_cum = np.concatenate([[0], np.cumsum(macs["experts"])])
        router_cum = np.concatenate([[0], np.cumsum(macs["router"])]) \
            if self._routing() else np.zeros(n_experts)
        counts = np.bincount(n_used.numpy(), minlength=n_experts + 1)[1:]
        per_count = (macs["trunk"] + expert_cum[1:]
                     + router_cum[np.minimum(np.arange(1, n_experts + 1), n_experts - 1)])
        full = macs["trunk"] + expert_cum[-1]
        self.expert_usage_ = float(n_used.double().mean())
        self.relative_macs_ = float((counts * per_count).sum() / counts.sum() / full)

    def _fused_outputs(self, X) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs, energy, weights = super()._fused_outputs(X)
        self._record_usage(weights.gt(0).sum(dim=1))
        return probs, energy, weights


RIDEClassifier.__doc__ = _replace_parameter_docs(
    RIDEClassifier.__doc__,
    lr_schedule="""    lr_schedule : {"step"} or None, default="step"
        Stage-1 learning-rate schedule. ``"step"`` is the official CIFAR schedule scaled
        to ``max_epochs`` (:class:`~ltroute.schedules.StepWarmupSchedule`): linear warm-up
        over 5 epochs, then ``lr``, ``0.01 lr`` from 80 % of the epochs (where ``drw_epoch="auto"``
        starts DRW) and ``1e-4 lr`` from 90 %. It runs as the skorch callback named
        ``"lr_schedule"``. ``None`` keeps ``lr`` constant (use it when passing your own
        ``LRScheduler`` callback).""",
    optimizer="""    optimizer : type, default=RIDESGD
        Stage-1 optimizer class; :class:`RIDESGD` is SGD with the official momentum 0.9,
        Nesterov and weight decay 5e-4. Its arguments go in as ``optimizer__*``.""",
    lr="""    lr : float, default=0.1
        Stage-1 learning rate (before the ``lr_schedule`` factors), as the official
        code; the other ltroute estimators default to AdamW with 1e-3.""",
)

