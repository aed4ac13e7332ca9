"""``auto`` against every member of the family it chooses from, on identical partitions.

Why: ``--classifier auto`` picks, on each partition's training part alone, the class mean or the member that beats
it on held-out folds. This prints per set which member it chose in how many partitions, its accuracy, its paired
difference (Student-t interval over the partitions) to the class mean and to the member that was best on this set,
the share of the class mean's errors it removes, and each classifier's seconds per fit, side by side::

    python -m benchmarks.auto_choice --embeddings .cache/embeddings-<key>.pt --runs 20
    python -m benchmarks.auto_choice --embeddings .cache/embeddings-<key>.pt --runs 20 --subsets 10x50 --subset-draws 5
    python -m benchmarks.auto_choice --embeddings .cache/embeddings-<key>.pt --class-groups 1,2,3 --name caltech

``--subsets CxN`` adds draws of C classes x N samples of the same embeddings (small sets); ``--class-groups`` adds
chosen groups of classes, all their samples (look-alike classes: a fine-grained set).
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
from simsearch.classifiers import prototypes

MEMBERS = ("mean", "decorrelated", "balanced", "lda")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_embedding_arguments(parser)
    parser.add_argument("--name", default="whole set", help="what the table calls the set")
    parser.add_argument("--runs", type=int, default=20, help="random partitions per set")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--seed", type=int, default=17, help="seed of the partitions and the draws")
    parser.add_argument("--subsets", default=None, metavar="CxN", help="also draws of C classes x N samples")
    parser.add_argument("--subset-draws", type=int, default=5, help="number of subset draws")
    parser.add_argument("--class-groups", nargs="+", default=[], metavar="I,J,...",
                        help="also these groups of classes (label indexes), all their samples")
    parser.add_argument("--skip-whole", action="store_true", help="score only the subsets and groups")
    return parser.parse_args(argv)


def score_set(X: np.ndarray, y: np.ndarray, *, runs: int, valid_share: float, seed: int, name: str) -> dict:
    """Every member and ``auto`` fitted on the same ``runs`` partitions: accuracies, seconds, auto's choices."""
    labels = torch.from_numpy(np.unique(y, return_inverse=True)[1])
    partitions = list(analysis.random_partitions(targets=labels, valid_share=valid_share, runs=runs,
                                                 generator=torch.Generator().manual_seed(seed)))
    accuracy = {method: [] for method in (*MEMBERS, "auto")}
    seconds = {method: [] for method in accuracy}
    chosen: collections.Counter[str] = collections.Counter()
    for train, valid in tqdm(partitions, desc=f"[Auto] {name}", leave=False, file=sys.stderr):
        train, valid = train.numpy(), valid.numpy()
        for method in accuracy:
            started = time.perf_counter()
            fitted = prototypes.make_classifier(method).fit(X[train], y[train])
            seconds[method].append(time.perf_counter() - started)
            accuracy[method].append(float(np.mean(fitted.predict(X[valid]) == y[valid])))
            if method == "auto":
                chosen[fitted.chosen_] += 1
    return {"accuracy": accuracy, "seconds": seconds, "chosen": chosen}


def print_row(name: str, scored: dict) -> float:
    """One line of the table; returns the share of the class mean's errors that auto removes."""
    accuracy = scored["accuracy"]
    best = max(MEMBERS, key=lambda method: np.mean(accuracy[method]))
    to_mean = metrics.paired_difference(accuracy["auto"], accuracy["mean"])
    to_best = metrics.paired_difference(accuracy["auto"], accuracy[best])
    mean_error = 1.0 - float(np.mean(accuracy["mean"]))
    removed = to_mean.mean / mean_error if mean_error > 0 else float("nan")
    chosen = ", ".join(f"{method} {count}" for method, count in scored["chosen"].most_common())
    fits = " / ".join(f"{np.mean(scored['seconds'][method]):.3f}" for method in (*MEMBERS, "auto"))
    print(f"| {name} | {np.mean(accuracy['mean']):.4f} | {best} {np.mean(accuracy[best]):.4f} | "
          f"{np.mean(accuracy['auto']):.4f} | {to_mean.mean:+.4f} ± {to_mean.half_width:.4f} | "
          f"{to_best.mean:+.4f} ± {to_best.half_width:.4f} | {removed:+.1%} | {chosen} | {fits} |", flush=True)
    return removed


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    X, y = embeddings.double().numpy(), targets.numpy()
    print(banner(X, y, settings=f"{args.runs} partitions of {args.valid_share:.0%} validation, seed {args.seed}"),
          end="\n\n")
    print("| set | class mean | best member | auto | auto - class mean | auto - best member | class mean's errors "
          "removed | auto chose | s / fit: " + " / ".join((*MEMBERS, "auto")) + " |")
    print("|---" * 9 + "|")
    options = dict(runs=args.runs, valid_share=args.valid_share)
    removed = []
    if not args.skip_whole:
        removed.append(print_row(args.name, score_set(X, y, seed=args.seed, name=args.name, **options)))
    if args.subsets:
        classes, per_class = (int(part) for part in args.subsets.lower().split("x"))
        rng = np.random.default_rng(args.seed)
        labels, counts = np.unique(y, return_counts=True)
        large_enough = labels[counts >= per_class]  # classes with N samples to draw
        if len(large_enough) < classes:
            raise SystemExit(f"--subsets {args.subsets}: only {len(large_enough)} classes have {per_class} samples.")
        for draw in range(args.subset_draws):
            picked = rng.choice(large_enough, size=classes, replace=False)
            rows = np.concatenate([rng.choice(np.flatnonzero(y == label), size=per_class, replace=False)
                                   for label in picked])
            name = f"{args.name}: draw {draw} of {classes} x {per_class}"
            removed.append(print_row(name, score_set(X[rows], y[rows], seed=args.seed + draw, name=name, **options)))
    for group in args.class_groups:
        rows = np.flatnonzero(np.isin(y, [int(label) for label in group.split(",")]))
        name = f"{args.name}: classes {group} ({len(rows)} samples)"
        removed.append(print_row(name, score_set(X[rows], y[rows], seed=args.seed, name=name, **options)))
    if len(removed) > 1:
        print(f"\nShare of the class mean's errors removed by auto, mean over the {len(removed)} sets: "
              f"{np.mean(removed):+.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
