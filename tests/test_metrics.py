"""Tests for ltroute.metrics: shot groups, group accuracy, the report and the scorers."""

import doctest
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError, UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import ltroute.metrics
from ltroute.metrics import (
    EmptyGroupWarning,
    few_shot_accuracy,
    few_shot_scorer,
    group_accuracy,
    long_tail_report,
    make_shot_scorer,
    many_shot_accuracy,
    many_shot_scorer,
    medium_shot_accuracy,
    medium_shot_scorer,
    shot_groups,
)

# --------------------------------------------------------------------------------------
# A hand-computed example.
#
# Training counts sit on the default thresholds: 101 is many, 100 and 20 are medium,
# 19 is few. "fly" never occurs in y_true but is predicted once.
#
#   class  n_train  group   y_true  correct  recall   predicted  precision
#   ant    101      many    4       3        3/4      5          3/5
#   bee    100      medium  2       1        1/2      2          1/2
#   cow    20       medium  2       2        1        2          1
#   doe    19       few     2       0        0        0          nan
#   elk    5        few     1       1        1        1          1
#   fly    3        few     0       -        -        1          -
#
#   many = 3/4; medium = (1/2 + 1) / 2 = 3/4; few = (0 + 1) / 2 = 1/2 (fly left out)
#   overall = 7 / 11; balanced = (3/4 + 1/2 + 1 + 0 + 1) / 5 = 0.65
# --------------------------------------------------------------------------------------
COUNTS = {"ant": 101, "bee": 100, "cow": 20, "doe": 19, "elk": 5, "fly": 3}
Y_TRUE = ["ant"] * 4 + ["bee"] * 2 + ["cow"] * 2 + ["doe"] * 2 + ["elk"]
Y_PRED = ["ant", "ant", "ant", "bee", "bee", "ant", "cow", "cow", "fly", "ant", "elk"]
EXPECTED = {"many": 0.75, "medium": 0.75, "few": 0.5, "overall": 7 / 11}
EXPECTED_BALANCED = 0.65

SINGLE_GROUP_FUNCTIONS = {
    "many": many_shot_accuracy,
    "medium": medium_shot_accuracy,
    "few": few_shot_accuracy,
}


def _assert_scores(scores, expected):
    assert list(scores) == list(expected)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


# --------------------------------------------------------------------------------------
# shot_groups
# --------------------------------------------------------------------------------------


def test_shot_groups_threshold_boundaries():
    groups = shot_groups(COUNTS)
    assert list(groups) == ["many", "medium", "few"]
    assert groups["many"].tolist() == ["ant"]
    assert groups["medium"].tolist() == ["bee", "cow"]
    assert groups["few"].tolist() == ["doe", "elk", "fly"]


def test_shot_groups_array_counts_default_and_explicit_classes():
    counts = [19, 101, 100, 20, 0]
    groups = shot_groups(counts)
    assert groups["many"].tolist() == [1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [0, 4]

    groups = shot_groups(counts, classes=[50, 7, 3, 12, 99])
    assert groups["many"].tolist() == [7]
    assert groups["medium"].tolist() == [3, 12]
    assert groups["few"].tolist() == [50, 99]


def test_shot_groups_custom_thresholds_and_empty_medium():
    classes = ["n3", "n4", "n5", "n6"]
    groups = shot_groups([3, 4, 5, 6], classes=classes, many_threshold=5, few_threshold=4)
    assert groups["many"].tolist() == ["n6"]
    assert groups["medium"].tolist() == ["n4", "n5"]
    assert groups["few"].tolist() == ["n3"]

    # few_threshold == many_threshold + 1 leaves no room for a medium group.
    groups = shot_groups([3, 4, 5, 6], many_threshold=4, few_threshold=5)
    assert groups["many"].tolist() == [2, 3]
    assert groups["medium"].tolist() == []
    assert groups["few"].tolist() == [0, 1]


def test_shot_groups_mapping_classes_select_and_order():
    groups = shot_groups(COUNTS, classes=["fly", "cow", "ant", "elk"])
    assert groups["many"].tolist() == ["ant"]
    assert groups["medium"].tolist() == ["cow"]
    assert groups["few"].tolist() == ["fly", "elk"]


def test_shot_groups_pandas_series_counts():
    groups = shot_groups(pd.Series(COUNTS))
    assert groups["medium"].tolist() == ["bee", "cow"]
    assert groups["few"].tolist() == ["doe", "elk", "fly"]


# --------------------------------------------------------------------------------------
# Group accuracies
# --------------------------------------------------------------------------------------


def test_group_accuracy_hand_computed_string_labels():
    _assert_scores(group_accuracy(Y_TRUE, Y_PRED, class_counts=COUNTS), EXPECTED)


@pytest.mark.parametrize("group", ["many", "medium", "few"])
def test_single_group_functions_hand_computed(group):
    score = SINGLE_GROUP_FUNCTIONS[group](Y_TRUE, Y_PRED, class_counts=COUNTS)
    assert isinstance(score, float)
    assert score == pytest.approx(EXPECTED[group])


def test_class_absent_from_y_true_is_left_out_of_its_group():
    # "fly" is few-shot and predicted once but absent from y_true: the few group is
    # (doe 0 + elk 1) / 2, not (0 + 1 + 0) / 3.
    assert few_shot_accuracy(Y_TRUE, Y_PRED, class_counts=COUNTS) == pytest.approx(0.5)
    # Removing the only sample of "elk" leaves doe alone in the few group.
    y_true, y_pred = Y_TRUE[:-1], Y_PRED[:-1]
    assert few_shot_accuracy(y_true, y_pred, class_counts=COUNTS) == pytest.approx(0.0)


def test_non_contiguous_int_labels_mapping_array_and_pandas_agree():
    # 3: many, 1/2 correct; 10: medium, 2/2; 42: few, 2/4; overall 5/8.
    y_true = [3, 3, 10, 10, 42, 42, 42, 42]
    y_pred = [3, 10, 10, 10, 42, 3, 3, 42]
    expected = {"many": 0.5, "medium": 1.0, "few": 0.5, "overall": 5 / 8}
    results = [
        group_accuracy(y_true, y_pred, class_counts={3: 500, 10: 50, 42: 5}),
        group_accuracy(y_true, y_pred, class_counts=[500, 50, 5], classes=[3, 10, 42]),
        group_accuracy(
            np.array(y_true),
            np.array(y_pred),
            class_counts=np.array([5, 500, 50]),
            classes=np.array([42, 3, 10]),
        ),
        group_accuracy(
            pd.Series(y_true), pd.Series(y_pred), class_counts=pd.Series({3: 500, 10: 50, 42: 5})
        ),
    ]
    for scores in results:
        _assert_scores(scores, expected)


def test_string_labels_mapping_and_aligned_array_agree():
    classes = list(COUNTS)
    counts = list(COUNTS.values())
    by_array = group_accuracy(
        pd.Series(Y_TRUE), np.array(Y_PRED), class_counts=counts, classes=classes
    )
    by_series = group_accuracy(Y_TRUE, Y_PRED, class_counts=pd.Series(COUNTS))
    _assert_scores(by_array, EXPECTED)
    _assert_scores(by_series, EXPECTED)


def test_default_classes_are_range_of_counts():
    # classes 0, 1, 2 = many, medium, few; recalls 1/1, 1/2, 0/1.
    scores = group_accuracy([0, 1, 1, 2], [0, 1, 0, 0], class_counts=[300, 30, 3])
    _assert_scores(scores, {"many": 1.0, "medium": 0.5, "few": 0.0, "overall": 0.5})


@pytest.mark.parametrize(
    "count, group", [(101, "many"), (100, "medium"), (20, "medium"), (19, "few")]
)
def test_threshold_boundaries_in_accuracy(count, group):
    # The probe class 0 is always right; classes 1 (many), 2 (medium), 3 (few) always wrong.
    # The probe's group therefore scores (1 + 0) / 2, the other groups 0.
    scores = group_accuracy([0, 1, 2, 3], [0, 2, 3, 1], class_counts=[count, 500, 60, 5])
    expected = {"many": 0.0, "medium": 0.0, "few": 0.0, "overall": 0.25}
    expected[group] = 0.5
    _assert_scores(scores, expected)


def test_custom_thresholds_change_groups():
    # many_threshold=100 would make every class medium; with 10/5: 60 many, 7 medium, 3 few.
    scores = group_accuracy(
        [0, 1, 1, 2],
        [0, 1, 0, 2],
        class_counts=[60, 7, 3],
        many_threshold=10,
        few_threshold=5,
    )
    _assert_scores(scores, {"many": 1.0, "medium": 0.5, "few": 1.0, "overall": 0.75})


def test_empty_group_gives_nan_and_one_warning():
    # No class below 20 training samples: the few group is empty, the others are fine.
    with pytest.warns(EmptyGroupWarning, match="'few'") as record:
        scores = group_accuracy([0, 1], [0, 0], class_counts=[500, 50])
    assert len(record) == 1
    assert issubclass(EmptyGroupWarning, UndefinedMetricWarning)
    assert issubclass(EmptyGroupWarning, UserWarning)
    assert np.isnan(scores["few"])
    assert scores["many"] == 1.0
    assert scores["medium"] == 0.0
    assert scores["overall"] == 0.5

    with pytest.warns(EmptyGroupWarning, match="'few'"):
        assert np.isnan(few_shot_accuracy([0, 1], [0, 0], class_counts=[500, 50]))


def test_group_with_classes_none_in_y_true_gives_nan_and_warning():
    # Class 2 is few-shot, but it never occurs in y_true (only in y_pred).
    with pytest.warns(EmptyGroupWarning, match="1 class"):
        score = few_shot_accuracy([0, 1], [0, 2], class_counts=[500, 50, 5])
    assert np.isnan(score)


def test_single_group_function_warns_only_for_its_group():
    # The medium and few groups are empty; many_shot_accuracy must not warn about them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert many_shot_accuracy([0, 1], [0, 0], class_counts=[500, 200]) == 0.5


def test_column_vector_inputs_are_accepted():
    scores = group_accuracy(
        np.array([[0], [1], [1], [2]]), [0, 1, 0, 0], class_counts=[300, 30, 3]
    )
    _assert_scores(scores, {"many": 1.0, "medium": 0.5, "few": 0.0, "overall": 0.5})


# --------------------------------------------------------------------------------------
# long_tail_report
# --------------------------------------------------------------------------------------


def test_long_tail_report_dict_hand_computed():
    report = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, output_dict=True)
    assert list(report) == ["classes", "many", "medium", "few", "overall", "balanced"]
    rows = report["classes"]
    assert list(rows) == ["ant", "bee", "cow", "doe", "elk"]  # no row for "fly"
    doe = rows.pop("doe")
    assert np.isnan(doe.pop("precision"))
    assert doe == {"group": "few", "train_count": 19, "support": 2, "recall": 0.0}
    assert rows == {
        "ant": {"group": "many", "train_count": 101, "support": 4, "precision": 0.6,
                "recall": 0.75},
        "bee": {"group": "medium", "train_count": 100, "support": 2, "precision": 0.5,
                "recall": 0.5},
        "cow": {"group": "medium", "train_count": 20, "support": 2, "precision": 1.0,
                "recall": 1.0},
        "elk": {"group": "few", "train_count": 5, "support": 1, "precision": 1.0,
                "recall": 1.0},
    }  # fmt: skip
    assert report["many"] == {"n_classes": 1, "train_count": 101, "support": 4, "accuracy": 0.75}
    assert report["medium"] == {
        "n_classes": 2, "train_count": 120, "support": 4, "accuracy": 0.75
    }  # fmt: skip
    assert report["few"] == {"n_classes": 2, "train_count": 24, "support": 3, "accuracy": 0.5}
    assert report["overall"]["n_classes"] == 5
    assert report["overall"]["train_count"] == 245
    assert report["overall"]["support"] == 11
    assert report["overall"]["accuracy"] == pytest.approx(7 / 11)
    assert report["balanced"]["accuracy"] == pytest.approx(EXPECTED_BALANCED)


def test_long_tail_report_dict_consistent_with_metric_functions():
    report = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, output_dict=True)
    scores = group_accuracy(Y_TRUE, Y_PRED, class_counts=COUNTS)
    for group in ("many", "medium", "few", "overall"):
        assert report[group]["accuracy"] == scores[group]
    for group, function in SINGLE_GROUP_FUNCTIONS.items():
        assert report[group]["accuracy"] == function(Y_TRUE, Y_PRED, class_counts=COUNTS)
        expected_classes = [c for c in shot_groups(COUNTS)[group] if c in Y_TRUE]
        grouped = [label for label, row in report["classes"].items() if row["group"] == group]
        assert grouped == expected_classes
        assert report[group]["n_classes"] == len(expected_classes)
    assert report["overall"]["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has a class not in y_true
        balanced = balanced_accuracy_score(Y_TRUE, Y_PRED)
    assert report["balanced"]["accuracy"] == pytest.approx(balanced)


def _parse_text_report(text):
    """Split the text report into its class rows and its summary rows, keyed by label."""
    blocks = [block.splitlines() for block in text.split("\n\n")]
    # header, class rows, summary header, group rows, overall/balanced rows
    assert len(blocks) == 5, text
    assert blocks[0][0].split() == ["group", "train", "support", "precision", "recall"]
    assert blocks[2][0].split() == ["classes", "train", "support", "accuracy"]
    classes = {line.split()[0]: line.split()[1:] for line in blocks[1]}
    summary = {line.split()[0]: line.split()[1:] for line in blocks[3] + blocks[4]}
    return classes, summary


@pytest.mark.parametrize("digits", [0, 2, 5])
def test_long_tail_report_text_matches_dict(digits):
    text = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, digits=digits)
    report = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, output_dict=True)
    classes, summary = _parse_text_report(text)

    assert list(classes) == list(report["classes"])
    for label, row in report["classes"].items():
        assert classes[label] == [
            row["group"],
            str(row["train_count"]),
            str(row["support"]),
            f"{row['precision']:.{digits}f}",
            f"{row['recall']:.{digits}f}",
        ]
    assert list(summary) == ["many", "medium", "few", "overall", "balanced"]
    for name, cells in summary.items():
        row = report[name]
        assert cells == [
            str(row["n_classes"]),
            str(row["train_count"]),
            str(row["support"]),
            f"{row['accuracy']:.{digits}f}",
        ]
    assert classes["doe"][3] == "nan"


def test_long_tail_report_digits_affects_text_only():
    text_2 = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, digits=2)
    text_4 = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, digits=4)
    assert "0.64" in text_2.splitlines()[-2]  # overall = 7/11
    assert "0.6364" in text_4.splitlines()[-2]
    assert text_2 != text_4
    dict_2 = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, digits=2, output_dict=True)
    dict_4 = long_tail_report(Y_TRUE, Y_PRED, class_counts=COUNTS, digits=4, output_dict=True)
    assert repr(dict_2) == repr(dict_4)  # repr compares the nan entries too


def test_long_tail_report_text_columns_align_with_long_labels():
    counts = {"hippopotamus": 300, "ox": 30, "gnu": 3}
    y = ["hippopotamus", "ox", "gnu", "gnu"]
    text = long_tail_report(y, y, class_counts=counts)
    blocks = [block.splitlines() for block in text.split("\n\n")]
    class_table = blocks[0] + blocks[1]
    summary_table = blocks[2] + blocks[3] + blocks[4]
    assert len({len(line) for line in class_table}) == 1
    assert len({len(line) for line in summary_table}) == 1
    # Both tables share the width of the label column.
    assert blocks[1][0].index("hippopotamus") == 0
    assert blocks[3][0].index("many") == len("hippopotamus") - len("many")


def test_long_tail_report_int_labels_and_empty_group():
    y_true = np.array([3, 3, 10])
    y_pred = np.array([3, 10, 10])
    with pytest.warns(EmptyGroupWarning, match="'few'"):
        report = long_tail_report(y_true, y_pred, class_counts={3: 500, 10: 50}, output_dict=True)
    assert list(report["classes"]) == [3, 10]
    assert all(type(label) is int for label in report["classes"])
    assert report["few"]["n_classes"] == 0
    assert report["few"]["support"] == 0
    assert np.isnan(report["few"]["accuracy"])
    with pytest.warns(EmptyGroupWarning):
        text = long_tail_report(y_true, y_pred, class_counts={3: 500, 10: 50})
    assert _parse_text_report(text)[1]["few"] == ["0", "0", "0", "nan"]


# --------------------------------------------------------------------------------------
# Argument validation of every public function
# --------------------------------------------------------------------------------------

VALID = {
    "y_true": [0, 1, 2, 2],
    "y_pred": [0, 1, 2, 0],
    "class_counts": [150, 50, 5],
}
GROUP_FUNCTIONS = [
    group_accuracy,
    many_shot_accuracy,
    medium_shot_accuracy,
    few_shot_accuracy,
    long_tail_report,
]
# (case id, overrides, exception, match, functions the case applies to)
INVALID_CASES = [
    ("many_threshold negative", {"many_threshold": -1}, ValueError, "many_threshold", "all"),
    ("few_threshold negative", {"few_threshold": -3}, ValueError, "few_threshold", "all"),
    ("many_threshold float", {"many_threshold": 100.5}, TypeError, "many_threshold", "all"),
    ("few_threshold bool", {"few_threshold": True}, TypeError, "few_threshold", "all"),
    (
        "thresholds overlap",
        {"many_threshold": 10, "few_threshold": 12},
        ValueError,
        "few_threshold=12 and many_threshold=10",
        "all",
    ),
    (
        "counts/classes length",
        {"class_counts": [1, 2], "classes": [0, 1, 2]},
        ValueError,
        "2 entries but classes has 3",
        "counts",
    ),
    ("negative count", {"class_counts": [5, -1, 3]}, ValueError, "non-negative", "counts"),
    ("fractional count", {"class_counts": [5, 1.5, 3]}, ValueError, "whole numbers", "counts"),
    ("empty counts", {"class_counts": []}, ValueError, "empty", "counts"),
    ("2-D counts", {"class_counts": [[1, 2, 3]]}, ValueError, "1-D", "counts"),
    ("non-numeric counts", {"class_counts": ["a", "b", "c"]}, TypeError, "numbers", "counts"),
    (
        "classes not in mapping",
        {"class_counts": {0: 150, 1: 50, 2: 5}, "classes": [0, 1, 7]},
        ValueError,
        r"not keys of class_counts: \[7\]",
        "counts",
    ),
    (
        "duplicate classes",
        {"class_counts": [1, 2, 3], "classes": [0, 1, 1]},
        ValueError,
        "duplicate",
        "counts",
    ),
    (
        "mixed label types",
        {"class_counts": {0: 150, "b": 50, 2: 5}},
        ValueError,
        "mixes string",
        "counts",
    ),
    ("length mismatch", {"y_pred": [0, 1, 2]}, ValueError, "4 and 3", "targets"),
    ("empty input", {"y_true": [], "y_pred": []}, ValueError, "empty", "targets"),
    ("2-D y_true", {"y_true": [[0, 1]] * 4}, ValueError, "1d", "targets"),
    ("unknown in y_true", {"y_true": [0, 1, 5, 2]}, ValueError, r"y_true .*\[5\]", "targets"),
    ("unknown in y_pred", {"y_pred": [0, 9, 2, 0]}, ValueError, r"y_pred .*\[9\]", "targets"),
    (
        "string labels, int classes",
        {"y_true": ["0", "1", "2", "2"]},
        ValueError,
        "not in classes",
        "targets",
    ),
    ("digits negative", {"digits": -1}, ValueError, "digits", "report"),
    ("output_dict not bool", {"output_dict": "yes"}, TypeError, "output_dict", "report"),
]


def _applies(function, scope):
    if scope == "all":
        return True
    if scope == "counts":
        return function is not make_shot_scorer
    if scope == "targets":
        return function in GROUP_FUNCTIONS
    return function is long_tail_report


def _call(function, overrides):
    if function is shot_groups:
        kwargs = {"class_counts": VALID["class_counts"], **overrides}
        return shot_groups(kwargs.pop("class_counts"), **kwargs)
    if function is make_shot_scorer:
        return make_shot_scorer("few", **overrides)
    kwargs = {**VALID, **overrides}
    return function(kwargs.pop("y_true"), kwargs.pop("y_pred"), **kwargs)


@pytest.mark.parametrize(
    "function, overrides, error, match",
    [
        pytest.param(function, overrides, error, match, id=f"{function.__name__}-{case}")
        for function in [shot_groups, *GROUP_FUNCTIONS, make_shot_scorer]
        for case, overrides, error, match, scope in INVALID_CASES
        if _applies(function, scope)
    ],
)
def test_public_functions_validate_arguments(function, overrides, error, match):
    _call(function, {})  # the valid call goes through
    with pytest.raises(error, match=match):
        _call(function, overrides)


def test_make_shot_scorer_rejects_unknown_group():
    with pytest.raises(ValueError, match="group must be one of"):
        make_shot_scorer("tail")


# --------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------


class CountingLogisticRegression(LogisticRegression):
    """LogisticRegression exposing ``class_counts_`` like ltroute's estimators."""

    def fit(self, X, y, sample_weight=None):
        super().fit(X, y, sample_weight=sample_weight)
        self.class_counts_ = np.array([np.count_nonzero(y == c) for c in self.classes_])
        return self


class FixedPredictions(ClassifierMixin, BaseEstimator):
    """Predicts a fixed label vector; classes and counts are given, not learned."""

    def __init__(self, y_pred=None, classes=None, class_counts=None):
        self.y_pred = y_pred
        self.classes = classes
        self.class_counts = class_counts

    def fit(self, X, y):
        self.classes_ = np.asarray(self.classes)
        self.class_counts_ = np.asarray(self.class_counts)
        return self

    def predict(self, X):
        return np.asarray(self.y_pred)


# Long-tailed training folds with 3-fold stratified CV: 160 (many), 60 and 30 (medium),
# 8 (few) training samples per class.
LT_COUNTS = {0: 240, 1: 90, 2: 45, 3: 12}
CV = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)


@pytest.fixture(scope="module")
def long_tailed_data():
    X, y = make_classification(
        n_samples=1200,
        n_features=8,
        n_informative=5,
        n_classes=4,
        n_clusters_per_class=1,
        class_sep=0.8,
        random_state=0,
    )
    rng = np.random.RandomState(0)
    keep = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in LT_COUNTS.items()]
    )
    return X[keep], y[keep]


def _hand_fold_scores(pipe, X, y, train, test):
    """Fit on the fold and compute every group's score with plain numpy."""
    model = clone(pipe).fit(X[train], y[train])
    y_pred, y_true = model.predict(X[test]), y[test]
    labels, counts = np.unique(y[train], return_counts=True)
    recall = {c: np.mean(y_pred[y_true == c] == c) for c in labels}
    groups = {
        "many": labels[counts > 100],
        "medium": labels[(counts >= 20) & (counts <= 100)],
        "few": labels[counts < 20],
    }
    assert [g.tolist() for g in groups.values()] == [[0], [1, 2], [3]]
    scores = {name: np.mean([recall[c] for c in members]) for name, members in groups.items()}
    scores["overall"] = np.mean(y_pred == y_true)
    scores["balanced"] = np.mean(list(recall.values()))
    return scores


def test_scorer_hand_computed_on_fixed_predictions():
    estimator = FixedPredictions(Y_PRED, list(COUNTS), list(COUNTS.values())).fit(None, None)
    X = np.zeros((len(Y_TRUE), 1))
    assert many_shot_scorer(estimator, X, Y_TRUE) == pytest.approx(0.75)
    assert medium_shot_scorer(estimator, X, Y_TRUE) == pytest.approx(0.75)
    assert few_shot_scorer(estimator, X, Y_TRUE) == pytest.approx(0.5)
    assert make_shot_scorer("overall")(estimator, X, Y_TRUE) == pytest.approx(7 / 11)
    assert make_shot_scorer("balanced")(estimator, X, Y_TRUE) == pytest.approx(0.65)
    # The factory's thresholds are used: with many_threshold=18, ant, bee, cow and doe
    # (recalls 3/4, 1/2, 1, 0) are all many-shot.
    scorer = make_shot_scorer("many", many_threshold=18, few_threshold=6)
    assert scorer(estimator, X, Y_TRUE) == pytest.approx((0.75 + 0.5 + 1 + 0) / 4)


def test_scorer_reads_last_step_of_pipeline(long_tailed_data):
    X, y = long_tailed_data
    pipe = make_pipeline(StandardScaler(), CountingLogisticRegression()).fit(X, y)
    assert pipe[-1].class_counts_.tolist() == list(LT_COUNTS.values())
    expected = few_shot_accuracy(y, pipe.predict(X), class_counts=LT_COUNTS)
    assert few_shot_scorer(pipe, X, y) == expected
    assert few_shot_scorer(make_pipeline(pipe), X, y) == expected  # nested pipeline


def test_scorer_in_cross_val_score_matches_hand_computation(long_tailed_data):
    X, y = long_tailed_data
    pipe = make_pipeline(StandardScaler(), CountingLogisticRegression())
    for scorer, group in [(few_shot_scorer, "few"), (medium_shot_scorer, "medium")]:
        scores = cross_val_score(pipe, X, y, cv=CV, scoring=scorer)
        expected = [
            _hand_fold_scores(pipe, X, y, train, test)[group] for train, test in CV.split(X, y)
        ]
        np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert 0 < np.mean(scores) < 1


def test_scorers_in_grid_search_match_hand_computation(long_tailed_data):
    X, y = long_tailed_data
    pipe = make_pipeline(StandardScaler(), CountingLogisticRegression())
    param_grid = {"countinglogisticregression__C": [0.01, 1.0]}
    scoring = {
        "many": many_shot_scorer,
        "medium": medium_shot_scorer,
        "few": few_shot_scorer,
        "overall": make_shot_scorer("overall"),
        "balanced": make_shot_scorer("balanced"),
    }
    search = GridSearchCV(pipe, param_grid, scoring=scoring, refit="few", cv=CV).fit(X, y)

    splits = list(CV.split(X, y))
    for i, params in enumerate(search.cv_results_["params"]):
        candidate = clone(pipe).set_params(**params)
        for k, (train, test) in enumerate(splits):
            hand = _hand_fold_scores(candidate, X, y, train, test)
            for name in scoring:
                got = search.cv_results_[f"split{k}_test_{name}"][i]
                assert got == pytest.approx(hand[name], rel=1e-12), (params, k, name)
    best = np.argmax(search.cv_results_["mean_test_few"])
    assert search.best_params_ == search.cv_results_["params"][best]
    assert search.best_score_ == search.cv_results_["mean_test_few"][best]


def test_scorer_empty_group_in_cv_gives_nan_with_warning(long_tailed_data):
    X, y = long_tailed_data
    pipe = make_pipeline(StandardScaler(), CountingLogisticRegression())
    no_many = make_shot_scorer("many", many_threshold=1000)
    with pytest.warns(EmptyGroupWarning, match="'many'"):
        scores = cross_val_score(pipe, X, y, cv=CV, scoring=no_many)
    assert np.isnan(scores).all()

    param_grid = {"countinglogisticregression__C": [0.1, 1.0]}
    search = GridSearchCV(pipe, param_grid, scoring=no_many, cv=CV, refit=False)
    with pytest.warns(EmptyGroupWarning), pytest.warns(UserWarning, match="non-finite"):
        search.fit(X, y)
    assert np.isnan(search.cv_results_["mean_test_score"]).all()


def test_scorer_counts_unseen_test_label_as_zero_shot():
    # Fitted on classes 0 (many) and 1 (medium); class 2 only shows up at test time.
    estimator = FixedPredictions([0, 1, 0, 1], [0, 1], [300, 50]).fit(None, None)
    X = np.zeros((4, 1))
    with pytest.warns(UserWarning, match=r"not fitted on: \[2\]"):
        assert few_shot_scorer(estimator, X, [0, 1, 2, 2]) == 0.0
    with pytest.warns(UserWarning, match="not fitted on"):
        balanced = make_shot_scorer("balanced")(estimator, X, [0, 1, 2, 2])
    assert balanced == pytest.approx((1 + 1 + 0) / 3)


def test_scorer_requires_class_counts(long_tailed_data):
    X, y = long_tailed_data
    plain = LogisticRegression().fit(X, y)
    with pytest.raises(AttributeError, match="'class_counts_' aligned with 'classes_'"):
        few_shot_scorer(plain, X, y)
    with pytest.raises(AttributeError, match="LogisticRegression has no attribute"):
        few_shot_scorer(make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y), X, y)
    with pytest.raises(NotFittedError):
        few_shot_scorer(CountingLogisticRegression(), X, y)


def test_scorer_rejects_misaligned_class_counts():
    estimator = FixedPredictions([0, 1], [0, 1], [300, 50, 5]).fit(None, None)
    with pytest.raises(ValueError, match="3 entries but classes has 2"):
        few_shot_scorer(estimator, np.zeros((2, 1)), [0, 1])


def test_scorer_repr_and_pickle():
    assert repr(few_shot_scorer) == "make_shot_scorer('few', many_threshold=100, few_threshold=20)"
    scorer = make_shot_scorer("balanced", many_threshold=50, few_threshold=5)
    assert repr(scorer) == "make_shot_scorer('balanced', many_threshold=50, few_threshold=5)"
    restored = pickle.loads(pickle.dumps(scorer))
    assert repr(restored) == repr(scorer)
    estimator = FixedPredictions(Y_PRED, list(COUNTS), list(COUNTS.values())).fit(None, None)
    X = np.zeros((len(Y_TRUE), 1))
    assert restored(estimator, X, Y_TRUE) == scorer(estimator, X, Y_TRUE)


# --------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------


def test_public_names():
    assert set(ltroute.metrics.__all__) == {
        "EmptyGroupWarning",
        "shot_groups",
        "group_accuracy",
        "many_shot_accuracy",
        "medium_shot_accuracy",
        "few_shot_accuracy",
        "expected_calibration_error",
        "long_tail_report",
        "make_shot_scorer",
        "many_shot_scorer",
        "medium_shot_scorer",
        "few_shot_scorer",
    }
    for name in ltroute.metrics.__all__:
        assert hasattr(ltroute.metrics, name)


def test_docstring_examples():
    results = doctest.testmod(ltroute.metrics, verbose=False)
    assert results.attempted >= 20
    assert results.failed == 0
