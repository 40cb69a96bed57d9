"""ImageAugmentation: each transform does what it says, only on training batches."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from ltroute import LongTailClassifier
from ltroute.augmentation import ImageAugmentation, resolve_augmentation


def batch(n=6, c=2, h=5, w=7):
    X = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w) + 1
    return [(X[i], i) for i in range(n)], X


def test_all_off_is_plain_collation():
    items, X = batch()
    out, y = ImageAugmentation(crop_padding=0, flip=False, rotation=0)(items)
    assert_close(out, X)
    assert y.tolist() == list(range(6))


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    items, X = batch(n=40)
    out, _ = ImageAugmentation(crop_padding=2, flip=False)(items)
    padded = torch.nn.functional.pad(X, (2, 2, 2, 2))
    for i in range(40):
        windows = [padded[i, :, r:r + 5, s:s + 7] for r in range(5) for s in range(5)]
        assert any(torch.equal(out[i], win) for win in windows)
    assert not torch.equal(out, X)  # 40 samples: some offset differs from (2, 2)


def test_flip_mirrors_some_samples_and_keeps_the_others():
    items, X = batch(n=40)
    out, _ = ImageAugmentation(crop_padding=0, flip=True)(items)
    mirrored = [torch.equal(out[i], X[i].flip(-1)) for i in range(40)]
    kept = [torch.equal(out[i], X[i]) for i in range(40)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 0 < sum(mirrored) < 40


def test_small_rotation_keeps_the_centre_pixel():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    out = ImageAugmentation(crop_padding=0, flip=False, rotation=10).augment(image)
    assert out[0, 0, 4, 4] > 0.5
    assert out.shape == image.shape


def test_non_images_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageAugmentation()([(torch.zeros(4), 0), (torch.zeros(4), 1)])


def test_augmented_fit_is_reproducible_and_predict_is_not_augmented(mnist):
    idx = np.flatnonzero(np.isin(mnist.y_train, [0, 1]))[::8]
    X, y = mnist.X_train[idx], mnist.y_train[idx]
    params = {"max_epochs": 1, "random_state": 0,
              "iterator_train__collate_fn": ImageAugmentation(rotation=15)}
    a = LongTailClassifier(**params).fit(X, y)
    b = LongTailClassifier(**params).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_array_equal(a.predict_proba(X), a.predict_proba(X))
    plain = LongTailClassifier(max_epochs=1, random_state=0).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), plain.predict_proba(X))


# --------------------------------------------------- the estimators' parameter
def test_fill_pads_with_the_given_value_per_channel():
    X = torch.zeros(30, 2, 5, 5)
    fill = torch.tensor([0.7, -1.5])
    torch.manual_seed(0)
    out = ImageAugmentation(crop_padding=2, flip=True, rotation=20).augment(X, fill=fill)
    # Zero images padded and rotated in ``fill``: crop padding shows exactly ``fill``.
    assert torch.isclose(out, fill.view(1, 2, 1, 1).expand_as(out)).any()
    torch.manual_seed(0)
    shifted = ImageAugmentation(crop_padding=2, flip=True, rotation=20).augment(X - fill.view(
        1, 2, 1, 1)) + fill.view(1, 2, 1, 1)
    assert_close(out, shifted)


def test_resolve_augmentation_names_the_recipes():
    assert resolve_augmentation(None) is None
    cifar = resolve_augmentation("cifar")
    assert (cifar.crop_padding, cifar.flip, cifar.rotation) == (4, True, 0.0)
    assert resolve_augmentation("cifar_rotate").rotation == 15.0
    custom = ImageAugmentation(crop_padding=1)
    assert resolve_augmentation(custom) is custom
    with pytest.raises(ValueError, match="augmentation must be"):
        resolve_augmentation("mixup")


def test_augmentation_parameter_is_reproducible_and_only_trains(mnist):
    idx = np.flatnonzero(np.isin(mnist.y_train, [0, 1]))[::8]
    X, y = mnist.X_train[idx], mnist.y_train[idx]
    params = {"max_epochs": 1, "augmentation": "cifar_rotate"}
    a = LongTailClassifier(**params, random_state=0).fit(X, y)
    b = LongTailClassifier(**params, random_state=0).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_array_equal(a.predict_proba(X), a.predict_proba(X))  # not augmented
    other_seed = LongTailClassifier(**params, random_state=1).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), other_seed.predict_proba(X))
    plain = LongTailClassifier(max_epochs=1, random_state=0).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), plain.predict_proba(X))
    # The parameter and the collate_fn draw the same crops, flips and angles.
    collated = LongTailClassifier(max_epochs=1, random_state=0,
                                  iterator_train__collate_fn=ImageAugmentation(rotation=15))
    np.testing.assert_allclose(collated.fit(X, y).predict_proba(X), a.predict_proba(X),
                               atol=1e-5)


def test_augmentation_needs_images():
    X, y = np.random.RandomState(0).rand(20, 4), np.arange(20) % 2
    with pytest.raises(ValueError, match="needs images"):
        LongTailClassifier(max_epochs=1, augmentation="cifar").fit(X, y)
    with pytest.raises(ValueError, match="augmentation"):
        LongTailClassifier(max_epochs=1, augmentation="mixup").fit(X, y)
