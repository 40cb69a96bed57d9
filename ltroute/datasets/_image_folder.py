"""``ImageFolder``: a folder of class sub-folders of images, read lazily with Pillow."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IMG_EXTENSIONS", "ImageFolder"]

#: File endings read as images (torchvision's list), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """Images in ``root/<class>/<file>``, decoded one at a time when indexed.

    A map-style :class:`torch.utils.data.Dataset` with the attributes of torchvision's
    ``ImageFolder`` (``classes``, ``class_to_idx``, ``samples``, ``targets``), for users
    without torchvision. Building it lists the files only: ``targets`` is known without
    decoding any image, which is how ltroute's estimators count the classes. Indexing
    decodes one image into a float32 tensor ``(C, H, W)`` with values in ``[0, 1]``.

    Parameters
    ----------
    root : str or path-like
        Folder with one sub-folder per class; sub-folders are the class names, sorted.
        Files are found recursively inside each class folder.
    transform : callable or None, default=None
        Applied to the image tensor ``(C, H, W)`` in ``[0, 1]`` before it is returned
        (e.g. a resize for images of mixed sizes).
    extensions : sequence of str, default=IMG_EXTENSIONS
        File endings read as images (case-insensitive); other files are ignored.
    mode : str, default="RGB"
        Pillow mode every image is converted to: ``"RGB"`` gives 3 channels, ``"L"``
        (grayscale) 1 channel.

    Attributes
    ----------
    classes : list of str
        Class folder names, sorted.
    class_to_idx : dict of str to int
        Index of each class name in ``classes``.
    samples : list of (str, int)
        Path and class index of every image, sorted by class then path.
    targets : list of int
        Class index of every image (``samples[i][1]``).

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist or is not a folder.
    ValueError
        ``root`` holds no class folder, or no class folder holds an image file.

    See Also
    --------
    torchvision.datasets.ImageFolder : The same layout with PIL images and transforms.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from ltroute.datasets import ImageFolder
    >>> root = Path(tempfile.mkdtemp())
    >>> for name, n in [("cat", 2), ("dog", 1)]:
    ...     (root / name).mkdir()
    ...     for i in range(n):
    ...         Image.new("RGB", (4, 3), (255, 0, 0)).save(root / name / f"{i}.png")
    >>> data = ImageFolder(root)
    >>> data.classes, data.targets
    (['cat', 'dog'], [0, 0, 1])
    >>> image, label = data[2]
    >>> tuple(image.shape), image.dtype, label, image[0].max().item()
    ((3, 3, 4), torch.float32, 1, 1.0)
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, mode: str = "RGB") -> None:
        self.root = root
        self.transform = transform
        self.extensions = extensions
        self.mode = mode
        self.classes, self.class_to_idx = self.find_classes(root)
        self.samples = self.make_samples(root, self.class_to_idx, extensions)
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def find_classes(root: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """Sorted class folder names of ``root`` and their indices."""
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"ImageFolder root {str(root)!r} does not exist or is "
                                    "not a folder.")
        classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if not classes:
            raise ValueError(f"ImageFolder root {str(root)!r} holds no class folder; "
                             "expected root/<class>/<image files>.")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_samples(root: str | os.PathLike, class_to_idx: dict[str, int],
                     extensions: Sequence[str] = IMG_EXTENSIONS) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image file, sorted by class then path."""
        endings = tuple(ext.lower() for ext in extensions)
        samples = []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            folder = Path(root, name)
            files = sorted(str(p) for p in folder.rglob("*")
                           if p.suffix.lower() in endings and p.is_file())
            samples.extend((file, index) for file in files)
        if not samples:
            raise ValueError(f"ImageFolder root {str(root)!r} has class folders "
                             f"{list(class_to_idx)[:5]} but no image file in them (endings "
                             f"{', '.join(endings)}).")
        return samples

    def load(self, path: str) -> torch.Tensor:
        """Decode the image at ``path`` into a float32 tensor ``(C, H, W)`` in ``[0, 1]``."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert(self.mode))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"ImageFolder cannot read the image file {path!r}: "
                             f"{error}") from error
        if pixels.dtype != np.uint8:
            raise ValueError(f"ImageFolder reads 8-bit images; {path!r} converted to mode "
                             f"{self.mode!r} has pixels of type {pixels.dtype}.")
        tensor = torch.from_numpy(pixels.copy())
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return tensor.float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = self.load(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, "
                f"{len(self.classes)} classes)")
