"""Analyses on cached embeddings: confusions, retrieval precision, embedding maps, per-class intervals, other
prototype choices and a check of the confidence intervals themselves.

The article judges its class-mean classifier by mean accuracy over random partitions. With every image embedded
once, the questions around that number cost seconds instead of encoder runs: which classes are mixed up, how good
plain image retrieval is (to compare with retrieval write-ups), whether another way of building class vectors
would be better, and whether a 95 % Student-t interval from 20 partitions really covers the mean 95 % of the time.

Inputs follow one convention: ``embeddings`` ``[N, D]`` float32 of all images in global order, ``targets`` ``[N]``
label indexes, and ``partitions`` as ``(train_indexes, valid_indexes)`` pairs of global image indexes.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sklearn.base
import torch
import torch.nn.functional as F
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix, roc_auc_score
from tqdm import tqdm

from simsearch import cumacc, datasets, metrics, utils
from simsearch.classifiers import baselines, probabilities, prototypes, registry

__all__ = [
    "ANALYSIS_PARTS",
    "RunAnalysis",
    "analyse_runs",
    "check_analysis_parts",
    "ci_coverage",
    "class_accuracy_matrix",
    "compare_prototypes",
    "confusion_over_partitions",
    "cumulative_accuracy_band",
    "default_prototype_methods",
    "least_accurate_with_interval",
    "hidden_class_draws",
    "most_confused_pairs",
    "open_set",
    "open_set_scores",
    "per_class_accuracy",
    "random_partitions",
    "retrieval_precision",
    "smallest_margins",
    "tsne_map",
]

Partition = tuple[torch.Tensor, torch.Tensor]


# --- Confusions ----------------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


def confusion_over_partitions(
    *, targets_per_run: Sequence[Sequence[int]], predictions_per_run: Sequence[Sequence[int]], num_labels: int
) -> np.ndarray:
    """Confusion counts summed over partitions (rows: target, columns: prediction).

    One partition has only a handful of validation images per class; summing over partitions shows which
    confusions are systematic rather than one unlucky image.
    """
    if len(targets_per_run) != len(predictions_per_run):
        raise ValueError(
            f"Got {len(targets_per_run)} target lists but {len(predictions_per_run)} prediction lists; "
            "pass one of each per partition."
        )
    total = np.zeros((num_labels, num_labels), dtype=np.int64)
    for targets, predictions in zip(targets_per_run, predictions_per_run):
        total += confusion_matrix(np.asarray(targets), np.asarray(predictions), labels=np.arange(num_labels))
    return total


def most_confused_pairs(*, confusion: np.ndarray, labels: Sequence[str], top: int = 10) -> pd.DataFrame:
    """The largest off-diagonal cells: which class is taken for which (e.g. mouse -> rat) and how often.

    ``share_of_target`` is the count divided by all validation images of the target class, so pairs of classes
    with different sizes compare fairly. Ties in count keep the larger share first.
    """
    confusion = np.asarray(confusion)
    if confusion.shape != (len(labels), len(labels)):
        raise ValueError(f"Confusion matrix has shape {confusion.shape} but there are {len(labels)} labels.")
    off_diagonal = confusion * (1 - np.eye(len(labels), dtype=confusion.dtype))
    rows, cols = np.nonzero(off_diagonal)
    counts = off_diagonal[rows, cols]
    shares = counts / confusion.sum(axis=1)[rows]
    table = utils.table(
        {
            "target": [labels[i] for i in rows],
            "predicted": [labels[j] for j in cols],
            "count": counts.astype(np.int64),
            "share_of_target": shares,
        }
    )
    return table.sort_values(["count", "share_of_target"], ascending=False, kind="stable").head(top).reset_index(
        drop=True
    )


# --- Retrieval -----------------------------------------------------------------------------------------------------


def retrieval_precision(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    partitions: Sequence[Partition],
    ks: Sequence[int] = (1, 4, 8),
    confidence: float = 0.95,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Image-retrieval quality of the embeddings: validation images query the individual training images.

    This is the retrieval write-ups' measure (nearest images, not class vectors), on the same partitions as the
    classifier, so both kinds of result can be put side by side. For a query with ``R`` training images of its
    class and relevance ``rel_i`` (1 when the ``i``-th nearest training image has the query's class):

    - ``P@K = (1 / K) * sum_{i<=K} rel_i``;
    - ``AP@K = (1 / min(K, R)) * sum_{i<=K} P@i * rel_i``, so AP@K is 1 exactly when the first ``min(K, R)``
      results are all relevant; ``mAP@K`` is its mean over queries.

    Each partition gives one mean per measure; the table reports their mean and Student-t half width. The searches
    run in torch on ``device`` (None: the CPU), where the embeddings are copied once.
    """
    ks = sorted(set(int(k) for k in ks))
    device = prototypes.torch_device(device)
    embeddings, targets = embeddings.to(device), targets.to(device)
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}.")
    per_run = [_retrieval_of_partition(embeddings, targets, train.to(device), valid.to(device), ks=ks)
               for train, valid in tqdm(partitions, desc="[Retrieval] Partitions", leave=False)]
    rows = []
    for column, k in enumerate(ks):
        precision = metrics.mean_confidence_interval([run[0][column] for run in per_run], confidence=confidence)
        average = metrics.mean_confidence_interval([run[1][column] for run in per_run], confidence=confidence)
        rows.append({"k": k, "precision": precision.mean, "precision_ci": precision.half_width, "map": average.mean,
                     "map_ci": average.half_width, "runs": precision.n})
    return pd.DataFrame(rows)


def _retrieval_of_partition(
    embeddings: torch.Tensor, targets: torch.Tensor, train: torch.Tensor, valid: torch.Tensor, *, ks: Sequence[int]
) -> tuple[list[float], list[float]]:
    """``(P@K, mAP@K)`` for each ``k`` of ``ks`` (sorted) over one partition's validation queries."""
    train_targets, query_targets = targets[train], targets[valid]
    _, neighbours = prototypes.cosine_top_k(queries=embeddings[valid], corpus=embeddings[train], top_k=ks[-1])
    relevant = (train_targets[neighbours] == query_targets.unsqueeze(1)).double()
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64, device=relevant.device)
    precision_at_rank = relevant.cumsum(dim=1) / ranks
    num_relevant = torch.bincount(train_targets, minlength=int(targets.max()) + 1)[query_targets]
    precision = [float(precision_at_rank[:, k - 1].mean()) for k in ks]
    average = [float(((precision_at_rank[:, :k] * relevant[:, :k]).sum(dim=1) / num_relevant.clamp(max=k)).mean())
               for k in ks]
    return precision, average


# --- Embedding map -------------------------------------------------------------------------------------------------


def tsne_map(
    *, embeddings: torch.Tensor, targets: torch.Tensor, num_labels: int, seed: int = 0, perplexity: float = 30.0
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE coordinates of the images and of their class means, fitted together so they share one map.

    Vectors are L2-normalised first: Euclidean distance between unit vectors orders pairs exactly as cosine
    similarity does, which is what the classifier uses. Rows of ``mean_coords`` for classes without images are NaN.
    """
    points = F.normalize(embeddings.float(), dim=1).numpy()
    class_mean = prototypes.ClassMeanClassifier(normalize=True).fit(points, targets.numpy())
    present = class_mean.classes_
    stacked = np.concatenate([points, prototypes.unit_rows(class_mean.class_means_)])
    tsne = TSNE(
        n_components=2, perplexity=min(perplexity, len(stacked) - 1.0), init="pca", random_state=seed
    )
    coords = tsne.fit_transform(stacked)
    mean_coords = np.full((num_labels, 2), np.nan)
    mean_coords[present] = coords[len(points):]
    return coords[: len(points)], mean_coords


# --- Per-class accuracy --------------------------------------------------------------------------------------------


def class_accuracy_matrix(
    *, targets_per_run: Sequence[Sequence[int]], predictions_per_run: Sequence[Sequence[int]], num_labels: int
) -> np.ndarray:
    """Per-class accuracy of every partition, ``[runs, num_labels]``; NaN where a class had no validation image."""
    return np.stack(
        [
            cumacc.class_accuracies(targets=np.asarray(t), predictions=np.asarray(p), num_labels=num_labels)
            for t, p in zip(targets_per_run, predictions_per_run, strict=True)
        ]
    )


def per_class_accuracy(
    *,
    targets_per_run: Sequence[Sequence[int]],
    predictions_per_run: Sequence[Sequence[int]],
    labels: Sequence[str],
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Mean accuracy of each class over partitions with a Student-t interval.

    A class has ~6-12 validation images per partition, so its accuracy from one partition moves in steps of
    8-17 %; the interval says whether a class is really weak or just had an unlucky draw. ``n`` counts the
    partitions in which the class had validation images; with ``n < 2`` the interval is NaN.
    """
    accuracies = class_accuracy_matrix(
        targets_per_run=targets_per_run, predictions_per_run=predictions_per_run, num_labels=len(labels)
    )
    rows = []
    for label, column in zip(labels, accuracies.T):
        values = column[~np.isnan(column)]
        if len(values) == 0:
            rows.append({"label": label, "mean": np.nan, "half_width": np.nan, "n": 0})
            continue
        interval = metrics.mean_confidence_interval(values, confidence=confidence)
        rows.append({"label": label, "mean": interval.mean, "half_width": interval.half_width, "n": interval.n})
    table = utils.table(rows, columns=["label", "mean", "half_width", "n"])
    table.insert(3, "low", table["mean"] - table["half_width"])
    table.insert(4, "high", table["mean"] + table["half_width"])
    return table


def smallest_margins(
    *,
    runs: Iterable[Any],
    labels: Sequence[str],
    sample_names: Sequence[str] | None = None,
    count: int = 10,
) -> pd.DataFrame:
    """The validation samples nearest a decision boundary: smallest best-minus-second-best class score.

    These are the "hard samples" worth a look (a mislabelled image, a look-alike class, a second object in the
    frame). Every partition's margins are pooled and each sample is listed once, at its smallest margin, with the
    partition that gave it; ``sample_names`` (paths or texts, in global order) name them.
    """
    frame = pd.DataFrame(
        [
            {"index": index, "target": target, "predicted": predicted, "margin": margin, "partition": run.run}
            for run in runs
            for index, target, predicted, margin in zip(run.valid_indexes, run.targets, run.predictions, run.margins)
        ],
        columns=["index", "target", "predicted", "margin", "partition"],
    ).dropna(subset=["margin"])
    frame = frame.sort_values(["margin", "partition"], kind="stable").drop_duplicates("index").head(count)
    return utils.table({
        "sample": [sample_names[i] if sample_names is not None else str(i) for i in frame["index"]],
        "target": [labels[i] for i in frame["target"]],
        "predicted": [labels[i] for i in frame["predicted"]],
        "margin": frame["margin"].to_numpy(dtype=np.float64),
        "partition": frame["partition"].to_numpy(dtype=np.int64),
    })


def cumulative_accuracy_band(
    *,
    targets_per_run: Sequence[Sequence[int]],
    predictions_per_run: Sequence[Sequence[int]],
    num_labels: int,
    num_intervals: int = 10,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The cumulative accuracy function of each partition, averaged point by point with a Student-t band.

    The article draws the CAF of one partition; the mean curve with its band shows how much of its shape is
    partition noise. Columns ``share, mean, half_width, low, high`` feed ``visual.draw_cumulative_accuracy``.
    """
    accuracies = class_accuracy_matrix(
        targets_per_run=targets_per_run, predictions_per_run=predictions_per_run, num_labels=num_labels
    )
    curves, shares = zip(
        *(cumacc.cumulative_accuracy(accuracies=row, num_intervals=num_intervals) for row in accuracies)
    )
    intervals = [metrics.mean_confidence_interval(point, confidence=confidence) for point in np.stack(curves).T]
    table = pd.DataFrame(
        {
            "share": shares[0],
            "mean": [i.mean for i in intervals],
            "half_width": [i.half_width for i in intervals],
        }
    )
    table["low"] = table["mean"] - table["half_width"]
    table["high"] = table["mean"] + table["half_width"]
    return table


def least_accurate_with_interval(*, per_class: pd.DataFrame, threshold: float = 0.8) -> pd.DataFrame:
    """Classes whose accuracy may be at or below ``threshold``, weakest first.

    Unlike a list cut at the mean, a class enters when its interval reaches the threshold (its mean when there is
    no interval); ``confidently_below`` marks those whose whole interval lies below it.
    """
    lower = per_class["low"].fillna(per_class["mean"])
    upper = per_class["high"].fillna(per_class["mean"])
    table = per_class.loc[lower <= threshold, ["label", "mean", "low", "high", "n"]].copy()
    table["confidently_below"] = upper[table.index] < threshold
    return table.sort_values("mean", kind="stable").reset_index(drop=True)


# --- Prototype variants --------------------------------------------------------------------------------------------


def default_prototype_methods() -> dict[str, Any]:
    """The classifiers compared by default (unfitted; each partition fits a fresh copy), the article's first."""
    return {
        "class mean (raw, original)": prototypes.ClassMeanClassifier(),
        "class mean (L2-normalised)": prototypes.ClassMeanClassifier(normalize=True),
        "decorrelated prototypes": prototypes.DecorrelatedClassifier(),
        "decorrelated, balanced prior": registry.make_estimator("balanced"),
        "1-NN images": baselines.NearestNeighbourClassifier(k=1),
        "5-NN images": baselines.NearestNeighbourClassifier(k=5),
        "k-means, 2 per class": baselines.KMeansPrototypeClassifier(prototypes_per_class=2),
        "k-means, 3 per class": baselines.KMeansPrototypeClassifier(prototypes_per_class=3),
        "linear probe": baselines.linear_probe(),
    }


def compare_prototypes(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    partitions: Sequence[Partition],
    top_k: int = 4,
    confidence: float = 0.95,
    methods: Mapping[str, Any] | Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Accuracy, balanced accuracy and top-k accuracy (mean and Student-t half width) of each classifier on the
    same partitions.

    ``methods`` maps names to unfitted scikit-learn classifiers, or lists command-line names
    (``registry.ESTIMATOR_NAMES``: the class-vector classifiers and the baselines). Identical partitions pair the
    results: ``gain`` is the mean per-partition accuracy difference to the first method (the original class mean
    by default) with its own half width ``gain_ci``, far narrower than the spread of either method, so small real
    differences show; ``error_reduction`` is ``gain`` over the first method's error rate. ``seconds`` is the mean
    fit-plus-predict time per partition. Every method with a ``device`` parameter computes on ``device``
    (:func:`registry.make_estimator`), torch's work alone with BLAS at one thread (:func:`utils.torch_pool_only`).
    """
    methods = default_prototype_methods() if methods is None else methods
    named = methods.items() if isinstance(methods, Mapping) else zip(methods, methods)
    methods = {name: registry.make_estimator(method, device=device) for name, method in named}
    if not methods:
        raise ValueError("methods is empty: give at least one classifier to compare (or None for the defaults).")
    X, y = embeddings.float().numpy(), targets.numpy()
    rows, baseline = [], None
    for name, method in tqdm(methods.items(), desc="[Prototypes] Methods", leave=False):
        scores, seconds = _scores_over_partitions(method, X=X, y=y, partitions=partitions, top_k=top_k)
        baseline = scores["accuracy"] if baseline is None else baseline
        accuracy, balanced, topk = (metrics.mean_confidence_interval(scores[metric], confidence=confidence)
                                    for metric in ("accuracy", "balanced_accuracy", "topk_accuracy"))
        gain = metrics.paired_difference(scores["accuracy"], baseline, confidence=confidence)
        baseline_error = 1.0 - float(np.mean(baseline))
        rows.append({
            "method": name, "accuracy": accuracy.mean, "accuracy_ci": accuracy.half_width,
            "balanced_accuracy": balanced.mean, "balanced_ci": balanced.half_width, "topk_accuracy": topk.mean,
            "topk_ci": topk.half_width, "gain": gain.mean, "gain_ci": gain.half_width,
            "error_reduction": gain.mean / baseline_error if baseline_error > 0 else float("nan"),
            "seconds": float(np.mean(seconds)),
        })
    return pd.DataFrame(rows)


def _scores_over_partitions(
    method: Any, *, X: np.ndarray, y: np.ndarray, partitions: Sequence[Partition], top_k: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Accuracy, balanced and top-k accuracy of ``method`` fitted on each partition, and each fit's seconds."""
    scores: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "topk_accuracy": []}
    seconds = []
    for train_indexes, valid_indexes in partitions:
        started = time.perf_counter()
        with utils.torch_pool_only(active=baselines.works_in_torch(method)):
            _, _, ranked = prototypes.fit_and_rank(method, train=(X[train_indexes], y[train_indexes]),
                                                   queries=X[valid_indexes], top_k=top_k)
        seconds.append(time.perf_counter() - started)
        scored = metrics.score_predictions(targets=y[valid_indexes], topk_predictions=ranked)
        for metric, values in scores.items():
            values.append(scored[metric])
    return scores, seconds


# --- Confidence interval calibration -------------------------------------------------------------------------------


def random_partitions(
    *, targets: torch.Tensor, valid_share: float, runs: int, generator: torch.Generator
) -> Iterator[Partition]:
    """``runs`` random (train, valid) splits by ``datasets.split_class_members`` with no test part.

    For a dataset's own label tensor the same generator state gives the same partitions as
    ``DatasetMaker.split_indexes``, without needing the dataset on disk.
    """
    classes = [torch.nonzero(targets == label).flatten() for label in torch.unique(targets)]
    for _ in range(runs):
        train, valid, _ = datasets.split_class_members(
            class_members=classes, valid_share=valid_share, test_share=0.0, generator=generator
        )
        yield train, valid


def _leave_out_accuracies(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    valid_sets: Iterable[torch.Tensor],
    device: torch.device = CPU,
) -> list[float]:
    """Top-1 accuracy of the article's class mean for many validation sets, training on the rest.

    The classifier is fitted once on every image; each partition's class sums are those minus the sums of its
    validation images (exact, the statistics are additive), scored in float32 torch: two thousand partitions of
    Caltech-101 take half a minute instead of two of per-partition estimator copies; on ``device``.
    """
    everything = prototypes.ClassMeanClassifier().fit(embeddings.float().numpy(), targets.numpy())
    class_sums = torch.from_numpy(everything.class_sums_).float().to(device)
    rows = torch.from_numpy(np.searchsorted(everything.classes_, targets.numpy())).to(device)
    features = embeddings.float().to(device)
    accuracies = []
    for valid_indexes in valid_sets:
        valid_indexes = valid_indexes.to(device)
        queries, query_rows = features[valid_indexes], rows[valid_indexes]
        train_sums = class_sums.index_add(0, query_rows, queries, alpha=-1.0)  # a class's mean points along its sum
        _, best = prototypes.cosine_top_k(queries=queries, corpus=train_sums, top_k=1)
        accuracies.append(float((best[:, 0] == query_rows).double().mean()))
    return accuracies


def ci_coverage(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    valid_share: float = 0.2,
    reference_runs: int = 1000,
    sample_runs: int = 20,
    trials: int = 50,
    confidence: float = 0.95,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """How often a Student-t interval from ``sample_runs`` partitions covers the mean accuracy of many partitions.

    The article assumes the accuracy over random partitions is close enough to normal for a t interval; if that
    holds, ``coverage`` is near ``confidence``. The reference is the mean of ``reference_runs`` partitions (its own
    interval is reported, it should be far narrower than the sampled ones), and each of ``trials`` disjoint groups
    of fresh partitions gives one interval. ``coverage_std_error`` is the binomial error of the coverage estimate.
    It needs ``reference_runs + trials * sample_runs`` partitions of the fast class-mean path, scored in torch on
    ``device`` (None: the CPU).
    """
    if sample_runs < 2:
        raise ValueError(f"sample_runs must be at least 2 to form an interval, got {sample_runs}.")
    generator = torch.Generator().manual_seed(seed)
    total = reference_runs + trials * sample_runs
    partitions = random_partitions(targets=targets, valid_share=valid_share, runs=total, generator=generator)
    valid_sets = (valid for _, valid in partitions)
    accuracies = _leave_out_accuracies(
        embeddings=embeddings,
        targets=targets,
        valid_sets=tqdm(valid_sets, total=total, desc="[CI coverage] Partitions", leave=False),
        device=prototypes.torch_device(device),
    )
    reference = metrics.mean_confidence_interval(accuracies[:reference_runs], confidence=confidence)
    groups = np.asarray(accuracies[reference_runs:]).reshape(trials, sample_runs)
    intervals = [metrics.mean_confidence_interval(group, confidence=confidence) for group in groups]
    covered = sum(abs(i.mean - reference.mean) <= i.half_width for i in intervals)
    coverage = covered / trials
    return {
        "reference_mean": reference.mean,
        "reference_half_width": reference.half_width,
        "reference_runs": reference_runs,
        "sample_runs": sample_runs,
        "trials": trials,
        "covered": covered,
        "coverage": coverage,
        "coverage_std_error": float(np.sqrt(coverage * (1 - coverage) / trials)),
        "confidence": confidence,
        "mean_half_width": float(np.mean([i.half_width for i in intervals])),
    }


# --- Queries of no known class ---------------------------------------------------------------------------------------


def open_set_scores(
    *, known: np.ndarray, unknown: np.ndarray, true_positive_rate: float = 0.95
) -> dict[str, float]:
    """How well a score (higher = known) separates known-class from unknown-class queries.

    ``auroc``: the chance that a random known query outscores a random unknown one; ``fpr``: the share of unknown
    queries kept at the threshold that keeps ``true_positive_rate`` of the known ones (OpenOOD's FPR@95), with that
    ``threshold`` (the rule of :meth:`prototypes._LinearClassVectors.calibrate`).
    """
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        raise ValueError(f"Need known and unknown queries, got {len(known)} and {len(unknown)}.")
    threshold = float(np.quantile(known, 1.0 - true_positive_rate, method="lower"))
    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return {
        "auroc": float(roc_auc_score(truth, np.r_[known, unknown])),
        "fpr": float(np.mean(unknown >= threshold)),
        "threshold": threshold,
    }


def hidden_class_draws(
    *,
    targets: np.ndarray,
    partitions: Sequence[Partition],
    hidden_share: float,
    seed: int,
    together: Sequence[Sequence[Any]] = (),
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per partition, hide ``hidden_share`` of the classes (at least one, seeded): yields ``(train, known_valid,
    unknown, hidden_labels)`` global indexes, where ``unknown`` is every sample of the hidden classes.

    ``together`` lists groups of labels that name one concept (Caltech-101's ``Faces`` and ``Faces_easy`` show the
    same people): a group is hidden whole or not at all, since a sample of a known concept is no unknown query.
    Groups are drawn as units until ``hidden_share`` of the classes is reached, so a draw may hide a class more.
    """
    labels = np.unique(targets)
    count = min(max(1, round(hidden_share * len(labels))), len(labels) - 2)
    if count < 1:
        raise ValueError(f"Hiding classes needs at least 3 classes, got {len(labels)}.")
    units = _hiding_units(labels, together=together)
    for number, (train, valid) in enumerate(partitions):
        rng = np.random.default_rng(seed + number)
        if together:
            hidden = np.concatenate(list(_first_units(units, order=rng.permutation(len(units)), count=count)))
        else:
            hidden = rng.choice(labels, size=count, replace=False)
        train, valid = np.asarray(train), np.asarray(valid)
        yield (train[~np.isin(targets[train], hidden)], valid[~np.isin(targets[valid], hidden)],
               np.flatnonzero(np.isin(targets, hidden)), hidden)


def _hiding_units(labels: np.ndarray, *, together: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """The classes as units to hide: each group of ``together`` one unit, every other class its own."""
    grouped = [np.asarray(group) for group in together]
    members = np.concatenate(grouped) if grouped else np.zeros(0, labels.dtype)
    strangers = np.setdiff1d(members, labels)
    if len(strangers):
        raise ValueError(f"Classes {strangers.tolist()} to hide together are not among the labels.")
    if len(np.unique(members)) != len(members):
        raise ValueError("A class appears in two groups to hide together; merge those groups.")
    return grouped + [np.asarray([label]) for label in np.setdiff1d(labels, members)]


def _first_units(units: Sequence[np.ndarray], *, order: np.ndarray, count: int) -> Iterator[np.ndarray]:
    """Units in ``order`` until ``count`` classes are reached, leaving at least two classes known."""
    hidden, total = 0, sum(len(unit) for unit in units)
    for index in order:
        if hidden >= count:
            return
        if total - hidden - len(units[index]) >= 2:
            hidden += len(units[index])
            yield units[index]


def open_set(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    partitions: Sequence[Partition],
    classifier: Any,
    hidden_share: float = 0.2,
    true_positive_rate: float = 0.95,
    confidence: float = 0.95,
    seed: int = 0,
    together: Sequence[Sequence[Any]] = (),
    device: str | torch.device | None = None,
) -> tuple[pd.DataFrame, dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Queries of no known class: per partition, ``hidden_share`` of the classes are hidden, ``classifier`` is fitted
    on the other classes' training part, and its ``score_samples`` must tell their validation samples from every
    sample of the hidden classes.

    Returns the per-partition table (AUROC, FPR at ``true_positive_rate``, the known classes' accuracy, and their
    accuracy among the samples kept at the threshold, which is set on those same known samples), its summary with
    Student-t intervals, and the last partition's known and unknown scores (for a histogram). ``together``: groups
    of labels hidden as one (see :func:`hidden_class_draws`). ``device``: where the classifier computes, as in
    :func:`compare_prototypes`.
    """
    X, y = embeddings.double().numpy(), targets.numpy()
    working = registry.make_estimator(classifier, device=device)
    rows, scores = [], (np.zeros(0), np.zeros(0))
    draws = hidden_class_draws(targets=y, partitions=partitions, hidden_share=hidden_share, seed=seed,
                               together=together)
    for number, (train, known, unknown, hidden) in enumerate(tqdm(draws, total=len(partitions), leave=False,
                                                                  desc="[Open set] Partitions")):
        with utils.torch_pool_only(active=baselines.works_in_torch(working)):
            fitted = sklearn.base.clone(working).fit(X[train], y[train])
            both = fitted.score_samples(X[np.r_[known, unknown]])
        scores = both[: len(known)], both[len(known):]
        separation = open_set_scores(known=scores[0], unknown=scores[1], true_positive_rate=true_positive_rate)
        correct = fitted.predict(X[known]) == y[known]
        kept = scores[0] >= separation["threshold"]
        rows.append({
            "partition": number, "hidden_classes": len(hidden), "known_samples": len(known),
            "unknown_samples": len(unknown), "auroc": separation["auroc"], "fpr": separation["fpr"],
            "known_accuracy": float(correct.mean()), "kept_accuracy": float(correct[kept].mean()),
            "threshold": separation["threshold"],
        })
    table = pd.DataFrame(rows)
    summary: dict[str, Any] = {"true_positive_rate": true_positive_rate, "hidden_share": hidden_share,
                               "classifier": repr(classifier)}
    for name in ("auroc", "fpr", "known_accuracy", "kept_accuracy"):
        interval = metrics.mean_confidence_interval(table[name], confidence=confidence)
        summary[name], summary[f"{name}_ci"] = interval.mean, interval.half_width
    return table, summary, scores


# --- Everything at once, for the research script ---------------------------------------------------------------------


def reliability_over_partitions(
    *, embeddings: torch.Tensor, targets: torch.Tensor, partitions: Sequence[Partition], classifier: Any,
    device: str | torch.device | None = None,
) -> probabilities.Reliability:
    """The run's classifier refitted on every partition's training part, its validation probabilities pooled into
    the reliability diagram's bins (:func:`probabilities.reliability`): confidence against accuracy."""
    X, y = embeddings.double().numpy(), targets.numpy()
    confidence, right = [], []
    for train, valid in tqdm(partitions, desc="[Reliability] Partitions", leave=False):
        fitted = registry.make_estimator(classifier, device=device).fit(X[train.numpy()], y[train.numpy()])
        top, hit = probabilities.top_confidence(
            *prototypes.labelled_probabilities(fitted, X[valid.numpy()], y[valid.numpy()]))
        confidence.append(top)
        right.append(hit)
    return probabilities.reliability(np.concatenate(confidence), np.concatenate(right))


ANALYSIS_PARTS = ("confusion", "retrieval", "prototypes", "tsne", "coverage", "openset", "reliability")


@dataclasses.dataclass(frozen=True)
class RunAnalysis:
    """The analyses of one experiment's partitions (``analyse_runs``); a part not asked for stays None.

    ``confusion`` brings the confusion matrix, the most confused pairs, the per-class intervals, the least
    accurate classes, the CAF band and the samples with the smallest margins (all from the stored predictions);
    the other parts hold one result each.
    ``tables`` names the CSV-ready ones.
    """

    confusion: np.ndarray | None = None
    confused_pairs: pd.DataFrame | None = None
    per_class: pd.DataFrame | None = None
    weak_classes: pd.DataFrame | None = None
    band: pd.DataFrame | None = None
    hard_samples: pd.DataFrame | None = None
    retrieval: pd.DataFrame | None = None
    prototypes: pd.DataFrame | None = None
    tsne_coords: np.ndarray | None = None
    tsne_targets: np.ndarray | None = None
    tsne_means: np.ndarray | None = None
    coverage: dict[str, float | int] | None = None
    openset: pd.DataFrame | None = None
    openset_summary: dict[str, Any] | None = None
    openset_scores: tuple[np.ndarray, np.ndarray] | None = None
    reliability: probabilities.Reliability | None = None

    def tables(self) -> dict[str, pd.DataFrame]:
        tables = {
            "confused_pairs": self.confused_pairs,
            "class_accuracy_intervals": self.per_class,
            "least_accurate_intervals": self.weak_classes,
            "smallest_margins": self.hard_samples,
            "retrieval": self.retrieval,
            "prototypes": self.prototypes,
            "openset": self.openset,
            "reliability": None if self.reliability is None else pd.DataFrame({
                "low": self.reliability.edges[:-1], "high": self.reliability.edges[1:],
                "samples": self.reliability.counts, "confidence": self.reliability.confidence,
                "accuracy": self.reliability.accuracy}),
        }
        return {name: table for name, table in tables.items() if table is not None}


def check_analysis_parts(parts: Iterable[str]) -> tuple[str, ...]:
    """``parts`` in the canonical order, or a clear error naming the unknown ones."""
    parts = tuple(parts)
    unknown = sorted(set(parts) - set(ANALYSIS_PARTS))
    if unknown or not parts:
        raise ValueError(
            f"Unknown analysis part(s) {', '.join(unknown) or '(none given)'}; choose among "
            f"{', '.join(ANALYSIS_PARTS)}."
        )
    return tuple(part for part in ANALYSIS_PARTS if part in parts)


def _confusion_results(
    runs: Any, *, labels: Sequence[str], confidence: float, threshold: float, num_intervals: int,
    sample_names: Sequence[str] | None,
) -> dict[str, Any]:
    """The ``confusion`` part: the pooled confusion matrix and its pairs, per-class intervals, the weak classes,
    the CAF band and the samples with the smallest margins."""
    per_run = dict(targets_per_run=runs.targets_per_run, predictions_per_run=runs.predictions_per_run)
    confusion = confusion_over_partitions(**per_run, num_labels=len(labels))
    per_class = per_class_accuracy(**per_run, labels=labels, confidence=confidence)
    return dict(
        confusion=confusion, confused_pairs=most_confused_pairs(confusion=confusion, labels=labels),
        per_class=per_class, weak_classes=least_accurate_with_interval(per_class=per_class, threshold=threshold),
        band=cumulative_accuracy_band(**per_run, num_labels=len(labels), num_intervals=num_intervals,
                                      confidence=confidence),
        hard_samples=smallest_margins(runs=runs.runs, labels=labels, sample_names=sample_names),
    )


def analyse_runs(
    *,
    runs: Any,
    labels: Sequence[str],
    valid_share: float,
    confidence: float = 0.95,
    seed: int = 0,
    num_intervals: int = 20,
    threshold: float = 0.8,
    parts: Iterable[str] = ANALYSIS_PARTS,
    sample_names: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> RunAnalysis:
    """The chosen analyses (``ANALYSIS_PARTS``) of a cached-protocol experiment (``protocol.Runs`` with
    embeddings), on its own partitions, under one progress bar over the parts; ``sample_names`` (paths or texts in
    global order) name the samples with the smallest margins; ``methods`` names the classifiers the ``prototypes``
    part compares (default: :func:`default_prototype_methods`); ``device`` is where the searches and the classifiers
    compute (the run's device: ``"cuda"`` puts the probe, the decorrelated fits, neighbours, retrieval and the
    coverage check on the GPU; None: the CPU), torch's work alone with BLAS at one thread
    (:func:`utils.torch_pool_only`)."""
    embeddings, targets, partitions = runs.embeddings, runs.targets, runs.partitions
    last_valid = partitions[-1][1]
    results: dict[str, Any] = {}
    progress = tqdm(check_analysis_parts(parts), desc="[Analysis]", unit="part")
    for part in progress:
        progress.set_postfix_str(part)
        if part == "confusion":
            results.update(_confusion_results(runs, labels=labels, confidence=confidence, threshold=threshold,
                                              num_intervals=num_intervals, sample_names=sample_names))
        elif part == "retrieval":
            with utils.torch_pool_only():
                results["retrieval"] = retrieval_precision(
                    embeddings=embeddings, targets=targets, partitions=partitions, confidence=confidence, device=device
                )
        elif part == "prototypes":
            results["prototypes"] = compare_prototypes(
                embeddings=embeddings, targets=targets, partitions=partitions, top_k=runs.top_k, confidence=confidence,
                methods=methods, device=device,
            )
        elif part == "tsne":
            coords, means = tsne_map(
                embeddings=embeddings[last_valid], targets=targets[last_valid], num_labels=len(labels), seed=seed
            )
            results.update(tsne_coords=coords, tsne_targets=targets[last_valid].numpy(), tsne_means=means)
        elif part == "coverage":
            with utils.torch_pool_only():
                results["coverage"] = ci_coverage(
                    embeddings=embeddings, targets=targets, valid_share=valid_share, confidence=confidence, seed=seed,
                    device=device,
                )
        elif part == "reliability":
            if hasattr(runs.classifier, "predict_proba"):
                results["reliability"] = reliability_over_partitions(
                    embeddings=embeddings, targets=targets, partitions=partitions, classifier=runs.classifier,
                    device=device)
            else:
                warnings.warn("--analysis reliability needs a classifier with probabilities; skipped.", stacklevel=2)
        elif len(labels) < 3:
            warnings.warn("--analysis openset hides some classes and needs at least 3; skipped.", stacklevel=2)
        else:
            table, summary, scores = open_set(
                embeddings=embeddings, targets=targets, partitions=partitions, classifier=runs.classifier,
                confidence=confidence, seed=seed, device=device,
            )
            results.update(openset=table, openset_summary=summary, openset_scores=scores)
    return RunAnalysis(**results)
