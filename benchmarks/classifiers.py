"""Every class-vector classifier and the linear probe on the same cached embeddings and the same partitions.

Why: the article's class mean is one member of a family of training-free classifiers; this prints, side by side
in one run, accuracy with its Student-t interval, the paired gain over the class mean (same partitions, so the
gain has its own, much narrower interval), the share of the class mean's errors removed, and seconds per
partition (fit + predict) on this machine::

    python -m benchmarks.classifiers --embeddings .cache/embeddings-<key>.pt --runs 20
    python -m benchmarks.classifiers --dataset DIR --model tf_efficientnet_lite0 --weights FILE --cache-dir .cache

``--subsets 10x20`` adds the small-set check: ``--subset-draws`` random draws of 10 classes x 20 images taken
from the same embeddings (no re-encoding), each scored over ``--runs`` partitions, to show whether the
decorrelated classifiers' automatic ridge strength is ever worse than the class mean where data are scarce.
``--class-groups 1,2 3,4,5`` scores chosen groups of classes (label indexes in sorted label order), for example
look-alike classes, a fine-grained set.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import numpy as np
import torch

from benchmarks.offline_models import packaged_minilm
from simsearch import (
    analysis,
    metrics,
    protocol,
)
from simsearch.classifiers import (
    baselines,
    prototypes,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_embedding_arguments(parser)
    parser.add_argument("--runs", type=int, default=20, help="random partitions")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--top-k", type=int, default=4, help="k of the top-k accuracy")
    parser.add_argument("--seed", type=int, default=17, help="seed of the partitions")
    parser.add_argument("--skip-probe", action="store_true", help="leave out the (slow) logistic-regression probe")
    parser.add_argument("--skip-lda", action="store_true", help="leave out shrinkage LDA")
    parser.add_argument("--subsets", default=None, metavar="CxN", help="also score draws of C classes x N images")
    parser.add_argument("--subset-draws", type=int, default=10, help="number of subset draws")
    parser.add_argument("--class-groups", nargs="+", default=None, metavar="I,J,...",
                        help="also score groups of classes (label indexes, comma-separated), e.g. look-alike classes")
    parser.add_argument("--small-set", default=None, metavar="CxN",
                        help="also time every member of the family beside the class mean on one draw of C classes "
                             "x N images, as the script scores a partition")
    parser.add_argument("--only-small-set", action="store_true", help="skip the whole set's table")
    return parser.parse_args(argv)


def add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`load_embeddings`, shared by the benchmarks that score cached embeddings."""
    parser.add_argument("--embeddings", default=None, help="an embedding cache file (store.EmbeddingCache, .pt)")
    parser.add_argument("--dataset", default=None,
                        help="class-folder dataset or CSV/TSV of labelled sentences to encode (when no --embeddings)")
    parser.add_argument("--model", default=None,
                        help="timm model (default tf_efficientnet_lite0) or sentence-transformers name or folder "
                             "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--weights", default=None, help="local weights file for a timm --model")
    parser.add_argument("--text-column", default="text", help="column of the sentences (text datasets)")
    parser.add_argument("--label-column", default="label", help="label column(s) of a text dataset, e.g. coarse,fine")
    parser.add_argument("--cache-dir", default=".cache", help="embedding cache for --dataset")


def load_embeddings(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's embedding and label index, from ``--embeddings`` or by encoding ``--dataset`` (cached)."""
    if args.embeddings is not None:
        state = torch.load(args.embeddings, map_location="cpu", weights_only=True)
        return state["embeddings"], state["targets"]
    if args.dataset is None:
        raise SystemExit("Give --embeddings FILE or --dataset PATH.")
    import warnings

    import banerjee
    import engine
    import store
    from simsearch import protocol

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # repeated sentences are skipped
        maker = banerjee.make_dataset_maker(
            dataset_path=args.dataset, text_column=args.text_column, label_column=args.label_column
        )
    text = maker.modality == "text"
    model = args.model or (str(packaged_minilm(str(pathlib.Path(args.cache_dir) / "models"))) if text
                           else "tf_efficientnet_lite0")
    encoder = engine.create_encoder(modality=maker.modality, model_name=model, weights=args.weights, device="cpu")
    transform = None if text else engine.eval_transform(encoder.model)[1]
    return protocol.embed_all_images(
        encoder=encoder, maker=maker, transform=transform, batch_size=512 if text else 32, workers=0,
        cache=store.EmbeddingCache(args.cache_dir), inform=True,
    )


def banner(X: np.ndarray, y: np.ndarray, *, settings: str) -> str:
    """The first line of a benchmark on embeddings: the data, the run's ``settings``, the machine."""
    return (f"{len(y)} samples, {len(np.unique(y))} classes, dimension {X.shape[1]}; {settings}; "
            f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")


def methods(args: argparse.Namespace) -> dict:
    chosen = {
        "class mean (article)": prototypes.ClassMeanClassifier(),
        "class mean, L2-normalised": prototypes.ClassMeanClassifier(normalize=True),
        "decorrelated, alpha by leave-one-out": prototypes.DecorrelatedClassifier(),
        "decorrelated, alpha by GCV": prototypes.DecorrelatedClassifier(alpha="gcv"),
        "decorrelated, alpha by OAS (closed form)": prototypes.DecorrelatedClassifier(alpha="oas"),
        "decorrelated, balanced prior": prototypes.make_classifier("balanced"),
        "balanced prior, alpha by OAS (closed form)": prototypes.DecorrelatedClassifier(alpha="oas",
                                                                                        prior="balanced"),
        "lda (shrinkage discriminant), for accuracy": prototypes.make_classifier("lda"),
        "lda, for balanced accuracy": prototypes.make_classifier("lda", select_for="balanced"),
    }
    if not args.skip_lda:
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import Normalizer

        chosen["shrinkage LDA (Ledoit-Wolf)"] = make_pipeline(
            Normalizer(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
        )
    if not args.skip_probe:
        chosen["linear probe (logistic regression)"] = baselines.linear_probe()
    return chosen


def print_table(table, *, title: str) -> None:
    print(f"\n{title}\n")
    print("| classifier | accuracy | balanced accuracy | top-k accuracy | gain over class mean | error reduction | "
          "s / partition |")
    print("|---|---|---|---|---|---|---|")
    for row in table.itertuples():
        print(
            f"| {row.method} | {row.accuracy:.4f} ± {row.accuracy_ci:.4f} | {row.balanced_accuracy:.4f} ± "
            f"{row.balanced_ci:.4f} | {row.topk_accuracy:.4f} ± "
            f"{row.topk_ci:.4f} | {row.gain:+.4f} ± {row.gain_ci:.4f} | {row.error_reduction:+.1%} | "
            f"{row.seconds:.3f} |"
        )


SUBSET_METHODS = {
    "mean": prototypes.ClassMeanClassifier(),
    "decorrelated": prototypes.make_classifier("decorrelated"),
    "balanced": prototypes.make_classifier("balanced"),
    "decorrelated, OAS": prototypes.DecorrelatedClassifier(alpha="oas"),
    "balanced, OAS": prototypes.DecorrelatedClassifier(alpha="oas", prior="balanced"),
    "lda": prototypes.make_classifier("lda"),
}


def score_subset(*, embeddings: torch.Tensor, targets: torch.Tensor, rows: np.ndarray, runs: int, valid_share: float,
                 seed: int):
    """The subset methods on ``runs`` partitions of the samples ``rows``, labels renumbered from 0."""
    sub_targets = torch.from_numpy(np.unique(targets.numpy()[rows], return_inverse=True)[1])
    partitions = list(analysis.random_partitions(
        targets=sub_targets, valid_share=valid_share, runs=runs, generator=torch.Generator().manual_seed(seed),
    ))
    return analysis.compare_prototypes(
        embeddings=embeddings[rows], targets=sub_targets, partitions=partitions, top_k=1, methods=SUBSET_METHODS,
    ).set_index("method")


def print_subset_row(name: str, table) -> None:
    cells = [f"{table.loc['mean', 'accuracy']:.4f} ± {table.loc['mean', 'accuracy_ci']:.4f}"]
    for method in list(SUBSET_METHODS)[1:]:
        row = table.loc[method]
        cells.append(f"{row['accuracy']:.4f} ({row['gain']:+.4f} ± {row['gain_ci']:.4f})")
    print(f"| {name} | " + " | ".join(cells) + " |")


SUBSET_HEADER = ("| subset | class mean | " + " | ".join(f"{name} (paired gain)" for name in list(SUBSET_METHODS)[1:])
                 + " |\n|---|---|" + "---|" * (len(SUBSET_METHODS) - 1))


def subset_check(
    *, embeddings: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace
) -> None:
    """Paired accuracy differences to the class mean on random small subsets of the classes and images."""
    num_classes, per_class = (int(part) for part in args.subsets.lower().split("x"))
    rng = np.random.default_rng(args.seed)
    labels = torch.unique(targets).numpy()
    print(f"\nSmall subsets: {args.subset_draws} draws of {num_classes} classes x {per_class} images, "
          f"{args.runs} partitions each\n")
    print(SUBSET_HEADER)
    gains = {method: [] for method in list(SUBSET_METHODS)[1:]}
    for draw in range(args.subset_draws):
        chosen = rng.choice(labels, size=num_classes, replace=False)
        rows = np.concatenate([
            rng.choice(np.flatnonzero(targets.numpy() == label), size=per_class, replace=False) for label in chosen
        ])
        table = score_subset(embeddings=embeddings, targets=targets, rows=rows, runs=args.runs,
                             valid_share=args.valid_share, seed=args.seed + draw)
        for method in gains:
            gains[method].append(table.loc[method, "gain"])
        print_subset_row(f"draw {draw}", table)
    for method, values in gains.items():
        overall = metrics.mean_confidence_interval(values)
        print(f"\nMean paired gain of {method} over the {len(values)} draws: {overall}")


def class_group_check(*, embeddings: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace) -> None:
    """The subset methods on every sample of a chosen group of classes (look-alike classes: a fine-grained set)."""
    groups = [[int(label) for label in group.split(",")] for group in args.class_groups]
    print(f"\nChosen class groups (label indexes), all their samples, {args.runs} partitions each\n")
    print(SUBSET_HEADER)
    for group in groups:
        rows = np.flatnonzero(np.isin(targets.numpy(), group))
        table = score_subset(embeddings=embeddings, targets=targets, rows=rows, runs=args.runs,
                             valid_share=args.valid_share, seed=args.seed)
        print_subset_row(",".join(map(str, group)) + f" ({len(rows)} samples)", table)


SMALL_SET_MEMBERS = ("mean", "decorrelated", "balanced", "lda", "auto")


def small_draw(targets: np.ndarray, *, size: str, seed: int) -> np.ndarray:
    """The sample indexes of a seeded draw of ``C`` classes x ``N`` samples (``size`` ``"CxN"``; fewer where the
    set has fewer)."""
    num_classes, per_class = (int(part) for part in size.lower().split("x"))
    rng = np.random.default_rng(seed)
    labels = np.unique(targets)
    chosen = rng.choice(labels, size=min(num_classes, len(labels)), replace=False)
    return np.concatenate([
        rng.choice(np.flatnonzero(targets == label), size=min(per_class, int(np.sum(targets == label))),
                   replace=False) for label in chosen
    ])


def small_set_timing(*, embeddings: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace) -> None:
    """Every member's partitions on one small draw, each scored as the script scores a partition
    (:func:`protocol.evaluate_partition`: fit, ranking, training accuracy, probabilities), timed beside the class
    mean's in the same run: where the images are fewer than the features, a fit should cost what they cost. The
    members take turns on each partition, so a machine that slows down midway slows them all alike."""
    rows = small_draw(targets.numpy(), size=args.small_set, seed=args.seed)
    sub_targets = torch.from_numpy(np.unique(targets.numpy()[rows], return_inverse=True)[1])
    sub_embeddings = embeddings[rows].float()
    partitions = list(analysis.random_partitions(targets=sub_targets, valid_share=args.valid_share, runs=args.runs,
                                                 generator=torch.Generator().manual_seed(args.seed)))
    print(f"\nSmall set: {len(torch.unique(sub_targets))} classes x {args.small_set.lower().split('x')[1]} images "
          f"({len(rows)}; about {len(partitions[0][0])} training images of {embeddings.shape[1]} features), "
          f"{args.runs} partitions scored as the script scores them\n")

    def evaluate(name: str, train: torch.Tensor, valid: torch.Tensor) -> tuple[protocol.Run, float]:
        started = time.perf_counter()
        run, _ = protocol.evaluate_partition(embeddings=sub_embeddings, targets=sub_targets, train_indexes=train,
                                             valid_indexes=valid, classifier=prototypes.make_classifier(name),
                                             top_k=1)
        return run, time.perf_counter() - started

    for name in SMALL_SET_MEMBERS:  # one untimed partition each first: imports and BLAS threads warm up
        evaluate(name, *partitions[0])
    runs = {name: [] for name in SMALL_SET_MEMBERS}
    seconds = dict.fromkeys(SMALL_SET_MEMBERS, 0.0)
    fits = dict.fromkeys(SMALL_SET_MEMBERS, 0.0)
    for train, valid in partitions:
        for name in SMALL_SET_MEMBERS:
            run, elapsed = evaluate(name, train, valid)
            runs[name].append(run)
            seconds[name] += elapsed
            fit_started = time.perf_counter()
            prototypes.make_classifier(name).fit(sub_embeddings.numpy()[train], sub_targets.numpy()[train])
            fits[name] += time.perf_counter() - fit_started
    print("| member | accuracy | seconds, all partitions | x class mean | fit only, s / partition | chose |")
    print("|---|---|---|---|---|---|")
    for name in SMALL_SET_MEMBERS:
        choices = [run.choice for run in runs[name]]
        chose = ", ".join(f"{choice} {choices.count(choice)}" for choice in sorted(set(choices), key=choices.count,
                                                                                  reverse=True))
        print(f"| {name} | {np.mean([run.accuracy for run in runs[name]]):.4f} | {seconds[name]:.2f} | "
              f"{seconds[name] / seconds[SMALL_SET_MEMBERS[0]]:.1f} | {fits[name] / len(partitions):.3f} | {chose} |")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    embeddings, targets = load_embeddings(args)
    print(f"{len(targets)} images, {len(torch.unique(targets))} classes, dimension {embeddings.shape[1]}; "
          f"{args.runs} partitions of {args.valid_share:.0%} validation, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    if not args.only_small_set:
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
    if args.small_set:
        small_set_timing(embeddings=embeddings, targets=targets, args=args)
    if args.subsets:
        subset_check(embeddings=embeddings, targets=targets, args=args)
    if args.class_groups:
        class_group_check(embeddings=embeddings, targets=targets, args=args)


if __name__ == "__main__":
    main(sys.argv[1:])
