"""Checks at the boundary of ltroute's estimators, each raising an error that names the
problem instead of letting it surface deep inside torch (or not at all).

Small functions called from :class:`ltroute._base.LongTailNet` (``fit``, the skorch hooks
and the predict-like methods), so that every estimator inherits them:

- :func:`check_layer_sizes`: ``hidden_sizes`` / ``expert_hidden_sizes`` entries;
- :func:`check_reserved_module_params`: ``module__*`` arguments that would silently
  override what the estimator sets itself (``n_experts``, ``n_classes``, ...);
- :func:`check_fit_sample_weight` and :func:`split_sample_weight`: ``sample_weight``
  validated once, then carried through skorch's batches beside ``X``;
- :func:`build_checked_network`: one dry run of a freshly built network, which turns
  "images smaller than the backbone allows" and "a module returning the wrong shape" into
  a ``ValueError``;
- :func:`check_batch_norm_batches`: BatchNorm cannot train on batches of one sample;
- :func:`check_probabilities`: non-finite network outputs never become probabilities or
  classes;
- :func:`writable`: torch warns about (and must not share) read-only numpy buffers;
- :func:`rollback_on_error` (and the method decorator :func:`rolls_back_on_error`): a
  call that fails before it changed a network leaves the estimator exactly as it was.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import _check_sample_weight
from torch import nn

__all__ = [
    "SAMPLE_WEIGHT_KEY",
    "build_checked_network",
    "check_batch_norm_batches",
    "check_fit_sample_weight",
    "check_layer_sizes",
    "check_probabilities",
    "check_reserved_module_params",
    "device_problem",
    "has_batch_norm",
    "rollback_on_error",
    "rolls_back_on_error",
    "split_sample_weight",
    "with_sample_weight",
    "writable",
]

#: Key under which ``fit`` carries the sample weights beside ``X`` (skorch slices dicts).
SAMPLE_WEIGHT_KEY = "sample_weight"
_X_KEY = "X"

#: Tolerance on ``|sum_c p_c - 1|`` of a row of fused probabilities (float32 sums of up to
#: thousands of terms are within ~1e-5 of one).
_ROW_SUM_ATOL = 1e-3


def check_layer_sizes(sizes: Any, name: str) -> tuple[int, ...]:
    """``sizes`` as a tuple of positive ints (empty allowed), else a ``ValueError``."""
    try:
        values = tuple(sizes)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints (layer widths), got "
                        f"{sizes!r}.") from None
    bad = [v for v in values
           if isinstance(v, (bool, np.bool_)) or not isinstance(v, Integral) or v < 1]
    if bad:
        raise ValueError(f"{name} must hold positive ints (layer widths); got {sizes!r}, "
                         f"whose entries {bad!r} are not.")
    return tuple(int(v) for v in values)


def device_problem(device: Any) -> str | None:
    """Why ``device`` (a string, ``torch.device`` or ``"auto"``/``None``) cannot hold
    tensors here, or ``None`` when it can."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return "not a torch device (e.g. 'auto', 'cpu', 'cuda', 'cuda:1', 'mps')"
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            return (f"CUDA is not available (torch {torch.__version__}, {build}); use 'cpu' "
                    "or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            return f"there are only {torch.cuda.device_count()} CUDA device(s)"
    try:
        torch.empty(0, device=resolved)
    except Exception as exc:  # noqa: BLE001 - any backend failure means "cannot use it"
        return f"cannot hold tensors ({type(exc).__name__}: {exc})"
    return None


def check_reserved_module_params(estimator: Any, set_by_estimator: Mapping[str, Any],
                                 overrides: Mapping[str, Any]) -> None:
    """Refuse ``module__<name>`` arguments for names the estimator passes itself.

    ``set_by_estimator`` are the network arguments the estimator computes (from the data
    or from its own parameters); a ``module__`` override of one of them would, e.g., build
    five experts while the estimator trains one.
    """
    clashes = sorted(set(set_by_estimator) & set(overrides))
    if not clashes:
        return
    name = type(estimator).__name__
    params = estimator.get_params(deep=False)
    hints = []
    for key in clashes:
        if key in params:
            hints.append(f"module__{key}: use {name}({key}=...) instead")
        elif key == "n_experts":
            hints.append(f"module__{key}: {name} trains a single expert; use RIDEClassifier or "
                         "DQRouteClassifier(n_experts=...) for several")
        else:
            hints.append(f"module__{key}: set from the training data")
    raise ValueError(f"{name} sets these network arguments itself, so they cannot be passed "
                     f"as module__ parameters: {'; '.join(hints)}.")


def check_fit_sample_weight(sample_weight: Any, X: np.ndarray) -> np.ndarray | None:
    """Validated float32 weights of shape (n_samples,), or ``None`` when they are all equal.

    scikit-learn's checks: finite, non-negative, not all zero, one per row of ``X``. Every
    loss is a weighted mean, so constant weights train exactly as no weights and are
    dropped.
    """
    if sample_weight is None:
        return None
    weights = _check_sample_weight(sample_weight, X, dtype=np.float32,
                                   ensure_non_negative=True)
    if np.all(weights == weights[0]):
        return None
    return weights


def with_sample_weight(X: Any, sample_weight: np.ndarray | None) -> Any:
    """``X`` with the weights attached for skorch's batching (``X`` itself without)."""
    if sample_weight is None:
        return X
    return {_X_KEY: X, SAMPLE_WEIGHT_KEY: sample_weight}


def split_sample_weight(batch_X: Any) -> tuple[Any, torch.Tensor | None]:
    """Undo :func:`with_sample_weight` on one batch: ``(X, weights or None)``."""
    if isinstance(batch_X, Mapping) and SAMPLE_WEIGHT_KEY in batch_X and _X_KEY in batch_X:
        return batch_X[_X_KEY], torch.as_tensor(batch_X[SAMPLE_WEIGHT_KEY])
    return batch_X, None


def writable(X: np.ndarray) -> np.ndarray:
    """``X``, copied when read-only (pandas 3 hands out read-only views; torch warns about
    them on every fit and must not write into them)."""
    if isinstance(X, np.ndarray) and not X.flags.writeable:
        return X.copy()
    return X


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` holds BatchNorm layers (which need two samples per batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def check_batch_norm_batches(estimator: Any, n_train: int, batch_size: int) -> None:
    """Refuse training batches of a single sample when the network has BatchNorm layers.

    ``batch_size`` is the training batch size (``-1``: the whole fold). A last batch of one
    sample is dropped elsewhere, so only ``batch_size=1`` and a one-row training fold
    remain.
    """
    if not has_batch_norm(estimator.module_):
        return
    name = type(estimator).__name__
    if batch_size == 1:
        raise ValueError(f"{name}: batch_size=1 cannot train the network's BatchNorm layers "
                         "(they need at least 2 samples per batch); use batch_size >= 2.")
    if n_train < 2:
        raise ValueError(f"{name}: the training fold has {n_train} sample(s) after "
                         "train_split, but the network's BatchNorm layers need at least 2 per "
                         "batch; give more data or a smaller validation share.")


def build_checked_network(build: Callable[[tuple[int, ...]], nn.Module],
                          input_shape: tuple[int, ...], n_experts: int, n_classes: int,
                          estimator_name: str) -> nn.Module:
    """Build the network with ``build(input_shape)``, run it once on zeros (inference
    mode, no gradient) and check it returns expert logits of shape (B, K, C).

    For images, a network that cannot be built or run (e.g. pooling down to nothing)
    gets a ``ValueError`` naming the smallest side length that works, found by building
    the network for larger images (only on that error path).
    """
    try:
        module = build(input_shape)
        out = _dry_run(module, input_shape)
    except Exception as exc:
        if len(input_shape) != 3:
            raise
        channels, height, width = input_shape
        smallest = _smallest_working_side(build, channels, height, width)
        if smallest is None or smallest <= min(height, width):
            raise
        raise ValueError(
            f"{estimator_name}: images of {height}x{width} pixels are too small for this "
            f"backbone; it needs a height and width of at least {smallest} pixels. Resize "
            "the images or choose another backbone (backbone='resnet32' takes any size). "
            f"The network failed with: {exc}") from exc
    expected = (2, n_experts, n_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{estimator_name}: the module must return expert logits of shape "
                         f"(batch, n_experts, n_classes) = {expected} for a batch of 2; "
                         f"{type(module).__name__} returned {shape}.")
    return module


def _dry_run(module: nn.Module, input_shape: tuple[int, ...]) -> Any:
    was_training = module.training
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else None
    module.eval()
    try:
        with torch.no_grad():
            return module(torch.zeros(2, *input_shape, device=device))
    finally:
        module.train(was_training)


def _smallest_working_side(build: Callable[[tuple[int, ...]], nn.Module], channels: int,
                           height: int, width: int, limit: int = 1024) -> int | None:
    """Smallest ``s`` such that the network runs on images of ``max(height, s) x max(width,
    s)`` pixels (doubling, then bisection); ``None`` if none up to ``limit`` does."""

    def works(side: int) -> bool:
        shape = (channels, max(height, side), max(width, side))
        try:
            _dry_run(build(shape), shape)
        except Exception:
            return False
        return True

    side = 2 * max(1, min(height, width))
    while not works(side):
        side *= 2
        if side > limit:
            return None
    low = side // 2  # fails (or is the failing original size)
    while side - low > 1:
        middle = (low + side) // 2
        low, side = (low, middle) if works(middle) else (middle, side)
    return side


def check_probabilities(probs: torch.Tensor, estimator_name: str) -> None:
    """Refuse fused probabilities that are not finite rows summing to one.

    Non-finite expert logits (a diverged fit, inputs far outside the training range) make
    the fusion return NaN (or rows that do not sum to one); ``argmax`` would turn those
    into a plausible class, so the predict-like methods raise instead, as scikit-learn does
    for non-finite values.
    """
    if probs.numel() == 0:
        return
    bad = ~torch.isfinite(probs).all(dim=1) | (probs < 0).any(dim=1)
    bad |= (probs.sum(dim=1, dtype=torch.float64) - 1.0).abs() > _ROW_SUM_ATOL
    if not bool(bad.any()):
        return
    rows = torch.nonzero(bad).flatten()
    raise ValueError(
        f"{estimator_name}: the network's outputs are not finite for {len(rows)} of "
        f"{len(probs)} samples (first rows: {rows[:5].tolist()}), so they cannot be turned "
        "into probabilities or classes. Usually the fit diverged (fit warned with a "
        "ConvergenceWarning: lower lr, or scale X) or X holds values far outside the "
        "training range.")


def _shallow_state(estimator: Any) -> dict[str, Any]:
    return {key: copy.copy(value) if isinstance(value, (list, dict, set)) else value
            for key, value in vars(estimator).items()}


def _n_trained_batches(history: Sequence | None) -> int:
    if not history:
        return 0
    return sum(len(epoch.get("batches", ())) for epoch in history)


@contextlib.contextmanager
def rollback_on_error(estimator: Any) -> Iterator[None]:
    """Restore ``estimator``'s attributes when the body raises, unless training had
    already changed its network in place.

    Validation and initialisation build new objects (arrays, network, optimiser, history)
    rather than changing the old ones, so putting the old attribute values back leaves a
    fitted estimator exactly as it was. Only a warm start that continues training the
    same network and fails after its first training step keeps the failed state (the
    network's weights have changed; the error propagates all the same).
    """
    history = estimator.__dict__.get("history_")
    trained_before = _n_trained_batches(history)
    state = _shallow_state(estimator)
    try:
        yield
    except Exception:
        continued = estimator.__dict__.get("history_") is history and history is not None
        if not (continued and _n_trained_batches(history) > trained_before):
            estimator.__dict__.clear()
            estimator.__dict__.update(state)
        raise


def rolls_back_on_error(method: Callable) -> Callable:
    """Decorate an estimator method with :func:`rollback_on_error` (keeps its signature,
    which scikit-learn inspects, e.g. for ``sample_weight``)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with rollback_on_error(self):
            return method(self, *args, **kwargs)

    return wrapper
