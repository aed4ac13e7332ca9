"""The PIL decode path against the tensor path (JPEG bytes in the loader; decode, resize and normalise on the
device, nvJPEG on CUDA), side by side in one run on the same images and partitions.

Prints each path's encode rate, the smallest and mean per-image cosine between the two paths' embeddings, and the
accuracy of each with its Student-t interval and the paired difference; the claim to check before making the
tensor path a default is that the difference sits inside the PIL path's interval::

    python -m benchmarks.decode_paths --dataset ../shared/data/caltech101 --per-class 15 --runs 20
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

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

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/caltech101", help="class-folder image dataset")
    parser.add_argument("--per-class", type=int, default=15, help="images per class (0: all)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--classifier", default="mean")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", default="auto", help="loader workers (auto: config.LoaderSettings)")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--weights", default=None, help="Lite0 weights (default: the offline package's file)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    import utils

    args = parse_args(argv)
    device = utils.resolve_device(args.device)
    loader = config.LoaderSettings.resolve(device_type=device.type, workers=args.workers, batch_size=args.batch_size)
    if args.weights is None:
        args.weights = lite_weights(0)
    model = engine.create_model(model_name="tf_efficientnet_lite0", weights=args.weights)
    encoder = engine.Encoder(model=model, device=device)
    transform = engine.eval_transform(model)[1]
    settings = config.RunSettings(runs=args.runs, classifier=args.classifier)
    with tempfile.TemporaryDirectory() as folder:
        dataset = per_class_subset(pathlib.Path(args.dataset), pathlib.Path(folder) / "subset",
                                   per_class=args.per_class)
        maker = banerjee.DatasetMaker(dataset_path=dataset)
        print(f"{maker.get_num_images()} images, {maker.get_num_labels()} classes, {args.runs} partitions, device "
              f"{device}, {loader.describe()}, {torch.get_num_threads()} torch threads")
        embedded, accuracies = {}, {}
        for decode in ("pil", "tensor"):
            protocol.embed_all_images(encoder=encoder, maker=maker, transform=transform, batch_size=loader.batch_size,
                                      workers=loader.workers, decode=decode)  # warm-up: caches, kernels, workers
            started = time.perf_counter()
            embedded[decode], targets = protocol.embed_all_images(
                encoder=encoder, maker=maker, transform=transform, batch_size=loader.batch_size,
                workers=loader.workers, decode=decode, inform=decode == "tensor")
            seconds = time.perf_counter() - started
            runs = protocol.run_cached_protocol(encoder=None, maker=maker, transform=None, settings=settings,
                                                batch_size=loader.batch_size, workers=0,
                                                embeddings=(embedded[decode], targets))
            accuracies[decode] = np.array([run.accuracy for run in runs])
            interval = metrics.mean_confidence_interval(accuracies[decode])
            print(f"{decode:6s} {len(targets) / seconds:8.1f} images/s   accuracy {interval.mean:.4f} ± "
                  f"{interval.half_width:.4f}", flush=True)
        similarity = torch.nn.functional.cosine_similarity(embedded["tensor"], embedded["pil"], dim=1)
        difference = metrics.paired_difference(accuracies["tensor"], accuracies["pil"])
        print(f"per-image cosine tensor vs PIL: min {similarity.min():.5f}, mean {similarity.mean():.5f}; paired "
              f"accuracy difference (tensor - PIL) {difference.mean:+.4f} ± {difference.half_width:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
