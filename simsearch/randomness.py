"""Seeding helpers for reproducible runs (random, NumPy, torch, cuDNN/cuBLAS and DataLoader workers).

Reproducibility is opt-in: varied results across runs are useful during research because they expose how much a
metric depends on the data partition; fixed seeds are for final, reportable numbers.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["make_torch_generator", "seed_worker", "set_determinism"]

# cuBLAS needs a fixed workspace to give bit-identical results (CUDA docs, "Results Reproducibility").
_CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_determinism(*, seed: int, use_deterministic_algorithms: bool = False) -> None:
    """Seed every global generator and make cuDNN choose reproducible kernels.

    ``use_deterministic_algorithms`` additionally makes torch raise on operations without a deterministic
    implementation; it is off by default because some of those are needed and merely slower when replaced.
    ``PYTHONHASHSEED`` only affects Python processes started after this call (e.g. spawned DataLoader workers).
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32) (NumPy's limit), got {seed!r}.")
    os.environ["PYTHONHASHSEED"] = str(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE_CONFIG)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # Seeds the CPU and all CUDA generators.
    torch.use_deterministic_algorithms(use_deterministic_algorithms)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and NumPy from the per-worker torch seed.

    torch seeds each worker as base_seed + worker_id (base_seed drawn from the DataLoader's generator), but
    leaves ``random`` and NumPy alone, so without this forked workers share NumPy's state.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_torch_generator(*, seed: int | None = None, device: str | torch.device | None = None) -> torch.Generator:
    """A private generator for splits and DataLoaders, so their draws do not depend on other RNG users.

    Without ``seed`` it keeps torch's fixed default seed, as the original does: calls without a seed repeat the
    same draws. For fresh randomness pass ``seed=random.SystemRandom().randrange(2**32)`` (and record it).
    """
    generator = torch.Generator(device=device or "cpu")
    if seed is not None:
        generator.manual_seed(seed)
    return generator
