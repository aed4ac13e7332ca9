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
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse
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
    """``[num_rows, F]`` float64 sums of the ``features`` rows that belong to each row index: a sparse one-hot
    matrix times the features, ``n F`` additions (torch's ``index_add_`` took 20 to 70 ms for 400 rows beside
    NumPy's busy BLAS threads, this under 1 ms; 12 ms for 6,900 rows)."""
    one_hot = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))),
                                      shape=(num_rows, len(rows)))
    return np.asarray(one_hot @ features.astype(np.float64, copy=False))


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
    """``matrix^-1 right`` for a positive definite ``matrix``, in torch on ``device`` or, for None, in NumPy: SciPy's
    Cholesky factorisation runs on a second OpenBLAS whose threads contend with NumPy's just after a product, and
    took 14 ms for a 246 x 246 matrix inside an ``lda`` fit against 0.3 ms alone (NumPy's LU: under 1 ms there)."""
    if device is None:
        return np.linalg.solve(matrix, right)
    return torch.linalg.solve(on_device(matrix, device), on_device(right, device)).cpu().numpy()


class Spectrum(NamedTuple):
    """Eigenvalues ``[r]`` (ascending, clipped at zero) and orthonormal eigenvectors ``[F, r]`` of a positive
    semi-definite ``F x F`` matrix; the ``F - r`` directions left out have eigenvalue zero. ``r = F`` from the
    matrix itself (:func:`matrix_spectrum`), ``r < n`` from ``n < F`` rows whose Gram matrix it is
    (:func:`row_spectrum`)."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray

    @property
    def dimension(self) -> int:
        return self.eigenvectors.shape[0]

    @property
    def complete(self) -> bool:
        """Whether every direction is listed (no eigenvalue left out as zero)."""
        return self.eigenvectors.shape[1] == self.eigenvectors.shape[0]

    def all_eigenvalues(self) -> np.ndarray:
        """``[F]``: the listed eigenvalues and a zero for each direction left out, ascending."""
        return np.concatenate([np.zeros(self.dimension - len(self.eigenvalues)), self.eigenvalues])

    def mean_eigenvalue(self) -> float:
        return mean_eigenvalue(trace=float(self.eigenvalues.sum()), dimension=self.dimension)


def mean_eigenvalue(*, trace: float, dimension: int) -> float:
    """The trace over the dimension; 1 for a matrix of zeros, so it can scale ridge strengths."""
    mean = trace / dimension
    return mean if mean > 0 else 1.0


def matrix_spectrum(matrix: np.ndarray, *, device: torch.device | None) -> Spectrum:
    """Every eigenpair of a symmetric positive semi-definite matrix, in torch on ``device`` or, for None, in NumPy:
    the ``F x F`` decomposition of a fit that only has the statistics."""
    if device is None:
        eigenvalues, eigenvectors = np.linalg.eigh(matrix)
        return Spectrum(eigenvalues.clip(min=0.0), eigenvectors)
    eigenvalues, eigenvectors = torch.linalg.eigh(on_device(matrix, device))
    return Spectrum(eigenvalues.clamp(min=0.0).cpu().numpy(), eigenvectors.cpu().numpy())


# Eigenvalues of ``rows @ rows.T`` below this share of the largest are taken as zero by :func:`row_spectrum`: their
# eigenvectors, divided by the root of the eigenvalue, would carry rounding errors larger than themselves.
ROW_SPECTRUM_TOLERANCE = 1e-10


def row_spectrum(rows: np.ndarray, *, device: torch.device | None) -> Spectrum:
    """The nonzero eigenpairs of ``rows.T @ rows`` (``F x F``) from the ``n x n`` matrix ``rows @ rows.T``, for
    ``n < F`` rows: both share their nonzero eigenvalues, and an eigenvector ``u`` of the small one gives
    ``rows.T u / sqrt(lambda)`` of the large one (the kernel form). Rows of fewer samples than features cost
    ``n^2 F`` instead of ``F^3``."""
    small = matrix_spectrum(product(rows, rows.T, device=device), device=device)
    kept = small.eigenvalues > ROW_SPECTRUM_TOLERANCE * max(float(small.eigenvalues.max(initial=0.0)), 0.0)
    eigenvalues = small.eigenvalues[kept]
    eigenvectors = product(rows.T, small.eigenvectors[:, kept] / np.sqrt(eigenvalues), device=device)
    return Spectrum(eigenvalues, eigenvectors)


class ShrunkInverse(NamedTuple):
    """``D^-1 (weight M + ridge I)^-1 D^-1`` for a positive semi-definite ``M`` of spectrum ``spectrum`` and
    ``D = diag(scale)`` (None: the identity): a shrunk precision matrix, applied without forming it. Directions
    the spectrum leaves out have eigenvalue zero, so they get ``1 / ridge``: exact for a :func:`row_spectrum`."""

    spectrum: Spectrum
    weight: float
    ridge: float
    scale: np.ndarray | None = None

    def _inverse_eigenvalues(self) -> np.ndarray:
        return 1.0 / (self.weight * self.spectrum.eigenvalues + self.ridge)

    def _unscaled(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.scale is None else rows / self.scale.astype(rows.dtype)

    def apply(self, rows: np.ndarray) -> np.ndarray:
        """``rows @ inverse`` for rows ``[N, F]`` (the inverse is symmetric), in the rows' precision."""
        rows = self._unscaled(rows)
        vectors = self.spectrum.eigenvectors.astype(rows.dtype)
        projected = rows @ vectors
        applied = (projected * self._inverse_eigenvalues().astype(rows.dtype)) @ vectors.T
        if not self.spectrum.complete:
            applied += (rows - projected @ vectors.T) / rows.dtype.type(self.ridge)
        return self._unscaled(applied)

    def whitening(self) -> np.ndarray:
        """``W`` ``[F, F]`` with ``W W^T`` the inverse, so distances between rows mapped by ``x -> x W`` are
        Mahalanobis distances: ``D^-1 V diag(...)^1/2`` from a complete spectrum, the symmetric root from a thin one."""
        vectors, roots = self.spectrum.eigenvectors, np.sqrt(self._inverse_eigenvalues())
        if self.spectrum.complete:
            return self._unscaled_rows(vectors * roots)
        complement = 1.0 / np.sqrt(self.ridge)
        return self._unscaled_rows((vectors * (roots - complement)) @ vectors.T + complement * np.eye(len(vectors)))

    def _unscaled_rows(self, matrix: np.ndarray) -> np.ndarray:
        return matrix if self.scale is None else matrix / self.scale[:, None]

    def squared_distances(self, queries: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """``[N, C]`` squared Mahalanobis distances under the inverse: from projections onto the listed
        eigenvectors, plus the Euclidean remainder of the directions left out. In float64, as that remainder is a
        difference of large numbers; the queries' dtype comes back."""
        dtype = queries.dtype
        queries, centres = self._unscaled(queries.astype(np.float64)), self._unscaled(centres.astype(np.float64))
        vectors, roots = self.spectrum.eigenvectors, np.sqrt(self._inverse_eigenvalues())
        projected, projected_centres = queries @ vectors, centres @ vectors
        distances = squared_distances(projected * roots, projected_centres * roots)
        if not self.spectrum.complete:
            remainder = squared_distances(queries, centres) - squared_distances(projected, projected_centres)
            distances += np.maximum(remainder, 0.0) / self.ridge
        return distances.astype(dtype)


class RowShrunkInverse(NamedTuple):
    """:class:`ShrunkInverse` of ``M = rows.T @ rows`` for ``n < F`` ``rows``, applied by Woodbury's identity,
    ``(a M + b I)^-1 = (I - R^T (b/a I + R R^T)^-1 R) / b``: one ``n x n`` solve where the
    spectrum costs an ``n x n`` eigendecomposition and an ``F x n x n`` product. What a fit that only applies the
    inverse (``lda``'s class vectors, the folds of its check) needs; :meth:`whitening` decomposes the rows."""

    rows: np.ndarray
    gram: np.ndarray  # rows @ rows.T, which the caller has computed for the traces
    weight: float
    ridge: float
    scale: np.ndarray | None = None
    device: torch.device | None = None

    def apply(self, right: np.ndarray) -> np.ndarray:
        """``right @ inverse`` for rows ``[N, F]`` (the inverse is symmetric)."""
        unscaled = right if self.scale is None else right / self.scale
        if self.weight > 0:
            small = self.gram + self.ridge / self.weight * np.eye(len(self.rows))
            coefficients = solve_positive(small, product(self.rows, unscaled.T, device=self.device),
                                          device=self.device)
            unscaled = unscaled - product(coefficients.T, self.rows, device=self.device)
        applied = unscaled / self.ridge
        return applied if self.scale is None else applied / self.scale

    def whitening(self) -> np.ndarray:
        """The :meth:`ShrunkInverse.whitening` of the same inverse, from the rows' spectrum."""
        return ShrunkInverse(row_spectrum(self.rows, device=self.device), weight=self.weight, ridge=self.ridge,
                             scale=self.scale).whitening()


def squared_distances(queries: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``[N, C]`` squared Euclidean distances, without an ``[N, C, F]`` temporary."""
    return (np.einsum("ij,ij->i", queries, queries)[:, None] - 2 * queries @ centres.T
            + np.einsum("ij,ij->i", centres, centres))


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
