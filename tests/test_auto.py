"""``auto``: the member of the family chosen on the training part, its rule, and the choice kept as a statistic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simsearch import protocol
from simsearch.classdb import vector_store
from simsearch.classifiers import prototypes, ridge_selection


def correlated_classes(*, per_class: int, seed: int, dim: int = 16, classes: int = 4):
    """Class means one unit apart under strong shared noise along the directions that separate them: the class
    mean confuses them, a discriminant or a ridge does not."""
    layout = np.random.default_rng(0)
    mixing = layout.standard_normal((dim, dim)) * 0.2
    mixing[:, :classes] += layout.standard_normal((dim, classes))
    rng = np.random.default_rng(seed)
    X = np.concatenate([5.0 + np.eye(dim)[c] + rng.standard_normal((per_class, dim)) @ mixing.T
                        for c in range(classes)])
    return X, np.repeat(np.arange(classes), per_class)


def test_the_rule_keeps_the_baseline_unless_beaten_and_then_the_simplest_near_the_best():
    weights = np.full(40, 1 / 40)
    baseline = (np.arange(40) < 20).astype(float)  # half of the images right

    def flipped(*images: int) -> np.ndarray:
        hits = baseline.copy()
        hits[list(images)] = 1 - hits[list(images)]
        return hits

    traded = flipped(0, 20)  # one image won, one lost: no gain
    strong = flipped(*range(20, 28))  # eight more images right
    near_best = flipped(*range(20, 30), 0)  # ten more, one lost: one image beyond strong, within the noise
    far_best = flipped(*range(20, 40))  # every image right
    assert ridge_selection.simplest_sufficient(np.array([baseline, traded]), weights=weights) == 0
    assert ridge_selection.simplest_sufficient(np.array([baseline, strong, near_best]), weights=weights) == 1
    assert ridge_selection.simplest_sufficient(np.array([baseline, strong, far_best]), weights=weights) == 2
    assert ridge_selection.simplest_sufficient(np.array([baseline, traded, near_best]), weights=weights) == 2


def test_auto_chooses_a_member_where_one_wins_clearly_and_predicts_as_it():
    X, y = correlated_classes(per_class=150, seed=1)
    queries, labels = correlated_classes(per_class=150, seed=2)
    auto = prototypes.make_classifier("auto").fit(X, y)
    assert auto.chosen_ != "mean"
    assert np.mean(auto.predict(queries) == labels) > np.mean(
        prototypes.make_classifier("mean").fit(X, y).predict(queries) == labels) + 0.1
    np.testing.assert_allclose(auto.decision_function(queries), auto.member_.decision_function(queries))
    assert prototypes.describe_choice(auto).startswith(auto.chosen_)


def test_auto_keeps_the_class_mean_where_nothing_can_be_told():
    centres, rng = np.random.default_rng(99).normal(size=(6, 64)), np.random.default_rng(0)
    X = np.concatenate([centre + rng.normal(scale=3.0, size=(4, 64)) for centre in centres])  # 24 images, 64 dims
    y = np.repeat(np.arange(6), 4)
    auto = prototypes.make_classifier("auto").fit(X, y)
    assert auto.chosen_ == "mean" and prototypes.describe_choice(auto) == "mean"
    np.testing.assert_allclose(auto.class_vectors()[0],
                               prototypes.ClassMeanClassifier(normalize=True).fit(X, y).class_vectors()[0])


def test_the_choice_survives_a_store_round_trip_later_changes_and_a_merge(tmp_path):
    X, y = correlated_classes(per_class=60, seed=4)
    db = vector_store.ClassVectorStore(dim=X.shape[1], model_name="toy", model_id="toy+sha256:0",
                                       classifier=prototypes.make_classifier("auto"))
    db.add_classes(embeddings=torch.from_numpy(X), labels=[f"c{label}" for label in y])
    chosen, scores = db.classifier.chosen_, db.classifier.decision_function(X)
    loaded = vector_store.ClassVectorStore.load(path=db.save(path=tmp_path / "store.npz"))
    assert loaded.classifier_name == "auto" and loaded.classifier.chosen_ == chosen != "mean"
    np.testing.assert_allclose(loaded.classifier.decision_function(X), scores, atol=1e-10)
    loaded.classifier.remove_class("c0")
    loaded.classifier.partial_fit(X[:3], np.array(["new"] * 3))
    assert loaded.classifier.chosen_ == chosen
    parts = [prototypes.make_classifier("auto").fit(X[half::2], y[half::2]) for half in (0, 1)]
    assert prototypes.merge_statistics(parts).chosen_ == parts[0].chosen_
    with pytest.raises(ValueError, match="chose 'lda', which is not among the candidates mean"):
        prototypes.AutoClassifier(candidates=("mean",)).set_statistics(**{**parts[0].get_statistics(),
                                                                           "chosen": np.asarray("lda")})


def test_each_partition_records_what_auto_chose():
    X, y = correlated_classes(per_class=60, seed=5)
    run, _ = protocol.score_partition(classifier=prototypes.make_classifier("auto"), train=(X, y),
                                      valid=(X[:40], y[:40]), indexes=(torch.arange(len(y)), torch.arange(40)),
                                      top_k=2, started=0.0, run=0)
    runs = protocol.Runs(runs=(run, run), protocol="cached", top_k=2)
    assert run.choice != "mean" and runs.choices() == {run.choice: 2}


def test_candidates_are_checked_when_a_fit_starts():
    with pytest.raises(ValueError, match="'mean' first"):
        prototypes.AutoClassifier(candidates=("lda", "mean")).fit(*correlated_classes(per_class=5, seed=0))


@pytest.mark.parametrize("per_class", [8, 40])  # fewer, then more images than the 48 features
def test_the_folds_ridges_of_both_priors_in_one_pass_are_the_members_own_choices(per_class):
    from simsearch.classifiers.matrices import unit_rows
    from simsearch.classifiers.statistics import Samples

    X, y = correlated_classes(per_class=per_class, seed=2, dim=48)
    auto = prototypes.make_classifier("auto").fit(X, y)
    samples = Samples(unit_rows(X), auto.statistics_.rows_of(y))
    ridges, _ = auto._fold_ridges(auto.statistics_, samples)
    for name in ("decorrelated", "balanced"):
        own = prototypes.make_classifier(name, unknown_score="cosine").fit(X, y)
        assert ridges[name] == pytest.approx(own.alpha_, rel=1e-9), name
    assert np.isfinite(list(ridges.values())).any()  # a ridge, not only the class mean, was chosen
