"""A class added with a few examples: how often each classifier finds it, and what it costs the other classes.

Why: the article's promise is that a class can be added without retraining the others, and in a class store
classes arrive a handful of samples at a time. This plays that out on cached embeddings: in each draw, every class
is split 80/20 (``--valid-share``); ``--new-classes`` random classes keep only ``K`` of their training samples,
the others their whole training part; every class's validation part is scored. Each classifier is fitted at once
and, for the decorrelated family, also the store's way (old classes fitted, the new ones added by
``partial_fit``). Every classifier sees identical draws; the table gives the new classes' recall, the old classes'
accuracy and the balanced accuracy (the mean of the per-class accuracies), each with its Student-t interval over
the draws::

    python -m benchmarks.class_addition --dataset ../shared/data/caltech101 --weights FILE --draws 5
    python -m benchmarks.class_addition --dataset ../shared/data/trec/train.csv --label-column coarse,fine

New classes are drawn among those with at least ``max(K)`` training samples, so every K sees the same classes.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable

import numpy as np
import sklearn.base
import torch

from benchmarks.classifiers import add_embedding_arguments, banner, load_embeddings
from simsearch import (
    analysis,
    metrics,
)
from simsearch.classifiers import prototypes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_embedding_arguments(parser)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10], help="training samples per new class")
    parser.add_argument("--new-classes", type=int, default=10, help="classes added with few samples per draw")
    parser.add_argument("--draws", type=int, default=5, help="random draws (partition and new classes)")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--seed", type=int, default=17, help="seed of the draws")
    return parser.parse_args(argv)


def estimators() -> dict[str, tuple[sklearn.base.BaseEstimator, bool]]:
    """Name -> (unfitted estimator, whether the new classes are added by ``partial_fit`` after the old ones)."""
    return {
        "class mean (article)": (prototypes.ClassMeanClassifier(), False),
        "decorrelated, fit at once": (prototypes.make_classifier("decorrelated"), False),
        "decorrelated, new classes by partial_fit": (prototypes.make_classifier("decorrelated"), True),
        "balanced, fit at once": (prototypes.make_classifier("balanced"), False),
        "balanced, new classes by partial_fit": (prototypes.make_classifier("balanced"), True),
        "lda for balanced accuracy, fit at once": (prototypes.make_classifier("lda", select_for="balanced"), False),
        "lda for balanced accuracy, new classes by partial_fit": (
            prototypes.make_classifier("lda", select_for="balanced"), True),
    }


def fit(estimator: sklearn.base.BaseEstimator, *, X: np.ndarray, y: np.ndarray, old: np.ndarray,
        incremental: bool) -> sklearn.base.BaseEstimator:
    fresh = sklearn.base.clone(estimator)
    if not incremental:
        return fresh.fit(X, y)
    return fresh.fit(X[old], y[old]).partial_fit(X[~old], y[~old])


def draw_scores(
    *, X: np.ndarray, y: np.ndarray, shots: list[int], new_count: int, valid_share: float, seed: int,
    progress: Callable[[str], None],
) -> dict[tuple[int, str], dict[str, float]]:
    """Scores of every estimator at every K for one draw: ``{(K, name): {metric: value}}``."""
    generator = torch.Generator().manual_seed(seed)
    train, valid = next(analysis.random_partitions(
        targets=torch.from_numpy(y), valid_share=valid_share, runs=1, generator=generator
    ))
    train, valid = train.numpy(), valid.numpy()
    rng = np.random.default_rng(seed)
    train = rng.permutation(train)  # the first K training samples of a class are a random K
    labels, train_counts = np.unique(y[train], return_counts=True)
    eligible = labels[train_counts >= max(shots)]
    if len(eligible) < new_count:
        raise SystemExit(f"Only {len(eligible)} classes have {max(shots)} training samples; lower --new-classes.")
    new = rng.choice(eligible, size=new_count, replace=False)
    is_new_valid = np.isin(y[valid], new)
    results = {}
    for k in shots:
        rank = np.zeros(len(train), dtype=np.int64)  # position of each training sample within its class
        for label in new:
            members = np.flatnonzero(y[train] == label)
            rank[members] = np.arange(len(members))
        kept = train[~np.isin(y[train], new) | (rank < k)]
        old = ~np.isin(y[kept], new)
        for name, (estimator, incremental) in estimators().items():
            started = time.perf_counter()
            fitted = fit(estimator, X=X[kept], y=y[kept], old=old, incremental=incremental)
            predictions = fitted.predict(X[valid])
            correct = predictions == y[valid]
            results[(k, name)] = {
                "new_recall": float(correct[is_new_valid].mean()),
                "old_accuracy": float(correct[~is_new_valid].mean()),
                "balanced_accuracy": metrics.balanced_accuracy(targets=y[valid], predictions=predictions),
                "seconds": time.perf_counter() - started,
            }
            progress(f"K={k} {name}")
    return results


def print_tables(draws: list[dict[tuple[int, str], dict[str, float]]], *, shots: list[int]) -> None:
    def cell(k: int, name: str, metric: str) -> str:
        return str(metrics.mean_confidence_interval([draw[(k, name)][metric] for draw in draws])).split(" (")[0]

    print("\n| K | classifier | new-class recall | old-class accuracy | balanced accuracy | s / fit |")
    print("|---|---|---|---|---|---|")
    for k in shots:
        for name in estimators():
            seconds = np.mean([draw[(k, name)]["seconds"] for draw in draws])
            print(f"| {k} | {name} | {cell(k, name, 'new_recall')} | {cell(k, name, 'old_accuracy')} | "
                  f"{cell(k, name, 'balanced_accuracy')} | {seconds:.2f} |")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    X, y = embeddings.double().numpy(), targets.numpy()
    print(banner(X, y, settings=f"{args.new_classes} new classes with K in {args.shots} training samples, "
                                f"{args.draws} draws of {args.valid_share:.0%} validation, seed {args.seed}"))
    from tqdm import tqdm

    draws = []
    with tqdm(total=args.draws * len(args.shots) * len(estimators()), desc="[Class addition]") as bar:
        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            bar.update()

        for draw in range(args.draws):
            draws.append(draw_scores(
                X=X, y=y, shots=args.shots, new_count=args.new_classes, valid_share=args.valid_share,
                seed=args.seed + draw, progress=progress,
            ))
    print_tables(draws, shots=args.shots)


if __name__ == "__main__":
    main(sys.argv[1:])
