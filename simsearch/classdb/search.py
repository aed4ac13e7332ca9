"""Exact search backends for class vectors: score ``features @ weights.T + bias`` and keep the top k.

``torch`` (the default) is one matrix product on the device the store is queried on; ``faiss`` is FAISS's flat
inner-product index on the CPU, for very many classes. Both are exact, so they agree on every ranking (tested).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from simsearch import utils
from simsearch.classdb.files import ClassDBError
from simsearch.classifiers import prototypes

__all__ = ["BACKENDS", "FaissBackend", "TorchBackend", "make_backend"]

BACKENDS = ("torch", "faiss")


class TorchBackend:
    """Exact linear scoring with torch (one matrix product and top-k), on CUDA when available: the default."""

    def __init__(
        self, *, weights: torch.Tensor, bias: torch.Tensor | None = None, device: torch.device | str | None = None
    ) -> None:
        self.device = torch.device(device) if device is not None else utils.get_device()
        self.weights = weights.to(self.device, torch.float32)
        self.bias = (bias if bias is not None else torch.zeros(len(weights))).to(self.device, torch.float32)

    def search(self, *, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, indexes)`` of query features, each ``[num_queries, min(top_k, num_classes)]``, on the CPU."""
        scores = prototypes.linear_scores(features=queries.to(self.device, torch.float32), weights=self.weights,
                                          bias=self.bias)
        values, indexes = prototypes.top_scores(scores, top_k)
        return values.cpu(), indexes.cpu()


class FaissBackend:
    """Exact inner-product search with FAISS ``IndexFlatIP`` (CPU), for many classes.

    The bias rides along as one more coordinate: ``[q, 1] . [w, b] = q . w + b``.
    """

    def __init__(self, *, weights: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self._faiss = _import_faiss()
        bias = bias if bias is not None else torch.zeros(len(weights))
        vectors = _float32_rows(torch.cat([weights, bias[:, None].to(weights.dtype)], dim=1))
        self.index = self._faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def search(self, *, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, indexes)`` of query features, each ``[num_queries, min(top_k, num_classes)]``, on the CPU."""
        if top_k < 1:
            raise ClassDBError(f"top_k must be at least 1, got {top_k}.")
        augmented = _float32_rows(torch.cat([queries, torch.ones(len(queries), 1, dtype=queries.dtype)], dim=1))
        scores, indexes = self.index.search(augmented, min(top_k, self.index.ntotal))
        return torch.from_numpy(scores), torch.from_numpy(indexes).long()


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ClassDBError(
            "The 'faiss' search backend needs the faiss-cpu package: `pip install faiss-cpu`, "
            "or use the default backend 'torch'."
        ) from error
    return faiss


def _float32_rows(vectors: torch.Tensor) -> np.ndarray:
    """A float32 C-contiguous copy, as FAISS needs."""
    return np.array(vectors.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)


def make_backend(
    *,
    name: str,
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> TorchBackend | FaissBackend:
    """The search backend ``name`` (one of :data:`BACKENDS`) scoring ``features @ weights.T + bias``."""
    if name == "torch":
        return TorchBackend(weights=weights, bias=bias, device=device)
    if name == "faiss":
        return FaissBackend(weights=weights, bias=bias)
    raise ClassDBError(f"Unknown search backend '{name}'; use one of {', '.join(BACKENDS)}.")
