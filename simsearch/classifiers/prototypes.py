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

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import sklearn.base
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from simsearch.classifiers import matrices, ridge_selection, unknown_scores
from simsearch.classifiers.matrices import compute_device, torch_device, unit_rows

__all__ = [
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
    "ranked_scores",
    "top_scores",
    "torch_device",
    "unit_rows",
    "unknown_label",
]

# Ridge strengths tried by generalised cross-validation, as multiples of the mean eigenvalue of the centred Gram
# matrix: relative values fit any number of images, since the eigenvalues grow with it.
RELATIVE_ALPHAS = tuple(float(value) for value in np.logspace(-4, 2, 25))


# Fitted attributes of :meth:`_ClassStatistics.calibrate`, saved with the statistics when present (estimators
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


def linear_scores(*, features: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``features @ weights.T + bias``, ``[N, C]``: how each class vector scores each query. The one linear score of
    the package: the estimators' ``class_scores`` and the class store's torch backend both call it."""
    return features @ weights.T + bias


def cosine_top_k(
    *, queries: torch.Tensor, corpus: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k search of ``queries`` among ``corpus`` rows: one matrix product, no per-query Python."""
    similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(corpus, dim=1).T
    return top_scores(similarity, top_k)


class _ClassStatistics(ClassifierMixin, BaseEstimator):
    """Per-class feature sums and counts, kept sorted by label, plus the shared statistics of subclasses.

    Subclasses define ``_sample_features`` (what is summed), ``_query_features`` (what is scored) and
    ``_solve`` (weights and bias from the statistics); ``_update_shared`` adds or subtracts shared statistics.
    """

    def fit(self, X: Any, y: Any) -> _ClassStatistics:
        """Statistics of ``X`` ``[n, d]`` with labels ``y`` ``[n]``; forgets anything fitted before."""
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("__")]:
            delattr(self, name)
        return self.partial_fit(X, y)

    def partial_fit(self, X: Any, y: Any, classes: Sequence[Hashable] | None = None) -> _ClassStatistics:
        """Add images of existing or new classes; equal to ``fit`` on all images seen (float64 statistics).

        ``classes`` is accepted for scikit-learn's incremental API: it only checks that ``y`` stays inside it,
        since a class here exists once it has an image.
        """
        first = not hasattr(self, "classes_")
        X, y = validate_data(self, X, y, reset=first, dtype=np.float64)
        check_classification_targets(y)
        if classes is not None and not np.isin(y, np.asarray(classes)).all():
            raise ValueError(f"Labels {sorted(set(np.setdiff1d(y, classes).tolist()))} are not in `classes`.")
        if first:
            self._start(n_features=X.shape[1])
        features = self._sample_features(X)
        self._grow_classes(np.unique(y))
        rows = np.searchsorted(self.classes_, y)
        self.class_sums_ = self.class_sums_ + matrices.sums_by_row(features, rows=rows, num_rows=len(self.classes_))
        self.class_counts_ = self.class_counts_ + np.bincount(rows, minlength=len(self.classes_))
        self._update_shared(features, sign=1)
        self._refresh(selection=(features, rows) if first else None)
        return self

    def remove_samples(self, X: Any, y: Any) -> _ClassStatistics:
        """Subtract images fitted earlier (the inverse of ``partial_fit``); a class left with no image is dropped.

        The caller vouches that these exact images were fitted with these labels: the statistics cannot tell.
        """
        check_is_fitted(self)
        X, y = validate_data(self, X, y, reset=False, dtype=np.float64)
        rows = np.searchsorted(self.classes_, y).clip(max=len(self.classes_) - 1)
        if not np.array_equal(self.classes_[rows], y):
            raise ValueError(f"Labels {sorted(set(np.setdiff1d(y, self.classes_).tolist()))} were never fitted.")
        counts = self.class_counts_ - np.bincount(rows, minlength=len(self.classes_))
        if (counts < 0).any():
            raise ValueError("More images to remove than a class holds: these images were not all fitted.")
        features = self._sample_features(X)
        self.class_sums_ = self.class_sums_ - matrices.sums_by_row(features, rows=rows, num_rows=len(self.classes_))
        self.class_counts_ = counts
        self._update_shared(features, sign=-1)
        self._keep_classes(counts > 0)
        return self

    def remove_class(self, label: Hashable, X: Any = None) -> _ClassStatistics:
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
        self._keep_classes(np.arange(len(self.classes_)) != row)
        return self

    def rename_class(self, label: Hashable, new_label: Hashable) -> _ClassStatistics:
        """Give class ``label`` the name ``new_label``, keeping its statistics."""
        row = self._row(label)
        if new_label in self.classes_.tolist():
            raise ValueError(f"Class {new_label!r} already exists; remove it first or choose another name.")
        names = self.classes_.tolist()
        names[row] = new_label
        try:
            order = np.array(sorted(range(len(names)), key=names.__getitem__))
        except TypeError as error:
            raise ValueError(f"New label {new_label!r} cannot be ordered with the other labels: {error}") from error
        self.classes_ = np.array([names[index] for index in order])
        self.class_sums_, self.class_counts_ = self.class_sums_[order], self.class_counts_[order]
        self.weights_, self.bias_ = self.weights_[order], self.bias_[order]  # a new name changes no statistic
        return self

    def get_statistics(self) -> dict[str, np.ndarray]:
        """The fitted state as plain arrays (no pickles): a file can hold it, :meth:`set_statistics` restore it."""
        check_is_fitted(self)
        names = self._statistics_names() + tuple(name for name in CALIBRATION_NAMES if hasattr(self, name))
        return {name.rstrip("_"): np.asarray(getattr(self, name)) for name in names}

    def set_statistics(self, **arrays: np.ndarray) -> _ClassStatistics:
        """Install a state written by :meth:`get_statistics`, checked first: it may come from a damaged file."""
        missing = [name.rstrip("_") for name in self._statistics_names() if name.rstrip("_") not in arrays]
        if missing:
            raise ValueError(f"the statistics lack {', '.join(missing)}")
        classes, sums = np.asarray(arrays["classes"]), np.asarray(arrays["class_sums"])
        counts = np.asarray(arrays["class_counts"])
        if classes.ndim != 1 or len(set(classes.tolist())) != len(classes):
            raise ValueError(
                f"class labels must be distinct, got {len(classes)} labels, {len(set(classes.tolist()))} distinct"
            )
        if sums.ndim != 2 or sums.shape[0] != len(classes) or counts.shape != classes.shape:
            raise ValueError(
                f"{len(classes)} labels do not fit class sums of shape {list(sums.shape)} and counts of shape "
                f"{list(counts.shape)}"
            )
        if counts.dtype.kind not in "iu" or (len(counts) and counts.min() < 1):
            raise ValueError("every class needs an image count of at least 1 (a whole number)")
        for name, value in arrays.items():
            if name == "relative_alpha" and np.asarray(value).shape == () and value == np.inf:
                continue  # the plain class mean, chosen by leave-one-out
            if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"the statistics '{name}' hold values that are not finite numbers")
        order = np.argsort(classes, kind="stable")
        self.classes_, self.class_sums_ = classes[order], sums[order].astype(np.float64)
        self.class_counts_ = counts[order].astype(np.int64)
        self._set_shared(arrays)
        self._refresh()
        for name in [name for name in CALIBRATION_NAMES if hasattr(self, name)]:
            delattr(self, name)
        if "threshold" in arrays:
            self._set_calibration(arrays)
        return self

    def _set_calibration(self, arrays: dict[str, np.ndarray]) -> None:
        """Install a saved threshold, refusing values that are not one number in the unknown score's range."""
        threshold = _calibration_number(arrays, "threshold")
        low, high = self.unknown_score_range
        if not low <= threshold <= high:
            raise ValueError(f"the calibration threshold {threshold:g} lies outside the range of this classifier's "
                             f"unknown scores [{low:g}, {high:g}]")
        rate = _calibration_number(arrays, "true_positive_rate")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"the calibration's true positive rate must lie between 0 and 1, got {rate}")
        self.threshold_, self.true_positive_rate_ = threshold, rate
        self.threshold_stale_ = bool(arrays.get("threshold_stale", False))
        if "calibration_count" in arrays:
            count = _calibration_number(arrays, "calibration_count")
            if count != int(count) or count < 1:
                raise ValueError(f"the calibration's sample count must be a whole number of at least 1, got {count:g}")
            self.calibration_count_ = int(count)

    def _statistics_names(self) -> tuple[str, ...]:
        return ("classes_", "class_sums_", "class_counts_")

    unknown_score_range = (-np.inf, np.inf)  # where :meth:`score_samples`, and so a sound threshold, can lie

    def _set_shared(self, arrays: dict[str, np.ndarray]) -> None:
        self.n_features_in_ = self.class_sums_.shape[1]

    @property
    def class_means_(self) -> np.ndarray:
        """Mean feature vector of each class ``[C, F]``, in ``classes_`` order."""
        check_is_fitted(self)
        return self.class_sums_ / self.class_counts_[:, None]

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

    def _scores_of_features(self, features: np.ndarray) -> np.ndarray:
        return linear_scores(features=torch.from_numpy(features), weights=torch.from_numpy(self.weights_),
                             bias=torch.from_numpy(self.bias_)).numpy()

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

    def score_samples(self, X: Any) -> np.ndarray:
        """How much each query looks like one of the known classes, higher = more likely known (``[N]``); a
        query of no known class scores low. See the subclass for the score."""
        check_is_fitted(self)
        if not len(self.classes_):
            raise ValueError("No classes left: fit or partial_fit some images first.")
        return self._unknown_scores(validate_data(self, X, reset=False, dtype=np.float64))

    def calibrate(self, X: Any, *, true_positive_rate: float = 0.95) -> _ClassStatistics:
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

    def _start(self, *, n_features: int) -> None:
        self.classes_ = np.array([])
        self.class_sums_ = np.zeros((0, self._num_features(n_features)))
        self.class_counts_ = np.zeros(0, dtype=np.int64)

    def _row(self, label: Hashable) -> int:
        check_is_fitted(self)
        names = self.classes_.tolist()
        if label not in names:
            raise ValueError(f"Unknown class {label!r}; the classifier has {len(names)} classes.")
        return names.index(label)

    def _grow_classes(self, labels: np.ndarray) -> None:
        merged = np.union1d(self.classes_, labels) if len(self.classes_) else labels
        if len(merged) == len(self.classes_):
            return
        positions = np.searchsorted(merged, self.classes_)
        sums = np.zeros((len(merged), self.class_sums_.shape[1]))
        counts = np.zeros(len(merged), dtype=np.int64)
        sums[positions], counts[positions] = self.class_sums_, self.class_counts_
        self.classes_, self.class_sums_, self.class_counts_ = merged, sums, counts

    def _keep_classes(self, keep: np.ndarray) -> None:
        self.classes_ = self.classes_[keep]
        self.class_sums_, self.class_counts_ = self.class_sums_[keep], self.class_counts_[keep]
        self._refresh()

    def _refresh(self, *, selection: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Recompute the scoring weights after every change, so prediction never changes the estimator.

        ``selection`` holds the features and class rows of the images that started the estimator, for
        subclasses that tune a parameter on them.
        """
        if hasattr(self, "threshold_"):
            self.threshold_stale_ = True  # the scores it was set on have changed
        if not len(self.classes_):
            self.weights_, self.bias_ = self.class_sums_, np.zeros(0)
            return
        self.weights_, self.bias_ = self._solve(selection)

    def _num_features(self, n_features: int) -> int:
        return n_features

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        """The best class score: for the class mean, the cosine to the nearest class mean."""
        return self._scores_of_features(self._query_features(X)).max(axis=1)

    def _update_shared(self, features: np.ndarray, *, sign: int) -> None:
        """Add (``sign=1``) or subtract (``-1``) shared statistics; none for a plain class mean."""


class ClassMeanClassifier(_ClassStatistics):
    """The article's classifier: each class is the mean of its embeddings, a query takes the most cosine-similar.

    ``normalize=True`` averages L2-normalised embeddings instead, so images with large norms do not pull the mean
    towards them. Memory: ``C x d`` float64 sums. ``remove_class`` is always exact.
    """

    unknown_score_range = (-1.0 - 1e-6, 1.0 + 1e-6)  # a cosine, with rounding

    def __init__(self, *, normalize: bool = False) -> None:
        self.normalize = normalize

    def _sample_features(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X) if self.normalize else X

    def _query_features(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X)

    def _solve(self, selection: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        return unit_rows(self.class_sums_), np.zeros(len(self.classes_))


class _GramStatistics(_ClassStatistics):
    """Class sums plus the shared second moments of L2-normalised features: the raw Gram matrix ``gram_``
    (``sum x x^T``), the feature sum and the image count, all additive. Whatever a covariance-based classifier needs
    (the centred Gram matrix, the within-class scatter) follows from them, so ``partial_fit``, ``remove_class`` and
    merged shards stay exact. Subclasses keep ``device`` (see :class:`DecorrelatedClassifier`)."""

    def _start(self, *, n_features: int) -> None:
        super()._start(n_features=n_features)
        size = self.class_sums_.shape[1]
        self.gram_ = np.zeros((size, size))
        self.feature_sum_ = np.zeros(size)
        self.n_samples_seen_ = 0

    def _query_features(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(X)

    def _sample_features(self, X: np.ndarray) -> np.ndarray:
        return self._query_features(X)

    def _statistics_names(self) -> tuple[str, ...]:
        return super()._statistics_names() + ("gram_", "feature_sum_", "n_samples_seen_")

    def _set_shared(self, arrays: dict[str, np.ndarray]) -> None:
        size = self.class_sums_.shape[1]
        gram, feature_sum = np.asarray(arrays["gram"], np.float64), np.asarray(arrays["feature_sum"], np.float64)
        seen = np.asarray(arrays["n_samples_seen"])
        if gram.shape != (size, size) or feature_sum.shape != (size,):
            raise ValueError(
                f"Gram matrix {list(gram.shape)} or feature sum {list(feature_sum.shape)} do not fit {size} features"
            )
        if seen.shape != () or seen.dtype.kind not in "iu" or int(seen) < int(self.class_counts_.sum()):
            raise ValueError("n_samples_seen must be a whole number no smaller than the images of all classes")
        self.gram_, self.feature_sum_, self.n_samples_seen_ = gram, feature_sum, int(seen)
        self.n_features_in_ = size

    def _update_shared(self, features: np.ndarray, *, sign: int) -> None:
        self.gram_ = self.gram_ + sign * matrices.gram(features, device=compute_device(self.device))
        self.feature_sum_ = self.feature_sum_ + sign * features.sum(axis=0)
        self.n_samples_seen_ = self.n_samples_seen_ + sign * len(features)

    def _statistics(self) -> unknown_scores.Statistics:
        """The additive statistics as one tuple, from which a sub-fit without some images is a subtraction
        (:meth:`unknown_scores.Statistics.without`)."""
        return unknown_scores.Statistics(gram=self.gram_, feature_sum=self.feature_sum_, class_sums=self.class_sums_,
                                         class_counts=self.class_counts_, n_samples=self.n_samples_seen_)


class DecorrelatedClassifier(ridge_selection.RidgeSelectionMixin, unknown_scores.UnknownScoreMixin, _GramStatistics):
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

    The ridge strength ``alpha``:

    * ``"loo"`` (default): chosen on the images that start the estimator (``fit``, or a first ``partial_fit``)
      among ``relative_alphas`` times the mean eigenvalue of ``G`` *and the plain class mean* (cosine to the mean
      feature of each class, the limit of a ridge with nothing to decorrelate; ``alpha_`` and
      ``relative_alpha_`` are then ``inf``). Each candidate is scored by exact leave-one-out on those images, in
      closed form from one eigendecomposition: accuracy for the empirical prior, balanced accuracy (every class
      the same weight) for the balanced prior. The best ridge (ties: the stronger) is kept only if it beats the
      class mean by more than one standard error of the paired difference, so on a set where decorrelation does
      not clearly help the estimator falls back to the class mean. Later changes keep the chosen relative
      strength.
    * ``"gcv"`` (empirical prior only): generalised cross-validation of the ridge fit, from the statistics alone and
      re-chosen after every change, so ``partial_fit`` in batches predicts exactly as ``fit`` (it favours stronger
      ridges than leave-one-out accuracy does, costing a little accuracy).
    * ``"oas"``: Oracle Approximating Shrinkage of the feature covariance (:func:`oas_relative_ridge`), a closed
      form re-derived after every change; as accurate as leave-one-out on large classes and faster, but far too
      weak a ridge on a hundred images in a thousand dimensions (docs/classifiers.md), so not the default.
    * a positive number: that absolute value.

    ``alpha_`` holds the absolute value in use, ``relative_alpha_`` its multiple of the mean eigenvalue.

    ``unknown_score`` is what :meth:`score_samples` computes: ``"combined"`` (a Mahalanobis distance plus the best
    ridge score, standardised by ``unknown_moments_``), ``"mahalanobis"`` (the shared within-class one alone),
    ``"cosine"`` (the best cosine to a class mean), or ``"auto"`` (default): one of them chosen on the images that
    start the estimator by hiding classes from sub-fits (:meth:`_choose_unknown_score`, seeded by ``random_state``).
    ``unknown_score_`` holds the score in use, kept through later changes like the ridge strength.

    ``device`` is where the Gram matrix, its eigendecompositions and the leave-one-out products, the ``F x F`` and
    ``N x F`` work of a fit, are computed: None (default) in NumPy on the CPU, whose OpenBLAS ran them 1.3 to 2 times
    faster than torch's CPU kernels on a 2-core EPYC; a torch device name (``"cuda"``) in torch there. It is where
    the estimator runs, not what it is: statistics, stores and merges ignore it (:data:`RUN_TIME_PARAMS`).

    Memory: ``(C + F) x F`` float64 with ``F`` the feature size (d, or ``projection_dim``); every change of
    images or classes costs one ``F x F`` eigendecomposition (a rename costs none), and the first fit with
    ``unknown_score="auto"`` two sub-fits' Gram matrices and six Cholesky factorisations besides (0.6 s of a
    2 s Caltech-101 fit on 2 CPU cores). ``remove_class(label)``
    without the images drops the class's sums and keeps its images in ``G`` as unlabelled background (as if they
    had been fitted with a label of "none of these"); ``remove_class(label, X)`` with the class's images
    subtracts them too, which equals a fit without them.
    """

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

    def _num_features(self, n_features: int) -> int:
        if self.projection_dim is None:
            return n_features
        if int(self.projection_dim) < 1:
            raise ValueError(f"projection_dim must be a positive integer or None, got {self.projection_dim}.")
        self.projection_ = check_random_state(self.random_state).standard_normal((n_features, self.projection_dim))
        return int(self.projection_dim)

    def _start(self, *, n_features: int) -> None:
        if isinstance(self.alpha, str) and self.alpha not in ALPHA_RULES:
            raise ValueError(f"alpha must be 'loo', 'gcv', 'oas' or a positive number, got {self.alpha!r}.")
        if not isinstance(self.alpha, str) and not self.alpha > 0:
            raise ValueError(f"alpha must be 'loo', 'gcv', 'oas' or a positive number, got {self.alpha!r}.")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(map(repr, PRIORS))}, got {self.prior!r}.")
        if self.prior == "balanced" and self.alpha == "gcv":
            raise ValueError("alpha='gcv' scores a ridge regression onto one-hot labels, which needs "
                             "prior='empirical'; use alpha='loo' or a number with prior='balanced'.")
        if not len(self.relative_alphas) or min(self.relative_alphas) <= 0:
            raise ValueError(f"relative_alphas must be positive numbers, got {self.relative_alphas}.")
        if self.unknown_score not in unknown_scores.UNKNOWN_SCORES:
            raise ValueError(f"unknown_score must be one of {', '.join(map(repr, unknown_scores.UNKNOWN_SCORES))}, got "
                             f"{self.unknown_score!r}.")
        super()._start(n_features=n_features)

    def _query_features(self, X: np.ndarray) -> np.ndarray:
        unit = unit_rows(X)
        return unit if self.projection_dim is None else np.maximum(unit @ self.projection_, 0.0)

    def _statistics_names(self) -> tuple[str, ...]:
        projection = ("projection_",) if self.projection_dim is not None else ()
        moments = ("unknown_moments_",) if hasattr(self, "unknown_moments_") else ()
        choice = ("unknown_score_",) if hasattr(self, "unknown_score_") else ()
        return super()._statistics_names() + ("relative_alpha_",) + projection + moments + choice

    def _set_shared(self, arrays: dict[str, np.ndarray]) -> None:
        super()._set_shared(arrays)
        self.relative_alpha_ = float(arrays["relative_alpha"])
        if "unknown_moments" in arrays:
            self.set_unknown_moments(arrays["unknown_moments"])
        elif hasattr(self, "unknown_moments_"):
            del self.unknown_moments_
        self.unknown_score_ = self._saved_unknown_score(arrays)
        if self.projection_dim is not None:
            self.projection_ = np.asarray(arrays["projection"], np.float64)
            if self.projection_.shape[1] != self.class_sums_.shape[1]:
                raise ValueError(f"the projection has {self.projection_.shape[1]} columns, not "
                                 f"{self.class_sums_.shape[1]}")
            self.n_features_in_ = self.projection_.shape[0]

    def _solve(self, selection: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        decomposition = self.decomposition()
        mean, eigenvalues, eigenvectors, rotated, scale = (
            decomposition[name] for name in ("mean", "eigenvalues", "eigenvectors", "rotated", "scale"))
        relative = np.asarray(self.relative_alphas, dtype=np.float64)
        if not isinstance(self.alpha, str):
            self.relative_alpha_ = float(self.alpha) / scale
        elif self.alpha == "gcv":
            errors = [self._gcv(value * scale, eigenvalues, rotated) for value in relative]
            self.relative_alpha_ = float(relative[int(np.argmin(errors))])
        elif self.alpha == "oas":
            self.relative_alpha_ = oas_relative_ridge(eigenvalues, n_samples=self.n_samples_seen_)
        elif selection is not None:
            hits = self._leave_one_out_hits(*selection, decomposition=decomposition)
            self.relative_alpha_ = ridge_selection.one_standard_error_choice(
                relative, hits=hits, weights=self._selection_weights(selection[1])
            )
        self.alpha_ = float(self.alpha) if not isinstance(self.alpha, str) else self.relative_alpha_ * scale
        if selection is not None:
            self._start_unknown_score(*selection)
        if np.isinf(self.alpha_):
            return unit_rows(self.class_sums_), np.zeros(len(self.classes_))
        directions = rotated / (eigenvalues + self.alpha_)[:, None]
        if self.prior == "balanced":
            directions = directions / matrices.safe_sqrt((rotated * directions).sum(axis=0))
        weights = eigenvectors @ directions
        return weights.T, -(mean @ weights)


PRIORS = ("empirical", "balanced")
ALPHA_RULES = ("loo", "gcv", "oas")
SELECT_FOR = ("accuracy", "balanced")  # the metric a DiscriminantClassifier's prior serves


class DiscriminantClassifier(_GramStatistics):
    """Shrinkage linear discriminant analysis from the same additive statistics: closed forms and one choice against
    the class mean, so little to overfit, and ``partial_fit``, ``remove_class`` and merged shards give exactly what
    one fit gives.

    On L2-normalised features, with ``m_c`` the class means and ``n_c`` their image counts, a query ``q`` scores
    ``q^T S^-1 m_c - m_c^T S^-1 m_c / 2 + tau log(n_c / n)``. ``S`` is the pooled within-class covariance (the
    scatter about each image's own class mean over ``n - C`` degrees of freedom), standardised by its diagonal and
    shrunk towards the identity there by Oracle Approximating Shrinkage (:func:`oas_shrinkage`; ``shrinkage`` a number
    in [0, 1] fixes it): scikit-learn's ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")`` does the same
    with Ledoit-Wolf per class, whose fourth moments additive statistics cannot keep.

    ``tau``, the prior's strength (``prior_strength_``): 1 weighs each class by its share of the training images,
    the decision that makes fewest errors when queries come in the same shares (``select_for="accuracy"``, default);
    0 weighs every class alike, the decision for the mean of the per-class accuracies (``select_for="balanced"``).
    ``prior_strength`` (a number in [0, 1]) overrides that choice. On TREC's 50 fine classes, from a handful of
    questions to several hundred each, accuracy and balanced accuracy both fall monotonically as ``tau`` leaves the
    end their metric names (docs/classifiers.md), so the ends are chosen by theory, not selected on the images.

    ``check_against_mean`` (default True): on the images that start the estimator, a three-fold cross-validation
    compares the discriminant with the cosine to each class's mean (the metric ``select_for`` names); unless the
    discriminant wins by more than one standard error of the paired difference, the estimator scores by that cosine
    (``uses_class_mean_``), kept through later changes like the decorrelated classifiers' ridge. Two candidates, not
    twenty-six: no winner's curse to speak of. It guards the case where a covariance estimated from a hundred images
    in a thousand dimensions only adds noise: two look-alike Caltech-101 classes of 50 images each
    (docs/classifiers.md).

    :meth:`score_samples` is minus the smallest Mahalanobis distance to a class mean under the same shrunk
    covariance (the best cosine where the class mean is used; ``shrinkage_`` and ``whitening_`` then stay unset, no
    covariance being decomposed). ``device`` as for :class:`DecorrelatedClassifier`.
    Memory: ``(C + F) x F`` float64; every change of images or classes costs one ``F x F`` eigendecomposition (the
    first fit four, with the check). ``remove_class(label)`` without the images keeps them in the scatter,
    uncentred; with them (``remove_class(label, X)``) it equals a fit without them.
    """

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

    def _start(self, *, n_features: int) -> None:
        if self.shrinkage != "oas" and (isinstance(self.shrinkage, str) or not 0.0 <= self.shrinkage <= 1.0):
            raise ValueError(f"shrinkage must be 'oas' or a number between 0 and 1, got {self.shrinkage!r}.")
        if self.select_for not in SELECT_FOR:
            raise ValueError(f"select_for must be one of {', '.join(map(repr, SELECT_FOR))}, got {self.select_for!r}.")
        if self.prior_strength is not None and not 0.0 <= self.prior_strength <= 1.0:
            raise ValueError(f"prior_strength must be None or a number between 0 and 1, got {self.prior_strength!r}.")
        super()._start(n_features=n_features)
        self.uses_class_mean_ = False

    def _statistics_names(self) -> tuple[str, ...]:
        return super()._statistics_names() + ("uses_class_mean_",)

    def _set_shared(self, arrays: dict[str, np.ndarray]) -> None:
        super()._set_shared(arrays)
        self.uses_class_mean_ = bool(arrays.get("uses_class_mean", False))

    def _solve(self, selection: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        if self.prior_strength is not None:
            self.prior_strength_ = float(self.prior_strength)
        else:
            self.prior_strength_ = 1.0 if self.select_for == "accuracy" else 0.0
        if selection is not None and self.check_against_mean:
            self.uses_class_mean_ = not self._beats_the_class_mean(*selection)
        if self.uses_class_mean_:  # no covariance to decompose: the cosine to the class means scores
            return unit_rows(self.class_sums_), np.zeros(len(self.classes_))
        weights, bias, self.whitening_, self.shrinkage_ = self._discriminant(
            class_sums=self.class_sums_, class_counts=self.class_counts_, gram=self.gram_)
        return weights, bias

    def _beats_the_class_mean(self, features: np.ndarray, rows: np.ndarray) -> bool:
        """Whether the discriminant beats the cosine to the class means by more than one standard error over three
        seeded, stratified folds of the starting images (weights as the metric ``select_for`` names). Each fold's
        statistics are the whole ones minus its held-out images': one Gram matrix of a third of the images."""
        folds = np.empty(len(rows), dtype=np.int64)
        order = np.random.default_rng(0).permutation(len(rows))
        for row in np.unique(rows):
            members = order[rows[order] == row]
            folds[members] = np.arange(len(members)) % 3
        device, statistics = compute_device(self.device), self._statistics()
        hits = np.zeros((2, len(rows)))
        for fold in range(3):
            held_out = folds == fold
            present = np.unique(rows[~held_out])  # the classes the fold's statistics keep, in order
            if len(present) < 2 or not held_out.any():
                return False  # too few images to tell: keep the article's class mean
            kept = statistics.without(features[held_out], rows[held_out], device=device)
            weights, bias, _, _ = self._discriminant(class_sums=kept.class_sums, class_counts=kept.class_counts,
                                                     gram=kept.gram)
            queries = features[held_out]
            for number, scores in enumerate((queries @ weights.T + bias, queries @ unit_rows(kept.class_sums).T)):
                hits[number, held_out] = present[scores.argmax(axis=1)] == rows[held_out]
        weights = ridge_selection.metric_weights(rows, balanced=self.select_for == "balanced")
        return ridge_selection.beats(hits[0], hits[1], weights=weights)

    def _discriminant(
        self, *, class_sums: np.ndarray, class_counts: np.ndarray, gram: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(weights, bias, whitening, shrinkage)`` of the discriminant on these statistics: the whitening map
        ``q -> q / scale @ eigenvectors / sqrt(shrunk eigenvalues)`` has ``S^-1 = whitening whitening^T``."""
        degrees = max(int(class_counts.sum()) - len(class_counts), 1)
        scatter = matrices.within_class_scatter(gram=gram, class_sums=class_sums, class_counts=class_counts)
        covariance = scatter / degrees
        scale = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        scale = np.where(scale > 0, scale, 1.0)  # a feature that never varies within a class is left unscaled
        eigenvalues, eigenvectors = matrices.eigh(covariance / np.outer(scale, scale),
                                                  device=compute_device(self.device))
        shrinkage = oas_shrinkage(eigenvalues, n_samples=degrees) if self.shrinkage == "oas" else float(self.shrinkage)
        target = eigenvalues.mean() if eigenvalues.mean() > 0 else 1.0
        whitening = eigenvectors / scale[:, None] / np.sqrt((1 - shrinkage) * eigenvalues + shrinkage * target)
        centres = (class_sums / class_counts[:, None]) @ whitening
        prior = np.log(class_counts / class_counts.sum())
        bias = -0.5 * (centres**2).sum(axis=1) + self.prior_strength_ * prior
        return centres @ whitening.T, bias, whitening, shrinkage

    def _unknown_scores(self, X: np.ndarray) -> np.ndarray:
        """Minus the smallest Mahalanobis distance to a class mean under the shrunk within-class covariance; the best
        cosine where the class mean is used."""
        if self.uses_class_mean_:
            return super()._unknown_scores(X)
        device = compute_device(self.device)
        return unknown_scores.mahalanobis_scores(
            self._query_features(X), centres=self.class_means_,
            whiten=lambda rows: matrices.product(rows, self.whitening_, device=device))


def oas_shrinkage(eigenvalues: np.ndarray, *, n_samples: int) -> float:
    """Oracle Approximating Shrinkage (Chen et al. 2010; scikit-learn's ``oas``): the weight ``rho`` in [0, 1] of the
    target ``mean(eigenvalues) I`` in ``(1 - rho) S + rho mean(eigenvalues) I``, for a covariance ``S`` of these
    eigenvalues estimated from ``n_samples``. It depends on ``trace(S)``, ``trace(S^2)``, ``n_samples`` and the
    dimension only: a closed form, so nothing is selected among candidates (no winner's curse)."""
    dimension = len(eigenvalues)
    covariance = np.asarray(eigenvalues, dtype=np.float64)
    mu = covariance.mean()
    mean_square = (covariance**2).sum() / dimension**2  # the mean of the squared entries of S
    denominator = (n_samples + 1) * (mean_square - mu**2 / dimension)
    return 1.0 if denominator <= 0 else float(min((mean_square + mu**2) / denominator, 1.0))


def oas_relative_ridge(eigenvalues: np.ndarray, *, n_samples: int) -> float:
    """The ridge, as a multiple of the mean eigenvalue of the centred Gram matrix ``G``, that Oracle Approximating
    Shrinkage (Chen et al. 2010; scikit-learn's ``oas``) puts on the covariance ``S = G / n``:
    ``(1 - rho) S + rho mu I`` is ``(1 - rho) / n`` times ``G + alpha I`` with
    ``alpha / mean eig(G) = rho / (1 - rho)``.

    ``partial_fit``, ``remove_class`` and merged shards give it exactly as a full fit does (:func:`oas_shrinkage`).
    """
    shrinkage = oas_shrinkage(np.asarray(eigenvalues, dtype=np.float64) / max(n_samples, 1), n_samples=n_samples)
    return np.inf if shrinkage >= 1.0 else shrinkage / (1.0 - shrinkage)


# Parameters that say where an estimator computes, not what it computes: a store or a merge leaves them out, so a
# store built on a GPU opens on a CPU and shards fitted on different machines merge.
RUN_TIME_PARAMS = ("device",)


def model_params(estimator: Any) -> dict[str, Any]:
    """``estimator.get_params()`` without :data:`RUN_TIME_PARAMS`: the parameters that define its results."""
    return {name: value for name, value in estimator.get_params().items() if name not in RUN_TIME_PARAMS}


# Command-line names: an estimator class and the parameters that make the name.
CLASSIFIERS: dict[str, tuple[type[_ClassStatistics], dict[str, Any]]] = {
    "mean": (ClassMeanClassifier, {}),
    "decorrelated": (DecorrelatedClassifier, {}),
    "balanced": (DecorrelatedClassifier, {"prior": "balanced"}),
    "lda": (DiscriminantClassifier, {}),
}


def make_classifier(name: str, **params: Any) -> _ClassStatistics:
    """A fresh estimator by its command-line name (``mean``, ``decorrelated``, ``balanced`` or ``lda``); ``params``
    win."""
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown classifier '{name}'; use one of {', '.join(CLASSIFIERS)}.")
    kind, preset = CLASSIFIERS[name]
    return kind(**{**preset, **params})


# Shared statistics that add up over disjoint sets of images; the others must agree between the parts.
ADDITIVE_SHARED = ("gram", "feature_sum", "n_samples_seen")
# Fitted on the images that started each part: the first part's stand until chosen again over all images.
FIRST_PART_WINS = ("relative_alpha", "unknown_moments", "unknown_score", "uses_class_mean")


def merge_statistics(
    parts: Sequence[_ClassStatistics | dict[str, np.ndarray]], *, into: _ClassStatistics | None = None
) -> _ClassStatistics:
    """One estimator holding the sum of the fitted ``parts``' statistics (same class and parameters, fitted on
    disjoint images, e.g. the shards of a dataset on several machines): equal to one fit on all their images up to
    float64 rounding, for any set of classes per part.

    A part is a fitted estimator or its :meth:`~_ClassStatistics.get_statistics` (what crosses a network); ``into``
    is the unfitted estimator to fill (default: a copy of the first part). With ``alpha="loo"`` the statistics are
    exact but the ridge strength is the first part's until :meth:`DecorrelatedClassifier.select_alpha` chooses it
    from the hits of every image (:meth:`~DecorrelatedClassifier.leave_one_out_hits` against the merged statistics,
    shard by shard), and so are the unknown score's moments until
    :meth:`~DecorrelatedClassifier.set_unknown_moments` installs their sum over the shards. A calibration threshold
    is not kept: it was set on scores the merge changes.
    """
    if not parts:
        raise ValueError("merge_statistics needs at least one fitted estimator or its statistics.")
    estimators = [part for part in parts if isinstance(part, _ClassStatistics)]
    template = into if into is not None else (estimators[0] if estimators else None)
    if template is None:
        raise ValueError("merge_statistics needs `into` (the estimator to fill) when the parts are statistics.")
    for part in estimators:
        if type(part) is not type(template) or model_params(part) != model_params(template):
            raise ValueError(f"Cannot merge {part!r} into {template!r}: the estimators differ in class or "
                             "parameters.")
    states = [part.get_statistics() if isinstance(part, _ClassStatistics) else part for part in parts]
    classes = np.unique(np.concatenate([state["classes"] for state in states]))
    sums = np.zeros((len(classes), states[0]["class_sums"].shape[1]))
    counts = np.zeros(len(classes), dtype=np.int64)
    for state in states:
        positions = np.searchsorted(classes, state["classes"])
        sums[positions] += state["class_sums"]
        counts[positions] += state["class_counts"]
    merged = {"classes": classes, "class_sums": sums, "class_counts": counts}
    for name in set(states[0]) - set(merged) - {name.rstrip("_") for name in CALIBRATION_NAMES}:
        if name in ADDITIVE_SHARED:
            merged[name] = sum(state[name] for state in states)
        elif name not in FIRST_PART_WINS and any(not np.array_equal(state[name], states[0][name]) for state in states):
            raise ValueError(f"Cannot merge estimators whose '{name}' differs (e.g. another random_state).")
        else:
            merged[name] = states[0][name]
    return sklearn.base.clone(template).set_statistics(**merged)


def classifier_name(estimator: Any) -> str:
    """The command-line name of an estimator of this module: the most specific one whose parameters it has."""
    params = estimator.get_params() if isinstance(estimator, _ClassStatistics) else {}
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
    if isinstance(estimator, _ClassStatistics):
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


def margins(scores: np.ndarray) -> np.ndarray:
    """Best minus second-best score per query (``scores`` ranked best first): small near a decision boundary,
    NaN where only one class exists."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores[:, 0] - scores[:, 1] if scores.shape[1] > 1 else np.full(len(scores), np.nan)
