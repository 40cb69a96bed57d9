"""Tests for ``ltroute.datasets``: long-tailed counts, resampling and loaders."""

import hashlib
import tarfile
from decimal import ROUND_FLOOR, Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fixture import md5, write_cifar, write_cifar_folder
from PIL import Image
from sklearn.datasets import load_digits

from ltroute.datasets import (
    ImageFolder,
    load_cifar_lt,
    load_digits_lt,
    load_letter_lt,
    load_mnist_lt,
    long_tailed_counts,
    make_long_tailed,
    make_long_tailed_classification,
)

# CIFAR-100-LT, ratio 100 (docs/ride.md section 5, from LDAM-DRW / RIDE).
CIFAR100_LT_COUNTS = [
    500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237, 226,
    216, 206, 197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107, 102, 98,
    93, 89, 85, 81, 77, 74, 70, 67, 64, 61, 58, 56, 53, 51, 48, 46, 44, 42, 40, 38, 36, 35,
    33, 32, 30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 15, 14, 13, 13, 12,
    12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5,
]  # fmt: skip
# CIFAR-10-LT, ratio 100: 12,406 images (LDAM-DRW).
CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ----------------------------------------------------------------------------------------
# long_tailed_counts
# ----------------------------------------------------------------------------------------
def test_long_tailed_counts_cifar100():
    counts = long_tailed_counts(500, 100, imbalance_ratio=100)
    assert counts.dtype == np.int64
    assert counts.tolist() == CIFAR100_LT_COUNTS
    assert counts.sum() == 10_847
    many, few = counts > 100, counts < 20
    assert (many.sum(), (~many & ~few).sum(), few.sum()) == (35, 35, 30)


def test_long_tailed_counts_cifar10():
    counts = long_tailed_counts(5000, 10, imbalance_ratio=100)
    assert counts.tolist() == CIFAR10_LT_COUNTS
    assert counts.sum() == 12_406


def _exact_exponential(n_max, n_classes, ratio):
    """floor(n_max * ratio ** (-i / (C - 1))) in 60-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 60
        values = [
            Decimal(n_max) * Decimal(ratio) ** (Decimal(-i) / Decimal(n_classes - 1))
            for i in range(n_classes)
        ]
        # exact integers may come out 1e-58 low; nothing else is that close to one
        return [int((v + Decimal("1e-40")).to_integral_value(ROUND_FLOOR)) for v in values]


@pytest.mark.parametrize(
    "n_max, n_classes, ratio",
    [(500, 100, 100), (5000, 10, 50), (500, 100, 10), (625, 10, 100), (500, 26, 100),
     (120, 10, 100), (1000, 7, 10), (49, 2, 49), (98, 2, 49), (1280, 1000, 256),
     (300, 5, 2.5)],
)  # fmt: skip
def test_long_tailed_counts_exponential_matches_exact_maths(n_max, n_classes, ratio):
    counts = long_tailed_counts(n_max, n_classes, imbalance_ratio=ratio)
    assert counts.tolist() == _exact_exponential(n_max, n_classes, ratio)
    assert counts[0] == n_max
    assert np.all(np.diff(counts) <= 0)


@pytest.mark.parametrize(
    "n_max, n_classes, ratio, expected",
    [
        (100, 10, 10, [100] * 5 + [10] * 5),
        (100, 5, 10, [100] * 3 + [10] * 2),  # odd C: the head gets the extra class
        (500, 100, 100, [500] * 50 + [5] * 50),
        (7, 2, 2, [7, 3]),
        (49, 4, 49, [49, 49, 1, 1]),
    ],
)
def test_long_tailed_counts_step(n_max, n_classes, ratio, expected):
    counts = long_tailed_counts(n_max, n_classes, imbalance_ratio=ratio, profile="step")
    assert counts.tolist() == expected


@pytest.mark.parametrize("profile", ["exponential", "step"])
def test_long_tailed_counts_degenerate(profile):
    assert long_tailed_counts(37, 1, 100, profile).tolist() == [37]
    assert long_tailed_counts(37, 6, 1, profile).tolist() == [37] * 6
    # n_max == ratio: the tail keeps exactly one sample
    assert long_tailed_counts(100, 10, 100, profile)[-1] == 1


# ----------------------------------------------------------------------------------------
# make_long_tailed
# ----------------------------------------------------------------------------------------
SIZES = {0: 100, 1: 90, 2: 120, 3: 80, 4: 110}  # frequency order: 2, 4, 0, 1, 3


@pytest.fixture(scope="module")
def xy():
    """Row ids in column 0 of X, labels in random order."""
    y = np.repeat(list(SIZES), list(SIZES.values()))
    np.random.RandomState(0).shuffle(y)
    X = np.column_stack([np.arange(y.size), np.random.RandomState(1).normal(size=y.size)])
    return X, y


def _bincount(y, labels):
    return [int(np.sum(np.asarray(y) == label)) for label in labels]


def test_make_long_tailed_counts_follow_frequency_order(xy):
    X, y = xy
    X_res, y_res = make_long_tailed(X, y, imbalance_ratio=10, random_state=0)
    expected = long_tailed_counts(120, 5, 10)  # n_max defaults to the head class count
    assert _bincount(y_res, [2, 4, 0, 1, 3]) == expected.tolist()


def test_make_long_tailed_kept_rows_keep_their_order_and_labels(xy):
    X, y = xy
    X_res, y_res = make_long_tailed(X, y, imbalance_ratio=10, n_max=80, random_state=0)
    ids = X_res[:, 0].astype(int)
    assert np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(X_res, X[ids])
    np.testing.assert_array_equal(y_res, y[ids])


def test_make_long_tailed_ties_broken_by_sorted_label():
    y = np.repeat([3, 1, 2], 40)
    _, y_res = make_long_tailed(np.zeros((120, 2)), y, imbalance_ratio=4, random_state=0)
    assert _bincount(y_res, [1, 2, 3]) == [40, 20, 10]


def test_make_long_tailed_class_order_and_n_max_with_string_labels(xy):
    X, y = xy
    names = np.array(["zero", "one", "two", "three", "four"])[y]
    order = ["three", "one", "zero", "four", "two"]
    _, y_res = make_long_tailed(
        X, names, imbalance_ratio=20, n_max=80, class_order=order, random_state=0
    )
    assert _bincount(y_res, order) == long_tailed_counts(80, 5, 20).tolist()


def test_make_long_tailed_step_profile(xy):
    X, y = xy
    _, y_res = make_long_tailed(X, y, imbalance_ratio=8, profile="step", n_max=80, random_state=0)
    assert _bincount(y_res, [2, 4, 0, 1, 3]) == [80, 80, 80, 10, 10]


def test_make_long_tailed_random_state(xy):
    X, y = xy
    global_state = np.random.get_state()  # noqa: NPY002
    X1, y1 = make_long_tailed(X, y, imbalance_ratio=10, random_state=3)
    X2, y2 = make_long_tailed(X, y, imbalance_ratio=10, random_state=3)
    X3, _ = make_long_tailed(X, y, imbalance_ratio=10, random_state=4)
    X4, _ = make_long_tailed(X, y, imbalance_ratio=10, random_state=np.random.RandomState(3))
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(X1, X4)
    assert X1.shape == X3.shape and not np.array_equal(X1, X3)
    assert np.array_equal(np.random.get_state()[1], global_state[1])  # noqa: NPY002


def test_make_long_tailed_images(xy):
    _, y = xy
    X = np.broadcast_to(
        np.arange(y.size, dtype=np.float32)[:, None, None, None], (y.size, 3, 4, 4)
    )
    X_res, y_res = make_long_tailed(X, y, imbalance_ratio=10, random_state=0)
    assert X_res.shape[1:] == (3, 4, 4)
    ids = X_res[:, 0, 0, 0].astype(int)
    assert np.all(X_res == ids[:, None, None, None])
    np.testing.assert_array_equal(y_res, y[ids])
    assert _bincount(y_res, [2, 4, 0, 1, 3]) == long_tailed_counts(120, 5, 10).tolist()


def test_make_long_tailed_pandas(xy):
    pd = pytest.importorskip("pandas")
    X, y = xy
    index = pd.Index(1000 + np.arange(y.size), name="row")
    X_df = pd.DataFrame(X, columns=["id", "value"], index=index)
    y_s = pd.Series(y, index=index, name="label")
    X_res, y_res = make_long_tailed(X_df, y_s, imbalance_ratio=10, random_state=0)
    assert isinstance(X_res, pd.DataFrame) and isinstance(y_res, pd.Series)
    assert X_res.index.equals(y_res.index)
    assert (X_res.index - 1000 == X_res["id"].astype(int)).all()
    np.testing.assert_array_equal(
        X_res.to_numpy(), make_long_tailed(X, y, imbalance_ratio=10, random_state=0)[0]
    )


def test_make_long_tailed_error_names_every_short_class(xy):
    X, y = xy
    with pytest.raises(ValueError, match="Not enough samples") as info:
        make_long_tailed(X, y, imbalance_ratio=1, n_max=105)
    message = str(info.value)
    for label in (0, 1, 3):
        assert f"class {label} needs 105 but has {SIZES[label]}" in message
    for label in (2, 4):  # classes with enough samples are not named
        assert f"class {label} " not in message


# ----------------------------------------------------------------------------------------
# Bundled loaders
# ----------------------------------------------------------------------------------------
LOADERS = {
    "letter": dict(
        load=load_letter_lt, classes=[chr(c) for c in range(65, 91)], n_max=500, n_test=200,
        shape=(16,), n_train=2935, x_range=(0, 15), unique_rows=False,
    ),
    "mnist": dict(
        load=load_mnist_lt, classes=list(range(10)), n_max=625, n_test=267,
        shape=(1, 28, 28), n_train=1547, x_range=(0, 1), unique_rows=True,
    ),
    "digits": dict(
        load=load_digits_lt, classes=list(range(10)), n_max=120, n_test=50,
        shape=(64,), n_train=294, x_range=(0, 16), unique_rows=True,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(LOADERS))
def loaded(request):
    spec = LOADERS[request.param]
    return spec, spec["load"]()


def test_loader_shapes_and_dtypes(loaded):
    spec, data = loaded
    n_classes = len(spec["classes"])
    assert data.X_train.shape == (spec["n_train"], *spec["shape"])
    assert data.X_test.shape == (spec["n_test"] * n_classes, *spec["shape"])
    assert data.X_train.dtype == data.X_test.dtype == np.float32
    assert data.y_train.shape == (spec["n_train"],)
    assert data.y_test.shape == (spec["n_test"] * n_classes,)
    kind = "U" if isinstance(spec["classes"][0], str) else "i"
    assert data.y_train.dtype.kind == data.y_test.dtype.kind == kind
    assert data.classes.tolist() == spec["classes"]
    low, high = spec["x_range"]
    assert data.X_train.min() == low and data.X_train.max() == high
    assert "licen" in data.DESCR.lower() and "CC BY" in data.DESCR


def test_loader_train_counts_follow_profile_and_test_is_balanced(loaded):
    spec, data = loaded
    expected = long_tailed_counts(spec["n_max"], len(spec["classes"]), 100)
    assert _bincount(data.y_train, spec["classes"]) == expected.tolist()
    assert list(data.class_counts) == spec["classes"]
    assert list(data.class_counts.values()) == expected.tolist()
    assert _bincount(data.y_test, spec["classes"]) == [spec["n_test"]] * len(spec["classes"])


def test_loader_train_and_test_are_disjoint(loaded):
    spec, data = loaded
    train, test = data.train_indices, data.test_indices
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.intersect1d(train, test).size == 0
    if spec["unique_rows"]:  # no duplicate rows in the source: compare the data too
        hashes = [
            {hashlib.sha1(row.tobytes()).hexdigest() for row in X}
            for X in (data.X_train, data.X_test)
        ]
        assert len(hashes[0]) == len(train) and not hashes[0] & hashes[1]


def test_loader_indices_point_at_the_source_rows(loaded):
    spec, data = loaded
    # a second split: wherever both use a source row, they hold the same data and label
    other = spec["load"](random_state=1, imbalance_ratio=1, n_max=spec["n_max"])
    rows, labels = {}, {}
    for d in (data, other):
        for X, y, idx in (
            (d.X_train, d.y_train, d.train_indices),
            (d.X_test, d.y_test, d.test_indices),
        ):
            for x_row, label, i in zip(X, y, idx, strict=True):
                assert np.array_equal(rows.setdefault(i, x_row), x_row)
                assert labels.setdefault(i, label) == label
    assert len(rows) > len(data.train_indices) + len(data.test_indices)


def test_load_digits_lt_rows_match_sklearn():
    digits = load_digits()
    data = load_digits_lt()
    np.testing.assert_array_equal(data.X_train, digits.data[data.train_indices])
    np.testing.assert_array_equal(data.y_test, digits.target[data.test_indices])
    assert data.feature_names == digits.feature_names


def test_loader_determinism_and_seed(loaded):
    spec, data = loaded
    again = spec["load"]()
    for key in ("X_train", "y_train", "X_test", "y_test"):
        np.testing.assert_array_equal(data[key], again[key])
    other = spec["load"](random_state=1)
    assert not np.array_equal(data.train_indices, other.train_indices)
    assert not np.array_equal(data.test_indices, other.test_indices)


def test_loader_test_split_ignores_imbalance_and_train_is_nested(loaded):
    spec, data = loaded
    milder = spec["load"](imbalance_ratio=10)
    np.testing.assert_array_equal(milder.test_indices, data.test_indices)
    assert np.isin(data.train_indices, milder.train_indices).all()
    assert len(milder.train_indices) > len(data.train_indices)


def test_loader_class_order_and_profile(loaded):
    spec, _ = loaded
    order = spec["classes"][::-1]
    data = spec["load"](class_order=order, profile="step", imbalance_ratio=10)
    expected = long_tailed_counts(spec["n_max"], len(order), 10, "step")
    assert _bincount(data.y_train, order) == expected.tolist()
    assert data.class_counts[order[0]] == spec["n_max"]


def test_load_letter_lt_labels_and_features():
    data = load_letter_lt()
    assert data.class_counts["A"] == 500 and data.class_counts["Z"] == 5
    assert data.feature_names[:3] == ["x-box", "y-box", "width"] and len(data.feature_names) == 16
    np.testing.assert_array_equal(data.X_train, np.round(data.X_train))


def test_load_mnist_lt_matches_the_ride_spec_split():
    data = load_mnist_lt()
    assert (len(data.y_train), len(data.y_test)) == (1547, 2670)
    counts = np.array(list(data.class_counts.values()))
    assert (
        (counts > 100).sum(),
        ((counts >= 20) & (counts <= 100)).sum(),
        (counts < 20).sum(),
    ) == (4, 3, 3)


# ----------------------------------------------------------------------------------------
# load_cifar_lt on a self-written fixture in the official file format
# ----------------------------------------------------------------------------------------
def _ldam_reference(X, y, n_classes, imb_factor):
    """LDAM-DRW's IMBALANCECIFAR, written out with the global NumPy RNG as it does."""
    img_max = len(X) / n_classes
    counts = [int(img_max * imb_factor ** (c / (n_classes - 1.0))) for c in range(n_classes)]
    state = np.random.get_state()  # noqa: NPY002
    try:
        np.random.seed(0)  # noqa: NPY002 (the global RNG, as LDAM-DRW uses it)
        data, targets = [], []
        for the_class, n in zip(np.unique(y), counts, strict=True):
            idx = np.where(y == the_class)[0]
            np.random.shuffle(idx)  # noqa: NPY002 (the global RNG, as LDAM-DRW uses it)
            data.append(X[idx[:n]])
            targets.extend([the_class] * n)
    finally:
        np.random.set_state(state)  # noqa: NPY002 (the global RNG, as LDAM-DRW uses it)
    return np.vstack(data), np.array(targets), counts


@pytest.mark.parametrize(
    "n_classes, n_train, n_test, ratio",
    [(10, 100, 5, 100), (100, 10, 2, 10)],
)
def test_load_cifar_lt_reproduces_ldam_selection(
    tmp_path, monkeypatch, n_classes, n_train, n_test, ratio
):
    source, checksums = write_cifar(tmp_path, n_classes, n_train, n_test)
    # the fixture cannot match the official checksums: swap the private table
    monkeypatch.setattr("ltroute.datasets._cifar._MD5", checksums)
    global_state = np.random.get_state()  # noqa: NPY002
    data = load_cifar_lt(tmp_path, n_classes=n_classes, imbalance_ratio=ratio)
    assert np.array_equal(np.random.get_state()[1], global_state[1])  # noqa: NPY002

    X_ref, y_ref, counts = _ldam_reference(
        source["X_train"], source["y_train"], n_classes, 1 / ratio
    )
    assert counts == long_tailed_counts(n_train, n_classes, ratio).tolist()
    assert data.X_train.shape == (sum(counts), 3, 32, 32) and data.X_train.dtype == np.float32
    np.testing.assert_array_equal(data.X_train, X_ref.reshape(-1, 3, 32, 32) / np.float32(255))
    np.testing.assert_array_equal(data.y_train, y_ref)
    assert data.y_train.dtype == np.int64
    assert list(data.class_counts.values()) == counts
    np.testing.assert_array_equal(source["X_train"][data.train_indices], X_ref)
    # the test split is complete, balanced and in file order
    np.testing.assert_array_equal(
        data.X_test, source["X_test"].reshape(-1, 3, 32, 32) / np.float32(255)
    )
    np.testing.assert_array_equal(data.y_test, source["y_test"])
    assert data.target_names.tolist() == source["names"]
    assert data.classes.tolist() == list(range(n_classes))


def test_load_cifar_lt_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar_lt(tmp_path / "nowhere", n_classes=10)


def test_load_cifar_lt_checks_official_checksums(tmp_path):
    write_cifar(tmp_path, 10, 20, 2)
    with pytest.raises(RuntimeError, match="MD5.*download=True"):
        load_cifar_lt(tmp_path, n_classes=10)


def test_load_cifar_lt_corrupted_file(tmp_path, monkeypatch):
    _, checksums = write_cifar(tmp_path, 100, 10, 2)
    monkeypatch.setattr("ltroute.datasets._cifar._MD5", checksums)
    path = tmp_path / "cifar-100-python" / "test"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match=r"cifar-100-python/test failed the MD5.*download=True"):
        load_cifar_lt(tmp_path, n_classes=100, imbalance_ratio=10)


def test_load_cifar_lt_download(tmp_path, monkeypatch):
    source, checksums = write_cifar(tmp_path / "src", 10, 20, 2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    checksums["cifar-10-python.tar.gz"] = md5(archive)
    monkeypatch.setattr("ltroute.datasets._cifar._MD5", checksums)
    monkeypatch.setattr("ltroute.datasets._cifar._URLS", {10: archive.as_uri()})
    monkeypatch.setattr("ltroute.datasets._cifar._torchvision_downloader", lambda: None)

    root = tmp_path / "root"
    data = load_cifar_lt(root, n_classes=10, imbalance_ratio=10, download=True)
    assert (root / "cifar-10-batches-py" / "batches.meta").is_file()
    assert list(data.class_counts.values()) == long_tailed_counts(20, 10, 10).tolist()
    # valid files are not downloaded again
    monkeypatch.setattr("ltroute.datasets._cifar._URLS", {10: (tmp_path / "gone.tar.gz").as_uri()})
    again = load_cifar_lt(root, n_classes=10, imbalance_ratio=10, download=True)
    np.testing.assert_array_equal(again.X_train, data.X_train)


# ----------------------------------------------------------------------------------------
# Argument validation of every public function
# ----------------------------------------------------------------------------------------
_X, _Y = np.zeros((60, 2)), np.repeat([0, 1, 2], 20)


def _call_make_long_tailed(**kwargs):
    kwargs = {"X": _X, "y": _Y, "imbalance_ratio": 2, **kwargs}
    return make_long_tailed(kwargs.pop("X"), kwargs.pop("y"), **kwargs)


def _call_counts(**kwargs):
    kwargs = {"n_max": 100, "n_classes": 10, **kwargs}
    return long_tailed_counts(**kwargs)


@pytest.mark.parametrize(
    "func, kwargs, error, match",
    [
        (_call_counts, dict(n_max=0), ValueError, "n_max"),
        (_call_counts, dict(n_max=2.5), TypeError, "n_max"),
        (_call_counts, dict(n_classes=0), ValueError, "n_classes"),
        (_call_counts, dict(imbalance_ratio=0.5), ValueError, "imbalance_ratio"),
        (_call_counts, dict(imbalance_ratio=float("nan")), ValueError, "imbalance_ratio"),
        (_call_counts, dict(imbalance_ratio=float("inf")), ValueError, "imbalance_ratio"),
        (_call_counts, dict(imbalance_ratio="10"), TypeError, "imbalance_ratio"),
        (_call_counts, dict(profile="linear"), ValueError, "profile"),
        (_call_counts, dict(n_max=10, imbalance_ratio=100), ValueError,
         "increase n_max to at least 100 or lower imbalance_ratio to at most 10"),
        (_call_counts, dict(n_max=10, imbalance_ratio=100, profile="step"), ValueError,
         "increase n_max"),
        (_call_make_long_tailed, dict(y=_Y[:-1]), ValueError, "inconsistent numbers of samples"),
        (_call_make_long_tailed, dict(y=_Y[:, None]), ValueError, "1-D"),
        (_call_make_long_tailed, dict(y=np.linspace(0, 1, 60)), ValueError, "Unknown label type"),
        (_call_make_long_tailed, dict(class_order=[0, 1]), ValueError, "permutation"),
        (_call_make_long_tailed, dict(class_order=[0, 1, 1]), ValueError, "permutation"),
        (_call_make_long_tailed, dict(class_order=[0, 1, 2, 3]), ValueError, "permutation"),
        (_call_make_long_tailed, dict(class_order=["0", "1", "2"]), ValueError, "permutation"),
        (_call_make_long_tailed, dict(class_order=[[0, 1, 2]]), ValueError, "1-D"),
        (_call_make_long_tailed, dict(n_max=21), ValueError, "class 0 needs 21 but has 20"),
        (_call_make_long_tailed, dict(n_max=0), ValueError, "n_max"),
        (_call_make_long_tailed, dict(imbalance_ratio=0), ValueError, "imbalance_ratio"),
        (_call_make_long_tailed, dict(profile="Step"), ValueError, "profile"),
        (_call_make_long_tailed, dict(imbalance_ratio=100), ValueError, "increase n_max"),
        (load_letter_lt, dict(n_test_per_class=0), ValueError, "n_test_per_class"),
        (load_letter_lt, dict(n_max=600), ValueError,
         r"class 'A' needs 800 but has 789.*n_test_per_class"),
        (load_letter_lt, dict(class_order=list("ABC")), ValueError, "permutation"),
        (load_mnist_lt, dict(imbalance_ratio=0.5), ValueError, "imbalance_ratio"),
        (load_mnist_lt, dict(n_max=714), ValueError, "class 0 needs 981 but has 980"),
        (load_digits_lt, dict(profile="linear"), ValueError, "profile"),
        (load_digits_lt, dict(n_max=50), ValueError, "increase n_max"),
        (load_cifar_lt, dict(root=".", n_classes=20), ValueError, "n_classes must be 10 or 100"),
        (load_cifar_lt, dict(root=".", n_classes=10.0), ValueError, "n_classes"),
        (load_cifar_lt, dict(root=".", imbalance_ratio=0), ValueError, "imbalance_ratio"),
        (load_cifar_lt, dict(root=".", profile="linear"), ValueError, "profile"),
    ],
)  # fmt: skip
def test_public_function_validation(func, kwargs, error, match):
    with pytest.raises(error, match=match):
        func(**kwargs)


def test_make_long_tailed_classification_follows_the_profile_and_is_seeded():
    X, y = make_long_tailed_classification(20000, n_features=8, n_informative=4, n_classes=5,
                                           imbalance_ratio=10, random_state=3)
    assert X.shape == (20000, 8) and X.dtype == np.float32
    share = np.bincount(y, minlength=5) / len(y)
    expected = long_tailed_counts(1000, 5, 10) / long_tailed_counts(1000, 5, 10).sum()
    np.testing.assert_allclose(share, expected, atol=0.02)
    X2, y2 = make_long_tailed_classification(20000, n_features=8, n_informative=4,
                                             n_classes=5, imbalance_ratio=10, random_state=3)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)


# ----------------------------------------------------------------------------------------
# load_cifar_lt from an image-folder copy (root/train/<class>/<n>.png, root/test/...)
# ----------------------------------------------------------------------------------------
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def _by_class(X, y):
    """Images of a split grouped class by class, file order kept within a class."""
    order = np.argsort(y, kind="stable")
    return X[order], y[order]


@pytest.mark.parametrize(
    "n_classes, n_train, n_test, ratio, names, zero_pad",
    # The official names are alphabetical; files 0 .. 11 unpadded: "10" after "9".
    [(10, 12, 2, 10, CIFAR10_NAMES, False),
     # Class folders named by number: "10" after "9" too.
     (100, 3, 1, 3, [str(c) for c in range(100)], True)],
)
def test_load_cifar_lt_from_an_image_folder_selects_as_ldam(
    tmp_path, monkeypatch, n_classes, n_train, n_test, ratio, names, zero_pad
):
    """The same images, labels and counts as from the official files (PNG: lossless)."""
    source, checksums = write_cifar(tmp_path / "official", n_classes, n_train, n_test)
    monkeypatch.setattr("ltroute.datasets._cifar._MD5", checksums)
    official = load_cifar_lt(tmp_path / "official", n_classes=n_classes, imbalance_ratio=ratio)
    folder = write_cifar_folder(tmp_path / "folder", source, names, zero_pad=zero_pad)
    data = load_cifar_lt(folder, n_classes=n_classes, imbalance_ratio=ratio)

    X_ref, y_ref, counts = _ldam_reference(source["X_train"], source["y_train"], n_classes,
                                           1 / ratio)
    np.testing.assert_array_equal(data.X_train, X_ref.reshape(-1, 3, 32, 32) / np.float32(255))
    np.testing.assert_array_equal(data.X_train, official.X_train)
    np.testing.assert_array_equal(data.y_train, official.y_train)
    assert data.class_counts == official.class_counts and list(data.class_counts.values()) \
        == counts
    assert data.target_names.tolist() == names
    # Test split: complete, class by class.
    X_test, y_test = _by_class(official.X_test, official.y_test)
    np.testing.assert_array_equal(data.X_test, X_test)
    np.testing.assert_array_equal(data.y_test, y_test)
    # train_indices / train_files: positions among the folder's files (class, number).
    for index, path, label in zip(data.train_indices, data.train_files, data.y_train,
                                  strict=True):
        assert Path(path).parent.name == names[label]
        assert int(Path(path).stem) == index - n_train * label


def test_load_cifar_lt_image_folder_as_lazy_datasets(tmp_path, monkeypatch):
    source, _ = write_cifar(tmp_path / "official", 10, 12, 2)
    folder = write_cifar_folder(tmp_path / "folder", source, CIFAR10_NAMES)
    arrays = load_cifar_lt(folder, n_classes=10, imbalance_ratio=10)

    def no_decoding(self, path):
        raise AssertionError(f"decoded {path}")

    with monkeypatch.context() as patch:  # building the split lists files only
        patch.setattr(ImageFolder, "load", no_decoding)
        data = load_cifar_lt(folder, n_classes=10, imbalance_ratio=10, as_dataset=True)
        assert "X_train" not in data and "X_test" not in data
        assert isinstance(data.train, ImageFolder) and isinstance(data.test, ImageFolder)
        assert data.train.targets == arrays.y_train.tolist()
        assert data.test.targets == arrays.y_test.tolist()
        assert data.train.classes == CIFAR10_NAMES
        np.testing.assert_array_equal(data.y_train, arrays.y_train)
    assert len(data.train) == len(arrays.y_train) == sum(data.class_counts.values())
    for index in (0, 5, len(data.train) - 1):
        image, label = data.train[index]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        np.testing.assert_array_equal(image.numpy(), arrays.X_train[index])
        assert label == arrays.y_train[index]
    image, label = data.test[7]
    np.testing.assert_array_equal(image.numpy(), arrays.X_test[7])


def test_load_cifar_lt_reads_a_jpeg_folder(tmp_path):
    source, _ = write_cifar(tmp_path / "official", 10, 12, 2)
    folder = write_cifar_folder(tmp_path / "folder", source, CIFAR10_NAMES, ext="jpg")
    data = load_cifar_lt(folder, n_classes=10, imbalance_ratio=10)
    assert data.X_train.shape == (sum(data.class_counts.values()), 3, 32, 32)
    assert data.X_train.dtype == np.float32 and 0 <= data.X_train.min() <= data.X_train.max() <= 1
    assert data.X_test.shape == (20, 3, 32, 32)


def test_load_cifar_lt_image_folder_errors(tmp_path):
    source, _ = write_cifar(tmp_path / "official", 10, 12, 2)
    folder = write_cifar_folder(tmp_path / "folder", source, CIFAR10_NAMES)
    with pytest.raises(ValueError, match="holds 10 class folders, but n_classes=100"):
        load_cifar_lt(folder, n_classes=100, imbalance_ratio=10)
    with pytest.raises(ValueError, match="is an image folder.*download=True"):
        load_cifar_lt(folder, n_classes=10, imbalance_ratio=10, download=True)
    with pytest.raises(ValueError, match="as_dataset=True needs an image-folder copy"):
        load_cifar_lt(tmp_path / "official", n_classes=10, as_dataset=True)
    Image.new("RGB", (16, 16)).save(folder / "test" / "cat" / "9999.png")
    with pytest.raises(ValueError, match="different sizes"):
        load_cifar_lt(folder, n_classes=10, imbalance_ratio=10)
    (folder / "test" / "cat" / "9999.png").unlink()
    (folder / "test" / "unicorn").mkdir()
    Image.new("RGB", (32, 32)).save(folder / "test" / "unicorn" / "0.png")
    with pytest.raises(ValueError, match="class folders of .* differ|holds 11 class folders"):
        load_cifar_lt(folder, n_classes=10, imbalance_ratio=10)
