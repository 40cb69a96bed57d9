"""Map-style datasets as estimator inputs: the one place that knows about them.

``fit`` and the predict-like methods of every ltroute estimator take either an array (as
before) or a map-style :class:`torch.utils.data.Dataset` whose items are ``(image,
label)`` pairs: :class:`ltroute.datasets.ImageFolder`, torchvision's ``ImageFolder``, a
:class:`~torch.utils.data.Subset` of one, or skorch's :class:`~skorch.helper.SliceDataset`
(the wrapper that lets scikit-learn's model selection index a dataset). This module
turns such a dataset into what skorch iterates, plus the facts the estimator needs:

- :func:`is_dataset_input`: whether ``X`` is a dataset rather than an array;
- :func:`dataset_labels`: the label of every item, from a ``targets`` attribute when the
  dataset has one (no image decoded) or from one pass over the items otherwise; integer
  targets become the dataset's ``classes`` names when it has them, so that ``predict``
  returns folder names;
- :class:`TrainingDataset`: the items as ``(float32 image, encoded label)`` (with
  ``fit``'s sample weights when given), checked one by one as they are loaded;
- :class:`InferenceDataset`: the images of a dataset for the predict-like methods,
  checked against the fitted sample shape and streamed batch by batch;
- :func:`channel_statistics`, :func:`dataset_channel_statistics`,
  :func:`check_normalization` and :func:`normalize_array`: the per-channel
  normalisation of the estimators' ``normalize`` parameter (applied by the two dataset
  wrappers to each item, and to whole arrays).

The wrappers are small picklable objects, so skorch's iterator parameters
(``iterator_train__num_workers``, ``pin_memory``, ``persistent_workers``, ...) load
them in worker processes as they would any dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from skorch.helper import SliceDataset
from torch.utils.data import Dataset, Subset

from ltroute._validation import SAMPLE_WEIGHT_KEY

__all__ = [
    "InferenceDataset",
    "TrainingDataset",
    "channel_statistics",
    "check_dataset_y",
    "check_normalization",
    "dataset_channel_statistics",
    "dataset_labels",
    "first_image_shape",
    "is_dataset_input",
    "normalize_array",
]

_X_KEY = "X"
#: The label of an item that is an image alone.
_NO_LABEL = object()


def is_dataset_input(X: Any) -> bool:
    """Whether ``X`` is a map-style dataset (or skorch's ``SliceDataset`` of one)."""
    return isinstance(X, (Dataset, SliceDataset))


def _n_items(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise TypeError(f"ltroute needs a map-style dataset with a length; "
                        f"{type(dataset).__name__} has no __len__ (iterable-style datasets "
                        "are not supported).") from None


def _slice_parts(dataset: SliceDataset) -> tuple[Any, np.ndarray]:
    return dataset.dataset, np.asarray(dataset.indices_)


def _item(dataset: Any, index: int) -> Any:
    """Item ``index`` of ``dataset``; a ``SliceDataset`` of images gives the whole
    ``(image, label)`` pair of the dataset it wraps."""
    if isinstance(dataset, SliceDataset) and dataset.idx == 0:
        parent, indices = _slice_parts(dataset)
        return parent[int(indices[index])]
    return dataset[index]


def _split_item(item: Any, index: int) -> tuple[Any, Any]:
    """``(image, label)`` of one item; the label is ``_NO_LABEL`` for an item that is
    an image alone."""
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            raise ValueError(f"Item {index} of the dataset is a {type(item).__name__} of "
                             f"length {len(item)}; ltroute needs (image, label) items.")
        return item[0], item[1]
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return item, _NO_LABEL
    raise ValueError(f"Item {index} of the dataset is a {type(item).__name__}; ltroute "
                     "needs (image, label) items whose image is a tensor.")


def _as_image(image: Any, index: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``image`` as a float32 tensor of shape (C, H, W) or (n_features,), else a
    ``ValueError`` naming the item and the problem."""
    if isinstance(image, np.ndarray) and image.dtype.kind in "biuf":
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        hint = (" Give the dataset a transform that returns a tensor (e.g. "
                "torchvision.transforms.ToTensor())."
                if type(image).__module__.startswith("PIL") else "")
        raise ValueError(f"Item {index} of the dataset holds a {type(image).__name__} as its "
                         f"image; ltroute needs a tensor of shape (C, H, W).{hint}")
    if image.ndim not in (1, 3):
        raise ValueError(f"Item {index} of the dataset holds an image of shape "
                         f"{tuple(image.shape)}; ltroute needs (channels, height, width) "
                         "images or 1-D feature vectors.")
    if image.is_complex() or image.dtype == torch.bool:
        raise ValueError(f"Item {index} of the dataset holds a {image.dtype} tensor; ltroute "
                         "needs real numbers.")
    if shape is not None and tuple(image.shape) != shape:
        raise ValueError(f"Item {index} of the dataset has shape {tuple(image.shape)}, but the "
                         f"first item has shape {shape}: every image must have the same "
                         "size (give the dataset a transform that resizes them).")
    return image.float()


def _label_value(label: Any, index: int) -> Any:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise ValueError(f"Item {index} of the dataset has a label of shape "
                             f"{tuple(label.shape)}; ltroute needs one class label per item.")
        return label.item()
    if isinstance(label, np.ndarray):
        if label.size != 1:
            raise ValueError(f"Item {index} of the dataset has a label of shape "
                             f"{label.shape}; ltroute needs one class label per item.")
        return label.item()
    if label is None or not isinstance(label, (str, int, np.integer, np.str_, bool,
                                               np.bool_, float, np.floating)):
        raise ValueError(f"Item {index} of the dataset has a label of type "
                         f"{type(label).__name__}; ltroute needs (image, label) items with "
                         "a class label (an int or a string).")
    return label


def _named(dataset: Any, labels: np.ndarray) -> np.ndarray:
    """Integer class indices as the dataset's ``classes`` names, when it has them."""
    names = getattr(dataset, "classes", None)
    if (names is None or isinstance(names, str) or not isinstance(names, Sequence)
            or labels.dtype.kind not in "iu" or len(names) == 0):
        return labels
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        return labels
    return np.asarray(list(names))[labels]


def _attribute_labels(dataset: Any) -> np.ndarray | None:
    """Labels known without loading any item (``targets``, through ``Subset`` and
    ``SliceDataset``), else ``None``."""
    if isinstance(dataset, SliceDataset):
        parent, indices = _slice_parts(dataset)
        labels = _attribute_labels(parent)
        return None if labels is None else labels[indices]
    if isinstance(dataset, Subset):
        labels = _attribute_labels(dataset.dataset)
        return None if labels is None else labels[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    labels = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if labels.ndim != 1 or len(labels) != _n_items(dataset):
        return None
    return _named(dataset, labels)


def dataset_labels(dataset: Any) -> np.ndarray | None:
    """The class label of every item of ``dataset``, or ``None`` when its items are
    images without labels (e.g. ``SliceDataset(data, idx=0)`` over an unlabelled dataset).

    Read from the ``targets`` attribute when the dataset (or the one a ``Subset`` or
    ``SliceDataset`` wraps) has one, without loading any item; otherwise from one pass
    over the items. Integer targets of a dataset with a ``classes`` list (torchvision's
    and ltroute's ``ImageFolder``) become the class names.
    """
    labels = _attribute_labels(dataset)
    if labels is not None:
        return labels
    if isinstance(dataset, SliceDataset) and dataset.idx != 0:
        return np.asarray([_label_value(dataset[i], i) for i in range(len(dataset))])
    values = []
    for index in range(_n_items(dataset)):
        label = _split_item(_item(dataset, index), index)[1]
        if label is _NO_LABEL:
            return None
        values.append(_label_value(label, index))
    return np.asarray(values)


def check_dataset_y(dataset: Any, y: Any, caller: str) -> np.ndarray:
    """The labels to train on: the dataset's, which a given ``y`` must agree with, or
    ``y`` alone when the items carry no label; errors name ``caller`` (e.g.
    ``"RIDEClassifier.fit"``)."""
    labels = dataset_labels(dataset)
    if y is None:
        if labels is None:
            raise ValueError(f"{caller}: the dataset's items carry no label, so "
                             "y is needed.")
        return labels
    given = dataset_labels(y) if isinstance(y, SliceDataset) else np.asarray(y)
    if given is None or given.ndim != 1:
        raise ValueError(f"{caller}: y must be 1-D (one label per item).")
    if len(given) != _n_items(dataset):
        raise ValueError(f"{caller}: y has {len(given)} labels but the dataset "
                         f"has {_n_items(dataset)} items.")
    if labels is None:
        return given
    if _agree(given, labels) or _agree(given, _raw_labels(dataset, labels)):
        return labels
    differ = np.flatnonzero(given.astype(str) != labels.astype(str))
    first = int(differ[0]) if len(differ) else 0
    raise ValueError(f"{caller}: y disagrees with the dataset's labels at "
                     f"{max(len(differ), 1)} of {len(labels)} items (first: item {first}, "
                     f"y={given[first]!r}, dataset={labels[first]!r}); leave y out (y=None) "
                     "to train on the dataset's labels.")


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "iufb" and b.dtype.kind in "iufb":
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(a.astype(str), b.astype(str)))


def _raw_labels(dataset: Any, labels: np.ndarray) -> np.ndarray:
    """Class indices behind class names (for a ``y`` of integer targets)."""
    names = getattr(_root(dataset), "classes", None)
    if names is None or labels.dtype.kind in "iufb":
        return labels
    index = {str(name): i for i, name in enumerate(names)}
    return np.asarray([index.get(str(label), -1) for label in labels])


def _root(dataset: Any) -> Any:
    while isinstance(dataset, (Subset, SliceDataset)):
        dataset = dataset.dataset
    return dataset


def first_image_shape(dataset: Any) -> tuple[int, ...]:
    """Shape of the first item's image, checked to be a tensor of shape (C, H, W) or
    (n_features,)."""
    if _n_items(dataset) == 0:
        raise ValueError("The dataset is empty: ltroute needs at least one item.")
    image = _split_item(_item(dataset, 0), 0)[0]
    return tuple(int(s) for s in _as_image(image, 0).shape)


# ------------------------------------------------------------------ normalisation
def _finish_statistics(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = np.sqrt(np.maximum(var, 0.0))
    std[std == 0] = 1.0  # a constant channel is centred, not divided by zero
    return mean.astype(np.float32), std.astype(np.float32)


def channel_statistics(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of images (N, C, H, W), or
    per-feature ones of a matrix (N, F), accumulated in float64; a constant channel gets
    a standard deviation of 1."""
    axes = (0, 2, 3) if X.ndim == 4 else (0,)
    mean = X.mean(axis=axes, dtype=np.float64)
    var = X.var(axis=axes, dtype=np.float64)
    return _finish_statistics(mean, var)


def dataset_channel_statistics(batches: Iterable[torch.Tensor]
                               ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`channel_statistics` over batches (N, C, H, W) or (N, F) of a dataset, in
    one pass (float64 sums of the values and of their squares after centring on the
    first batch's mean, which keeps the difference of squares accurate)."""
    count, shift, total, squares = 0, None, None, None
    for batch in batches:
        values = torch.as_tensor(batch).detach().to("cpu", torch.float64)
        values = values.transpose(0, 1).reshape(values.shape[1], -1)  # (C, everything)
        if shift is None:
            shift = values.mean(dim=1, keepdim=True)
            total = torch.zeros(values.shape[0], dtype=torch.float64)
            squares = torch.zeros_like(total)
        centred = values - shift
        total += centred.sum(dim=1)
        squares += centred.square().sum(dim=1)
        count += values.shape[1]
    if count == 0:
        raise ValueError("The dataset is empty: no statistics to normalise with.")
    mean = total / count
    var = squares / count - mean.square()
    return _finish_statistics((mean + shift[:, 0]).numpy(), var.numpy())


def check_normalization(normalize: Any, n_channels: int, estimator_name: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A given ``normalize=(mean, std)`` as float32 arrays of shape (n_channels,) (a
    scalar applies to every channel); a ``ValueError`` unless finite with std > 0."""
    try:
        mean, std = normalize
        values = [np.broadcast_to(np.asarray(v, dtype=np.float64), (n_channels,))
                  for v in (mean, std)]
    except (TypeError, ValueError):
        raise ValueError(f"{estimator_name}: normalize must be None, 'auto' or a pair "
                         f"(mean, std) of scalars or sequences of {n_channels} values (one "
                         f"per channel); got {normalize!r}.") from None
    mean, std = values
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"{estimator_name}: normalize=(mean, std) needs finite values and "
                         f"std > 0; got {normalize!r}.")
    return mean.astype(np.float32), std.astype(np.float32)


def normalize_array(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(X - mean) / std`` per channel of images (N, C, H, W) or feature of (N, F)."""
    shape = (1, -1, 1, 1) if X.ndim == 4 else (1, -1)
    return ((X - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32, copy=False)


def _normalizer(normalization: tuple[np.ndarray, np.ndarray] | None, ndim: int
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    if normalization is None:
        return None
    shape = (-1, 1, 1) if ndim == 3 else (-1,)
    return tuple(torch.as_tensor(v, dtype=torch.float32).reshape(shape)
                 for v in normalization)


class TrainingDataset(Dataset):
    """``(float32 image, encoded label)`` items of a user's dataset, for ``fit``.

    Parameters
    ----------
    dataset : Dataset or SliceDataset
        The user's dataset (items ``(image, label)`` or images alone).
    targets : ndarray of shape (n_items,)
        Encoded labels (int64); item ``i`` trains on ``targets[i]``.
    input_shape : tuple of int
        The shape every image must have.
    sample_weight : ndarray of shape (n_items,) or None
        ``fit``'s weights, carried beside the image as skorch carries them for arrays.
    normalization : (mean, std) or None
        Per-channel statistics each image is normalised with.
    """

    def __init__(self, dataset: Any, targets: np.ndarray, input_shape: tuple[int, ...],
                 sample_weight: np.ndarray | None = None,
                 normalization: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.dataset = dataset
        self.targets = np.asarray(targets, dtype=np.int64)
        self.input_shape = tuple(input_shape)
        self.sample_weight = sample_weight
        self.normalization = normalization
        self._normalizer = _normalizer(normalization, len(self.input_shape))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, np.int64]:
        image = _as_image(_split_item(_item(self.dataset, index), index)[0], index,
                          self.input_shape)
        if self._normalizer is not None:
            mean, std = self._normalizer
            image = (image - mean) / std
        if self.sample_weight is None:
            return image, self.targets[index]
        return ({_X_KEY: image, SAMPLE_WEIGHT_KEY: self.sample_weight[index]},
                self.targets[index])

    def without_sample_weight(self) -> TrainingDataset:
        """The same items without ``fit``'s weights."""
        return TrainingDataset(self.dataset, self.targets, self.input_shape,
                               normalization=self.normalization)


class InferenceDataset(Dataset):
    """The images of a user's dataset as ``(float32 image, 0)`` items, for the
    predict-like methods (skorch's inference loop unpacks ``(X, y)`` and ignores ``y``).

    Parameters
    ----------
    dataset : Dataset or SliceDataset
        The user's dataset (items ``(image, label)`` or images alone).
    input_shape : tuple of int
        The fitted sample shape every image must have.
    estimator_name : str
        Named in the error for images of another shape.
    normalization : (mean, std) or None
        Per-channel statistics each image is normalised with.
    """

    def __init__(self, dataset: Any, input_shape: tuple[int, ...], estimator_name: str,
                 normalization: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.dataset = dataset
        self.input_shape = tuple(input_shape)
        self.estimator_name = estimator_name
        self._normalizer = _normalizer(normalization, len(self.input_shape))

    def __len__(self) -> int:
        return _n_items(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _as_image(_split_item(_item(self.dataset, index), index)[0], index)
        if tuple(image.shape) != self.input_shape:
            raise ValueError(f"Item {index} of the dataset has shape {tuple(image.shape)}, but "
                             f"{self.estimator_name} was fitted on samples of shape "
                             f"{self.input_shape}.")
        if self._normalizer is not None:
            mean, std = self._normalizer
            image = (image - mean) / std
        return image, 0


# ------------------------------------------------------------- in-memory batches
class ArrayBatches(Dataset):
    """In-memory arrays indexed a whole batch at a time (``dataset[indices]``).

    skorch's default dataset returns one row per ``__getitem__`` and the loader collates
    them again, a Python call per sample; slicing the tensors by the batch's indices is
    what a hand-written loop does, and returns the same batches. Used with
    :func:`batch_loader` for arrays given to ``fit`` and the predict-like methods.
    """

    def __init__(self, X: Any, y: Any | None) -> None:
        self.X = _as_tensors(X)
        n = len(next(iter(self.X.values()))) if isinstance(self.X, dict) else len(self.X)
        self.y = torch.zeros(n, dtype=torch.int64) if y is None else _as_tensors(y)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, indices: Any) -> tuple[Any, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        if isinstance(self.X, dict):
            return {key: value[index] for key, value in self.X.items()}, self.y[index]
        return self.X[index], self.y[index]


def _as_tensors(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _as_tensors(value) for key, value in data.items()}
    if isinstance(data, torch.Tensor):
        return data
    return torch.from_numpy(np.ascontiguousarray(data))


def array_batches(dataset: Any) -> ArrayBatches | None:
    """An :class:`ArrayBatches` view of skorch's default dataset over numpy arrays or
    tensors (dicts of them included), or ``None`` for anything else."""
    from skorch.dataset import Dataset as SkorchDataset

    if type(dataset) is not SkorchDataset:
        return None
    parts = [dataset.X, dataset.y]
    flat = [v for part in parts if part is not None
            for v in (part.values() if isinstance(part, dict) else [part])]
    if not all(isinstance(v, (np.ndarray, torch.Tensor)) and v.dtype != object
               for v in flat):
        return None
    return ArrayBatches(dataset.X, dataset.y)


#: DataLoader arguments at their defaults: a loader with only these (and ``batch_size``,
#: ``shuffle``, ``drop_last``) over in-memory arrays loads in the main process, one
#: index per batch, which :class:`ArrayBatchIterator` does without the DataLoader.
_IN_PROCESS_DEFAULTS: dict[str, Any] = {
    "num_workers": 0, "pin_memory": False, "timeout": 0, "worker_init_fn": None,
    "prefetch_factor": None, "persistent_workers": False, "multiprocessing_context": None,
    "generator": None, "pin_memory_device": "", "in_order": True}


class ArrayBatchIterator:
    """Batches of an :class:`ArrayBatches`, exactly as ``DataLoader(dataset,
    batch_size=None, sampler=BatchSampler(RandomSampler or SequentialSampler))`` yields
    them in the main process, without the DataLoader.

    Each iteration draws from the global torch RNG what the DataLoader draws (the
    workers' base seed, then the shuffling seed of ``RandomSampler``), so the batches and
    every later random number are the same as the DataLoader's; the batch indices stay a
    tensor (``randperm(...).split``) instead of a list of Python ints. On a small network
    (~1 ms per step) the DataLoader's per-batch machinery was the largest cost of
    skorch's loop against a hand-written one.
    """

    num_workers = 0

    def __init__(self, dataset: ArrayBatches, batch_size: int, shuffle: bool,
                 drop_last: bool) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader's base seed
        n = len(self.dataset)
        if self.shuffle:  # RandomSampler's draws
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for index in order.split(self.batch_size):
            if self.drop_last and len(index) < self.batch_size:
                return
            yield self.dataset[index]


def batch_loader(iterator: type, dataset: ArrayBatches, batch_size: int, shuffle: bool,
                 drop_last: bool = False, **kwargs: Any) -> Any:
    """``iterator`` (a ``DataLoader``) drawing whole batches of ``dataset``: the same
    samplers (and random draws) as ``DataLoader(shuffle=..., drop_last=...)``; an
    :class:`ArrayBatchIterator` (the same batches) when ``iterator`` is ``DataLoader``
    itself and ``kwargs`` only repeat its defaults of loading in the main process."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    if iterator is DataLoader and all(
            key in _IN_PROCESS_DEFAULTS and value == _IN_PROCESS_DEFAULTS[key]
            for key, value in kwargs.items()):
        return ArrayBatchIterator(dataset, batch_size, shuffle, drop_last)
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return iterator(dataset, batch_size=None, sampler=batches, **kwargs)
