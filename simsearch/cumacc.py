"""Per-class accuracy and the cumulative accuracy function (CAF) of a multiclass classifier.

The CAF is to class accuracies what a cumulative distribution function is to a random variable: at a share ``s``
of classes it gives the accuracy that a share ``s`` of classes do not exceed. An ideal classifier gives a
horizontal line at 1.0; a low start shows how many classes are problematic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["class_accuracies", "cumulative_accuracy", "least_accurate_classes"]


def _label_array(values: Any, *, name: str, num_labels: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of label indexes; got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer label indexes; got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() >= num_labels):
        raise ValueError(
            f"{name} must lie in [0, {num_labels}); got values from {array.min()} to {array.max()}. "
            "Pass the total number of labels as num_labels."
        )
    return array.astype(np.int64)


def class_accuracies(*, targets: Any, predictions: Any, num_labels: int) -> np.ndarray:
    """Share of correctly predicted samples of each class (its recall), indexed by label.

    A class without samples gets NaN rather than 0, so it is not mistaken for a class that is always wrong.
    """
    targets = _label_array(targets, name="targets", num_labels=num_labels)
    predictions = _label_array(predictions, name="predictions", num_labels=num_labels)
    if len(targets) != len(predictions):
        raise ValueError(f"Got {len(targets)} targets but {len(predictions)} predictions; they must match.")
    samples = np.bincount(targets, minlength=num_labels)
    correct = np.bincount(targets[targets == predictions], minlength=num_labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(samples > 0, correct / samples, np.nan)


CAF_RULES = ("ceil", "original")


def cumulative_accuracy(
    *, accuracies: Any, num_intervals: int = 10, rule: str = "ceil"
) -> tuple[np.ndarray, np.ndarray]:
    """Sample the CAF at ``num_intervals + 1`` equally spaced shares of classes; return ``(cum_accs, shares)``.

    ``rule="ceil"`` (default): for a share ``s > 0`` the value is the accuracy of the ``ceil(s * n)``-th worst of
    the ``n`` classes, i.e. the smallest accuracy that a share ``s`` of classes do not exceed; at share 0 it is the
    worst class accuracy, so the curve starts where the data start. ``rule="original"`` reproduces the original
    project's numbers: 0 at share 0 and the ``floor(s * n)``-th worst class elsewhere (at least the first), which
    can report, for a share of classes, an accuracy that fewer classes than that share stay within. NaN accuracies
    (classes without samples) are ignored.
    """
    if rule not in CAF_RULES:
        raise ValueError(f"rule must be one of {', '.join(CAF_RULES)}; got {rule!r}.")
    if int(num_intervals) != num_intervals or num_intervals < 1:
        raise ValueError(f"num_intervals must be an integer of at least 1; got {num_intervals}.")
    num_intervals = int(num_intervals)
    values = np.asarray(accuracies, dtype=np.float64).ravel()
    values = np.sort(values[~np.isnan(values)])
    if values.size == 0:
        raise ValueError("accuracies holds no values (all NaN or empty); nothing to accumulate.")
    steps = np.arange(num_intervals + 1)
    shares = np.linspace(0.0, 1.0, num_intervals + 1)
    if rule == "original":
        # The original's float expression int(i * (n / N)), kept as it is so that its rounding is reproduced too.
        ranks = np.array([max(int(step * (values.size / num_intervals)), 1) for step in steps])
        cum_accs = values[ranks - 1]
        cum_accs[0] = 0.0
        return cum_accs, shares
    # Integer ceil(i * n / N): in floats the share 3/5 times 5 classes is 3.0000000000000004, one class too far.
    ranks = np.maximum(-(-steps * values.size // num_intervals), 1)
    return values[ranks - 1], shares


def least_accurate_classes(
    *, accuracies: Any, labels: Sequence[str], threshold: float = 0.8
) -> list[dict[str, Any]]:
    """Classes with accuracy ``<= threshold``, worst first, as ``{"label", "accuracy"}`` dicts for reports.

    Classes without samples (NaN) are left out; ties keep label order.
    """
    values = np.asarray(accuracies, dtype=np.float64).ravel()
    if len(values) != len(labels):
        raise ValueError(f"Got {len(values)} accuracies but {len(labels)} labels; they must match.")
    order = np.argsort(values, kind="stable")
    return [
        {"label": labels[index], "accuracy": float(values[index])}
        for index in order
        if values[index] <= threshold
    ]
