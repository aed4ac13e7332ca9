"""Time the original protocol (re-encode every partition) against the cached one (encode every image once).

Both run side by side in one invocation, each in its own child process so that peak RSS is measured per protocol,
on the same data, model, partitions and machine::

    python -m benchmarks.protocol_speed --dataset ../shared/data/caltech101 --per-class 8 --runs 20

Without ``--dataset`` a small separable class-folder set is generated. ``--original-runs`` times fewer original
partitions and extrapolates linearly to ``--runs`` (each original partition costs the same work).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="class-folder dataset (default: a generated one)")
    parser.add_argument("--per-class", type=int, default=None, help="use at most this many images per class")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="local weights (default: the offline Lite0 package file)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--original-runs", type=int, default=None, help="original partitions actually timed")
    parser.add_argument("--valid-share", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--phase", choices=("cached", "original"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def subset(dataset: pathlib.Path, per_class: int) -> pathlib.Path:
    """Symlink the first ``per_class`` images of each class into a temporary class-folder tree."""
    import banerjee

    root = pathlib.Path(tempfile.mkdtemp(prefix="protocol-speed-"))
    for label_dir in sorted(p for p in dataset.iterdir() if p.is_dir()):
        images = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in banerjee.IMAGE_EXTENSIONS)
        (root / label_dir.name).mkdir()
        for image in images[:per_class]:
            (root / label_dir.name / image.name).symlink_to(image.resolve())
    return root


def generated() -> pathlib.Path:
    from tests.conftest import CLASS_STYLES, make_class_folders

    root = pathlib.Path(tempfile.mkdtemp(prefix="protocol-speed-"))
    return make_class_folders(root, classes=list(CLASS_STYLES), images_per_class=20)


def run_phase(args: argparse.Namespace) -> dict:
    """One protocol in this process; returns its timings and peak RSS."""
    import torch

    import banerjee
    import engine
    from simsearch import config, protocol

    torch.manual_seed(0)
    maker = banerjee.DatasetMaker(dataset_path=args.dataset, check_images=False)
    model = engine.create_model(model_name=args.model, weights=args.weights)
    _, transform = engine.eval_transform(model)
    encoder = engine.Encoder(model=model, device="cpu")
    common = dict(encoder=encoder, maker=maker, batch_size=args.batch_size, workers=args.workers)
    started = time.perf_counter()
    if args.phase == "cached":
        records = protocol.run_cached_protocol(
            transform=transform, settings=config.RunSettings(runs=args.runs, valid_share=args.valid_share, seed=17),
            **common)
        embeddings = records.embeddings
        embed_seconds = time.perf_counter() - started - sum(r.seconds for r in records)
        extra = {"embed_seconds": embed_seconds, "cache_bytes": embeddings.numel() * embeddings.element_size()}
    else:
        runs = args.original_runs or args.runs
        records = protocol.run_original_protocol(
            encode_transform=transform, eval_transform=transform,
            settings=config.RunSettings(runs=runs, valid_share=args.valid_share, seed=17), **common
        )
        extra = {"timed_runs": runs}
    return {
        "seconds": time.perf_counter() - started,
        "images": maker.get_num_images(),
        "labels": maker.get_num_labels(),
        "accuracies": [r.accuracy for r in records],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }


def child(args: argparse.Namespace, phase: str) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--dataset", str(args.dataset), "--model", args.model,
               "--weights", str(args.weights), "--runs", str(args.runs), "--valid-share", str(args.valid_share),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    if args.original_runs:
        command += ["--original-runs", str(args.original_runs)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    if args.weights is None:
        from benchmarks.offline_models import lite_weights

        args.weights = lite_weights(0)
    temporary = None
    if args.dataset is None:
        args.dataset = temporary = generated()
    elif args.per_class:
        args.dataset = temporary = subset(pathlib.Path(args.dataset), args.per_class)
    try:
        cached = child(args, "cached")
        original = child(args, "original")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary)
    per_partition = original["seconds"] / original["timed_runs"]
    original_total = per_partition * args.runs
    images_per_second = cached["images"] / cached["embed_seconds"]
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model {args.model}; "
          f"{cached['images']} images in {cached['labels']} classes; {args.runs} partitions, "
          f"valid share {args.valid_share}")
    print(f"Encoder throughput (one pass over all images): {images_per_second:.1f} images/s")
    print(f"(a) original protocol: {per_partition:.1f} s per partition x {args.runs} = {original_total:.1f} s "
          f"({original['timed_runs']} partitions timed), peak RSS {original['peak_rss_mb']:.0f} MB")
    print(f"(b) cached protocol: {cached['seconds']:.1f} s in all (one encode pass {cached['embed_seconds']:.1f} s + "
          f"{args.runs} partitions {cached['seconds'] - cached['embed_seconds']:.2f} s), "
          f"peak RSS {cached['peak_rss_mb']:.0f} MB, cache {cached['cache_bytes'] / 1e6:.1f} MB")
    print(f"ratio b/a = {cached['seconds'] / original_total:.4f} (speed-up {original_total / cached['seconds']:.1f}x); "
          f"b / one encode pass = {cached['seconds'] / cached['embed_seconds']:.3f}")
    print(f"peak RSS b - a = {cached['peak_rss_mb'] - original['peak_rss_mb']:+.0f} MB "
          f"(target <= 2 x cache = {2 * cached['cache_bytes'] / 1e6:.1f} MB)")
    common = min(args.runs, original["timed_runs"])
    same = cached["accuracies"][:common] == original["accuracies"][:common]
    print(f"same accuracies on the {common} partitions run by both: {same}")


if __name__ == "__main__":
    main(sys.argv[1:])
