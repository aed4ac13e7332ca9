from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cumacc

# The 24 class accuracies of the original module's example, and the same values sorted by hand.
ARTICLE_ACCURACIES = [
    0.2, 0.5, 0.75, 0.8, 0.4, 0.6, 0.65, 0.9, 0.85, 0.95, 0.7, 0.55,
    0.2, 0.8, 0.6, 0.85, 0.9, 0.95, 0.7, 0.45, 0.8, 0.95, 0.75, 0.1,
]
SORTED_BY_HAND = [
    0.1, 0.2, 0.2, 0.4, 0.45, 0.5, 0.55, 0.6, 0.6, 0.65, 0.7, 0.7,
    0.75, 0.75, 0.8, 0.8, 0.8, 0.85, 0.85, 0.9, 0.9, 0.95, 0.95, 0.95,
]


def test_class_accuracies_by_hand():
    targets = [0, 0, 0, 0, 1, 1, 3, 3, 3]
    predictions = [0, 1, 0, 0, 1, 1, 0, 2, 3]
    accuracies = cumacc.class_accuracies(targets=targets, predictions=predictions, num_labels=5)
    np.testing.assert_allclose(accuracies[[0, 1, 3]], [0.75, 1.0, 1 / 3])
    assert np.isnan(accuracies[2]) and np.isnan(accuracies[4])
    assert accuracies.shape == (5,)


def test_class_accuracies_accepts_tensors():
    accuracies = cumacc.class_accuracies(
        targets=torch.tensor([1, 1, 0]), predictions=torch.tensor([1, 0, 0]), num_labels=2
    )
    np.testing.assert_allclose(accuracies, [1.0, 0.5])


@pytest.mark.parametrize(
    ("targets", "predictions", "message"),
    [
        ([0, 1], [0], "match"),
        ([0, 3], [0, 1], "num_labels"),
        ([0, -1], [0, 1], "num_labels"),
        ([0, 1], [0, 5], "num_labels"),
        ([0.0, 1.0], [0, 1], "integer"),
    ],
)
def test_class_accuracies_rejects_bad_input(targets, predictions, message):
    with pytest.raises(ValueError, match=message):
        cumacc.class_accuracies(targets=targets, predictions=predictions, num_labels=3)


def test_cumulative_accuracy_four_classes_four_intervals():
    cum_accs, shares = cumacc.cumulative_accuracy(accuracies=[0.2, 0.5, 1.0, 0.75], num_intervals=4)
    np.testing.assert_allclose(shares, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(cum_accs, [0.2, 0.2, 0.5, 0.75, 1.0])


def test_cumulative_accuracy_24_classes_10_intervals():
    assert sorted(ARTICLE_ACCURACIES) == SORTED_BY_HAND
    cum_accs, shares = cumacc.cumulative_accuracy(accuracies=np.array(ARTICLE_ACCURACIES), num_intervals=10)
    # Share i/10 of 24 classes -> the ceil(2.4 * i)-th worst: ranks 1, 3, 5, 8, 10, 12, 15, 17, 20, 22, 24.
    np.testing.assert_allclose(cum_accs, [0.1, 0.2, 0.45, 0.6, 0.65, 0.7, 0.8, 0.8, 0.9, 0.95, 0.95])
    np.testing.assert_allclose(shares, np.arange(11) / 10)


def test_cumulative_accuracy_meets_its_definition():
    rng = np.random.default_rng(3)
    accuracies = rng.random(37)
    cum_accs, shares = cumacc.cumulative_accuracy(accuracies=accuracies, num_intervals=13)
    for value, share in zip(cum_accs[1:], shares[1:]):
        # A share `share` of classes is <= value, and no smaller class accuracy has that property.
        assert np.mean(accuracies <= value) >= share - 1e-12
        assert np.mean(accuracies < value) < share
    assert cum_accs[0] == accuracies.min()
    assert np.all(np.diff(cum_accs) >= 0)


def test_cumulative_accuracy_exact_shares_are_not_rounded_up():
    # linspace gives share 0.6000000000000001 and 0.6000000000000001 * 5 > 3: the 3rd worst class must still win.
    accuracies = np.array([0.9, 0.1, 0.7, 0.3, 0.5])
    cum_accs, _ = cumacc.cumulative_accuracy(accuracies=accuracies, num_intervals=5)
    np.testing.assert_allclose(cum_accs, [0.1, 0.1, 0.3, 0.5, 0.7, 0.9])


def test_cumulative_accuracy_ignores_nan():
    cum_accs, _ = cumacc.cumulative_accuracy(accuracies=[np.nan, 1.0, 0.5, np.nan], num_intervals=2)
    np.testing.assert_allclose(cum_accs, [0.5, 0.5, 1.0])


def test_cumulative_accuracy_all_equal_and_single_class():
    cum_accs, _ = cumacc.cumulative_accuracy(accuracies=[0.9] * 7, num_intervals=5)
    np.testing.assert_allclose(cum_accs, [0.9] * 6)
    cum_accs, shares = cumacc.cumulative_accuracy(accuracies=[0.4], num_intervals=3)
    np.testing.assert_allclose(cum_accs, [0.4] * 4)
    assert len(shares) == 4


def test_cumulative_accuracy_more_intervals_than_classes():
    cum_accs, _ = cumacc.cumulative_accuracy(accuracies=[0.5, 1.0], num_intervals=4)
    np.testing.assert_allclose(cum_accs, [0.5, 0.5, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("num_intervals", [0, -2, 2.5])
def test_cumulative_accuracy_rejects_bad_intervals(num_intervals):
    with pytest.raises(ValueError, match="num_intervals"):
        cumacc.cumulative_accuracy(accuracies=[0.5, 1.0], num_intervals=num_intervals)


@pytest.mark.parametrize("accuracies", [[], [math.nan, math.nan]])
def test_cumulative_accuracy_rejects_no_values(accuracies):
    with pytest.raises(ValueError, match="no values"):
        cumacc.cumulative_accuracy(accuracies=accuracies)


def test_least_accurate_classes_sorted_and_inclusive():
    labels = ["duck", "rat", "ox", "cat", "owl", "bee"]
    accuracies = [0.5, 0.8, 0.75, 0.95, math.nan, 0.75]
    result = cumacc.least_accurate_classes(accuracies=accuracies, labels=labels, threshold=0.8)
    assert result == [
        {"label": "duck", "accuracy": 0.5},
        {"label": "ox", "accuracy": 0.75},
        {"label": "bee", "accuracy": 0.75},
        {"label": "rat", "accuracy": 0.8},
    ]
    assert all(type(item["accuracy"]) is float for item in result)


def test_least_accurate_classes_default_threshold_and_none_below():
    assert cumacc.least_accurate_classes(accuracies=[0.81, 1.0], labels=["a", "b"]) == []
    assert cumacc.least_accurate_classes(accuracies=np.array([0.81, 0.8]), labels=["a", "b"]) == [
        {"label": "b", "accuracy": 0.8}
    ]


def test_least_accurate_classes_rejects_length_mismatch():
    with pytest.raises(ValueError, match="labels"):
        cumacc.least_accurate_classes(accuracies=[0.1, 0.2], labels=["a"])
