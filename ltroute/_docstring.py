"""Docstring fragments shared by the estimators (the imbalanced-learn ``Substitution`` way)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Substitution:
    """Decorator filling ``%(name)s`` placeholders of a docstring with shared fragments."""

    def __init__(self, **fragments: str) -> None:
        self.fragments = fragments

    def __call__(self, obj: T) -> T:
        if obj.__doc__:
            obj.__doc__ = obj.__doc__ % self.fragments
        return obj


_network_parameters = """backbone : {"auto", "mlp", "convnet", "resnet32", "resnet50", \
"resnext50"} or torch.nn.Module, default="auto"
        Shared trunk. ``"auto"``: an MLP for 2-D ``X``, ResNet-32 for CIFAR-shaped images
        (3 channels, sides >= 32), the small ConvNet for other images. ``"resnet50"`` and
        ``"resnext50"`` (32x4d) are the ImageNet networks split as in RIDE's ImageNet-LT
        models: shared stem, layer1 and layer2; each expert owns layer3 and layer4 (see
        :mod:`ltroute.nn`). A module instance (e.g. a torchvision or timm model with its
        classifier replaced by ``torch.nn.Identity()``, with your weights) is the trunk:
        it maps inputs to features, is deep-copied at every fit (the parameter itself is
        never trained or moved) and gets an MLP per expert (``expert_hidden_sizes``; ``()``
        puts the heads directly on its features).

    hidden_sizes : tuple of int, default=(256, 256)
        Widths of the MLP trunk.

    expert_hidden_sizes : tuple of int, default=(128,)
        Widths of each expert's MLP branch (MLP and user trunks).

    head_scale : float, default=30.0
        Scale ``s`` of cosine heads, ``z = s * cos(f, w_c)`` (LDAM-DRW and RIDE use 30).

    dropout : float, default=0.0
        Dropout after each MLP activation.

    backbone_weights : str, path-like or None, default=None
        Local file of a state_dict for the shared trunk (``torch.save(state_dict,
        path)``), loaded at every fit after the network is built; never downloaded. Its
        names must be exactly the trunk's: torchvision's ``conv1``, ``bn1``, ``layer1``,
        ``layer2`` entries for ``"resnet50"``/``"resnext50"``, a user module's own
        ``state_dict()`` names (see :meth:`ltroute.nn.ExpertNet.load_trunk_weights`, which
        also shows how to convert a torchvision checkpoint). Missing file: a
        ``FileNotFoundError``; other names or shapes: a ``ValueError`` listing them."""

_training_parameters = """module : type, default=ExpertNet
        Class building the network; called with the keyword arguments of
        :class:`~ltroute.nn.ExpertNet` (sized from the data in ``initialize_module``)
        plus any ``module__*`` parameter. Its ``forward`` must return ``(B, K, C)``.

    criterion : type, default=LogProbNLLLoss
        Loss reported as ``valid_loss`` on the internal validation split, called with the
        log of the fused probabilities and the encoded labels
        (:class:`~ltroute.losses.LogProbNLLLoss`: their negative log-likelihood). The
        training objective is the method's own (see Notes) and does not use it.

    optimizer : type, default=torch.optim.AdamW
        Optimizer class; its arguments go in as ``optimizer__*`` (e.g.
        ``optimizer__weight_decay``).

    lr : float, default=1e-3
        Learning rate (before the ``lr_schedule`` factors).

    lr_schedule : {"step"} or None, default="step"
        ``"step"``: ``lr`` until 80 % of ``max_epochs``, then ``0.1 lr``, and ``0.01 lr``
        from 90 % (the step decay of the LDAM-DRW/RIDE CIFAR recipe, scaled to
        ``max_epochs``; :class:`~ltroute.schedules.StepWarmupSchedule` with no warm-up).
        The papers are silent on schedules for these data; measured on MNIST-LT, a
        constant ``lr`` let the test accuracy of the last epoch swing by several points
        between seeds. It runs as the skorch callback ``"lr_schedule"``; ``None`` keeps
        ``lr`` constant (use it with your own ``LRScheduler`` in ``callbacks``).

    max_epochs : int, default=30
        Number of training epochs.

    batch_size : int, default=128
        Mini-batch size for training and inference. When the last training batch would
        hold a single sample it is dropped (BatchNorm cannot train on one sample).

    train_split : callable or None, default=None
        skorch's internal validation split. ``None`` (the default, unlike skorch) trains
        on all of ``X``: a 20 % hold-out would take a large share of the rare classes.
        Pass ``skorch.dataset.ValidSplit(...)`` to monitor ``valid_loss``.

    callbacks : list of (str, skorch.callbacks.Callback) or None, default=None
        Extra skorch callbacks (LR schedulers, checkpoints, progress bars, ...). Besides
        skorch's, every estimator runs two of its own (switch one off with
        ``callbacks__<name>=None``): ``"batchnorm_recalibration"``
        (:class:`~ltroute.callbacks.BatchNormRecalibration`: in a run of fewer than
        about 44 steps, BatchNorm statistics are the plain average over the last epoch's
        batches, or over a pass of the training fold when the fit stops early) and
        ``"convergence_check"`` (:class:`~ltroute.callbacks.ConvergenceCheck`: a
        ``ConvergenceWarning`` when the training loss becomes non-finite, which also stops
        training, or when the model ends below the majority-class accuracy on its own
        training data).

    device : str or None, default="auto"
        ``"auto"`` trains on CUDA when available, else on the CPU; or any torch device
        string. The parameter keeps its value after ``fit`` (``clone`` and pickling
        resolve ``"auto"`` again where they run). ``None`` leaves placement to another
        library (skorch's ``AccelerateMixin`` requires it).

    verbose : int, default=0
        ``0`` is silent; ``1`` prints skorch's per-epoch table.

    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation and shuffling. With an int, fits are reproducible
        bit for bit on the CPU; the caller's global torch RNG is left untouched.

    target_prior : "uniform", "train", "estimate", array-like or mapping, default="uniform"
        Class prior of the traffic ``predict`` / ``predict_proba`` serve. The network's
        fused probabilities are treated as posteriors under the *uniform* prior (what
        the balancing losses and routers train for) and corrected by Bayes' rule,
        ``p_t(y|x) proportional to p(y|x) pi_t(y)`` (:mod:`ltroute.prior`):
        ``"uniform"`` is no correction (bit for bit the network's output, or its
        calibrated probabilities after :meth:`calibrate`);
        ``"train"`` the training distribution (``class_counts_``); ``"estimate"`` the
        prior of each batch given to ``predict``, estimated by EM (Saerens et al. 2002;
        the batch must be large and representative) on the probabilities calibrated by
        :meth:`calibrate` on held-out labelled data — call it first: on uncalibrated
        probabilities EM can drift and cost accuracy even on a uniform test set (an
        :class:`~ltroute.prior.UncalibratedEstimateWarning` says so; measured:
        ``benchmarks/results/label_shift.md``); or
        weights per class (an array aligned with ``classes_`` or a mapping over all
        classes). Used at prediction only: ``set_params`` after ``fit`` changes it
        without refitting. For ``loss="ce"`` / ``"focal"`` without DRW the network
        learns the training prior instead, so ``"train"`` is then closer to no change.

    normalize : {"auto"}, (mean, std) or None, default=None
        Per-channel normalisation ``(x - mean) / std`` of the inputs (per feature for
        2-D ``X``), in ``fit`` and at prediction. ``"auto"``: the mean and (population)
        standard deviation of the training data, computed in ``fit`` (one pass through
        a Dataset); ``(mean, std)``: given values, scalars or one per channel (e.g.
        CIFAR's). ``None`` feeds the inputs as they are. Stored as ``normalize_mean_``
        and ``normalize_std_``.

    augmentation : {"cifar", "cifar_rotate"}, ImageAugmentation or None, default=None
        Random augmentation of every training batch, on the training device (images
        only; prediction is never augmented). ``"cifar"``: the LDAM-DRW/RIDE CIFAR
        recipe, zero-padding by 4 pixels, a random crop back to size and a random
        horizontal flip; ``"cifar_rotate"`` adds RIDE's optional random rotation of up to
        15 degrees; an :class:`~ltroute.augmentation.ImageAugmentation` for other
        settings. Padding takes the value of a zero pixel before normalisation, as in
        the recipe. Reproducible with ``random_state``.

    precision : {"32", "bf16", "16"}, default="32"
        Arithmetic of the forward passes: ``"bf16"`` and ``"16"`` run them under
        ``torch.autocast`` (bfloat16 / float16; the fusion and the probabilities stay
        float32), ``"16"`` also scales the loss with ``torch.amp.GradScaler`` (its check
        for overflow reads one flag from the device per step). Under skorch's
        ``AccelerateMixin`` set the accelerator's ``mixed_precision`` instead.

    channels_last : bool, default=False
        Keep image batches and the network in ``torch.channels_last`` memory format
        (faster convolutions on recent GPUs, with ``precision="bf16"``/``"16"``).

    **kwargs
        Any other skorch parameter (``iterator_train__*``, ``optimizer__*``,
        ``module__*``, ``warm_start``, ...)."""

_fitted_attributes = """classes_ : ndarray of shape (n_classes,)
        Class labels seen in ``fit`` (sorted); ``predict`` returns them.

    class_counts_ : ndarray of shape (n_classes,)
        Training samples per class, aligned with ``classes_``.

    n_features_in_ : int
        Number of features (for images, scikit-learn's convention: the channels).

    input_shape_ : tuple of int
        Shape of one training sample, checked again at prediction.

    normalize_mean_, normalize_std_ : ndarray of shape (n_channels,) or None
        The normalisation applied to the inputs (``normalize``); ``None`` without.

    calibration_temperature_, calibration_biases_ : float, ndarray of shape (n_classes,)
        Temperature and per-class biases fitted by :meth:`calibrate` (absent until it is
        called; discarded by ``fit``).

    module_ : ExpertNet
        The trained network.

    history_ : skorch.History
        Per-epoch training history (``train_loss``, ``dur``, ...)."""

_shared_docs = Substitution(
    network_parameters=_network_parameters,
    training_parameters=_training_parameters,
    fitted_attributes=_fitted_attributes,
)


def shared_docs(obj: Callable | type) -> Callable | type:
    """Fill the shared parameter and attribute fragments into ``obj.__doc__``."""
    return _shared_docs(obj)
