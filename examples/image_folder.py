"""
Long-tailed training from a folder of JPEG images
=================================================

Most people who need a long-tailed classifier have a folder of images. This example
starts from one, ``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` (the
layout of the public JPEG copy of CIFAR-10), makes the training split long-tailed
exactly as Cao et al. (2019) do for CIFAR-10-LT (imbalance ratio 100: 5,000 images of
class 0 down to 50 of class 9, 12,406 in all; the 10,000 test images stay balanced),
fits a :class:`~ltroute.LongTailClassifier` with the logit-adjusted loss on the small
ConvNet straight from the lazy image-folder dataset (images are decoded batch by batch,
never all held in memory; normalisation statistics and the CIFAR augmentation are
estimator parameters), prints the many / medium / few-shot report and plots every class's accuracy
against its training count. Seed ``RANDOM_STATE = 0``.

Run it on the CIFAR-10 copy (the default 10 epochs; every epoch decodes its JPEGs
again, so add ``iterator_train__num_workers`` to decode in parallel on more cores)::

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
# sorted class folders, files in numeric order) and applies Cao et al.'s selection to
# the training files. With ``as_dataset=True`` it returns lazy datasets ``train`` and
# ``test`` whose items are ``(float32 tensor (3, H, W) in [0, 1], label)``: an image is
# decoded only when a batch needs it, and the labels are known without decoding.
from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))

import numpy as np  # noqa: E402

from ltroute import LongTailClassifier  # noqa: E402
from ltroute.datasets import load_cifar_lt  # noqa: E402
from ltroute.metrics import long_tail_report  # noqa: E402
from ltroute.plotting import plot_per_class_accuracy  # noqa: E402

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", "10"))
OUTPUT = os.environ.get("LTROUTE_EXAMPLE_OUTPUT", "per_class_accuracy_image_folder.png")


def load(root: str, imbalance_ratio: float):
    """The long-tailed split of the folder as lazy datasets (``data.train``, ``data.test``)."""
    n_classes = sum(entry.is_dir() for entry in (Path(root) / "train").iterdir())
    return load_cifar_lt(root, n_classes=n_classes, imbalance_ratio=imbalance_ratio,
                         as_dataset=True)


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
    # The logit-adjusted loss (Menon et al. 2021) on the small ConvNet, fitted on the
    # dataset itself. ``normalize="auto"`` computes the per-channel mean and standard
    # deviation of the training images in ``fit`` (stored as ``normalize_mean_`` and
    # ``normalize_std_`` and applied to the test images at prediction);
    # ``augmentation="cifar"`` applies the CIFAR recipe (random crop with 4 pixels of
    # padding, horizontal flip) to each training batch on the training device;
    # prediction is never augmented. The classes are the folder names, so ``predict``
    # returns folder names; the report below uses the label indices of ``load_cifar_lt``.
    clf = LongTailClassifier(
        loss="logit_adjusted", backbone="convnet", max_epochs=args.epochs, batch_size=128,
        normalize="auto", augmentation="cifar", random_state=RANDOM_STATE,
    )
    clf.fit(data.train)
    index = {str(name): label for label, name in enumerate(data.target_names)}
    y_pred = np.asarray([index[str(name)] for name in clf.predict(data.test)])

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
