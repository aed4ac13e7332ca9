"""How the decorrelated classifiers choose their ridge on their own training images, and the rules every
estimator's choice shares.

One eigendecomposition of the centred Gram matrix gives exact leave-one-out hits for every candidate ridge, the
plain class mean among them (:class:`RidgeSelectionMixin`); a candidate is kept only if it beats the class mean by
more than one standard error of the paired difference (:func:`beats`, also the discriminant's check against the
class mean), scored with the weights of the metric the user names (:func:`metric_weights`). Split from the
estimator so that a distributed fit can run the selection shard by shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted, validate_data

from simsearch.classifiers import matrices
from simsearch.classifiers.matrices import compute_device


class RidgeSelectionMixin:
    """How the decorrelated classifiers choose their ridge ``alpha_`` on the training images alone: one
    eigendecomposition of the centred Gram matrix, then exact leave-one-out hits (or GCV) for every candidate, the
    plain class mean among them. Split from the estimator so that a distributed fit can run it shard by shard."""

    def decomposition(self) -> dict[str, Any]:
        """The centred statistics in the eigenbasis of the centred Gram matrix: what every ridge strength and the
        leave-one-out selection are computed from (one ``F x F`` eigendecomposition)."""
        n = self.n_samples_seen_
        mean = self.feature_sum_ / n
        centred_gram = self.gram_ - n * np.outer(mean, mean)
        centred_sums = self.class_sums_ - self.class_counts_[:, None] * mean
        targets = centred_sums if self.prior == "empirical" else centred_sums / self.class_counts_[:, None]
        eigenvalues, eigenvectors = matrices.eigh(centred_gram, device=compute_device(self.device))
        scale = eigenvalues.mean() if eigenvalues.mean() > 0 else 1.0
        return dict(mean=mean, eigenvalues=eigenvalues, eigenvectors=eigenvectors,
                    rotated=eigenvectors.T @ targets.T, scale=scale)

    def leave_one_out_hits(self, X: Any, y: Any, *, decomposition: dict[str, Any] | None = None) -> np.ndarray:
        """``[candidates + 1, n]``: whether each image of ``X`` (labels ``y``) is classified right with itself left
        out of the *current* statistics, for every relative ridge strength and, last, the plain class mean.

        The images must be among those fitted. Computed image by image against the whole statistics, so the
        shards of a dataset fitted apart and merged (:func:`merge_statistics`) give, stacked, the hits of a single
        fit; :meth:`select_alpha` then chooses from them as ``fit`` does. ``decomposition`` (:meth:`decomposition`,
        computed once for all shards) saves an eigendecomposition per call.
        """
        check_is_fitted(self)
        X, y = validate_data(self, X, y, reset=False, dtype=np.float64)
        rows = np.searchsorted(self.classes_, y).clip(max=len(self.classes_) - 1)
        if not np.array_equal(self.classes_[rows], y):
            raise ValueError(f"Labels {sorted(set(np.setdiff1d(y, self.classes_).tolist()))} were never fitted.")
        return self._leave_one_out_hits(self._sample_features(X), rows,
                                        decomposition=decomposition or self.decomposition())

    def select_alpha(self, hits: np.ndarray, y: Any) -> RidgeSelectionMixin:
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
        self.relative_alpha_ = one_standard_error_choice(
            np.asarray(self.relative_alphas, dtype=np.float64), hits=hits, weights=self._selection_weights(rows)
        )
        self._refresh()
        return self

    def _gcv(self, alpha: float, eigenvalues: np.ndarray, rotated: np.ndarray) -> float:
        """Generalised cross-validation error of the ridge fit, from the statistics alone (no images needed)."""
        n = self.n_samples_seen_
        target_energy = float(np.sum(self.class_counts_ - self.class_counts_**2 / n))
        explained = np.sum((rotated**2).sum(axis=1) * (eigenvalues + 2 * alpha) / (eigenvalues + alpha) ** 2)
        residual = max(target_energy - float(explained), 0.0)
        degrees = 1.0 + float(np.sum(eigenvalues / (eigenvalues + alpha)))
        return n * residual / (n - degrees) ** 2 if degrees < n else np.inf

    def _selection_weights(self, rows: np.ndarray) -> np.ndarray:
        """Per-image weights of the selection score: accuracy for the empirical prior, balanced accuracy (every
        class the same total weight) for the balanced one."""
        return metric_weights(rows, balanced=self.prior == "balanced")

    def _leave_one_out_hits(
        self, features: np.ndarray, rows: np.ndarray, *, decomposition: dict[str, Any]
    ) -> np.ndarray:
        """``[candidates, images]``: whether each training image is classified right with itself left out, for each
        candidate ridge strength (last: ``inf``, the plain class mean). Exact; float32 products suffice to rank."""
        mean, eigenvalues, eigenvectors, rotated = (
            decomposition[name] for name in ("mean", "eigenvalues", "eigenvectors", "rotated"))
        alphas = np.append(np.asarray(self.relative_alphas, dtype=np.float64), np.inf) * decomposition["scale"]
        device = compute_device(self.device)
        centred, rotation = (features - mean).astype(np.float32), eigenvectors.astype(np.float32)
        # on a device, the projected images stay there for every candidate
        projected = (centred @ rotation if device is None
                     else matrices.on_device(centred, device) @ matrices.on_device(rotation, device))
        rotated32 = rotated.astype(np.float32)
        own = (np.arange(len(rows)), rows)
        counts = self.class_counts_[rows].astype(np.float64)
        inverses = (1.0 / (eigenvalues + alphas[:, None])).astype(np.float32)  # [candidates, F]; zeros for inf
        # u_i K u_i of every candidate, [N, candidates]
        leverages = matrices.product(projected**2, inverses.T, device=device)
        hits = []
        for alpha, inverse, leverage in zip(alphas, inverses, leverages.T):
            if np.isinf(alpha):
                fitted = leave_one_out_cosines(features, rows, class_sums=self.class_sums_, counts=counts,
                                                device=device)
            else:
                weighted = rotated32 * inverse[:, None]
                products = matrices.product(projected, weighted, device=device)  # u_i K r_c, [N, C]
                if self.prior == "empirical":
                    fitted = self._leave_one_out_ridge(products, leverage, own)
                else:
                    fitted = leave_one_out_whitened_cosines(products, leverage, rows, counts=counts,
                                                             class_norms=(rotated32 * weighted).sum(axis=0))
            hits.append(fitted.argmax(axis=1) == rows)
        return np.asarray(hits)

    def _leave_one_out_ridge(
        self, products: np.ndarray, leverage: np.ndarray, own: tuple[np.ndarray, np.ndarray]
    ) -> np.ndarray:
        """Ridge scores of every training image with itself left out, up to a positive factor per image, from its
        centred ridge products with the class sums and its leverage (see :meth:`_leave_one_out_hits`).

        Leaving image ``i`` out turns its fitted one-hot scores ``f_i`` into ``(f_i - h_i y_i) / (1 - h_i)`` with
        ``h_i`` its leverage; the positive factor does not change the argmax, so it is dropped.
        """
        prior = (self.class_counts_ / self.n_samples_seen_).astype(np.float32)
        fitted = products + prior
        fitted[own] -= leverage + 1.0 / self.n_samples_seen_
        return fitted


def leave_one_out_whitened_cosines(
    products: np.ndarray, leverage: np.ndarray, rows: np.ndarray, *, class_norms: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Balanced-prior scores of every training image refitted without it: its class mean, the global mean and the
    Gram matrix all lose the image (exact), each row up to a positive factor that does not change its argmax.

    With ``u_i`` the centred features and ``r_c`` the centred class means, both in the eigenbasis of ``G``, and the
    ridge's ``K = (G + alpha I)^-1``, ``products`` holds ``a = u^T K r_c`` ``[N, C]``, ``leverage`` ``b = u^T K u``
    ``[N]`` and ``class_norms`` ``q = r_c^T K r_c`` ``[C]``. Without
    image ``i`` (``n`` images in all), ``G`` loses ``n/(n-1) u u^T`` (Sherman-Morrison), ``mu`` moves by
    ``-u/(n-1)`` and its class mean by ``-(u - r_c)/(n_c - 1)``: every score follows from ``a``, ``b`` and ``q``.
    A class of one image has no mean left (score ``-inf``).
    """
    n = len(rows)
    products = products.astype(np.float64)
    if n < 2:
        return np.full(products.shape, -np.inf)  # nothing is left to fit without the only image
    leverage = leverage.astype(np.float64)[:, None]
    class_norms = class_norms.astype(np.float64)
    beta = n / (n - 1)
    delta = beta / np.maximum(1.0 - beta * leverage, 1e-12)
    growth = 1.0 + delta * leverage

    def scores(shrink: np.ndarray, shift: np.ndarray, products: np.ndarray, class_norms: np.ndarray) -> np.ndarray:
        """Score of the query direction against ``shrink * r_c + shift * u`` under the downdated ``K``."""
        numerator = shrink * products + shift * leverage
        norm = (shrink**2 * (class_norms + delta * products**2) + 2 * shrink * shift * products * growth
                + shift**2 * leverage * growth)
        return numerator / matrices.safe_sqrt(norm)

    fitted = scores(np.ones(1), np.full(1, 1.0 / (n - 1)), products, class_norms)
    own = (np.arange(n), rows)
    kept = counts > 1
    own_count = np.where(kept, counts, 2.0)[:, None]
    # only each image's own class changes its mean: one column per image, not the whole [N, C] again
    own_scores = scores(own_count / (own_count - 1), 1.0 / (n - 1) - 1.0 / (own_count - 1),
                        products[own][:, None], class_norms[rows][:, None])
    fitted[own] = np.where(kept, own_scores[:, 0], -np.inf)
    return fitted


def one_standard_error_choice(relative: np.ndarray, *, hits: np.ndarray, weights: np.ndarray) -> float:
    """The relative ridge strength with the best weighted leave-one-out score (ties: the stronger), or ``inf`` (the
    plain class mean, the last row of ``hits``) unless that ridge beats it by more than one standard error of the
    paired difference, so a small set where decorrelation is a coin toss keeps the class mean."""
    scores = hits[:-1] @ weights
    best = np.flatnonzero(scores == scores.max())
    chosen = best[np.argmax(relative[best])]
    return float(relative[chosen]) if beats(hits[chosen], hits[-1], weights=weights) else float(np.inf)


def beats(hits: np.ndarray, other_hits: np.ndarray, *, weights: np.ndarray) -> bool:
    """Whether ``hits`` beat ``other_hits`` (per image, same images) by more than one standard error of the weighted
    paired difference: the rule both the ridge choice and the discriminant's check against the class mean apply."""
    difference = np.asarray(hits, dtype=np.float64) - other_hits
    gain = float(difference @ weights)
    return gain > float(np.sqrt(np.sum(weights**2 * (difference - gain) ** 2)))


def metric_weights(rows: np.ndarray, *, balanced: bool) -> np.ndarray:
    """Per-image weights whose weighted hits are the accuracy, or with ``balanced`` the balanced accuracy (every
    class present the same total weight)."""
    if not balanced:
        return np.full(len(rows), 1.0 / len(rows))
    counts = np.bincount(rows)
    return 1.0 / (np.count_nonzero(counts) * counts[rows])


def leave_one_out_cosines(
    features: np.ndarray, rows: np.ndarray, *, class_sums: np.ndarray, counts: np.ndarray, device: torch.device
) -> np.ndarray:
    """Cosine of every training image to every class mean, its own class's mean computed without it (exact)."""
    features = features.astype(np.float32)
    products = matrices.product(features, class_sums.T.astype(np.float32), device=device)
    sums_squared = (class_sums**2).sum(axis=1).astype(np.float32)
    fitted = products / matrices.safe_sqrt(sums_squared)
    own = (np.arange(len(rows)), rows)
    own_product, own_squared = products[own], np.einsum("ij,ij->i", features, features)
    remaining = sums_squared[rows] - 2 * own_product + own_squared
    fitted[own] = np.where(counts > 1, (own_product - own_squared) / matrices.safe_sqrt(remaining), -np.inf)
    return fitted
