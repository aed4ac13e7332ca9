"""Analyses on cached embeddings, checked on data whose answer is known in advance."""

from __future__ import annotations

import collections
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import banerjee
from simsearch import analysis
from simsearch.classifiers import baselines, prototypes, registry


def clusters(
    *, num_labels: int, per_class: int, dim: int = 16, spread: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random directions; ``spread`` sets how much neighbouring classes overlap."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_labels, dim, generator=generator), dim=1)
    targets = torch.arange(num_labels).repeat_interleave(per_class)
    embeddings = centres[targets] + spread * torch.randn(len(targets), dim, generator=generator)
    return embeddings, targets


def partitions_of(targets: torch.Tensor, *, runs: int, valid_share: float = 0.2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return list(analysis.random_partitions(targets=targets, valid_share=valid_share, runs=runs, generator=generator))


def unit(degrees: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


# --- Confusions ----------------------------------------------------------------------------------------------------


def test_confusion_over_partitions_sums_runs_and_keeps_unseen_labels():
    confusion = analysis.confusion_over_partitions(
        targets_per_run=[[0, 0, 1], [0, 1, 1]], predictions_per_run=[[0, 1, 1], [1, 1, 0]], num_labels=3
    )
    np.testing.assert_array_equal(confusion, [[1, 2, 0], [1, 2, 0], [0, 0, 0]])


def test_confusion_over_partitions_rejects_unpaired_runs():
    with pytest.raises(ValueError, match="one of each per partition"):
        analysis.confusion_over_partitions(targets_per_run=[[0]], predictions_per_run=[], num_labels=1)


def test_most_confused_pairs_orders_by_count_then_share():
    confusion = np.array([[8, 2, 0], [5, 3, 2], [0, 2, 18]])
    table = analysis.most_confused_pairs(confusion=confusion, labels=["mouse", "rat", "ox"], top=3)
    assert list(table.columns) == ["target", "predicted", "count", "share_of_target"]
    assert list(zip(table["target"], table["predicted"])) == [("rat", "mouse"), ("mouse", "rat"), ("rat", "ox")]
    np.testing.assert_allclose(table["count"], [5, 2, 2])
    np.testing.assert_allclose(table["share_of_target"], [0.5, 0.2, 0.2])


def test_most_confused_pair_of_overlapping_classes_is_found():
    # Classes 0 and 1 share a centre; classes 2-4 are far apart, so only 0<->1 may be confused.
    embeddings, targets = clusters(num_labels=5, per_class=30, spread=0.05)
    noise = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    embeddings[targets == 1] = embeddings[targets == 0] + 0.05 * noise
    partitions = partitions_of(targets, runs=5)
    all_targets, all_predictions = [], []
    for train, valid in partitions:
        classifier = prototypes.ClassMeanClassifier().fit(embeddings[train], targets[train])
        all_predictions.append(classifier.predict(embeddings[valid]).tolist())
        all_targets.append(targets[valid].tolist())
    confusion = analysis.confusion_over_partitions(
        targets_per_run=all_targets, predictions_per_run=all_predictions, num_labels=5
    )
    table = analysis.most_confused_pairs(confusion=confusion, labels=list("abcde"), top=10)
    assert set(zip(table["target"], table["predicted"])) == {("a", "b"), ("b", "a")}
    assert table["count"].sum() == confusion.sum() - np.trace(confusion) > 5


# --- Retrieval -----------------------------------------------------------------------------------------------------


def test_retrieval_precision_matches_hand_computation():
    # Training images at 0 (class 0), 10 (1), 20 (0) and 90 (1) degrees; queries of class 0 at 3 and 14 degrees.
    # Query at 3: ranked classes 0,1,0,1 -> relevant 1,0,1,0. Query at 14: 1,0,0,1 -> relevant 0,1,1,0. R = 2.
    embeddings = torch.tensor([unit(0), unit(10, 5.0), unit(20, 0.3), unit(90), unit(3), unit(14, 2.0)])
    targets = torch.tensor([0, 1, 0, 1, 0, 0])
    partition = (torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]))
    table = analysis.retrieval_precision(
        embeddings=embeddings, targets=targets, partitions=[partition, partition], ks=(4, 1, 2)
    )
    assert list(table["k"]) == [1, 2, 4]
    np.testing.assert_allclose(table["precision"], [(1 + 0) / 2, (0.5 + 0.5) / 2, (0.5 + 0.5) / 2])
    # AP@2: (1/2)(1) and (1/2)(1/2); AP@4: (1/2)(1 + 2/3) and (1/2)(1/2 + 2/3).
    np.testing.assert_allclose(table["map"], [0.5, (0.5 + 0.25) / 2, (5 / 6 + 7 / 12) / 2])
    np.testing.assert_allclose(table["precision_ci"], 0.0)
    assert list(table["runs"]) == [2, 2, 2]


def test_retrieval_precision_is_perfect_on_separated_clusters():
    embeddings, targets = clusters(num_labels=4, per_class=20)
    partitions = partitions_of(targets, runs=3)
    table = analysis.retrieval_precision(embeddings=embeddings, targets=targets, partitions=partitions)
    np.testing.assert_allclose(table["precision"], 1.0)
    np.testing.assert_allclose(table["map"], 1.0)


# --- Embedding map -------------------------------------------------------------------------------------------------


def test_tsne_map_places_class_means_in_their_clusters():
    embeddings, targets = clusters(num_labels=4, per_class=25, spread=0.1)
    coords, mean_coords = analysis.tsne_map(embeddings=embeddings, targets=targets, num_labels=5, seed=0)
    assert coords.shape == (100, 2) and mean_coords.shape == (5, 2)
    assert np.isnan(mean_coords[4]).all()
    centroids = np.stack([coords[targets.numpy() == label].mean(axis=0) for label in range(4)])
    nearest = np.linalg.norm(mean_coords[:4, None] - centroids[None], axis=2).argmin(axis=1)
    np.testing.assert_array_equal(nearest, np.arange(4))


# --- Per-class accuracy --------------------------------------------------------------------------------------------


def test_per_class_accuracy_matches_scipy_t_interval():
    # Class 0 accuracy per run: 1, 0.5, 0.75; class 1 always right; class 2 only in run 0; class 3 never.
    targets_per_run = [[0, 0, 0, 0, 1, 2], [0, 0, 1], [0, 0, 0, 0, 1]]
    predictions_per_run = [[0, 0, 0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1]]
    table = analysis.per_class_accuracy(
        targets_per_run=targets_per_run, predictions_per_run=predictions_per_run, labels=list("abcd"), confidence=0.9
    )
    assert list(table.columns) == ["label", "mean", "half_width", "low", "high", "n"]
    low, high = stats.t.interval(0.9, 2, loc=0.75, scale=stats.sem([1.0, 0.5, 0.75]))
    np.testing.assert_allclose(table.loc[0, ["mean", "low", "high"]].astype(float), [0.75, low, high])
    np.testing.assert_allclose(table.loc[1, ["mean", "half_width"]].astype(float), [1.0, 0.0])
    assert list(table["n"]) == [3, 3, 1, 0]
    assert table.loc[2, "mean"] == 0.0 and np.isnan(table.loc[2, "half_width"])
    assert np.isnan(table.loc[3, "mean"])


def test_cumulative_accuracy_band_averages_partition_curves():
    # Two classes, 2 intervals. Run 1 accuracies (0.5, 1) -> curve (0.5, 0.5, 1); run 2 (1, 1) -> (1, 1, 1).
    band = analysis.cumulative_accuracy_band(
        targets_per_run=[[0, 0, 1], [0, 1]], predictions_per_run=[[0, 1, 1], [0, 1]], num_labels=2, num_intervals=2
    )
    np.testing.assert_allclose(band["share"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(band["mean"], [0.75, 0.75, 1.0])
    half_width = stats.t.ppf(0.975, 1) * stats.sem([0.5, 1.0])
    np.testing.assert_allclose(band["half_width"], [half_width, half_width, 0.0])
    np.testing.assert_allclose(band["high"] - band["low"], 2 * band["half_width"])


def test_least_accurate_with_interval_uses_the_interval():
    per_class = pd.DataFrame(
        {
            "label": ["duck", "rat", "ox", "cat"],
            "mean": [0.5, 0.85, 0.95, 0.7],
            "half_width": [0.1, 0.1, 0.02, np.nan],
            "low": [0.4, 0.75, 0.93, np.nan],
            "high": [0.6, 0.95, 0.97, np.nan],
            "n": [20, 20, 20, 1],
        }
    )
    table = analysis.least_accurate_with_interval(per_class=per_class, threshold=0.8)
    assert list(table["label"]) == ["duck", "cat", "rat"]
    assert list(table["confidently_below"]) == [True, True, False]


# --- Prototype variants --------------------------------------------------------------------------------------------


def test_all_prototype_methods_are_perfect_on_separated_clusters():
    embeddings, targets = clusters(num_labels=6, per_class=20)
    table = analysis.compare_prototypes(
        embeddings=embeddings, targets=targets, partitions=partitions_of(targets, runs=3), top_k=2
    )
    assert list(table.columns) == [
        "method", "accuracy", "accuracy_ci", "balanced_accuracy", "balanced_ci", "topk_accuracy", "topk_ci", "gain",
        "gain_ci", "error_reduction", "seconds",
    ]
    assert len(table) == len(analysis.default_prototype_methods())
    np.testing.assert_allclose(table["accuracy"], 1.0)
    np.testing.assert_allclose(table["balanced_accuracy"], 1.0)
    np.testing.assert_allclose(table["topk_accuracy"], 1.0)
    assert (table["seconds"] > 0).all()


def test_raw_class_mean_differs_from_normalised_mean():
    # Class 0: a long vector at 0 degrees and a short one at 90; class 1: one vector at 60.
    # The raw mean of class 0 points at ~0.6 degrees, the mean of unit vectors at 45.
    train = torch.tensor([unit(0, 100.0), unit(90), unit(60)])
    train_targets = torch.tensor([0, 0, 1])
    query = torch.tensor([unit(40)])
    raw = prototypes.ClassMeanClassifier(normalize=False).fit(train, train_targets)
    unit_mean = prototypes.ClassMeanClassifier(normalize=True).fit(train, train_targets)
    assert raw.predict_topk(query, 2).tolist() == [[1, 0]]
    assert unit_mean.predict_topk(query, 2).tolist() == [[0, 1]]


def test_nearest_neighbour_ranks_by_votes_then_similarity():
    # Training images at 0 (class 0), 30 (1), 60 (0) and 90 (2) degrees.
    train = torch.tensor([unit(0), unit(30), unit(60), unit(90)])
    train_targets = torch.tensor([0, 1, 0, 2])
    queries = torch.tensor([unit(25), unit(80), unit(35)])
    one = baselines.NearestNeighbourClassifier(k=1).fit(train, train_targets)
    assert prototypes.predict_topk(one, queries, 3).tolist() == [[1, 0, 2], [2, 0, 1], [1, 0, 2]]
    # With k=3 the query at 35 degrees has neighbours 30 (1), 60 (0), 0 (0): two votes for class 0 beat the nearest.
    three = baselines.NearestNeighbourClassifier(k=3).fit(train, train_targets)
    assert prototypes.predict_topk(three, queries[2:], 4).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        baselines.NearestNeighbourClassifier(k=0).fit(train, train_targets)


def test_kmeans_prototypes_handle_a_class_with_two_looks():
    # Class 0 lies around two directions e0 and e1; class 1 around their bisector, where class 0's mean points.
    generator = torch.Generator().manual_seed(1)
    eye = torch.eye(8)
    centres = torch.stack([eye[0]] * 20 + [eye[1]] * 20 + [F.normalize(eye[0] + eye[1], dim=0)] * 20)
    embeddings = centres + 0.03 * torch.randn(60, 8, generator=generator)
    targets = torch.tensor([0] * 40 + [1] * 20)
    partitions = partitions_of(targets, runs=4, valid_share=0.25)
    table = analysis.compare_prototypes(
        embeddings=embeddings,
        targets=targets,
        partitions=partitions,
        top_k=1,
        methods={
            "mean": prototypes.ClassMeanClassifier(),
            "kmeans2": baselines.KMeansPrototypeClassifier(prototypes_per_class=2),
        },
    ).set_index("method")
    assert table.loc["kmeans2", "accuracy"] == 1.0
    assert table.loc["mean", "accuracy"] < 0.9
    assert table.loc["mean", "gain"] == 0.0 and table.loc["mean", "gain_ci"] == 0.0
    assert table.loc["kmeans2", "gain"] == pytest.approx(1.0 - table.loc["mean", "accuracy"])
    assert table.loc["kmeans2", "gain_ci"] == pytest.approx(table.loc["mean", "accuracy_ci"])
    assert table.loc["kmeans2", "error_reduction"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="methods is empty"):
        analysis.compare_prototypes(embeddings=embeddings, targets=targets, partitions=partitions, methods={})


def test_kmeans_keeps_every_image_of_a_small_class():
    embeddings, targets = clusters(num_labels=2, per_class=10)
    embeddings, targets = embeddings[:12], targets[:12]
    classifier = baselines.KMeansPrototypeClassifier(prototypes_per_class=3).fit(embeddings, targets)
    assert classifier.owners_.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(classifier.prototypes_[3:].float(), F.normalize(embeddings[10:], dim=1))


def test_linear_probe_returns_original_label_indexes():
    embeddings, targets = clusters(num_labels=3, per_class=15)
    keep = targets != 1
    probe = baselines.linear_probe().fit(embeddings[keep], targets[keep])
    ranked = prototypes.predict_topk(probe, embeddings[keep], 4)
    assert ranked.shape == (30, 2)
    assert ranked[:, 0].tolist() == targets[keep].tolist()


def test_linear_probe_reaches_scikit_learns_logistic_regression_optimum():
    from sklearn.linear_model import LogisticRegression

    embeddings, targets = clusters(num_labels=4, per_class=25, spread=0.8, seed=2)
    X, y = embeddings.numpy(), targets.numpy()
    ours = baselines.LinearProbe(C=2.0).fit(X, y)
    theirs = LogisticRegression(C=2.0, tol=1e-10, max_iter=10000).fit(prototypes.unit_rows(X), y)
    np.testing.assert_allclose(ours.coef_ - ours.coef_.mean(axis=0), theirs.coef_ - theirs.coef_.mean(axis=0),
                               atol=2e-3)  # softmax weights are defined up to a shift shared by all classes
    assert (ours.predict(X) == theirs.predict(prototypes.unit_rows(X))).all()


def test_analyse_runs_computes_only_the_parts_asked_for():
    embeddings, targets = clusters(num_labels=4, per_class=20)
    partitions = partitions_of(targets, runs=3)
    runs = SimpleNamespace(
        embeddings=embeddings, targets=targets, partitions=partitions, top_k=2,
        targets_per_run=[targets[valid].tolist() for _, valid in partitions],
        predictions_per_run=[targets[valid].tolist() for _, valid in partitions],
        runs=[
            SimpleNamespace(run=number, valid_indexes=valid.tolist(), targets=targets[valid].tolist(),
                            predictions=targets[valid].tolist(), margins=np.linspace(1, 2, len(valid)) + number)
            for number, (_, valid) in enumerate(partitions)
        ],
    )
    result = analysis.analyse_runs(
        runs=runs, labels=list("abcd"), valid_share=0.2, parts=["retrieval", "confusion"],
        sample_names=[f"s{i}" for i in range(len(targets))],
    )
    assert result.retrieval is not None and result.confusion.trace() == sum(len(v) for _, v in partitions)
    assert result.prototypes is None and result.tsne_coords is None and result.coverage is None
    assert set(result.tables()) == {"confused_pairs", "class_accuracy_intervals", "least_accurate_intervals",
                                    "retrieval", "smallest_margins"}
    assert result.hard_samples["sample"].iloc[0] == f"s{partitions[0][1][0]}"
    assert result.hard_samples["margin"].iloc[0] == 1.0 and len(result.hard_samples) == 10
    with pytest.raises(ValueError, match="Unknown analysis part.*tnse; choose among confusion, retrieval"):
        analysis.analyse_runs(runs=runs, labels=list("abcd"), valid_share=0.2, parts=["tnse"])


def test_script_and_analysis_name_the_same_parts():
    from simsearch import cli

    assert cli.ANALYSIS_PARTS == analysis.ANALYSIS_PARTS


# --- Confidence interval calibration -------------------------------------------------------------------------------


def test_random_partitions_reproduce_the_dataset_splitter(image_folder):
    maker = banerjee.DatasetMaker(dataset_path=image_folder, check_images=False)
    targets = maker.get_image_labels()
    draws = analysis.random_partitions(
        targets=targets, valid_share=0.25, runs=2, generator=torch.Generator().manual_seed(5)
    )
    partitions = list(draws)
    generator = torch.Generator().manual_seed(5)
    for train, valid in partitions:
        expected_train, expected_valid, _ = maker.split_indexes(valid_share=0.25, test_share=0.0, generator=generator)
        assert train.tolist() == expected_train.tolist() and valid.tolist() == expected_valid.tolist()
    assert torch.bincount(targets[partitions[0][1]]).tolist() == [2, 2, 2, 2]
    assert partitions[0][1].tolist() != partitions[1][1].tolist()
    with pytest.raises(ValueError, match="valid_share"):
        next(analysis.random_partitions(targets=targets, valid_share=1.0, runs=1, generator=torch.Generator()))


def test_leave_out_path_matches_a_fresh_fit_per_partition():
    embeddings, targets = clusters(num_labels=6, per_class=20, spread=0.6)
    partitions = partitions_of(targets, runs=4)
    fast = analysis._leave_out_accuracies(
        embeddings=embeddings, targets=targets, valid_sets=[valid for _, valid in partitions]
    )
    slow = [
        prototypes.ClassMeanClassifier().fit(embeddings[train], targets[train]).score(embeddings[valid], targets[valid])
        for train, valid in partitions
    ]
    np.testing.assert_allclose(fast, slow)
    assert 0.3 < np.mean(fast) < 0.95


def test_ci_coverage_is_near_nominal_on_synthetic_data():
    embeddings, targets = clusters(num_labels=8, per_class=30, spread=0.5, seed=3)
    result = analysis.ci_coverage(
        embeddings=embeddings, targets=targets, reference_runs=400, sample_runs=10, trials=80, seed=0
    )
    assert result["covered"] == round(result["coverage"] * 80)
    assert 0.8 <= result["coverage"] <= 1.0
    assert 0.3 < result["reference_mean"] < 0.98
    assert result["reference_half_width"] < result["mean_half_width"] / 3


def test_smallest_margins_lists_each_sample_once_at_its_smallest_margin():
    Run = collections.namedtuple("Run", "run valid_indexes targets predictions margins")
    runs = [
        Run(0, [3, 5, 7], [0, 1, 1], [0, 0, 1], [0.30, 0.01, float("nan")]),
        Run(1, [5, 2, 3], [1, 0, 0], [1, 0, 1], [0.20, 0.50, 0.05]),
    ]
    table = analysis.smallest_margins(
        runs=runs, labels=["cat", "dog"], sample_names=[f"img{i}.jpg" for i in range(8)], count=2
    )
    assert table.to_dict("list") == {
        "sample": ["img5.jpg", "img3.jpg"], "target": ["dog", "cat"], "predicted": ["cat", "dog"],
        "margin": [0.01, 0.05], "partition": [0, 1],
    }
    assert analysis.smallest_margins(runs=runs, labels=["cat", "dog"])["sample"].tolist()[:3] == ["5", "3", "2"]


# --- Open set ---------------------------------------------------------------------------------------------------


def test_open_set_scores_by_hand():
    result = analysis.open_set_scores(known=[1.0, 2.0, 3.0, 4.0], unknown=[0.0, 2.5], true_positive_rate=0.75)
    # 6 of the 8 (known, unknown) pairs are ordered right; the threshold (the lower 25 % quantile of the known
    # scores, so at least 75 % stay) keeps one of the two unknown.
    assert result == {"auroc": 0.75, "fpr": 0.5, "threshold": 1.0}
    with pytest.raises(ValueError, match="Need known and unknown queries, got 4 and 0"):
        analysis.open_set_scores(known=[1.0, 2.0, 3.0, 4.0], unknown=[])


def test_classes_of_one_concept_are_hidden_together():
    targets = np.repeat(np.arange(10), 4)
    partitions = [(np.arange(0, 40, 2), np.arange(1, 40, 2))] * 30
    draws = list(analysis.hidden_class_draws(targets=targets, partitions=partitions, hidden_share=0.2, seed=3,
                                             together=[[0, 1], [2, 3, 4]]))
    for train, known, unknown, hidden in draws:
        assert {0, 1} <= set(hidden.tolist()) or not {0, 1} & set(hidden.tolist())
        assert {2, 3, 4} <= set(hidden.tolist()) or not {2, 3, 4} & set(hidden.tolist())
        assert 2 <= len(hidden) <= 4 and set(np.unique(targets[unknown]).tolist()) == set(hidden.tolist())
        assert not np.isin(targets[np.r_[train, known]], hidden).any()
    assert any({0, 1} <= set(hidden.tolist()) for *_, hidden in draws)
    plain = [hidden.tolist() for *_, hidden in analysis.hidden_class_draws(
        targets=targets, partitions=partitions[:3], hidden_share=0.2, seed=3)]
    assert plain == [np.random.default_rng(3 + n).choice(np.arange(10), size=2, replace=False).tolist()
                     for n in range(3)]  # without groups, the draws of before
    with pytest.raises(ValueError, match=r"Classes \[12\] to hide together are not among the labels"):
        next(analysis.hidden_class_draws(targets=targets, partitions=partitions, hidden_share=0.2, seed=3,
                                         together=[[0, 12]]))
    with pytest.raises(ValueError, match="A class appears in two groups"):
        next(analysis.hidden_class_draws(targets=targets, partitions=partitions, hidden_share=0.2, seed=3,
                                         together=[[0, 1], [1, 2]]))


@pytest.mark.parametrize("classifier", [prototypes.ClassMeanClassifier(), prototypes.make_classifier("balanced")],
                         ids=repr)
def test_open_set_tells_far_hidden_classes_apart(classifier):
    embeddings, targets = clusters(num_labels=10, per_class=30, spread=0.05)
    partitions = partitions_of(targets, runs=3)
    table, summary, (known, unknown) = analysis.open_set(
        embeddings=embeddings, targets=targets, partitions=partitions, classifier=classifier, hidden_share=0.2
    )
    assert table["hidden_classes"].tolist() == [2, 2, 2] and table["unknown_samples"].tolist() == [60, 60, 60]
    assert table["known_samples"].tolist() == [48, 48, 48]
    assert summary["auroc"] == 1.0 and summary["fpr"] == 0.0 and summary["known_accuracy"] == 1.0
    assert len(known) == 48 and len(unknown) == 60 and known.min() > unknown.max()
    draws = list(analysis.hidden_class_draws(targets=targets.numpy(), partitions=partitions, hidden_share=0.2,
                                             seed=0))
    assert [sorted(hidden.tolist()) for *_, hidden in draws] != [sorted(draws[0][3].tolist())] * 3  # new per draw


def test_compared_classifiers_can_be_named_as_on_the_command_line():
    """Names of registry.ESTIMATOR_NAMES give the same rows as the estimators they stand for."""
    embeddings, targets = clusters(num_labels=4, per_class=12, spread=0.6)
    partitions = partitions_of(targets, runs=3)
    named = analysis.compare_prototypes(embeddings=embeddings, targets=targets, partitions=partitions, top_k=2,
                                        methods=["knn5", "mean", "kmeans2"]).set_index("method")
    given = analysis.compare_prototypes(
        embeddings=embeddings, targets=targets, partitions=partitions, top_k=2,
        methods={"knn5": baselines.NearestNeighbourClassifier(k=5), "mean": prototypes.ClassMeanClassifier(),
                 "kmeans2": baselines.KMeansPrototypeClassifier(prototypes_per_class=2)},
    ).set_index("method")
    assert list(named.index) == ["knn5", "mean", "kmeans2"]
    columns = ["accuracy", "balanced_accuracy", "topk_accuracy", "gain"]
    pd.testing.assert_frame_equal(named[columns], given[columns])
    assert type(registry.make_estimator("probe")) is baselines.LinearProbe
    assert registry.make_estimator("balanced").get_params()["prior"] == "balanced"
    with pytest.raises(ValueError, match="Unknown classifier 'svm'; use one of mean, decorrelated, balanced, lda, "
                                         "auto, knn1"):
        registry.make_estimator("svm")


def _analysis_on_device_against_the_cpu(device: str) -> None:
    """The parts that compute in torch on a device give the CPU's figures: every classifier's accuracy (the probe
    within its solver's tolerance), retrieval, the coverage check and the open-set scores."""
    embeddings, targets = clusters(num_labels=6, per_class=25, spread=0.4, seed=5)
    partitions = partitions_of(targets, runs=3)
    names = ["mean", "decorrelated", "balanced", "knn1", "knn5", "kmeans2", "probe"]
    columns = ["accuracy", "balanced_accuracy", "topk_accuracy"]
    tables = [analysis.compare_prototypes(embeddings=embeddings, targets=targets, partitions=partitions, top_k=2,
                                          methods=names, device=where).set_index("method")[columns]
              for where in (None, device)]
    assert (tables[0].loc["probe", "accuracy"] < 1.0) and (tables[0]["accuracy"].min() > 0.5)  # not trivial
    pd.testing.assert_frame_equal(tables[0].drop(index="probe"), tables[1].drop(index="probe"))
    np.testing.assert_allclose(tables[0].loc["probe"], tables[1].loc["probe"], atol=0.02)
    retrieval = [analysis.retrieval_precision(embeddings=embeddings, targets=targets, partitions=partitions,
                                              device=where) for where in (None, device)]
    pd.testing.assert_frame_equal(*retrieval)
    coverage = [analysis.ci_coverage(embeddings=embeddings, targets=targets, reference_runs=40, sample_runs=5,
                                     trials=4, device=where) for where in (None, device)]
    assert coverage[0] == pytest.approx(coverage[1], abs=1e-6)
    open_sets = [analysis.open_set(embeddings=embeddings, targets=targets, partitions=partitions,
                                   classifier=prototypes.make_classifier("decorrelated"), device=where)
                 for where in (None, device)]
    np.testing.assert_allclose(open_sets[0][0]["auroc"], open_sets[1][0]["auroc"], atol=1e-6)
    assert open_sets[0][1]["classifier"] == open_sets[1][1]["classifier"]  # the device is no part of the method


def test_analysis_in_torch_on_the_cpu_device_equals_the_default_path():
    _analysis_on_device_against_the_cpu("cpu")


@pytest.mark.cuda
def test_analysis_on_cuda_equals_the_cpu():
    _analysis_on_device_against_the_cpu("cuda")


def test_torch_pool_only_holds_blas_at_one_thread_while_torch_works():
    import threadpoolctl

    import utils

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}

    before, torch_threads = blas_threads(), torch.get_num_threads()
    with utils.torch_pool_only():
        assert blas_threads() == {1} and torch.get_num_threads() == torch_threads
    with utils.torch_pool_only(active=False):
        assert blas_threads() == before
    assert blas_threads() == before
    assert baselines.works_in_torch(baselines.LinearProbe())
    assert not baselines.works_in_torch(prototypes.DecorrelatedClassifier())
    assert baselines.works_in_torch(prototypes.DecorrelatedClassifier(device="cuda"))
    assert not baselines.works_in_torch(baselines.NearestNeighbourClassifier())  # a NumPy product on the CPU


def test_the_reliability_part_pools_every_partitions_validation_probabilities(tmp_path):
    from simsearch import visual
    from simsearch.classifiers import probabilities

    embeddings, targets = clusters(num_labels=5, per_class=30, spread=0.6, seed=3)
    partitions = partitions_of(targets, runs=3)
    runs = SimpleNamespace(embeddings=embeddings, targets=targets, partitions=partitions,
                           classifier=prototypes.make_classifier("mean"))
    result = analysis.analyse_runs(runs=runs, labels=list("abcde"), valid_share=0.2, parts=["reliability"])
    binned = result.reliability
    assert binned.counts.sum() == sum(len(valid) for _, valid in partitions)
    confidence, right = [], []  # the same partitions by hand
    for train, valid in partitions:
        fitted = prototypes.make_classifier("mean").fit(embeddings[train].double().numpy(), targets[train].numpy())
        top, hit = probabilities.top_confidence(fitted.predict_proba(embeddings[valid].double().numpy()),
                                                targets[valid].numpy())
        confidence.append(top)
        right.append(hit)
    expected = probabilities.reliability(np.concatenate(confidence), np.concatenate(right))
    np.testing.assert_array_equal(binned.counts, expected.counts)
    np.testing.assert_allclose(binned.accuracy, expected.accuracy, equal_nan=True)
    assert list(result.tables()) == ["reliability"] and result.tables()["reliability"]["samples"].sum() == 90
    written = visual.draw_analysis(result, labels=list("abcde"), out_dir=tmp_path, title="t", confidence=0.95,
                                   sample_kind="image")
    assert written == [tmp_path / "reliability.png"] and written[0].stat().st_size > 10_000
