"""Learning-rate schedules shared by ltroute's estimators."""

from __future__ import annotations

__all__ = ["StepWarmupSchedule", "default_drw_epoch"]


def default_drw_epoch(max_epochs: int) -> int:
    """The deferred re-weighting epoch of LDAM-DRW and RIDE scaled to ``max_epochs``: 80 %
    of the epochs (160 of 200), where the step schedule also drops the learning rate."""
    return int(0.8 * max_epochs)


class StepWarmupSchedule:
    """Learning-rate factor of the LDAM-DRW / RIDE CIFAR schedule, scaled to any length.

    For the 0-based epoch ``e`` of ``max_epochs``: a linear warm-up ``(e + 1) /
    warmup_epochs`` for the first ``warmup_epochs`` epochs, then 1, ``gamma`` from epoch
    ``int(0.8 * max_epochs)`` and ``gamma^2`` from ``int(0.9 * max_epochs)`` (200 epochs:
    drops after epochs 160 and 180, the first together with DRW), never in epoch 0. A
    ``lr_lambda`` for :class:`torch.optim.lr_scheduler.LambdaLR`.

    Parameters
    ----------
    max_epochs : int
        Length of training.
    warmup_epochs : int, default=5
        Epochs of linear warm-up (0: none).
    gamma : float, default=0.01
        Factor of each drop (LDAM-DRW and RIDE use 0.01 with SGD).

    Examples
    --------
    >>> from ltroute.schedules import StepWarmupSchedule
    >>> schedule = StepWarmupSchedule(10, warmup_epochs=0, gamma=0.1)
    >>> [round(schedule(e), 4) for e in (0, 7, 8, 9)]
    [1.0, 1.0, 0.1, 0.01]
    """

    def __init__(self, max_epochs: int, warmup_epochs: int = 5, gamma: float = 0.01) -> None:
        self.max_epochs = max_epochs
        self.warmup_epochs = warmup_epochs
        self.gamma = gamma

    def __call__(self, epoch: int) -> float:
        # max(1, .): a run of a single epoch (or a few) keeps the full rate in epoch 0.
        first, second = default_drw_epoch(self.max_epochs), int(0.9 * self.max_epochs)
        drops = sum(epoch >= max(1, step) for step in (first, second))
        warmup = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return self.gamma ** drops * warmup

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(max_epochs={self.max_epochs}, "
                f"warmup_epochs={self.warmup_epochs}, gamma={self.gamma})")
