from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch

from simsearch import metrics


@pytest.mark.parametrize("n", [2, 3, 5, 20, 100])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_mean_confidence_interval_matches_scipy(n, confidence):
    values = np.random.default_rng(n).normal(0.9, 0.02, size=n)
    result = metrics.mean_confidence_interval(values, confidence=confidence)
    std = np.std(values, ddof=1)
    low, high = scipy.stats.t.interval(confidence, n - 1, loc=values.mean(), scale=std / math.sqrt(n))
    assert result.mean == pytest.approx(values.mean(), rel=1e-12)
    assert result.std == pytest.approx(std, rel=1e-12)
    assert result.half_width == pytest.approx((high - low) / 2, rel=1e-9)
    assert (result.n, result.confidence) == (n, confidence)


def test_mean_confidence_interval_by_hand():
    # mean 2, Bessel-corrected std 1 (not the population std sqrt(2/3)), n 3.
    result = metrics.mean_confidence_interval([1.0, 2.0, 3.0])
    assert result.mean == 2.0 and result.std == 1.0
    half_width = scipy.stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert result.half_width == pytest.approx(half_width, rel=1e-12)
    assert str(result) == f"2.0000 ± {half_width:.4f} (95% confidence, n=3)"


def test_mean_confidence_interval_accepts_tensors_and_constant_values():
    result = metrics.mean_confidence_interval(torch.tensor([0.5, 0.5, 0.5, 0.5]), confidence=0.9)
    assert (result.mean, result.std, result.half_width) == (0.5, 0.0, 0.0)
    assert str(result) == "0.5000 ± 0.0000 (90% confidence, n=4)"


def test_single_value_has_no_interval():
    result = metrics.mean_confidence_interval([0.95134])
    assert result.mean == 0.95134 and result.n == 1
    assert math.isnan(result.half_width) and math.isnan(result.std)
    assert str(result) == "0.9513 (n=1, no interval)"
    assert "±" not in str(result)


def test_str_formats_confidence_as_percent():
    interval = metrics.MeanInterval(mean=0.95134, half_width=0.00214, std=0.01, n=20, confidence=0.999)
    assert str(interval) == "0.9513 ± 0.0021 (99.9% confidence, n=20)"


def test_mean_interval_is_frozen():
    interval = metrics.mean_confidence_interval([0.1, 0.2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        interval.mean = 1.0


def test_empty_values_raise():
    with pytest.raises(ValueError, match="empty"):
        metrics.mean_confidence_interval([])


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 95, math.nan])
def test_confidence_outside_unit_interval_raises(confidence):
    with pytest.raises(ValueError, match="confidence"):
        metrics.mean_confidence_interval([0.1, 0.2, 0.3], confidence=confidence)


def test_non_finite_values_raise():
    with pytest.raises(ValueError, match="finite"):
        metrics.mean_confidence_interval([0.1, math.nan])


def test_topk_accuracies_by_hand():
    topk_indices = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2], [3, 1, 2]])
    targets = torch.tensor([2, 2, 1, 0])
    # Top-1 hits: row 0 only. Top-3 hits: rows 0, 1, 2.
    assert metrics.topk_accuracies(topk_indices=topk_indices, targets=targets) == (0.25, 0.75)


def test_topk_accuracies_with_k_equal_one_and_numpy_input():
    top1, topk = metrics.topk_accuracies(topk_indices=np.array([[1], [0], [0]]), targets=np.array([1, 1, 0]))
    assert top1 == topk == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("topk_indices", "targets"),
    [
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
        (torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
    ],
)
def test_topk_accuracies_rejects_bad_shapes(topk_indices, targets):
    with pytest.raises(ValueError, match="shape"):
        metrics.topk_accuracies(topk_indices=topk_indices, targets=targets)


def test_topk_accuracies_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        metrics.topk_accuracies(topk_indices=torch.zeros(0, 3, dtype=torch.long), targets=torch.zeros(0))


def test_balanced_accuracy_weighs_every_class_the_same():
    # 9 of 10 images of a large class right, the one image of a small class wrong: accuracy 0.82, balanced 0.45.
    targets = [0] * 10 + [1]
    predictions = [0] * 9 + [1] + [0]
    assert metrics.balanced_accuracy(targets=targets, predictions=predictions) == pytest.approx((0.9 + 0.0) / 2)
    # A prediction of a class that has no validation image is an error of the true class, not a class of its own.
    assert metrics.balanced_accuracy(targets=[0, 0, 1, 1], predictions=[0, 2, 1, 1]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="targets is empty"):
        metrics.balanced_accuracy(targets=[], predictions=[])


def test_paired_difference_cancels_the_shared_spread():
    baseline = [0.70, 0.90, 0.80, 0.60]
    values = [0.72, 0.91, 0.83, 0.62]  # differences 0.02, 0.01, 0.03, 0.02
    difference = metrics.paired_difference(values, baseline)
    assert difference.mean == pytest.approx(0.02)
    expected = scipy.stats.t.ppf(0.975, 3) * np.std([0.02, 0.01, 0.03, 0.02], ddof=1) / 2
    assert difference.half_width == pytest.approx(expected)
    assert difference.half_width < metrics.mean_confidence_interval(values).half_width / 10
    with pytest.raises(ValueError, match="one value per partition on both sides, got 2 and 3"):
        metrics.paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])
