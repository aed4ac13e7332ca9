"""The shrinkage linear discriminant of ``prototypes.DiscriminantClassifier`` as functions of the additive statistics
(:class:`~simsearch.classifiers.statistics.Statistics`): the discriminant itself, and its check against the class
mean on folds made by subtraction."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from simsearch.classifiers import matrices, probabilities, ridge_selection
from simsearch.classifiers.matrices import unit_rows
from simsearch.classifiers.statistics import Samples, Statistics


class Discriminant(NamedTuple):
    """Class vectors ``weights [C, F]``, ``bias [C]``; the shrunk inverse covariance ``precision`` (whose
    ``whitening()`` maps queries for Mahalanobis distances) and the shrinkage in use."""

    weights: np.ndarray
    bias: np.ndarray
    precision: matrices.ShrunkInverse | matrices.RowShrunkInverse
    shrinkage: float


def shrunk_precision(
    statistics: Statistics, *, shrinkage: float | str, samples: Samples | None, device: torch.device | None
) -> tuple[matrices.ShrunkInverse | matrices.RowShrunkInverse, float]:
    """The inverse of the pooled within-class covariance (``n - C`` degrees of freedom) divided by its diagonal's
    roots on both sides and shrunk towards the identity there, by Oracle Approximating Shrinkage
    (``shrinkage="oas"``, from two traces) or by the ``shrinkage`` given; and that shrinkage. From the
    within-class rows of the ``samples`` where they are fewer than the features (:meth:`Statistics.in_sample_space`:
    Woodbury's identity on their ``n x n`` Gram matrix, no eigendecomposition), else from the scatter's spectrum."""
    degrees = max(int(statistics.class_counts.sum()) - len(statistics.class_counts), 1)
    if statistics.in_sample_space(samples):
        rows = statistics.within_class_rows(samples) / np.sqrt(degrees)
        scale = _roots(np.einsum("ij,ij->j", rows, rows))
        rows = rows / scale
        gram = matrices.product(rows, rows.T, device=device)
        trace, dimension = float(np.trace(gram)), rows.shape[1]
        weight = (ridge_selection.oas_shrinkage_of_traces(trace=trace, square_trace=float(np.sum(gram**2)),
                                                          dimension=dimension, n_samples=degrees)
                  if shrinkage == "oas" else float(shrinkage))
        ridge = weight * matrices.mean_eigenvalue(trace=trace, dimension=dimension)
        return matrices.RowShrunkInverse(rows, gram, weight=1 - weight, ridge=ridge, scale=scale,
                                         device=device), weight
    covariance = statistics.within_class_scatter() / degrees
    scale = _roots(np.diag(covariance))
    spectrum = matrices.matrix_spectrum(covariance / np.outer(scale, scale), device=device)
    weight = (ridge_selection.oas_shrinkage(spectrum.all_eigenvalues(), n_samples=degrees)
              if shrinkage == "oas" else float(shrinkage))
    return matrices.ShrunkInverse(spectrum, weight=1 - weight, ridge=weight * spectrum.mean_eigenvalue(),
                                  scale=scale), weight


def _roots(variances: np.ndarray) -> np.ndarray:
    """The standardising scale: roots of the variances, 1 for a feature that never varies within a class."""
    scale = np.sqrt(np.clip(variances, 0.0, None))
    return np.where(scale > 0, scale, 1.0)


def discriminant(
    statistics: Statistics,
    *,
    shrinkage: float | str,
    prior_strength: float,
    device: torch.device | None,
    samples: Samples | None = None,
) -> Discriminant:
    """``q^T S^-1 m_c - m_c^T S^-1 m_c / 2 + prior_strength log(n_c / n)``, with ``S^-1`` the
    :func:`shrunk_precision`. ``samples``: the statistics' images, if the caller has them."""
    precision, weight = shrunk_precision(statistics, shrinkage=shrinkage, samples=samples, device=device)
    means = statistics.class_means()
    weights = precision.apply(means)
    prior = np.log(statistics.class_counts / statistics.class_counts.sum())
    bias = -0.5 * np.einsum("ij,ij->i", means, weights) + prior_strength * prior
    return Discriminant(weights=weights, bias=bias, precision=precision, shrinkage=weight)


class FoldCheck(NamedTuple):
    """The discriminant's check against the class mean: whether it won, and each one's held-out scores, which the
    temperature of the winner's probabilities reuses."""

    beats: bool
    discriminant: probabilities.HeldOut
    class_mean: probabilities.HeldOut


def check_against_the_class_mean(
    statistics: Statistics,
    features: np.ndarray,
    rows: np.ndarray,
    *,
    shrinkage: float | str,
    prior_strength: float,
    balanced: bool,
    device: torch.device | None,
) -> FoldCheck:
    """Whether the discriminant beats the cosine to the class means by more than one standard error over three
    seeded, stratified folds of the fitted images ``features`` (class ``rows``), scored as accuracy or, with
    ``balanced``, balanced accuracy. Each fold's statistics are the whole ones minus its held-out images': one Gram
    matrix of a third of the images, no refit."""
    folds = probabilities.stratified_folds(rows)
    hits = np.zeros((2, len(rows)))
    held = [probabilities.HeldOut.empty(len(rows), len(statistics.classes)) for _ in range(2)]
    for fold in range(probabilities.FOLDS):
        held_out = folds == fold
        present = np.unique(rows[~held_out])  # the classes the fold's statistics keep, in order
        if len(present) < 2 or not held_out.any():
            return FoldCheck(False, *held)  # too few images to tell: keep the article's class mean
        kept, kept_samples = statistics.without_samples(Samples(features, rows), held_out, device=device)
        fitted = discriminant(kept, shrinkage=shrinkage, prior_strength=prior_strength, device=device,
                              samples=kept_samples)
        queries, images = features[held_out], np.flatnonzero(held_out)
        for number, scores in enumerate((queries @ fitted.weights.T + fitted.bias,
                                         queries @ unit_rows(kept.class_sums).T)):
            hits[number, held_out] = present[scores.argmax(axis=1)] == rows[held_out]
            held[number].scores[np.ix_(images, present)] = scores
            held[number].scored[images] = True
    weights = ridge_selection.metric_weights(rows, balanced=balanced)
    return FoldCheck(ridge_selection.beats(hits[0], hits[1], weights=weights), *held)
