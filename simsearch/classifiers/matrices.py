"""Dense matrix work of the class-vector estimators, in NumPy on the CPU or in torch on a device.

Every function takes ``device``: None computes in NumPy/SciPy (OpenBLAS ran the Gram matrix and the
eigendecomposition faster than torch's CPU kernels on a 2-core EPYC), a torch device in torch there; results come
back as NumPy arrays either way, so the estimators' statistics stay float64 NumPy whatever ran them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch


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
