"""A tiny CIFAR-10/100 in the official "python version" file format, for tests."""

import hashlib
import pickle

import numpy as np


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root, n_classes, n_train_per_class, n_test_per_class):
    """Tiny CIFAR in the format of the official python archives; returns its content."""
    rng = np.random.RandomState(42)
    y_train = rng.permutation(np.repeat(np.arange(n_classes), n_train_per_class))
    y_test = rng.permutation(np.repeat(np.arange(n_classes), n_test_per_class))
    X_train = rng.randint(0, 256, size=(y_train.size, 3072), dtype=np.uint8)
    X_test = rng.randint(0, 256, size=(y_test.size, 3072), dtype=np.uint8)
    names = [f"class_{c}" for c in range(n_classes)]
    if n_classes == 10:
        folder, label_key = root / "cifar-10-batches-py", "labels"
        batches = np.array_split(np.arange(y_train.size), 5)
        files = {f"data_batch_{i + 1}": b for i, b in enumerate(batches)}
        splits = [(name, X_train[b], y_train[b]) for name, b in files.items()]
        splits.append(("test_batch", X_test, y_test))
        meta = ("batches.meta", {"label_names": names, "num_cases_per_batch": 10000})
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        splits = [("train", X_train, y_train), ("test", X_test, y_test)]
        meta = ("meta", {"fine_label_names": names, "coarse_label_names": ["all"]})
    folder.mkdir(parents=True)
    for name, X, y in splits:
        entry = {
            "data": X,
            label_key: y.tolist(),
            "filenames": [f"{i}.png" for i in range(len(y))],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    checksums = {f"{folder.name}/{p.name}": md5(p) for p in folder.iterdir()}
    return dict(
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, names=names
    ), checksums


def write_cifar_folder(root, source, names=None, ext="png", zero_pad=True):
    """The arrays of :func:`write_cifar` as ``root/{train,test}/<class>/<n>.<ext>``,
    numbered per class in file order as the converter of the public JPEG copy does."""
    from PIL import Image

    n_classes = len(source["names"])
    names = names or source["names"]
    for split in ("train", "test"):
        X, y = source[f"X_{split}"], source[f"y_{split}"]
        rank = [0] * n_classes
        for image, label in zip(X.reshape(-1, 3, 32, 32), y, strict=True):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{rank[label]:04d}" if zero_pad else str(rank[label])
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{stem}.{ext}")
            rank[label] += 1
    return root
