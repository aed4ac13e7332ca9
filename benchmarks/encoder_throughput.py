"""Encoder throughput of every variant the encoder offers, under each memory allocator, side by side in one run.

Each allocator runs in a child process of its own (an allocator setting holds for a whole process): the system
default, the package's ``utils.tune_allocator`` (the default) and, where the libraries are installed, tcmalloc and
jemalloc preloaded. In each, every image variant (``engine.EncoderConfig``: channels-last, ``--compile``,
``--precision``) embeds the same in-memory batches; the table gives images/s, the ratio to eager NCHW fp32 under the
system allocator, and the largest difference and smallest cosine of the embeddings to eager NCHW fp32 of the same
process. With ``--dataset`` each process also times the whole encode pass of the default variant (decoding
and resizing files in DataLoader workers, or without workers in the main process, with and without the next batch
prepared in a thread: ``utils.prefetch``) against its own model-forward rate on the same images; with ``--texts``
the sentence encoder in fp32 and bf16 on the CPU and, where CUDA is, in fp32, bf16 and fp16 there.
``--text-model-shape`` builds the sentence model from a folder without its weights (random weights, the same
architecture, so the same rate; the GPU check carries no 90 MB MiniLM)::

    python -m benchmarks.encoder_throughput --batches 6 --batch-size 32 [--compile] [--bf16] \\
        [--dataset ../shared/data/caltech101 --images 1024 --workers 0 2] \\
        [--texts ../shared/data/trec/train.csv --text-model models/all-MiniLM-L6-v2 | --text-model-shape FOLDER]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
import warnings

import torch

import banerjee
import engine
import utils
from benchmarks.offline_models import lite_weights, packaged_minilm
from simsearch import protocol

PRELOADS = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
LIBRARY_FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


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
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts of the encode pass (default 0 2)")
    parser.add_argument("--texts", default=None, help="a CSV/TSV of labelled sentences: time the text encoder")
    parser.add_argument("--text-column", default="text", help="column of the sentences in --texts")
    parser.add_argument("--label-column", default="label", help="label column of --texts")
    parser.add_argument("--text-model", default=None, help="sentence-transformers folder (default: packaged MiniLM)")
    parser.add_argument("--text-model-shape", default=None,
                        help="sentence-transformers folder without weights: time its architecture, random weights")
    parser.add_argument("--sentences", type=int, default=2048, help="sentences of --texts to encode")
    parser.add_argument("--allocators", nargs="*", default=None,
                        help="system, tuned, tcmalloc, jemalloc (default: every one available)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def forward_rate(encoder: engine.Encoder, batches: list) -> tuple[float, torch.Tensor]:
    """Samples/s of the model forward over ``batches`` after one warm-up batch, and the embeddings (CPU)."""
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


def available_allocators(requested: list[str] | None) -> dict[str, dict[str, str]]:
    """Allocator name -> environment changes of its child process (a preload only where the library exists)."""
    found = {"system": {}, "tuned": {}}
    for name, library in PRELOADS.items():
        paths = [pathlib.Path(folder) / library for folder in LIBRARY_FOLDERS]
        existing = next((path for path in paths if path.exists()), None)
        if existing is not None:
            found[name] = {"LD_PRELOAD": str(existing)}
    if requested is None:
        return found
    unknown = [name for name in requested if name not in found]
    if unknown:
        raise SystemExit(f"Allocators {unknown} are unknown or not installed here; available: {', '.join(found)}.")
    return {name: found[name] for name in requested}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args)))
        return
    allocators = available_allocators(args.allocators)
    print(f"CPU {cpu_name()}, {os.cpu_count()} cores, bf16: {utils.bf16_support()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; model {args.model}, {args.batches} batches of "
          f"{args.batch_size}")
    results = {}
    for name, environment in allocators.items():
        completed = subprocess.run([sys.executable, __file__, *argv, "--child", name], capture_output=True,
                                   text=True, env={**os.environ, **environment})
        if completed.returncode != 0:
            raise SystemExit(f"The {name} allocator's run failed:\n{completed.stderr[-3000:]}")
        results[name] = json.loads(completed.stdout.strip().splitlines()[-1])
    print_table(results)


def measure(args: argparse.Namespace) -> dict:
    """Every measurement of one process, under the allocator ``args.child``."""
    utils.tune_allocator(enabled=args.child == "tuned")
    if args.weights is None and args.model == "tf_efficientnet_lite0":
        args.weights = lite_weights(0)
    model = engine.create_model(model_name=args.model, weights=args.weights)
    data_config, transform = engine.eval_transform(model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, *data_config["input_size"], generator=generator)
               for _ in range(args.batches)]
    rows = []
    baseline = None
    for name, device, config in variants(args):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder = engine.Encoder(model=model, device=device,
                                     config=_with_allocator(config, tuned=args.child == "tuned"))
            speed, embeddings = forward_rate(encoder, batches)
        baseline = embeddings if baseline is None else baseline
        rows.append(dict(
            variant=name, rate=speed, faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            difference=(embeddings - baseline).abs().max().item(),
            cosine=torch.nn.functional.cosine_similarity(embeddings, baseline).min().item(),
            warnings=[str(warning.message) for warning in caught],
        ))
        model.to("cpu", memory_format=torch.contiguous_format)
    if args.dataset:
        rows.extend(encode_pass(args, model=model, transform=transform))
    if args.texts:
        rows.extend(text_rates(args))
    return {"allocator": utils.tune_allocator(enabled=False)["allocator"], "rows": rows}


def _with_allocator(config: engine.EncoderConfig, *, tuned: bool) -> engine.EncoderConfig:
    return dataclasses.replace(config, tune_allocator=tuned)


def encode_pass(args: argparse.Namespace, *, model: torch.nn.Module, transform) -> list[dict]:
    """The default variant's whole encode pass over files (decode, resize, forward) for each worker count, with
    the per-image transform whole (today's pipeline before the batch split) and split as the package runs it
    (``engine.split_normalization``), against the model-forward rate on the same images in memory."""
    maker = banerjee.DatasetMaker(dataset_path=args.dataset, check_images=False)
    indexes = torch.randperm(maker.get_num_images(), generator=torch.Generator().manual_seed(0))[: args.images]
    encoders = {prefetch: engine.Encoder(model=model, device="cpu", config=engine.EncoderConfig(
        tune_allocator=args.child == "tuned", prefetch=prefetch)) for prefetch in (False, True)}
    dataset = maker.datasets_from_indexes(indexes=indexes, transform=transform)
    batches = [torch.stack([dataset[i][0] for i in range(start, min(start + args.batch_size, len(indexes)))])
               for start in range(0, min(len(indexes), args.batch_size * args.batches), args.batch_size)]
    forward, _ = forward_rate(encoders[True], batches)
    image_transform, batch_transform = engine.split_normalization(transform)
    pipelines = {"whole transform": (transform, None, False),
                 "batch normalise": (image_transform, batch_transform, False),
                 "batch normalise + prefetch (default)": (image_transform, batch_transform, True)}
    rows = []
    for workers in args.workers:
        for name, (per_image, per_batch, prefetch) in pipelines.items():
            if prefetch and workers:
                continue  # utils.prefetch stands in for loader workers; with workers the loader is left as it is
            loader = protocol.make_loader(maker.datasets_from_indexes(indexes=indexes, transform=per_image),
                                          batch_size=args.batch_size, workers=workers,
                                          device=encoders[prefetch].device)
            started = time.perf_counter()
            embeddings, _ = encoders[prefetch].embed(dataloader=loader, batch_transform=per_batch)
            rows.append(dict(variant=f"encode pass, {workers} workers, {name}", forward=forward,
                             rate=len(embeddings) / (time.perf_counter() - started)))
    return rows


def text_rates(args: argparse.Namespace) -> list[dict]:
    """The sentence encoder's rate on the first ``--sentences`` texts of ``--texts``: fp32 and bf16 on the CPU, and
    fp32, bf16 and fp16 on CUDA where there is one; embeddings against the CPU's fp32."""
    maker = banerjee.make_dataset_maker(dataset_path=args.texts, modality="text", text_column=args.text_column,
                                       label_column=args.label_column)
    texts = maker.get_texts()[: args.sentences]
    folder = _shaped_model(args.text_model_shape) if args.text_model_shape else args.text_model or _packaged_minilm()
    model = engine.create_text_model(model_name=folder)
    batches = [texts[start:start + 512] for start in range(0, len(texts), 512)]
    rows, baseline = [], None
    text_variants = [("cpu", "fp32"), ("cpu", "bf16")]
    if torch.cuda.is_available():
        text_variants += [("cuda", precision) for precision in ("fp32", "bf16", "fp16")]
    for device, precision in text_variants:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder = engine.TextEncoder(model=model, device=device, config=engine.EncoderConfig(
                precision=precision, tune_allocator=args.child == "tuned"))
            speed, embeddings = forward_rate(encoder, batches)
        baseline = embeddings if baseline is None else baseline
        name = f"text {pathlib.Path(str(folder)).name}" + ("" if device == "cpu" else f" {device}")
        rows.append(dict(variant=f"{name} {precision}", rate=speed,
                         difference=(embeddings - baseline).abs().max().item(),
                         cosine=torch.nn.functional.cosine_similarity(embeddings, baseline).min().item(),
                         warnings=[str(warning.message) for warning in caught]))
    return rows


def _shaped_model(shape: str) -> pathlib.Path:
    """A copy of the sentence-transformers folder ``shape`` (configuration and tokenizer, no weights) with random
    weights of its architecture, seeded: a rate needs the shape, not the training."""
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoModel

    folder = pathlib.Path(tempfile.mkdtemp()) / f"{pathlib.Path(shape).name}-random-weights"
    shutil.copytree(shape, folder)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


def _packaged_minilm() -> pathlib.Path:
    return packaged_minilm(".cache/models")


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def print_table(results: dict[str, dict]) -> None:
    """One row per allocator and variant; ratios against the system allocator's first row of the same kind."""
    system = {row["variant"]: row for row in results.get("system", {"rows": []})["rows"]}
    image_baseline = next(iter(system.values()), None)
    print(f"{'allocator':10s} {'variant':44s} {'rate/s':>8s} {'vs system':>9s} {'vs NCHW fp32':>12s} "
          f"{'faults':>9s}  embeddings vs fp32 of the same process")
    for name, result in results.items():
        for row in result["rows"]:
            same = system.get(row["variant"])
            versus_same = f"{row['rate'] / same['rate']:9.2f}" if same else f"{'':9s}"
            base = _text_baseline(system, row) if row["variant"].startswith("text") else image_baseline
            versus_base = f"{row['rate'] / base['rate']:12.2f}" if base else f"{'':12s}"
            details = ""
            if "forward" in row:
                details = f"forward {row['forward']:.1f}/s, pass/forward {row['rate'] / row['forward']:.2f}"
            elif "cosine" in row:
                details = f"max |diff| {row['difference']:.1e}, min cosine {row['cosine']:.6f}"
            faults = f"{row['faults']:9d}" if "faults" in row else f"{'':9s}"
            print(f"{name:10s} {row['variant']:44s} {row['rate']:8.1f} {versus_same} {versus_base} {faults}  "
                  f"{details}")
            for message in sorted(set(row.get("warnings", []))):
                print(f"{'':12s}warning: {message[:160]}")
    for name, result in results.items():
        print(f"{name}: {result['allocator']}")


def _text_baseline(system: dict[str, dict], row: dict) -> dict | None:
    """The system allocator's fp32 row of the same text model."""
    return system.get(row["variant"].rsplit(" ", 1)[0] + " fp32")


if __name__ == "__main__":
    main(sys.argv[1:])
