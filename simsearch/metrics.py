"""Statistics shared by the script, the partition protocol and the analysis: t-intervals, paired differences,
top-k and balanced accuracy, and the scores of one set of predictions.

Accuracies from repeated random partitions are summarised as a mean with a Student's t confidence interval, the
approximation the article uses near the mean (accuracies are bounded, so the interval is only trustworthy when it
stays well inside [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import sklearn.metrics
import torch

__all__ = ["MeanInterval", "balanced_accuracy", "mean_confidence_interval", "paired_difference", "proportion_margin",
           "samples_for_margin", "score_predictions", "topk_accuracies"]


@dataclass(frozen=True)
class MeanInterval:
    """Sample mean with the half width of its two-sided t confidence interval (NaN when ``n < 2``)."""

    mean: float
    half_width: float
    std: float
    n: int
    confidence: float

    def __str__(self) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.4f} (n={self.n}, no interval)"
        return f"{self.mean:.4f} ± {self.half_width:.4f} ({self.confidence * 100:g}% confidence, n={self.n})"


def mean_confidence_interval(
    values: Sequence[float] | np.ndarray | torch.Tensor, *, confidence: float = 0.95
) -> MeanInterval:
    """Mean of ``values`` and the half width ``t((1 + c) / 2, n - 1) * s / sqrt(n)`` with Bessel-corrected ``s``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95); got {confidence}.")
    sample = np.asarray(values, dtype=np.float64).ravel()
    if sample.size == 0:
        raise ValueError("values is empty; a mean needs at least one value.")
    if not np.all(np.isfinite(sample)):
        raise ValueError(f"values must be finite; got {sample.tolist()}.")
    n = int(sample.size)
    mean = float(sample.mean())
    if n < 2:
        return MeanInterval(mean=mean, half_width=math.nan, std=math.nan, n=n, confidence=confidence)
    std = float(sample.std(ddof=1))
    critical = float(scipy.stats.t.ppf((1.0 + confidence) / 2.0, n - 1))
    return MeanInterval(
        mean=mean, half_width=critical * std / math.sqrt(n), std=std, n=n, confidence=confidence
    )


def paired_difference(
    values: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray, *, confidence: float = 0.95
) -> MeanInterval:
    """Mean per-partition difference ``values - baseline`` with its own interval: both measured on the same
    partitions (or draws), so the partition-to-partition spread cancels and a small real difference shows."""
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape:
        raise ValueError(f"A paired difference needs one value per partition on both sides, got {values.size} and "
                         f"{baseline.size}.")
    return mean_confidence_interval(values - baseline, confidence=confidence)


def proportion_margin(*, count: int, rate: float, confidence: float = 0.95) -> float:
    """Half width of the normal-approximation interval of a share ``rate`` measured on ``count`` samples: how far
    the share a calibrated threshold keeps on new samples can stray from the share it kept on its own."""
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    return float(z * math.sqrt(rate * (1.0 - rate) / count))


def samples_for_margin(*, rate: float, margin: float = 0.05, confidence: float = 0.95) -> int:
    """The fewest samples whose :func:`proportion_margin` for ``rate`` is at most ``margin`` (73 for a 95 % share
    within 5 points)."""
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    return math.ceil(z**2 * rate * (1.0 - rate) / margin**2 - 1e-9)


def topk_accuracies(*, topk_indices: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Return ``(top-1 accuracy, top-k accuracy)``; column 0 of ``topk_indices`` is the best prediction. Arrays
    (CPU tensors too) of labels: the estimators rank in numpy, so their predictions are scored as they come."""
    topk_indices, targets = np.asarray(topk_indices), np.asarray(targets)
    if topk_indices.ndim != 2 or topk_indices.shape[1] < 1 or targets.shape != topk_indices.shape[:1]:
        raise ValueError(
            "Expected topk_indices of shape (N, k) with k >= 1 and targets of shape (N,); "
            f"got {tuple(topk_indices.shape)} and {tuple(targets.shape)}."
        )
    if targets.size == 0:
        raise ValueError("No predictions to score: targets is empty.")
    hits = topk_indices == targets[:, None]
    return float(hits[:, 0].mean()), float(hits.any(axis=1).mean())


def balanced_accuracy(*, targets: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray) -> float:
    """Mean over the classes present in ``targets`` of each one's share of correct predictions.

    Plain accuracy weighs classes by their validation images, so a large class hides a small one that is never
    found; this weighs every class the same (the per-class accuracies the CAF is built from). Predictions of a
    class absent from ``targets`` count as errors of the true class, as they should.
    """
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    if targets.size == 0:
        raise ValueError("No predictions to score: targets is empty.")
    return float(
        sklearn.metrics.recall_score(targets, predictions, labels=np.unique(targets), average="macro", zero_division=0)
    )


def score_predictions(*, targets: np.ndarray, topk_predictions: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy and top-k accuracy of label predictions ``[N, k]`` (best first) against
    targets ``[N]`` (arrays, or CPU tensors)."""
    targets, topk_predictions = np.asarray(targets), np.asarray(topk_predictions)
    num_images = len(targets)
    accuracy, topk_accuracy = (
        topk_accuracies(topk_indices=topk_predictions, targets=targets) if num_images else (math.nan,) * 2
    )
    balanced = balanced_accuracy(targets=targets, predictions=topk_predictions[:, 0]) if num_images else math.nan
    return {
        "targets": targets.tolist(),
        "predictions": topk_predictions[:, 0].tolist(),
        "topk_predictions": topk_predictions.tolist(),
        "num_labels": len(set(targets.tolist())),
        "num_images": num_images,
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "topk_accuracy": topk_accuracy,
    }
