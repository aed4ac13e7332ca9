"""How far each classifier's probabilities can be trusted, on the same partitions for every member.

Why: ``predict_proba`` divides each classifier's scores by one temperature fitted on held-out folds of the training
part (``simsearch.classifiers.probabilities``). This prints, per member and over ``--runs`` partitions (Student-t
intervals), the accuracy, the expected calibration error (15 bins) and the log loss of those probabilities beside the
same for the plain softmax of the scores (temperature 1), the fitted temperature, what the fit chose to score with,
and seconds per fit::

    python -m benchmarks.probabilities --embeddings .cache/embeddings-<key>.pt --runs 20
    python -m benchmarks.probabilities --dataset questions.csv --label-column coarse --runs 20
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.classifiers import add_embedding_arguments, banner, load_embeddings
from simsearch import analysis, metrics
from simsearch.classifiers import probabilities, prototypes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_embedding_arguments(parser)
    parser.add_argument("--runs", type=int, default=20, help="random partitions")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--seed", type=int, default=17, help="seed of the partitions")
    parser.add_argument("--classifiers", nargs="+", default=list(prototypes.CLASSIFIERS),
                        choices=list(prototypes.CLASSIFIERS))
    return parser.parse_args(argv)


def partition_scores(name: str, X: np.ndarray, y: np.ndarray, train: np.ndarray, valid: np.ndarray) -> dict:
    """One member on one partition: its probabilities and the raw softmax judged on the validation part."""
    started = time.perf_counter()
    fitted = prototypes.make_classifier(name).fit(X[train], y[train])
    seconds = time.perf_counter() - started
    rows = np.searchsorted(fitted.classes_, y[valid])
    chances = fitted.predict_proba(X[valid])
    raw = probabilities.softmax(fitted.class_scores(X[valid]), temperature=1.0)
    return {"accuracy": float(np.mean(chances.argmax(axis=1) == rows)),
            "calibration error": probabilities.calibration_error(chances, rows),
            "raw calibration error": probabilities.calibration_error(raw, rows),
            "log loss": probabilities.log_loss(chances, rows), "raw log loss": probabilities.log_loss(raw, rows),
            "temperature": fitted.temperature_, "seconds": seconds, "choice": prototypes.describe_choice(fitted)}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    X, y = embeddings.double().numpy(), targets.numpy()
    generator = torch.Generator().manual_seed(args.seed)
    partitions = [(np.asarray(train), np.asarray(valid)) for train, valid in analysis.random_partitions(
        targets=targets, valid_share=args.valid_share, runs=args.runs, generator=generator)]
    print(banner(X, y, settings=f"{args.runs} partitions, seed {args.seed}"))
    columns = ("accuracy", "calibration error", "raw calibration error", "log loss", "raw log loss", "temperature",
               "seconds")
    print("\n| classifier | " + " | ".join(columns) + " | chosen per partition |")
    print("|---" * (len(columns) + 2) + "|")
    for name in args.classifiers:
        results = [partition_scores(name, X, y, train, valid)
                   for train, valid in tqdm(partitions, desc=f"[Probabilities] {name}", file=sys.stderr)]
        cells = [str(metrics.mean_confidence_interval([result[column] for result in results])).split(" (")[0]
                 for column in columns]
        chosen = collections.Counter(result["choice"] for result in results).most_common()
        print(f"| {name} | " + " | ".join(cells) + " | " + ", ".join(f"{choice} {count}" for choice, count in chosen)
              + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
