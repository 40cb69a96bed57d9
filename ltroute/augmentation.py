"""Opt-in image augmentation for training batches, in plain PyTorch.

ltroute never augments by default: the CIFAR recipe's flips and rotations hurt digits
(see the RIDE spec's MNIST-LT measurements). To augment, give the estimators'
``augmentation`` parameter (``"cifar"``, ``"cifar_rotate"`` or an
:class:`ImageAugmentation`): every training batch is then augmented where it is trained,
on the training device, and prediction never is::

    clf = RIDEClassifier(augmentation="cifar_rotate")  # crop + flip + 15 degree rotation

An :class:`ImageAugmentation` also works as the training data loader's ``collate_fn``
(on the CPU, in the loader's processes; skorch routes ``iterator_train__*`` parameters to
the training loader only)::

    clf = RIDEClassifier(iterator_train__collate_fn=ImageAugmentation(rotation=15))

Randomness comes from torch's generator of the batch's device, which the estimators seed
from ``random_state`` during ``fit``: augmented fits stay reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

__all__ = ["AUGMENTATIONS", "ImageAugmentation", "resolve_augmentation"]


class ImageAugmentation:
    """Collate a batch of ``(image, label)`` pairs, then randomly crop, flip and rotate.

    The CIFAR recipe of LDAM-DRW and RIDE: zero-pad by ``crop_padding`` pixels and crop
    back to the original size at a random offset, flip horizontally with probability
    1/2, rotate by a uniform angle in ``[-rotation, rotation]`` degrees (RIDE adds 15°).

    Parameters
    ----------
    crop_padding : int, default=4
        Zero padding before the random crop; 0 disables cropping.
    flip : bool, default=True
        Random horizontal flips.
    rotation : float, default=0.0
        Largest rotation in degrees (bilinear, zeros outside); 0 disables rotation.

    Examples
    --------
    >>> import torch
    >>> augment = ImageAugmentation(crop_padding=0, flip=False)
    >>> x, y = augment([(torch.ones(3, 8, 8), 0), (torch.zeros(3, 8, 8), 1)])
    >>> x.shape, y.tolist()
    (torch.Size([2, 3, 8, 8]), [0, 1])
    """

    def __init__(self, crop_padding: int = 4, flip: bool = True, rotation: float = 0.0) -> None:
        self.crop_padding = crop_padding
        self.flip = flip
        self.rotation = rotation

    def __call__(self, batch: Sequence[Any]) -> Any:
        X, *rest = default_collate(batch)
        if X.ndim != 4:
            raise ValueError(f"ImageAugmentation needs image batches (N, C, H, W), got shape "
                             f"{tuple(X.shape)}.")
        X = self.augment(X.float())
        return (X, *rest)

    def augment(self, X: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Apply crop, flip and rotation to a batch (N, C, H, W).

        Random numbers are drawn on ``X``'s device (no transfer to or from the host), from
        torch's generator of that device.

        Parameters
        ----------
        X : Tensor of shape (N, C, H, W)
            The batch.
        fill : Tensor of shape (C,) or None, default=None
            Value of the pixels the crop's padding and the rotation bring in, per channel
            (on ``X``'s device); ``None``: zero. For normalised images, the normalised
            value of a zero pixel, ``-mean / std``, pads as the recipe pads before
            normalising.

        Returns
        -------
        Tensor of shape (N, C, H, W)
        """
        n, channels, height, width = X.shape
        device = X.device
        if fill is not None:
            fill = fill.to(dtype=X.dtype).view(1, channels, 1, 1)
            X = X - fill  # pad and rotate in zeros, i.e. ``fill`` once added back
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(X, (p, p, p, p))
            top = torch.randint(0, 2 * p + 1, (n,), device=device)
            left = torch.randint(0, 2 * p + 1, (n,), device=device)
            rows = (top[:, None] + torch.arange(height, device=device)[None, :])
            cols = (left[:, None] + torch.arange(width, device=device)[None, :])
            index = torch.arange(n, device=device)[:, None, None, None]
            X = padded[index, torch.arange(channels, device=device)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            flipped = torch.rand(n, device=device) < 0.5
            X = torch.where(flipped[:, None, None, None], X.flip(-1), X)
        if self.rotation > 0:
            angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(self.rotation)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                                 torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(X.shape), align_corners=False)
            X = F.grid_sample(X, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        return X if fill is None else X + fill

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_padding={self.crop_padding}, flip={self.flip}, "
                f"rotation={self.rotation})")


#: The named recipes of the estimators' ``augmentation`` parameter.
AUGMENTATIONS = {
    # LDAM-DRW's and RIDE's CIFAR recipe: pad 4, random 32x32 crop, horizontal flip.
    "cifar": {"crop_padding": 4, "flip": True, "rotation": 0.0},
    # RIDE's optional extra: a random rotation of up to 15 degrees.
    "cifar_rotate": {"crop_padding": 4, "flip": True, "rotation": 15.0},
}


def resolve_augmentation(augmentation: str | ImageAugmentation | None
                         ) -> ImageAugmentation | None:
    """The :class:`ImageAugmentation` an estimator's ``augmentation`` parameter names
    (``None`` for none)."""
    if augmentation is None or isinstance(augmentation, ImageAugmentation):
        return augmentation
    if isinstance(augmentation, str) and augmentation in AUGMENTATIONS:
        return ImageAugmentation(**AUGMENTATIONS[augmentation])
    raise ValueError(f"augmentation must be None, one of {sorted(AUGMENTATIONS)} or an "
                     f"ImageAugmentation; got {augmentation!r}.")
