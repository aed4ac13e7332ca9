"""Accuracy with each encoder precision on the same partitions, side by side with fp32, in one run.

Every precision encodes the same images (``--per-class`` images of every class of ``--dataset``, or all of them
with ``--per-class 0``) and is scored on the same ``--runs`` partitions with the same classifier, so the paired
difference to fp32 has its own narrow interval; the claim to check is that it sits inside fp32's interval::

    python -m benchmarks.precision_accuracy --dataset ../shared/data/caltech101 --precisions fp32 bf16 --runs 20
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import banerjee
import engine
from benchmarks.grid_rerun import per_class_subset
from benchmarks.offline_models import lite_weights
from simsearch import (
    config,
    metrics,
    protocol,
)
from simsearch.classifiers import prototypes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/caltech101", help="class-folder image dataset")
    parser.add_argument("--per-class", type=int, default=0, help="images per class (0: all)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(engine.PRECISIONS))
    parser.add_argument("--classifier", default="mean", choices=list(prototypes.CLASSIFIERS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model = engine.create_model(model_name="tf_efficientnet_lite0", weights=lite_weights(0))
    transform = engine.eval_transform(model)[1]
    with tempfile.TemporaryDirectory() as folder:
        dataset = per_class_subset(pathlib.Path(args.dataset), pathlib.Path(folder) / "subset",
                                   per_class=args.per_class)
        maker = banerjee.DatasetMaker(dataset_path=dataset)
        print(f"{maker.get_num_images()} images, {maker.get_num_labels()} classes, {args.runs} partitions, "
              f"{args.classifier} classifier, device {args.device}")
        reference = None
        for precision in args.precisions:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                encoder = engine.Encoder(model=model, device=args.device,
                                         config=engine.EncoderConfig(precision=precision))
            started = time.perf_counter()
            runs = protocol.run_cached_protocol(
                encoder=encoder, maker=maker, transform=transform, batch_size=32, workers=args.workers,
                settings=config.RunSettings(runs=args.runs, valid_share=0.2, seed=17, top_k=4,
                                            classifier=args.classifier),
            )
            accuracies = np.array([run.accuracy for run in runs])
            accuracy = metrics.mean_confidence_interval(accuracies)
            line = (f"{precision:5s} accuracy {accuracy.mean:.4f} ± {accuracy.half_width:.4f}  "
                    f"({time.perf_counter() - started:.0f} s)")
            if reference is None:
                reference = accuracies
            else:
                difference = metrics.mean_confidence_interval(accuracies - reference)
                line += (f"  paired difference to {args.precisions[0]} {difference.mean:+.4f} ± "
                         f"{difference.half_width:.4f}")
            print(line, flush=True)
        model.to("cpu")


if __name__ == "__main__":
    main(sys.argv[1:])
