"""A class vector database that can be edited one class at a time and saved: the persisted, editable store.

The store persists a :mod:`~simsearch.classifiers.prototypes` estimator (in the files of
:mod:`simsearch.classdb.files`): each class is the running sum (float64) and count of its image embeddings, so its
mean can be grown with new images later and comes out exactly as if all images had been averaged at once. Classes
are independent rows: adding, updating, renaming or removing one never changes another, which is the point of
replacing a fine-tuned classifier head with a table of class vectors when classes come and
go between releases. A ``balanced`` or ``decorrelated`` store also keeps the shared Gram matrix of all images
(``.npz`` only); ``balanced``, the command line's default for a ``.npz`` store, finds a class added with a single
image (see docs/classifiers.md, *Adding a class with a few examples*).

The commands that build, edit and query a store from the command line
(``python -m simsearch store build|add-class|...``) live in :mod:`simsearch.classdb.commands`; this module knows
nothing of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from simsearch import store
from simsearch.classdb import files
from simsearch.classdb.search import BACKENDS, FaissBackend, TorchBackend, make_backend
from simsearch.classifiers import prototypes, registry

__all__ = ["BACKENDS", "ClassDBError", "ClassVectorStore", "FaissBackend", "ModelMismatchError", "SearchResult",
           "TorchBackend", "file_kind", "make_backend"]

METADATA_MEMBER = files.METADATA_MEMBER
ClassDBError = files.ClassDBError
file_kind = files.file_kind

PathLike = str | os.PathLike
Vectors = torch.Tensor | np.ndarray


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


class _ModelIdentity:
    """What the store's vectors were made by (``dim``, ``model_name``, ``model_id``, ``modality``,
    ``transform_config``, set by :class:`ClassVectorStore`): written into every file, and checked against every
    vector that comes in, so that cosines between different models' embeddings are never computed."""

    def metadata(self) -> dict[str, Any]:
        """What a file needs to know to refuse vectors from another model or preprocessing, and to rebuild."""
        return {
            "format": files.FORMAT,
            "version": files.FORMAT_VERSION,
            "dim": self.dim,
            "model_name": self.model_name,
            "model_id": self.model_id,
            "modality": self.modality,
            "transform_config": self.transform_config,
            "classifier": {"name": self.classifier_name,
                           "params": store.plain_json(prototypes.model_params(self.classifier))},
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


class _Calibration:
    """The store's threshold for queries of no known class, kept by its classifier (``threshold_``, marked stale by
    any later change of the classes) and set on samples of the store's classes that it does not hold."""

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


class ClassVectorStore(_ModelIdentity, _Calibration):
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
        try:  # the command-line name, which a store file records to rebuild the classifier
            self.classifier_name = prototypes.classifier_name(self.classifier)
        except ValueError as error:
            raise ClassDBError(f"A store needs a classifier of prototypes.CLASSIFIERS: {error}") from error
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

    def save(self, *, path: PathLike) -> pathlib.Path:
        """Write the store atomically (:mod:`classdb_files`): ``.zip`` (CSV of float32 class means in store.py's
        format, plus metadata) or ``.npz``.

        The ``.zip`` form is readable by ``store.load_embeddings`` (means as rows, labels as targets) and holds a
        class-mean store; the ``.npz`` form keeps every float64 statistic of any classifier, so later updates stay
        exact across sessions.
        """
        path = pathlib.Path(path)
        if files.file_kind(path) == "zip" and self.classifier_name != "mean":
            raise ClassDBError(
                f"A '{self.classifier_name}' store keeps a Gram matrix that the .zip format (a CSV of class means) "
                f"cannot hold: save it as {path.with_suffix('.npz')}."
            )
        return files.write(path, metadata=self.metadata(), statistics=self._statistics())

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
        metadata, statistics = files.read(path)
        loaded = cls._from_metadata(metadata, path=path)
        loaded._fill(statistics, path=path)
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
        if label == prototypes.UNKNOWN_TEXT_LABEL:
            raise ClassDBError(
                f"The label '{label}' is reserved for queries of no known class (classify prints it for them); "
                "name the class otherwise."
            )
        if label in self:
            raise ClassDBError(
                f"Class '{label}' is already in the store: use update_class (CLI: update-class) to add images to it, "
                "or remove it first."
            )

    def _statistics(self) -> dict[str, np.ndarray]:
        """The estimator's statistics and the labels, as the file formats take them (empty before any class)."""
        if not self._fitted:
            return {"classes": np.array([], dtype=str), "class_sums": np.zeros((0, self.dim)),
                    "class_counts": np.zeros(0, dtype=np.int64)}
        return {**self.classifier.get_statistics(), "classes": np.array(self.labels, dtype=str)}

    @classmethod
    def _from_metadata(cls, metadata: dict[str, Any], *, path: pathlib.Path) -> ClassVectorStore:
        described = metadata.get("classifier", {"name": "mean", "params": {}})
        try:
            classifier = registry.make_estimator(described["name"], class_vectors=True, **described["params"])
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
