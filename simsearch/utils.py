"""Device selection, bf16 detection, the memory allocator's settings, a switchable profiler and a loss scaler that
reports skipped optimizer steps."""

from __future__ import annotations

import contextlib
import cProfile
import ctypes
import ctypes.util
import os
import pathlib
import pstats
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import pandas as pd
import threadpoolctl
import torch

from simsearch.errors import UserError

__all__ = [
    "NativeScalerV2",  # noqa: F822  (served by the module's __getattr__, which imports timm on first use)
    "Profile",
    "UserError",
    "bf16_support",
    "check_cuda_support",
    "cpu_has_fast_bf16",
    "get_device",
    "torch_pool_only",
    "prefetch",
    "print_stats",
    "printable",
    "resolve_device",
    "spreadsheet_safe",
    "table",
    "tune_allocator",
    "allocator_environment",
]

# glibc's mallopt parameters (malloc.h) and the threshold the encoder sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_THRESHOLD = 1 << 30  # 1 GiB: every activation buffer of a batch stays in the heap between batches
_allocator_state: dict[str, Any] = {"allocator": "system default", "tuned": False}


def spreadsheet_safe(cell: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (it starts with ``= + - @``, a tab or a carriage
    return) gets a leading apostrophe, as OWASP advises for CSV files; numbers and other text pass unchanged."""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def table(
    data: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], *, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """A DataFrame of columns (a mapping of names to values) or of rows (mappings) whose text stays Python strings.

    pandas 3 stores text as Arrow strings, which refuse a label or file name that is not valid UTF-8 (decoded with
    surrogates, as ``os.fsdecode`` does): every table that holds labels, paths or texts is made here, so such a name
    reaches the CSV files instead of failing after the work is done. ``columns`` orders (and, for no rows, names)
    the columns of a list of rows."""
    if not isinstance(data, Mapping):
        rows = list(data)
        names = list(columns) if columns is not None else list(dict.fromkeys(name for row in rows for name in row))
        data = {name: [row.get(name) for row in rows] for name in names}
    return pd.DataFrame({name: _text_kept(values) for name, values in data.items()})


def _text_kept(values: Sequence[Any]) -> Any:
    if isinstance(values, (pd.Series, pd.Index)) or getattr(values, "dtype", object) is not object:
        return values  # typed already (numbers, or strings a caller chose)
    values = list(values)
    return pd.Series(values, dtype=object) if any(isinstance(value, str) for value in values) else values


def prefetch(items: Iterable[Any], *, depth: int = 2) -> Iterator[Any]:
    """The items of ``items``, in order, each produced ahead of use in one background thread.

    Why: a DataLoader without worker processes decodes and resizes the next batch only after the model is done with
    this one. Pillow releases the GIL while it decodes and resizes, so a thread overlaps that with the forward:
    0.81 -> 0.89 of the forward rate on a 2-core CPU, where worker processes cost more than they save. One thread
    keeps the order and any seeded augmentation as they were; an error of ``items`` is raised here, and leaving the
    loop early stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((True, item)):
                    return
        except BaseException as error:  # raised in the consumer instead
            hand_over((False, error))
            return
        hand_over((False, None))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            is_item, value = ready.get()
            if not is_item:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


def print_stats(summary: dict[str, Any], *, title: str) -> None:
    """Print ``name: value`` lines between rules: the one format of every statistics block."""
    print(f"-- {title} --")
    for name, value in summary.items():
        print(f"{name}: {printable(value)}")  # labels may hold newlines or terminal escapes
    print("-" * (len(title) + 6))



def printable(text: str) -> str:
    """``text`` with control characters (newlines, terminal escapes) spelt as escapes, so a label prints as one
    harmless line; ordinary text, accents included, is unchanged."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(text))


@contextlib.contextmanager
def torch_pool_only(*, active: bool = True) -> Iterator[None]:
    """While torch works, NumPy's BLAS keeps one thread (threadpoolctl); ``active=False`` changes nothing.

    torch (OpenMP) and NumPy/SciPy (OpenBLAS) each start a thread per core, and OpenBLAS keeps its threads spinning a
    while after every call: code that alternates between them on a many-core machine runs two busy pools on the same
    cores. Only for work that is torch's alone: limiting either pool under mixed work (the class-vector fits,
    scikit-learn's t-SNE, whose OpenMP is torch's) made it slower on 2 cores.
    """
    if not active:
        yield
        return
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX) rather than emulating it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_support() -> str:
    """Where bf16 runs fast here: ``"CUDA"``, ``"CPU (AVX512-BF16/AMX)"`` or ``"none"``."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "CUDA"
    return "CPU (AVX512-BF16/AMX)" if cpu_has_fast_bf16() else "none"


def check_cuda_support(*, inform: bool = False) -> tuple[bool, bool]:
    """Return ``(has_cuda, has_bf16)`` (bf16 on CUDA, as the original) so a run can pick its precision before
    building anything; the printed banner also names CPU bf16 and the allocator setting."""
    has_cuda = torch.cuda.is_available()
    has_bf16 = has_cuda and torch.cuda.is_bf16_supported()
    if inform:
        print(f"CUDA support: {has_cuda}")
        print(f"BF16 support: {bf16_support()}")
        print(f"Memory allocator: {_allocator_state['allocator']}")
    return has_cuda, has_bf16


def tune_allocator(*, enabled: bool = True) -> dict[str, Any]:
    """Keep large freed buffers in glibc's heap instead of handing them back to the kernel.

    glibc serves every allocation above 128 KiB (rising with use) from a fresh ``mmap`` and unmaps it on free, so
    each batch faults its activation buffers in again: on a 2-core CPU the model forward ran at half speed, most of
    its time in the kernel. Raising the mmap and trim thresholds (``mallopt``, what ``MALLOC_MMAP_THRESHOLD_`` does)
    keeps them; DataLoader workers forked later inherit it. A no-op off glibc or with ``enabled=False`` (the process
    keeps what it has); returns the setting in effect, for ``results.json``.
    """
    if enabled and not _allocator_state["tuned"]:
        libc = _glibc()
        if libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLD) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD)
            _allocator_state.update(
                allocator=f"glibc malloc, mmap and trim thresholds {ALLOCATOR_THRESHOLD >> 20} MiB (mallopt)",
                tuned=True,
            )
    return dict(_allocator_state)


def allocator_environment() -> dict[str, str]:
    """The environment that gives a process started with it :func:`tune_allocator`'s setting in every thread.

    ``mallopt`` reaches the main thread's heap only: a thread that has allocated before has an arena of its own,
    whose heaps hold at most 64 MiB, so larger activation buffers are mapped and unmapped on every batch anyway.
    Ray Data runs an actor's model in such a thread: on a 2-core CPU its forward ran at 0.65 x the main thread's
    rate. glibc reads these variables when the process starts, and one arena keeps every thread in the main heap.
    """
    threshold = str(ALLOCATOR_THRESHOLD)
    return {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": threshold, "MALLOC_TRIM_THRESHOLD_": threshold}


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, the one whose ``mallopt`` takes these parameters."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- musl and other C libraries lack it
    except (OSError, AttributeError):
        return None
    return libc


def get_device(*, force_cpu: bool = False) -> torch.device:
    """The first CUDA device when there is one (Apple's Metal on a Mac), else the CPU; ``force_cpu`` makes runs
    comparable across machines. The original's call, over :func:`resolve_device`."""
    return resolve_device("cpu" if force_cpu else "auto")


def resolve_device(name: str) -> torch.device:
    """``torch.device`` for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device this machine lacks is a
    :class:`UserError` that says what to use instead."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from error
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s). Use --device cpu or auto."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's Metal backend is not available here. Use --device cpu or auto.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps.")
    return device


class Profile:
    """``cProfile`` as a context manager that can be left in the code and switched off with ``active=False``."""

    def __init__(self, *, active: bool = True) -> None:
        self.active = active
        self.profiler = cProfile.Profile()

    def __copy__(self) -> Profile:
        raise TypeError("A Profile cannot be copied: two copies would share one running profiler.")

    def __deepcopy__(self, memo: dict) -> Profile:
        raise TypeError("A Profile cannot be copied: two copies would share one running profiler.")

    def __enter__(self) -> Profile:
        if self.active:
            self.profiler.enable()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.active:
            self.profiler.disable()

    def dump(
        self, *, filename: str | os.PathLike, sort_by: str = "cumulative", strip_dirs: bool = False
    ) -> pathlib.Path | None:
        """Write ``<filename>.prof`` (for ``pstats``/snakeviz) and a readable ``<filename>.log``; no-op if inactive.

        Returns the ``.log`` path (None when inactive), so the caller can say where it went.
        """
        if not self.active:
            return None
        base = pathlib.Path(filename)
        base.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{base}.log", mode="w", encoding="utf-8") as stream:
            stats = pstats.Stats(self.profiler, stream=stream)
            if strip_dirs:
                stats.strip_dirs()
            stats.sort_stats(sort_by)
            stats.dump_stats(f"{base}.prof")
            stats.print_stats()
        return pathlib.Path(f"{base}.log")


def __getattr__(name: str) -> Any:
    """``NativeScalerV2``, the original's AMP scaler, loads timm when it is first asked for (PEP 562): commands that
    never train, such as the class store's, need not import timm to import this module."""
    if name == "NativeScalerV2":
        from simsearch.amp import NativeScalerV2

        return NativeScalerV2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
