"""
Long-tailed training from a folder of JPEG images
=================================================

Most people who need a long-tailed classifier have a folder of images. This example
starts from one, ``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` (the
layout of the public JPEG copy of CIFAR-10), makes the training split long-tailed
exactly as Cao et al. (2019) do for CIFAR-10-LT (imbalance ratio 100: 5,000 images of
class 0 down to 50 of class 9, 12,406 in all; the 10,000 test images stay balanced),
fits a :class:`~ltroute.LongTailClassifier` with the logit-adjusted loss on the small
ConvNet, prints the many / medium / few-shot report and plots every class's accuracy
against its training count. Seed ``RANDOM_STATE = 0``.

Run it on the CIFAR-10 copy (the default 10 epochs: about 5 minutes on one core of a
2-core server, ~30 s per epoch, plus ~20 s to decode the images)::

    python examples/image_folder.py /path/to/cifar10-jpeg

Figures measured on that copy are CIFAR-10 figures with a caveat (JPEG is lossy), so the
script prints "CIFAR-10 (JPEG copy)" beside them (``--label`` changes it). Set
``LTROUTE_EXAMPLE_EPOCHS`` to train for fewer epochs and ``LTROUTE_EXAMPLE_OUTPUT`` to
choose where the figure goes (default ``per_class_accuracy_image_folder.png``).
"""

# %%
# Data
# ----
# :func:`~ltroute.datasets.load_cifar_lt` reads the image folder (classes are the
# sorted class folders, files in numeric order), applies Cao et al.'s selection to the
# training files and decodes the images into float32 arrays ``(n, 3, H, W)`` in [0, 1].
from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))

import numpy as np  # noqa: E402

from ltroute import LongTailClassifier  # noqa: E402
from ltroute.augmentation import ImageAugmentation  # noqa: E402
from ltroute.datasets import load_cifar_lt  # noqa: E402
from ltroute.metrics import long_tail_report  # noqa: E402
from ltroute.plotting import plot_per_class_accuracy  # noqa: E402

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", "10"))
OUTPUT = os.environ.get("LTROUTE_EXAMPLE_OUTPUT", "per_class_accuracy_image_folder.png")


def load(root: str, imbalance_ratio: float):
    """The long-tailed split of the folder, normalised with training statistics."""
    n_classes = sum(entry.is_dir() for entry in (Path(root) / "train").iterdir())
    data = load_cifar_lt(root, n_classes=n_classes, imbalance_ratio=imbalance_ratio)
    # Per-channel normalisation with the mean and standard deviation of the training
    # images (the training fold only; the test split is scaled with the same numbers).
    mean = data.X_train.mean(axis=(0, 2, 3), keepdims=True)[0]
    std = data.X_train.std(axis=(0, 2, 3), keepdims=True)[0]
    data.X_train = (data.X_train - mean) / std
    data.X_test = (data.X_test - mean) / std
    return data


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Long-tailed fit on an image folder.")
    parser.add_argument("root", help="folder with train/<class>/*.jpg and test/<class>/*.jpg")
    parser.add_argument("--imbalance-ratio", type=float, default=100)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--label", default="CIFAR-10 (JPEG copy)",
                        help="name of the data printed beside every figure")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)

    data = load(args.root, args.imbalance_ratio)
    counts = list(data.class_counts.values())
    print(f"{args.label}: {len(data.y_train)} training images ({counts[0]} ... {counts[-1]} "
          f"per class, ratio {args.imbalance_ratio:g}), {len(data.y_test)} test images")

    # %%
    # A long-tailed fit
    # -----------------
    # The logit-adjusted loss (Menon et al. 2021) on the small ConvNet, with the CIFAR
    # augmentation (random crop with 4 pixels of padding, horizontal flip) applied to
    # each training batch; prediction is never augmented.
    clf = LongTailClassifier(
        loss="logit_adjusted", backbone="convnet", max_epochs=args.epochs, batch_size=128,
        iterator_train__collate_fn=ImageAugmentation(crop_padding=4, flip=True),
        random_state=RANDOM_STATE,
    )
    clf.fit(data.X_train, data.y_train)
    y_pred = clf.predict(data.X_test)

    # %%
    # Many / medium / few-shot report
    # -------------------------------
    # Groups by training count: many > 100, medium 20-100, few < 20 (on CIFAR-10-LT the
    # smallest class has 50 images, so "few" is empty).
    names = dict(enumerate(data.target_names))
    report = long_tail_report(data.y_test, y_pred, class_counts=data.class_counts)
    print(f"\nlogit-adjusted ConvNet, {args.epochs} epochs [{args.label}]\n{report}")

    # %%
    # Accuracy of every class against its training count
    # ---------------------------------------------------
    ax = plot_per_class_accuracy(data.y_test, {"logit-adjusted": y_pred},
                                 class_counts=data.class_counts)
    for label, count in data.class_counts.items():
        correct = np.mean(y_pred[data.y_test == label] == label)
        ax.annotate(names[label], (count, correct), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_title(f"Per-class accuracy, {args.label}, ratio {args.imbalance_ratio:g}")
    ax.figure.savefig(args.output, dpi=120, bbox_inches="tight")
    print(f"saved the plot to {args.output} [{args.label}]")
    return report


if __name__ == "__main__":
    main()
