"""A class vector database that can be edited one class at a time and saved: the persisted store and its files.

The store persists a :mod:`prototypes` estimator: each class is the running sum (float64) and count of its image
embeddings, so its mean can be grown with new images later and comes out exactly as if all images had been
averaged at once. Classes are independent rows: adding, updating, renaming or removing one never changes another,
which is the point of replacing a fine-tuned classifier head with a table of class vectors when classes come and
go between releases. A ``balanced`` or ``decorrelated`` store also keeps the shared Gram matrix of all images
(``.npz`` only); ``balanced``, the command line's default for a ``.npz`` store, finds a class added with a single
image (see the README's *Adding a class with a few examples*).

The commands that build, edit and query a store from the command line (``python -m engine build|add-class|...``)
live in :mod:`cli_store`; this module knows nothing of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

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
            self.check_new_label(label)
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
        self.check_new_label(new_label)
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
        if file_kind(path) == "zip":
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
        kind = file_kind(path)
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

    def check_new_label(self, label: str) -> None:
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
    if not isinstance(counts, list) or not all(type(count) is int for count in counts):
        return ""  # counts that are not JSON whole numbers (2.5, "8", true) match no checksum, rather than rounding
    return _checksum({"table": np.frombuffer(table, dtype=np.uint8), "counts": np.asarray(counts, dtype=np.int64)})


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


def file_kind(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".zip", ".npz"):
        raise ClassDBError(
            f"Unsupported store file name {path}: use a .zip (CSV, readable by store.load_embeddings) "
            "or a .npz (compact binary) suffix."
        )
    return suffix[1:]
