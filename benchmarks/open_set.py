"""Queries of no known class: every unknown score side by side on identical draws of hidden classes.

Why: a class store is queried with things it has never seen, and every query gets its nearest class however far.
Each draw splits every class 80/20 and hides ``--hidden-share`` of the classes; the estimators fit the other
classes' training part; known = their validation samples, unknown = every sample of the hidden classes. For each
score (higher = known) the table gives the AUROC, the FPR at 95 % TPR (threshold set on the known samples, as
``calibrate`` does) and the known-class accuracy of the classifier behind it, with Student-t intervals over the
draws::

    python -m benchmarks.open_set --embeddings .cache/embeddings-<key>.pt --draws 5
    python -m benchmarks.open_set --dataset ../shared/data/trec/train.csv --label-column coarse --hidden-share 0.17
    python -m benchmarks.open_set --dataset ../shared/data/caltech101 --weights FILE --hide-together Faces,Faces_easy

``--hide-together`` names classes of one concept (label names with ``--dataset``, else label indexes): they are
hidden together or not at all (see ``analysis.hidden_class_draws``).
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

from benchmarks.classifiers import add_embedding_arguments, load_embeddings
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
    parser.add_argument("--hidden-share", type=float, default=0.2, help="share of the classes hidden per draw")
    parser.add_argument("--draws", type=int, default=5, help="random draws (partition and hidden classes)")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--seed", type=int, default=17, help="seed of the draws")
    parser.add_argument("--hide-together", nargs="+", default=[], metavar="A,B,...",
                        help="classes of one concept, hidden together or not at all (names with --dataset, else "
                             "label indexes)")
    return parser.parse_args(argv)


def hiding_groups(args: argparse.Namespace) -> list[list[int]]:
    """``--hide-together`` as label indexes: names are looked up among the ``--dataset`` classes."""
    tokens = [group.split(",") for group in args.hide_together]
    if all(token.isdigit() for group in tokens for token in group):
        return [[int(token) for token in group] for group in tokens]
    if args.dataset is None:
        raise SystemExit("--hide-together with class names needs --dataset (or give label indexes).")
    import banerjee

    names = banerjee.make_dataset_maker(dataset_path=args.dataset, text_column=args.text_column,
                                        label_column=args.label_column).get_labels()
    missing = sorted({token for group in tokens for token in group} - set(names))
    if missing:
        raise SystemExit(f"--hide-together: no class named {', '.join(missing)} in {args.dataset}.")
    return [[names.index(token) for token in group] for group in tokens]


def nearest_images(train: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """The k-th best cosine to a training sample (KNN in OpenOOD)."""
    corpus = torch.from_numpy(train).float()

    def score(queries: np.ndarray) -> np.ndarray:
        scores, _ = prototypes.cosine_top_k(queries=torch.from_numpy(queries).float(), corpus=corpus, top_k=k)
        return scores[:, -1].double().numpy()

    return score


def draw_scores(X: np.ndarray, y: np.ndarray, *, train, known, unknown) -> dict[str, tuple[dict, float, float]]:
    """``{score name: (open_set_scores, known-class accuracy of its classifier, that accuracy among the known
    samples kept at the threshold)}`` for one draw."""
    fitted = {name: prototypes.make_classifier(name).fit(X[train], y[train])
              for name in ("mean", "decorrelated", "balanced", "lda")}
    combined = prototypes.make_classifier("decorrelated", unknown_score="combined").fit(X[train], y[train])
    within = prototypes.make_classifier("balanced", unknown_score="mahalanobis").set_statistics(
        **fitted["balanced"].get_statistics())
    correct = {name: model.predict(X[known]) == y[known] for name, model in fitted.items()}
    best_score = {name: (lambda Q, model=model: model.class_scores(Q).max(axis=1)) for name, model in fitted.items()}

    def component(model: prototypes.DecorrelatedClassifier, column: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda Q: model.unknown_components(model.query_features(Q))[:, column]

    def judged(score: Callable[[np.ndarray], np.ndarray], classifier: str) -> tuple[dict, float, float]:
        known_scores = score(X[known])
        separation = analysis.open_set_scores(known=known_scores, unknown=score(X[unknown]))
        kept = correct[classifier][known_scores >= separation["threshold"]]
        return separation, float(correct[classifier].mean()), float(kept.mean())

    scores = {
        "class mean, best cosine (mean's score_samples)": (fitted["mean"].score_samples, "mean"),
        "decorrelated, best class score (the ridge regression: second part of the combined score)":
            (best_score["decorrelated"], "decorrelated"),
        "balanced, best class score": (best_score["balanced"], "balanced"),
        "Mahalanobis, shared within-class covariance (unknown_score='mahalanobis')": (within.score_samples,
                                                                                     "balanced"),
        "Mahalanobis, total covariance (first part of the combined score)": (component(fitted["balanced"], 0),
                                                                            "balanced"),
        COMBINED: (combined.score_samples, "decorrelated"),
        AUTO: (fitted["decorrelated"].score_samples, "decorrelated"),
        "chosen at fit, balanced (balanced's score_samples)": (fitted["balanced"].score_samples, "balanced"),
        "lda, best class score": (best_score["lda"], "lda"),
        LDA_SCORE: (fitted["lda"].score_samples, "lda"),
        "1-NN cosine to training samples": (nearest_images(X[train], 1), "mean"),
        "5-NN cosine to training samples": (nearest_images(X[train], 5), "mean"),
    }
    tqdm.write(f"unknown score chosen at fit: decorrelated {fitted['decorrelated'].unknown_score_}, balanced "
               f"{fitted['balanced'].unknown_score_}")
    return {name: judged(score, classifier) for name, (score, classifier) in scores.items()}


COMBINED = "combined: both parts standardised and added (unknown_score='combined')"
AUTO = "chosen at fit among combined, Mahalanobis and cosine (decorrelated's score_samples, the default)"
LDA_SCORE = "lda: Mahalanobis under its shrunk covariance (lda's score_samples)"
SINGLE = ("class mean", "decorrelated, best", "balanced, best", "Mahalanobis", "lda, best", "1-NN", "5-NN")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    X, y = embeddings.double().numpy(), targets.numpy()
    partitions = list(analysis.random_partitions(
        targets=targets, valid_share=args.valid_share, runs=args.draws,
        generator=torch.Generator().manual_seed(args.seed),
    ))
    draws = list(analysis.hidden_class_draws(targets=y, partitions=partitions, hidden_share=args.hidden_share,
                                             seed=args.seed, together=hiding_groups(args)))
    print(f"{len(y)} samples, {len(np.unique(y))} classes, dimension {X.shape[1]}; {len(draws[0][3])} classes hidden "
          f"per draw, {args.draws} draws; {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}")
    results = [draw_scores(X, y, train=train, known=known, unknown=unknown)
               for train, known, unknown, _ in tqdm(draws, desc="[Open set] Draws")]

    def interval(name: str, pick: Callable[[tuple[dict, float, float]], float]) -> str:
        return str(metrics.mean_confidence_interval([pick(result[name]) for result in results])).split(" (")[0]

    print("\n| score | AUROC | FPR at 95 % TPR | known-class accuracy | known-class accuracy at the threshold |")
    print("|---|---|---|---|---|")
    for name in results[0]:
        print(f"| {name} | {interval(name, lambda r: r[0]['auroc'])} | {interval(name, lambda r: r[0]['fpr'])} | "
              f"{interval(name, lambda r: r[1])} | {interval(name, lambda r: r[2])} |")
    singles = [name for name in results[0] if name.startswith(SINGLE)]
    best = max(singles, key=lambda name: np.mean([result[name][0]["auroc"] for result in results]))
    for default in (AUTO, COMBINED, LDA_SCORE):
        gain = metrics.paired_difference([result[default][0]["auroc"] for result in results],
                                         [result[best][0]["auroc"] for result in results])
        print(f"\nAUROC of {default.split(' (')[0]} minus the best single score ({best}), paired over the draws: "
              f"{gain.mean:+.4f} ± {gain.half_width:.4f}")
        print("Per draw: " + ", ".join(f"{result[default][0]['auroc']:.4f}" for result in results))


if __name__ == "__main__":
    main(sys.argv[1:])
