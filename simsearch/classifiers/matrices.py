"""Dense matrix work of the class-vector estimators, in NumPy on the CPU or in torch on a device.

Every function takes ``device``: None computes in NumPy/SciPy (OpenBLAS ran the Gram matrix and the
eigendecomposition faster than torch's CPU kernels on a 2-core EPYC), a torch device in torch there; results come
back as NumPy arrays either way, so the estimators' statistics stay float64 NumPy whatever ran them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import scipy.linalg
import threadpoolctl
import torch

# Other processes keeping this many cores busy make the estimators' NumPy work run its BLAS on one thread:
# benchmarks/fit_threads.py, 2 cores, Caltech-101: beside two busy processes one thread fitted 2 to 2.9 times faster
# (decorrelated 10.5 s -> 3.6 s), on an idle machine the default pool 8 to 50 % faster (lda 2.06 s -> 1.35 s).
BUSY_CORES = 0.5
LOAD_PROBE_S = 0.05
# Below this many features a fit's matrix work takes milliseconds whatever the threads: no probe.
PROBED_FEATURES = 256


def cores_busy_elsewhere(*, interval: float = LOAD_PROBE_S) -> float:
    """How many cores other processes kept busy over ``interval`` seconds: the machine's busy time (``/proc/stat``)
    less this process's own. 0 where ``/proc/stat`` is not there (not Linux)."""

    def busy_seconds() -> tuple[float, float]:
        with open("/proc/stat", encoding="ascii") as stream:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, stream.readline().split()[1:9])
        own = os.times()
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system

    try:
        machine, own = busy_seconds()
        started = time.perf_counter()
        time.sleep(interval)
        machine_after, own_after = busy_seconds()
    except (OSError, ValueError):
        return 0.0
    return max(0.0, (machine_after - machine) - (own_after - own)) / (time.perf_counter() - started)


@contextlib.contextmanager
def blas_threads_for_load(*, active: bool = True) -> Iterator[None]:
    """NumPy's BLAS on one thread while other processes keep :data:`BUSY_CORES` busy, else as it is: the fastest
    setting both on an idle and on a loaded machine (see :data:`BUSY_CORES`). ``active=False`` changes nothing."""
    if active and cores_busy_elsewhere() >= BUSY_CORES:
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            yield
    else:
        yield


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): cosine similarity becomes a dot product."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def sums_by_row(features: np.ndarray, *, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """``[num_rows, F]`` sums of the ``features`` rows that belong to each row index (float64)."""
    sums = torch.zeros(num_rows, features.shape[1], dtype=torch.float64)
    return sums.index_add_(0, torch.from_numpy(rows), torch.tensor(features, dtype=torch.float64)).numpy()


def compute_device(device: str | torch.device | None) -> torch.device | None:
    """The torch device of an estimator's ``device`` parameter; None stays None, meaning NumPy on the CPU."""
    return None if device is None else torch.device(device)


def torch_device(device: str | torch.device | None) -> torch.device:
    """Where torch work of a ``device`` parameter runs: that device, or the CPU for None."""
    return compute_device(device) or torch.device("cpu")


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a torch tensor on ``device``, same dtype."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def gram(features: np.ndarray, *, device: torch.device | None) -> np.ndarray:
    """``features.T @ features``, in torch on ``device`` or, for None, in NumPy."""
    if device is None:
        return features.T @ features
    rows = on_device(features, device)
    return (rows.T @ rows).cpu().numpy()


def within_class_scatter(*, gram: np.ndarray, class_sums: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """``sum_i (x_i - m_c(i))(x_i - m_c(i))^T = G_raw - sum_c S_c S_c^T / n_c``: from the raw Gram matrix and the
    class sums alone."""
    return gram - (class_sums.T / class_counts) @ class_sums


def solve_positive(matrix: np.ndarray, right: np.ndarray, *, device: torch.device | None) -> np.ndarray:
    """``matrix^-1 right`` for a positive definite ``matrix``, in torch on ``device`` or, for None, in SciPy."""
    if device is None:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(matrix, check_finite=False), right, check_finite=False)
    return torch.linalg.solve(on_device(matrix, device), on_device(right, device)).cpu().numpy()


def eigh(matrix: np.ndarray, *, device: torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending, clipped at zero: a scatter matrix has none below) and eigenvectors of a symmetric
    matrix, in torch on ``device`` or, for None, in NumPy: the one ``F x F`` decomposition every refit needs."""
    if device is None:
        eigenvalues, eigenvectors = np.linalg.eigh(matrix)
        return eigenvalues.clip(min=0.0), eigenvectors
    eigenvalues, eigenvectors = torch.linalg.eigh(on_device(matrix, device))
    return eigenvalues.clamp(min=0.0).cpu().numpy(), eigenvectors.cpu().numpy()


def product(left: np.ndarray | torch.Tensor, right: np.ndarray, *, device: torch.device | None) -> np.ndarray:
    """``left @ right`` in torch on ``device`` (``left`` may already live there) or, for None, in NumPy."""
    if device is None:
        return left @ right
    left = left if isinstance(left, torch.Tensor) else on_device(left, device)
    return (left @ on_device(right, device).to(left.dtype)).cpu().numpy()


def cholesky_whitener(matrix: np.ndarray, *, device: torch.device | None) -> Callable[[np.ndarray], np.ndarray]:
    """Rows ``x -> L^-1 x`` for the Cholesky factor ``L L^T = matrix`` (positive definite): squared distances
    between mapped rows are Mahalanobis distances under ``matrix``. One factorisation, in the matrix's precision."""
    if device is None:
        factor = scipy.linalg.cholesky(matrix, lower=True, check_finite=False)
        return lambda rows: scipy.linalg.solve_triangular(factor, rows.T, lower=True, check_finite=False).T
    factor_on_device = torch.linalg.cholesky(on_device(matrix, device))
    return lambda rows: torch.linalg.solve_triangular(
        factor_on_device, on_device(rows.T, device).to(factor_on_device.dtype), upper=False).T.cpu().numpy()


def safe_sqrt(values: np.ndarray) -> np.ndarray:
    """Square roots for dividing by: a zero (a class mean at the global mean) divides by one instead."""
    roots = np.sqrt(np.maximum(values, 0.0))
    return np.where(roots > 0, roots, 1.0)
