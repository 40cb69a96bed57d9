"""Opt-in image augmentation for training batches, in plain PyTorch.

ltroute never augments by default: the CIFAR recipe's flips and rotations hurt digits
(see the RIDE spec's MNIST-LT measurements). To augment, pass an
:class:`ImageAugmentation` as the training data loader's ``collate_fn``; skorch routes
``iterator_train__*`` parameters to the training loader only, so prediction is never
augmented::

    clf = RIDEClassifier(iterator_train__collate_fn=ImageAugmentation(rotation=15))

Randomness comes from torch's global generator, which the estimators seed from
``random_state`` during ``fit``: augmented fits stay reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

__all__ = ["ImageAugmentation"]


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

    def augment(self, X: torch.Tensor) -> torch.Tensor:
        """Apply crop, flip and rotation to a batch (N, C, H, W)."""
        n, _, height, width = X.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(X, (p, p, p, p))
            top = torch.randint(0, 2 * p + 1, (n,))
            left = torch.randint(0, 2 * p + 1, (n,))
            rows = (top[:, None] + torch.arange(height)[None, :])[:, None, :, None]
            cols = (left[:, None] + torch.arange(width)[None, :])[:, None, None, :]
            index = torch.arange(n)[:, None, None, None]
            X = padded[index, torch.arange(X.shape[1])[None, :, None, None], rows, cols]
        if self.flip:
            flipped = torch.rand(n) < 0.5
            X = torch.where(flipped[:, None, None, None], X.flip(-1), X)
        if self.rotation > 0:
            angle = (torch.rand(n) * 2 - 1) * math.radians(self.rotation)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                                 torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(X.shape), align_corners=False)
            X = F.grid_sample(X, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        return X

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_padding={self.crop_padding}, flip={self.flip}, "
                f"rotation={self.rotation})")
