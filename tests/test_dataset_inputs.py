"""Map-style datasets as inputs of fit / predict / predict_proba / score / route /
energies (ltroute._inputs), on tiny Pillow image folders the tests write."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from skorch.helper import SliceDataset
from torch.testing import assert_close
from torch.utils.data import Dataset, Subset

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.callbacks import FOLD_BATCHES_BYTES, FOLD_BATCHES_KEY
from ltroute.datasets import ImageFolder

COUNTS = {"cat": 12, "dog": 6, "emu": 3}


def write_folder(root, counts=COUNTS, size=8, odd=None, seed=0):
    """``root/<class>/<i>.png``: each class is bright in its own colour channel.
    ``odd=(class, i, size)`` writes that one image at another size."""
    rng = np.random.RandomState(seed)
    for channel, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            side = odd[2] if odd is not None and odd[:2] == (name, i) else size
            pixels = rng.randint(0, 60, size=(side, side, 3)).astype(np.uint8)
            pixels[..., channel % 3] += 180
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def as_arrays(dataset):
    X = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    return X, np.asarray(dataset.classes)[dataset.targets]


class Counting(Dataset):
    """A dataset counting how many items were loaded; ``targets`` optional."""

    def __init__(self, base, with_targets):
        self.base = base
        self.loads = 0
        if with_targets:
            self.targets = list(base.targets)
            self.classes = list(base.classes)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        self.loads += 1
        image, label = self.base[index]
        return image, self.base.classes[label] if not hasattr(self, "targets") else label


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def small(cls=LongTailClassifier, **params):
    return cls(**({"max_epochs": 4, "batch_size": 8, "lr": 3e-3, "random_state": 0}
                  | params))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ImageFolder(write_folder(tmp_path_factory.mktemp("folder")))


@pytest.mark.parametrize("cls", [LongTailClassifier, RIDEClassifier, DQRouteClassifier])
def test_dataset_fit_matches_the_array_fit(folder, cls):
    X, y = as_arrays(folder)
    from_dataset = small(cls).fit(folder)
    from_arrays = small(cls).fit(X, y)
    assert from_dataset.classes_.tolist() == ["cat", "dog", "emu"]
    assert from_dataset.class_counts_.tolist() == [12, 6, 3]
    assert from_dataset.input_shape_ == (3, 8, 8) and from_dataset.n_features_in_ == 3
    # Same seed, same batches: the same network, through either input path.
    assert_close(from_dataset.predict_proba(folder), from_arrays.predict_proba(X))
    assert_close(from_dataset.predict_proba(X), from_arrays.predict_proba(X))
    predictions = from_dataset.predict(folder)
    assert set(predictions) <= {"cat", "dog", "emu"}  # folder names
    np.testing.assert_array_equal(predictions, from_arrays.predict(X))
    assert from_dataset.score(folder) == pytest.approx(np.mean(predictions == y))
    assert from_dataset.score(folder, y) == from_dataset.score(folder)
    if hasattr(from_dataset, "route"):
        np.testing.assert_array_equal(from_dataset.route(folder), from_arrays.route(X))
    if hasattr(from_dataset, "energies"):
        assert_close(from_dataset.energies(folder), from_arrays.energies(X))


@pytest.mark.parametrize("params", [{}, {"max_epochs": 1, "lr": 1e-6}])
def test_convergence_check_judges_the_batches_the_recalibration_loaded(folder, monkeypatch,
                                                                      params):
    """After a short fit recalibrated by a pass over the fold (``last_epoch=False``) the
    convergence check reuses the recalibration's batches: no image is loaded again, and
    the verdict and the fitted model are those of a check that loads its own (kept
    batches switched off)."""
    runs = []
    params = params | {"callbacks__batchnorm_recalibration__last_epoch": False,
                       "callbacks__convergence_check__training_predictions": False}
    for cap in (FOLD_BATCHES_BYTES, 0):
        monkeypatch.setattr("ltroute.callbacks.FOLD_BATCHES_BYTES", cap)
        data = Counting(folder, with_targets=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = small(**params).fit(data)
        assert FOLD_BATCHES_KEY not in clf.__dict__  # nothing kept after fit
        runs.append((data.loads, [str(w.message) for w in caught
                                  if issubclass(w.category, ConvergenceWarning)], clf))
    (loads, warned, kept), (reloads, warned_again, reloaded) = runs
    epochs = kept.max_epochs
    assert 3 * epochs < 44  # 3 batches an epoch: the recalibration runs
    assert loads == 1 + epochs * len(folder) + len(folder)  # shape, epochs, recalibration
    assert loads < reloads <= loads + len(folder)  # the check's own pass
    assert warned == warned_again
    assert_close(kept.predict_proba(folder), reloaded.predict_proba(folder))


def test_a_short_fit_loads_no_image_after_its_epochs(folder):
    """By default a short fit's BatchNorm statistics are its last epoch's and a trained
    model is judged converged from that epoch's predictions: after the shape's image,
    only the epochs load images."""
    data = Counting(folder, with_targets=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = small(max_epochs=8).fit(data)
    assert sum(clf.history_[:, "train_batch_count"]) < 44  # a short fit
    assert data.loads == 1 + clf.max_epochs * len(folder)


def test_the_images_are_learned(folder):
    clf = small(max_epochs=25).fit(folder)
    assert clf.score(folder) > 0.9  # each class has its own bright channel


@pytest.mark.parametrize("with_targets", [True, False])
def test_labels_from_targets_without_decoding_else_one_pass(folder, with_targets):
    data = Counting(folder, with_targets)
    clf = small(max_epochs=0).fit(data)
    # The first item gives the image shape; without targets one pass gives the labels.
    assert data.loads == (1 if with_targets else 1 + len(folder))
    assert clf.classes_.tolist() == ["cat", "dog", "emu"]
    assert clf.class_counts_.tolist() == [12, 6, 3]


def test_sample_weight_with_a_dataset_matches_the_arrays(folder):
    X, y = as_arrays(folder)
    weights = np.arange(len(y)) % 3 + 1.0
    from_dataset = small().fit(folder, sample_weight=weights)
    from_arrays = small().fit(X, y, sample_weight=weights)
    assert_close(from_dataset.predict_proba(folder), from_arrays.predict_proba(X))
    assert not np.allclose(from_dataset.predict_proba(X), small().fit(X, y).predict_proba(X))


def test_subset_and_slice_dataset(folder):
    keep = np.r_[0:10, 12:17, 18:21]
    subset = Subset(folder, keep)
    clf = small(max_epochs=0).fit(subset)
    assert clf.class_counts_.tolist() == [10, 5, 3]
    X_slice, y_slice = SliceDataset(folder)[keep], SliceDataset(folder, idx=1)[keep]
    clf = small().fit(X_slice, y_slice)
    assert clf.class_counts_.tolist() == [10, 5, 3]
    assert clf.predict(X_slice).shape == (len(keep),)
    assert clf.score(X_slice) == clf.score(subset)


def test_y_must_agree_with_the_dataset(folder):
    names = np.asarray(folder.classes)[folder.targets]
    small(max_epochs=0).fit(folder, names)  # the names
    clf = small(max_epochs=0).fit(folder, folder.targets)  # or the class indices
    assert clf.classes_.tolist() == ["cat", "dog", "emu"]
    wrong = names.copy()
    wrong[3] = "dog"
    with pytest.raises(ValueError, match="y disagrees with the dataset's labels at 1 of 21"):
        small(max_epochs=0).fit(folder, wrong)
    with pytest.raises(ValueError, match="y has 20 labels but the dataset has 21"):
        small(max_epochs=0).fit(folder, names[:20])


def test_images_without_labels_need_y(folder):
    images = Items([folder[i][0] for i in range(len(folder))])
    with pytest.raises(ValueError, match="carry no label, so y is needed"):
        small(max_epochs=0).fit(images)
    clf = small(max_epochs=0).fit(images, np.asarray(folder.targets))
    assert clf.class_counts_.tolist() == [12, 6, 3]
    assert clf.predict(images).shape == (21,)


def test_worker_processes_load_the_same_batches(folder):
    X, _ = as_arrays(folder)
    plain = small().fit(folder)
    workers = small(iterator_train__num_workers=2, iterator_valid__num_workers=2).fit(folder)
    assert_close(workers.predict_proba(folder), plain.predict_proba(X))
    # Workers set for training only: the passes over the training fold inside fit
    # (BatchNorm recalibration, convergence check, "auto" statistics) load the same
    # batches (in workers when each has 4 batches to load, here in the main process).
    train_workers = small(iterator_train__num_workers=2, normalize="auto").fit(folder)
    assert_close(train_workers.predict_proba(folder),
                 small(normalize="auto").fit(folder).predict_proba(folder))
    # Persistent workers draw their seed once, so later epochs shuffle differently.
    persistent = small(max_epochs=25, iterator_train__num_workers=2,
                       iterator_train__persistent_workers=True).fit(folder)
    assert persistent.score(folder) > 0.9


def test_clone_and_refit_from_a_dataset(folder):
    clf = small().fit(folder)
    again = clone(clf).fit(folder)
    assert_close(again.predict_proba(folder), clf.predict_proba(folder))


image = torch.zeros(3, 8, 8)


@pytest.mark.parametrize("items, match", [
    ([(Image.new("RGB", (8, 8)), 0)] * 4, "holds a Image as its image.*ToTensor"),
    (["not an item"] * 4, "Item 0 of the dataset is a str"),
    ([(image,)] * 4, "of length 1; ltroute needs \\(image, label\\)"),
    ([(torch.zeros(8, 8), 0)] * 4, "shape \\(8, 8\\); ltroute needs \\(channels"),
    ([(image, 0), (image, torch.tensor([0, 1]))] * 2, "Item 1 .* label of shape \\(2,\\)"),
    ([(image, None)] * 4, "Item 0 .* label of type NoneType"),
    ([(image, "a")] * 4, "needs at least 2 classes; the dataset has 1 class"),
    ([], "The dataset is empty"),
])
def test_bad_datasets_get_a_clear_value_error(items, match):
    with pytest.raises(ValueError, match=match):
        small(max_epochs=1).fit(Items(items))


def test_mixed_image_sizes(tmp_path):
    data = ImageFolder(write_folder(tmp_path, {"a": 4, "b": 4}, odd=("b", 2, 9)))
    with pytest.raises(ValueError, match="Item 6 of the dataset has shape \\(3, 9, 9\\), but "
                                         "the first item has shape \\(3, 8, 8\\)"):
        small(max_epochs=1).fit(data)


def test_a_failed_fit_or_predict_leaves_the_fitted_estimator_as_it_was(folder, tmp_path):
    clf = small().fit(folder)
    before = clf.predict_proba(folder)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        clf.fit(Items([(image, "a")] * 4))
    other = ImageFolder(write_folder(tmp_path, {"a": 2, "b": 2}, size=6))
    with pytest.raises(ValueError, match="Item 0 .* shape \\(3, 6, 6\\), but "
                                         "LongTailClassifier was fitted on samples of shape "
                                         "\\(3, 8, 8\\)"):
        clf.predict(other)
    assert clf.classes_.tolist() == ["cat", "dog", "emu"]
    assert_close(clf.predict_proba(folder), before)


def test_score_needs_y_for_arrays(folder):
    X, _ = as_arrays(folder)
    clf = small(max_epochs=1).fit(folder)
    with pytest.raises(ValueError, match="needs y"):
        clf.score(X)


# ----------------------------------------------------------------- normalisation
def test_auto_normalisation_statistics_match_a_hand_computation(folder):
    X, y = as_arrays(folder)
    by_hand = [(np.mean(X[:, c].astype(np.float64)), np.sqrt(np.mean(
        (X[:, c].astype(np.float64) - np.mean(X[:, c].astype(np.float64))) ** 2)))
        for c in range(3)]
    mean, std = np.array(by_hand).T
    for data in ((X, y), (folder,)):
        clf = small(max_epochs=0, normalize="auto").fit(*data)
        np.testing.assert_allclose(clf.normalize_mean_, mean, rtol=1e-6)
        np.testing.assert_allclose(clf.normalize_std_, std, rtol=1e-6)
    features = np.c_[X.reshape(len(X), -1)[:, :5], np.full(len(X), 7.0)]  # last: constant
    clf = small(max_epochs=0, normalize="auto").fit(features, y)
    np.testing.assert_allclose(clf.normalize_mean_, features.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(clf.normalize_std_[:5], features[:, :5].std(axis=0), rtol=1e-5)
    assert clf.normalize_std_[5] == 1.0  # a constant feature is centred only
    assert small(max_epochs=0).fit(X, y).normalize_mean_ is None


@pytest.mark.parametrize("with_dataset", [False, True])
def test_normalisation_is_applied_in_fit_and_predict(folder, with_dataset):
    X, y = as_arrays(folder)
    mean, std = np.array([0.2, 0.4, 0.6]), np.array([0.5, 0.25, 2.0])
    normalised = ((X - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    clf = small(normalize=(mean, std)).fit(*((folder,) if with_dataset else (X, y)))
    by_hand = small().fit(normalised, y)
    assert_close(clf.predict_proba(folder if with_dataset else X),
                 by_hand.predict_proba(normalised))
    assert_close(clf.predict_proba(X), by_hand.predict_proba(normalised))


def test_normalised_augmented_dataset_fit_matches_the_array_fit(folder):
    X, y = as_arrays(folder)
    params = {"normalize": "auto", "augmentation": "cifar_rotate"}
    from_dataset = small(**params).fit(folder)
    from_arrays = small(**params).fit(X, y)
    assert_close(from_dataset.predict_proba(folder), from_arrays.predict_proba(X),
                 rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize, match", [
    (([0.1, 0.2], [1, 1, 1]), "sequences of 3 values"),
    ((0.5, 0.0), "std > 0"),
    ((np.nan, 1.0), "finite"),
    ("none", "normalize"),
])
def test_bad_normalisation(folder, normalize, match):
    with pytest.raises(ValueError, match=match):
        small(max_epochs=0, normalize=normalize).fit(folder)
