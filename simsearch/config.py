"""The package's typed settings, each resolved once and then passed on as explicit keyword arguments.

A leaf without torch, so the command line reads its defaults from here and answers ``--help`` at once: one place
for each default, shared by the parsers (``cli``), the encoder (``engine``) and the grid (``grid``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["AUTO", "EncoderConfig", "GridSettings", "LoaderSettings", "RunSettings"]

AUTO = "auto"  # a loader setting chosen for the device by :meth:`LoaderSettings.resolve`


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """An encoder's settings. ``topk`` is read only by the original's ``encode``/``evaluate``/``infer`` adapters
    (its ``config.topk``); everything else ranks with an explicit ``top_k``."""

    topk: int = 4
    short_run_batches: int | None = None  # stop after this many batches, for quick checks
    channels_last: bool = True  # faster on CPU
    precision: str = "fp32"  # "fp32", "bf16" (CPU or CUDA) or "fp16" (CUDA)
    compile: bool = False  # torch.compile the image model (falls back to eager, with a warning, where it fails)
    tune_allocator: bool = True  # keep activation buffers in glibc's heap between batches (utils.tune_allocator)
    prefetch: bool = True  # without loader workers, the next batch is prepared in a thread (utils.prefetch)

    @classmethod
    def resolve(cls, config: Any = None) -> EncoderConfig:
        """``config`` as an :class:`EncoderConfig`: the original passes any object (a ``SimpleNamespace``) with some
        of these attributes; the missing ones take the defaults above, and unknown ones are ignored."""
        if isinstance(config, cls):
            return config
        if config is None:
            return cls()
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)
                      if hasattr(config, field.name)})


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """How samples reach the encoder: worker processes and batch size, resolved once for the device.

    ``auto`` on CUDA: a worker per core but one (at most 16) and batches of 256, so that decoding on the CPU keeps
    the GPU fed; on a CPU: no workers (decoding in the process that runs the model beats workers that compete with
    it for the cores, docs/speed.md) and batches of 32. Explicit values always win.
    """

    workers: int
    batch_size: int

    GPU_BATCH_SIZE = 256
    CPU_BATCH_SIZE = 32
    MAX_GPU_WORKERS = 16

    @classmethod
    def resolve(
        cls, *, device_type: str, workers: int | str = AUTO, batch_size: int | str = AUTO, cpu_count: int | None = None
    ) -> LoaderSettings:
        on_gpu = device_type == "cuda"
        if workers == AUTO:
            cores = cpu_count or os.cpu_count() or 1
            workers = min(cores - 1, cls.MAX_GPU_WORKERS) if on_gpu else 0
        if batch_size == AUTO:
            batch_size = cls.GPU_BATCH_SIZE if on_gpu else cls.CPU_BATCH_SIZE
        return cls(workers=int(workers), batch_size=int(batch_size))

    def describe(self) -> str:
        return f"{self.workers} loader workers, batches of {self.batch_size}"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What every partition of one experiment shares, resolved once by the script or the grid and taken by both
    protocols: the partitions (``runs``, ``valid_share``, ``seed``), how they are scored (``top_k``,
    ``confidence``), the classifier, and ``short_run`` (every encoding pass stops after that many batches)."""

    runs: int = 20
    valid_share: float = 0.2
    top_k: int = 4
    seed: int | None = 17  # None keeps torch's fixed default seed, as the original's generator does
    confidence: float = 0.95
    classifier: Any = "mean"  # a command-line name (baselines.ESTIMATOR_NAMES) or an unfitted estimator
    short_run: int | None = None


@dataclasses.dataclass(frozen=True)
class GridSettings:
    """What every cell of the grid shares; part of each cell's key, so changing any of it computes new cells."""

    runs: int = 20
    valid_share: float = 0.2
    top_k: int = 4
    seed: int = 17
    confidence: float = 0.95
    batch_size: int = 32
    workers: int = 0
    device: str = "cpu"  # resolved: the grid's --device auto becomes the device it found
    precision: str = "fp32"

    def run_settings(self, classifier: Any) -> RunSettings:
        """The settings of one cell's partitions: the grid's, with one classifier."""
        return RunSettings(runs=self.runs, valid_share=self.valid_share, top_k=self.top_k, seed=self.seed,
                           confidence=self.confidence, classifier=classifier)
