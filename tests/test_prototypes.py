"""prototypes.py: the scikit-learn contract, exact incremental statistics, removal, and where decorrelation wins."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.utils import check_random_state
from sklearn.utils.estimator_checks import check_estimator

from simsearch.classifiers import prototypes, ridge_selection, unknown_scores
from simsearch.classifiers.prototypes import (
    AutoClassifier,
    ClassMeanClassifier,
    DecorrelatedClassifier,
    DiscriminantClassifier,
)

ESTIMATORS = [
    ClassMeanClassifier(),
    ClassMeanClassifier(normalize=True),
    DecorrelatedClassifier(),
    DecorrelatedClassifier(alpha="gcv"),
    DecorrelatedClassifier(alpha="oas"),
    DecorrelatedClassifier(projection_dim=24, random_state=3),
    DecorrelatedClassifier(prior="balanced"),
    DiscriminantClassifier(),
    AutoClassifier(),
]
# Estimators whose ridge strength depends on the statistics alone, so batches and removals predict exactly as fit.
EXACT = [
    ClassMeanClassifier(),
    ClassMeanClassifier(normalize=True),
    DecorrelatedClassifier(alpha="gcv"),
    DecorrelatedClassifier(alpha="oas"),
    DecorrelatedClassifier(alpha="oas", prior="balanced"),
    DecorrelatedClassifier(alpha=0.5, projection_dim=24, random_state=3),
    DecorrelatedClassifier(alpha=0.5, prior="balanced"),
    DiscriminantClassifier(),
    DiscriminantClassifier(select_for="balanced"),
]


def gaussian_classes(*, samples_per_class: int, seed: int, dim: int = 16, classes: int = 4):
    """Class means one unit apart, hidden in shared noise that is strong along the directions separating them.

    The mixing (the shared covariance) is fixed; ``seed`` draws new samples from the same distribution.
    """
    layout = np.random.default_rng(0)
    mixing = layout.standard_normal((dim, dim)) * 0.2
    mixing[:, :classes] += layout.standard_normal((dim, classes))
    rng = np.random.default_rng(seed)
    X = np.concatenate(
        [5.0 + np.eye(dim)[c] + rng.standard_normal((samples_per_class, dim)) @ mixing.T for c in range(classes)]
    )
    return X, np.repeat(np.arange(classes), samples_per_class)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_passes_scikit_learn_estimator_checks(estimator):
    failures = [
        f"{result['check_name']}: {result['exception']}"
        for result in check_estimator(estimator, on_fail=None)
        if result["status"] == "failed"
    ]
    assert failures == []


def test_class_mean_is_the_cosine_to_the_raw_mean_by_hand():
    X = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [0.0, 3.0]])
    fitted = ClassMeanClassifier().fit(X, ["a", "a", "b", "b"])
    assert fitted.class_means_.tolist() == [[2.0, 1.0], [0.0, 2.0]]
    query = np.array([[1.0, 1.0]])
    expected = [3 / np.sqrt(2) / np.sqrt(5), 1 / np.sqrt(2)]
    assert fitted.class_scores(query)[0] == pytest.approx(expected, abs=1e-12)
    assert fitted.predict_topk(query, 5).tolist() == [["a", "b"]]
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        fitted.predict_topk(query, 0)


def test_decorrelation_wins_where_shared_noise_hides_the_classes():
    X, y = gaussian_classes(samples_per_class=100, seed=1)
    X_test, y_test = gaussian_classes(samples_per_class=100, seed=2)
    mean_accuracy = ClassMeanClassifier().fit(X, y).score(X_test, y_test)
    decorrelated = DecorrelatedClassifier().fit(X, y)
    assert mean_accuracy < 0.4
    assert decorrelated.score(X_test, y_test) > 0.9
    assert decorrelated.alpha_ > 0


@pytest.mark.parametrize("estimator", EXACT, ids=repr)
def test_partial_fit_in_batches_equals_fit(estimator):
    X, y = gaussian_classes(samples_per_class=30, seed=4)
    order = np.random.default_rng(0).permutation(len(y))
    whole = type(estimator)(**estimator.get_params()).fit(X, y)
    batched = type(estimator)(**estimator.get_params())
    for batch in np.array_split(order, 7):
        batched.partial_fit(X[batch], y[batch])
    assert batched.classes_.tolist() == whole.classes_.tolist()
    assert batched.class_counts_.tolist() == whole.class_counts_.tolist()
    np.testing.assert_allclose(batched.class_sums_, whole.class_sums_, rtol=0, atol=1e-10)
    for name in ("gram_", "feature_sum_"):
        if hasattr(whole, name):
            np.testing.assert_allclose(getattr(batched, name), getattr(whole, name), rtol=0, atol=1e-10)
    assert batched.predict(X).tolist() == whole.predict(X).tolist()


@pytest.mark.parametrize("estimator", EXACT, ids=repr)
def test_remove_class_with_its_images_equals_a_fit_without_them(estimator):
    X, y = gaussian_classes(samples_per_class=30, seed=5)
    X_test, _ = gaussian_classes(samples_per_class=10, seed=6)
    fitted = type(estimator)(**estimator.get_params()).fit(X, y)
    kept_rows = fitted.class_sums_[[0, 1, 3]].copy()
    fitted.remove_class(2, X[y == 2])
    without = type(estimator)(**estimator.get_params()).fit(X[y != 2], y[y != 2])
    assert fitted.classes_.tolist() == [0, 1, 3]
    assert np.array_equal(fitted.class_sums_, kept_rows)
    np.testing.assert_allclose(fitted.class_scores(X_test), without.class_scores(X_test), rtol=1e-7, atol=1e-9)
    assert fitted.predict(X_test).tolist() == without.predict(X_test).tolist()


def test_leave_one_out_alpha_is_chosen_once_and_kept_relative_to_the_statistics():
    X, y = gaussian_classes(samples_per_class=40, seed=13)
    whole = DecorrelatedClassifier().fit(X, y)
    batched = DecorrelatedClassifier().partial_fit(X[:80], y[:80])
    chosen = batched.relative_alpha_
    batched.partial_fit(X[80:], y[80:])
    np.testing.assert_allclose(batched.gram_, whole.gram_, rtol=0, atol=1e-10)
    assert batched.relative_alpha_ == chosen
    assert whole.relative_alpha_ in DecorrelatedClassifier().relative_alphas
    manual = []
    for alpha in whole.relative_alphas:  # leave-one-out accuracy by refitting without each image
        hits = [
            DecorrelatedClassifier(alpha="gcv", relative_alphas=(alpha,)).fit(np.delete(X, i, 0), np.delete(y, i))
            .predict(X[i : i + 1])[0] == y[i]
            for i in range(0, len(y), 8)
        ]
        manual.append(np.mean(hits))
    assert manual[list(whole.relative_alphas).index(whole.relative_alpha_)] >= max(manual) - 0.05


def test_removal_without_images_keeps_them_as_unlabelled_background():
    X, y = gaussian_classes(samples_per_class=30, seed=7)
    X_test, _ = gaussian_classes(samples_per_class=10, seed=8)
    cheap = DecorrelatedClassifier().fit(X, y).remove_class(3)
    assert cheap.classes_.tolist() == [0, 1, 2] and cheap.n_samples_seen_ == len(y)
    background = DecorrelatedClassifier().fit(X, y)
    background.statistics_ = background.statistics_.keep(np.arange(4) < 3)  # the class's sums alone dropped
    background._refresh()
    np.testing.assert_allclose(cheap.class_scores(X_test), background.class_scores(X_test), atol=1e-12)
    assert np.array_equal(
        ClassMeanClassifier().fit(X, y).remove_class(3).predict(X_test),
        ClassMeanClassifier().fit(X[y != 3], y[y != 3]).predict(X_test),
    )


def test_remove_samples_undoes_partial_fit_and_refuses_what_was_never_fitted():
    X, y = gaussian_classes(samples_per_class=20, seed=9)
    base = DecorrelatedClassifier().fit(X[:50], y[:50])
    grown = DecorrelatedClassifier().fit(X[:50], y[:50]).partial_fit(X[50:], y[50:]).remove_samples(X[50:], y[50:])
    assert grown.classes_.tolist() == base.classes_.tolist()
    np.testing.assert_allclose(grown.gram_, base.gram_, atol=1e-10)
    np.testing.assert_allclose(grown.class_sums_, base.class_sums_, atol=1e-10)
    with pytest.raises(ValueError, match=r"Labels \[7\] were never fitted"):
        base.remove_samples(X[:1], [7])
    with pytest.raises(ValueError, match="Class 0 holds 20 images but 3 were given"):
        base.remove_class(0, X[:3])
    with pytest.raises(ValueError, match="Unknown class 'cat'"):
        ClassMeanClassifier().fit(X, y.astype(str)).remove_class("cat")


def test_rename_class_keeps_statistics_and_sorted_order():
    X, y = gaussian_classes(samples_per_class=10, seed=10)
    labels = np.array(["ant", "bee", "cow", "dog"])[y]
    fitted = ClassMeanClassifier().fit(X, labels)
    sums = dict(zip(fitted.classes_, fitted.class_sums_.tolist()))
    fitted.rename_class("ant", "zebra")
    assert fitted.classes_.tolist() == ["bee", "cow", "dog", "zebra"]
    assert fitted.class_sums_[-1].tolist() == sums["ant"]
    assert fitted.predict([sums["ant"]]).tolist() == ["zebra"]
    with pytest.raises(ValueError, match="Class 'bee' already exists"):
        fitted.rename_class("cow", "bee")


def test_the_oas_ridge_is_scikit_learns_oracle_approximating_shrinkage_of_the_features():
    from sklearn.covariance import oas

    X, y = gaussian_classes(samples_per_class=30, seed=13)
    fitted = DecorrelatedClassifier(alpha="oas").fit(X, y)
    features = fitted.query_features(X)
    shrunk, rho = oas(features)
    covariance = np.cov(features, rowvar=False, bias=True)
    mu = np.trace(covariance) / covariance.shape[0]
    assert fitted.relative_alpha_ == pytest.approx(rho / (1 - rho), rel=1e-9)
    np.testing.assert_allclose((covariance + fitted.relative_alpha_ * mu * np.eye(covariance.shape[0]))
                               / (1 + fitted.relative_alpha_), shrunk, atol=1e-12)


@pytest.mark.parametrize("alpha", ["loo", "gcv", "oas"])
def test_renamed_decorrelated_classifier_scores_as_a_fit_under_the_new_names(alpha):
    X, y = gaussian_classes(samples_per_class=10, seed=12)
    names = np.array(["ant", "bee", "cow", "dog"], dtype="<U5")
    renamed = DecorrelatedClassifier(alpha=alpha).fit(X, names[y]).rename_class("bee", "zebra")
    names[1] = "zebra"
    fresh = DecorrelatedClassifier(alpha=alpha).fit(X, names[y])
    assert renamed.classes_.tolist() == fresh.classes_.tolist() == ["ant", "cow", "dog", "zebra"]
    assert renamed.alpha_ == pytest.approx(fresh.alpha_, rel=1e-12)
    np.testing.assert_allclose(renamed.class_scores(X), fresh.class_scores(X), rtol=1e-9, atol=1e-12)


def test_fixed_alpha_and_bad_parameters():
    X, y = gaussian_classes(samples_per_class=10, seed=11)
    assert DecorrelatedClassifier(alpha=2.5).fit(X, y).alpha_ == 2.5
    with pytest.raises(ValueError, match="alpha must be 'loo', 'gcv', 'oas' or a positive number, got 0.0"):
        DecorrelatedClassifier(alpha=0.0).fit(X, y)
    with pytest.raises(ValueError, match="alpha must be 'loo', 'gcv', 'oas' or a positive number, got 'aic'"):
        DecorrelatedClassifier(alpha="aic").fit(X, y)
    with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
        DecorrelatedClassifier(projection_dim=0).fit(X, y)
    with pytest.raises(ValueError, match="Unknown classifier 'qda'"):
        prototypes.make_classifier("qda")


def test_cosine_top_k_matches_manual_ranking_and_caps_k():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[2.0, 0.1], [0.1, 1.0]])
    scores, indexes = prototypes.cosine_top_k(queries=queries, corpus=corpus, top_k=2)
    expected = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(corpus, dim=1).T
    assert indexes.tolist() == [[0, 2], [1, 2]]
    assert torch.allclose(scores, expected.gather(1, indexes), atol=1e-6)
    assert prototypes.cosine_top_k(queries=queries, corpus=corpus, top_k=9)[1].shape == (2, 3)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        prototypes.cosine_top_k(queries=queries, corpus=corpus, top_k=0)


def test_predict_topk_ranks_any_scikit_learn_classifier():
    X, y = gaussian_classes(samples_per_class=20, seed=12)
    probe = LogisticRegression(max_iter=5000).fit(X, y)
    ranked = prototypes.predict_topk(probe, X[:5], 3)
    assert ranked.shape == (5, 3) and ranked[:, 0].tolist() == probe.predict(X[:5]).tolist()
    binary = LogisticRegression(max_iter=5000).fit(X[y < 2], y[y < 2])
    assert prototypes.predict_topk(binary, X[:3], 2)[:, 0].tolist() == binary.predict(X[:3]).tolist()


def with_one_image_class(*, seed: int):
    """Four classes of 100 images and a fifth of one image, on separable clusters; queries of the fifth class."""
    X, y = gaussian_classes(samples_per_class=100, seed=seed)
    rng = np.random.default_rng(seed)
    centre = np.full(X.shape[1], 5.0)
    centre[-1] += 3.0
    queries = centre + 0.2 * rng.standard_normal((20, X.shape[1]))
    return np.vstack([X, queries[:1]]), np.append(y, 4), queries[1:]


def test_a_class_added_with_one_image_is_found_with_the_balanced_prior():
    X, y, new_queries = with_one_image_class(seed=21)
    balanced = DecorrelatedClassifier(prior="balanced").fit(X[:-1], y[:-1]).partial_fit(X[-1:], y[-1:])
    empirical = DecorrelatedClassifier().fit(X[:-1], y[:-1]).partial_fit(X[-1:], y[-1:])
    assert balanced.predict(new_queries).tolist() == [4] * len(new_queries)
    assert np.mean(empirical.predict(new_queries) == 4) < 0.5  # the prior of one image in 401 buries it
    X_test, y_test = gaussian_classes(samples_per_class=100, seed=22)
    assert balanced.score(X_test, y_test) > 0.8 > ClassMeanClassifier().fit(X, y).score(X_test, y_test)


def test_balanced_prior_is_the_cosine_of_ridge_whitened_query_and_class_mean():
    X, y = gaussian_classes(samples_per_class=15, seed=23)
    y[:5] = 9  # an imbalanced fifth class
    fitted = DecorrelatedClassifier(alpha=0.7, prior="balanced").fit(X, y)
    features = prototypes.unit_rows(X)
    mu = features.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh((features - mu).T @ (features - mu))
    whitening = eigenvectors / np.sqrt(eigenvalues.clip(min=0) + 0.7)
    means = np.stack([features[y == label].mean(axis=0) for label in fitted.classes_])
    queries = prototypes.unit_rows(gaussian_classes(samples_per_class=3, seed=24)[0])
    query_white, mean_white = (queries - mu) @ whitening, (means - mu) @ whitening
    cosines = prototypes.unit_rows(query_white) @ prototypes.unit_rows(mean_white).T
    scores = fitted.class_scores(queries)
    np.testing.assert_allclose(scores / np.linalg.norm(query_white, axis=1, keepdims=True), cosines, atol=1e-9)
    assert fitted.predict(queries).tolist() == fitted.classes_[cosines.argmax(axis=1)].tolist()


@pytest.mark.parametrize("prior", ["empirical", "balanced"])
def test_selection_falls_back_to_the_class_mean_where_decorrelation_cannot_help(prior):
    # Isotropic noise around class means that differ along one direction of large total variance: whitening by
    # the total scatter shrinks exactly the direction that separates the classes.
    rng = np.random.default_rng(25)
    means = np.zeros((6, 8))
    means[:, 0] = np.linspace(-3, 3, 6)
    means[:, 1] = 10.0
    y = np.repeat(np.arange(6), 12)
    X = means[y] + 0.9 * rng.standard_normal((len(y), 8))
    fitted = DecorrelatedClassifier(prior=prior).fit(X, y)
    assert fitted.relative_alpha_ == np.inf and fitted.alpha_ == np.inf
    X_test = means[y] + 0.9 * rng.standard_normal((len(y), 8))
    mean = ClassMeanClassifier(normalize=True).fit(X, y)
    np.testing.assert_allclose(fitted.class_scores(X_test), mean.class_scores(X_test), atol=1e-12)
    restored = DecorrelatedClassifier(prior=prior).set_statistics(**fitted.get_statistics())
    assert restored.relative_alpha_ == np.inf
    assert restored.partial_fit(X_test[:3], y[:3]).alpha_ == np.inf  # a later change keeps the choice


def test_leave_one_out_class_mean_cosines_equal_refits_without_each_image():
    X, y = gaussian_classes(samples_per_class=6, seed=26)
    y[0] = 7  # a class of one image: no mean is left without it
    features = prototypes.unit_rows(X)
    fitted = ClassMeanClassifier(normalize=True).fit(X, y)
    rows = np.searchsorted(fitted.classes_, y)
    counts = fitted.class_counts_[rows].astype(np.float32)
    closed = ridge_selection.leave_one_out_cosines(features, rows, class_sums=fitted.class_sums_, counts=counts,
                                               device=torch.device("cpu"))
    for i in range(1, len(y)):
        refit = ClassMeanClassifier(normalize=True).fit(np.delete(X, i, 0), np.delete(y, i))
        np.testing.assert_allclose(closed[i], refit.class_scores(X[i : i + 1])[0], atol=1e-5)
    assert closed[0, rows[0]] == -np.inf


def test_leave_one_out_balanced_scores_are_refits_without_each_image():
    X, y = gaussian_classes(samples_per_class=8, seed=27)
    y[0] = 7  # a class of one image: no mean is left without it
    fitted = DecorrelatedClassifier(alpha=0.3, prior="balanced").fit(X, y)
    features = prototypes.unit_rows(X)
    rows = np.searchsorted(fitted.classes_, y)
    mu = features.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh((features - mu).T @ (features - mu))
    projected = (features - mu) @ eigenvectors
    rotated, inverse = eigenvectors.T @ (fitted.class_means_ - mu).T, 1 / (eigenvalues + 0.3)
    closed = ridge_selection.leave_one_out_whitened_cosines(
        projected @ (rotated * inverse[:, None]), projected**2 @ inverse, rows,
        class_norms=(rotated**2 * inverse[:, None]).sum(axis=0), counts=fitted.class_counts_[rows].astype(np.float64),
    )
    assert closed[0, rows[0]] == -np.inf
    for i in (1, 9, 30):
        refit = DecorrelatedClassifier(alpha=0.3, prior="balanced").fit(np.delete(X, i, 0), np.delete(y, i))
        expected = refit.class_scores(X[i : i + 1])[0]
        factor = closed[i] @ expected / (expected @ expected)  # a positive factor per image, common to classes
        assert factor > 0
        np.testing.assert_allclose(closed[i], factor * expected, rtol=1e-6, atol=1e-9)


def test_classifier_names_round_trip_through_make_classifier():
    for name in prototypes.CLASSIFIERS:
        made = prototypes.make_classifier(name)
        assert prototypes.classifier_name(made) == name
        rebuilt = prototypes.make_classifier(name, **made.get_params())
        assert rebuilt.get_params() == made.get_params()
    assert prototypes.make_classifier("balanced").prior == "balanced"
    with pytest.raises(ValueError, match="LogisticRegression is not a classifier of prototypes.CLASSIFIERS"):
        prototypes.classifier_name(LogisticRegression())


def test_prior_parameter_is_checked():
    X, y = gaussian_classes(samples_per_class=10, seed=28)
    with pytest.raises(ValueError, match="prior must be one of 'empirical', 'balanced', got 'uniform'"):
        DecorrelatedClassifier(prior="uniform").fit(X, y)
    with pytest.raises(ValueError, match="alpha='gcv' scores a ridge regression .* needs prior='empirical'"):
        DecorrelatedClassifier(alpha="gcv", prior="balanced").fit(X, y)


def test_ranked_scores_and_margins():
    X, y = gaussian_classes(samples_per_class=10, seed=29)
    fitted = ClassMeanClassifier().fit(X, y)
    scores, labels = prototypes.ranked_scores(fitted, X[:4], 3)
    full = fitted.class_scores(X[:4])
    assert labels[:, 0].tolist() == fitted.predict(X[:4]).tolist()
    np.testing.assert_allclose(prototypes.margins(scores), np.sort(full, axis=1)[:, -1] - np.sort(full, axis=1)[:, -2])
    assert np.isnan(prototypes.margins(scores[:, :1])).all()


@pytest.mark.parametrize("estimator", [ClassMeanClassifier(), DecorrelatedClassifier(prior="balanced"),
                                       DecorrelatedClassifier(unknown_score="mahalanobis")], ids=repr)
def test_calibrated_estimator_rejects_a_far_query_and_keeps_known_ones(estimator):
    X, y = gaussian_classes(samples_per_class=50, seed=31)
    X_valid, y_valid = gaussian_classes(samples_per_class=25, seed=32)
    labels = np.array(["ant", "bee", "cow", "dog"])
    fitted = type(estimator)(**estimator.get_params()).fit(X, labels[y]).calibrate(X_valid, true_positive_rate=0.95)
    kept = fitted.score_samples(X_valid) >= fitted.threshold_
    assert kept.mean() >= 0.95 and kept.sum() <= np.ceil(0.95 * len(kept)) + 1  # the quantile, not a looser one
    far = np.full((3, X.shape[1]), -5.0) + np.eye(3, X.shape[1]) * 4  # opposite every class mean
    assert fitted.predict(far, reject=True).tolist() == ["unknown"] * 3
    assert fitted.predict(far).tolist() != ["unknown"] * 3  # without reject, the nearest class as before
    near = fitted.predict(X_valid, reject=True)
    assert np.mean(near == labels[y_valid]) >= 0.9 * fitted.score(X_valid, labels[y_valid])
    restored = type(estimator)(**estimator.get_params()).set_statistics(**fitted.get_statistics())
    assert (restored.threshold_, restored.true_positive_rate_, restored.threshold_stale_) == (
        fitted.threshold_, 0.95, False)
    assert restored.predict(far, reject=True).tolist() == ["unknown"] * 3
    fitted.rename_class("ant", "emu")
    assert not fitted.threshold_stale_
    fitted.partial_fit(X_valid[:2], ["emu", "emu"])
    assert fitted.threshold_stale_  # the scores it was set on have changed


@pytest.mark.parametrize("prior", ["empirical", "balanced"])
def test_combined_unknown_score_is_two_parts_standardised_on_the_fitting_images(prior):
    X, y = gaussian_classes(samples_per_class=30, seed=41)
    fitted = DecorrelatedClassifier(prior=prior, unknown_score="combined").fit(X, y)
    parts = fitted.unknown_components(fitted.query_features(X))
    np.testing.assert_allclose(fitted.unknown_moments_, fitted.unknown_moments(X), rtol=1e-12)
    assert fitted.unknown_moments_[:, 0].tolist() == [len(X), len(X)]
    standardised = (parts - parts.mean(axis=0)) / parts.std(axis=0)  # the moments are float32 sums
    np.testing.assert_allclose(fitted.score_samples(X), standardised.sum(axis=1), atol=1e-4)
    far = np.full((2, X.shape[1]), -5.0)
    assert fitted.score_samples(far).max() < fitted.score_samples(X).min()
    moments = fitted.unknown_moments_.copy()
    fitted.partial_fit(X[:3] + 0.1, y[:3])  # later changes keep the standardisation, as they keep the ridge
    np.testing.assert_array_equal(fitted.unknown_moments_, moments)


def test_statistics_saved_without_unknown_moments_keep_the_mahalanobis_score_their_threshold_was_set_on():
    X, y = gaussian_classes(samples_per_class=30, seed=43)
    fitted = DecorrelatedClassifier(unknown_score="combined").fit(X, y).calibrate(X[::3])
    saved = {name: value for name, value in fitted.get_statistics().items()
             if name not in ("unknown_moments", "unknown_score")}  # as saved before either existed
    restored = DecorrelatedClassifier().set_statistics(**saved)
    assert not hasattr(restored, "unknown_moments_") and restored.unknown_score_ == "mahalanobis"
    np.testing.assert_allclose(restored.score_samples(X),
                               restored.within_class_mahalanobis(restored.query_features(X)), rtol=1e-12)
    np.testing.assert_allclose(DecorrelatedClassifier(unknown_score="mahalanobis").fit(X, y).score_samples(X),
                               restored.score_samples(X), rtol=1e-9)
    with pytest.raises(ValueError, match=r"unknown-score moments must be 2 x 3"):
        DecorrelatedClassifier().set_statistics(**{**saved, "unknown_moments": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="unknown_score must be one of 'auto', 'combined', 'mahalanobis', 'cosine', "
                                         "got 'energy'"):
        DecorrelatedClassifier(unknown_score="energy").fit(X, y)


def ring_classes(positions: Sequence[int], *, per_class: int, seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Tight classes on a circle of 48 positions (7.5 degrees apart) in two dimensions, lifted off the origin: the
    classes spread the total covariance along the circle, so a new class between two known ones looks typical under
    it, and atypical only under the within-class covariance."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.asarray(positions) / 48
    centres = np.zeros((len(angles), dim))
    centres[:, 0], centres[:, 1], centres[:, 2] = 5 * np.cos(angles), 5 * np.sin(angles), 10.0
    X = np.concatenate([centre + 0.2 * rng.standard_normal((per_class, dim)) for centre in centres])
    return X, np.repeat(np.arange(len(angles)), per_class)


def auroc_of(estimator: DecorrelatedClassifier, known: np.ndarray, unknown: np.ndarray) -> float:
    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(truth, estimator.score_samples(np.concatenate([known, unknown]))))


def test_auto_unknown_score_leaves_combined_only_where_another_separates_hidden_classes_clearly():
    X, y = ring_classes(range(0, 48, 2), per_class=30, seed=0)
    known, _ = ring_classes(range(0, 48, 2), per_class=10, seed=1)
    unknown, _ = ring_classes(range(1, 48, 2), per_class=10, seed=2)  # new classes halfway between known ones
    chosen = DecorrelatedClassifier().fit(X, y)
    assert chosen.unknown_score_ == "mahalanobis"
    combined = DecorrelatedClassifier(unknown_score="combined").fit(X, y)
    assert auroc_of(chosen, known, unknown) > auroc_of(combined, known, unknown) + 0.05  # 0.81 against 0.71


def test_the_default_unknown_score_gives_way_only_to_a_win_in_every_draw_beyond_its_noise():
    errors = np.full((2, 3), 0.01)
    assert unknown_scores.clear_winner(np.array([[0.80, 0.85, 0.70], [0.80, 0.83, 0.70]]), errors=errors) == 1
    # best on the mean, but one draw is a tie: the noise of which classes were hidden, not a win
    assert unknown_scores.clear_winner(np.array([[0.80, 0.90, 0.70], [0.80, 0.81, 0.70]]), errors=errors) == 0
    # each draw's difference has a standard error of 0.01 * sqrt(2) = 0.0141
    assert unknown_scores.clear_winner(np.array([[0.80, 0.815, 0.70], [0.80, 0.816, 0.70]]), errors=errors) == 1
    assert unknown_scores.clear_winner(np.array([[0.80, 0.815, 0.70], [0.80, 0.816, 0.70]]), errors=errors * 1.1) == 0
    # Hanley and McNeil by hand: (0.09 + 499 (0.9/1.1 - 0.81) + 499 (1.62/1.9 - 0.81)) / 500^2 = 1.0179e-4
    assert unknown_scores.auroc_standard_error(0.9, positives=500, negatives=500) == pytest.approx(0.010089, abs=1e-6)


def test_unknown_score_choice_scores_each_draw_as_a_refit_without_the_drawn_images(monkeypatch):
    X, y = ring_classes(range(0, 48, 4), per_class=20, seed=3)
    computed = []

    def recorded(truth: np.ndarray, scores: np.ndarray) -> float:
        computed.append(roc_auc_score(truth, scores))
        return computed[-1]

    monkeypatch.setattr(unknown_scores, "roc_auc_score", recorded)
    fitted = DecorrelatedClassifier(random_state=5).fit(X, y)
    assert computed == []  # chosen when first needed, not by fit
    assert fitted.unknown_score_ == "combined"
    rows = np.searchsorted(fitted.classes_, y)
    draws = list(unknown_scores.choice_draws(rows, generator=check_random_state(5)))
    assert len(computed) == len(draws) * len(unknown_scores.UNKNOWN_CANDIDATES) == 6
    for number, (removed, known, unknown, fitting) in enumerate(draws):
        assert removed[unknown].all() and removed[known].all() and not removed[fitting].any()
        assert len(np.unique(y[unknown])) == 2 and not np.isin(y[known], y[unknown]).any()
        scale = DecorrelatedClassifier(alpha=1.0).fit(X[~removed], y[~removed]).decomposition().scale
        for column, name in enumerate(unknown_scores.UNKNOWN_CANDIDATES):
            refit = DecorrelatedClassifier(alpha=fitted.relative_alpha_ * scale, unknown_score=name)
            refit.fit(X[~removed], y[~removed])
            assert computed[number * 3 + column] == pytest.approx(auroc_of(refit, X[known], X[unknown]), abs=2e-3)


def test_statistics_without_some_images_equal_a_fit_without_them():
    X, y = gaussian_classes(samples_per_class=12, seed=5, classes=5)
    fitted = DecorrelatedClassifier().fit(X, y)
    removed = (y == 2) | (np.arange(len(y)) % 4 == 0)
    sub = fitted.statistics_.without(fitted.query_features(X)[removed], np.searchsorted(fitted.classes_, y)[removed],
                                       device=None)
    refit = DecorrelatedClassifier().fit(X[~removed], y[~removed])
    assert sub.class_counts.tolist() == refit.class_counts_.tolist() and sub.n_samples == refit.n_samples_seen_
    for mine, theirs in ((sub.gram, refit.gram_), (sub.feature_sum, refit.feature_sum_),
                         (sub.class_sums, refit.class_sums_)):
        np.testing.assert_allclose(mine, theirs, atol=1e-12)


def test_unknown_score_choice_is_kept_by_stores_merges_and_later_changes():
    X, y = ring_classes(range(0, 48, 2), per_class=30, seed=0)
    fitted = DecorrelatedClassifier().fit(X, y).calibrate(X[::5])
    assert fitted.get_statistics()["unknown_score"] == "mahalanobis" and not hasattr(fitted, "unknown_moments_")
    restored = DecorrelatedClassifier().set_statistics(**fitted.get_statistics())
    np.testing.assert_array_equal(restored.score_samples(X[:9]), fitted.score_samples(X[:9]))
    assert restored.threshold_ == fitted.threshold_
    fitted.partial_fit(X[:40] + 0.05, y[:40])  # later changes keep the choice, as they keep the ridge
    assert fitted.unknown_score_ == "mahalanobis"
    parts = [DecorrelatedClassifier().fit(X[y < 12], y[y < 12]), DecorrelatedClassifier().fit(X[y >= 12], y[y >= 12])]
    assert prototypes.merge_statistics(parts).unknown_score_ == parts[0].unknown_score_
    named = DecorrelatedClassifier(unknown_score="cosine").set_statistics(**restored.get_statistics())
    assert named.unknown_score_ == "cosine"  # a named score wins over the saved choice
    np.testing.assert_allclose(named.score_samples(X[:5]), (prototypes.unit_rows(X[:5]) @ prototypes.unit_rows(
        named.class_sums_).T).max(axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="the statistics' unknown score 'energy' is none of 'combined'"):
        DecorrelatedClassifier().set_statistics(**{**restored.get_statistics(), "unknown_score": np.array("energy")})
    with pytest.raises(ValueError, match="combined unknown score lacks its moments"):
        DecorrelatedClassifier().set_statistics(**{**restored.get_statistics(), "unknown_score": np.array("combined")})


def test_unknown_score_chosen_when_first_needed_is_the_choice_of_the_start():
    X, y = ring_classes(range(0, 48, 2), per_class=30, seed=0)
    asked = DecorrelatedClassifier(unknown_score="combined").fit(X, y)
    moments = asked.unknown_moments_.copy()
    for unknown_score, expected in (("combined", "combined"), ("auto", "mahalanobis")):
        later = DecorrelatedClassifier(unknown_score=unknown_score).fit(X, y)
        assert "unknown_score_" not in vars(later)
        later.partial_fit(X[:40] + 0.05, y[:40]).remove_class(3)  # changes before the first question
        copied = pickle.loads(pickle.dumps(later))
        assert later.get_statistics()["unknown_score"] == copied.unknown_score_ == expected
        if expected == "combined":
            np.testing.assert_array_equal(later.unknown_moments_, moments)
            np.testing.assert_array_equal(copied.unknown_moments_, moments)
        else:
            assert not hasattr(later, "unknown_moments_") and "unknown_moments" not in later.get_statistics()
    assert not hasattr(DecorrelatedClassifier(), "unknown_score_")


def test_reject_needs_a_calibration_and_a_free_unknown_label():
    X, y = gaussian_classes(samples_per_class=10, seed=33)
    with pytest.raises(ValueError, match=r"predict\(reject=True\) needs a threshold: call calibrate"):
        ClassMeanClassifier().fit(X, y).predict(X, reject=True)
    assert ClassMeanClassifier().fit(X, y).calibrate(X).predict(-X[:1] * 9, reject=True).tolist() == [-1]
    named = ClassMeanClassifier().fit(X, np.array(["unknown", "a", "b", "c"])[y]).calibrate(X)
    with pytest.raises(ValueError, match="A class is named 'unknown', the label reserved"):
        named.predict(X, reject=True)
    with pytest.raises(ValueError, match="true_positive_rate must lie strictly between 0 and 1"):
        named.calibrate(X, true_positive_rate=1.0)


def _torch_path_against_numpy(device: str) -> None:
    """Every decorrelated classifier fitted in torch on ``device`` equals the NumPy fit: same ridge, scores, unknown
    scores and leave-one-out hits."""
    X, y = gaussian_classes(samples_per_class=30, seed=40, dim=24, classes=5)
    X_test, _ = gaussian_classes(samples_per_class=5, seed=41, dim=24, classes=5)
    for params in ({}, {"prior": "balanced"}, {"unknown_score": "mahalanobis"}):
        on_numpy = DecorrelatedClassifier(**params).fit(X, y)
        on_torch = DecorrelatedClassifier(device=device, **params).fit(X, y)
        assert on_torch.relative_alpha_ == on_numpy.relative_alpha_
        np.testing.assert_allclose(on_torch.class_scores(X_test), on_numpy.class_scores(X_test), atol=1e-9)
        assert on_torch.unknown_score_ == on_numpy.unknown_score_
        # the combined score's moments are float32 sums, which the two libraries round apart
        np.testing.assert_allclose(on_torch.score_samples(X_test), on_numpy.score_samples(X_test), atol=1e-4)
        np.testing.assert_array_equal(on_torch.leave_one_out_hits(X, y), on_numpy.leave_one_out_hits(X, y))


def test_decorrelated_classifier_in_torch_equals_numpy_on_the_cpu():
    _torch_path_against_numpy("cpu")


@pytest.mark.cuda
def test_decorrelated_classifier_on_cuda_equals_numpy():
    _torch_path_against_numpy("cuda")


def test_device_is_where_an_estimator_runs_not_what_it_is():
    X, y = gaussian_classes(samples_per_class=10, seed=42)
    half = len(y) // 2
    on_torch = DecorrelatedClassifier(device="cpu").fit(X[:half], y[:half])
    merged = prototypes.merge_statistics([on_torch, DecorrelatedClassifier().fit(X[half:], y[half:])])
    np.testing.assert_allclose(merged.gram_, DecorrelatedClassifier().fit(X, y).gram_, atol=1e-9)
    assert "device" not in prototypes.model_params(on_torch)
    assert prototypes.model_params(on_torch) == prototypes.model_params(DecorrelatedClassifier())



def test_discriminant_without_shrinkage_or_prior_is_scikit_learns_lda():
    """No shrinkage and no prior: the decisions of scikit-learn's LDA with uniform priors on the same unit vectors,
    and its scores up to one positive factor (its covariance divides the scatter by another count)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X, y = gaussian_classes(samples_per_class=40, seed=43)
    X_test, _ = gaussian_classes(samples_per_class=10, seed=44)
    ours = DiscriminantClassifier(shrinkage=0.0, prior_strength=0.0, check_against_mean=False).fit(X, y)
    theirs = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(4, 0.25)).fit(prototypes.unit_rows(X), y)
    unit = prototypes.unit_rows(X_test)
    assert ours.predict(X_test).tolist() == theirs.predict(unit).tolist()
    expected = theirs.decision_function(unit) - np.log(0.25)
    factor = expected[0, 0] / ours.class_scores(X_test)[0, 0]
    assert factor > 0
    np.testing.assert_allclose(ours.class_scores(X_test) * factor, expected, rtol=1e-6)


def test_discriminant_prior_strength_adds_the_log_share_of_each_class():
    X, y = gaussian_classes(samples_per_class=30, seed=45)
    keep = np.r_[np.arange(30), np.arange(30, 120, 3)]  # class 0 holds 30 images, the others 10
    X, y = X[keep], y[keep]
    accuracy = DiscriminantClassifier().fit(X, y)
    balanced = DiscriminantClassifier(select_for="balanced").fit(X, y)
    halfway = DiscriminantClassifier(prior_strength=0.5).fit(X, y)
    assert (accuracy.prior_strength_, balanced.prior_strength_, halfway.prior_strength_) == (1.0, 0.0, 0.5)
    shares = np.log(np.array([30, 10, 10, 10]) / 60)
    np.testing.assert_allclose(accuracy.class_scores(X) - balanced.class_scores(X), np.tile(shares, (len(y), 1)),
                               atol=1e-9)
    np.testing.assert_allclose(halfway.bias_, (accuracy.bias_ + balanced.bias_) / 2, atol=1e-12)


def test_discriminant_shrinkage_and_unknown_score_by_hand():
    X, y = gaussian_classes(samples_per_class=12, seed=46, dim=30)  # 48 images in 30 dimensions: shrinkage matters
    fitted = DiscriminantClassifier(check_against_mean=False).fit(X, y)
    unit = prototypes.unit_rows(X)
    means = np.stack([unit[y == c].mean(axis=0) for c in range(4)])
    covariance = sum((unit[y == c] - means[c]).T @ (unit[y == c] - means[c]) for c in range(4)) / (len(y) - 4)
    scale = np.sqrt(np.diag(covariance))
    correlation = covariance / np.outer(scale, scale)
    eigenvalues = np.linalg.eigvalsh(correlation)
    rho = ridge_selection.oas_shrinkage(eigenvalues, n_samples=len(y) - 4)
    assert fitted.shrinkage_ == pytest.approx(rho, abs=1e-12) and 0.0 < rho < 1.0
    shrunk = np.outer(scale, scale) * ((1 - rho) * correlation + rho * eigenvalues.mean() * np.eye(30))
    inverse = np.linalg.inv(shrunk)
    queries = prototypes.unit_rows(gaussian_classes(samples_per_class=3, seed=47, dim=30)[0])
    expected_scores = queries @ inverse @ means.T - 0.5 * np.einsum("cf,fg,cg->c", means, inverse, means) + np.log(0.25)
    np.testing.assert_allclose(fitted.class_scores(queries), expected_scores, rtol=1e-8, atol=1e-8)
    distances = np.stack([np.einsum("nf,fg,ng->n", queries - m, inverse, queries - m) for m in means], axis=1)
    np.testing.assert_allclose(fitted.score_samples(queries), -distances.min(axis=1), rtol=1e-8, atol=1e-8)


def test_discriminant_parameters_are_checked():
    X, y = gaussian_classes(samples_per_class=10, seed=48)
    with pytest.raises(ValueError, match="shrinkage must be 'oas' or a number between 0 and 1, got 'lw'"):
        DiscriminantClassifier(shrinkage="lw").fit(X, y)
    with pytest.raises(ValueError, match="select_for must be one of 'accuracy', 'balanced', got 'f1'"):
        DiscriminantClassifier(select_for="f1").fit(X, y)
    with pytest.raises(ValueError, match="prior_strength must be None or a number between 0 and 1, got 2"):
        DiscriminantClassifier(prior_strength=2).fit(X, y)


def test_discriminant_keeps_the_class_mean_unless_it_wins_and_remembers_the_choice():
    """Isotropic noise around the class means, few images in many dimensions: a covariance only adds noise, so the
    three-fold check keeps the cosine to the class mean. Strong shared noise: the discriminant wins."""
    rng = np.random.default_rng(49)
    centres = rng.standard_normal((4, 64))
    y = np.repeat(np.arange(4), 8)
    X = centres[y] + 1.2 * rng.standard_normal((len(y), 64))
    kept = DiscriminantClassifier().fit(X, y)
    assert kept.uses_class_mean_
    queries = rng.standard_normal((5, 64))
    np.testing.assert_allclose(kept.class_scores(queries),
                               ClassMeanClassifier(normalize=True).fit(X, y).class_scores(queries), atol=1e-12)
    np.testing.assert_allclose(kept.score_samples(queries), kept.class_scores(queries).max(axis=1), atol=1e-12)
    restored = DiscriminantClassifier().set_statistics(**kept.get_statistics())
    assert restored.uses_class_mean_ and restored.partial_fit(X[:4], y[:4]).uses_class_mean_
    X_shared, y_shared = gaussian_classes(samples_per_class=40, seed=50)
    assert not DiscriminantClassifier().fit(X_shared, y_shared).uses_class_mean_
    assert not DiscriminantClassifier(check_against_mean=False).fit(X, y).uses_class_mean_


@pytest.mark.parametrize(("busy", "blas_threads_inside"), [(0.0, None), (1.5, 1)])
def test_a_gram_fit_holds_blas_to_one_thread_only_while_other_processes_keep_a_core_busy(monkeypatch, busy,
                                                                                        blas_threads_inside):
    import threadpoolctl

    from simsearch.classifiers import matrices

    def blas_threads() -> int:
        return next(pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas")

    monkeypatch.setattr(matrices, "cores_busy_elsewhere", lambda **_: busy)
    seen = []
    decompose = matrices.matrix_spectrum

    def recording(matrix, *, device):
        seen.append(blas_threads())
        return decompose(matrix, device=device)

    monkeypatch.setattr(matrices, "matrix_spectrum", recording)
    X, y = gaussian_classes(samples_per_class=80, seed=3)
    X = np.tile(X, (1, -(-matrices.PROBED_FEATURES // X.shape[1])))  # wide enough for the probe to run
    outside = blas_threads()
    DecorrelatedClassifier().fit(X, y)
    assert seen and set(seen) == {blas_threads_inside or outside}
    assert blas_threads() == outside  # restored after the fit


def test_a_first_fit_of_fewer_images_than_features_does_not_probe_the_load(monkeypatch):
    from simsearch.classifiers import matrices

    probes = []
    monkeypatch.setattr(matrices, "cores_busy_elsewhere", lambda **_: probes.append(1) or 0.0)
    X, y = gaussian_classes(samples_per_class=10, seed=3)
    wide = np.tile(X, (1, -(-matrices.PROBED_FEATURES // X.shape[1])))
    fitted = DecorrelatedClassifier().fit(wide, y)
    assert probes == []  # 40 images, 256 features: the fit decomposes 40 x 40 matrices
    fitted.partial_fit(wide[:4], y[:4])
    assert probes == [1]  # a later change has only the statistics: F x F


def test_the_load_probe_counts_other_processes_not_this_one():
    import multiprocessing
    import threading
    import time as clock

    from simsearch.classifiers import matrices

    def spin(seconds: float) -> None:
        deadline = clock.perf_counter() + seconds
        while clock.perf_counter() < deadline:
            pass

    own = threading.Thread(target=spin, args=(0.6,))  # this process busy on a core: not counted
    own.start()
    assert matrices.cores_busy_elsewhere(interval=0.3) < matrices.BUSY_CORES
    own.join()
    workers = [multiprocessing.Process(target=spin, args=(5.0,), daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        clock.sleep(0.3)
        assert matrices.cores_busy_elsewhere(interval=0.5) >= 1.0
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()
