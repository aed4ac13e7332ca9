"""Scores for queries of no known class, from the additive statistics of the Gram-matrix estimators.

``score_samples`` of :class:`prototypes.DecorrelatedClassifier` (through :class:`UnknownScoreMixin`) and of
:class:`prototypes.DiscriminantClassifier` (through :func:`mahalanobis_scores`): each score is a function of a
:class:`Statistics` tuple (Gram matrix, feature sum, class sums and counts), so adding, removing and merging classes
keep it exact, and a sub-fit without some images is the statistics minus theirs (:meth:`Statistics.without`). That
is what lets ``unknown_score="auto"`` choose among the scores on classes hidden from sub-fits, at the cost of two
Gram matrices and a few Cholesky factorisations instead of refits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from simsearch.classifiers import matrices
from simsearch.classifiers.matrices import compute_device, unit_rows

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


class Statistics(NamedTuple):
    """The additive statistics of a Gram-matrix estimator (``prototypes._GramStatistics``), or of a sub-fit made from
    them by subtraction (:meth:`without`, also the discriminant's folds): all the unknown scores need."""

    gram: np.ndarray
    feature_sum: np.ndarray
    class_sums: np.ndarray
    class_counts: np.ndarray
    n_samples: int

    @property
    def mean(self) -> np.ndarray:
        return self.feature_sum / max(self.n_samples, 1)

    def class_means(self) -> np.ndarray:
        return self.class_sums / self.class_counts[:, None]

    def centred_gram(self) -> np.ndarray:
        return self.gram - self.n_samples * np.outer(self.mean, self.mean)

    def mean_eigenvalue(self) -> float:
        """The centred Gram matrix's mean eigenvalue (its trace over the dimension; 1 for a matrix of zeros): what
        relative ridge strengths multiply."""
        scale = float(np.trace(self.gram) - self.n_samples * self.mean @ self.mean) / len(self.gram)
        return scale if scale > 0 else 1.0

    def without(self, features: np.ndarray, rows: np.ndarray, *, device: torch.device | None) -> Statistics:
        """The statistics of a fit without these fitted images (class ``rows``); classes left empty are dropped.
        One Gram matrix of the removed images, in the features' precision."""
        counts = self.class_counts - np.bincount(rows, minlength=len(self.class_counts))
        sums = self.class_sums - matrices.sums_by_row(features, rows=rows, num_rows=len(counts))
        present = counts > 0
        return Statistics(gram=self.gram - matrices.gram(features, device=device),
                          feature_sum=self.feature_sum - features.sum(axis=0), class_sums=sums[present],
                          class_counts=counts[present], n_samples=self.n_samples - len(features))


def _shrunk_whitener(
    scatter: np.ndarray, *, n_samples: int, device: torch.device | None
) -> Callable[[np.ndarray], np.ndarray]:
    """Rows ``x -> L^-1 x`` with ``L L^T`` the covariance ``scatter / n_samples`` shrunk towards its mean eigenvalue
    (:data:`UNKNOWN_SHRINKAGE`): squared distances between whitened rows are Mahalanobis distances. In the
    precision of ``scatter``."""
    covariance = scatter / max(n_samples, 1)
    scale = float(np.trace(covariance)) / len(covariance)
    ridge = UNKNOWN_SHRINKAGE * (scale if scale > 0 else 1.0)
    return matrices.cholesky_whitener(covariance + ridge * np.eye(len(covariance), dtype=covariance.dtype),
                                      device=device)


def mahalanobis_scores(
    features: np.ndarray, *, centres: np.ndarray, whiten: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Minus the smallest squared distance of each whitened row to a whitened class centre: higher = nearer a known
    class."""
    queries, centres = whiten(features), whiten(centres)
    squared = np.einsum("ij,ij->i", queries, queries)  # no [N, F] temporary
    distances = squared[:, None] - 2 * queries @ centres.T + (centres**2).sum(axis=1)
    return -distances.min(axis=1)


def _within_class_mahalanobis(
    features: np.ndarray, *, statistics: Statistics, device: torch.device | None
) -> np.ndarray:
    """Mahalanobis scores under the shared within-class covariance (``unknown_score="mahalanobis"``), in the
    features' precision."""
    scatter = matrices.within_class_scatter(gram=statistics.gram, class_sums=statistics.class_sums,
                                            class_counts=statistics.class_counts)
    whiten = _shrunk_whitener(scatter.astype(features.dtype), n_samples=statistics.n_samples, device=device)
    return mahalanobis_scores(features, centres=statistics.class_means().astype(features.dtype), whiten=whiten)


def _best_cosines(features: np.ndarray, class_sums: np.ndarray) -> np.ndarray:
    """The best cosine of each L2-normalised row to a class mean (``unknown_score="cosine"``)."""
    return (features @ unit_rows(class_sums).T.astype(features.dtype)).max(axis=1)


def _unknown_components(
    features: np.ndarray, *, statistics: Statistics, alpha: float, device: torch.device | None
) -> np.ndarray:
    """``[N, 2]``: Mahalanobis scores under the total covariance, and the best ridge-regression score onto one-hot
    labels at ``alpha`` (the best cosine for ``inf``): the two parts of the combined unknown score, in the
    features' precision (float32 suffices for moments and for ranking, the covariance being shrunk)."""
    dtype = features.dtype
    mean, centred_gram = statistics.mean.astype(dtype), statistics.centred_gram().astype(dtype)
    whiten = _shrunk_whitener(centred_gram, n_samples=statistics.n_samples, device=device)
    mahalanobis = mahalanobis_scores(features, centres=statistics.class_means().astype(dtype), whiten=whiten)
    if np.isinf(alpha):
        return np.column_stack([mahalanobis, _best_cosines(features, statistics.class_sums)])
    centred_sums = (statistics.class_sums - statistics.class_counts[:, None] * statistics.mean).astype(dtype)
    ridge = centred_gram + float(alpha) * np.eye(len(centred_gram), dtype=dtype)
    directions = matrices.solve_positive(ridge, centred_sums.T, device=device)
    # (x - mean) K P without an [N, F] temporary
    ridge_scores = matrices.product(features, directions, device=device) - mean @ directions
    return np.column_stack([mahalanobis, ridge_scores.max(axis=1)])


def _moments(components: np.ndarray) -> np.ndarray:
    """``[parts, 3]``: count, sum and sum of squares of each column, additive over images (float64 sums)."""
    components = components.astype(np.float64)
    return np.column_stack([np.full(components.shape[1], float(len(components))), components.sum(axis=0),
                            (components**2).sum(axis=0)])


def _standardised_sum(components: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """The combined unknown score: each column standardised by the mean and standard deviation its ``moments``
    (:func:`_moments`) give, added."""
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


class UnknownScoreMixin:
    """The decorrelated classifiers' score for queries of no known class, from the same additive statistics as the
    class vectors, so stores and merges keep it. ``unknown_score="auto"`` chooses it when the estimator starts, by
    hiding classes from sub-fits of those statistics (:meth:`_choose_unknown_score`); the choice
    (``unknown_score_``) and the combined score's standardisation (``unknown_moments_``) are then kept through later
    changes, like the ridge strength.

    The host estimator gives its Gram statistics as one :class:`Statistics` (``_statistics()``), keeps ``alpha_``
    and ``relative_alpha_``, and has the parameters ``unknown_score``, ``random_state`` and ``device``."""

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        """What ``unknown_score_`` names (see :data:`UNKNOWN_CANDIDATES`):

        * ``"combined"``: the two :meth:`unknown_components`, each standardised by its mean and standard deviation
          over the images that started the estimator (``unknown_moments_``), added;
        * ``"mahalanobis"``: :meth:`within_class_mahalanobis`, also the score of estimators restored from
          statistics saved without ``unknown_moments`` (whose threshold was set on it);
        * ``"cosine"``: the best cosine to a class mean, the article's own score.
        """
        features = self._query_features(X)
        if self.unknown_score_ == "cosine":
            return _best_cosines(features, self.class_sums_)
        if self.unknown_score_ == "mahalanobis":
            return self.within_class_mahalanobis(features)
        return _standardised_sum(self.unknown_components(features), self.unknown_moments_)

    def unknown_components(self, features: np.ndarray) -> np.ndarray:
        """``[N, 2]`` for :meth:`query_features` rows: minus the smallest Mahalanobis distance to a class mean under
        the total covariance (shrunk towards its mean eigenvalue), and the best ridge-regression score onto one-hot
        labels at ``alpha_`` (the plain class mean's best cosine where ``alpha_`` is ``inf``)."""
        return _unknown_components(features, statistics=self._statistics(), alpha=self.alpha_,
                                   device=compute_device(self.device))

    def unknown_moments(self, X: Any) -> np.ndarray:
        """``[2, 3]`` (count, sum, sum of squares) of each :meth:`unknown_components` over the images ``X``, computed
        in float32 (standardising constants need no more): additive, so shards scored apart against merged
        statistics sum to the moments of a single fit (see :meth:`set_unknown_moments`)."""
        check_is_fitted(self)
        return _moments(self.unknown_components(self.query_features(X).astype(np.float32)))

    def set_unknown_moments(self, moments: np.ndarray) -> UnknownScoreMixin:
        """Install :meth:`unknown_moments` summed over every fitted image (what ``fit`` computes itself)."""
        moments = np.asarray(moments, dtype=np.float64)
        if moments.shape != (2, 3) or (moments[:, 0] < 1).any():
            raise ValueError(f"the unknown-score moments must be 2 x 3 with counts of at least 1, got "
                             f"{moments.tolist()}.")
        self.unknown_moments_ = moments
        if hasattr(self, "threshold_"):
            self.threshold_stale_ = True
        return self

    def within_class_mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """Minus the smallest Mahalanobis distance of :meth:`query_features` rows to a class mean under the shared
        within-class covariance, shrunk towards its mean eigenvalue (OpenOOD's MDS family on L2-normalised
        features): a query far from every class in the directions the classes do not vary along scores low.

        The within-class scatter comes from the additive statistics, ``G_raw - sum_c S_c S_c^T / n_c``, so adding
        or removing a class keeps it exact (a class removed without its images leaves them in it, uncentred).
        """
        return _within_class_mahalanobis(features, statistics=self._statistics(), device=compute_device(self.device))

    def _start_unknown_score(self, features: np.ndarray, rows: np.ndarray) -> None:
        """Fix the unknown score on the images that start the estimator: the named one, or for ``"auto"`` the
        choice of :meth:`_choose_unknown_score`; the combined score's moments over those images."""
        self.unknown_score_ = (self.unknown_score if self.unknown_score != "auto"
                               else self._choose_unknown_score(features, rows))
        if self.unknown_score_ == "combined":
            self.unknown_moments_ = _moments(self.unknown_components(features.astype(np.float32)))

    def _saved_unknown_score(self, arrays: dict[str, np.ndarray]) -> str:
        """The unknown score of restored statistics: a named ``unknown_score`` wins, ``"auto"`` takes the saved
        choice. Statistics saved before the choice existed keep the score their threshold was set on: the
        within-class Mahalanobis distance where they lack the combined score's moments."""
        fallback = "combined" if "unknown_moments" in arrays else "mahalanobis"
        if self.unknown_score != "auto":
            return fallback if self.unknown_score == "combined" else self.unknown_score
        if "unknown_score" not in arrays:
            return fallback
        choice = str(np.asarray(arrays["unknown_score"]))
        if choice not in UNKNOWN_CANDIDATES:
            raise ValueError(f"the statistics' unknown score {choice!r} is none of "
                             f"{', '.join(map(repr, UNKNOWN_CANDIDATES))}")
        if choice == "combined" and "unknown_moments" not in arrays:
            raise ValueError("the statistics' combined unknown score lacks its moments (unknown_moments)")
        return choice

    def _choose_unknown_score(self, features: np.ndarray, rows: np.ndarray) -> str:
        """The candidate of :data:`UNKNOWN_CANDIDATES` with the best mean AUROC over :data:`UNKNOWN_CHOICE_DRAWS`
        draws seeded by ``random_state``, if it beats the first (``"combined"``) in every draw by more than one
        standard error of that draw's difference; else, and where no draw is possible, the first. Each draw scores
        held-out images of fitted classes (known) and images of hidden classes (unknown) against the statistics
        minus all of them, at the chosen relative ridge, in float32 (:func:`choice_draws`).

        Every draw must agree because which classes are hidden moves the AUROCs more than the queries' own noise:
        on Caltech-101 the three candidates trade places from draw to draw within 0.01, and a rule on the mean
        gain followed that noise to the best cosine, 0.004 below the combined score on new classes."""
        statistics, device = self._statistics(), compute_device(self.device)
        features = features.astype(np.float32)
        aurocs, errors = [], []
        generator = check_random_state(self.random_state)
        for removed, known, unknown, fitting in choice_draws(rows, generator=generator):
            kept = statistics.without(features[removed], rows[removed], device=device)
            queries = features[np.concatenate([known, unknown])]
            components = _unknown_components(np.concatenate([features[fitting], queries]), statistics=kept,
                                             alpha=self.relative_alpha_ * kept.mean_eigenvalue(), device=device)
            scores = {"combined": _standardised_sum(components[len(fitting):], _moments(components[:len(fitting)])),
                      "mahalanobis": _within_class_mahalanobis(queries, statistics=kept, device=device),
                      "cosine": _best_cosines(queries, kept.class_sums)}
            truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
            aurocs.append([roc_auc_score(truth, scores[name]) for name in UNKNOWN_CANDIDATES])
            errors.append([auroc_standard_error(auroc, positives=len(known), negatives=len(unknown))
                           for auroc in aurocs[-1]])
        if not aurocs:
            return UNKNOWN_CANDIDATES[0]
        return UNKNOWN_CANDIDATES[clear_winner(np.asarray(aurocs), errors=np.asarray(errors))]
