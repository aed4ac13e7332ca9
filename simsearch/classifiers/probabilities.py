"""Probabilities from class scores, and how far they can be trusted: functions of arrays.

A class-vector classifier's scores (a cosine, a ridge output, a discriminant) have no scale that means anything
outside it. One temperature ``T`` turns them into probabilities, ``softmax(scores / T)``: a single parameter keeps
the ranking (so the accuracy) exactly as it is and cannot overfit the few images a class may have. ``T`` is chosen
to minimise the log loss of scores that the training images get from fits that did not see them (held-out folds,
:func:`stratified_folds`, or leave-one-out where an estimator has it exactly), never of the validation images. The
expected calibration error (:func:`calibration_error`) and the log loss (:func:`log_loss`) then say how well the
probabilities match the frequencies of being right.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.special

FOLDS = 3  # the held-out folds of the starting images: temperature and the discriminant's check share them
CALIBRATION_BINS = 15  # equal-width confidence bins of the calibration error and the reliability diagram
# log10 of the temperature's search range, relative to the spread of the scores: wide enough for a cosine (spread
# ~0.1) and a discriminant (spread ~100) alike
LOG_RANGE = (-4.0, 4.0)


def stratified_folds(rows: np.ndarray, *, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """The fold (``0 .. folds - 1``) of each image of class rows ``rows``: seeded, each class dealt round-robin
    over the folds, so every fold holds about a ``1/folds`` share of every class."""
    assigned = np.empty(len(rows), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(rows))
    for row in np.unique(rows):
        members = order[rows[order] == row]
        assigned[members] = np.arange(len(members)) % folds
    return assigned


class HeldOut(NamedTuple):
    """Scores ``[N, C]`` that the starting images got from fits without them (``-inf`` for a class their fold
    lost), and which images a fold scored (``[N]``): what the temperature is fitted on."""

    scores: np.ndarray
    scored: np.ndarray

    @classmethod
    def empty(cls, images: int, classes: int) -> HeldOut:
        return cls(scores=np.full((images, classes), -np.inf), scored=np.zeros(images, dtype=bool))

    def temperature(self, rows: np.ndarray) -> float:
        """:func:`fit_temperature` on the scored images (true classes ``rows``)."""
        return fit_temperature(self.scores[self.scored], rows[self.scored])


def softmax(scores: np.ndarray, *, temperature: float) -> np.ndarray:
    """``[N, C]`` probabilities of ``scores / temperature``, each row summing to 1 (stable for any scale)."""
    return scipy.special.softmax(np.asarray(scores, dtype=np.float64) / temperature, axis=1)


def fit_temperature(scores: np.ndarray, rows: np.ndarray) -> float:
    """The temperature that minimises the mean log loss of held-out ``scores`` ``[N, C]`` whose true columns are
    ``rows`` (``-inf`` for a class that cannot be chosen); 1.0 where nothing can be learnt (no scores, or all
    equal)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]  # a class a fold lost scores -inf: it takes no probability
    spread = float(np.std(finite)) if finite.size else 0.0
    if not len(rows) or spread == 0.0:
        return 1.0
    true_scores = scores[np.arange(len(rows)), rows]

    def mean_log_loss(log_temperature: float) -> float:
        scaled = scores / (spread * 10.0**log_temperature)
        return float(np.mean(scipy.special.logsumexp(scaled, axis=1) - true_scores / (spread * 10.0**log_temperature)))

    best = scipy.optimize.minimize_scalar(mean_log_loss, bounds=LOG_RANGE, method="bounded",
                                          options={"xatol": 1e-4})
    return float(spread * 10.0**best.x)


class Reliability(NamedTuple):
    """Per confidence bin: its images, their mean confidence and the share of them classified right (NaN where a
    bin is empty); what the calibration error sums and the reliability diagram draws."""

    edges: np.ndarray  # [bins + 1]
    counts: np.ndarray  # [bins]
    confidence: np.ndarray  # [bins]
    accuracy: np.ndarray  # [bins]


def top_confidence(probabilities: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's top probability and whether its top class is its true one (``rows``): all that calibration
    judges, so partitions whose classes differ pool by concatenating these."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(rows)


def reliability(confidence: np.ndarray, right: np.ndarray, *, bins: int = CALIBRATION_BINS) -> Reliability:
    """Bin every image by its top probability ``confidence`` (equal-width bins over [0, 1]) and compare each bin's
    mean confidence with its share of ``right`` answers."""
    confidence, right = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=right, minlength=bins) / counts
    return Reliability(edges=edges, counts=counts, confidence=mean_confidence, accuracy=accuracy)


def binned_error(binned: Reliability) -> float:
    """The image-weighted mean gap between confidence and accuracy over the filled bins."""
    filled = binned.counts > 0
    gaps = np.abs(binned.confidence[filled] - binned.accuracy[filled])
    return float(gaps @ binned.counts[filled] / binned.counts.sum())


def calibration_error(probabilities: np.ndarray, rows: np.ndarray, *, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: the image-weighted mean gap between confidence and accuracy over ``bins``
    equal-width bins of the top probability (Guo et al. 2017); 0 is perfect."""
    return binned_error(reliability(*top_confidence(probabilities, rows), bins=bins))


def log_loss(probabilities: np.ndarray, rows: np.ndarray) -> float:
    """Mean negative natural log of the true class's probability, clipped at ``1e-15`` as scikit-learn's
    ``log_loss`` does (which refuses a single class, as one validation part may hold)."""
    true = np.asarray(probabilities, dtype=np.float64)[np.arange(len(rows)), rows]
    return float(np.mean(-np.log(np.clip(true, 1e-15, 1.0))))
