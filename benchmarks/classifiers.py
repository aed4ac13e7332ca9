"""Every class-vector classifier and the linear probe on the same cached embeddings and the same partitions.

Why: the article's class mean is one member of a family of training-free classifiers; this prints, side by side
in one run, accuracy with its Student-t interval, the paired gain over the class mean (same partitions, so the
gain has its own, much narrower interval), the share of the class mean's errors removed, and seconds per
partition (fit + predict) on this machine::

    python benchmarks/classifiers.py --embeddings .cache/embeddings-<key>.pt --runs 20
    python benchmarks/classifiers.py --dataset DIR --model tf_efficientnet_lite0 --weights FILE --cache-dir .cache

``--subsets 10x20`` adds the small-set check: ``--subset-draws`` random draws of 10 classes x 20 images taken
from the same embeddings (no re-encoding), each scored over ``--runs`` partitions, to show whether the
decorrelated classifier's automatic ridge strength is ever worse than the class mean where data are scarce.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analysis  # noqa: E402
import metrics  # noqa: E402
import prototypes  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--embeddings", default=None, help="an embedding cache file (store.EmbeddingCache, .pt)")
    parser.add_argument("--dataset", default=None, help="class-folder dataset to encode (when no --embeddings)")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name for --dataset")
    parser.add_argument("--weights", default=None, help="local weights file for --model")
    parser.add_argument("--cache-dir", default=".cache", help="embedding cache for --dataset")
    parser.add_argument("--runs", type=int, default=20, help="random partitions")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--top-k", type=int, default=4, help="k of the top-k accuracy")
    parser.add_argument("--seed", type=int, default=17, help="seed of the partitions")
    parser.add_argument("--skip-probe", action="store_true", help="leave out the (slow) logistic-regression probe")
    parser.add_argument("--skip-lda", action="store_true", help="leave out shrinkage LDA")
    parser.add_argument("--subsets", default=None, metavar="CxN", help="also score draws of C classes x N images")
    parser.add_argument("--subset-draws", type=int, default=10, help="number of subset draws")
    return parser.parse_args(argv)


def load_embeddings(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.embeddings is not None:
        state = torch.load(args.embeddings, map_location="cpu", weights_only=True)
        return state["embeddings"], state["targets"]
    if args.dataset is None:
        raise SystemExit("Give --embeddings FILE or --dataset DIR.")
    import banerjee
    import engine
    import protocol
    import store

    maker = banerjee.DatasetMaker(dataset_path=args.dataset)
    model = engine.create_model(model_name=args.model, weights=args.weights)
    _, transform = engine.eval_transform(model)
    return protocol.embed_all_images(
        encoder=engine.Encoder(model=model, device="cpu"), maker=maker, transform=transform, batch_size=32,
        workers=0, cache=store.EmbeddingCache(args.cache_dir), inform=True,
    )


def methods(args: argparse.Namespace) -> dict:
    chosen = {
        "class mean (article)": prototypes.ClassMeanClassifier(),
        "class mean, L2-normalised": prototypes.ClassMeanClassifier(normalize=True),
        "decorrelated, alpha by leave-one-out": prototypes.DecorrelatedClassifier(),
        "decorrelated, alpha by GCV": prototypes.DecorrelatedClassifier(alpha="gcv"),
    }
    if not args.skip_lda:
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import Normalizer

        chosen["shrinkage LDA (Ledoit-Wolf)"] = make_pipeline(
            Normalizer(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
        )
    if not args.skip_probe:
        chosen["linear probe (logistic regression)"] = analysis.linear_probe()
    return chosen


def print_table(table, *, title: str) -> None:
    print(f"\n{title}\n")
    print("| classifier | accuracy | top-k accuracy | gain over class mean | error reduction | s / partition |")
    print("|---|---|---|---|---|---|")
    for row in table.itertuples():
        print(
            f"| {row.method} | {row.accuracy:.4f} ± {row.accuracy_ci:.4f} | {row.topk_accuracy:.4f} ± "
            f"{row.topk_ci:.4f} | {row.gain:+.4f} ± {row.gain_ci:.4f} | {row.error_reduction:+.1%} | "
            f"{row.seconds:.3f} |"
        )


def subset_check(
    *, embeddings: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace
) -> None:
    """Paired accuracy differences (decorrelated - class mean) on random small subsets of the classes and images."""
    num_classes, per_class = (int(part) for part in args.subsets.lower().split("x"))
    rng = np.random.default_rng(args.seed)
    labels = torch.unique(targets).numpy()
    print(f"\nSmall subsets: {args.subset_draws} draws of {num_classes} classes x {per_class} images, "
          f"{args.runs} partitions each\n")
    print("| draw | class mean | decorrelated (LOO) | paired gain |")
    print("|---|---|---|---|")
    gains = []
    for draw in range(args.subset_draws):
        chosen = rng.choice(labels, size=num_classes, replace=False)
        rows = np.concatenate([
            rng.choice(np.flatnonzero(targets.numpy() == label), size=per_class, replace=False) for label in chosen
        ])
        sub_embeddings, sub_targets = embeddings[rows], torch.from_numpy(
            np.searchsorted(np.sort(chosen), targets.numpy()[rows])
        )
        partitions = list(analysis.random_partitions(
            targets=sub_targets, valid_share=args.valid_share, runs=args.runs,
            generator=torch.Generator().manual_seed(args.seed + draw),
        ))
        table = analysis.compare_prototypes(
            embeddings=sub_embeddings, targets=sub_targets, partitions=partitions, top_k=1,
            methods={"mean": prototypes.ClassMeanClassifier(), "decorrelated": prototypes.DecorrelatedClassifier()},
        ).set_index("method")
        gain = table.loc["decorrelated"]
        gains.append(gain["gain"])
        print(f"| {draw} | {table.loc['mean', 'accuracy']:.4f} | {gain['accuracy']:.4f} | "
              f"{gain['gain']:+.4f} ± {gain['gain_ci']:.4f} |")
    overall = metrics.mean_confidence_interval(gains)
    print(f"\nMean paired gain over the {len(gains)} draws: {overall}")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    print(f"{len(targets)} images, {len(torch.unique(targets))} classes, dimension {embeddings.shape[1]}; "
          f"{args.runs} partitions of {args.valid_share:.0%} validation, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    partitions = list(analysis.random_partitions(
        targets=targets, valid_share=args.valid_share, runs=args.runs,
        generator=torch.Generator().manual_seed(args.seed),
    ))
    started = time.perf_counter()
    table = analysis.compare_prototypes(
        embeddings=embeddings, targets=targets, partitions=partitions, top_k=args.top_k, methods=methods(args)
    )
    seconds = time.perf_counter() - started
    print_table(table, title=f"All classifiers on the same {args.runs} partitions ({seconds:.0f} s)")
    if args.subsets:
        subset_check(embeddings=embeddings, targets=targets, args=args)


if __name__ == "__main__":
    main(sys.argv[1:])
