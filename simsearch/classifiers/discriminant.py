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
    precision: matrices.ShrunkInverse
    shrinkage: float


def standardised_spectrum(
    statistics: Statistics, *, samples: Samples | None, device: torch.device | None
) -> tuple[matrices.Spectrum, np.ndarray, int]:
    """``(spectrum, scale, degrees)``: the pooled within-class covariance (``n - C`` degrees of freedom) divided by
    its diagonal's roots ``scale`` on both sides, decomposed from the within-class rows of the ``samples`` where
    they are fewer than the features (:meth:`Statistics.in_sample_space`), else from the scatter matrix."""
    degrees = max(int(statistics.class_counts.sum()) - len(statistics.class_counts), 1)
    if statistics.in_sample_space(samples):
        rows = statistics.within_class_rows(samples) / np.sqrt(degrees)
        variances = np.einsum("ij,ij->j", rows, rows)
    else:
        covariance = statistics.within_class_scatter() / degrees
        variances = np.diag(covariance)
    scale = np.sqrt(np.clip(variances, 0.0, None))
    scale = np.where(scale > 0, scale, 1.0)  # a feature that never varies within a class is left unscaled
    if statistics.in_sample_space(samples):
        return matrices.row_spectrum(rows / scale, device=device), scale, degrees
    return matrices.matrix_spectrum(covariance / np.outer(scale, scale), device=device), scale, degrees


def discriminant(
    statistics: Statistics,
    *,
    shrinkage: float | str,
    prior_strength: float,
    device: torch.device | None,
    samples: Samples | None = None,
) -> Discriminant:
    """``q^T S^-1 m_c - m_c^T S^-1 m_c / 2 + prior_strength log(n_c / n)``, with ``S`` the pooled within-class
    covariance standardised by its diagonal and shrunk towards the identity there by Oracle Approximating Shrinkage
    (``shrinkage="oas"``) or by the ``shrinkage`` given. ``samples``: the statistics' images, if the caller has
    them (see :func:`standardised_spectrum`)."""
    spectrum, scale, degrees = standardised_spectrum(statistics, samples=samples, device=device)
    weight = (ridge_selection.oas_shrinkage(spectrum.all_eigenvalues(), n_samples=degrees)
              if shrinkage == "oas" else float(shrinkage))
    precision = matrices.ShrunkInverse(spectrum, weight=1 - weight, ridge=weight * spectrum.mean_eigenvalue(),
                                       scale=scale)
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
