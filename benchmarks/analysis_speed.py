"""``--analysis`` part by part on cached embeddings, each beside the implementation it replaced, in one run.

Baselines, timed on the same partitions: scikit-learn's ``LogisticRegression`` (the probe before), scikit-learn's
``KMeans`` per class (k-means prototypes before), and an estimator copy per partition for the interval-coverage
check (extrapolated from ``--coverage-sample`` partitions to the check's 2,000). Then a floor: the matrix
products and eigendecompositions the same figures need on this CPU, at its measured product rate, each counted
once (:func:`product_floor`). Then the whole ``analysis.analyse_runs`` as the script calls it, part by part, with
its total (target: at most 60 s on Caltech-101, 20 partitions) beside the floor plus the measured t-SNE::

    python -m benchmarks.analysis_speed --embeddings .cache/embeddings-<key>.pt --runs 20
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from simsearch import analysis
from simsearch.classifiers import (
    baselines,
    prototypes,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", required=True, help="an embedding cache file (store.EmbeddingCache, .pt)")
    parser.add_argument("--runs", type=int, default=20, help="partitions, as the script's --runs")
    parser.add_argument("--baseline-runs", type=int, default=2, help="partitions timed for the slow baselines")
    parser.add_argument("--coverage-sample", type=int, default=40, help="partitions timed for the old coverage")
    return parser.parse_args(argv)


def seconds_per_partition(method, X: np.ndarray, y: np.ndarray, partitions) -> tuple[float, float]:
    """Mean fit + predict seconds and accuracy of ``method`` (refitted per partition)."""
    spent, accuracies = [], []
    for train, valid in partitions:
        started = time.perf_counter()
        fitted = method().fit(X[train], y[train])
        accuracies.append(float(np.mean(fitted.predict(X[valid]) == y[valid])))
        spent.append(time.perf_counter() - started)
    return float(np.mean(spent)), float(np.mean(accuracies))


class SklearnKMeansPrototypes:
    """The k-means prototypes as they were: scikit-learn ``KMeans`` per class, best centre per class."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, X, y):
        unit = prototypes.unit_rows(X.astype(np.float64))
        self.classes_ = np.unique(y)
        centres, owners = [], []
        for row, label in enumerate(self.classes_):
            members = unit[y == label]
            if len(members) > self.k:
                members = KMeans(n_clusters=self.k, random_state=0, n_init=1).fit(members).cluster_centers_
            centres.append(members)
            owners += [row] * len(members)
        self.centres_, self.owners_ = prototypes.unit_rows(np.concatenate(centres)), np.asarray(owners)
        return self

    def predict(self, X):
        similarity = prototypes.unit_rows(X.astype(np.float64)) @ self.centres_.T
        best = np.full((len(X), len(self.classes_)), -np.inf)
        np.maximum.at(best.T, self.owners_, similarity.T)
        return self.classes_[best.argmax(axis=1)]


def old_coverage_seconds(X: torch.Tensor, y: torch.Tensor, valid_sets) -> float:
    """Seconds per partition of the former path: copy the all-image class mean, subtract, predict (float64)."""
    everything = prototypes.ClassMeanClassifier().fit(X.double().numpy(), y.numpy())
    started = time.perf_counter()
    for valid in valid_sets:
        queries, targets = X[valid].double().numpy(), y[valid].numpy()
        copy.deepcopy(everything).remove_samples(queries, targets).predict(queries)
    return (time.perf_counter() - started) / len(valid_sets)


def product_floor(X: np.ndarray, y: np.ndarray, partitions, *, coverage_runs: int = 2000) -> float:
    """Print, and return in seconds, the least time the matrix products and eigendecompositions behind the
    figures of ``--analysis`` need on this CPU, each counted once where classifiers could share it.

    The rate is the best of ten of the probe's own float32 products (``n x d`` by ``d x C``, torch); the
    eigendecomposition's time is the best of three. Per partition: the probe's two products per L-BFGS iteration
    (its iteration count from the first partition); for both decorrelated priors together one Gram matrix
    (``n d^2``, symmetric), one eigendecomposition, one projection of the training images onto the eigenvectors
    and one ``n x d`` by ``d x C`` product per leave-one-out candidate (the priors' products differ by a column
    scale, so they could be shared); one validation-by-training similarity shared by 1-NN, 5-NN and retrieval.
    Then ``coverage_runs`` validation-by-class products of the coverage check. Nothing else (k-means, t-SNE,
    element-wise work) is counted: a lower bound."""
    train, valid = partitions[0]
    fitted = baselines.linear_probe().fit(X[train], y[train])
    features = torch.from_numpy(prototypes.unit_rows(X[train]))
    n, d, c, q = features.shape[0], features.shape[1], len(fitted.classes_), len(valid)
    weights = torch.zeros(c, d)
    gradient = torch.zeros(n, c)
    products = []
    for _ in range(10):
        started = time.perf_counter()
        features @ weights.T
        gradient.T @ features
        products.append(time.perf_counter() - started)
    rate = 4 * n * d * c / min(products)  # the best of ten: a floor, not a typical time
    covariance = np.cov(X[train].T.astype(np.float64))
    eigh = []
    for _ in range(3):
        started = time.perf_counter()
        np.linalg.eigh(covariance)
        eigh.append(time.perf_counter() - started)
    candidates = len(prototypes.RELATIVE_ALPHAS) + 1
    per_partition = {
        "probe products": fitted.n_iter_ * 4 * n * d * c / rate,
        "decorrelated: Gram, projection": (n * d * d + 2 * n * d * d) / rate,
        "decorrelated: eigendecomposition": min(eigh),
        "decorrelated: leave-one-out": candidates * 2 * n * d * c / rate,
        "neighbours, retrieval": 2 * q * n * d / rate,
    }
    runs = len(partitions)
    print(f"product floor at {rate / 1e9:.0f} GFLOP/s (float32, {n} x {d} by {d} x {c}); probe: "
          f"{fitted.n_iter_} L-BFGS iterations")
    for name, seconds in per_partition.items():
        print(f"  {name:34s} {seconds:6.3f} s per partition, {seconds * runs:6.1f} s for {runs}")
    coverage = coverage_runs * 2 * q * d * c / rate
    print(f"  {'coverage products':34s} {coverage:6.1f} s for {coverage_runs} partitions")
    floor = sum(per_partition.values()) * runs + coverage
    print(f"  {'floor':34s} {floor:6.1f} s")
    return floor


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    state = torch.load(args.embeddings, map_location="cpu", weights_only=True)
    X, y = state["embeddings"], state["targets"]
    partitions = list(analysis.random_partitions(targets=y, valid_share=0.2, runs=args.runs,
                                                 generator=torch.Generator().manual_seed(17)))
    Xn, yn = X.numpy(), y.numpy()
    sample = partitions[: args.baseline_runs]
    print(f"{len(X)} samples x {X.shape[1]} dims, {len(torch.unique(y))} classes; baselines on {len(sample)} "
          f"partitions, seconds per partition")
    pairs = [
        ("linear probe", lambda: make_pipeline(Normalizer(), LogisticRegression(max_iter=1000)),
         lambda: baselines.linear_probe()),
        ("k-means, 2 per class", lambda: SklearnKMeansPrototypes(2),
         lambda: baselines.KMeansPrototypeClassifier(prototypes_per_class=2)),
    ]
    for name, before, now in pairs:
        old_seconds, old_accuracy = seconds_per_partition(before, Xn, yn, sample)
        new_seconds, new_accuracy = seconds_per_partition(now, Xn, yn, sample)
        print(f"{name:22s} before {old_seconds:6.2f} s (accuracy {old_accuracy:.4f})  now {new_seconds:6.2f} s "
              f"(accuracy {new_accuracy:.4f})  speed-up {old_seconds / new_seconds:5.1f}x")
    floor = product_floor(Xn, yn, partitions)
    valid_sets = [valid for _, valid in partitions] * (args.coverage_sample // len(partitions) + 1)
    valid_sets = valid_sets[: args.coverage_sample]
    old = old_coverage_seconds(X, y, valid_sets) * 2000
    started = time.perf_counter()
    analysis._leave_out_accuracies(embeddings=X, targets=y, valid_sets=valid_sets)
    new = (time.perf_counter() - started) / len(valid_sets) * 2000
    print(f"{'coverage, 2000 parts':22s} before {old:6.1f} s  now {new:6.1f} s  speed-up {old / new:5.1f}x "
          "(extrapolated)")
    records = []
    for number, (train, valid) in enumerate(partitions):
        scores, ranked = prototypes.ranked_scores(prototypes.ClassMeanClassifier().fit(Xn[train], yn[train]),
                                                  Xn[valid], 2)
        records.append(SimpleNamespace(run=number, valid_indexes=valid.tolist(), targets=y[valid].tolist(),
                                       predictions=ranked[:, 0].tolist(), margins=prototypes.margins(scores)))
    runs = SimpleNamespace(
        embeddings=X, targets=y, partitions=partitions, top_k=4, runs=records,
        classifier=prototypes.ClassMeanClassifier(),
        targets_per_run=[record.targets for record in records],
        predictions_per_run=[record.predictions for record in records],
    )
    labels = [str(label) for label in range(int(y.max()) + 1)]
    spent = {}
    for part in analysis.ANALYSIS_PARTS:
        started = time.perf_counter()
        analysis.analyse_runs(runs=runs, labels=labels, valid_share=0.2, parts=[part])
        spent[part] = time.perf_counter() - started
        print(f"--analysis {part:12s} {spent[part]:7.1f} s")
    total = sum(spent.values())
    print(f"--analysis, all parts  {total:7.1f} s over {len(partitions)} partitions (target <= 60 s)")
    print(f"floor of the same figures: products {floor:.1f} s + t-SNE as measured {spent['tsne']:.1f} s = "
          f"{floor + spent['tsne']:.1f} s; measured / floor {total / (floor + spent['tsne']):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
