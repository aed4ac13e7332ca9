"""A class vector database that can be edited one class at a time, saved, and queried from the command line.

The store persists a :mod:`prototypes` estimator: each class is the running sum (float64) and count of its image
embeddings, so its mean can be grown with new images later and comes out exactly as if all images had been
averaged at once. Classes are independent rows: adding, updating, renaming or removing one never changes another,
which is the point of replacing a fine-tuned classifier head with a table of class vectors when classes come and
go between releases. A ``balanced`` or ``decorrelated`` store also keeps the shared Gram matrix of all images
(``.npz`` only); ``balanced``, the command line's default for a ``.npz`` store, finds a class added with a single
image (see the README's *Adding a class with a few examples*).

Command line (``python -m engine`` runs :func:`main`)::

    python -m engine build --dataset DIR --model M [--weights FILE] --out store.npz [--classifier balanced]
    python -m engine add-class --store store.zip --images DIR --label NAME
    python -m engine update-class --store store.zip --images DIR --label NAME
    python -m engine remove-class --store store.zip NAME
    python -m engine rename-class --store store.zip OLD NEW
    python -m engine classify --store store.zip IMAGE_OR_DIR [--top-k 4] [--csv predictions.csv]
    python -m engine build --dataset questions.csv --label-column coarse --model MINILM_DIR --out questions.npz
    python -m engine classify --store questions.npz queries.txt        # a text store: one query per line
    python -m engine info --store store.zip
    python -m engine import --embeddings original.zip --store store.zip --model M [--weights FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import banerjee
import engine
import prototypes
import store
import utils

__all__ = [
    "BACKENDS",
    "ClassDBError",
    "ClassVectorStore",
    "FaissBackend",
    "ModelMismatchError",
    "SearchResult",
    "TorchBackend",
    "make_backend",
]

FORMAT = "classdb"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_MEMBER = "classdb.json"
BACKENDS = ("torch", "faiss")

PathLike = str | os.PathLike
Vectors = torch.Tensor | np.ndarray


class ClassDBError(utils.UserError):
    """A class vector store operation or file was invalid: unknown class, duplicate label, bad vectors or file."""


class ModelMismatchError(ClassDBError):
    """Vectors or a file come from another model or preprocessing than the store, so cosines would be meaningless."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Top-k classes per query, best first: ``labels[i][j]`` scored ``scores[i, j]`` (cosine), row ``indexes[i, j]``.

    With ``reject=True``, ``known[i]`` says whether query ``i`` scored at or above the store's threshold on
    ``unknown_scores[i]`` (the classifier's ``score_samples``); its classes are then still the nearest ones.
    """

    labels: list[list[str]]
    scores: torch.Tensor
    indexes: torch.Tensor
    known: list[bool] | None = None
    unknown_scores: list[float] | None = None


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
        scores = queries.to(self.device, torch.float32) @ self.weights.T + self.bias
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


class ClassVectorStore:
    """A class-vector classifier (:mod:`prototypes`) tied to one model and its preprocessing, editable and saved.

    The classifier keeps each class as additive statistics, sorted by label, so the store is a pure function of
    its classes: removing a class and adding it back from the same images restores the identical store, whatever
    the order of operations. ``classifier`` is the unfitted estimator to start from (default: the article's class
    mean); the store fits it as classes arrive.
    """

    def __init__(
        self,
        *,
        dim: int,
        model_name: str,
        model_id: str,
        transform_config: dict[str, Any] | None = None,
        classifier: Any = None,
        modality: str = "image",
    ) -> None:
        if dim < 1:
            raise ClassDBError(f"dim must be positive, got {dim}.")
        self.dim = int(dim)
        self.model_name = model_name
        self.model_id = model_id
        if modality not in ("image", "text"):
            raise ClassDBError(f"modality must be 'image' or 'text', got {modality!r}.")
        self.modality = modality
        self.transform_config = store.plain_json(transform_config or {})
        self.classifier = classifier if classifier is not None else prototypes.ClassMeanClassifier()
        self.classifier_name = _classifier_name(self.classifier)
        self._backends: dict[tuple[str, str], TorchBackend | FaissBackend] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and label in self.labels

    def __repr__(self) -> str:
        return (
            f"ClassVectorStore(classes={len(self)}, images={int(self.counts.sum())}, dim={self.dim}, "
            f"classifier={self.classifier_name!r}, model_id={self.model_id!r})"
        )

    @property
    def _fitted(self) -> bool:
        return hasattr(self.classifier, "classes_")

    @property
    def labels(self) -> list[str]:
        return [str(label) for label in self.classifier.classes_] if self._fitted else []

    @property
    def counts(self) -> torch.Tensor:
        """Images in each class, ``[C]`` int64."""
        if not self._fitted:
            return torch.zeros(0, dtype=torch.int64)
        return torch.from_numpy(self.classifier.class_counts_.copy())

    @property
    def sums(self) -> torch.Tensor:
        """Per-class feature sums ``[C, F]`` float64 (raw embeddings for the class mean): the exact state."""
        if not self._fitted:
            return torch.zeros(0, self.dim, dtype=torch.float64)
        return torch.from_numpy(self.classifier.class_sums_.copy())

    @property
    def means(self) -> torch.Tensor:
        """Class mean vectors ``[C, F]`` float32, in label order: what a ``.zip`` store holds as rows."""
        if not self._fitted:
            return torch.zeros(0, self.dim)
        return torch.from_numpy(self.classifier.class_means_).float()

    def metadata(self) -> dict[str, Any]:
        """What a file needs to know to refuse vectors from another model or preprocessing, and to rebuild."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "model_name": self.model_name,
            "model_id": self.model_id,
            "modality": self.modality,
            "transform_config": self.transform_config,
            "classifier": {"name": self.classifier_name, "params": store.plain_json(self.classifier.get_params())},
        }

    def check_model(
        self,
        *,
        model_id: str | None = None,
        transform_config: dict[str, Any] | None = None,
        modality: str | None = None,
        source: str = "the vectors given",
        where: str = "The store",
    ) -> None:
        """Raise :class:`ModelMismatchError` when ``source`` was made by another model, preprocessing or modality."""
        if modality is not None and modality != self.modality:
            raise ModelMismatchError(
                f"{where} holds {self.modality} classes, not {modality} ones ({source}): query it with "
                f"{self.modality}s, or build a {modality} store."
            )
        if model_id is not None and model_id != self.model_id:
            raise ModelMismatchError(
                f"{where} was built with model '{self.model_id}', not with '{model_id}' ({source}). "
                "Embeddings of different models cannot be compared: use the store's model "
                f"(--model {self.model_name} with the same --weights file) or build a new store."
            )
        if transform_config is not None and store.plain_json(transform_config) != self.transform_config:
            raise ModelMismatchError(
                f"{where} was built with preprocessing {self.transform_config}, not with "
                f"{store.plain_json(transform_config)} ({source}). Use the store's preprocessing or build a new store."
            )

    def index(self, label: str) -> int:
        """Row of ``label``; an unknown label is an error that names close matches."""
        labels = self.labels
        if label not in labels:
            close = difflib.get_close_matches(str(label), labels, n=3)
            hint = f" Did you mean {', '.join(repr(name) for name in close)}?" if close else ""
            raise ClassDBError(f"No class '{label}' in the store ({len(self)} classes).{hint}")
        return labels.index(label)

    def add_class(self, *, label: str, embeddings: Vectors, model_id: str | None = None) -> None:
        """Add a new class from the embeddings ``[n, D]`` of its images."""
        self.add_classes(embeddings=embeddings, labels=[label] * len(embeddings), model_id=model_id)

    def add_classes(self, *, embeddings: Vectors, labels: Sequence[str], model_id: str | None = None) -> None:
        """Add one new class per distinct label from the rows of ``embeddings`` that carry it."""
        self.check_model(model_id=model_id)
        vectors = self._vectors(embeddings, what="embeddings")
        if isinstance(labels, str) or len(labels) != len(vectors):
            raise ClassDBError(f"Got {len(vectors)} embeddings but {len(labels)} labels; give one label per row.")
        for label in set(labels):
            self._check_new_label(label)
        self._change(self.classifier.partial_fit, vectors, np.array(labels, dtype=str))

    def update_class(self, *, label: str, embeddings: Vectors, model_id: str | None = None) -> None:
        """Merge new images into an existing class (exact: float64 sums)."""
        self.check_model(model_id=model_id)
        vectors = self._vectors(embeddings, what="embeddings")
        self.index(label)
        self._change(self.classifier.partial_fit, vectors, np.array([label] * len(vectors), dtype=str))

    def remove_class(self, *, label: str) -> None:
        """Drop one class; every other class's statistics stay bit-for-bit the same (the classifier says the rest)."""
        self.index(label)
        self._change(self.classifier.remove_class, label)

    def rename_class(self, *, label: str, new_label: str) -> None:
        """Give a class a new label, keeping its statistics."""
        self.index(label)
        self._check_new_label(new_label)
        self._change(self.classifier.rename_class, label, new_label)

    def search(
        self,
        *,
        queries: Vectors,
        top_k: int = 4,
        backend: str = "torch",
        model_id: str | None = None,
        device: torch.device | str | None = None,
        reject: bool = False,
    ) -> SearchResult:
        """The ``top_k`` best-scoring classes of each query ``[N, D]`` (the backend is built once, cached).

        Scores are the classifier's: cosine similarity to the class mean by default. ``reject=True`` also marks
        the queries below the calibrated threshold (see :meth:`calibrate`) as of no known class.
        """
        self.check_model(model_id=model_id, source="the queries given")
        vectors = self._vectors(queries, what="queries")
        if not len(self):
            raise ClassDBError("The store has no classes yet: add classes before searching it.")
        key = (backend, str(device))
        if key not in self._backends:
            weights, bias = self.classifier.class_vectors()
            self._backends[key] = make_backend(
                name=backend, weights=torch.from_numpy(weights), bias=torch.from_numpy(bias), device=device
            )
        features = torch.from_numpy(self.classifier.query_features(vectors.double().numpy()))
        scores, indexes = self._backends[key].search(queries=features, top_k=top_k)
        labels = self.labels
        ranked = [[labels[index] for index in row] for row in indexes.tolist()]
        if not reject:
            return SearchResult(labels=ranked, scores=scores, indexes=indexes)
        if self.threshold is None:
            raise ClassDBError("The store has no threshold for unknown queries: calibrate it with images of its "
                               "classes that it does not hold (`calibrate`), or search without reject.")
        unknown_scores = self.classifier.score_samples(vectors.double().numpy())
        return SearchResult(labels=ranked, scores=scores, indexes=indexes,
                            known=(unknown_scores >= self.threshold).tolist(), unknown_scores=unknown_scores.tolist())

    @property
    def threshold(self) -> float | None:
        """The unknown-score threshold set by :meth:`calibrate`, or None."""
        return getattr(self.classifier, "threshold_", None)

    @property
    def threshold_stale(self) -> bool:
        """Whether the classes changed after the threshold was set (it then no longer keeps its stated share)."""
        return bool(getattr(self.classifier, "threshold_stale_", False))

    def calibrate(
        self, *, embeddings: Vectors, true_positive_rate: float = 0.95, model_id: str | None = None
    ) -> None:
        """Set the threshold so ``true_positive_rate`` of ``embeddings`` (images of the store's classes that it does
        not hold) count as known; any later change of the classes marks it stale."""
        self.check_model(model_id=model_id, source="the calibration images")
        if not len(self):
            raise ClassDBError("The store has no classes yet: add classes before calibrating it.")
        self.classifier.calibrate(self._vectors(embeddings, what="calibration images").double().numpy(),
                                  true_positive_rate=true_positive_rate)

    def add_calibration_samples(
        self,
        *,
        embeddings: Vectors,
        labels: Sequence[str],
        true_positive_rate: float = 0.95,
        model_id: str | None = None,
    ) -> None:
        """Calibrate on held-out samples of the store's classes, then add them to their classes.

        The threshold stays marked current: adding a class's own samples only raises that class's known scores a
        little, so the threshold keeps at least its stated share (slightly more).
        """
        self.calibrate(embeddings=embeddings, true_positive_rate=true_positive_rate, model_id=model_id)
        vectors = self._vectors(embeddings, what="calibration images")
        for label in set(labels):
            self.index(label)
        self._change(self.classifier.partial_fit, vectors, np.array(labels, dtype=str))
        self.classifier.threshold_stale_ = False

    def _calibration(self) -> dict[str, Any]:
        """The calibration as plain values, for the ``.zip`` metadata (the ``.npz`` keeps it with the statistics)."""
        if self.threshold is None:
            return {}
        return {"threshold": self.threshold, "true_positive_rate": self.classifier.true_positive_rate_,
                "threshold_stale": self.threshold_stale}

    def save(self, *, path: PathLike) -> pathlib.Path:
        """Write the store atomically: ``.zip`` (CSV of float32 class means in store.py's format, plus metadata) or
        ``.npz``.

        The ``.zip`` form is readable by ``store.load_embeddings`` (means as rows, labels as targets) and holds a
        class-mean store; the ``.npz`` form keeps every float64 statistic of any classifier, so later updates stay
        exact across sessions.
        """
        path = pathlib.Path(path)
        if _file_kind(path) == "zip":
            if self.classifier_name != "mean":
                raise ClassDBError(
                    f"A '{self.classifier_name}' store keeps a Gram matrix that the .zip format (a CSV of class means) "
                    f"cannot hold: save it as {path.with_suffix('.npz')}."
                )
            self._save_zip(path)
        else:
            self._save_npz(path)
        return path

    @classmethod
    def load(
        cls,
        *,
        path: PathLike,
        model_id: str | None = None,
        transform_config: dict[str, Any] | None = None,
    ) -> ClassVectorStore:
        """Read a store written by :meth:`save`; given ``model_id``/``transform_config``, refuse other models' files."""
        path = pathlib.Path(path)
        kind = _file_kind(path)
        if not path.is_file():
            raise FileNotFoundError(f"No class vector store at {path}: create one with `python -m engine build`.")
        loaded = cls._read_zip(path) if kind == "zip" else cls._read_npz(path)
        loaded.check_model(
            model_id=model_id, transform_config=transform_config, source="asked for when loading", where=str(path)
        )
        return loaded

    @classmethod
    def import_embeddings(
        cls,
        *,
        path: PathLike,
        model_name: str,
        model_id: str,
        transform_config: dict[str, Any] | None = None,
    ) -> ClassVectorStore:
        """Build a store from a plain ``store.save_embeddings`` file, which records no model and no image counts.

        Each row counts as one image (rows sharing a label are averaged), so the caller must vouch for the model.
        """
        targets, embeddings = store.load_embeddings(filename=path)
        warnings.warn(
            f"{path} records no image counts: each of its {len(targets)} rows counts as one image, so later "
            "update-class calls weigh an imported class mean as a single image.",
            stacklevel=2,
        )
        imported = cls(
            dim=embeddings.shape[1], model_name=model_name, model_id=model_id, transform_config=transform_config
        )
        imported.add_classes(embeddings=embeddings, labels=[str(target) for target in targets])
        return imported

    def _change(self, action: Any, *args: Any) -> None:
        """Apply one edit to the classifier and forget search backends built on the old state."""
        try:
            action(*args)
        except ValueError as error:
            raise ClassDBError(str(error)) from error
        self._backends.clear()

    def _check_new_label(self, label: str) -> None:
        if not isinstance(label, str) or not label.strip():
            raise ClassDBError(f"A class label must be a non-empty string, got {label!r}.")
        if label in self:
            raise ClassDBError(
                f"Class '{label}' is already in the store: use update_class (CLI: update-class) to add images to it, "
                "or remove it first."
            )

    def _vectors(self, vectors: Vectors, *, what: str) -> torch.Tensor:
        tensor = torch.as_tensor(vectors).detach().cpu()
        if tensor.ndim != 2 or tensor.shape[1] != self.dim or len(tensor) == 0:
            raise ClassDBError(
                f"Expected {what} of shape [n >= 1, {self.dim}] for this store (model '{self.model_id}'), "
                f"got {list(tensor.shape)}. Were they made by another model?"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ClassDBError(f"The {what} must be finite floating-point numbers (dtype {tensor.dtype}).")
        return tensor

    def _save_zip(self, path: pathlib.Path) -> None:
        metadata = {**self.metadata(), "labels": self.labels, "counts": self.counts.tolist(),
                    "calibration": self._calibration()}
        with (
            store.atomic_path(path) as temporary,
            tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder,
        ):
            written = store.save_embeddings(
                embeddings=self.means.numpy(),
                targets=np.array(self.labels, dtype=object),
                filename=pathlib.Path(folder) / path.name,
            )
            with zipfile.ZipFile(written, "a", compression=zipfile.ZIP_DEFLATED) as archive:
                (table,) = archive.namelist()
                metadata["checksum"] = _zip_checksum(archive.read(table), metadata["counts"])
                archive.writestr(METADATA_MEMBER, json.dumps(metadata, indent=1))
            os.replace(written, temporary)

    def _save_npz(self, path: pathlib.Path) -> None:
        statistics = self.classifier.get_statistics() if self._fitted else {}
        statistics["classes"] = np.array(self.labels, dtype=str)
        metadata = {**self.metadata(), "checksum": _checksum(statistics)}
        with store.atomic_path(path) as temporary, temporary.open("wb") as stream:
            np.savez_compressed(stream, metadata=np.array(json.dumps(metadata)), **statistics)

    @classmethod
    def _from_metadata(cls, metadata: Any, *, path: pathlib.Path) -> ClassVectorStore:
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise ClassDBError(f"{path} is not a class vector store (its metadata has no format '{FORMAT}').")
        if metadata.get("version") not in READABLE_VERSIONS:
            raise ClassDBError(
                f"{path} uses class store format version {metadata.get('version')}; this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Rebuild the store with this version."
            )
        described = metadata.get("classifier", {"name": "mean", "params": {}})
        try:
            classifier = prototypes.make_classifier(described["name"], **described["params"])
            return cls(
                dim=int(metadata["dim"]),
                model_name=str(metadata["model_name"]),
                model_id=str(metadata["model_id"]),
                transform_config=metadata["transform_config"],
                classifier=classifier,
                modality=metadata.get("modality", "image"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ClassDBError(f"{path}: the store metadata is damaged ({error}); rebuild the store.") from error

    def _fill(self, statistics: dict[str, np.ndarray], *, path: pathlib.Path) -> None:
        """Install statistics read from ``path`` after the classifier has checked that they are consistent."""
        if not len(statistics["classes"]):
            return
        sums = np.asarray(statistics.get("class_sums", np.zeros((0, 0))))
        if sums.ndim != 2 or sums.shape[1] != self.dim:
            raise ClassDBError(
                f"{path}: class sums {list(sums.shape)} do not fit a store of dimension {self.dim}; the file is "
                "damaged."
            )
        try:
            self.classifier.set_statistics(**statistics)
        except ValueError as error:
            raise ClassDBError(f"{path}: {error}; the file is damaged.") from error

    @classmethod
    def _read_zip(cls, path: pathlib.Path) -> ClassVectorStore:
        targets, means = store.load_embeddings(filename=path, text_targets=True)
        with zipfile.ZipFile(path) as archive:
            store.check_unpacked_sizes(archive, path=path)
            if METADATA_MEMBER not in archive.namelist():
                raise ClassDBError(
                    f"{path} has no {METADATA_MEMBER}: it is a plain store.save_embeddings file that records no model "
                    f"or image counts. Import it with `python -m engine import --embeddings {path} --store NEW.zip "
                    "--model M` (or ClassVectorStore.import_embeddings)."
                )
            try:
                metadata = json.loads(archive.read(METADATA_MEMBER))
            except json.JSONDecodeError as error:
                raise ClassDBError(
                    f"{path}: {METADATA_MEMBER} is not valid JSON ({error}); the file is damaged."
                ) from error
            tables = [name for name in archive.namelist() if name != METADATA_MEMBER]
            if isinstance(metadata, dict) and "checksum" in metadata:
                expected = _zip_checksum(archive.read(tables[0]), metadata.get("counts")) if len(tables) == 1 else ""
                _verify_checksum(metadata, expected=expected, path=path)
        loaded = cls._from_metadata(metadata, path=path)
        labels = [str(label) for label in metadata.get("labels", [])]
        if labels != targets.tolist():
            raise ClassDBError(
                f"{path}: the labels of {METADATA_MEMBER} and the CSV's target column differ (in order or content), "
                "so vectors would get the wrong names; the file was edited or damaged. Rebuild the store."
            )
        counts = np.asarray(metadata.get("counts", []))
        sums = means.astype(np.float64) * counts[:, None] if counts.shape == (len(means),) else means
        calibration = metadata.get("calibration") or {}
        if not isinstance(calibration, dict):
            raise ClassDBError(f"{path}: the calibration in {METADATA_MEMBER} is not a mapping; the file is damaged.")
        loaded._fill({"classes": np.array(labels), "class_sums": sums, "class_counts": counts,
                      **{name: np.asarray(value) for name, value in calibration.items()}}, path=path)
        return loaded

    @classmethod
    def _read_npz(cls, path: pathlib.Path) -> ClassVectorStore:
        try:
            with zipfile.ZipFile(path) as archive:
                store.check_unpacked_sizes(archive, path=path)
            with np.load(path, allow_pickle=False) as arrays:
                metadata = json.loads(str(arrays["metadata"]))
                statistics = {name: arrays[name] for name in arrays.files if name != "metadata"}
        except store.StoreError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise ClassDBError(
                f"Cannot read a class vector store from {path}: {error}. Is the file complete? It may be damaged; "
                "rebuild it or restore a copy."
            ) from error
        _verify_checksum(metadata, expected=_checksum(statistics), path=path)
        renamed = {"labels": "classes", "sums": "class_sums", "counts": "class_counts"}  # version 1 names
        statistics = {renamed.get(name, name): value for name, value in statistics.items()}
        loaded = cls._from_metadata(metadata, path=path)
        loaded._fill(statistics, path=path)
        return loaded


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of named arrays (names, types, shapes and bytes), so an edited or damaged store is refused."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _zip_checksum(table: bytes, counts: Any) -> str:
    """The checksum of a ``.zip`` store: its CSV of class means and the image counts of its metadata."""
    try:
        counts = np.asarray(counts, dtype=np.int64)
    except (TypeError, ValueError):
        return ""  # counts that are not whole numbers match no checksum
    return _checksum({"table": np.frombuffer(table, dtype=np.uint8), "counts": counts})


def _verify_checksum(metadata: Any, *, expected: str, path: pathlib.Path) -> None:
    """Refuse a store whose content does not match the checksum written with it (files without one predate it)."""
    recorded = metadata.get("checksum") if isinstance(metadata, dict) else None
    if recorded is not None and recorded != expected:
        raise ClassDBError(
            f"{path}: its content does not match the checksum written with it; the file was edited or damaged. "
            "Rebuild the store or restore a copy."
        )


def _classifier_name(classifier: Any) -> str:
    """The command-line name of a :mod:`prototypes` estimator, which a store file records to rebuild it."""
    try:
        return prototypes.classifier_name(classifier)
    except ValueError as error:
        raise ClassDBError(f"A store needs a classifier of prototypes.CLASSIFIERS: {error}") from error


def _file_kind(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".zip", ".npz"):
        raise ClassDBError(
            f"Unsupported store file name {path}: use a .zip (CSV, readable by store.load_embeddings) "
            "or a .npz (compact binary) suffix."
        )
    return suffix[1:]


@dataclasses.dataclass
class _Model:
    """An encoder with everything a store records about it."""

    modality: str
    name: str
    id: str
    transform_config: dict[str, Any]
    transform: Any
    encoder: engine.Encoder
    batch_size: int

    @classmethod
    def create(cls, *, modality: str, model_name: str, weights: str | None, cpu: bool, batch_size: int) -> _Model:
        encoder = engine.create_encoder(
            modality=modality, model_name=model_name, weights=weights, device=utils.get_device(force_cpu=cpu)
        )
        transform = None if modality == "text" else engine.eval_transform(encoder.model)[1]
        return cls(
            modality=modality,
            name=model_name,
            id=engine.model_id(encoder.model),
            transform_config=store.plain_json(engine.preprocessing_config(encoder)),
            transform=transform,
            encoder=encoder,
            batch_size=batch_size,
        )

    def embed(self, samples: Sequence[pathlib.Path] | Sequence[str]) -> torch.Tensor:
        if self.modality == "text":
            return self.encoder.embed_texts(texts=samples, batch_size=self.batch_size, inform=True)
        return self.encoder.embed_images(
            images=samples, transform=self.transform, batch_size=self.batch_size, inform=True
        )

    def check(self, db: ClassVectorStore, *, path: pathlib.Path) -> None:
        db.check_model(
            model_id=self.id, transform_config=self.transform_config, modality=self.modality,
            source="--model/--weights", where=str(path),
        )


def _samples(path: PathLike, *, modality: str) -> tuple[list[str], list[pathlib.Path] | list[str]]:
    """Names and samples to embed: image files, or texts (``.txt`` files of a folder, or the lines of one file)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No {'text' if modality == 'text' else 'image'} file or folder at {path}.")
    if modality == "image":
        images = _image_files(path)
        return [str(image.relative_to(path)) if path.is_dir() else str(image) for image in images], images
    if path.is_dir():
        files = sorted(file for file in path.rglob("*.txt") if not file.name.startswith("."))
        texts = [file.read_text(encoding="utf-8").strip() for file in files]
        named = [(str(file.relative_to(path)), text) for file, text in zip(files, texts) if text]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        named = [(f"{path.name}:{number}", line.strip()) for number, line in enumerate(lines, 1) if line.strip()]
    if not named:
        raise ClassDBError(f"No texts found in {path} (a folder of .txt files, or a file with one text per line).")
    return [name for name, _ in named], [text for _, text in named]


def _image_files(path: pathlib.Path) -> list[pathlib.Path]:
    """``path`` itself if it is a file, else every image under the folder (sorted, hidden files skipped)."""
    if path.is_file():
        return [path]
    names, _ = banerjee.list_image_files(path)
    if not names:
        raise ClassDBError(f"No images ({', '.join(banerjee.IMAGE_EXTENSIONS)}) found under {path}.")
    return [path / name for name in names]


def _open(args: argparse.Namespace) -> tuple[pathlib.Path, ClassVectorStore]:
    path = pathlib.Path(args.store)
    return path, ClassVectorStore.load(path=path)


def _model_for(args: argparse.Namespace, *, modality: str, db: ClassVectorStore | None = None) -> _Model:
    model_name = args.model or (db.model_name if db is not None else None)
    if model_name is None:
        raise ClassDBError(
            "Name the encoder with --model (a timm model name such as tf_efficientnet_lite0 for images, a "
            "sentence-transformers name or folder for texts)."
        )
    if db is not None and modality == "image" and args.weights is None and "+sha256:" in db.model_id:
        raise ClassDBError(
            f"{args.store} was built from a local weights file ({db.model_id}): pass that file with --weights."
        )
    return _Model.create(
        modality=modality, model_name=model_name, weights=args.weights, cpu=args.cpu, batch_size=args.batch_size
    )


def _summary(db: ClassVectorStore) -> str:
    return (f"{len(db)} classes, {int(db.counts.sum())} {db.modality}s, {db.classifier_name} classifier, "
            f"model {db.model_id}")


def _new_store_path(args: argparse.Namespace) -> pathlib.Path:
    """Where a command that creates a store writes it: checked before any slow work, never replaced by accident."""
    path = pathlib.Path(args.store)
    _file_kind(path)
    if path.exists() and not args.force:
        raise ClassDBError(
            f"{path} already exists: pass --force to replace it, or edit it with add-class/update-class/remove-class."
        )
    return path


def _cmd_build(args: argparse.Namespace) -> int:
    path = _new_store_path(args)
    classifier = args.classifier or ("mean" if _file_kind(path) == "zip" else "balanced")
    if classifier != "mean" and _file_kind(path) == "zip":
        raise ClassDBError(f"A '{classifier}' store needs the .npz format: use --out {path.with_suffix('.npz')}.")
    if not 0.0 <= args.calibrate_share < 1.0:
        raise ClassDBError(f"--calibrate-share must lie in [0, 1), got {args.calibrate_share}.")
    if args.embeddings is not None:
        maker, model, embeddings = _from_embedding_set(args)
    else:
        maker = banerjee.make_dataset_maker(
            dataset_path=args.dataset, modality=args.modality, text_column=args.text_column,
            label_column=args.label_column,
        )
        model = _model_for(args, modality=maker.modality)
        embeddings = model.embed(maker.get_texts() if maker.modality == "text" else maker.get_image_paths())
    labels = np.array(maker.get_labels(), dtype=str)[maker.get_image_labels().numpy()]
    db = ClassVectorStore(
        dim=embeddings.shape[1], model_name=model.name, model_id=model.id, transform_config=model.transform_config,
        classifier=prototypes.make_classifier(classifier), modality=maker.modality,
    )
    held_out = torch.zeros(0, dtype=torch.long)
    if args.calibrate_share > 0:
        _, held_out, _ = maker.split_indexes(
            valid_share=args.calibrate_share, test_share=0.0, generator=torch.Generator().manual_seed(0)
        )
    kept = np.setdiff1d(np.arange(len(labels)), held_out.numpy())
    db.add_classes(embeddings=embeddings[kept], labels=labels[kept].tolist(), model_id=model.id)
    if len(held_out):
        db.add_calibration_samples(embeddings=embeddings[held_out], labels=labels[held_out].tolist(),
                                   true_positive_rate=args.true_positive_rate, model_id=model.id)
    db.save(path=path)
    print(f"Built {path}: {_summary(db)}; {_threshold_line(db)}.")
    if 0 < len(held_out) < ROUGH_CALIBRATION:
        print(f"The threshold rests on {len(held_out)} held-out {db.modality}s only, so the share it keeps is rough; "
              "calibrate on more with `calibrate --dataset DIR`.")
    if args.calibrate_share > 0 and not len(held_out):
        print(f"No class has enough samples to hold out {args.calibrate_share:.0%} for the threshold; calibrate later "
              "with `calibrate --dataset DIR`.")
    return 0


def _from_embedding_set(args: argparse.Namespace) -> tuple[banerjee.DatasetMaker, _Model, torch.Tensor]:
    """The listing, model identity and embeddings of a ``python -m distributed`` embedding set: a store built from
    it equals one built from the dataset, without encoding."""
    import distributed

    embedding_set = distributed.read_embedding_set(args.embeddings)
    manifest = embedding_set.manifest
    if manifest["precision"] != "fp32":
        raise ClassDBError(f"{args.embeddings} was encoded in {manifest['precision']}; the store's commands encode "
                           "queries in fp32, so build it from an fp32 embedding set.")
    if args.model is not None and args.model != manifest["model_name"]:
        raise ClassDBError(f"{args.embeddings} was encoded by {manifest['model_id']}, not by --model {args.model}.")
    model = _Model(modality=manifest["modality"], name=manifest["model_name"], id=manifest["model_id"],
                   transform_config=manifest["transform_config"], transform=None, encoder=None,
                   batch_size=args.batch_size)
    return distributed.EmbeddingSetMaker(embedding_set, folder=args.embeddings), model, embedding_set.embeddings


def _cmd_calibrate(args: argparse.Namespace) -> int:
    path, db = _open(args)
    maker = banerjee.make_dataset_maker(
        dataset_path=args.dataset, text_column=args.text_column, label_column=args.label_column
    )
    strangers = sorted(set(maker.get_labels()) - set(db.labels))
    if strangers:
        shown = ", ".join(repr(label) for label in strangers[:5]) + (" ..." if len(strangers) > 5 else "")
        raise ClassDBError(f"{args.dataset} holds classes the store does not know ({shown}): calibration needs "
                           "samples of the store's own classes.")
    model = _model_for(args, modality=db.modality, db=db)
    model.check(db, path=path)
    embeddings = model.embed(maker.get_texts() if maker.modality == "text" else maker.get_image_paths())
    db.calibrate(embeddings=embeddings, true_positive_rate=args.true_positive_rate, model_id=model.id)
    db.save(path=path)
    print(f"Calibrated {path} on {len(embeddings)} {db.modality}s: {_threshold_line(db)}.")
    return 0


def _note_stale_threshold(db: ClassVectorStore, *, path: pathlib.Path) -> None:
    """Say on stderr when the unknown-query threshold no longer fits the classes (the store holds no samples to
    recalibrate on by itself)."""
    if db.threshold is not None and db.threshold_stale:
        print(f"note: the threshold for unknown queries of {path} was set before its classes last changed, so it may "
              "keep fewer or more known samples than it says; run `python -m engine calibrate --store "
              f"{path} --dataset DIR` with samples of its classes that it does not hold.", file=sys.stderr)


def _threshold_line(db: ClassVectorStore) -> str:
    if db.threshold is None:
        return "no threshold for unknown queries (run `calibrate`)"
    note = " (STALE: the classes changed since; run `calibrate`)" if db.threshold_stale else ""
    return (f"unknown below {db.threshold:.4f}, keeping {db.classifier.true_positive_rate_:.0%} of known samples"
            f"{note}")


def _cmd_add_or_update(args: argparse.Namespace) -> int:
    path, db = _open(args)
    if args.command == "add-class":
        db._check_new_label(args.label)
    else:
        db.index(args.label)
    _, samples = _samples(args.samples, modality=db.modality)
    model = _model_for(args, modality=db.modality, db=db)
    model.check(db, path=path)
    embeddings = model.embed(samples)
    if args.command == "add-class":
        db.add_class(label=args.label, embeddings=embeddings, model_id=model.id)
    else:
        db.update_class(label=args.label, embeddings=embeddings, model_id=model.id)
    db.save(path=path)
    count = int(db.counts[db.index(args.label)])
    verb = "Added" if args.command == "add-class" else "Updated"
    print(f"{verb} '{utils.printable(args.label)}' ({count} {db.modality}s) in {path}: {_summary(db)}.")
    _note_stale_threshold(db, path=path)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    path, db = _open(args)
    db.remove_class(label=args.label)
    db.save(path=path)
    print(f"Removed '{utils.printable(args.label)}' from {path}: {_summary(db)}.")
    _note_stale_threshold(db, path=path)
    return 0


def _cmd_rename(args: argparse.Namespace) -> int:
    path, db = _open(args)
    db.rename_class(label=args.label, new_label=args.new_label)
    db.save(path=path)
    print(f"Renamed '{utils.printable(args.label)}' to '{utils.printable(args.new_label)}' in {path}.")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    path, db = _open(args)
    print(f"{path}: {_summary(db)}, dimension {db.dim}")
    print(f"threshold: {_threshold_line(db)}")
    print(f"preprocessing: {db.transform_config}")
    for label, count in zip(db.labels, db.counts.tolist()):
        print(f"{count:8d}  {utils.printable(label)}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    path = _new_store_path(args)
    model = _model_for(args, modality="image")
    db = ClassVectorStore.import_embeddings(
        path=args.embeddings, model_name=model.name, model_id=model.id, transform_config=model.transform_config
    )
    db.save(path=path)
    print(f"Imported {args.embeddings} into {path}: {_summary(db)}.")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    path, db = _open(args)
    names, samples = _samples(args.samples, modality=db.modality)
    model = _model_for(args, modality=db.modality, db=db)
    model.check(db, path=path)
    reject = db.threshold is not None if args.reject is None else args.reject
    if reject:
        _note_stale_threshold(db, path=path)
    result = db.search(
        queries=model.embed(samples),
        top_k=args.top_k,
        backend=args.backend,
        model_id=model.id,
        device=model.encoder.device,
        reject=reject,
    )
    known = result.known or [True] * len(names)
    for index, (name, labels, scores) in enumerate(zip(names, result.labels, result.scores.tolist())):
        shown = [utils.printable(label) for label in labels]
        if not known[index]:
            print(f"{utils.printable(name)}\tunknown\t{result.unknown_scores[index]:.4f} < {db.threshold:.4f}"
                  f"\t[nearest: {shown[0]} {scores[0]:.4f}]")
            continue
        alternatives = " | ".join(f"{label} {score:.4f}" for label, score in zip(shown[1:], scores[1:]))
        print(f"{utils.printable(name)}\t{shown[0]}\t{scores[0]:.4f}" + (f"\t[{alternatives}]" if alternatives else ""))
    if args.csv is not None:
        _write_predictions(path=pathlib.Path(args.csv), names=names, result=result)
        print(f"Predictions written to {args.csv}.")
    return 0


def _write_predictions(*, path: pathlib.Path, names: list[str], result: SearchResult) -> None:
    """One row per image: ``image, label_1, score_1, ..., label_k, score_k``; with rejection also ``known`` and
    ``unknown_score`` (the labels are then the nearest classes)."""
    top_k = result.scores.shape[1]
    header = ["image"] + [f"{field}_{rank}" for rank in range(1, top_k + 1) for field in ("label", "score")]
    rejecting = result.known is not None
    header += ["known", "unknown_score"] if rejecting else []
    rows = []
    for index, (name, labels, scores) in enumerate(zip(names, result.labels, result.scores.tolist())):
        row = [name] + [value for pair in zip(labels, scores) for value in pair]
        rows.append(row + ([bool(result.known[index]), float(result.unknown_scores[index])] if rejecting else []))
    store.write_csv(path, {name: [row[column] for row in rows] for column, name in enumerate(header)})


ROUGH_CALIBRATION = 100  # fewer held-out samples than this make a threshold whose kept share is rough
WRITING_COMMANDS = ("build", "add-class", "update-class", "remove-class", "rename-class", "import", "calibrate")
LOCK_TIMEOUT_S = 60.0  # how long a command waits for another writer of the same store


COMMANDS = {
    "build": _cmd_build,
    "add-class": _cmd_add_or_update,
    "update-class": _cmd_add_or_update,
    "remove-class": _cmd_remove,
    "rename-class": _cmd_rename,
    "classify": _cmd_classify,
    "calibrate": _cmd_calibrate,
    "info": _cmd_info,
    "import": _cmd_import,
}


def run_command(args: argparse.Namespace) -> int:
    """Carry out one parsed class-store command (``cli.class_store_parser``); writers hold the store's lock."""
    if args.command not in WRITING_COMMANDS:
        return COMMANDS[args.command](args)
    lock = store.acquire_writer_lock(args.store, timeout=LOCK_TIMEOUT_S)
    try:
        return COMMANDS[args.command](args)
    finally:
        lock.release()
