"""Throughput and top-1 agreement of the class-store search backends (exact torch cosine vs FAISS IndexFlatIP).

Why: a store with a handful of classes needs nothing but torch, while one with very many classes may be worth FAISS;
this measures where that happens on the machine at hand. Class vectors are random Gaussian; each query is a class
vector plus Gaussian noise, so the planted class is the right answer; the default noise is strong enough that among
1,000,000 classes a random class often scores as high, so top-1 agreement is tested on near-ties, not easy cases.

    /work/venv/bin/python -m benchmarks.search_backends                       # 100 / 10,000 / 1,000,000 classes
    /work/venv/bin/python -m benchmarks.search_backends --sizes 100 10000 --queries 2000 --cpu

Memory: the 1,000,000 x 448 float32 corpus is 1.8 GB; with FAISS's normalised copy and index the peak is ~6 GB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence

import faiss
import torch
from tqdm import tqdm

import utils
from simsearch.classdb import vector_store


def synthetic_classes(*, num_classes: int, dim: int, generator: torch.Generator, chunk: int = 100_000) -> torch.Tensor:
    """Random class vectors ``[num_classes, dim]`` float32, drawn in chunks behind a progress bar."""
    corpus = torch.empty(num_classes, dim)
    for start in tqdm(range(0, num_classes, chunk), desc=f"[Corpus {num_classes:,}]", leave=False):
        stop = min(start + chunk, num_classes)
        corpus[start:stop] = torch.randn(stop - start, dim, generator=generator)
    return corpus


def noisy_queries(
    *, corpus: torch.Tensor, num_queries: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, planted class indexes)``: class vectors plus Gaussian noise of ``noise`` times their scale."""
    planted = torch.randint(len(corpus), (num_queries,), generator=generator)
    return corpus[planted] + noise * torch.randn(num_queries, corpus.shape[1], generator=generator), planted


def time_search(
    *,
    backend: vector_store.TorchBackend | vector_store.FaissBackend,
    queries: torch.Tensor,
    top_k: int,
    repeats: int,
    budget_s: float,
) -> tuple[float, torch.Tensor]:
    """Best wall time of up to ``repeats`` searches of all queries, after one warm-up query, and the top-k indexes.

    Repetition stops once ``budget_s`` seconds have been spent, so the largest corpus is searched only once.
    """
    backend.search(queries=queries[:1], top_k=top_k)
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        started = time.perf_counter()
        _, indexes = backend.search(queries=queries, top_k=top_k)
        times.append(time.perf_counter() - started)
    return min(times), indexes


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(
    *,
    sizes: Sequence[int],
    dim: int,
    num_queries: int,
    top_k: int,
    noise: float,
    repeats: int,
    budget_s: float,
    device: torch.device,
    seed: int,
) -> list[dict]:
    """One row per (corpus size, backend): build seconds, queries/s, top-1 accuracy vs the planted class, agreement."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for size in sizes:
        corpus = synthetic_classes(num_classes=size, dim=dim, generator=generator)
        queries, planted = noisy_queries(corpus=corpus, num_queries=num_queries, noise=noise, generator=generator)
        top1 = {}
        for name in vector_store.BACKENDS:
            started = time.perf_counter()
            backend = vector_store.make_backend(
                name=name, weights=torch.nn.functional.normalize(corpus, dim=1), device=device
            )
            build_s = time.perf_counter() - started
            seconds, indexes = time_search(
                backend=backend, queries=torch.nn.functional.normalize(queries, dim=1), top_k=top_k, repeats=repeats,
                budget_s=budget_s,
            )
            top1[name] = indexes[:, 0]
            rows.append(
                {
                    "classes": size,
                    "backend": name if name == "faiss" else f"torch/{device.type}",
                    "build_s": build_s,
                    "queries_per_s": num_queries / seconds,
                    "top1_correct": float((indexes[:, 0] == planted).float().mean()),
                }
            )
            del backend
        agreement = float((top1["torch"] == top1["faiss"]).float().mean())
        for row in rows[-len(vector_store.BACKENDS) :]:
            row["top1_agreement"] = agreement
            row["peak_rss_gib"] = peak_rss_gib()
        print(
            f"{size:>9,} classes: corpus {corpus.numel() * 4 / 2**20:,.1f} MiB, top-1 agreement {agreement:.4f}",
            file=sys.stderr,
        )
        del corpus
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000, 1_000_000], help="numbers of classes")
    parser.add_argument("--dim", type=int, default=448, help="vector dimension (default 448)")
    parser.add_argument("--queries", type=int, default=200, help="queries per corpus size (default 200)")
    parser.add_argument("--top-k", type=int, default=4, help="neighbours per query (default 4)")
    parser.add_argument(
        "--noise", type=float, default=4.0, help="query noise relative to the class vectors (4: near-ties at 1M)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="most timed repetitions; the best is reported")
    parser.add_argument("--budget", type=float, default=5.0, help="stop repeating after this many seconds")
    parser.add_argument("--cpu", action="store_true", help="run the torch backend on the CPU even with CUDA")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = utils.get_device(force_cpu=args.cpu)
    print(
        f"dim {args.dim}, {args.queries} queries, top-{args.top_k}, noise {args.noise}, "
        f"best of <= {args.repeats} runs within {args.budget:g} s; "
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads), "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)"
    )
    rows = run(
        sizes=args.sizes,
        dim=args.dim,
        num_queries=args.queries,
        top_k=args.top_k,
        noise=args.noise,
        repeats=args.repeats,
        budget_s=args.budget,
        device=device,
        seed=args.seed,
    )
    print(
        f"| {'classes':>9} | {'backend':<10} | {'build s':>8} | {'queries/s':>10} | {'top-1 correct':>13} | "
        f"{'top-1 agreement':>15} | {'peak RSS GiB':>12} |"
    )
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 15}|{'-' * 17}|{'-' * 14}|")
    for row in rows:
        print(
            f"| {row['classes']:>9,} | {row['backend']:<10} | {row['build_s']:>8.3f} | "
            f"{row['queries_per_s']:>10,.0f} | {row['top1_correct']:>13.4f} | "
            f"{row['top1_agreement']:>15.4f} | {row['peak_rss_gib']:>12.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
