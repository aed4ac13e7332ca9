"""Fits with fewer images than features decompose ``n x n`` matrices of the images instead of ``F x F`` ones (the
kernel form): the same class vectors, choices, temperatures and unknown scores as the ``F x F`` fit, to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from simsearch.classifiers import matrices, prototypes, ridge_selection
from simsearch.classifiers.statistics import Statistics


def wide_classes(*, classes: int = 6, per_class: int = 14, dim: int = 120, seed: int = 0):
    """Fewer images (84) than features (120): class means 0.3 apart per feature, hidden in noise that is strong
    along eight directions close to theirs, so the class mean is near chance and every member beats it."""
    layout = np.random.default_rng(0)
    means = layout.standard_normal((classes, dim)) * 0.3
    directions = layout.standard_normal((8, dim))
    directions[:classes] += means * 2
    rng = np.random.default_rng(seed)
    X = np.concatenate([means[c] + 0.5 * rng.standard_normal((per_class, dim))
                        + 8.0 * rng.standard_normal((per_class, 8)) @ directions / np.sqrt(dim)
                        for c in range(classes)])
    return X, np.repeat(np.arange(classes), per_class)


def test_the_spectrum_of_rows_is_the_nonzero_part_of_the_spectrum_of_their_gram_matrix():
    rows = np.random.default_rng(1).standard_normal((30, 80))
    thin = matrices.row_spectrum(rows, device=None)
    full = matrices.matrix_spectrum(rows.T @ rows, device=None)
    assert len(thin.eigenvalues) == 30 and not thin.complete and full.complete
    np.testing.assert_allclose(thin.eigenvalues, full.eigenvalues[-30:], rtol=1e-10)
    np.testing.assert_allclose(thin.eigenvectors.T @ thin.eigenvectors, np.eye(30), atol=1e-10)
    np.testing.assert_allclose(thin.all_eigenvalues(), full.eigenvalues, atol=1e-9)
    assert thin.mean_eigenvalue() == pytest.approx(np.trace(rows.T @ rows) / 80)


@pytest.mark.parametrize("scale", [None, np.linspace(0.5, 2.0, 80)])
def test_a_shrunk_inverse_from_a_thin_spectrum_is_the_inverse_of_the_shrunk_matrix(scale):
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((30, 80))
    standardised = np.eye(80) if scale is None else np.diag(1.0 / scale)
    inverse = standardised @ np.linalg.inv(0.7 * rows.T @ rows + 0.3 * np.eye(80)) @ standardised
    queries, centres = rng.standard_normal((5, 80)), rng.standard_normal((3, 80))
    expected = np.einsum("ncf,fg,ncg->nc", queries[:, None] - centres, inverse, queries[:, None] - centres)
    for spectrum in (matrices.row_spectrum(rows, device=None), matrices.matrix_spectrum(rows.T @ rows, device=None)):
        shrunk = matrices.ShrunkInverse(spectrum, weight=0.7, ridge=0.3, scale=scale)
        np.testing.assert_allclose(shrunk.apply(queries), queries @ inverse, rtol=1e-9, atol=1e-12)
        whitening = shrunk.whitening()
        np.testing.assert_allclose(whitening @ whitening.T, inverse, atol=1e-10)
        np.testing.assert_allclose(shrunk.squared_distances(queries, centres), expected, rtol=1e-9)
    for weight, ridge in ((0.7, 0.3), (0.0, 0.3)):  # Woodbury's identity, and the identity alone
        by_rows = matrices.RowShrunkInverse(rows, rows @ rows.T, weight=weight, ridge=ridge, scale=scale, device=None)
        shrunk_inverse = standardised @ np.linalg.inv(weight * rows.T @ rows + ridge * np.eye(80)) @ standardised
        np.testing.assert_allclose(by_rows.apply(queries), queries @ shrunk_inverse, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(by_rows.whitening() @ by_rows.whitening().T, shrunk_inverse, atol=1e-10)


def test_oas_from_two_traces_is_oas_from_the_eigenvalues():
    rows = np.random.default_rng(3).standard_normal((30, 80))
    eigenvalues = matrices.row_spectrum(rows, device=None).all_eigenvalues()
    small = rows @ rows.T
    assert ridge_selection.oas_shrinkage_of_traces(
        trace=np.trace(small), square_trace=np.sum(small**2), dimension=80, n_samples=29
    ) == pytest.approx(ridge_selection.oas_shrinkage(eigenvalues, n_samples=29), rel=1e-12)


@pytest.fixture
def matrix_fit(monkeypatch):
    """Fit as if the images were at least as many as the features: the ``F x F`` decompositions."""

    def fit(estimator, X, y):
        with monkeypatch.context() as patch:
            patch.setattr(Statistics, "in_sample_space", lambda self, samples: False)
            return estimator.fit(X, y)

    return fit


FITTED_NUMBERS = ("relative_alpha_", "alpha_", "temperature_", "shrinkage_", "prior_strength_")
FITTED_CHOICES = ("unknown_score_", "uses_class_mean_", "chosen_")


@pytest.mark.parametrize("name", ["decorrelated", "balanced", "lda", "auto"])
def test_a_fit_in_the_images_space_equals_the_fit_in_the_features_space(name, matrix_fit):
    X, y = wide_classes()
    queries = wide_classes(seed=1)[0]
    thin = prototypes.make_classifier(name).fit(X, y)
    full = matrix_fit(prototypes.make_classifier(name), X, y)
    assert [getattr(thin, key, None) for key in FITTED_CHOICES] == [getattr(full, key, None) for key in FITTED_CHOICES]
    assert prototypes.describe_choice(thin) == prototypes.describe_choice(full) not in ("mean", "auto")
    for key in [key for key in FITTED_NUMBERS if hasattr(full, key)]:
        assert getattr(thin, key) == pytest.approx(getattr(full, key), rel=1e-6), key
    np.testing.assert_allclose(thin.weights_, full.weights_, rtol=1e-7, atol=1e-9 * np.abs(full.weights_).max())
    np.testing.assert_allclose(thin.bias_, full.bias_, rtol=1e-7, atol=1e-9 * np.abs(full.bias_).max())
    np.testing.assert_allclose(thin.predict_proba(queries), full.predict_proba(queries), atol=1e-7)
    # the combined score is standardised by moments of float32 scores
    np.testing.assert_allclose(thin.score_samples(queries), full.score_samples(queries), rtol=1e-5, atol=1e-5)
    if hasattr(full, "unknown_moments_"):  # float32 scores, from two factorisations
        np.testing.assert_allclose(thin.unknown_moments_, full.unknown_moments_, rtol=1e-4)


@pytest.mark.parametrize("name", ["decorrelated", "lda"])
def test_a_fit_in_the_images_space_on_a_torch_device_equals_the_numpy_fit(name):
    X, y = wide_classes()
    queries = wide_classes(seed=1)[0]
    numpy_fit = prototypes.make_classifier(name).fit(X, y)
    torch_fit = prototypes.make_classifier(name, device="cpu").fit(X, y)
    assert prototypes.describe_choice(torch_fit) == prototypes.describe_choice(numpy_fit)
    np.testing.assert_allclose(torch_fit.predict_proba(queries), numpy_fit.predict_proba(queries), atol=1e-6)
    np.testing.assert_allclose(torch_fit.score_samples(queries), numpy_fit.score_samples(queries), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["decorrelated", "balanced", "lda", "auto"])
def test_a_fit_in_the_images_space_forms_no_gram_matrix_until_one_is_read(name, monkeypatch):
    X, y = wide_classes()
    formed = []
    monkeypatch.setattr(matrices, "gram", lambda rows, device: formed.append(len(rows)) or rows.T @ rows)
    fitted = prototypes.make_classifier(name).fit(X, y)
    assert formed == []  # the choices' sub-fits neither
    unit = prototypes.unit_rows(X)
    expected_trace = np.trace(unit.T @ unit) - len(X) * fitted.feature_sum_ @ fitted.feature_sum_ / len(X) ** 2
    assert fitted.statistics_.mean_eigenvalue() == pytest.approx(expected_trace / X.shape[1], rel=1e-12)
    assert formed == []  # the trace needs no matrix
    np.testing.assert_allclose(fitted.gram_, unit.T @ unit, atol=1e-12)
    np.testing.assert_array_equal(fitted.gram_, fitted.get_statistics()["gram"])
    assert formed == [len(X)]  # formed once, when read
    fitted.partial_fit(X[:5], y[:5])
    np.testing.assert_allclose(fitted.gram_, unit.T @ unit + unit[:5].T @ unit[:5], atol=1e-12)
    assert formed == [len(X), 5]


def test_lda_forms_its_whitening_when_it_first_scores_unknowns_and_again_after_a_change():
    X, y = wide_classes()
    fitted = prototypes.DiscriminantClassifier(check_against_mean=False).fit(X, y)
    assert "whitening_" not in vars(fitted)
    queries = X[::7] + 0.1
    first = fitted.score_samples(queries)
    np.testing.assert_allclose(fitted.whitening_ @ fitted.whitening_.T,
                               fitted._precision_.apply(np.eye(X.shape[1])), atol=1e-9)
    fitted.partial_fit(X[:10] + 0.2, y[:10])
    refit = prototypes.DiscriminantClassifier(check_against_mean=False).fit(np.r_[X, X[:10] + 0.2], np.r_[y, y[:10]])
    np.testing.assert_allclose(fitted.score_samples(queries), refit.score_samples(queries), rtol=1e-6)
    assert not np.allclose(fitted.score_samples(queries), first)  # not the whitening of the statistics before
