"""Queries of no known class: every unknown score side by side on identical draws of hidden classes.

Why: a class store is queried with things it has never seen, and every query gets its nearest class however far.
Each draw splits every class 80/20 and hides ``--hidden-share`` of the classes; the estimators fit the other
classes' training part; known = their validation samples, unknown = every sample of the hidden classes. For each
score (higher = known) the table gives the AUROC, the FPR at 95 % TPR (threshold set on the known samples, as
``calibrate`` does) and the known-class accuracy of the classifier behind it, with Student-t intervals over the
draws::

    python benchmarks/open_set.py --embeddings .cache/embeddings-<key>.pt --draws 5
    python benchmarks/open_set.py --dataset ../shared/data/trec/train.csv --label-column coarse --hidden-share 0.17
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analysis  # noqa: E402
import metrics  # noqa: E402
import prototypes  # noqa: E402
from benchmarks.classifiers import add_embedding_arguments, load_embeddings  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_embedding_arguments(parser)
    parser.add_argument("--hidden-share", type=float, default=0.2, help="share of the classes hidden per draw")
    parser.add_argument("--draws", type=int, default=5, help="random draws (partition and hidden classes)")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--seed", type=int, default=17, help="seed of the draws")
    return parser.parse_args(argv)


def nearest_images(train: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """The k-th best cosine to a training sample (KNN in OpenOOD)."""
    corpus = torch.from_numpy(train).float()

    def score(queries: np.ndarray) -> np.ndarray:
        scores, _ = prototypes.cosine_top_k(queries=torch.from_numpy(queries).float(), corpus=corpus, top_k=k)
        return scores[:, -1].double().numpy()

    return score


def draw_scores(X: np.ndarray, y: np.ndarray, *, train, known, unknown) -> dict[str, tuple[dict, float]]:
    """``{score name: (open_set_scores, known-class accuracy of its classifier)}`` for one draw."""
    fitted = {name: prototypes.make_classifier(name).fit(X[train], y[train])
              for name in ("mean", "decorrelated", "balanced")}
    accuracy = {name: float(np.mean(model.predict(X[known]) == y[known])) for name, model in fitted.items()}
    best_score = {name: (lambda Q, model=model: model.class_scores(Q).max(axis=1)) for name, model in fitted.items()}
    scores = {
        "class mean, best cosine (mean's score_samples)": (fitted["mean"].score_samples, "mean"),
        "decorrelated, best class score": (best_score["decorrelated"], "decorrelated"),
        "balanced, best class score": (best_score["balanced"], "balanced"),
        "Mahalanobis, shared within-class covariance (decorrelated's and balanced's score_samples)":
            (fitted["balanced"].score_samples, "balanced"),
        "1-NN cosine to training samples": (nearest_images(X[train], 1), "mean"),
        "5-NN cosine to training samples": (nearest_images(X[train], 5), "mean"),
    }
    return {
        name: (analysis.open_set_scores(known=score(X[known]), unknown=score(X[unknown])), accuracy[classifier])
        for name, (score, classifier) in scores.items()
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    X, y = embeddings.double().numpy(), targets.numpy()
    partitions = list(analysis.random_partitions(
        targets=targets, valid_share=args.valid_share, runs=args.draws,
        generator=torch.Generator().manual_seed(args.seed),
    ))
    draws = list(analysis.hidden_class_draws(targets=y, partitions=partitions, hidden_share=args.hidden_share,
                                             seed=args.seed))
    print(f"{len(y)} samples, {len(np.unique(y))} classes, dimension {X.shape[1]}; {len(draws[0][3])} classes hidden "
          f"per draw, {args.draws} draws; {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}")
    results = [draw_scores(X, y, train=train, known=known, unknown=unknown)
               for train, known, unknown, _ in tqdm(draws, desc="[Open set] Draws")]

    def interval(name: str, pick: Callable[[tuple[dict, float]], float]) -> str:
        return str(metrics.mean_confidence_interval([pick(result[name]) for result in results])).split(" (")[0]

    print("\n| score | AUROC | FPR at 95 % TPR | known-class accuracy |")
    print("|---|---|---|---|")
    for name in results[0]:
        print(f"| {name} | {interval(name, lambda r: r[0]['auroc'])} | {interval(name, lambda r: r[0]['fpr'])} | "
              f"{interval(name, lambda r: r[1])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
