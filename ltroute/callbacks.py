"""skorch callbacks shared by the estimators and the command line."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from skorch.callbacks import Callback, PrintLog
from skorch.dataset import Dataset as SkorchDataset
from skorch.dataset import get_len, unpack_data
from torch.utils.data import Subset

from ltroute._inputs import TrainingDataset, array_batches
from ltroute._validation import split_sample_weight
from ltroute.losses import (
    class_difficulty,
    frequency_prior_weights,
    log_class_prior,
    mix_class_weights,
    multiplicative_weight_update,
    prediction_uncertainty,
)

__all__ = ["BatchNormRecalibration", "ConvergenceCheck", "DifficultyWeighting", "EpochProgressBar",
           "QuietPrintLog"]

#: Largest weight ``(1 - m)^n`` of BatchNorm's starting values in its running statistics
#: that inference may trust (1 % after 44 steps at PyTorch's momentum 0.1): the
#: recalibration's default threshold, and the convergence check's condition for judging
#: from training-mode predictions.
TRUSTED_INITIAL_WEIGHT = 0.01


class EpochProgressBar(Callback):
    """One tqdm progress bar over the epochs of a fit, showing the last training loss.

    skorch's own ``ProgressBar`` advances per batch and restarts every epoch; this one
    advances once per epoch, which reads better for the many short epochs of tabular
    long-tailed training.

    Parameters
    ----------
    desc : str or None, default=None
        Text before the bar; ``None`` uses the estimator's class name.
    leave : bool, default=True
        Keep the finished bar on screen.
    """

    def __init__(self, desc: str | None = None, leave: bool = True) -> None:
        self.desc = desc
        self.leave = leave

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        from tqdm.auto import tqdm

        self.bar_ = tqdm(total=net.max_epochs, desc=self.desc or type(net).__name__,
                         unit="epoch", leave=self.leave)

    def on_epoch_end(self, net, **kwargs):
        loss = net.history[-1].get("train_loss")
        if loss is not None:
            self.bar_.set_postfix(train_loss=f"{loss:.4f}", refresh=False)
        self.bar_.update(1)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        self.bar_.close()


class QuietPrintLog(PrintLog):
    """skorch's :class:`~skorch.callbacks.PrintLog`, which formats no table when it would
    print nothing (``verbose=0`` with the default ``sink=print``).

    skorch's ``PrintLog`` tabulates every epoch's row and flushes stdout whether it
    prints or not. ltroute's estimators use this one (named ``"print_log"``, same
    parameters); with a ``sink`` of your own every row is formatted and sent, as in skorch.
    """

    def on_epoch_end(self, net, **kwargs):
        if self.sink is print and not net.verbose:
            return
        super().on_epoch_end(net, **kwargs)


class DifficultyWeighting(Callback):
    r"""Per-class difficulty from the fused predictions and adaptive class weights.

    DQRoute's *Weight* step. With any ltroute estimator it tracks the statistics and
    weights below; only :class:`~ltroute.DQRouteClassifier`'s loss reads
    ``class_weights_``. During each epoch it
    accumulates, for every class ``c``, the mean predictive uncertainty ``H_c`` and the
    accuracy ``acc_c`` of the estimator's fused prediction (detached; on the training
    batches in train mode, or on the validation batches with ``source="valid"``; means
    weighted by ``fit``'s ``sample_weight`` when given). At the end of epoch ``t`` it

    1. updates the bias-corrected EMA of the accuracy,
       ``A~_c <- beta A~_c + (1 - beta) acc_c`` and ``A_c = A~_c / (1 - beta^{t_c})``
       (``t_c``: the number of epochs in which class ``c`` was seen);
    2. computes the difficulty ``d_c`` (:func:`ltroute.losses.class_difficulty`);
    3. after ``warmup_epochs``, every ``update_every`` epochs, updates the difficulty
       weights ``w`` by a Hedge step with clipping
       (:func:`ltroute.losses.multiplicative_weight_update`);
    4. sets the class weights of the next epoch,
       ``omega = mix(w, f, alpha)`` with the frequency prior ``f`` once the next epoch
       is past ``prior_start_epoch`` and ``omega = w`` before
       (:func:`ltroute.losses.mix_class_weights`).

    The results are written to the estimator as ``difficulty_``, ``class_entropy_``,
    ``class_accuracy_ema_``, ``difficulty_weights_``, ``class_weights_`` and
    ``difficulty_history_``, and recorded in its history as ``difficulty`` and
    ``class_weights`` (lists over the classes). The per-epoch statistics are three sums
    per class, so they are all-reduced across processes.

    Parameters
    ----------
    difficulty_lambda : float, default=1.0
        Weight ``lambda`` of the accuracy term of the difficulty.
    gamma : float, default=0.1
        Step size of the multiplicative update.
    acc_ema : float, default=0.9
        ``beta`` of the accuracy EMA.
    uncertainty : {"entropy", "one_minus_maxprob"}, default="entropy"
        Per-sample uncertainty (:func:`ltroute.losses.prediction_uncertainty`).
    entropy_norm : {"max_observed", "log_C"}, default="max_observed"
        Normaliser of the uncertainty: its largest class value, or its largest possible
        value (``log C`` for the entropy, ``1 - 1/C`` for ``1 - max p``).
    update : {"multiplicative", "softmax"}, default="multiplicative"
        ``"multiplicative"``: cumulative Hedge steps; ``"softmax"``: ``w = C softmax(gamma
        d)`` from the current difficulty only (clipped the same way).
    clip : float or None, default=10.0
        ``kappa``: ``w`` is kept in ``[1/kappa, kappa]`` with mean 1; ``None`` does not
        clip.
    warmup_epochs : int, default=5
        No weight update at epochs ``t <= warmup_epochs``.
    update_every : int, default=1
        Update at the epochs ``t`` divisible by it.
    use_difficulty : bool, default=True
        ``False`` keeps ``w = 1`` (statistics are still tracked).
    prior : {"effective_number", "inverse_frequency"} or None, default="effective_number"
        Frequency prior ``f`` (:func:`ltroute.losses.frequency_prior_weights`), computed
        from the estimator's ``class_counts_``; ``None`` uses ``omega = w`` throughout.
    prior_beta : float, default=0.9999
        ``beta`` of the effective-number prior.
    prior_mix_alpha : float, default=0.5
        ``alpha``, the share of ``w`` once the prior is on.
    combination : {"convex", "product"}, default="convex"
        How ``w`` and ``f`` are combined.
    prior_start_epoch : int or None, default=None
        The prior enters from the first epoch *after* it (1-based, like DRW's
        ``drw_epoch``); ``None`` means ``int(0.8 * max_epochs)``, ``0`` from the start.
    source : {"train", "valid"}, default="train"
        Which batches the statistics come from; ``"valid"`` needs a ``train_split``.
    prior_adjust_tau : float, default=0.0
        Compute the statistics on ``p~(y | x) propto p(y | x) pi_y^tau`` instead of the
        fused prediction ``p`` itself: the distribution a logit-adjusted training loss
        with this ``tau`` fits to the training labels. Give the ``tau`` of such a loss,
        otherwise a class looks hard merely because the adjustment moves probability
        away from it on its own training samples.
    """

    def __init__(
        self,
        difficulty_lambda: float = 1.0,
        gamma: float = 0.1,
        acc_ema: float = 0.9,
        uncertainty: str = "entropy",
        entropy_norm: str = "max_observed",
        update: str = "multiplicative",
        clip: float | None = 10.0,
        warmup_epochs: int = 5,
        update_every: int = 1,
        use_difficulty: bool = True,
        prior: str | None = "effective_number",
        prior_beta: float = 0.9999,
        prior_mix_alpha: float = 0.5,
        combination: str = "convex",
        prior_start_epoch: int | None = None,
        source: str = "train",
        prior_adjust_tau: float = 0.0,
    ) -> None:
        self.difficulty_lambda = difficulty_lambda
        self.gamma = gamma
        self.acc_ema = acc_ema
        self.uncertainty = uncertainty
        self.entropy_norm = entropy_norm
        self.update = update
        self.clip = clip
        self.warmup_epochs = warmup_epochs
        self.update_every = update_every
        self.use_difficulty = use_difficulty
        self.prior = prior
        self.prior_beta = prior_beta
        self.prior_mix_alpha = prior_mix_alpha
        self.combination = combination
        self.prior_start_epoch = prior_start_epoch
        self.source = source
        self.prior_adjust_tau = prior_adjust_tau

    def _check_params(self) -> None:
        choices = {"uncertainty": ("entropy", "one_minus_maxprob"),
                   "entropy_norm": ("max_observed", "log_C"),
                   "update": ("multiplicative", "softmax"),
                   "prior": ("effective_number", "inverse_frequency", None),
                   "combination": ("convex", "product"),
                   "source": ("train", "valid")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{type(self).__name__}: {name}={getattr(self, name)!r} is "
                                 f"not supported; expected one of {allowed}.")
        if self.update_every < 1:
            raise ValueError(f"{type(self).__name__}: update_every must be >= 1, got "
                             f"{self.update_every!r}.")

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self._check_params()
        n_classes = len(net.classes_)
        self.prior_start_epoch_ = (int(0.8 * net.max_epochs) if self.prior_start_epoch is None
                                   else self.prior_start_epoch)
        self.prior_weights_ = (None if self.prior is None else frequency_prior_weights(
            net.class_counts_, kind=self.prior, beta=self.prior_beta).double())
        self.stats_ = None  # per class: samples seen, sum of uncertainties, correct
        self.log_prior_ = (self.prior_adjust_tau * log_class_prior(net.class_counts_)
                           if self.prior_adjust_tau else None)
        self.n_updates_ = torch.zeros(n_classes, dtype=torch.float64)
        self.accuracy_ema_raw_ = torch.zeros(n_classes, dtype=torch.float64)
        self.entropy_ = torch.full((n_classes,), float("nan"), dtype=torch.float64)
        self.weights_ = torch.ones(n_classes, dtype=torch.float64)
        self.history_ = []
        net.difficulty_ = np.zeros(n_classes)
        net.class_entropy_ = self.entropy_.numpy().copy()
        net.class_accuracy_ema_ = np.full(n_classes, np.nan)
        net.difficulty_weights_ = self.weights_.numpy().copy()
        net.class_weights_ = self._class_weights(len(net.history) + 1)
        net.difficulty_history_ = np.zeros((0, n_classes))

    def on_epoch_begin(self, net, **kwargs):
        self.stats_ = None

    def on_batch_end(self, net, batch=None, training=False, y_pred=None, **kwargs):
        if training != (self.source == "train") or y_pred is None:
            return
        with torch.no_grad():
            # skorch passes the module's outputs, the expert logits
            fused = net._fuse(y_pred.detach(), return_log_probs=self.log_prior_ is not None)
            probs = fused.probs.float()
            if self.log_prior_ is not None:
                probs = torch.softmax(fused.log_probs.float()
                                      + self.log_prior_.to(probs.device), dim=1)
            target = torch.as_tensor(batch[1], device=probs.device).long()
            per_sample = torch.stack([
                torch.ones_like(probs[:, 0]),
                prediction_uncertainty(probs, self.uncertainty),
                (probs.argmax(dim=1) == target).float(),
            ], dim=1)
            sample_weight = split_sample_weight(batch[0])[1]
            if sample_weight is not None:  # fit's sample_weight: weighted class means
                per_sample = per_sample * sample_weight.to(per_sample).unsqueeze(1)
            one_hot = torch.nn.functional.one_hot(target, len(net.classes_)).float()
            # A matrix product rather than index_add_: deterministic on CUDA too, and no
            # host synchronisation until the end of the epoch.
            sums = one_hot.T @ per_sample
            self.stats_ = sums if self.stats_ is None else self.stats_ + sums

    def on_epoch_end(self, net, **kwargs):
        epoch = len(net.history)
        n_classes = self.weights_.numel()
        stats = (torch.zeros(n_classes, 3) if self.stats_ is None else self.stats_)
        stats = _sum_over_processes(net, stats)
        seen, sum_uncertainty, correct = stats.cpu().double().unbind(dim=1)
        observed = seen > 0
        count = seen.clamp(min=1)
        beta = self.acc_ema
        self.entropy_ = torch.where(observed, sum_uncertainty / count, self.entropy_)
        self.accuracy_ema_raw_ = torch.where(
            observed, beta * self.accuracy_ema_raw_ + (1 - beta) * correct / count,
            self.accuracy_ema_raw_)
        self.n_updates_ += observed.double()
        accuracy = self.accuracy_ema_raw_ / (1 - beta ** self.n_updates_)  # nan if never seen
        difficulty = class_difficulty(self.entropy_, accuracy, lam=self.difficulty_lambda,
                                      uncertainty_scale=self._uncertainty_scale())
        if (self.use_difficulty and epoch > self.warmup_epochs
                and epoch % self.update_every == 0):
            start = self.weights_ if self.update == "multiplicative" else torch.ones_like(
                self.weights_)
            self.weights_ = multiplicative_weight_update(start, difficulty, gamma=self.gamma,
                                                         clip=self.clip)
        self.history_.append(difficulty.numpy())
        net.difficulty_ = difficulty.numpy()
        net.class_entropy_ = self.entropy_.numpy().copy()
        net.class_accuracy_ema_ = accuracy.numpy()
        net.difficulty_weights_ = self.weights_.numpy().copy()
        net.class_weights_ = self._class_weights(epoch + 1)
        net.difficulty_history_ = np.vstack(self.history_)
        net.history.record("difficulty", net.difficulty_.tolist())
        net.history.record("class_weights", net.class_weights_.tolist())

    def _uncertainty_scale(self) -> float | None:
        if self.entropy_norm == "max_observed":
            return None
        n_classes = self.weights_.numel()
        return math.log(n_classes) if self.uncertainty == "entropy" else 1.0 - 1.0 / n_classes

    def _class_weights(self, epoch: int) -> np.ndarray:
        """Class weights ``omega`` used in (1-based) ``epoch``."""
        if self.prior_weights_ is None or epoch <= self.prior_start_epoch_:
            return self.weights_.float().numpy()
        return mix_class_weights(self.weights_, self.prior_weights_,
                                 alpha=self.prior_mix_alpha,
                                 combination=self.combination).float().numpy()


def _sum_over_processes(net, stats: torch.Tensor) -> torch.Tensor:
    """Sum per-process statistics when ``net`` trains in several processes (skorch's
    ``AccelerateMixin``: each process sees its shard of every epoch); unchanged
    otherwise."""
    accelerator = getattr(net, "accelerator", None)
    if accelerator is None or accelerator.num_processes == 1:
        return stats
    return accelerator.reduce(stats.to(accelerator.device).float(), reduction="sum")


class BatchNormRecalibration(Callback):
    r"""Re-estimate BatchNorm running statistics after a short training run.

    BatchNorm's running mean and variance are exponential averages that start at 0 and 1;
    after ``n`` training batches with momentum ``m`` those starting values still weigh
    ``(1 - m)^n`` (PyTorch's default ``m = 0.1``: 39 % after 9 batches, 1 % after 44).
    Inference uses the running statistics, so a model trained for a few steps on
    unscaled features predicts with badly wrong normalisation: measured on
    ``load_digits_lt()`` (294 rows, 3 epochs of 3 batches), DQRoute's training accuracy
    was 0.09-0.41 in inference mode against 0.90-0.96 in training mode.

    When any BatchNorm layer's starting values would still weigh more than ``threshold``
    at the end of training, this callback replaces the exponential average by a plain
    one, in one of two ways:

    - ``last_epoch=True`` (default): the last planned epoch (``max_epochs``) starts from
      reset statistics with ``momentum=None``, so that each layer's running statistics
      are the plain average over that epoch's training batches (the batches as the
      network saw them: augmented, and with the weights of each step) -- no pass over
      the data after training. When the fit ends before that epoch is complete (early
      stopping, a diverged or interrupted fit), the pass below runs instead.
    - ``last_epoch=False``: after training, every BatchNorm layer's statistics are the
      plain average over one pass of the training fold (training mode, no gradient,
      no augmentation, the final weights), as ``torch.optim.swa_utils.update_bn``
      computes them.

    Longer runs are left untouched. Part of every ltroute estimator's default callbacks
    (named ``"batchnorm_recalibration"``; switch it off with
    ``callbacks__batchnorm_recalibration=None``, choose the pass with
    ``callbacks__batchnorm_recalibration__last_epoch=False``).

    Parameters
    ----------
    threshold : float, default=0.01
        Largest weight ``(1 - m)^n`` of the starting values left alone.
    last_epoch : bool, default=True
        Average the statistics over the last epoch's training batches instead of a
        pass over the training fold after training (which costs as much as a forward
        pass of the fold, and loading it again: 4-14 % of a 5-epoch fit of a small
        ConvNet on a few hundred images; ``benchmarks/overhead.py``).
    """

    def __init__(self, threshold: float = TRUSTED_INITIAL_WEIGHT,
                 last_epoch: bool = True) -> None:
        self.threshold = threshold
        self.last_epoch = last_epoch

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.dataset_train_ = None
        self.last_planned_epoch_ = len(net.history) + net.max_epochs
        self.averaging_ = None  # [(layer, momentum, batches tracked before)] during it
        self.averaged_epoch_ = None

    def on_epoch_begin(self, net, dataset_train=None, **kwargs):
        self.dataset_train_ = dataset_train
        if (not self.last_epoch or len(net.history) != self.last_planned_epoch_
                or dataset_train is None):
            return
        batch_size = net.get_params_for("iterator_train").get("batch_size", net.batch_size)
        n_batches = 1 if batch_size == -1 else -(-len(dataset_train) // batch_size)
        layers = _batch_norm_layers(net)
        if not any(_initial_weight(m, extra_batches=n_batches) > self.threshold
                   for m in layers):
            return
        self.averaging_ = [(m, m.momentum, int(m.num_batches_tracked)) for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the epoch's batches

    def on_epoch_end(self, net, **kwargs):
        if self.averaging_ is not None:
            self._end_averaging()
            if _last_loss_finite(net):
                self.averaged_epoch_ = len(net.history)

    def _end_averaging(self) -> None:
        """Restore each layer's momentum; its batch count goes on from before the epoch."""
        for m, momentum, tracked in self.averaging_:
            m.momentum = momentum
            m.num_batches_tracked.add_(tracked)
        self.averaging_ = None

    def on_train_end(self, net, X=None, y=None, **kwargs):
        dataset, self.dataset_train_ = self.dataset_train_, None  # no data kept after fit
        if self.averaging_ is not None:  # an epoch cut short (e.g. a diverged fit)
            self._end_averaging()
        if self.averaged_epoch_ != len(net.history):  # no (finite) averaged last epoch
            layers = _batch_norm_layers(net)
            if (dataset is None or not _last_loss_finite(net)
                    or not any(_initial_weight(m) > self.threshold for m in layers)):
                return
            with _rng_untouched(net):
                self._recalibrate(net, dataset, layers,
                                  keep=_keeps_fold_batches(net, dataset))
        net.__dict__[BATCHNORM_AVERAGED_KEY] = True  # for the convergence check

    @staticmethod
    def _recalibrate(net, dataset, layers, keep: bool = False) -> None:
        """One pass of the training fold; with ``keep``, its loaded batches are left in
        ``net`` for the convergence check's pass (up to :data:`FOLD_BATCHES_BYTES`)."""
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
        was_training = net.module_.training
        kept, size = ([] if keep else None), 0
        try:
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the pass
            net.module_.train()
            with torch.no_grad():
                for batch in _training_fold_iterator(net, dataset):
                    Xi = unpack_data(batch)[0]
                    if get_len(Xi) > 1:  # BatchNorm1d cannot normalise a single sample
                        net.infer(Xi)
                    if kept is not None:
                        size += sum(t.nbytes for t in _tensors(batch))
                        if size <= FOLD_BATCHES_BYTES:
                            kept.append(batch)
                        else:
                            kept = None
            if kept is not None:
                net.__dict__[FOLD_BATCHES_KEY] = (dataset, kept)
        finally:
            for m, (momentum, tracked) in zip(layers, saved, strict=True):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)
            net.module_.train(was_training)


class ConvergenceCheck(Callback):
    r"""Warn (``sklearn.exceptions.ConvergenceWarning``) when a fit diverged or ended far
    from converged.

    - *Diverged*: the training loss of an epoch is not finite (NaN or infinite, e.g. from
      a learning rate far too large). Training stops after that epoch: further steps only
      spread NaN through the weights. The network's outputs are then unusable, and
      ``predict`` / ``predict_proba`` raise a ``ValueError`` rather than return a class.
    - *Far from converged*: after training, the fitted model's accuracy on its own
      training fold (inference mode) is below the share of that fold's most frequent
      class, i.e. worse than always predicting that class. A usable model, even one
      trained for the balanced error, is well above it on the data it was trained on.
      Train longer (``max_epochs``), with a larger ``lr``, or check the data.

    With ``training_predictions=True`` (default) the check first reads the predictions
    the training steps of the last planned epoch made anyway (training mode: augmented
    inputs, each step's weights; counted on the training device, no extra pass): when
    they reach the majority class's count, the model is judged converged and no pass
    over the data runs. This shortcut is taken only when the BatchNorm layers' running
    statistics can be trusted in inference mode (none, a long enough run, or averaged
    by :class:`BatchNormRecalibration` in this fit), since a network whose training-mode
    predictions are fine can still predict badly with running statistics that keep
    their starting values; and not with Accelerate (each process sees a shard).

    Otherwise (or when the shortcut falls short) the check makes at most one inference
    pass over the training fold at the end of ``fit`` (loaded like the training batches,
    in batches of up to :data:`~ltroute._base._INFERENCE_BATCH_BYTES` of input:
    ``batch_size`` rows of images, up to a few thousand tabular rows at once). The pass
    stops as soon as the correct predictions reach the size of the fold's most frequent
    class, when the fold's labels are known without loading an item (arrays, the
    datasets ``fit`` makes, a validation split of them): the accuracy can then no longer
    fall below the majority share, so the outcome is the one of the whole pass. After a
    BatchNorm recalibration pass (short fits) of a fold loaded item by item, the check
    reuses that pass's batches (up to :data:`FOLD_BATCHES_BYTES`) instead of loading
    every item again. Only the inference pass warns. Part of every ltroute estimator's
    default callbacks (named ``"convergence_check"``; switch it off with
    ``callbacks__convergence_check=None``). Fits of ``max_epochs=0`` are not checked.

    Parameters
    ----------
    training_predictions : bool, default=True
        Judge from the last epoch's training predictions first (see above); ``False``:
        always the inference pass.
    """

    def __init__(self, training_predictions: bool = True) -> None:
        self.training_predictions = training_predictions

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.dataset_train_ = None
        self.diverged_ = False
        self.last_planned_epoch_ = len(net.history) + net.max_epochs
        self.counting_ = False
        self.correct_ = self.class_counts_ = None  # on the training device
        self.counted_epoch_ = None

    def on_epoch_begin(self, net, dataset_train=None, **kwargs):
        self.dataset_train_ = dataset_train
        self.counting_ = (self.training_predictions and not hasattr(net, "accelerator")
                          and len(net.history) == self.last_planned_epoch_)
        self.correct_ = self.class_counts_ = None

    def on_batch_end(self, net, batch=None, training=False, y_pred=None, **kwargs):
        if not (self.counting_ and training) or y_pred is None:
            return
        with torch.no_grad():
            # skorch passes the module's outputs (the expert logits): fused as predict does
            predicted = net._fuse(y_pred.detach().float()).probs.argmax(dim=1)
            target = torch.as_tensor(unpack_data(batch)[1], device=predicted.device).long()
            correct = (predicted == target).sum()
            counts = torch.zeros(len(net.classes_), dtype=torch.long,
                                 device=target.device).index_add_(
                0, target, torch.ones_like(target))
        self.correct_ = correct if self.correct_ is None else self.correct_ + correct
        self.class_counts_ = (counts if self.class_counts_ is None
                              else self.class_counts_ + counts)

    def on_epoch_end(self, net, **kwargs):
        if self.counting_:
            self.counting_ = False
            self.counted_epoch_ = len(net.history)
        if _last_loss_finite(net):
            return
        self.diverged_ = True
        warnings.warn(
            f"{type(net).__name__}: the training loss became {net.history[-1, 'train_loss']} "
            f"in epoch {len(net.history)}: the fit diverged and training stopped. The "
            "network's outputs are not usable (predict raises). Lower lr (now "
            f"{net.lr!r}) or scale X.", ConvergenceWarning, stacklevel=2)
        raise KeyboardInterrupt  # skorch's way to stop training (as EarlyStopping does)

    def _training_predictions_suffice(self, net, batch_norm_averaged: bool) -> bool:
        """Whether the last epoch's training predictions reach the majority count, with
        running statistics that inference can trust."""
        if (self.counted_epoch_ != len(net.history) or self.correct_ is None
                or not (batch_norm_averaged or not any(
                    _initial_weight(m) > TRUSTED_INITIAL_WEIGHT
                    for m in _batch_norm_layers(net)))):
            return False
        return int(self.correct_) >= int(self.class_counts_.max())

    def on_train_end(self, net, X=None, y=None, **kwargs):
        dataset, self.dataset_train_ = self.dataset_train_, None  # no data kept after fit
        kept = net.__dict__.pop(FOLD_BATCHES_KEY, None)
        averaged = net.__dict__.pop(BATCHNORM_AVERAGED_KEY, False)
        suffice = not self.diverged_ and self._training_predictions_suffice(net, averaged)
        self.correct_ = self.class_counts_ = None
        if self.diverged_ or dataset is None or suffice:
            return
        # The BatchNorm recalibration's pass just loaded this fold (and kept it): the
        # same batches, in order, without decoding every image again.
        batches = (kept[1] if kept is not None and kept[0] is dataset else
                   _training_fold_iterator(net, dataset, inference_only=True))
        # Enough correct predictions to reach the majority count: the accuracy over the
        # whole fold cannot fall below the majority share any more, so the rest of the
        # pass cannot change the outcome. Not with Accelerate: its loaders keep their
        # state (for gather_for_metrics) unless iterated to the end.
        enough = None if hasattr(net, "accelerator") else _majority_count(dataset)
        correct, counts = 0, None
        with torch.no_grad(), _rng_untouched(net):
            for batch in batches:
                probs = net.evaluation_step(batch, training=False)[0]
                target = torch.as_tensor(unpack_data(batch)[1], device=probs.device).long()
                if hasattr(net, "accelerator"):
                    # skorch's AccelerateMixin gathers the outputs of every process in
                    # evaluation_step: gather the labels alike, so that every process
                    # judges the whole training fold and they all warn or none does.
                    target = net.accelerator.gather_for_metrics(target)
                correct += int((probs.argmax(dim=1) == target).sum())
                if enough is not None and correct >= enough:
                    return
                batch_counts = torch.bincount(target.cpu(), minlength=len(net.classes_))
                counts = batch_counts if counts is None else counts + batch_counts
        if counts is None:
            return
        accuracy = correct / int(counts.sum())
        majority = int(counts.max()) / int(counts.sum())
        if accuracy < majority:
            warnings.warn(
                f"{type(net).__name__} ended far from converged: its accuracy on its own "
                f"training data is {accuracy:.3f}, below {majority:.3f}, the share of the "
                f"most frequent class (after {len(net.history)} epochs). Train longer "
                "(max_epochs), with a larger lr, or check the data.",
                ConvergenceWarning, stacklevel=2)


def _fold_labels(dataset) -> np.ndarray | None:
    """The labels of a training fold known without loading any item, as its batches
    carry them: skorch's ``Dataset`` over arrays (its ``y``) and ltroute's
    ``TrainingDataset`` (its encoded ``targets``), also through ``torch``'s ``Subset``
    (skorch's ``ValidSplit``); ``None`` for any other dataset."""
    if isinstance(dataset, Subset):
        labels = _fold_labels(dataset.dataset)
        return None if labels is None else labels[np.asarray(dataset.indices, dtype=np.int64)]
    if type(dataset) is SkorchDataset:
        labels = dataset.y
    elif type(dataset) is TrainingDataset:
        labels = dataset.targets
    else:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.numpy(force=True)
    return labels if isinstance(labels, np.ndarray) and labels.ndim == 1 else None


def _majority_count(dataset) -> int | None:
    """Number of samples of the most frequent class of a training fold whose labels
    :func:`_fold_labels` knows (class indices), else ``None``."""
    labels = _fold_labels(dataset)
    if labels is None or labels.dtype.kind not in "iu" or not len(labels) or labels.min() < 0:
        return None
    return int(np.bincount(labels).max())


def _training_fold_iterator(net, dataset, inference_only: bool = False):
    """In-order batches of the training fold: loaded like the training batches with an
    ltroute estimator (its workers; larger batches for an ``inference_only`` pass),
    skorch's validation iterator otherwise."""
    method = getattr(net, "_training_fold_iterator", None)
    if method is None:
        return net.get_iterator(dataset, training=False)
    return method(dataset, inference_only=inference_only)


#: Most bytes of loaded training-fold batches that the BatchNorm recalibration keeps for
#: the convergence check's pass right after it (in ``net.__dict__[FOLD_BATCHES_KEY]``;
#: the check, or else ``fit``, removes them). Recalibration runs after fewer than 44
#: steps, so a fold it passes over is small; above this it is loaded twice.
FOLD_BATCHES_BYTES = 64 * 2**20
FOLD_BATCHES_KEY = "_recalibration_batches"
#: Set in ``net.__dict__`` by the BatchNorm recalibration when it replaced the running
#: statistics by a plain average at the end of this fit (removed by the convergence
#: check, or else by ``fit``).
BATCHNORM_AVERAGED_KEY = "_batchnorm_averaged"


def _keeps_fold_batches(net, dataset) -> bool:
    """Whether the recalibration's batches are worth keeping: a convergence check runs
    after it, the fold is loaded item by item (arrays are sliced, not loaded; the
    check takes them in larger batches), and not with Accelerate (its loaders track
    their iteration for ``gather_for_metrics``)."""
    return (not hasattr(net, "accelerator") and array_batches(dataset) is None
            and any(isinstance(cb, ConvergenceCheck) for _, cb in net.callbacks_))


def _tensors(batch):
    """The tensors of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def _rng_untouched(net):
    """Leave the torch RNGs as they were (iterating a DataLoader draws a seed, dropout
    draws masks), so that what follows training (RIDE's router stage) sees the same
    random stream whether these checks run or not."""
    param = next(net.module_.parameters(), None)
    devices = [param.device.index or 0] if param is not None and param.is_cuda else []
    return torch.random.fork_rng(devices=devices)


def _last_loss_finite(net) -> bool:
    """Whether the last epoch's training loss is finite (True before any epoch)."""
    if not len(net.history) or "train_loss" not in net.history[-1]:
        return True
    return math.isfinite(net.history[-1, "train_loss"])


def _initial_weight(layer: torch.nn.modules.batchnorm._BatchNorm,
                    extra_batches: int = 0) -> float:
    """Weight ``(1 - m)^n`` of the starting values in a BatchNorm layer's running stats
    (after ``extra_batches`` more training batches)."""
    if layer.momentum is None:  # cumulative average: no trace of the starting values
        return 0.0
    return (1.0 - layer.momentum) ** (int(layer.num_batches_tracked) + extra_batches)


def _batch_norm_layers(net) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The network's BatchNorm layers that keep running statistics."""
    return [m for m in net.module_.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
