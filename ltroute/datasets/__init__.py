"""Long-tailed data sets: counts, resampling, bundled loaders and CIFAR-LT.

- :func:`long_tailed_counts` -- class counts of an exponential or step long tail.
- :func:`make_long_tailed` -- undersample any labelled data set to a long tail.
- :func:`make_long_tailed_classification` -- synthetic long-tailed features of any size.
- :func:`load_letter_lt`, :func:`load_mnist_lt`, :func:`load_digits_lt` -- small real
  data sets shipped with ltroute (or scikit-learn), split into a long-tailed training
  set and a balanced, disjoint test set.
- :func:`load_cifar_lt` -- CIFAR-10-LT / CIFAR-100-LT exactly as LDAM-DRW and RIDE
  build them, from the official files or an image-folder copy (arrays or lazy datasets).
- :class:`ImageFolder` -- a ``root/<class>/<image>`` folder as a lazy torch Dataset
  (Pillow; torchvision's ``ImageFolder`` attributes, tensors in ``[0, 1]``).
"""

from ltroute.datasets._bundled import load_digits_lt, load_letter_lt, load_mnist_lt
from ltroute.datasets._cifar import load_cifar_lt
from ltroute.datasets._image_folder import ImageFolder
from ltroute.datasets._long_tailed import (
    long_tailed_counts,
    make_long_tailed,
    make_long_tailed_classification,
)

__all__ = [
    "ImageFolder",
    "load_cifar_lt",
    "load_digits_lt",
    "load_letter_lt",
    "load_mnist_lt",
    "long_tailed_counts",
    "make_long_tailed",
    "make_long_tailed_classification",
]
