"""How the decorrelated classifiers choose their ridge on their own training images, and the rules every
estimator's choice shares: functions of the additive statistics (:class:`~simsearch.classifiers.statistics.Statistics`).

One eigendecomposition of the centred Gram matrix (:func:`decomposition`) gives exact leave-one-out hits for every
candidate ridge, the plain class mean among them (:func:`leave_one_out_hits`); a candidate is kept only if it beats
the class mean by more than one standard error of the paired difference (:func:`beats`, also the discriminant's
check against the class mean), scored with the weights of the metric the user names (:func:`metric_weights`).
Functions of the statistics, so a distributed fit runs the selection shard by shard against merged statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from simsearch.classifiers import matrices
from simsearch.classifiers.statistics import Samples, Statistics

ALPHA_RULES = ("loo", "gcv", "oas")


class Decomposition(NamedTuple):
    """The centred statistics in the eigenbasis of the centred Gram matrix: what every ridge strength and the
    leave-one-out selection are computed from. The ridge targets lie in the span of the centred images, so a thin
    spectrum (fewer images than features) gives the same class vectors as a complete one."""

    mean: np.ndarray  # [F]
    spectrum: matrices.Spectrum  # of the centred Gram matrix
    rotated: np.ndarray  # [r, C]: the ridge targets (centred class sums, or means for the balanced prior)
    scale: float  # the mean eigenvalue, which relative ridge strengths multiply
    prior: str  # whose targets ``rotated`` holds

    def target_factors(self, prior: str, counts: np.ndarray) -> np.ndarray:
        """``[C]`` factors that turn the targets of this decomposition's prior into those of ``prior``: the
        balanced prior's class means are the empirical prior's centred class sums over the class ``counts``."""
        if prior == self.prior:
            return np.ones(len(counts))
        return 1.0 / counts if prior == "balanced" else counts.astype(np.float64)

    @property
    def eigenvalues(self) -> np.ndarray:
        return self.spectrum.eigenvalues

    @property
    def eigenvectors(self) -> np.ndarray:
        return self.spectrum.eigenvectors


def decomposition(
    statistics: Statistics,
    *,
    prior: str,
    device: torch.device | None,
    samples: Samples | None = None,
    spectrum: matrices.Spectrum | None = None,
) -> Decomposition:
    """The centred Gram matrix's eigendecomposition (``spectrum`` where the caller has it already, else
    :meth:`Statistics.centred_spectrum`, in the ``samples``' space where they are fewer than the features), with
    the ridge targets of ``prior``."""
    mean = statistics.mean
    centred_sums = statistics.class_sums - statistics.class_counts[:, None] * mean
    targets = centred_sums if prior == "empirical" else centred_sums / statistics.class_counts[:, None]
    spectrum = spectrum if spectrum is not None else statistics.centred_spectrum(samples, device=device)
    return Decomposition(mean=mean, spectrum=spectrum, rotated=spectrum.eigenvectors.T @ targets.T,
                         scale=spectrum.mean_eigenvalue(), prior=prior)


def relative_ridge(
    *,
    alpha: float | str,
    prior: str,
    relative_alphas: np.ndarray,
    statistics: Statistics,
    decomposed: Decomposition,
    selection: tuple[np.ndarray, np.ndarray] | None,
    previous: float | None,
    device: torch.device | None,
    projected: np.ndarray | torch.Tensor | None = None,
) -> float:
    """The ridge strength as a multiple of the mean eigenvalue, by the rule ``alpha`` names (see
    ``DecorrelatedClassifier``): a number as it is; ``"gcv"`` and ``"oas"`` from the statistics alone, after every
    change; ``"loo"`` on the starting images ``selection`` (features, class rows; ``projected`` by :func:`project`
    where the caller has them so), kept (``previous``) after."""
    if not isinstance(alpha, str):
        return float(alpha) / decomposed.scale
    if alpha == "gcv":
        errors = [gcv_error(statistics, value * decomposed.scale, decomposed) for value in relative_alphas]
        return float(relative_alphas[int(np.argmin(errors))])
    if alpha == "oas":
        return oas_relative_ridge(decomposed.spectrum.all_eigenvalues(), n_samples=statistics.n_samples)
    if selection is None:
        return previous
    hits = leave_one_out_hits(statistics, *selection, relative_alphas=relative_alphas, prior=prior,
                              decomposed=decomposed, device=device, projected=projected)
    return one_standard_error_choice(relative_alphas, hits=hits, weights=selection_weights(selection[1], prior=prior))


def ridge_class_vectors(
    decomposed: Decomposition, *, alpha: float, prior: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(weights [C, F], bias [C])`` of the ridge at absolute strength ``alpha`` (finite)."""
    directions = decomposed.rotated / (decomposed.eigenvalues + alpha)[:, None]
    if prior == "balanced":
        directions = directions / matrices.safe_sqrt((decomposed.rotated * directions).sum(axis=0))
    weights = decomposed.eigenvectors @ directions
    return weights.T, -(decomposed.mean @ weights)


def gcv_error(statistics: Statistics, alpha: float, decomposed: Decomposition) -> float:
    """Generalised cross-validation error of the ridge fit, from the statistics alone (no images needed)."""
    n, counts, eigenvalues = statistics.n_samples, statistics.class_counts, decomposed.eigenvalues
    target_energy = float(np.sum(counts - counts**2 / n))
    explained = np.sum((decomposed.rotated**2).sum(axis=1) * (eigenvalues + 2 * alpha) / (eigenvalues + alpha) ** 2)
    residual = max(target_energy - float(explained), 0.0)
    degrees = 1.0 + float(np.sum(eigenvalues / (eigenvalues + alpha)))
    return n * residual / (n - degrees) ** 2 if degrees < n else np.inf


def selection_weights(rows: np.ndarray, *, prior: str) -> np.ndarray:
    """Per-image weights of the selection score: accuracy for the empirical prior, balanced accuracy (every class
    the same total weight) for the balanced one."""
    return metric_weights(rows, balanced=prior == "balanced")


def leave_one_out_hits(
    statistics: Statistics,
    features: np.ndarray,
    rows: np.ndarray,
    *,
    relative_alphas: np.ndarray,
    prior: str,
    decomposed: Decomposition,
    device: torch.device | None,
    projected: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """``[candidates + 1, images]``: whether each fitted image (its features and class row) is classified right with
    itself left out of ``statistics``, for each relative ridge strength and, last, the plain class mean. Exact;
    float32 products suffice to rank. Image by image against the whole statistics, so the shards of a dataset
    fitted apart and merged give, stacked, the hits of a single fit. ``projected``: see :func:`leave_one_out_scores`."""
    return leave_one_out_hits_of_priors(statistics, features, rows, relative_alphas=relative_alphas, priors=(prior,),
                                        decomposed=decomposed, device=device, projected=projected)[0]


def leave_one_out_hits_of_priors(
    statistics: Statistics,
    features: np.ndarray,
    rows: np.ndarray,
    *,
    relative_alphas: np.ndarray,
    priors: Sequence[str],
    decomposed: Decomposition,
    device: torch.device | None,
    projected: np.ndarray | torch.Tensor | None = None,
) -> list[np.ndarray]:
    """:func:`leave_one_out_hits` of each of ``priors`` from one pass over the images: the priors share the
    decomposition, the projected images and, up to a factor per class, the products (``auto`` fits both)."""
    hits: list[list[np.ndarray]] = [[] for _ in priors]
    for scores in leave_one_out_scores(statistics, features, rows, relative_alphas=relative_alphas, priors=priors,
                                       decomposed=decomposed, device=device, projected=projected):
        for number, fitted in enumerate(scores):
            hits[number].append(fitted.argmax(axis=1) == rows)
    return [np.asarray(prior_hits) for prior_hits in hits]


def leave_one_out_scores(
    statistics: Statistics,
    features: np.ndarray,
    rows: np.ndarray,
    *,
    relative_alphas: np.ndarray,
    priors: Sequence[str],
    decomposed: Decomposition,
    device: torch.device | None,
    as_fitted: bool = False,
    projected: np.ndarray | torch.Tensor | None = None,
) -> Iterator[list[np.ndarray]]:
    """For each relative ridge strength and, last, the plain class mean, and for each of ``priors``: ``[N, C]``
    scores of each fitted image by the fit without it, exact for the balanced prior and the class mean. For the
    empirical prior, the ridge regression's output with its class-frequency intercept up to a positive factor per
    image (which keeps the ranking the selection uses, :func:`leave_one_out_hits`), or with ``as_fitted`` exactly
    the scores the estimator fitted without the image gives (:func:`fitted_ridge_scores`), which held-out
    probabilities need. One projection (none where ``projected`` holds the images' :func:`project`) and one product
    per candidate, whatever the priors."""
    alphas = np.append(np.asarray(relative_alphas, dtype=np.float64), np.inf) * decomposed.scale
    projected = project(features, decomposed=decomposed, device=device) if projected is None else projected
    rotated32 = decomposed.rotated.astype(np.float32)
    counts = statistics.class_counts[rows].astype(np.float64)
    factors = [decomposed.target_factors(prior, statistics.class_counts).astype(np.float32) for prior in priors]
    inverses = (1.0 / (decomposed.eigenvalues + alphas[:, None])).astype(np.float32)  # [candidates, F]; 0 for inf
    leverages = matrices.product(projected**2, inverses.T, device=device)  # u_i K u_i of every candidate
    for alpha, inverse, leverage in zip(alphas, inverses, leverages.T):
        if np.isinf(alpha):
            cosines = leave_one_out_cosines(features, rows, class_sums=statistics.class_sums, counts=counts,
                                            device=device)
            yield [cosines for _ in priors]
            continue
        weighted = rotated32 * inverse[:, None]
        products = matrices.product(projected, weighted, device=device)  # u_i K r_c, [N, C]
        class_norms = (rotated32 * weighted).sum(axis=0)
        scores = []
        for prior, factor in zip(priors, factors):
            if prior == "empirical":
                fitted = leave_one_out_ridge(products * factor, leverage, rows, statistics=statistics)
                scores.append(fitted_ridge_scores(fitted, leverage, rows, statistics=statistics) if as_fitted
                              else fitted)
            else:
                scores.append(leave_one_out_whitened_cosines(products * factor, leverage, rows, counts=counts,
                                                             class_norms=class_norms * factor**2))
        yield scores


def project(
    features: np.ndarray, *, decomposed: Decomposition, device: torch.device | None
) -> np.ndarray | torch.Tensor:
    """``[N, r]`` float32: the images centred on the statistics' mean, in the decomposition's eigenbasis (on a
    device, kept there for every candidate). The one ``N r F`` product of a leave-one-out pass, and its largest, so
    a fit that passes over its starting images twice (the ridge's choice, then the temperature) computes it once."""
    centred, rotation = (features - decomposed.mean).astype(np.float32), decomposed.eigenvectors.astype(np.float32)
    if device is None:
        return centred @ rotation
    return matrices.on_device(centred, device) @ matrices.on_device(rotation, device)


def leave_one_out_ridge(
    products: np.ndarray, leverage: np.ndarray, rows: np.ndarray, *, statistics: Statistics
) -> np.ndarray:
    """Ridge scores of every training image with itself left out, up to a positive factor per image, from its
    centred ridge products with the class sums and its leverage (see :func:`leave_one_out_hits`).

    Leaving image ``i`` out turns its fitted one-hot scores ``f_i`` into ``(f_i - h_i y_i) / (1 - h_i)`` with
    ``h_i`` its leverage; the positive factor does not change the argmax, so it is dropped.
    """
    fitted = products + (statistics.class_counts / statistics.n_samples).astype(np.float32)
    fitted[np.arange(len(rows)), rows] -= leverage + 1.0 / statistics.n_samples
    return fitted


def fitted_ridge_scores(
    fitted: np.ndarray, leverage: np.ndarray, rows: np.ndarray, *, statistics: Statistics
) -> np.ndarray:
    """The scores ``(q - mu) K P_c`` of each image by the estimator fitted without it, from
    :func:`leave_one_out_ridge`'s: its dropped factor ``1 / (1 - h_i)`` restored (``h_i`` the leverage with the
    intercept's ``1/n``), less the intercept, the class shares of the other images."""
    n = statistics.n_samples
    restored = fitted.astype(np.float64) / np.maximum(1.0 - leverage.astype(np.float64) - 1.0 / n, 1e-12)[:, None]
    shares = np.tile(statistics.class_counts / (n - 1), (len(rows), 1))
    shares[np.arange(len(rows)), rows] -= 1.0 / (n - 1)
    return restored - shares


def leave_one_out_whitened_cosines(
    products: np.ndarray, leverage: np.ndarray, rows: np.ndarray, *, class_norms: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Balanced-prior scores of every training image by the fit without it: its class mean, the global mean and the
    Gram matrix all lose the image. Exact (tested against refits), so they also serve as held-out scores.

    With ``u_i`` the centred features and ``r_c`` the centred class means, both in the eigenbasis of ``G``, and the
    ridge's ``K = (G + alpha I)^-1``, ``products`` holds ``a = u^T K r_c`` ``[N, C]``, ``leverage`` ``b = u^T K u``
    ``[N]`` and ``class_norms`` ``q = r_c^T K r_c`` ``[C]``. Without
    image ``i`` (``n`` images in all), ``G`` loses ``n/(n-1) u u^T`` (Sherman-Morrison), ``mu`` moves by
    ``-u/(n-1)`` and its class mean by ``-(u - r_c)/(n_c - 1)``: every score follows from ``a``, ``b`` and ``q``.
    Without the image its centred features are ``n/(n-1) u`` and ``u^T K_-i = (1 + delta b) u^T K``: the factor
    ``n/(n-1) (1 + delta b)`` of every score of the row. A class of one image has no mean left (score ``-inf``).
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
    return fitted * (beta * growth)


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


def simplest_sufficient(hits: np.ndarray, *, weights: np.ndarray) -> int:
    """The row of ``hits`` ``[candidates, images]`` to use, candidates ordered simplest first with the baseline (the
    class mean) at row 0: a candidate qualifies only by beating the baseline by more than one standard error
    (:func:`beats`), and among those that qualify the simplest one that the best does not beat by more than one
    standard error wins. Both steps resist the winner's curse of picking the top of noisy estimates."""
    qualified = [row for row in range(1, len(hits)) if beats(hits[row], hits[0], weights=weights)]
    if not qualified:
        return 0
    best = max(qualified, key=lambda row: float(hits[row] @ weights))
    return next(row for row in qualified if not beats(hits[best], hits[row], weights=weights))


def metric_weights(rows: np.ndarray, *, balanced: bool) -> np.ndarray:
    """Per-image weights whose weighted hits are the accuracy, or with ``balanced`` the balanced accuracy (every
    class present the same total weight)."""
    if not balanced:
        return np.full(len(rows), 1.0 / len(rows))
    counts = np.bincount(rows)
    return 1.0 / (np.count_nonzero(counts) * counts[rows])


def leave_one_out_cosines(
    features: np.ndarray, rows: np.ndarray, *, class_sums: np.ndarray, counts: np.ndarray, device: torch.device | None
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


def oas_shrinkage(eigenvalues: np.ndarray, *, n_samples: int) -> float:
    """Oracle Approximating Shrinkage (Chen et al. 2010; scikit-learn's ``oas``): the weight ``rho`` in [0, 1] of the
    target ``mean(eigenvalues) I`` in ``(1 - rho) S + rho mean(eigenvalues) I``, for a covariance ``S`` of these
    eigenvalues (every one, zeros included) estimated from ``n_samples`` (:func:`oas_shrinkage_of_traces`)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    return oas_shrinkage_of_traces(trace=float(eigenvalues.sum()), square_trace=float((eigenvalues**2).sum()),
                                   dimension=len(eigenvalues), n_samples=n_samples)


def oas_shrinkage_of_traces(*, trace: float, square_trace: float, dimension: int, n_samples: int) -> float:
    """:func:`oas_shrinkage` from ``trace(S)``, ``trace(S^2)``, ``n_samples`` and the dimension, all it depends on:
    a closed form, so nothing is selected among candidates (no winner's curse), and no eigenvalue is needed."""
    mu = trace / dimension
    mean_square = square_trace / dimension**2  # the mean of the squared entries of S
    denominator = (n_samples + 1) * (mean_square - mu**2 / dimension)
    return 1.0 if denominator <= 0 else float(min((mean_square + mu**2) / denominator, 1.0))


def oas_relative_ridge(eigenvalues: np.ndarray, *, n_samples: int) -> float:
    """The ridge, as a multiple of the mean eigenvalue of the centred Gram matrix ``G``, that Oracle Approximating
    Shrinkage puts on the covariance ``S = G / n``: ``(1 - rho) S + rho mu I`` is ``(1 - rho) / n`` times
    ``G + alpha I`` with ``alpha / mean eig(G) = rho / (1 - rho)``. A function of the statistics, so
    ``partial_fit``, ``remove_class`` and merged shards give it exactly as a full fit does."""
    shrinkage = oas_shrinkage(np.asarray(eigenvalues, dtype=np.float64) / max(n_samples, 1), n_samples=n_samples)
    return np.inf if shrinkage >= 1.0 else shrinkage / (1.0 - shrinkage)
