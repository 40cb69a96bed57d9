"""Training recipes for fair comparisons: one optimiser, schedule and head for every method.

A :class:`Recipe` is the part of a fit that is not the method: optimiser, learning rate,
weight decay, warm-up, the step schedule's drops and the classifier head. Applied with
``estimator.set_params(**recipe.params(max_epochs))`` it replaces the method's own
choices (its registered configuration, ``ltroute/_registry.py``), so that a table of
methods trained under one recipe differs only in the methods.

``CANDIDATES`` are the recipes searched by ``benchmarks/recipe_search.py`` on a
validation split of each training set (never the test split); ``SHARED`` holds, per data
set, the candidate that search chose (the best mean validation accuracy over all
methods) and ``benchmarks/accuracy.py --recipe shared`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from skorch.callbacks import LRScheduler

from ltroute.schedules import StepWarmupSchedule

__all__ = ["CANDIDATES", "SHARED", "Recipe", "recipe_for"]


@dataclass(frozen=True)
class Recipe:
    """Optimiser, step schedule and head of a fit.

    Parameters
    ----------
    name : str
        Short name used in tables and on the command line.
    optimizer : type
        A ``torch.optim.Optimizer`` class.
    lr : float
        Peak learning rate.
    optimizer_params : dict
        Further optimiser arguments (momentum, weight decay, ...).
    warmup_epochs : int
        Linear warm-up epochs of :class:`~ltroute.schedules.StepWarmupSchedule`, whatever
        the run's length (as ``RIDEClassifier``: the papers' 5 of 200 epochs stay 5 in a
        30-epoch run; scaling them to 1 made SGD 0.1 unstable on MNIST-LT's validation
        split), at most the run's epochs.
    lr_decay : float
        Factor of each of the schedule's two drops (at 80 % and 90 % of the epochs).
    cosine_head : bool or None
        Cosine-similarity heads (scale ``head_scale``) for every method; ``None`` keeps
        each method's own head (LDAM and RIDE: cosine, the others: linear).
    """

    name: str
    optimizer: type
    lr: float
    optimizer_params: dict[str, Any] = field(default_factory=dict)
    warmup_epochs: int = 0
    lr_decay: float = 0.1
    cosine_head: bool | None = None

    def warmup(self, max_epochs: int) -> int:
        """Warm-up epochs of a run of ``max_epochs``."""
        return min(self.warmup_epochs, max_epochs)

    def params(self, max_epochs: int) -> dict[str, Any]:
        """Estimator parameters that impose this recipe on any ltroute estimator.

        The estimator's own schedule is switched off (``lr_schedule=None``) and this one
        runs as the callback named ``"lr_schedule"``; the estimators keep their DRW epoch
        at 80 % of the epochs, where the schedule's first drop is.
        """
        schedule = StepWarmupSchedule(max_epochs, warmup_epochs=self.warmup(max_epochs),
                                      gamma=self.lr_decay)
        params: dict[str, Any] = {
            "optimizer": self.optimizer,
            "lr": self.lr,
            **{f"optimizer__{key}": value for key, value in self.optimizer_params.items()},
            "lr_schedule": None,
            "callbacks": [("lr_schedule", LRScheduler(torch.optim.lr_scheduler.LambdaLR,
                                                      lr_lambda=schedule))],
        }
        if self.cosine_head is not None:
            params["cosine_head"] = self.cosine_head
        return params

    def describe(self, max_epochs: int) -> str:
        """One line for a table caption, e.g. ``SGD lr 0.1 (momentum 0.9, ...)``."""
        options = ", ".join(f"{key.replace('_', ' ')} {value:g}"
                            if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"
                            for key, value in self.optimizer_params.items())
        warmup = self.warmup(max_epochs)
        head = {None: "each method's own head", True: "cosine heads for every method",
                False: "linear heads for every method"}[self.cosine_head]
        return (f"{self.optimizer.__name__} lr {self.lr:g}" + (f" ({options})" if options else "")
                + f", {warmup} warm-up epoch(s), lr x{self.lr_decay:g} at {int(0.8 * max_epochs)}"
                f" and again at {int(0.9 * max_epochs)} of {max_epochs} epochs, {head}")


_SGD = {"momentum": 0.9, "weight_decay": 5e-4}
_ADAMW = {"weight_decay": 1e-2}
#: Recipes searched on each data set's validation split: the CIFAR-LT SGD recipe of
#: LDAM-DRW / RIDE (SGD 0.1, momentum 0.9, wd 5e-4, 5 warm-up epochs, x0.01 drops)
#: and the AdamW recipe of ``LongTailClassifier`` / ``DQRouteClassifier`` (AdamW 1e-3,
#: torch's weight decay 1e-2, x0.1 drops), each with every method's own head and with
#: cosine heads for all.
CANDIDATES: dict[str, Recipe] = {
    "sgd": Recipe("sgd", torch.optim.SGD, 0.1, _SGD, warmup_epochs=5, lr_decay=0.01),
    "sgd-cosine": Recipe("sgd-cosine", torch.optim.SGD, 0.1, _SGD, warmup_epochs=5,
                         lr_decay=0.01, cosine_head=True),
    "adamw": Recipe("adamw", torch.optim.AdamW, 1e-3, _ADAMW, lr_decay=0.1),
    "adamw-cosine": Recipe("adamw-cosine", torch.optim.AdamW, 1e-3, _ADAMW, lr_decay=0.1,
                           cosine_head=True),
}

#: The shared recipe of each data set, chosen by ``benchmarks/recipe_search.py`` (best mean
#: validation balanced accuracy over the methods; see ``results/recipe_search_*.md``).
SHARED: dict[str, str] = {
    "letter": "adamw",
    "mnist": "adamw",
    "digits": "adamw",
    # Not searched (a search costs hours of this CPU): the recipe every CIFAR-LT paper
    # compared here trains with (Cao et al. 2019; Menon et al. 2021; RIDE), crop + flip.
    "cifar10": "sgd",
}


def recipe_for(dataset: str) -> Recipe:
    """The shared recipe of ``dataset`` (a key of ``SHARED``)."""
    if dataset not in SHARED:
        raise ValueError(f"No shared recipe for {dataset!r}; expected one of {sorted(SHARED)}.")
    return CANDIDATES[SHARED[dataset]]
