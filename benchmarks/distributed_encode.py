"""The distributed encode on a local Ray against the single-process encode pass, side by side in one run.

On the same cores: the package's single-process encode pass (``protocol.embed_all_images``, DataLoader in the
main process, as the research script runs it), then ``distributed.encode_dataset`` with 1 actor (all CPUs) and
with 2 actors (half the CPUs each), images/s and the ratio to the single-process pass; the largest difference of
the Ray embeddings from the single-process ones; and the time to fit the class mean and the decorrelated
classifier from the shards' statistics against a fit on the gathered embeddings, with the largest difference of
their statistics relative to each statistic's scale.

A run costs a fixed start-up (Ray starts its actors, each imports torch and timm and builds the model) plus a time
per image. Every variant also encodes the dataset's first ``--probe-share`` of samples (a folder of links), and the
two timings split each run into ``start-up s`` and the ``steady`` images/s of the pass once running
(``(N - n) / (T_N - T_n)``): the steady ratio is what a dataset many times larger sees::

    python -m benchmarks.distributed_encode --dataset ../shared/data/caltech101 [--weights FILE] [--actors 1 2]

On N GPUs with one actor each, images/s scale with N up to the rate at which the nodes read and decode files: a
paper estimate is N times the per-actor rate printed here for a GPU actor.
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
from benchmarks.offline_models import lite_weights
from simsearch import (
    distributed,
    protocol,
)
from simsearch.classifiers import prototypes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="class-folder image dataset")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="local weights (default: the offline Lite0 package file)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--probe-share", type=float, default=0.1,
                        help="share of the images encoded a second time to split start-up from the steady rate")
    return parser.parse_args(argv)


def probe_listing(maker: banerjee.SampleListing, *, share: float, folder: pathlib.Path) -> banerjee.SampleListing:
    """The first ``share`` of ``maker``'s images as a class-folder dataset of links in ``folder``."""
    paths, labels, names = maker.get_samples(), maker.get_image_labels().tolist(), maker.get_labels()
    for index in range(max(1, round(share * len(paths)))):
        link = folder / names[labels[index]] / f"{index:08d}{pathlib.Path(paths[index]).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pathlib.Path(paths[index]).resolve())
    return banerjee.make_dataset_maker(dataset_path=folder)


def single_process_seconds(maker: banerjee.SampleListing, spec: distributed.EncoderSpec,
                           batch_size: int) -> tuple[float, torch.Tensor]:
    """Seconds to build the encoder and embed every image in the main process, as the script does, and the
    embeddings."""
    started = time.perf_counter()
    encoder, _, _ = spec.build(device="cpu")
    embeddings, _ = protocol.embed_all_images(encoder=encoder, maker=maker, batch_size=batch_size, workers=0,
                                              transform=engine.eval_transform(encoder.model)[1])
    return time.perf_counter() - started, embeddings


def start_up_and_steady(*, probe: tuple[int, float], full: tuple[int, float]) -> tuple[float, float]:
    """``(start-up seconds, steady images/s)``: the line through two runs' ``(images, seconds)``."""
    (probe_images, probe_seconds), (images, seconds) = probe, full
    steady = (images - probe_images) / (seconds - probe_seconds)
    return probe_seconds - probe_images / steady, steady


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.weights is None and args.model == "tf_efficientnet_lite0":
        args.weights = lite_weights(0)
    maker = banerjee.make_dataset_maker(dataset_path=args.dataset)
    spec = distributed.EncoderSpec(modality="image", model_name=args.model, weights=args.weights)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        probe = probe_listing(maker, share=args.probe_share, folder=pathlib.Path(scratch) / "probe")
        sizes = (len(probe.get_samples()), len(maker.get_samples()))
        probe_seconds, _ = single_process_seconds(probe, spec, args.batch_size)
        seconds, reference = single_process_seconds(maker, spec, args.batch_size)
        rows.append(("single process (the script)", seconds, (probe_seconds, seconds), ""))
        print(f"{sizes[1]} images of {args.dataset}; single process: {sizes[1] / seconds:.1f} images/s", flush=True)
        ray = distributed.init_ray(num_cpus=args.num_cpus)
        for actors in args.actors:
            timings = []
            for listing, name in ((probe, f"probe-{actors}"), (maker, f"actors-{actors}")):
                manifest = distributed.encode_dataset(maker=listing, spec=spec, out=pathlib.Path(scratch) / name,
                                                      actors=actors, batch_size=args.batch_size)
                timings.append(manifest["encode_seconds"])
            out = pathlib.Path(scratch) / f"actors-{actors}"
            difference = float((distributed.read_embedding_set(out).embeddings - reference).abs().max())
            rows.append((f"local Ray, {actors} actor(s) x {manifest['cpus_per_actor']:g} CPU", timings[1],
                         tuple(timings), f"max |diff| {difference:.1e}, {len(manifest['shards'])} shards"))
            print(f"local Ray, {actors} actor(s): {sizes[1] / timings[1]:.1f} images/s", flush=True)
        print(f"\nprobe: the first {sizes[0]} images; start-up and steady rate from the two runs of each variant")
        print(f"{'encode':34s} {'images/s':>9s} {'ratio':>6s} {'start-up s':>10s} {'steady/s':>9s} {'ratio':>6s}  "
              "outputs")
        baseline_rate, baseline_steady = None, None
        for name, seconds, (probe_seconds, _), outputs in rows:
            start_up, steady = start_up_and_steady(probe=(sizes[0], probe_seconds), full=(sizes[1], seconds))
            baseline_rate = baseline_rate or sizes[1] / seconds
            baseline_steady = baseline_steady or steady
            print(f"{name:34s} {sizes[1] / seconds:9.1f} {sizes[1] / seconds / baseline_rate:6.2f} {start_up:10.1f} "
                  f"{steady:9.1f} {steady / baseline_steady:6.2f}  {outputs}")
        embedded = distributed.read_embedding_set(out)
        for name in ("mean", "decorrelated"):
            started = time.perf_counter()
            merged = distributed.fit_shards(out, prototypes.make_classifier(name))
            merge_seconds = time.perf_counter() - started
            started = time.perf_counter()
            single_fit = prototypes.make_classifier(name).fit(embedded.embeddings.numpy(), embedded.targets.numpy())
            fit_seconds = time.perf_counter() - started
            # relative to each statistic's own scale: sums of squares over thousands of images are large; the class
            # labels, compared by the fit's check, are not numbers
            gaps = {key: float(np.abs(merged.get_statistics()[key] - value).max() / max(np.abs(value).max(), 1e-300))
                    for key, value in single_fit.get_statistics().items()
                    if value.dtype.kind in "fiu" and np.isfinite(value).all()}
            worst = max(gaps, key=gaps.get)
            print(f"{name:13s} fit from shard statistics {merge_seconds:6.2f} s, gathered fit {fit_seconds:6.2f} s, "
                  f"largest relative statistic difference {gaps[worst]:.1e} ({worst})")
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
