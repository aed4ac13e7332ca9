"""Thread settings of every classifier's fit, on an idle machine and under load, side by side in one run.

Why: torch (OpenMP) and NumPy/SciPy (OpenBLAS) each start a thread per core. On a machine that other work keeps busy
a fit whose pools oversubscribe the cores can run several times slower than one held to a single thread. Each
classifier of the family is fitted on the same training part (80 % of the embeddings) under four settings (both
pools as they start; BLAS at one thread; torch at one thread; both at one; and the package's default, which holds
BLAS to one thread only while other processes keep a core busy) with the machine idle, then again while ``--load``
processes spin on the CPU, and the fastest setting under both is named::

    python -m benchmarks.fit_threads --embeddings .cache/embeddings-<key>.pt
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import threadpoolctl
import torch

from simsearch.classifiers import matrices, registry

# (BLAS threads, torch threads, the package's own choice by load on or off); None: the pool as it starts
SETTINGS = {"pools as they start": (None, None, False), "BLAS 1": (1, None, False), "torch 1": (None, 1, False),
            "both 1": (1, 1, False), "package default (by load)": (None, None, True)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--embeddings", required=True, help="an embedding cache file (store.EmbeddingCache, .pt)")
    parser.add_argument("--classifiers", nargs="+", default=["mean", "decorrelated", "balanced", "lda"],
                        help="classifiers to fit (registry.ESTIMATOR_NAMES)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per setting; the median is reported")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes of the loaded runs")
    return parser.parse_args(argv)


def _spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


@contextmanager
def load(processes: int, *, seconds: float) -> Iterator[None]:
    """``processes`` busy loops beside the fits, each ending by itself after ``seconds`` at the latest."""
    workers = [multiprocessing.Process(target=_spin, args=(seconds,), daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def fit_seconds(name: str, X: np.ndarray, y: np.ndarray, *, setting: tuple[int | None, int | None, bool],
                repeats: int) -> float:
    """The median wall time of fitting ``name`` on ``(X, y)`` with BLAS and torch held to ``setting``'s threads."""
    blas, torch_threads, by_load = setting
    previous, busy_cores = torch.get_num_threads(), matrices.BUSY_CORES
    times = []
    try:
        matrices.BUSY_CORES = busy_cores if by_load else float("inf")
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        with threadpoolctl.threadpool_limits(limits=blas, user_api="blas"):
            for _ in range(repeats):
                started = time.perf_counter()
                registry.make_estimator(name).fit(X, y)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
        matrices.BUSY_CORES = busy_cores
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cached = torch.load(args.embeddings, weights_only=True)
    X, y = cached["embeddings"].float().numpy(), cached["targets"].numpy()
    train = np.random.default_rng(17).random(len(y)) < 0.8
    X, y = X[train], y[train]
    print(f"{len(y)} training samples of dimension {X.shape[1]}, {len(np.unique(y))} classes; {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, BLAS {threadpoolctl.threadpool_info()[0]['num_threads']}; "
          f"loaded runs beside {args.load} busy processes; median of {args.repeats} fits")
    rows = {}
    for loaded in (False, True):
        with load(args.load if loaded else 0, seconds=3600):
            for name in args.classifiers:
                for label, setting in SETTINGS.items():
                    rows[name, label, loaded] = fit_seconds(name, X, y, setting=setting, repeats=args.repeats)
    print("\n| classifier | setting | idle s | loaded s | worst of the two, vs the pools as they start |")
    print("|---|---|---|---|---|")
    for name in args.classifiers:
        worst = {label: max(rows[name, label, False], rows[name, label, True]) for label in SETTINGS}
        for label in SETTINGS:
            print(f"| {name} | {label} | {rows[name, label, False]:.2f} | {rows[name, label, True]:.2f} | "
                  f"{worst[label] / worst['pools as they start']:.2f} |")
        print(f"| {name} | fastest under both: **{min(worst, key=worst.get)}** | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
