"""Named, ready-to-fit configurations of every method, for the CLI and the benchmarks.

Each entry maps a method name to a factory taking the number of epochs, the seed, the
device and extra callbacks; schedule-dependent settings (the DRW epoch at 80 % of
training, as LDAM-DRW's 160 of 200) are derived here, in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ltroute._base import LongTailNet
from ltroute.baseline import LongTailClassifier

__all__ = ["DEFAULT_METHODS", "METHODS", "make_estimator"]


def _drw_epoch(max_epochs: int) -> int:
    return int(0.8 * max_epochs)


def _baseline(loss: str, deferred_reweighting: bool = False) -> Callable[..., LongTailNet]:
    def factory(max_epochs: int, **kwargs: Any) -> LongTailNet:
        drw = _drw_epoch(max_epochs) if deferred_reweighting else None
        return LongTailClassifier(loss=loss, drw_epoch=drw, max_epochs=max_epochs, **kwargs)

    return factory


METHODS: dict[str, Callable[..., LongTailNet]] = {
    "ce": _baseline("ce"),
    "focal": _baseline("focal"),
    "ldam-drw": _baseline("ldam", deferred_reweighting=True),
    "logit-adjusted": _baseline("logit_adjusted"),
    "balanced-softmax": _baseline("balanced_softmax"),
}

#: Methods ``python -m ltroute`` runs when none is named.
DEFAULT_METHODS = ["ce", "logit-adjusted"]


def make_estimator(method: str, *, max_epochs: int, random_state: int | None = 0,
                   device: str = "auto", callbacks: list | None = None) -> LongTailNet:
    """Build the estimator registered as ``method``.

    Parameters
    ----------
    method : str
        A key of ``METHODS``.
    max_epochs : int
        Training epochs (schedules such as DRW are placed relative to it).
    random_state : int or None, default=0
        Seed of the fit.
    device : str, default="auto"
        Torch device.
    callbacks : list or None, default=None
        Extra skorch callbacks.

    Returns
    -------
    LongTailNet
        An unfitted estimator.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    return METHODS[method](max_epochs=max_epochs, random_state=random_state, device=device,
                           callbacks=callbacks)
