"""Scores for queries of no known class, as functions of the additive statistics of the Gram-matrix estimators.

``score_samples`` of ``prototypes.DecorrelatedClassifier`` (:func:`unknown_scores`) and of
``prototypes.DiscriminantClassifier`` (:func:`mahalanobis_scores`): each score is a function of a
:class:`~simsearch.classifiers.statistics.Statistics` value, so adding, removing and merging classes keep it exact,
and a sub-fit without some images is the statistics minus theirs (``Statistics.without``). That is what lets
``unknown_score="auto"`` choose among the scores on classes hidden from sub-fits (:func:`choose_unknown_score`), at
the cost of two Gram matrices and a few Cholesky factorisations instead of refits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.utils import check_random_state

from simsearch.classifiers import matrices
from simsearch.classifiers.matrices import unit_rows
from simsearch.classifiers.statistics import Samples, Statistics

# Shrinkage of the covariance behind the decorrelated classifiers' Mahalanobis distances, as a multiple of its mean
# eigenvalue: measured on Caltech-101 with 20 hidden classes (benchmarks/open_set.py), 0.3 to 10 score alike.
UNKNOWN_SHRINKAGE = 1.0

# The decorrelated classifiers' unknown scores: "combined" standardises and adds two that fail on different data
# (a Mahalanobis distance under the total covariance, the best ridge score), "mahalanobis" is the shared
# within-class Mahalanobis distance alone, "cosine" the best cosine to a class mean. ``unknown_score="auto"``
# (default) chooses among them on the fitting images, keeping the first unless another clearly beats it.
UNKNOWN_CANDIDATES = ("combined", "mahalanobis", "cosine")
UNKNOWN_SCORES = ("auto", *UNKNOWN_CANDIDATES)
# The draws of that choice: this share of the classes hidden (Caltech-101: 20 of 101), seeded by ``random_state``;
# each sample of queries capped, so the choice costs about two float32 sub-fits whatever the set's size.
UNKNOWN_CHOICE_DRAWS = 2
UNKNOWN_HIDDEN_SHARE = 0.2
UNKNOWN_CHOICE_QUERIES = 500


def _shrinkage_ridge(*, trace: float, dimension: int, n_samples: int) -> float:
    """:data:`UNKNOWN_SHRINKAGE` times the mean eigenvalue of the covariance of scatter trace ``trace`` over
    ``n_samples`` images (1 for a covariance of zeros): the ridge both forms of the shrunk distances add."""
    return UNKNOWN_SHRINKAGE * matrices.mean_eigenvalue(trace=trace / max(n_samples, 1), dimension=dimension)


def _shrunk_whitener(
    scatter: np.ndarray, *, n_samples: int, device: torch.device | None
) -> Callable[[np.ndarray], np.ndarray]:
    """Rows ``x -> L^-1 x`` with ``L L^T`` the covariance ``scatter / n_samples`` shrunk towards its mean eigenvalue
    (:data:`UNKNOWN_SHRINKAGE`): squared distances between whitened rows are Mahalanobis distances. In the
    precision of ``scatter``."""
    covariance = scatter / max(n_samples, 1)
    ridge = _shrinkage_ridge(trace=float(np.trace(scatter)), dimension=len(scatter), n_samples=n_samples)
    return matrices.cholesky_whitener(covariance + ridge * np.eye(len(covariance), dtype=covariance.dtype),
                                      device=device)


Distances = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (queries [N, F], centres [C, F]) -> [N, C] squared


def shrunk_distances(
    statistics: Statistics,
    *,
    within: bool,
    dtype: np.dtype,
    samples: Samples | None,
    spectrum: matrices.Spectrum | None,
    device: torch.device | None,
) -> Distances:
    """Squared Mahalanobis distances under the total covariance (``within=False``: the centred Gram matrix over
    the image count) or the within-class one, shrunk by :data:`UNKNOWN_SHRINKAGE` times its mean eigenvalue. From
    the ``samples``' own space where they are fewer than the features (the centred Gram matrix's ``spectrum`` if
    the caller has it), else by one Cholesky factorisation of the ``F x F`` matrix in ``dtype``."""
    n_samples = max(statistics.n_samples, 1)
    if statistics.in_sample_space(samples):
        if within:
            spectrum = matrices.row_spectrum(statistics.within_class_rows(samples), device=device)
        elif spectrum is None:
            spectrum = statistics.centred_spectrum(samples, device=device)
        ridge = _shrinkage_ridge(trace=float(spectrum.eigenvalues.sum()), dimension=spectrum.dimension,
                                 n_samples=n_samples)
        return matrices.ShrunkInverse(spectrum, weight=1.0 / n_samples, ridge=ridge).squared_distances
    scatter = statistics.within_class_scatter() if within else statistics.centred_gram()
    whiten = _shrunk_whitener(scatter.astype(dtype), n_samples=n_samples, device=device)
    return lambda queries, centres: matrices.squared_distances(whiten(queries), whiten(centres))


def mahalanobis_scores(features: np.ndarray, *, centres: np.ndarray, distances: Distances) -> np.ndarray:
    """Minus the smallest squared distance of each row to a class centre: higher = nearer a known class."""
    return -distances(features, centres.astype(features.dtype)).min(axis=1)


def within_class_mahalanobis(
    features: np.ndarray, *, statistics: Statistics, device: torch.device | None, samples: Samples | None = None
) -> np.ndarray:
    """Mahalanobis scores under the shared within-class covariance (``unknown_score="mahalanobis"``), in the
    features' precision; ``samples``: the statistics' images, if the caller has them."""
    distances = shrunk_distances(statistics, within=True, dtype=features.dtype, samples=samples, spectrum=None,
                                 device=device)
    return mahalanobis_scores(features, centres=statistics.class_means(), distances=distances)


def best_cosines(features: np.ndarray, class_sums: np.ndarray) -> np.ndarray:
    """The best cosine of each L2-normalised row to a class mean (``unknown_score="cosine"``)."""
    return (features @ unit_rows(class_sums).T.astype(features.dtype)).max(axis=1)


def unknown_components(
    features: np.ndarray,
    *,
    statistics: Statistics,
    alpha: float,
    device: torch.device | None,
    samples: Samples | None = None,
) -> np.ndarray:
    """``[N, 2]``: Mahalanobis scores under the total covariance, and the best ridge-regression score onto one-hot
    labels at ``alpha`` (the best cosine for ``inf``): the two parts of the combined unknown score, in the
    features' precision (float32 suffices for moments and for ranking, the covariance being shrunk). ``samples``:
    the statistics' images, if the caller has them; fewer than the features, one ``n x n`` eigendecomposition
    serves both parts."""
    dtype = features.dtype
    spectrum = statistics.centred_spectrum(samples, device=device) if statistics.in_sample_space(samples) else None
    distances = shrunk_distances(statistics, within=False, dtype=dtype, samples=samples, spectrum=spectrum,
                                 device=device)
    mahalanobis = mahalanobis_scores(features, centres=statistics.class_means(), distances=distances)
    if np.isinf(alpha):
        return np.column_stack([mahalanobis, best_cosines(features, statistics.class_sums)])
    mean = statistics.mean.astype(dtype)
    centred_sums = statistics.class_sums - statistics.class_counts[:, None] * statistics.mean
    if spectrum is not None:  # the sums lie in the centred images' span: the thin spectrum solves exactly
        directions = matrices.ShrunkInverse(spectrum, weight=1.0, ridge=float(alpha)).apply(centred_sums).T
    else:
        centred_gram = statistics.centred_gram().astype(dtype)
        ridge = centred_gram + float(alpha) * np.eye(len(centred_gram), dtype=dtype)
        directions = matrices.solve_positive(ridge, centred_sums.astype(dtype).T, device=device)
    directions = directions.astype(dtype)
    # (x - mean) K P without an [N, F] temporary
    ridge_scores = matrices.product(features, directions, device=device) - mean @ directions
    return np.column_stack([mahalanobis, ridge_scores.max(axis=1)])


def moments(components: np.ndarray) -> np.ndarray:
    """``[parts, 3]``: count, sum and sum of squares of each column, additive over images (float64 sums)."""
    components = components.astype(np.float64)
    return np.column_stack([np.full(components.shape[1], float(len(components))), components.sum(axis=0),
                            (components**2).sum(axis=0)])


def standardised_sum(components: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """The combined unknown score: each column standardised by the mean and standard deviation its ``moments``
    (:func:`moments`) give, added."""
    counts, sums, squares = moments.T
    means = sums / counts
    deviations = np.sqrt(np.maximum(squares / counts - means**2, 0.0))
    return ((components - means) / np.where(deviations > 0, deviations, 1.0)).sum(axis=1)


def choice_draws(
    rows: np.ndarray, *, generator: np.random.RandomState
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(removed mask, known, unknown, fitting)`` image indexes of each draw that chooses the unknown score.
    :data:`UNKNOWN_HIDDEN_SHARE` of the classes are hidden (at least one; two kept): their images are removed and
    are the unknown queries. Known queries are held out from the other classes, at most a third of each, and
    removed too; the moments of a sub-fit are taken over the images left (``fitting``). Each sample is capped at
    :data:`UNKNOWN_CHOICE_QUERIES` images, so the cost does not grow with the set."""
    counts = np.bincount(rows)
    present = np.flatnonzero(counts)
    hidden_count = min(max(1, round(UNKNOWN_HIDDEN_SHARE * len(present))), len(present) - 2)
    if hidden_count < 1:
        return
    starts = np.cumsum(counts) - counts
    for _ in range(UNKNOWN_CHOICE_DRAWS):
        hidden = np.isin(rows, generator.choice(present, hidden_count, replace=False))
        shuffled = generator.permutation(len(rows))
        by_class = shuffled[np.argsort(rows[shuffled], kind="stable")]
        rank = np.empty(len(rows), dtype=np.int64)
        rank[by_class] = np.arange(len(rows)) - starts[rows[by_class]]
        known = _at_most(np.flatnonzero(~hidden & (rank < counts[rows] // 3)), generator=generator)
        if not len(known):
            continue
        removed = hidden.copy()
        removed[known] = True
        yield (removed, known, _at_most(np.flatnonzero(hidden), generator=generator),
               _at_most(np.flatnonzero(~removed), generator=generator))


def clear_winner(aurocs: np.ndarray, *, errors: np.ndarray) -> int:
    """Of ``aurocs`` ``[draws, candidates]`` with their standard ``errors``, the candidate with the best mean if it
    beats the first in every draw by more than one standard error of that draw's difference; else the first."""
    best = int(np.argmax(aurocs.mean(axis=0)))
    gains, noise = aurocs[:, best] - aurocs[:, 0], np.sqrt(errors[:, best] ** 2 + errors[:, 0] ** 2)
    return best if (gains > noise).all() else 0


def auroc_standard_error(auroc: float, *, positives: int, negatives: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUROC from these numbers of known and unknown queries: a
    closed form, conservative for the difference of two scores on the same queries (their errors correlate)."""
    first, second = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (positives - 1) * (first - auroc**2)
                + (negatives - 1) * (second - auroc**2)) / (positives * negatives)
    return float(np.sqrt(max(variance, 0.0)))


def _at_most(indexes: np.ndarray, *, generator: np.random.RandomState) -> np.ndarray:
    """A seeded sample of :data:`UNKNOWN_CHOICE_QUERIES` of ``indexes``, or all of them where they are fewer."""
    if len(indexes) <= UNKNOWN_CHOICE_QUERIES:
        return indexes
    return np.sort(generator.choice(indexes, UNKNOWN_CHOICE_QUERIES, replace=False))


def query_scores(
    features: np.ndarray,
    *,
    score: str,
    statistics: Statistics,
    alpha: float,
    moments_of_start: np.ndarray | None,
    device: torch.device | None,
) -> np.ndarray:
    """The unknown score ``score`` (see :data:`UNKNOWN_CANDIDATES`) of query features:

    * ``"combined"``: the two :func:`unknown_components` at ridge ``alpha``, each standardised by its mean and
      standard deviation over the images that started the estimator (``moments_of_start``), added;
    * ``"mahalanobis"``: :func:`within_class_mahalanobis`, also the score of estimators restored from statistics
      saved without the combined score's moments (whose threshold was set on it);
    * ``"cosine"``: the best cosine to a class mean, the article's own score.
    """
    if score == "cosine":
        return best_cosines(features, statistics.class_sums)
    if score == "mahalanobis":
        return within_class_mahalanobis(features, statistics=statistics, device=device)
    return standardised_sum(unknown_components(features, statistics=statistics, alpha=alpha, device=device),
                            moments_of_start)


def checked_moments(moments: np.ndarray) -> np.ndarray:
    """Moments of the combined score's components summed over every fitted image, refused unless ``[2, 3]`` with
    counts of at least 1 (they may come from a file or from shards)."""
    moments = np.asarray(moments, dtype=np.float64)
    if moments.shape != (2, 3) or (moments[:, 0] < 1).any():
        raise ValueError(f"the unknown-score moments must be 2 x 3 with counts of at least 1, got {moments.tolist()}.")
    return moments


def saved_unknown_score(arrays: dict[str, np.ndarray], *, requested: str) -> str:
    """The unknown score of restored statistics: a ``requested`` score wins, ``"auto"`` takes the saved choice.
    Statistics saved before the choice existed keep the score their threshold was set on: the within-class
    Mahalanobis distance where they lack the combined score's moments."""
    fallback = "combined" if "unknown_moments" in arrays else "mahalanobis"
    if requested != "auto":
        return fallback if requested == "combined" else requested
    if "unknown_score" not in arrays:
        return fallback
    choice = str(np.asarray(arrays["unknown_score"]))
    if choice not in UNKNOWN_CANDIDATES:
        raise ValueError(f"the statistics' unknown score {choice!r} is none of "
                         f"{', '.join(map(repr, UNKNOWN_CANDIDATES))}")
    if choice == "combined" and "unknown_moments" not in arrays:
        raise ValueError("the statistics' combined unknown score lacks its moments (unknown_moments)")
    return choice


def choose_unknown_score(
    statistics: Statistics,
    features: np.ndarray,
    rows: np.ndarray,
    *,
    relative_alpha: float,
    random_state: Any,
    device: torch.device | None,
) -> str:
    """The candidate of :data:`UNKNOWN_CANDIDATES` with the best mean AUROC over :data:`UNKNOWN_CHOICE_DRAWS` draws
    seeded by ``random_state``, if it beats the first (``"combined"``) in every draw by more than one standard error
    of that draw's difference; else, and where no draw is possible, the first. Each draw scores held-out images of
    fitted classes (known) and images of hidden classes (unknown) against the statistics minus all of them, at the
    chosen relative ridge, in float32 (:func:`choice_draws`).

    Every draw must agree because which classes are hidden moves the AUROCs more than the queries' own noise: on
    Caltech-101 the three candidates trade places from draw to draw within 0.01, and a rule on the mean gain
    followed that noise to the best cosine, 0.004 below the combined score on new classes."""
    features = features.astype(np.float32)
    aurocs, errors = [], []
    for removed, known, unknown, fitting in choice_draws(rows, generator=check_random_state(random_state)):
        kept, kept_samples = statistics.without_samples(Samples(features, rows), removed, device=device)
        queries = features[np.concatenate([known, unknown])]
        components = unknown_components(np.concatenate([features[fitting], queries]), statistics=kept,
                                        alpha=relative_alpha * kept.mean_eigenvalue(), device=device,
                                        samples=kept_samples)
        scores = {"combined": standardised_sum(components[len(fitting):], moments(components[:len(fitting)])),
                  "mahalanobis": within_class_mahalanobis(queries, statistics=kept, device=device,
                                                          samples=kept_samples),
                  "cosine": best_cosines(queries, kept.class_sums)}
        truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
        aurocs.append([roc_auc_score(truth, scores[name]) for name in UNKNOWN_CANDIDATES])
        errors.append([auroc_standard_error(auroc, positives=len(known), negatives=len(unknown))
                       for auroc in aurocs[-1]])
    if not aurocs:
        return UNKNOWN_CANDIDATES[0]
    return UNKNOWN_CANDIDATES[clear_winner(np.asarray(aurocs), errors=np.asarray(errors))]
