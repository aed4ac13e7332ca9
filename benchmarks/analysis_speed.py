"""``--analysis`` part by part on cached embeddings, each beside the implementation it replaced, in one run.

Baselines, timed on the same partitions: scikit-learn's ``LogisticRegression`` (the probe before), scikit-learn's
``KMeans`` per class (k-means prototypes before), and an estimator copy per partition for the interval-coverage
check (extrapolated from ``--coverage-sample`` partitions to the check's 2,000). The probe's matrix products
alone set a floor under its time on a given CPU, printed beside it. Then the whole
``analysis.analyse_runs`` as the script calls it, with its total (target: at most 60 s on Caltech-101, 20
partitions)::

    python benchmarks/analysis_speed.py --embeddings .cache/embeddings-<key>.pt --runs 20
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import analysis  # noqa: E402
import baselines  # noqa: E402
import prototypes  # noqa: E402


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


def probe_product_floor(X: np.ndarray, y: np.ndarray, partitions, runs: int) -> None:
    """Print the least time the probe's matrix products alone need: every L-BFGS iteration evaluates the
    objective's gradient, which takes at least two ``n x d`` by ``d x C`` float32 products (torch, as the probe)."""
    train = partitions[0][0]
    fitted = baselines.linear_probe().fit(X[train], y[train])
    features = torch.from_numpy(prototypes.unit_rows(X[train]))
    weights = torch.zeros(len(fitted.classes_), X.shape[1])
    gradient = torch.zeros(len(train), len(fitted.classes_))
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        features @ weights.T
        gradient.T @ features
    products = (time.perf_counter() - started) / repeats
    floor = fitted.n_iter_ * products
    rate = 4 * features.shape[0] * features.shape[1] * weights.shape[0] / products / 1e9
    print(f"{'probe product floor':22s} {fitted.n_iter_} L-BFGS iterations x {products * 1000:.0f} ms of products "
          f"({rate:.0f} GFLOP/s) = {floor:.2f} s per partition, {floor * runs:.1f} s for {runs} partitions")


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
    probe_product_floor(Xn, yn, partitions, runs=len(partitions))
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
    total = 0.0
    for part in analysis.ANALYSIS_PARTS:
        started = time.perf_counter()
        analysis.analyse_runs(runs=runs, labels=labels, valid_share=0.2, parts=[part])
        spent = time.perf_counter() - started
        total += spent
        print(f"--analysis {part:12s} {spent:7.1f} s")
    print(f"--analysis, all parts  {total:7.1f} s over {len(partitions)} partitions (target <= 60 s)")


if __name__ == "__main__":
    main(sys.argv[1:])
