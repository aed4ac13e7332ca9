"""Probabilities of the class-vector classifiers: their arithmetic against known answers, the temperature fitted on
training images alone, and the temperature kept by stores, merges and later changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from simsearch import protocol
from simsearch.classdb import vector_store
from simsearch.classifiers import probabilities, prototypes

MEMBERS = ["mean", "decorrelated", "balanced", "lda"]


def blobs(*, seed: int, classes: int = 6, per_class: int = 30, dim: int = 24, noise: float = 2.0):
    """Overlapping Gaussian classes: hard enough that probabilities are neither all 0 nor all 1."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    X = np.concatenate([centres[label] + rng.normal(scale=noise, size=(per_class, dim)) for label in range(classes)])
    return X, np.repeat(np.arange(classes), per_class)


def test_calibration_error_and_log_loss_known_answers():
    chances = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    rows = np.array([0, 1, 0, 1])
    # bins of width 1/15: 0.9 and 0.8 and 0.6 and 0.7 each alone; gaps |0.9-1|, |0.8-0|, |0.6-1|, |0.7-1|
    assert probabilities.calibration_error(chances, rows) == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)
    assert probabilities.log_loss(chances, rows) == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.6, 0.7])))
    # one bin for all: |mean confidence - accuracy| = |0.75 - 0.75|
    assert probabilities.calibration_error(chances, rows, bins=1) == pytest.approx(0.0)
    binned = probabilities.reliability(*probabilities.top_confidence(chances, rows), bins=5)
    assert binned.counts.tolist() == [0, 0, 1, 2, 1] and np.isnan(binned.accuracy[0])


def test_the_fitted_temperature_recovers_the_one_that_drew_the_labels():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20000, 5))
    drawn = scipy.special.softmax(scores / 0.4, axis=1)
    rows = np.array([rng.choice(5, p=row) for row in drawn])
    assert probabilities.fit_temperature(scores, rows) == pytest.approx(0.4, rel=0.05)
    assert probabilities.fit_temperature(np.zeros((4, 3)), np.zeros(4, dtype=int)) == 1.0


@pytest.mark.parametrize("name", MEMBERS)
def test_probabilities_sum_to_one_and_rank_as_the_decision_function(name):
    X, y = blobs(seed=0)
    queries, _ = blobs(seed=1)
    fitted = prototypes.make_classifier(name).fit(X, y)
    chances = fitted.predict_proba(queries)
    np.testing.assert_allclose(chances.sum(axis=1), 1.0, atol=1e-12)
    scores = fitted.decision_function(queries)
    np.testing.assert_array_equal(np.argsort(-chances, axis=1, kind="stable"), np.argsort(-scores, axis=1,
                                                                                          kind="stable"))
    np.testing.assert_array_equal(fitted.classes_[chances.argmax(axis=1)], fitted.predict(queries))
    np.testing.assert_allclose(np.exp(fitted.predict_log_proba(queries)), chances)
    assert fitted.temperature_ > 0


@pytest.mark.parametrize("name", MEMBERS)
def test_the_temperature_never_sees_the_validation_part(name):
    X, y = blobs(seed=2)
    queries, labels = blobs(seed=3)
    kwargs = dict(classifier=prototypes.make_classifier(name), train=(X, y), indexes=(torch.arange(len(y)),) * 2,
                  top_k=2, started=0.0, run=0)
    first, fitted = protocol.score_partition(valid=(queries, labels), **kwargs)
    shuffled = np.random.default_rng(0).permutation(labels)
    second, refitted = protocol.score_partition(valid=(queries, shuffled), **kwargs)
    assert refitted.temperature_ == fitted.temperature_
    assert first.log_loss < second.log_loss and not math.isnan(first.calibration_error)


@pytest.mark.parametrize("name", MEMBERS)
def test_calibrated_probabilities_beat_the_raw_softmax_of_the_scores(name):
    X, y = blobs(seed=4)
    queries, labels = blobs(seed=5)
    fitted = prototypes.make_classifier(name).fit(X, y)
    raw = probabilities.softmax(fitted.class_scores(queries), temperature=1.0)
    assert probabilities.log_loss(fitted.predict_proba(queries), labels) < probabilities.log_loss(raw, labels)
    assert probabilities.calibration_error(fitted.predict_proba(queries), labels) < 0.1


@pytest.mark.parametrize("suffix", [".zip", ".npz"])
def test_the_temperature_survives_a_store_round_trip_and_later_changes(tmp_path, suffix):
    X, y = blobs(seed=6, dim=8)
    name = "mean" if suffix == ".zip" else "lda"
    db = vector_store.ClassVectorStore(dim=8, model_name="toy", model_id="toy+sha256:0",
                                       classifier=prototypes.make_classifier(name))
    db.add_classes(embeddings=torch.from_numpy(X), labels=[f"c{label}" for label in y])
    temperature = db.classifier.temperature_
    loaded = vector_store.ClassVectorStore.load(path=db.save(path=tmp_path / f"store{suffix}"))
    assert loaded.classifier.temperature_ == pytest.approx(temperature, rel=1e-12)
    loaded.classifier.remove_class("c0")
    loaded.classifier.partial_fit(X[:5], np.array(["c9"] * 5))
    assert loaded.classifier.temperature_ == pytest.approx(temperature, rel=1e-12)


def test_a_merge_keeps_the_first_parts_temperature():
    X, y = blobs(seed=7)
    parts = [prototypes.make_classifier("decorrelated").fit(X[half::2], y[half::2]) for half in (0, 1)]
    merged = prototypes.merge_statistics(parts)
    assert merged.temperature_ == parts[0].temperature_ != parts[1].temperature_


def test_a_run_log_written_before_probabilities_still_loads():
    X, y = blobs(seed=8)
    run, _ = protocol.score_partition(classifier=prototypes.make_classifier("mean"), train=(X, y),
                                      valid=(X[:20], y[:20]), indexes=(torch.arange(len(y)), torch.arange(20)),
                                      top_k=2, started=0.0, run=0)
    record = {name: value for name, value in vars(run).items()
              if name not in ("calibration_error", "log_loss", "choice")}
    old = protocol.Run.from_dict(record, source="runs.jsonl")
    assert math.isnan(old.calibration_error) and old.choice == ""
    assert protocol.Runs(runs=(old, old), protocol="cached", top_k=2).calibration_error() is None
    assert protocol.Runs(runs=(run, run), protocol="cached", top_k=2).calibration_error().mean == \
        run.calibration_error


def test_lda_says_when_it_falls_back_to_the_class_mean():
    few, labels = blobs(seed=9, per_class=4, dim=64, noise=3.0)  # a covariance of 24 images in 64 dimensions
    fitted = prototypes.make_classifier("lda").fit(few, labels)
    assert fitted.uses_class_mean_ and prototypes.describe_choice(fitted) == "mean"
    many, labels = blobs(seed=9, per_class=200, dim=8, noise=1.0)
    assert prototypes.describe_choice(prototypes.make_classifier("lda").fit(many, labels)) == "discriminant"
    assert prototypes.describe_choice(prototypes.make_classifier("mean").fit(many, labels)) == "mean"


@pytest.mark.parametrize("name", ["decorrelated", "balanced"])
def test_a_decorrelated_temperature_comes_from_exact_leave_one_out_scores(name):
    from simsearch.classifiers.matrices import unit_rows
    from simsearch.classifiers.statistics import Samples

    rng = np.random.default_rng(4)
    X = rng.standard_normal((36, 10)) + np.repeat(rng.standard_normal((3, 10)) * 1.5, 12, axis=0)
    y = np.repeat([0, 1, 2], 12)
    y[:2] = 1  # unequal class counts: the empirical prior's scores carry them
    fitted = prototypes.make_classifier(name, alpha=0.5, unknown_score="cosine").fit(X, y)
    rows = fitted.statistics_.rows_of(y)
    held = fitted._leave_one_out_scores(Samples(unit_rows(X), rows), fitted.decomposition())
    for image in (0, 13, 35):  # each row: the scores of a fit without that image
        without = np.arange(len(y)) != image
        refit = prototypes.make_classifier(name, alpha=0.5, unknown_score="cosine").fit(X[without], y[without])
        np.testing.assert_allclose(held.scores[image], refit.class_scores(X[image:image + 1])[0], rtol=1e-5)
    assert held.scored.all()
    assert fitted.temperature_ == pytest.approx(probabilities.fit_temperature(held.scores, rows))


@pytest.mark.parametrize("name", ["decorrelated", "balanced"])
def test_the_ridge_choice_and_the_temperature_project_the_starting_images_once(name, monkeypatch):
    from simsearch.classifiers import ridge_selection
    from simsearch.classifiers.matrices import unit_rows
    from simsearch.classifiers.statistics import Samples

    rng = np.random.default_rng(5)
    X = rng.standard_normal((45, 12)) + np.repeat(rng.standard_normal((3, 12)) * 1.2, 15, axis=0)
    y = np.repeat([0, 1, 2], 15)
    projections = []
    project = ridge_selection.project
    monkeypatch.setattr(ridge_selection, "project", lambda *a, **k: projections.append(1) or project(*a, **k))
    fitted = prototypes.make_classifier(name, unknown_score="cosine").fit(X, y)
    assert len(projections) == 1  # the leave-one-out ridge choice's, reused by the temperature's pass
    rows = fitted.statistics_.rows_of(y)
    held = fitted._leave_one_out_scores(Samples(unit_rows(X), rows), fitted.decomposition())  # projected anew
    assert len(projections) == 2
    assert fitted.temperature_ == pytest.approx(probabilities.fit_temperature(held.scores, rows), rel=1e-9)
