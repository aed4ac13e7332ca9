"""Class-vector classifiers on embedding matrices, with the scikit-learn estimator API.

Every estimator here keeps *additive* statistics per class (a float64 sum of the class's feature vectors and an
image count) and, where it needs them, shared ones (a Gram matrix, a feature sum, a sample count). Additive
statistics are what make the article's promise hold: a class can be added (``partial_fit`` with a new label),
extended (``partial_fit`` with more images), removed (``remove_class``) or renamed (``rename_class``) without
touching the other classes, and fitting in batches equals fitting at once up to float64 rounding.

* :class:`ClassMeanClassifier` is the article's method: one mean embedding per class, cosine similarity.
* :class:`DecorrelatedClassifier` L2-normalises and centres the embeddings, then scores a query ``q`` by
  ``q (G + alpha I)^-1 P`` with ``G`` the centred Gram matrix and ``P`` the centred class sums (ridge regression
  onto one-hot labels, closed form, no training loop; SimpleShot's centring, RanPAC's decorrelation). That score
  carries the class prior (``P_c`` grows with the class's image count); ``prior="balanced"`` scores the cosine
  between the ridge-whitened query and the ridge-whitened class *mean* instead, so a class added with one image
  weighs as much as one with a thousand. ``alpha`` is picked on the training images alone (closed-form
  leave-one-out, with the plain class mean among the candidates, or generalised cross-validation).

Every estimator also says how much a query looks like a known class (:meth:`score_samples`, higher = known: the
best cosine for the class mean; for the decorrelated ones the best of three scores on classes hidden from sub-fits
of the training images, by default a Mahalanobis distance plus the best ridge-regression score), and
:meth:`calibrate` sets the threshold below which ``predict(X, reject=True)`` answers "none of these".

Both score queries linearly in their L2-normalised (optionally randomly projected) features:
``scores = features(X) @ weights.T + bias``; :meth:`class_vectors` returns that pair, which is all a search
backend (torch or FAISS) needs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import sklearn.base
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from simsearch.classifiers import (
    discriminant,
    matrices,
    probabilities,
    ridge_selection,
    statistics,
    unknown_scores,
)
from simsearch.classifiers.matrices import compute_device, torch_device, unit_rows
from simsearch.classifiers.ridge_selection import ALPHA_RULES
from simsearch.classifiers.statistics import Samples, Statistics

__all__ = [
    "AUTO_CANDIDATES",
    "AutoClassifier",
    "CLASSIFIERS",
    "ClassMeanClassifier",
    "DecorrelatedClassifier",
    "DiscriminantClassifier",
    "cosine_top_k",
    "classifier_name",
    "make_classifier",
    "margins",
    "merge_statistics",
    "model_params",
    "predict_topk",
    "probability_quality",
    "labelled_probabilities",
    "describe_choice",
    "ranked_scores",
    "top_scores",
    "torch_device",
    "unit_rows",
    "unknown_label",
]

# Ridge strengths tried by generalised cross-validation, as multiples of the mean eigenvalue of the centred Gram
# matrix: relative values fit any number of images, since the eigenvalues grow with it.
RELATIVE_ALPHAS = tuple(float(value) for value in np.logspace(-4, 2, 25))


# Fitted attributes of :meth:`_LinearClassVectors.calibrate`, saved with the statistics when present (estimators
# calibrated before ``calibration_count_`` existed lack it).
CALIBRATION_NAMES = ("threshold_", "true_positive_rate_", "threshold_stale_", "calibration_count_")

UNKNOWN_TEXT_LABEL = "unknown"  # what ``predict(reject=True)`` answers among text labels; no class may be named so


def unknown_label(classes: np.ndarray) -> str | int:
    """The label ``predict(reject=True)`` gives a query of no known class: ``"unknown"`` among text labels, ``-1``
    among numbers; refused when a class already has that name."""
    label: str | int = UNKNOWN_TEXT_LABEL if np.asarray(classes).dtype.kind in "USO" else -1
    if label in np.asarray(classes).tolist():
        raise ValueError(f"A class is named {label!r}, the label reserved for queries of no known class; rename it.")
    return label


def _calibration_number(arrays: dict[str, np.ndarray], name: str) -> float:
    """One finite real number of a saved calibration; a file may hold anything there."""
    value = np.asarray(arrays.get(name))
    if value.shape != () or value.dtype.kind not in "iuf" or not np.isfinite(value):
        raise ValueError(f"the calibration's {name} must be one finite number, got {value.tolist()!r}")
    return float(value)


def top_scores(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest scores per row and their column indexes, best first, ``[N, min(top_k, C)]``."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    return scores.topk(min(top_k, scores.shape[1]), dim=1)


Matrix = TypeVar("Matrix", np.ndarray, torch.Tensor)


def linear_scores(*, features: Matrix, weights: Matrix, bias: Matrix) -> Matrix:
    """``features @ weights.T + bias``, ``[N, C]``: how each class vector scores each query. The one linear score of
    the package: the estimators' ``class_scores`` (NumPy, whose BLAS the fits use: torch's CPU threads beside it
    took 10 ms for a product of microseconds) and the class store's torch backend both call it."""
    return features @ weights.T + bias


def cosine_top_k(
    *, queries: torch.Tensor, corpus: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k search of ``queries`` among ``corpus`` rows: one matrix product, no per-query Python."""
    similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(corpus, dim=1).T
    return top_scores(similarity, top_k)


# --- Parameter constraints: declared once per estimator, checked when a fit starts ---------------------------------


@dataclasses.dataclass(frozen=True)
class Constraint:
    """The values a parameter admits (``admits``) and how an error names them (``description``)."""

    description: str
    admits: Callable[[Any], bool]


def one_of(*choices: Any) -> Constraint:
    return Constraint(f"one of {', '.join(map(repr, choices))}", lambda value: value in choices)


def check_parameters(estimator: Any) -> None:
    """Refuse the first parameter outside its declared constraint (``_parameter_constraints``), naming it."""
    for name, constraint in estimator._parameter_constraints.items():
        value = getattr(estimator, name)
        try:
            admitted = bool(constraint.admits(value))
        except (TypeError, ValueError):
            admitted = False
        if not admitted:
            raise ValueError(f"{name} must be {constraint.description}, got {value!r}.")


def _calibration(arrays: dict[str, np.ndarray], *, score_range: tuple[float, float]) -> dict[str, Any]:
    """The fitted calibration attributes of a saved state, refusing values that are not one number each, or a
    threshold outside the unknown score's range."""
    threshold = _calibration_number(arrays, "threshold")
    low, high = score_range
    if not low <= threshold <= high:
        raise ValueError(f"the calibration threshold {threshold:g} lies outside the range of this classifier's "
                         f"unknown scores [{low:g}, {high:g}]")
    rate = _calibration_number(arrays, "true_positive_rate")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the calibration's true positive rate must lie between 0 and 1, got {rate}")
    calibration = {"threshold_": threshold, "true_positive_rate_": rate,
                   "threshold_stale_": bool(arrays.get("threshold_stale", False))}
    if "calibration_count" in arrays:
        count = _calibration_number(arrays, "calibration_count")
        if count != int(count) or count < 1:
            raise ValueError(f"the calibration's sample count must be a whole number of at least 1, got {count:g}")
        calibration["calibration_count_"] = int(count)
    return calibration


class _LinearClassVectors(ClassifierMixin, BaseEstimator):
    """Queries scored linearly by fitted class vectors ``weights_`` and ``bias_`` over ``classes_`` (as scikit-learn's
    ``LinearClassifierMixin`` scores ``coef_`` and ``intercept_``), and told from queries of no known class by a
    threshold on :meth:`score_samples` that :meth:`calibrate` sets. A subclass defines ``_query_features``."""

    def class_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weights [C, F], bias [C])`` with ``class_scores(X) = query_features(X) @ weights.T + bias``."""
        check_is_fitted(self)
        if not len(self.classes_):
            raise ValueError("No classes left: fit or partial_fit some images first.")
        return self.weights_, self.bias_

    def query_features(self, X: Any) -> np.ndarray:
        """The features that :meth:`class_vectors` score: L2-normalised (and, where set, projected) rows."""
        check_is_fitted(self)
        return self._query_features(validate_data(self, X, reset=False, dtype=np.float64))

    def class_scores(self, X: Any) -> np.ndarray:
        """Score of every class for every query, ``[N, C]``; higher is more similar."""
        self.class_vectors()  # fitted, with classes
        return self._scores_of_features(self.query_features(X))

    def decision_function(self, X: Any) -> np.ndarray:
        """``class_scores``; for two classes scikit-learn's 1-d form (positive means ``classes_[1]``)."""
        scores = self.class_scores(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def top_k(self, X: Any, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, class indexes)`` of the ``top_k`` best classes per query, best first."""
        scores, indexes = top_scores(torch.from_numpy(self.class_scores(X)), top_k)
        return scores.numpy(), indexes.numpy()

    def predict_topk(self, X: Any, top_k: int) -> np.ndarray:
        """Labels of the ``top_k`` best classes per query ``[N, min(top_k, C)]``, best first."""
        _, indexes = self.top_k(X, top_k)
        return self.classes_[indexes]

    def predict(self, X: Any, reject: bool = False) -> np.ndarray:
        """The best class of each query; with ``reject=True``, :func:`unknown_label` where :meth:`score_samples`
        falls below the calibrated ``threshold_`` (see :meth:`calibrate`)."""
        labels = self.predict_topk(X, 1)[:, 0]
        if not reject:
            return labels
        if not hasattr(self, "threshold_"):
            raise ValueError("predict(reject=True) needs a threshold: call calibrate(X_known) with images of the "
                             "known classes that were not fitted.")
        return np.where(self.score_samples(X) < self.threshold_, unknown_label(self.classes_), labels)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``[N, C]`` probability of each class in ``classes_`` order: ``softmax(class_scores / temperature_)``, so
        rows sum to 1 and rank the classes as :meth:`decision_function` does. ``temperature_`` was fitted on
        held-out scores of the images that started the estimator (folds, or for the decorrelated ones leave-one-out;
        :mod:`~simsearch.classifiers.probabilities`)."""
        scores = self.class_scores(X)
        if not hasattr(self, "temperature_"):
            raise ValueError("This classifier has no temperature for probabilities: it was saved before they "
                             "existed. Fit it again (or rebuild the store) to get predict_proba.")
        return probabilities.softmax(scores, temperature=self.temperature_)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Natural logarithm of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def score_samples(self, X: Any) -> np.ndarray:
        """How much each query looks like one of the known classes, higher = more likely known (``[N]``); a
        query of no known class scores low. See the subclass for the score."""
        check_is_fitted(self)
        if not len(self.classes_):
            raise ValueError("No classes left: fit or partial_fit some images first.")
        return self._unknown_scores(validate_data(self, X, reset=False, dtype=np.float64))

    def calibrate(self, X: Any, *, true_positive_rate: float = 0.95) -> _LinearClassVectors:
        """Set ``threshold_`` so that at least ``true_positive_rate`` of ``X``, images of the known classes that
        were not fitted (validation images), score at or above it: ``predict(X, reject=True)`` then keeps them.

        Any later change of the classes (``partial_fit``, ``remove_class``...) changes the scores, so it sets
        ``threshold_stale_``; a rename does not.
        """
        if not 0.0 < true_positive_rate < 1.0:
            raise ValueError(f"true_positive_rate must lie strictly between 0 and 1, got {true_positive_rate}.")
        scores = self.score_samples(X)
        self.threshold_ = float(np.quantile(scores, 1.0 - true_positive_rate, method="lower"))
        self.true_positive_rate_ = float(true_positive_rate)
        self.threshold_stale_ = False
        self.calibration_count_ = len(scores)
        return self

    def _scores_of_features(self, features: np.ndarray) -> np.ndarray:
        return linear_scores(features=features, weights=self.weights_, bias=self.bias_)

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        """The best class score: for the class mean, the cosine to the nearest class mean."""
        return self._scores_of_features(self._query_features(X)).max(axis=1)


class _ClassVectorEstimator(_LinearClassVectors):
    """Additive statistics (``statistics_``, one :class:`~simsearch.classifiers.statistics.Statistics`) and the
    class vectors solved from them after every change, so prediction never changes the estimator.

    A subclass declares ``_parameter_constraints`` and ``shared_statistics`` (the Gram matrix too), and defines
    ``_sample_features`` (what is summed), ``_query_features`` (what is scored) and ``_solve`` (weights and bias
    from the statistics); ``_choice_names`` / ``_set_choices`` save and restore what it chose when it started.
    """

    _parameter_constraints: dict[str, Constraint] = {}
    shared_statistics = False
    unknown_score_range = (-np.inf, np.inf)  # where :meth:`score_samples`, and so a sound threshold, can lie

    def fit(self, X: Any, y: Any) -> _ClassVectorEstimator:
        """Statistics of ``X`` ``[n, d]`` with labels ``y`` ``[n]``; forgets anything fitted before."""
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("__")]:
            delattr(self, name)
        return self.partial_fit(X, y)

    def partial_fit(self, X: Any, y: Any, classes: Sequence[Hashable] | None = None) -> _ClassVectorEstimator:
        """Add images of existing or new classes; equal to ``fit`` on all images seen (float64 statistics).

        ``classes`` is accepted for scikit-learn's incremental API: it only checks that ``y`` stays inside it,
        since a class here exists once it has an image.
        """
        first = not hasattr(self, "statistics_")
        X, y = validate_data(self, X, y, reset=first, dtype=np.float64)
        check_classification_targets(y)
        if classes is not None and not np.isin(y, np.asarray(classes)).all():
            raise ValueError(f"Labels {sorted(set(np.setdiff1d(y, classes).tolist()))} are not in `classes`.")
        if first:
            check_parameters(self)
            self.statistics_ = Statistics.empty(self._start(n_features=X.shape[1]), shared=self.shared_statistics)
        # the Gram matrix and its decompositions: NumPy's BLAS, held to one thread on a busy machine; a first fit
        # of fewer images than features decomposes small matrices of the images (milliseconds): no probe
        n_features = self.statistics_.class_sums.shape[1]
        with matrices.blas_threads_for_load(active=self.shared_statistics and self._compute_device() is None
                                            and n_features >= matrices.PROBED_FEATURES
                                            and not (first and len(X) < n_features)):
            features = self._sample_features(X)
            self.statistics_ = self.statistics_.add(features, y, device=self._compute_device())
            self._refresh(selection=Samples(features, self.statistics_.rows_of(y)) if first else None)
            if first:
                self.temperature_ = self._held_out_temperature(features, X, self.statistics_.rows_of(y))
        return self

    def _held_out_temperature(self, features: np.ndarray, X: np.ndarray, rows: np.ndarray) -> float:
        """The temperature of :meth:`predict_proba`, fitted on the starting images' scores from fits without them:
        those a choice at the start computed anyway or can compute exactly (``_held_out``, set by ``_solve``: the
        scores, or a function that computes them, so an estimator fitted inside another does not pay for them),
        else each of :data:`probabilities.FOLDS` stratified folds scored by the estimator solved from the
        statistics minus the fold's images (its choices kept), so no refit and no validation image is involved.
        ``X`` are the starting images, ``features`` them as summed and ``rows`` their classes."""
        held = self.__dict__.pop("_held_out", None)
        held = held() if callable(held) else held
        if held is None:
            held = probabilities.HeldOut.empty(len(rows), len(self.classes_))
            queries = self._query_features(X)
            folds = probabilities.stratified_folds(rows)
            for fold in range(probabilities.FOLDS):
                held_out = folds == fold
                part = copy.copy(self)
                part.statistics_, kept = self.statistics_.without_samples(Samples(features, rows), held_out,
                                                                          device=self._compute_device())
                present = self.statistics_.rows_of(part.classes_)
                if len(present) < 2 or not held_out.any():
                    continue  # a fold that leaves one class has nothing to rank
                part.weights_, part.bias_ = part._solve(None, samples=kept)
                images = np.flatnonzero(held_out & np.isin(rows, present))
                held.scores[np.ix_(images, present)] = part._scores_of_features(queries[images])
                held.scored[images] = True
        return held.temperature(rows)

    def remove_samples(self, X: Any, y: Any) -> _ClassVectorEstimator:
        """Subtract images fitted earlier (the inverse of ``partial_fit``); a class left with no image is dropped.

        The caller vouches that these exact images were fitted with these labels: the statistics cannot tell.
        """
        check_is_fitted(self)
        X, y = validate_data(self, X, y, reset=False, dtype=np.float64)
        self.statistics_ = self.statistics_.remove(self._sample_features(X), y, device=self._compute_device())
        self._refresh()
        return self

    def remove_class(self, label: Hashable, X: Any = None) -> _ClassVectorEstimator:
        """Drop class ``label``; the other classes' statistics stay bit-for-bit the same.

        Given the class's images ``X``, also subtract them from the shared statistics, so the result equals a fit
        without them. See the subclass for what removal without ``X`` keeps.
        """
        row = self._row(label)
        if X is not None:
            X = validate_data(self, X, reset=False, dtype=np.float64)
            if len(X) != self.class_counts_[row]:
                raise ValueError(
                    f"Class {label!r} holds {self.class_counts_[row]} images but {len(X)} were given to remove."
                )
            return self.remove_samples(X, np.full(len(X), self.classes_[row], dtype=self.classes_.dtype))
        self.statistics_ = self.statistics_.keep(np.arange(len(self.classes_)) != row)
        self._refresh()
        return self

    def rename_class(self, label: Hashable, new_label: Hashable) -> _ClassVectorEstimator:
        """Give class ``label`` the name ``new_label``, keeping its statistics and class vector."""
        self._row(label)
        self.statistics_, order = self.statistics_.renamed(label, new_label)
        self.weights_, self.bias_ = self.weights_[order], self.bias_[order]  # a new name changes no statistic
        return self

    def get_statistics(self) -> dict[str, np.ndarray]:
        """The fitted state as plain arrays (no pickles): a file can hold it, :meth:`set_statistics` restore it."""
        check_is_fitted(self)
        names = tuple(name for name in ("temperature_", *CALIBRATION_NAMES) if hasattr(self, name))
        return {**self.statistics_.to_arrays(), **self._choices(),
                **{name.rstrip("_"): np.asarray(getattr(self, name)) for name in names}}

    def set_statistics(self, **arrays: np.ndarray) -> _ClassVectorEstimator:
        """Install a state written by :meth:`get_statistics`, checked first: it may come from a damaged file."""
        missing = [name.rstrip("_") for name in self._choice_names() if name.rstrip("_") not in arrays]
        if missing:
            raise ValueError(f"the statistics lack {', '.join(missing)}")
        fitted = Statistics.from_arrays(arrays, shared=self.shared_statistics)
        for name, value in arrays.items():
            if name == "relative_alpha" and np.asarray(value).shape == () and value == np.inf:
                continue  # the plain class mean, chosen by leave-one-out
            if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"the statistics '{name}' hold values that are not finite numbers")
        self.statistics_, self.n_features_in_ = fitted, fitted.class_sums.shape[1]
        self._set_choices(arrays)
        if "temperature" in arrays:
            self.temperature_ = _calibration_number(arrays, "temperature")
            if self.temperature_ <= 0:
                raise ValueError(f"the temperature must be positive, got {self.temperature_}")
        elif hasattr(self, "temperature_"):  # statistics saved before probabilities existed
            del self.temperature_
        self._refresh()
        for name in [name for name in CALIBRATION_NAMES if hasattr(self, name)]:
            delattr(self, name)
        if "threshold" in arrays:
            for name, value in _calibration(arrays, score_range=self.unknown_score_range).items():
                setattr(self, name, value)
        return self

    @property
    def classes_(self) -> np.ndarray:
        return self.statistics_.classes

    @property
    def class_sums_(self) -> np.ndarray:
        return self.statistics_.class_sums

    @property
    def class_counts_(self) -> np.ndarray:
        return self.statistics_.class_counts

    @property
    def class_means_(self) -> np.ndarray:
        """Mean feature vector of each class ``[C, F]``, in ``classes_`` order."""
        check_is_fitted(self)
        return self.statistics_.class_means()

    def _start(self, *, n_features: int) -> int:
        """The number of features the statistics sum, for ``n_features`` input features."""
        return n_features

    def _choice_names(self) -> tuple[str, ...]:
        return ()

    def _choices(self) -> dict[str, np.ndarray]:
        """What the estimator chose when it started, as the arrays :meth:`_set_choices` restores."""
        return {name.rstrip("_"): np.asarray(getattr(self, name)) for name in self._choice_names()}

    def _set_choices(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what the estimator chose when it started (see :meth:`_choice_names`)."""

    def _compute_device(self) -> torch.device | None:
        return compute_device(getattr(self, "device", None))

    def _row(self, label: Hashable) -> int:
        check_is_fitted(self)
        names = self.classes_.tolist()
        if label not in names:
            raise ValueError(f"Unknown class {label!r}; the classifier has {len(names)} classes.")
        return names.index(label)

    def _refresh(self, *, selection: Samples | None = None, samples: Samples | None = None) -> None:
        """Solve the class vectors after every change. ``selection`` holds the features and class rows of the
        images that started the estimator, for subclasses that choose something on them; ``samples`` (by default
        the ``selection``) all the images of the statistics where known, to compute in their space where they are
        fewer than the features."""
        if hasattr(self, "threshold_"):
            self.threshold_stale_ = True  # the scores it was set on have changed
        if not len(self.classes_):
            self.weights_, self.bias_ = self.class_sums_, np.zeros(0)
            return
        self.weights_, self.bias_ = self._solve(selection, samples=samples if samples is not None else selection)

class ClassMeanClassifier(_ClassVectorEstimator):
    """The article's classifier: each class is the mean of its embeddings, a query takes the most cosine-similar.

    ``normalize=True`` averages L2-normalised embeddings instead, so images with large norms do not pull the mean
    towards them. Memory: ``C x d`` float64 sums. ``remove_class`` is always exact.
    """

    _parameter_constraints = {"normalize": one_of(False, True)}
    unknown_score_range = (-1.0 - 1e-6, 1.0 + 1e-6)  # a cosine, with rounding

    def __init__(self, *, normalize: bool = False) -> None:
        self.normalize = normalize

    def _sample_features(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X) if self.normalize else X

    def _query_features(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X)

    def _solve(self, selection: Samples | None, *, samples: Samples | None) -> tuple[np.ndarray, np.ndarray]:
        return unit_rows(self.class_sums_), np.zeros(len(self.classes_))

    def describe_choice(self) -> str:
        """What scores the queries: the class means (nothing is chosen here)."""
        return "mean"


class _GramStatistics(_ClassVectorEstimator):
    """Class sums plus the shared second moments of L2-normalised features: the raw Gram matrix ``gram_``
    (``sum x x^T``), the feature sum and the image count, all additive. Whatever a covariance-based classifier needs
    (the centred Gram matrix, the within-class scatter) follows from them, so ``partial_fit``, ``remove_class`` and
    merged shards stay exact. Subclasses keep ``device`` (see :class:`DecorrelatedClassifier`)."""

    shared_statistics = True

    @property
    def gram_(self) -> np.ndarray:
        return self.statistics_.gram

    @property
    def feature_sum_(self) -> np.ndarray:
        return self.statistics_.feature_sum

    @property
    def n_samples_seen_(self) -> int:
        return self.statistics_.n_samples

    def _query_features(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X)

    def _sample_features(self, X: np.ndarray) -> np.ndarray:
        return self._query_features(X)


PRIORS = ("empirical", "balanced")


@dataclasses.dataclass(frozen=True)
class UnknownScoreStart:
    """What a decorrelated estimator's unknown score is chosen on, kept from its start until first needed: the
    statistics and the images (float32, the choice's precision) that started it, and the ridge it chose there."""

    statistics: Statistics
    selection: Samples
    relative_alpha: float
    alpha: float


class DecorrelatedClassifier(_GramStatistics):
    """Training-free decorrelated class prototypes: closed-form ridge regression onto the classes.

    Features are L2-normalised embeddings, optionally ``relu(x @ R)`` with a seeded Gaussian ``R`` of
    ``projection_dim`` columns (RanPAC). With ``mu`` the mean feature, ``G`` the centred Gram matrix, ``K = (G +
    alpha I)^-1``, ``m_c`` the mean and ``P_c = n_c (m_c - mu)`` the centred sum of class ``c``:

    * ``prior="empirical"`` (default): a query ``q`` scores ``(q - mu) K P_c``, ridge regression onto one-hot labels.
      The score grows with ``n_c``: the training set's class frequencies act as a prior, which helps where the
      validation images share them and hurts a class added with a few images.
    * ``prior="balanced"``: ``(q - mu) K (m_c - mu) / |K^1/2 (m_c - mu)|``, the cosine between the ridge-whitened
      query and class mean (ranked as the cosine; the query's own norm, equal for all classes, is left out). Every
      class weighs the same whatever its image count.

    The ridge strength ``alpha`` (``alpha_``, and ``relative_alpha_`` as a multiple of the mean eigenvalue of ``G``):
    ``"loo"`` (default) chooses among ``relative_alphas`` and the plain class mean by exact leave-one-out on the
    images that start the estimator, keeping a ridge only where it beats the class mean by more than one standard
    error, and keeps that choice through later changes; ``"gcv"`` (empirical prior only) and ``"oas"`` re-derive it
    from the statistics after every change; a positive number is used as it is (:func:`ridge_selection.relative_ridge`
    and docs/classifiers.md say more).

    ``unknown_score`` is what :meth:`score_samples` computes: ``"combined"`` (a Mahalanobis distance plus the best
    ridge score, standardised by ``unknown_moments_``), ``"mahalanobis"`` (the shared within-class one alone),
    ``"cosine"`` (the best cosine to a class mean), or ``"auto"`` (default): one of them chosen on the images that
    start the estimator by hiding classes from sub-fits (:func:`unknown_scores.choose_unknown_score`, seeded by
    ``random_state``) when first asked for. ``unknown_score_`` holds the score in use, kept through later changes
    like the ridge.

    ``device`` is where the Gram matrix, its eigendecompositions and the leave-one-out products are computed: None
    (default) in NumPy on the CPU, whose OpenBLAS ran them 1.3 to 2 times faster than torch's CPU kernels on a 2-core
    EPYC; a torch device name (``"cuda"``) in torch there. Statistics, stores and merges ignore it
    (:data:`RUN_TIME_PARAMS`).

    Memory: ``(C + F) x F`` float64 with ``F`` the feature size (d, or ``projection_dim``); every change of images or
    classes costs one ``F x F`` eigendecomposition (a rename none). ``remove_class(label)`` without the images drops
    the class's sums and keeps its images in ``G`` as unlabelled background; ``remove_class(label, X)`` subtracts
    them too, which equals a fit without them.
    """

    _parameter_constraints = {
        "alpha": Constraint("'loo', 'gcv', 'oas' or a positive number",
                            lambda value: value in ALPHA_RULES if isinstance(value, str) else value > 0),
        "prior": one_of(*PRIORS),
        "relative_alphas": Constraint("positive numbers", lambda value: len(value) > 0 and min(value) > 0),
        "projection_dim": Constraint("a positive integer or None", lambda value: value is None or int(value) >= 1),
        "unknown_score": one_of(*unknown_scores.UNKNOWN_SCORES),
    }

    def __init__(
        self,
        *,
        alpha: float | str = "loo",
        prior: str = "empirical",
        relative_alphas: Sequence[float] = RELATIVE_ALPHAS,
        projection_dim: int | None = None,
        random_state: int | None = 0,
        unknown_score: str = "auto",
        device: str | torch.device | None = None,
    ) -> None:
        self.alpha = alpha
        self.prior = prior
        self.relative_alphas = relative_alphas
        self.projection_dim = projection_dim
        self.random_state = random_state
        self.unknown_score = unknown_score
        self.device = device

    def decomposition(self, samples: Samples | None = None) -> ridge_selection.Decomposition:
        """The centred statistics in the eigenbasis of the centred Gram matrix: one ``F x F`` eigendecomposition, or
        ``n x n`` given the statistics' ``samples`` where they are fewer than the features; none where a caller
        fitting both priors on the same statistics handed its spectrum over (``_centred_spectrum``, used once)."""
        return ridge_selection.decomposition(self.statistics_, prior=self.prior, device=self._compute_device(),
                                             samples=samples, spectrum=self.__dict__.pop("_centred_spectrum", None))

    def leave_one_out_hits(
        self, X: Any, y: Any, *, decomposition: ridge_selection.Decomposition | None = None
    ) -> np.ndarray:
        """``[candidates + 1, n]``: whether each fitted image of ``X`` (labels ``y``) is classified right with itself
        left out of the *current* statistics, for every relative ridge strength and, last, the plain class mean
        (:func:`ridge_selection.leave_one_out_hits`); :meth:`select_alpha` chooses from the hits of every image as
        ``fit`` does. ``decomposition`` (computed once for all shards) saves an eigendecomposition per call."""
        check_is_fitted(self)
        X, y = validate_data(self, X, y, reset=False, dtype=np.float64)
        return ridge_selection.leave_one_out_hits(
            self.statistics_, self._sample_features(X), self.statistics_.rows_of(y),
            relative_alphas=np.asarray(self.relative_alphas, dtype=np.float64), prior=self.prior,
            decomposed=decomposition or self.decomposition(), device=self._compute_device())

    def select_alpha(self, hits: np.ndarray, y: Any) -> DecorrelatedClassifier:
        """Choose the ridge strength from :meth:`leave_one_out_hits` of every fitted image (labels ``y``, in the
        same order), by the rule ``fit`` applies with ``alpha="loo"``, and refresh the weights."""
        check_is_fitted(self)
        rows = np.searchsorted(self.classes_, np.asarray(y)).clip(max=len(self.classes_) - 1)
        hits = np.asarray(hits, dtype=bool)
        if hits.shape != (len(self.relative_alphas) + 1, len(rows)):
            raise ValueError(f"hits of shape {list(hits.shape)} do not fit {len(self.relative_alphas) + 1} "
                             f"candidates and {len(rows)} labels.")
        if int(self.class_counts_.sum()) != len(rows):
            raise ValueError(f"the selection needs the hits of all {int(self.class_counts_.sum())} fitted images, "
                             f"got {len(rows)}.")
        self.relative_alpha_ = ridge_selection.one_standard_error_choice(
            np.asarray(self.relative_alphas, dtype=np.float64), hits=hits,
            weights=ridge_selection.selection_weights(rows, prior=self.prior))
        self._refresh()
        return self

    def unknown_components(self, features: np.ndarray) -> np.ndarray:
        """``[N, 2]`` for :meth:`query_features` rows: the two parts of the combined unknown score at ``alpha_``
        (:func:`unknown_scores.unknown_components`)."""
        return unknown_scores.unknown_components(features, statistics=self.statistics_, alpha=self.alpha_,
                                                 device=self._compute_device())

    def unknown_moments(self, X: Any) -> np.ndarray:
        """``[2, 3]`` (count, sum, sum of squares) of each :meth:`unknown_components` over the images ``X``, in
        float32: additive, so shards scored apart against merged statistics sum to the moments of a single fit."""
        check_is_fitted(self)
        return unknown_scores.moments(self.unknown_components(self.query_features(X).astype(np.float32)))

    def set_unknown_moments(self, moments: np.ndarray) -> DecorrelatedClassifier:
        """Install :meth:`unknown_moments` summed over every fitted image (what ``fit`` computes itself)."""
        self.unknown_moments_ = unknown_scores.checked_moments(moments)
        if hasattr(self, "threshold_"):
            self.threshold_stale_ = True
        return self

    def within_class_mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """Minus the smallest Mahalanobis distance of :meth:`query_features` rows to a class mean under the shared
        within-class covariance (:func:`unknown_scores.within_class_mahalanobis`)."""
        return unknown_scores.within_class_mahalanobis(features, statistics=self.statistics_,
                                                       device=self._compute_device())

    def _start(self, *, n_features: int) -> int:
        if self.prior == "balanced" and self.alpha == "gcv":
            raise ValueError("alpha='gcv' scores a ridge regression onto one-hot labels, which needs "
                             "prior='empirical'; use alpha='loo' or a number with prior='balanced'.")
        if self.projection_dim is None:
            return n_features
        self.projection_ = check_random_state(self.random_state).standard_normal((n_features, self.projection_dim))
        return int(self.projection_dim)

    def _query_features(self, X: np.ndarray) -> np.ndarray:
        unit = unit_rows(X)
        return unit if self.projection_dim is None else np.maximum(unit @ self.projection_, 0.0)

    def _choice_names(self) -> tuple[str, ...]:
        projection = ("projection_",) if self.projection_dim is not None else ()
        moments = ("unknown_moments_",) if hasattr(self, "unknown_moments_") else ()
        choice = ("unknown_score_",) if hasattr(self, "unknown_score_") else ()
        return ("relative_alpha_",) + projection + moments + choice

    def _set_choices(self, arrays: dict[str, np.ndarray]) -> None:
        self.__dict__.pop("_unknown_score_start_", None)
        self.relative_alpha_ = float(arrays["relative_alpha"])
        if "unknown_moments" in arrays:
            self.set_unknown_moments(arrays["unknown_moments"])
        elif hasattr(self, "unknown_moments_"):
            del self.unknown_moments_
        self.unknown_score_ = unknown_scores.saved_unknown_score(arrays, requested=self.unknown_score)
        if self.projection_dim is not None:
            self.projection_ = np.asarray(arrays["projection"], np.float64)
            if self.projection_.shape[1] != self.class_sums_.shape[1]:
                raise ValueError(f"the projection has {self.projection_.shape[1]} columns, not "
                                 f"{self.class_sums_.shape[1]}")
            self.n_features_in_ = self.projection_.shape[0]

    def _solve(self, selection: Samples | None, *, samples: Samples | None) -> tuple[np.ndarray, np.ndarray]:
        decomposed, device = self.decomposition(samples), self._compute_device()
        # the ridge's leave-one-out pass and the temperature's pass over the starting images share their projection
        projected = (ridge_selection.project(selection.features, decomposed=decomposed, device=device)
                     if selection is not None and self.alpha == "loo" else None)
        self.relative_alpha_ = ridge_selection.relative_ridge(
            alpha=self.alpha, prior=self.prior, relative_alphas=np.asarray(self.relative_alphas, dtype=np.float64),
            statistics=self.statistics_, decomposed=decomposed, selection=selection,
            previous=getattr(self, "relative_alpha_", None), device=device, projected=projected)
        self.alpha_ = float(self.alpha) if not isinstance(self.alpha, str) else self.relative_alpha_ * decomposed.scale
        if selection is not None:  # the unknown score is fixed on the images that start the estimator, when needed
            for name in ("unknown_score_", "unknown_moments_"):
                self.__dict__.pop(name, None)
            self._unknown_score_start_ = UnknownScoreStart(
                statistics=self.statistics_, selection=Samples(selection.features.astype(np.float32), selection.rows),
                relative_alpha=self.relative_alpha_, alpha=self.alpha_)
            self._held_out = functools.partial(self._leave_one_out_scores, selection, decomposed, projected=projected)
        if np.isinf(self.alpha_):
            return unit_rows(self.class_sums_), np.zeros(len(self.classes_))
        return ridge_selection.ridge_class_vectors(decomposed, alpha=self.alpha_, prior=self.prior)

    def _leave_one_out_scores(
        self, selection: Samples, decomposed: ridge_selection.Decomposition, *,
        projected: np.ndarray | torch.Tensor | None = None,
    ) -> probabilities.HeldOut:
        """The exact leave-one-out scores of the starting images at the chosen ridge (the cosine for the class
        mean), for the temperature: closed forms of one pass, and fits without one image each are closer to the
        full fit than fits without a third (with the folds' temperature, ``balanced`` left a calibration error of
        0.06 to 0.07 on Caltech-101 and TREC). An image whose class has no other image is not scored, nor is a
        single image (nothing is left without it). ``projected``: the images as the ridge's choice projected them
        (:func:`ridge_selection.project`), else projected here."""
        if len(selection.rows) < 2:
            return probabilities.HeldOut.empty(len(selection.rows), len(self.classes_))
        relative = np.asarray([self.relative_alpha_] if np.isfinite(self.relative_alpha_) else [], dtype=np.float64)
        [scores] = next(ridge_selection.leave_one_out_scores(
            self.statistics_, selection.features, selection.rows, relative_alphas=relative, priors=(self.prior,),
            decomposed=decomposed, device=self._compute_device(), as_fitted=True, projected=projected))
        scores = scores.astype(np.float64)
        return probabilities.HeldOut(scores=scores,
                                     scored=np.isfinite(scores[np.arange(len(scores)), selection.rows]))

    @functools.cached_property
    def unknown_score_(self) -> str:
        """The unknown score in use: chosen (``unknown_score="auto"``), and for ``"combined"`` its moments
        (``unknown_moments_``) taken, on the images that started the estimator when first asked for, not in
        ``fit``. Only :meth:`score_samples`, calibration and saving need it, and it was the larger half of a fit in
        the images' space (0.09 of 0.16 s on 10 Caltech-101 classes x 50 images). Until then the estimator keeps
        its start as it was (``UnknownScoreStart``: a float32 copy of the starting images), so later changes do
        not move the choice."""
        start = self.__dict__.get("_unknown_score_start_")
        if start is None:
            raise AttributeError(f"{type(self).__name__} has no unknown score: it is not fitted")
        device = self._compute_device()
        score = self.unknown_score if self.unknown_score != "auto" else unknown_scores.choose_unknown_score(
            start.statistics, *start.selection, relative_alpha=start.relative_alpha, random_state=self.random_state,
            device=device)
        if score == "combined":
            self.unknown_moments_ = unknown_scores.moments(unknown_scores.unknown_components(
                start.selection.features, statistics=start.statistics, alpha=start.alpha, device=device,
                samples=start.selection))
        del self._unknown_score_start_
        return score

    @functools.cached_property
    def unknown_moments_(self) -> np.ndarray:
        """Moments of the combined unknown score's two parts over the starting images (see :attr:`unknown_score_`,
        which sets them); absent for the other scores."""
        if self.unknown_score_ != "combined" or "unknown_moments_" not in self.__dict__:
            raise AttributeError(f"the unknown score {self.unknown_score_!r} has no moments")
        return self.__dict__["unknown_moments_"]

    def describe_choice(self) -> str:
        """What the fit chose to score the queries: the plain class mean, or the ridge at its relative strength."""
        check_is_fitted(self)
        return "mean" if np.isinf(self.alpha_) else f"ridge {self.relative_alpha_:.3g}"

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        return unknown_scores.query_scores(
            self._query_features(X), score=self.unknown_score_, statistics=self.statistics_, alpha=self.alpha_,
            moments_of_start=getattr(self, "unknown_moments_", None), device=self._compute_device())


SELECT_FOR = ("accuracy", "balanced")  # the metric a DiscriminantClassifier's prior serves


class DiscriminantClassifier(_GramStatistics):
    """Shrinkage linear discriminant analysis from the same additive statistics: closed forms and one choice against
    the class mean, so little to overfit, and ``partial_fit``, ``remove_class`` and merged shards give exactly what
    one fit gives.

    On L2-normalised features, with ``m_c`` the class means and ``n_c`` their image counts, a query ``q`` scores
    ``q^T S^-1 m_c - m_c^T S^-1 m_c / 2 + tau log(n_c / n)`` (:func:`discriminant.discriminant`). ``S`` is the pooled
    within-class covariance, standardised by its diagonal and shrunk towards the identity there by Oracle
    Approximating Shrinkage (``shrinkage`` a number in [0, 1] fixes it): scikit-learn's
    ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")`` does the same with Ledoit-Wolf per class, whose
    fourth moments additive statistics cannot keep.

    ``tau``, the prior's strength (``prior_strength_``): 1 weighs each class by its share of the training images,
    the decision that makes fewest errors when queries come in the same shares (``select_for="accuracy"``, default);
    0 weighs every class alike, the decision for the mean of the per-class accuracies (``select_for="balanced"``).
    ``prior_strength`` (a number in [0, 1]) overrides that choice. On TREC's 50 fine classes accuracy and balanced
    accuracy both fall monotonically as ``tau`` leaves the end their metric names (docs/classifiers.md), so the ends
    are chosen by theory, not selected on the images.

    ``check_against_mean`` (default True): on the images that start the estimator, a three-fold cross-validation
    compares the discriminant with the cosine to each class's mean (:func:`discriminant.check_against_the_class_mean`,
    whose held-out scores the probabilities' temperature reuses);
    unless the discriminant wins by more than one standard error, the estimator scores by that cosine
    (``uses_class_mean_``), kept through later changes. It guards the case where a covariance estimated from a
    hundred images in a thousand dimensions only adds noise (docs/classifiers.md).

    :meth:`score_samples` is minus the smallest Mahalanobis distance to a class mean under the same shrunk
    covariance (the best cosine where the class mean is used; ``shrinkage_`` and ``whitening_`` then stay unset).
    ``device`` as for :class:`DecorrelatedClassifier`. Memory: ``(C + F) x F`` float64; every change of images or
    classes costs one ``F x F`` eigendecomposition (the first fit four, with the check; a first fit of fewer images
    than features none: ``discriminant.shrunk_precision``). ``remove_class(label)``
    without the images keeps them in the scatter, uncentred; with them it equals a fit without them.
    """

    _parameter_constraints = {
        "shrinkage": Constraint("'oas' or a number between 0 and 1",
                                lambda value: value == "oas" or (not isinstance(value, str) and 0.0 <= value <= 1.0)),
        "select_for": one_of(*SELECT_FOR),
        "prior_strength": Constraint("None or a number between 0 and 1",
                                     lambda value: value is None or 0.0 <= value <= 1.0),
        "check_against_mean": one_of(False, True),
    }

    def __init__(
        self,
        *,
        shrinkage: float | str = "oas",
        select_for: str = "accuracy",
        prior_strength: float | None = None,
        check_against_mean: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        self.shrinkage = shrinkage
        self.select_for = select_for
        self.prior_strength = prior_strength
        self.check_against_mean = check_against_mean
        self.device = device

    def _choice_names(self) -> tuple[str, ...]:
        return ("uses_class_mean_",)

    def _set_choices(self, arrays: dict[str, np.ndarray]) -> None:
        self.uses_class_mean_ = bool(arrays.get("uses_class_mean", False))

    def _solve(self, selection: Samples | None, *, samples: Samples | None) -> tuple[np.ndarray, np.ndarray]:
        if self.prior_strength is not None:
            self.prior_strength_ = float(self.prior_strength)
        else:
            self.prior_strength_ = 1.0 if self.select_for == "accuracy" else 0.0
        if selection is not None and self.check_against_mean:
            check = discriminant.check_against_the_class_mean(
                self.statistics_, *selection, shrinkage=self.shrinkage, prior_strength=self.prior_strength_,
                balanced=self.select_for == "balanced", device=self._compute_device())
            self.uses_class_mean_ = not check.beats
            self._held_out = check.class_mean if self.uses_class_mean_ else check.discriminant
        elif selection is not None:
            self.uses_class_mean_ = False
        for name in ("whitening_", "_precision_", "shrinkage_"):  # of the statistics before this change
            self.__dict__.pop(name, None)
        if self.uses_class_mean_:  # no covariance to decompose: the cosine to the class means scores
            return unit_rows(self.class_sums_), np.zeros(len(self.classes_))
        fitted = discriminant.discriminant(self.statistics_, shrinkage=self.shrinkage,
                                           prior_strength=self.prior_strength_, device=self._compute_device(),
                                           samples=samples)
        self._precision_, self.shrinkage_ = fitted.precision, fitted.shrinkage
        return fitted.weights, fitted.bias

    @functools.cached_property
    def whitening_(self) -> np.ndarray:
        """``W`` ``[F, F]`` with ``W W^T`` the shrunk inverse covariance, which maps queries for the Mahalanobis
        distances of :meth:`score_samples`: formed when first needed, as from a thin spectrum it costs ``F^2 r``,
        more than the rest of a fit in the images' space (and the folds of ``lda``'s check never score unknowns)."""
        if "_precision_" not in self.__dict__ or self.uses_class_mean_:
            raise AttributeError(f"{type(self).__name__} has no whitening: it scores by the class mean or is not "
                                 "fitted")
        return self._precision_.whitening()

    def describe_choice(self) -> str:
        """What the fit chose to score the queries: the discriminant, or the class mean it fell back to."""
        check_is_fitted(self)
        return "mean" if self.uses_class_mean_ else "discriminant"

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        """Minus the smallest Mahalanobis distance to a class mean under the shrunk within-class covariance; the best
        cosine where the class mean is used."""
        if self.uses_class_mean_:
            return super()._unknown_scores(X)
        return unknown_scores.mahalanobis_scores(
            self._query_features(X), centres=self.class_means_,
            distances=lambda queries, centres: matrices.squared_distances(self._whitened(queries),
                                                                          self._whitened(centres)))

    def _whitened(self, rows: np.ndarray) -> np.ndarray:
        return matrices.product(rows, self.whitening_, device=self._compute_device())


AUTO_CANDIDATES = ("mean", "lda", "decorrelated", "balanced")  # simplest first: the first is the baseline


class AutoClassifier(_GramStatistics):
    """The family member that suits the images, chosen on the training part alone: ``mean`` (the class mean of
    L2-normalised embeddings), ``lda``, ``decorrelated`` or ``balanced``.

    On three seeded, stratified folds of the images that start the estimator (the statistics minus each fold's
    images, as ``lda``'s check does), every candidate is fitted with its own choices and scores the held-out fold.
    A candidate replaces the class mean only where it wins by more than one standard error of the paired
    difference, and among those that do, the simplest one within one standard error of the best is kept
    (:func:`ridge_selection.simplest_sufficient`): a choice among four noisy estimates would otherwise favour the
    luckiest. ``chosen_`` names the member and ``member_`` is it, fitted on the same statistics; the choice is kept,
    like the ridge, by ``partial_fit``, ``remove_class``, stores and merges (there, the first part's). ``lda`` runs
    without its own check against the class mean, which is a candidate here.

    Cost: the candidates' fits on three folds (an ``F x F`` eigendecomposition each for ``lda`` and each decorrelated
    prior), then the chosen member's fit. ``device`` as for :class:`DecorrelatedClassifier`.
    """

    _parameter_constraints = {
        "candidates": Constraint(f"a sequence of {', '.join(AUTO_CANDIDATES)}, 'mean' first",
                                 lambda value: len(value) > 0 and value[0] == "mean"
                                 and set(value) <= set(AUTO_CANDIDATES) and len(set(value)) == len(value)),
    }

    def __init__(self, *, candidates: Sequence[str] = AUTO_CANDIDATES, device: str | torch.device | None = None):
        self.candidates = candidates
        self.device = device

    def describe_choice(self) -> str:
        """The member chosen, with what it chose in turn (a decorrelated member's ridge)."""
        check_is_fitted(self)
        inner = self.member_.describe_choice()
        return self.chosen_ if inner in ("mean", "discriminant") else f"{self.chosen_} ({inner})"

    def _member(self, name: str, *, quick: bool = False, **params: Any) -> _ClassVectorEstimator:
        """A fresh candidate over this estimator's features (L2-normalised embeddings), with ``params``; ``quick``
        for the folds, where only the ranking counts: no unknown-score choice."""
        if name == "mean":
            return ClassMeanClassifier(normalize=True)
        if name == "lda":
            return DiscriminantClassifier(check_against_mean=False, device=self.device)
        return make_classifier(name, device=self.device, **({"unknown_score": "cosine"} if quick else {}), **params)

    def _fitted_member(self, member: _ClassVectorEstimator, statistics_: Statistics, selection: Samples | None,
                       samples: Samples | None) -> _ClassVectorEstimator:
        member.statistics_, member.n_features_in_ = statistics_, statistics_.class_sums.shape[1]
        member._refresh(selection=selection, samples=samples)
        member.__dict__.pop("_held_out", None)  # the temperature comes from this estimator's folds
        return member

    def _fold_ridges(
        self, kept: Statistics, selection: Samples
    ) -> tuple[dict[str, float], matrices.Spectrum | None]:
        """The ridge each decorrelated candidate would choose on a fold's statistics (``kept``, of the images
        ``selection``), as its own leave-one-out choice makes it, but for both priors in one pass
        (:func:`ridge_selection.leave_one_out_hits_of_priors`); and the fold's spectrum they share."""
        names = [name for name in self.candidates if name in ("decorrelated", "balanced")]
        if not names:
            return {}, None
        device = self._compute_device()
        spectrum = kept.centred_spectrum(selection, device=device)
        decomposed = ridge_selection.decomposition(kept, prior="empirical", device=device, samples=selection,
                                                   spectrum=spectrum)
        priors = [CLASSIFIERS[name][1].get("prior", "empirical") for name in names]
        relative = np.asarray(RELATIVE_ALPHAS, dtype=np.float64)
        hits = ridge_selection.leave_one_out_hits_of_priors(kept, *selection, relative_alphas=relative, priors=priors,
                                                            decomposed=decomposed, device=device)
        ridges = {name: decomposed.scale * ridge_selection.one_standard_error_choice(
            relative, hits=prior_hits, weights=ridge_selection.selection_weights(selection.rows, prior=prior))
            for name, prior, prior_hits in zip(names, priors, hits)}
        return ridges, spectrum

    def _choose(self, features: np.ndarray, rows: np.ndarray) -> str:
        """The candidate :func:`ridge_selection.simplest_sufficient` picks from held-out hits on three folds; its
        held-out scores are kept for the probabilities' temperature."""
        folds = probabilities.stratified_folds(rows)
        held = [probabilities.HeldOut.empty(len(rows), len(self.classes_)) for _ in self.candidates]
        for fold in range(probabilities.FOLDS):
            held_out = folds == fold
            kept, selection = self.statistics_.without_samples(Samples(features, rows), held_out,
                                                               device=self._compute_device())
            present = self.statistics_.rows_of(kept.classes)
            if len(present) < 2 or not held_out.any():
                return "mean"  # too few images to tell
            images = np.flatnonzero(held_out)
            ridges, spectrum = self._fold_ridges(kept, selection)
            for number, name in enumerate(self.candidates):
                member = self._member(name, quick=True, **({"alpha": ridges[name]} if name in ridges else {}))
                if name in ridges:  # both priors decompose the same matrix
                    member._centred_spectrum = spectrum
                member = self._fitted_member(member, kept, selection, selection)
                held[number].scores[np.ix_(images, present)] = member._scores_of_features(features[held_out])
                held[number].scored[images] = True
        hits = np.array([candidate.scores.argmax(axis=1) == rows for candidate in held], dtype=np.float64)
        chosen = ridge_selection.simplest_sufficient(hits, weights=ridge_selection.metric_weights(rows, balanced=False))
        self._held_out = held[chosen]
        return self.candidates[chosen]

    def _choice_names(self) -> tuple[str, ...]:
        return ("chosen_",)

    def _choices(self) -> dict[str, np.ndarray]:
        return {"chosen": np.asarray(self.chosen_), **self.member_._choices()}

    def _set_choices(self, arrays: dict[str, np.ndarray]) -> None:
        chosen = str(arrays["chosen"])
        if chosen not in self.candidates:
            raise ValueError(f"the statistics chose '{chosen}', which is not among the candidates "
                             f"{', '.join(self.candidates)}")
        self.chosen_, self.member_ = chosen, self._member(chosen)
        self.member_.statistics_ = self.statistics_
        self.member_._set_choices(arrays)

    def _solve(self, selection: Samples | None, *, samples: Samples | None) -> tuple[np.ndarray, np.ndarray]:
        if selection is not None:
            self.chosen_ = self._choose(*selection)
            member = self._member(self.chosen_)
        else:  # a copy: a sub-fit (the temperature's folds) must not change the member of the estimator it copies
            member = copy.copy(self.member_)
        self.member_ = self._fitted_member(member, self.statistics_, selection, samples)
        return self.member_.weights_, self.member_.bias_

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        return self.member_._unknown_scores(X)


# Parameters that say where an estimator computes, not what it computes: a store or a merge leaves them out, so a
# store built on a GPU opens on a CPU and shards fitted on different machines merge.
RUN_TIME_PARAMS = ("device",)


def model_params(estimator: Any) -> dict[str, Any]:
    """``estimator.get_params()`` without :data:`RUN_TIME_PARAMS`: the parameters that define its results."""
    return {name: value for name, value in estimator.get_params().items() if name not in RUN_TIME_PARAMS}


# Command-line names: an estimator class and the parameters that make the name.
CLASSIFIERS: dict[str, tuple[type[_ClassVectorEstimator], dict[str, Any]]] = {
    "mean": (ClassMeanClassifier, {}),
    "decorrelated": (DecorrelatedClassifier, {}),
    "balanced": (DecorrelatedClassifier, {"prior": "balanced"}),
    "lda": (DiscriminantClassifier, {}),
    "auto": (AutoClassifier, {}),
}


def make_classifier(name: str, **params: Any) -> _ClassVectorEstimator:
    """A fresh estimator by its command-line name (``mean``, ``decorrelated``, ``balanced``, ``lda`` or ``auto``);
    ``params`` win."""
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown classifier '{name}'; use one of {', '.join(CLASSIFIERS)}.")
    kind, preset = CLASSIFIERS[name]
    return kind(**{**preset, **params})


# Fitted on the images that started each part: the first part's stand until chosen again over all images.
FIRST_PART_WINS = ("relative_alpha", "unknown_moments", "unknown_score", "uses_class_mean", "temperature", "chosen")


def merge_statistics(
    parts: Sequence[_ClassVectorEstimator | dict[str, np.ndarray]], *, into: _ClassVectorEstimator | None = None
) -> _ClassVectorEstimator:
    """One estimator holding the sum of the fitted ``parts``' statistics (same class and parameters, fitted on
    disjoint images, e.g. the shards of a dataset on several machines): equal to one fit on all their images up to
    float64 rounding, for any set of classes per part (:func:`statistics.merge`).

    A part is a fitted estimator or its :meth:`~_ClassVectorEstimator.get_statistics` (what crosses a network);
    ``into`` is the unfitted estimator to fill (default: a copy of the first part). With ``alpha="loo"`` the
    statistics are exact but the ridge strength is the first part's until :meth:`DecorrelatedClassifier.select_alpha`
    chooses it from the hits of every image (:meth:`~DecorrelatedClassifier.leave_one_out_hits` against the merged
    statistics, shard by shard), and so are the unknown score's moments until
    :meth:`~DecorrelatedClassifier.set_unknown_moments` installs their sum over the shards. A calibration threshold
    is not kept: it was set on scores the merge changes.
    """
    if not parts:
        raise ValueError("merge_statistics needs at least one fitted estimator or its statistics.")
    estimators = [part for part in parts if isinstance(part, _ClassVectorEstimator)]
    template = into if into is not None else (estimators[0] if estimators else None)
    if template is None:
        raise ValueError("merge_statistics needs `into` (the estimator to fill) when the parts are statistics.")
    for part in estimators:
        if type(part) is not type(template) or model_params(part) != model_params(template):
            raise ValueError(f"Cannot merge {part!r} into {template!r}: the estimators differ in class or "
                             "parameters.")
    states = [part.get_statistics() if isinstance(part, _ClassVectorEstimator) else part for part in parts]
    merged = statistics.merge([Statistics.from_arrays(state, shared=template.shared_statistics)
                               for state in states]).to_arrays()
    for name in set(states[0]) - set(merged) - {name.rstrip("_") for name in CALIBRATION_NAMES}:
        if name not in FIRST_PART_WINS and any(not np.array_equal(state[name], states[0][name]) for state in states):
            raise ValueError(f"Cannot merge estimators whose '{name}' differs (e.g. another random_state).")
        merged[name] = states[0][name]
    return sklearn.base.clone(template).set_statistics(**merged)


def classifier_name(estimator: Any) -> str:
    """The command-line name of an estimator of this module: the most specific one whose parameters it has."""
    params = estimator.get_params() if isinstance(estimator, _ClassVectorEstimator) else {}
    names = [
        name for name, (kind, preset) in CLASSIFIERS.items()
        if type(estimator) is kind and all(params.get(key) == value for key, value in preset.items())
    ]
    if not names:
        raise ValueError(f"{type(estimator).__name__} is not a classifier of prototypes.CLASSIFIERS "
                         f"({', '.join(CLASSIFIERS)}).")
    return max(names, key=lambda name: len(CLASSIFIERS[name][1]))


def ranked_scores(estimator: Any, X: Any, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` of the ``top_k`` best classes for any fitted scikit-learn classifier, best first.

    Estimators of this module rank by their own scores; others by ``decision_function`` (its binary 1-d form is
    expanded) or else ``predict_proba``.
    """
    if isinstance(estimator, _ClassVectorEstimator):
        scores, indexes = estimator.top_k(X, top_k)
        return scores, estimator.classes_[indexes]
    if hasattr(estimator, "decision_function"):
        all_scores = np.asarray(estimator.decision_function(X), dtype=np.float64)
        all_scores = np.column_stack([-all_scores, all_scores]) if all_scores.ndim == 1 else all_scores
    else:
        all_scores = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    scores, indexes = top_scores(torch.from_numpy(all_scores), top_k)
    return scores.numpy(), np.asarray(estimator.classes_)[indexes.numpy()]


def fit_and_rank(
    classifier: Any, *, train: tuple[np.ndarray, np.ndarray], queries: np.ndarray, top_k: int
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Fit a copy of ``classifier`` on ``train = (X, y)`` and rank the classes for ``queries``: ``(fitted, scores,
    labels)``, each ranking ``[N, min(top_k, C)]`` best first. Scoring one partition is this, wherever it happens
    (both protocols, the analyses' comparison of classifiers), so every table ranks the same way."""
    fitted = sklearn.base.clone(classifier).fit(*train)
    scores, labels = ranked_scores(fitted, queries, top_k)
    return fitted, scores, labels


def predict_topk(estimator: Any, X: Any, top_k: int) -> np.ndarray:
    """Labels of the ``top_k`` best classes for any fitted scikit-learn classifier, best first (see
    :func:`ranked_scores`)."""
    return ranked_scores(estimator, X, top_k)[1]


def labelled_probabilities(estimator: Any, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, true columns)`` of a fitted classifier's ``predict_proba`` on the labelled queries whose
    label is one of its classes (a class a partition never trained on has no column)."""
    known = np.isin(y, estimator.classes_)
    return estimator.predict_proba(X[known]), np.searchsorted(estimator.classes_, y[known])


def probability_quality(estimator: Any, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(calibration error, log loss)`` of a fitted classifier's ``predict_proba`` on labelled queries of its
    classes (:mod:`~simsearch.classifiers.probabilities`); NaN for a classifier without probabilities."""
    if not hasattr(estimator, "predict_proba"):
        return float("nan"), float("nan")
    chances, rows = labelled_probabilities(estimator, X, y)
    return probabilities.calibration_error(chances, rows), probabilities.log_loss(chances, rows)


def describe_choice(estimator: Any) -> str:
    """What a fitted estimator chose to score with (:meth:`ClassMeanClassifier.describe_choice` and its kin);
    empty for a classifier that chooses nothing."""
    return estimator.describe_choice() if hasattr(estimator, "describe_choice") else ""


def margins(scores: np.ndarray) -> np.ndarray:
    """Best minus second-best score per query (``scores`` ranked best first): small near a decision boundary,
    NaN where only one class exists."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores[:, 0] - scores[:, 1] if scores.shape[1] > 1 else np.full(len(scores), np.nan)
