"""``LongTailNet``: the skorch classifier every ltroute estimator derives from.

It owns what is common to all methods: input validation, label encoding, the fitted
attributes (``classes_``, ``class_counts_``, ``n_features_in_``, ``input_shape_``), the
network built from them, ``device="auto"``, reproducible seeding, and inference through
:func:`ltroute.fusion.fuse_experts`. A method subclass supplies its training loss
(``_training_loss``), how it fuses the experts (``_fuse``), its network options
(``_module_params``) and its parameter constraints.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import (
    Interval,
    Options,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from skorch import NeuralNet, NeuralNetClassifier
from skorch.callbacks import Callback, EpochTimer, LRScheduler, PassthroughScoring
from skorch.dataset import get_len, unpack_data
from skorch.history import History
from skorch.utils import to_tensor

from ltroute._inputs import (
    InferenceDataset,
    TrainingDataset,
    array_batches,
    batch_loader,
    channel_statistics,
    check_dataset_y,
    check_normalization,
    dataset_channel_statistics,
    dataset_labels,
    first_image_shape,
    is_dataset_input,
    normalize_array,
)
from ltroute._validation import (
    build_checked_network,
    check_batch_norm_batches,
    check_fit_sample_weight,
    check_layer_sizes,
    check_probabilities,
    check_reserved_module_params,
    device_problem,
    rolls_back_on_error,
    split_sample_weight,
    with_sample_weight,
    writable,
)
from ltroute.augmentation import AUGMENTATIONS, ImageAugmentation, resolve_augmentation
from ltroute.calibration import apply_temperature, as_log_proba, encode_labels, fit_under_prior
from ltroute.callbacks import (
    BATCHNORM_AVERAGED_KEY,
    FOLD_BATCHES_KEY,
    BatchNormRecalibration,
    ConvergenceCheck,
    QuietPrintLog,
)
from ltroute.fusion import FusionResult, fuse_experts
from ltroute.losses import LogProbNLLLoss, effective_number_weights
from ltroute.nn import BACKBONES, ExpertNet
from ltroute.prior import UncalibratedEstimateWarning, _em_prior, check_prior, prior_correction
from ltroute.schedules import StepWarmupSchedule, default_drw_epoch

__all__ = ["LongTailNet"]


def resolve_device(device: str | torch.device | None) -> str | None:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is available, else ``"cpu"``.

    ``None`` stays ``None``: skorch then leaves device placement to someone else (e.g.
    ``accelerate`` through skorch's ``AccelerateMixin``).
    """
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


#: ``precision`` values and the autocast dtype of each (``None``: no autocast).
_PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


#: DataLoader arguments that say how batches are loaded, not which ones nor how they are
#: collated (``persistent_workers`` is left out: the passes over the training fold inside
#: ``fit`` each make one loader and iterate it once).
_LOADING_PARAMS = frozenset({"num_workers", "pin_memory", "pin_memory_device",
                             "prefetch_factor", "multiprocessing_context", "worker_init_fn",
                             "timeout", "in_order"})


#: A pass over the training fold inside ``fit`` loads in the training iterator's worker
#: processes when each has at least this many batches to load: starting two workers took
#: as long as decoding ~600 CIFAR JPEG files in the main process (2-core CPU).
_MIN_BATCHES_PER_WORKER = 4

#: Float32 input per batch of an inference-only pass over the training fold inside
#: ``fit`` (at least ``batch_size`` rows): 64 KiB is about a thousand tabular rows at
#: once, and ``batch_size`` rows of images (on the 2-core CPU, 682 CIFAR images per
#: batch made the ConvNet's pass 1.9x slower than 128: activations outgrow the cache;
#: more letter-LT rows than ``batch_size`` at once made the MLP's pass faster). Not the
#: whole tabular fold at once: the convergence check stops after the batch that decides
#: it, usually the first of a trained model.
_INFERENCE_BATCH_BYTES = 64 * 2**10

#: skorch's per-batch notifications (see ``LongTailNet.notify``).
_BATCH_HOOKS = ("on_batch_begin", "on_batch_end", "on_grad_computed")


def _never(_estimator: Any) -> bool:
    return False


def _batch_len(batch: Any) -> int:
    """Number of samples in a batch ``(X, y)`` (skorch's ``get_len`` on ``X``; a
    tensor's first dimension directly)."""
    X = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(X, torch.Tensor) and X.ndim > 0:
        return X.shape[0]
    return get_len(X)


class LongTailNet(NeuralNetClassifier):
    """Base class of ltroute's estimators (not used directly).

    See :class:`~ltroute.LongTailClassifier` for the parameters it shares.
    """

    _parameter_constraints: dict[str, list] = {
        "backbone": [StrOptions(set(BACKBONES)), torch.nn.Module],
        "hidden_sizes": ["array-like"],
        "expert_hidden_sizes": ["array-like"],
        "head_scale": [Interval(Real, 0, None, closed="neither")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "lr_schedule": [StrOptions({"step"}), None],
        "max_epochs": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), Options(Integral, {-1})],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "backbone_weights": [str, os.PathLike, None],
        "target_prior": [StrOptions({"uniform", "train", "estimate"}), "array-like", Mapping],
        "normalize": [None, StrOptions({"auto"}), tuple, list],
        "augmentation": [None, StrOptions(set(AUGMENTATIONS)), ImageAugmentation],
        "precision": [StrOptions(set(_PRECISIONS))],
        "channels_last": ["boolean"],
    }

    def __init__(
        self,
        module=ExpertNet,
        *,
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
        normalize=None,
        augmentation=None,
        precision="32",
        channels_last=False,
        **kwargs,
    ):
        # NeuralNet.__init__ directly: NeuralNetClassifier's only addition is the
        # ``classes`` parameter, which would clash with label encoding done here.
        NeuralNet.__init__(
            self, module, criterion=criterion, optimizer=optimizer, lr=lr,
            max_epochs=max_epochs, batch_size=batch_size, train_split=train_split,
            callbacks=callbacks, device=device, verbose=verbose, **kwargs,
        )
        self.backbone = backbone
        self.hidden_sizes = hidden_sizes
        self.expert_hidden_sizes = expert_hidden_sizes
        self.head_scale = head_scale
        self.dropout = dropout
        self.lr_schedule = lr_schedule
        self.random_state = random_state
        self.backbone_weights = backbone_weights
        self.target_prior = target_prior
        self.normalize = normalize
        self.augmentation = augmentation
        self.precision = precision
        self.channels_last = channels_last

    # ------------------------------------------------------------------ fitting
    @rolls_back_on_error
    def fit(self, X, y=None, sample_weight=None, **fit_params):
        """Validate and encode the data, then train with skorch.

        A fit that fails before it changed a network (bad input, a bad parameter, a
        network that cannot run, ...) leaves the estimator exactly as it was; a warm start
        that continues training checks ``X`` against the fitted shape and feature names.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W), or Dataset
            Feature matrix or image tensor (numpy, pandas or torch; cast to float32), or
            a map-style :class:`torch.utils.data.Dataset` of ``(image, label)`` items
            (images: tensors of shape (C, H, W), all the same; e.g.
            :class:`ltroute.datasets.ImageFolder`, torchvision's ``ImageFolder``, a
            ``Subset``, skorch's ``SliceDataset``), loaded batch by batch through the
            ``iterator_train__*`` parameters (``num_workers``, ``pin_memory``, ...).
            Labels come from the dataset's ``targets`` when it has them (no image
            decoded), else from one pass; integer targets of a dataset with ``classes``
            become those names, so ``predict`` returns folder names.
        y : array-like of shape (n_samples,) or None
            Class labels (strings or any integers); at least two classes. With a
            Dataset ``X``: ``None`` (the dataset's labels), or labels that agree with
            them (needed when its items carry no label).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative, finite weights (at least one positive) multiplying each
            sample's terms of the training loss. With class weights ``w`` (deferred
            re-weighting, DQRoute's difficulty weights ``omega``) a sample's term weighs
            ``s_i w_{y_i}``, and every loss term (LDAM, logit-adjusted, CE, focal, RIDE's
            diversity KL, DQRoute's region, fused and OOD losses) is the mean under these
            products, ``sum_i s_i w_{y_i} l_i / sum_i s_i w_{y_i}`` per batch, so integer
            weights act as repeated rows within a batch; DQRoute's difficulty statistics
            are weighted means too. ``class_counts_`` (and the priors, LDAM margins, DRW
            weights and DQRoute regions computed from it) counts rows, unweighted; the
            validation loss is unweighted. ``None`` or constant weights: every sample
            counts the same.
        **fit_params : dict
            Passed to the module's ``forward`` by skorch.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        self._check_params()
        continuing = bool(self.warm_start and self.initialized_)
        if is_dataset_input(X):
            y_encoded, classes, input_shape = self._validate_training_dataset(
                X, y, reset=not continuing)
            sample_weight = check_fit_sample_weight(sample_weight, y_encoded)
        else:
            X, y_encoded, classes = self._validate_training_data(X, y, reset=not continuing)
            sample_weight = check_fit_sample_weight(sample_weight, X)
            input_shape = X.shape[1:]
        if continuing and not np.array_equal(classes, self.classes_):
            raise ValueError("warm_start=True needs the same classes as the previous fit; "
                             f"got {classes.tolist()} after {self.classes_.tolist()}.")
        self.classes_ = classes
        self.class_counts_ = np.bincount(y_encoded, minlength=len(classes)).astype(np.int64)
        self.__dict__.pop("_count_statistics", None)  # computed from the previous counts
        self.input_shape_ = tuple(int(s) for s in input_shape)
        self._check_augmentation()
        if not continuing:
            self._fit_normalization(X, y_encoded)
        if is_dataset_input(X):
            train_X = TrainingDataset(X, y_encoded, self.input_shape_, sample_weight,
                                      normalization=self._normalization())
            X = train_X.without_sample_weight()
        else:
            X = self._normalized_array(X)
            train_X = with_sample_weight(X, sample_weight)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self._discard_calibration()  # of the old network, also when warm-starting
        with self._runtime(seed=seed):
            if not continuing:
                self.initialize()
            self._grad_scaler = self._make_grad_scaler()
            try:
                NeuralNet.partial_fit(self, train_X, y_encoded, **fit_params)
            finally:  # what the recalibration left for a check that did not run
                self.__dict__.pop(FOLD_BATCHES_KEY, None)
                self.__dict__.pop(BATCHNORM_AVERAGED_KEY, None)
            self._after_training(X, y_encoded)
        return self

    @available_if(_never)
    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """Not available: long-tail losses depend on the class counts of the whole fit."""
        raise AttributeError("partial_fit is not supported")  # pragma: no cover

    def _check_params(self) -> None:
        """Validate ltroute's own parameters (skorch's ``_validate_params`` checks its own)."""
        params = {name: getattr(self, name) for name in self._parameter_constraints}
        validate_parameter_constraints(self._parameter_constraints, params,
                                       caller_name=type(self).__name__)
        if self.predict_nonlinearity != "auto":
            raise ValueError("predict_nonlinearity is not used by ltroute estimators: "
                             "predict_proba returns the fused probabilities.")
        check_layer_sizes(self.hidden_sizes, "hidden_sizes")
        check_layer_sizes(self.expert_hidden_sizes, "expert_hidden_sizes")
        problem = device_problem(self.device)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: device={self.device!r}: {problem}.")

    def _validate_training_data(self, X, y, reset: bool = True
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return float32 ``X``, encoded int64 ``y`` and the sorted class labels.

        ``reset=False`` (a warm start continuing the fitted network) checks ``X`` against
        the fitted shape and feature names instead of replacing them.
        """
        ndim = self._check_input_ndim(X)
        if not reset:
            self._check_input_shape(X, ndim)
        X, y = validate_data(self, X, y, dtype=np.float32, allow_nd=ndim == 4, reset=reset)
        X = writable(X)
        check_classification_targets(y)
        classes, y_encoded = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes in y; got 1 "
                             f"class: {classes.tolist()}.")
        return X, y_encoded.astype(np.int64), classes

    def _validate_training_dataset(self, X, y, reset: bool = True
                                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """Encoded int64 labels, the sorted class labels and the sample shape of a
        Dataset ``X`` (see :mod:`ltroute._inputs`)."""
        input_shape = first_image_shape(X)
        if not reset and input_shape != self.input_shape_:
            raise ValueError(f"The dataset has samples of shape {input_shape}, but "
                             f"{type(self).__name__} was fitted on samples of shape "
                             f"{self.input_shape_}.")
        labels = check_dataset_y(X, y, f"{type(self).__name__}.fit")
        check_classification_targets(labels)
        classes, y_encoded = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes; the dataset "
                             f"has 1 class: {classes.tolist()}.")
        if reset:
            self.n_features_in_ = input_shape[0]
            self.__dict__.pop("feature_names_in_", None)
        return y_encoded.astype(np.int64), classes, input_shape

    # ------------------------------------------------------- input transforms
    def _check_augmentation(self) -> None:
        if self.augmentation is not None and len(self.input_shape_) != 3:
            raise ValueError(f"{type(self).__name__}: augmentation={self.augmentation!r} "
                             "needs images (n_samples, C, H, W); the data has samples of "
                             f"shape {self.input_shape_}.")

    def _fit_normalization(self, X, y_encoded: np.ndarray) -> None:
        """Set ``normalize_mean_`` and ``normalize_std_`` (per channel, or per feature of
        2-D data) from ``normalize``: given, computed from the training data (``"auto"``;
        a constant channel gets a std of 1) or ``None`` (no normalisation)."""
        self.normalize_mean_ = self.normalize_std_ = None
        self.__dict__.pop("_augment_fill", None)
        if self.normalize is None:
            return
        n_channels = self.input_shape_[0]
        if self.normalize == "auto":
            if is_dataset_input(X):
                # One pass over the training fold (loaded like training), RNG untouched.
                loader = self._training_fold_iterator(
                    TrainingDataset(X, y_encoded, self.input_shape_))
                with torch.random.fork_rng(devices=[]):
                    mean, std = dataset_channel_statistics(batch[0] for batch in loader)
            else:
                mean, std = channel_statistics(X)
        else:
            mean, std = check_normalization(self.normalize, n_channels,
                                            type(self).__name__)
        self.normalize_mean_, self.normalize_std_ = mean, std

    def _normalization(self) -> tuple[np.ndarray, np.ndarray] | None:
        mean = self.__dict__.get("normalize_mean_")
        return None if mean is None else (mean, self.normalize_std_)

    def _normalized_array(self, X: np.ndarray) -> np.ndarray:
        """``X`` normalised with the fitted statistics (a new array; ``X`` without)."""
        normalization = self._normalization()
        return X if normalization is None else normalize_array(X, *normalization)

    def _augment_batch(self, X):
        """``augmentation`` applied to a batch of images on the training device (``X``
        alone, without ``fit``'s sample weights); padding takes the value of a zero pixel
        after normalisation, as the recipe pads before normalising."""
        augmentation = resolve_augmentation(self.augmentation)
        X = to_tensor(X, device=self.device)
        if augmentation is None:
            return X
        fill = None
        normalization = self._normalization()
        if normalization is not None:
            cache = self.__dict__.setdefault("_augment_fill", {})
            fill = cache.get(X.device)
            if fill is None:  # one transfer per fit and device, not one per batch
                mean, std = normalization
                fill = cache[X.device] = torch.as_tensor(-mean / std).to(X.device)
        return augmentation.augment(X, fill=fill)

    @staticmethod
    def _check_input_ndim(X) -> int:
        """Number of dimensions of ``X`` (array-like), which must be 2 or 4."""
        shape = tuple(X.shape) if hasattr(X, "shape") else np.asarray(X).shape
        if len(shape) not in (2, 4):
            hint = (" Reshape your data either using array.reshape(-1, 1) if your data has a "
                    "single feature or array.reshape(1, -1) if it contains a single sample."
                    if len(shape) == 1 else "")
            raise ValueError(
                f"X must be 2-D (n_samples, n_features) or 4-D images (n_samples, channels, "
                f"height, width); got a {len(shape)}-D array of shape {shape}.{hint}"
            )
        return len(shape)

    def _validate_predict_data(self, X) -> np.ndarray | InferenceDataset:
        check_is_fitted(self, ["module_", "classes_"])
        if is_dataset_input(X):
            first_image_shape(X)  # a clear error for bad items before any batch
            return InferenceDataset(X, self.input_shape_, type(self).__name__,
                                    normalization=self._normalization())
        ndim = self._check_input_ndim(X)
        self._check_input_shape(X, ndim)
        return self._normalized_array(writable(validate_data(
            self, X, reset=False, dtype=np.float32, allow_nd=ndim == 4)))

    def _check_input_shape(self, X, ndim: int) -> None:
        """Images must have the fitted sample shape (features are checked by sklearn)."""
        shape = tuple(X.shape) if hasattr(X, "shape") else np.asarray(X).shape
        if tuple(shape[1:]) != self.input_shape_ and (ndim == 4 or len(self.input_shape_) == 3):
            kind = "images" if len(self.input_shape_) == 3 else "feature vectors"
            raise ValueError(f"X has samples of shape {tuple(shape[1:])}, but "
                             f"{type(self).__name__} was fitted on {kind} of shape "
                             f"{self.input_shape_}.")

    @contextlib.contextmanager
    def _runtime(self, seed: int | None = None) -> Iterator[None]:
        """Resolve ``device="auto"`` and fork the torch RNG for one call (seeded if asked).

        Forking keeps the caller's global RNG untouched: besides seeded training, every
        ``DataLoader`` iteration draws a base seed from it, inference included.
        """
        requested = self.device
        resolved = resolve_device(requested)
        target = torch.device(resolved) if resolved is not None else None
        devices = []
        if target is not None and target.type == "cuda":
            devices = [target.index if target.index is not None else torch.cuda.current_device()]
        self.device = resolved
        try:
            with torch.random.fork_rng(devices=devices):
                if seed is not None:
                    torch.manual_seed(seed)
                yield
        finally:
            self.device = requested

    # ------------------------------------------------------------- skorch hooks
    #: ``lr_schedule="step"``: warm-up epochs and the factor of each of the two drops.
    _lr_warmup_epochs = 0
    _lr_decay = 0.1

    @property
    def _default_callbacks(self):
        # skorch's classifier adds ``valid_acc``, which scores encoded labels through
        # ``predict``; ltroute records losses only.
        callbacks = [
            ("epoch_timer", EpochTimer()),
            ("train_loss", PassthroughScoring(name="train_loss", on_train=True)),
            ("valid_loss", PassthroughScoring(name="valid_loss")),
        ]
        if self.lr_schedule == "step":
            schedule = StepWarmupSchedule(self.max_epochs, warmup_epochs=self._lr_warmup_epochs,
                                          gamma=self._lr_decay)
            callbacks.append(("lr_schedule", LRScheduler(torch.optim.lr_scheduler.LambdaLR,
                                                         lr_lambda=schedule)))
        # BatchNorm statistics first: the convergence check predicts with them.
        return [*callbacks, ("batchnorm_recalibration", BatchNormRecalibration()),
                ("print_log", QuietPrintLog()), ("convergence_check", ConvergenceCheck())]

    def _module_params(self) -> dict[str, Any]:
        """Keyword arguments of the network, sized from the fitted data."""
        params = {
            "input_shape": self.input_shape_,
            "n_classes": len(self.classes_),
            "n_experts": 1,
            "backbone": self.backbone,
            "hidden_sizes": tuple(self.hidden_sizes),
            "expert_hidden_sizes": tuple(self.expert_hidden_sizes),
            "cosine_head": False,
            "head_scale": float(self.head_scale),
            "dropout": float(self.dropout),
        }
        if self.backbone_weights is not None:  # only then: custom modules need not know it
            params["backbone_weights"] = self.backbone_weights
        return params

    def initialize_module(self):
        """Build the network from the fitted shapes (constructor parameters untouched) and
        check that it runs on them."""
        module_params = self._module_params()
        overrides = self.get_params_for("module")
        check_reserved_module_params(self, module_params, overrides)
        kwargs = module_params | overrides
        self.module_ = build_checked_network(
            lambda shape: self.module(**(kwargs | {"input_shape": shape})),
            self.input_shape_, int(kwargs["n_experts"]), len(self.classes_),
            type(self).__name__)
        if self.channels_last and len(self.input_shape_) == 3:
            self.module_ = self.module_.to(memory_format=torch.channels_last)
        self._discard_calibration()  # it belonged to the previous network
        return self

    def _discard_calibration(self) -> None:
        """Forget a :meth:`calibrate` result (the network it was fitted on is gone)."""
        for name in ("calibration_temperature_", "calibration_biases_"):
            self.__dict__.pop(name, None)

    def get_iterator(self, dataset, training=False):
        """Training batches are shuffled by default; a last batch of one sample is dropped.

        In-memory arrays are sliced a batch at a time (:func:`ltroute._inputs.batch_loader`,
        the same batches as skorch's per-row loading) unless a ``collate_fn``, sampler or
        Accelerate asks for skorch's own loader."""
        prefix = "iterator_train" if training else "iterator_valid"
        kwargs = self.get_params_for(prefix)
        fold = None if training else self.__dict__.get("_training_fold")
        batch_size = kwargs.get("batch_size", self.batch_size)
        kwargs["batch_size"] = len(dataset) if batch_size == -1 else batch_size
        if fold is not None:  # a pass over the training fold inside fit
            kwargs = self._training_loading_params(len(dataset), kwargs["batch_size"]) | kwargs
        if fold is not None and not kwargs.get("num_workers"):
            # (workers share out batches of batch_size rows)
            kwargs["batch_size"] = max(kwargs["batch_size"], fold["min_batch_size"])
        if training:
            check_batch_norm_batches(self, len(dataset), kwargs["batch_size"])
            kwargs.setdefault("shuffle", True)
            if "drop_last" not in kwargs and len(dataset) > 1:
                kwargs["drop_last"] = len(dataset) % kwargs["batch_size"] == 1
        iterator = self.iterator_train if training else self.iterator_valid
        arrays = None
        if (iterator is torch.utils.data.DataLoader and not hasattr(self, "accelerator")
                and not {"collate_fn", "sampler", "batch_sampler"} & set(kwargs)):
            arrays = array_batches(dataset)
        if arrays is not None:
            return batch_loader(iterator, arrays, **({"shuffle": False} | kwargs))
        return iterator(dataset, **kwargs)

    def _training_fold_iterator(self, dataset, inference_only: bool = False):
        """In-order batches over the training fold, for the passes inside ``fit``
        (``normalize="auto"`` statistics, BatchNorm recalibration, the convergence
        check): :meth:`get_iterator` with ``training=False``, loading like the training
        iterator (its ``num_workers``, ``pin_memory``, ...) unless ``iterator_valid__*``
        sets how to load. Otherwise a dataset that trains with workers would be decoded
        in the main process, one item after the other, on each of these passes.

        ``inference_only``: the batches only go through the network in inference mode,
        where a sample's output does not depend on the rest of its batch, so they may be
        larger than ``batch_size`` when loaded without workers: up to
        :data:`_INFERENCE_BATCH_BYTES` of float32 input (per-batch overhead dominated
        the convergence check of small networks).
        """
        # Through get_iterator (told by a transient attribute, as its signature is
        # skorch's): a mixin's get_iterator, e.g. AccelerateMixin's sharding of the
        # loader across processes, must apply to these passes too.
        min_batch_size = 1
        if inference_only:
            row_bytes = 4 * int(np.prod(self.input_shape_))
            min_batch_size = max(1, _INFERENCE_BATCH_BYTES // row_bytes)
        self.__dict__["_training_fold"] = {"min_batch_size": min_batch_size}
        try:
            return self.get_iterator(dataset, training=False)
        finally:
            self.__dict__.pop("_training_fold", None)

    def _training_loading_params(self, n_samples: int, batch_size: int) -> dict[str, Any]:
        """``iterator_train__*`` parameters that say how batches are loaded (not which
        ones, nor how they are collated), when ``iterator_valid__*`` sets none of them;
        without the worker processes for a pass of fewer than
        :data:`_MIN_BATCHES_PER_WORKER` batches per worker, which loads faster in the
        main process than workers start."""
        if _LOADING_PARAMS & set(self.get_params_for("iterator_valid")):
            return {}
        params = {key: value for key, value in self.get_params_for("iterator_train").items()
                  if key in _LOADING_PARAMS}
        workers = params.get("num_workers") or 0
        if n_samples < _MIN_BATCHES_PER_WORKER * workers * batch_size:
            params = {key: value for key, value in params.items()
                      if key in ("pin_memory", "pin_memory_device")}
        return params

    def get_loss(self, y_pred, y_true, X=None, training=False):
        """Method loss on expert logits in training (weighted by ``fit``'s
        ``sample_weight``); ``criterion`` on fused log-probs else (unweighted)."""
        y_true = to_tensor(y_true, device=self.device)
        if training:
            sample_weight = split_sample_weight(X)[1]
            if sample_weight is not None:
                sample_weight = sample_weight.to(self.device)
            return self._training_loss(y_pred, y_true, sample_weight=sample_weight)
        fused = self._fuse(y_pred, return_log_probs=True)
        return self.criterion_(fused.log_probs, y_true)

    # ------------------------------------------------- precision and devices
    def _make_grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 training scales the loss (skorch's ``AccelerateMixin`` brings its own)."""
        if self.precision != "16" or hasattr(self, "accelerator") or self.device is None:
            return None
        return torch.amp.GradScaler(torch.device(self.device).type)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to ``precision`` on the training device (nothing for "32")."""
        dtype = _PRECISIONS[self.precision]
        if dtype is None or self.device is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def _to_device(self, data):
        """Tensors (also inside dicts) to the training device without waiting for the
        copy (``non_blocking``: no host synchronisation; pinned memory overlaps it)."""
        if self.device is None:
            return data
        if isinstance(data, torch.Tensor):
            return data.to(self.device, non_blocking=True)
        if isinstance(data, dict):
            return {key: self._to_device(value) for key, value in data.items()}
        return to_tensor(data, device=self.device)

    def train_step_single(self, batch, **fit_params):
        """skorch's training step, with the batch moved without a host synchronisation,
        the forward pass and loss under ``precision``'s autocast and, for fp16, the
        loss scaled for the backward pass (the returned loss is unscaled)."""
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        Xi, yi = self._to_device(Xi), self._to_device(yi)
        with self._autocast():
            y_pred = self.infer(Xi, **fit_params)
            loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        scaler = self.__dict__.get("_grad_scaler")
        (loss if scaler is None else scaler.scale(loss)).backward()
        return {"loss": loss, "y_pred": y_pred}

    def _step_optimizer(self, step_fn):
        """skorch's optimiser step; with fp16's grad scaler, ``scaler.step`` (which skips
        steps with non-finite gradients) and ``scaler.update``."""
        scaler = self.__dict__.get("_grad_scaler")
        if scaler is None or step_fn is None:
            return super()._step_optimizer(step_fn)
        step_fn()
        for name in self._optimizers:
            scaler.step(getattr(self, name + "_"))
        scaler.update()
        return None

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        """skorch's epoch loop, reading the batch losses back from the device once per
        epoch instead of once per batch (no host synchronisation between steps), and
        notifying each per-batch hook only to the callbacks that implement it
        (:meth:`notify`).

        During the epoch the history holds each batch's loss as a detached 0-d tensor
        (``float(...)`` reads it); from the end of the epoch on, as a float."""
        if iterator is None:
            return
        key, size_key = prefix + "_loss", prefix + "_batch_size"
        # skorch's plain History: this epoch's batch rows directly (record_batch indexes
        # the whole history twice a batch); any other history records its own way.
        rows = self.history[-1]["batches"] if type(self.history) is History else None
        losses = []
        self.__dict__["_batch_listeners"] = self._batch_listeners()
        try:
            for batch in iterator:
                self.notify("on_batch_begin", batch=batch, training=training)
                step = step_fn(batch, **fit_params)
                losses.append(step["loss"].detach())
                if rows:
                    rows[-1][key], rows[-1][size_key] = losses[-1], _batch_len(batch)
                else:
                    self.history.record_batch(key, losses[-1])
                    self.history.record_batch(size_key, _batch_len(batch))
                self.notify("on_batch_end", batch=batch, training=training, **step)
        finally:
            self.__dict__.pop("_batch_listeners", None)
        if losses:
            values = torch.stack(losses).float().cpu().tolist()
            batches = self.history[-1]["batches"]
            for entry, value in zip(batches[-len(values):], values, strict=True):
                entry[key] = value
        self.history.record(prefix + "_batch_count", len(losses))

    def _batch_listeners(self) -> dict[str, list]:
        """Per-batch hook -> the bound hooks of the callbacks that implement it (a hook
        left as skorch's ``Callback`` defines it does nothing)."""
        listeners = {}
        for name in _BATCH_HOOKS:
            base = getattr(Callback, name)
            listeners[name] = [getattr(cb, name) for _, cb in self.callbacks_
                               if name in vars(cb) or getattr(type(cb), name, None) is not base]
        return listeners

    def notify(self, method_name, **cb_kwargs):
        """skorch's ``notify``; during an epoch, a per-batch hook (``on_batch_begin``,
        ``on_batch_end``, ``on_grad_computed``) skips the callbacks that leave it as
        skorch's no-op: a few Python calls per callback and batch, which a small
        network's step (~1 ms) notices."""
        listeners = self.__dict__.get("_batch_listeners")
        if listeners is None or method_name not in listeners:
            return super().notify(method_name, **cb_kwargs)
        getattr(self, method_name)(self, **cb_kwargs)
        for hook in listeners[method_name]:
            hook(self, **cb_kwargs)
        return None

    def _set_training(self, training=True):
        """skorch's ``_set_training``, skipped for a network (or criterion) whose modules
        all are in that mode already: ``Module.train`` walks and re-sets every submodule,
        which skorch does on every batch and costs as much as a small network's
        optimiser step; checking the flags costs a quarter of it."""
        for name in self._modules + self._criteria:
            module = getattr(self, name + "_")
            if isinstance(module, torch.nn.Module) and any(
                    m.training != training for m in module.modules()):
                module.train(training)

    def infer(self, x, **fit_params):
        """skorch's ``infer`` on the batch's inputs (without ``fit``'s sample weights);
        in a training step (network in training mode, gradients on) the ``augmentation``
        is applied first, on the training device."""
        x = split_sample_weight(x)[0]
        if (self.augmentation is not None and self.module_.training
                and torch.is_grad_enabled()):
            x = self._augment_batch(x)
        if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().infer(x, **fit_params)

    def evaluation_step(self, batch, training=False):
        """Return ``(probs, energy, weights)`` of the fused experts for one batch."""
        with self._autocast():
            logits, sample_mask = self._inference_logits(batch, training=training)
        logits = logits.float()  # the fusion works in float32
        with torch.set_grad_enabled(training):
            fused = self._fuse(logits, sample_mask=sample_mask)
        return fused.probs, fused.energy, fused.weights

    def _inference_logits(self, batch, training: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert logits (B, K, C) of one batch and the mask (B, K) of the experts each
        sample uses (``None``: all); RIDE's router overrides it."""
        return super().evaluation_step(batch, training=training), None

    # ------------------------------------------------------- method interface
    def _training_loss(self, logits: torch.Tensor, y: torch.Tensor,
                       sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Training objective on expert logits (B, K, C) and encoded labels (B,); the
        non-negative ``sample_weight`` (B,) multiplies each sample's terms."""
        raise NotImplementedError

    def _after_training(self, X: np.ndarray, y: np.ndarray) -> None:
        """Hook run after skorch's training loop, inside the same device and seeded RNG
        context (e.g. RIDE's second stage); ``y`` is encoded. Does nothing by default."""

    def _fuse(self, logits: torch.Tensor, return_log_probs: bool = False,
              sample_mask: torch.Tensor | None = None) -> FusionResult:
        """Combine expert logits; the default averages the logits of the experts in
        ``sample_mask`` (default: all)."""
        return fuse_experts(logits, sample_mask=sample_mask, weighting="uniform",
                            combine="logit", return_log_probs=return_log_probs)

    @property
    def current_epoch_(self) -> int:
        """1-based number of the epoch being trained (0 before training)."""
        return len(self.history_) if self.history_ is not None else 0

    def _drw_weights(self, drw_epoch: int | str | None, beta: float) -> torch.Tensor | None:
        """Deferred re-weighting: effective-number class weights (summing to ``C``) from
        the first epoch after ``drw_epoch`` (1-based, LDAM-DRW's ``epoch > 160``; "auto":
        :func:`~ltroute.schedules.default_drw_epoch`); before that, and when
        ``drw_epoch`` is None, no weights."""
        if drw_epoch == "auto":
            drw_epoch = default_drw_epoch(self.max_epochs)
        if drw_epoch is None or self.current_epoch_ <= drw_epoch:
            return None
        return self._count_statistic(effective_number_weights, self.device, beta=beta)

    def _count_statistic(self, function, device, **kwargs) -> torch.Tensor:
        """``function(class_counts_, **kwargs)`` on ``device`` (LDAM margins, class
        priors, DRW weights, RIDE's temperatures), computed once per fit and device
        rather than on every batch: a training loss reads it, unchanged, at each step.
        Not pickled (it may live on a GPU)."""
        counts = self.class_counts_
        return self._fit_constant((function, *sorted(kwargs.items())), device, counts,
                                  lambda: function(counts, **kwargs))

    def _fit_constant(self, key, device, source, make) -> torch.Tensor:
        """``make()`` moved to ``device`` and cached under ``key`` for as long as
        ``source``, the fitted array it is made from, is the same object (a fit or a
        module initialisation assigns a new one; none is changed in place). A
        host-to-device copy at every training step would also synchronise a GPU's
        stream. The cache keeps ``source`` itself, so its identity cannot be reused."""
        cache = self.__dict__.setdefault("_count_statistics", {})
        cached = cache.get((key, device))
        if cached is None or cached[0] is not source:
            cached = cache[(key, device)] = (source, make().to(device))
        return cached[1]

    # --------------------------------------------------------------- inference
    def _fused_outputs(self, X) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated ``(probs, energy, weights)`` for all of ``X``, on the CPU; a
        ``ValueError`` when the network's outputs are not finite."""
        probs, energy, weights = self.forward(self._validate_predict_data(X), training=False)
        check_probabilities(probs, type(self).__name__)
        return probs, energy, weights

    def forward_iter(self, X, training=False, device="cpu"):
        """skorch's batched inference, with ``device="auto"`` resolved while it runs."""
        with self._runtime():
            yield from super().forward_iter(X, training=training, device=device)

    def initialize(self):
        """skorch's ``initialize``; called directly (e.g. before ``load_params``) it
        resolves ``device="auto"`` first, as ``fit`` does."""
        if self.device != "auto":  # inside fit, or an explicit device
            return super().initialize()
        with self._runtime():
            return super().initialize()

    def load_params(self, *args, **kwargs):
        """skorch's ``load_params``, with ``device="auto"`` resolved for the map location."""
        with self._runtime():
            return super().load_params(*args, **kwargs)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns aligned with ``classes_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W)
            Same kind of input as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Rows sum to one (the softmax is applied once, inside the fusion).

        Raises
        ------
        ValueError
            If the network's outputs are not finite for some sample (a diverged fit, or
            inputs far outside the training range): non-finite outputs never become
            probabilities or classes. ``predict``, ``score`` and the other predict-like
            methods raise the same error.
        """
        probs = self._fused_outputs(X)[0].numpy()
        return self._apply_target_prior(probs)

    def _apply_target_prior(self, probs: np.ndarray) -> np.ndarray:
        """Calibrate the fused probabilities (posteriors under the uniform prior) when
        :meth:`calibrate` was called, then correct them to ``target_prior``; an
        uncalibrated estimator with ``"uniform"`` returns them untouched."""
        target = self.target_prior
        calibrated = "calibration_temperature_" in self.__dict__
        if isinstance(target, str) and target == "uniform" and not calibrated:
            return probs
        validate_parameter_constraints(
            {"target_prior": self._parameter_constraints["target_prior"]},
            {"target_prior": target}, caller_name=type(self).__name__)
        n_classes = len(self.classes_)
        uniform = np.full(n_classes, 1.0 / n_classes)
        log_probs = as_log_proba(probs)
        if calibrated:
            log_probs = apply_temperature(log_probs, self.calibration_temperature_,
                                          self.calibration_biases_)
        if isinstance(target, str) and target == "uniform":
            target = uniform
        elif isinstance(target, str) and target == "train":
            target = self.class_counts_ / self.class_counts_.sum()
        elif isinstance(target, str):  # "estimate"
            if not calibrated:
                warnings.warn(
                    f"{type(self).__name__}: target_prior='estimate' runs EM on "
                    "uncalibrated probabilities, which can drift far from the true prior "
                    "and cost accuracy. Call calibrate(X_held_out, y_held_out) on labelled "
                    "data the network was not trained on (e.g. a split of the training "
                    "data) first, or wrap the estimator in PriorCorrectedClassifier("
                    "estimator, train_prior='uniform', calibration='temperature').",
                    UncalibratedEstimateWarning, stacklevel=3)
            target = _em_prior(log_probs, uniform, max_iter=100, tol=1e-6)[0]
        else:
            target = check_prior(target, self.classes_, name="target_prior")
        log_probs = prior_correction(log_probs, source_prior=uniform, target_prior=target)
        return np.exp(log_probs).astype(probs.dtype)

    def predict(self, X) -> np.ndarray:
        """Most probable class label of each sample (original labels, not indices).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W)
            Same kind of input as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        probs = self.predict_proba(X)
        return self.classes_[probs.argmax(axis=1)]

    def score(self, X, y=None, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W), or Dataset
            Same kind of input as in ``fit``.
        y : array-like of shape (n_samples,) or None
            True labels; ``None`` only with a Dataset ``X``, whose labels are used.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the samples in the mean.

        Returns
        -------
        float
        """
        from sklearn.metrics import accuracy_score

        if y is None:
            labels = dataset_labels(X) if is_dataset_input(X) else None
            if labels is None:
                raise ValueError(f"{type(self).__name__}.score needs y (the true labels) "
                                 "unless X is a dataset of (image, label) items.")
            y = labels
        return float(accuracy_score(y, self.predict(X), sample_weight=sample_weight))

    def calibrate(self, X, y=None, *, method="temperature"):
        """Calibrate the probabilities on held-out labelled data (for ``target_prior``).

        Fits a temperature ``T`` (and, with ``method="bcts"``, one bias ``b_c`` per
        class) by maximum likelihood on the network's fused log-probabilities of ``X``
        (:func:`ltroute.calibration.fit_temperature`). From then on ``predict_proba``
        returns ``softmax(log p(y|x) / T + b)`` corrected to ``target_prior``: the
        order of operations is network -> calibration -> prior correction, as in
        :class:`~ltroute.PriorCorrectedClassifier`. ``target_prior="estimate"`` needs
        it: EM (Saerens et al. 2002) assumes calibrated posteriors, and on an
        uncalibrated network it can drift (it then warns). A temperature alone never
        changes ``predict`` under ``target_prior="uniform"``; biases can.

        ``X, y`` must be samples the network was *not* trained on (e.g. a stratified
        split of the training data held out from ``fit``); they may follow any class
        distribution: the fit adds the fixed offset ``log pi_y - log(1 / n_classes)``
        (``pi_y``: the class frequencies of ``y``), so the calibrated probabilities stay
        posteriors under the uniform prior that ``target_prior`` corrects. A class
        absent from ``y`` keeps a neutral bias. ``fit`` discards the calibration (it
        belongs to the trained network); ``clone`` does not copy it; pickling keeps it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, C, H, W), or Dataset
            Held-out samples, the same kind of input as in ``fit``.
        y : array-like of shape (n_samples,) or None
            Their labels, classes of ``classes_``; ``None`` only with a Dataset ``X``,
            whose labels are used.
        method : {"temperature", "bcts"}, default="temperature"
            ``"temperature"``: ``T`` only (Guo et al. 2017); ``"bcts"``: ``T`` and
            per-class biases (Alexandari et al. 2020), which need many held-out samples
            of every class but also correct a network whose probabilities are biased
            per class. Measured (``benchmarks/results/label_shift_calibrated.md``;
            logit-adjusted networks fitted on 80 % of the training split, calibrated on
            the rest; accuracy on the uniform test set with ``target_prior="estimate"``,
            then with ``"uniform"``): MNIST-LT, 305 held-out images (1 to 125 per
            class): 89.7 % with ``"temperature"``, 88.7 % with ``"bcts"``, 88.5 %
            uncalibrated, 89.9 % uniform; a CIFAR-10-LT CPU proxy, 2,480 held-out images
            (10 to 1,000 per class): 35.1 % with ``"temperature"``, 41.6 % with
            ``"bcts"``, 36.5 % uncalibrated, 44.0 % uniform.

        Returns
        -------
        self : object
            With ``calibration_temperature_`` and ``calibration_biases_`` set.

        Raises
        ------
        ValueError
            For an unknown ``method``, labels that are not classes of the estimator, a
            ``y`` of another length than ``X``, or any input ``predict`` rejects. Nothing
            is changed then.

        Examples
        --------
        >>> from sklearn.model_selection import train_test_split
        >>> from ltroute import LongTailClassifier
        >>> from ltroute.datasets import load_letter_lt
        >>> data = load_letter_lt()
        >>> X_fit, X_held, y_fit, y_held = train_test_split(
        ...     data.X_train, data.y_train, test_size=0.2, stratify=data.y_train,
        ...     random_state=0)
        >>> clf = LongTailClassifier(loss="logit_adjusted", max_epochs=5, random_state=0)
        >>> clf = clf.fit(X_fit, y_fit).calibrate(X_held, y_held)
        >>> bool(clf.calibration_temperature_ > 0)
        True
        >>> clf.set_params(target_prior="estimate").predict(data.X_test[:500]).shape
        (500,)
        """
        check_is_fitted(self, ["module_", "classes_"])
        name = type(self).__name__
        if not isinstance(method, str) or method not in ("temperature", "bcts"):
            raise ValueError(f"{name}.calibrate: method must be 'temperature' or 'bcts'; "
                             f"got {method!r}.")
        codes = self._encode_given_labels(X, y, f"{name}.calibrate")
        log_probs = as_log_proba(self._fused_outputs(X)[0].numpy())
        if len(log_probs) != len(codes):
            raise ValueError(f"{name}.calibrate: X has {len(log_probs)} samples but y has "
                             f"{len(codes)} labels.")
        uniform = np.full(len(self.classes_), 1.0 / len(self.classes_))
        temperature, biases = fit_under_prior(log_probs, codes, uniform, bias=method == "bcts")
        self.calibration_temperature_, self.calibration_biases_ = temperature, biases
        return self

    def _encode_given_labels(self, X, y, caller: str) -> np.ndarray:
        """Codes of the labels of fitted data given to a method after ``fit``
        (``calibrate``, ``fit_router``): ``y``, or a dataset's labels, which a given ``y``
        must agree with; a ``ValueError`` naming ``caller`` for a missing ``y`` or
        labels that are not classes."""
        if is_dataset_input(X):
            y = check_dataset_y(X, y, caller)
        elif y is None:
            raise ValueError(f"{caller} needs y (the true labels) unless X is a dataset of "
                             "(image, label) items.")
        return encode_labels(y, self.classes_, caller)

    # ------------------------------------------------------------- plumbing
    @property
    def classes_(self) -> np.ndarray:
        try:
            return self.__dict__["classes_"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute 'classes_': "
                                 "call fit first.") from None

    @classes_.setter
    def classes_(self, value: np.ndarray) -> None:
        self.__dict__["classes_"] = value

    def __setattr__(self, name, attr):
        # ``backbone`` may hold a user's ``nn.Module``. skorch treats every module set
        # outside ``initialize_*`` as a misplaced component (``SkorchAttributeError``)
        # and would otherwise register it for training and device moves. Here it is a
        # plain constructor parameter: ExpertNet deep-copies it into ``module_``, the
        # component skorch trains, moves and saves, so the parameter is never mutated.
        if name == "backbone":
            object.__setattr__(self, name, attr)
            return
        super().__setattr__(name, attr)

    def _get_param_names(self):
        # skorch lists every attribute without a trailing underscore, which leaks
        # private state (``_params_to_validate``) into get_params.
        return [name for name in super()._get_param_names() if not name.startswith("_")]

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_count_statistics", "_augment_fill", "_batch_listeners"):  # caches
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        requested = state["device"]
        state["device"] = resolve_device(requested)
        super().__setstate__(state)
        self.device = requested

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags
