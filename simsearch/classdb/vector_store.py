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
from simsearch.identity import ModelIdentity

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

    ``probabilities[i, j]`` is the classifier's probability of that class (``predict_proba``; None for a store
    written before probabilities existed). With ``reject=True``, ``known[i]`` says whether query ``i`` scored at or
    above the store's threshold on ``unknown_scores[i]`` (the classifier's ``score_samples``); its classes are then
    still the nearest ones.
    """

    labels: list[list[str]]
    scores: torch.Tensor
    indexes: torch.Tensor
    known: list[bool] | None = None
    unknown_scores: list[float] | None = None
    probabilities: torch.Tensor | None = None


def checked_vectors(vectors: Vectors, *, dim: int, model_id: str, what: str) -> torch.Tensor:
    """``vectors`` as a CPU tensor, refused unless ``[n >= 1, dim]`` finite floating-point numbers."""
    tensor = torch.as_tensor(vectors).detach().cpu()
    if tensor.ndim != 2 or tensor.shape[1] != dim or len(tensor) == 0:
        raise ClassDBError(
            f"Expected {what} of shape [n >= 1, {dim}] for this store (model '{model_id}'), "
            f"got {list(tensor.shape)}. Were they made by another model?"
        )
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise ClassDBError(f"The {what} must be finite floating-point numbers (dtype {tensor.dtype}).")
    return tensor


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
        try:
            self.identity = ModelIdentity(model_name=model_name, model_id=model_id,
                                          transform_config=transform_config or {}, modality=modality)
        except ValueError as error:
            raise ClassDBError(str(error)) from error
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
            f"classifier={self.classifier_name!r}, model_id={self.identity.model_id!r})"
        )

    def check_model(self, **given: Any) -> None:
        """Raise :class:`ModelMismatchError` when vectors were made by another model, preprocessing or modality
        (the keywords of :meth:`ModelIdentity.mismatch`)."""
        problem = self.identity.mismatch(**given)
        if problem is not None:
            raise ModelMismatchError(problem)

    @property
    def threshold(self) -> float | None:
        """The unknown-score threshold set by :meth:`calibrate`, or None."""
        return getattr(self.classifier, "threshold_", None)

    @property
    def threshold_stale(self) -> bool:
        """Whether the classes changed after the threshold was set (it then no longer keeps its stated share)."""
        return bool(getattr(self.classifier, "threshold_stale_", False))

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
            check_new_label(self, label)
        self._change(self.classifier.partial_fit, vectors, np.array(labels, dtype=str))

    def update_class(self, *, label: str, embeddings: Vectors, model_id: str | None = None) -> None:
        """Merge new images into an existing class (exact: float64 sums)."""
        self.update_classes(embeddings=embeddings, labels=[label] * len(embeddings), model_id=model_id)

    def update_classes(self, *, embeddings: Vectors, labels: Sequence[str], model_id: str | None = None) -> None:
        """Merge the rows of ``embeddings`` into the existing classes their ``labels`` name."""
        self.check_model(model_id=model_id)
        vectors = self._vectors(embeddings, what="embeddings")
        for label in set(labels):
            self.index(label)
        self._change(self.classifier.partial_fit, vectors, np.array(labels, dtype=str))

    def remove_class(self, *, label: str) -> None:
        """Drop one class; every other class's statistics stay bit-for-bit the same (the classifier says the rest)."""
        self.index(label)
        self._change(self.classifier.remove_class, label)

    def rename_class(self, *, label: str, new_label: str) -> None:
        """Give a class a new label, keeping its statistics."""
        self.index(label)
        check_new_label(self, new_label)
        self._change(self.classifier.rename_class, label, new_label)

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
        return ranked_classes(self, vectors, backend=self._backends[key], top_k=top_k, reject=reject)

    def save(self, *, path: PathLike) -> pathlib.Path:
        """Write the store atomically: ``.zip`` (CSV of float32 class means in store.py's format, plus metadata;
        readable by ``store.load_embeddings``; class-mean stores only) or ``.npz`` (every float64 statistic of any
        classifier, so later updates stay exact across sessions). See :func:`write_store`."""
        return write_store(self, path=path)

    @classmethod
    def load(
        cls, *, path: PathLike, model_id: str | None = None, transform_config: dict[str, Any] | None = None
    ) -> ClassVectorStore:
        """Read a store written by :meth:`save`; given ``model_id``/``transform_config``, refuse other models' files."""
        return read_store(path=path, model_id=model_id, transform_config=transform_config)

    def _change(self, action: Any, *args: Any) -> None:
        """Apply one edit to the classifier and forget search backends built on the old state."""
        try:
            action(*args)
        except ValueError as error:
            raise ClassDBError(str(error)) from error
        self._backends.clear()

    def _vectors(self, vectors: Vectors, *, what: str) -> torch.Tensor:
        return checked_vectors(vectors, dim=self.dim, model_id=self.identity.model_id, what=what)


def store_metadata(db: ClassVectorStore) -> dict[str, Any]:
    """What a file needs to refuse vectors of another model or preprocessing, and to rebuild the classifier."""
    return {"format": files.FORMAT, "version": files.FORMAT_VERSION, "dim": db.dim, **db.identity.record(),
            "classifier": {"name": db.classifier_name,
                           "params": store.plain_json(prototypes.model_params(db.classifier))}}


def write_store(db: ClassVectorStore, *, path: PathLike) -> pathlib.Path:
    """Write ``db`` atomically in the format of ``path``'s suffix (:mod:`simsearch.classdb.files`), refusing a
    ``.zip`` for a classifier whose Gram matrix a CSV of class means cannot hold."""
    path = pathlib.Path(path)
    if files.file_kind(path) == "zip" and db.classifier_name != "mean":
        raise ClassDBError(
            f"A '{db.classifier_name}' store keeps a Gram matrix that the .zip format (a CSV of class means) "
            f"cannot hold: save it as {path.with_suffix('.npz')}."
        )
    if len(db):
        statistics = {**db.classifier.get_statistics(), "classes": np.array(db.labels, dtype=str)}
    else:
        statistics = {"classes": np.array([], dtype=str), "class_sums": np.zeros((0, db.dim)),
                      "class_counts": np.zeros(0, dtype=np.int64)}
    return files.write(path, metadata=store_metadata(db), statistics=statistics)


def read_store(
    *, path: PathLike, model_id: str | None = None, transform_config: dict[str, Any] | None = None
) -> ClassVectorStore:
    """The store written at ``path``, its statistics checked by its classifier; refused where ``model_id`` or
    ``transform_config`` name another model or preprocessing."""
    path = pathlib.Path(path)
    metadata, statistics = files.read(path)
    described = metadata.get("classifier", {"name": "mean", "params": {}})
    try:
        loaded = ClassVectorStore(
            dim=int(metadata["dim"]), **ModelIdentity.from_record(metadata).record(),
            classifier=registry.make_estimator(described["name"], class_vectors=True, **described["params"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ClassDBError(f"{path}: the store metadata is damaged ({error}); rebuild the store.") from error
    if len(statistics["classes"]):
        sums = np.asarray(statistics.get("class_sums", np.zeros((0, 0))))
        if sums.ndim != 2 or sums.shape[1] != loaded.dim:
            raise ClassDBError(f"{path}: class sums {list(sums.shape)} do not fit a store of dimension "
                               f"{loaded.dim}; the file is damaged.")
        try:
            loaded.classifier.set_statistics(**statistics)
        except ValueError as error:
            raise ClassDBError(f"{path}: {error}; the file is damaged.") from error
    loaded.check_model(model_id=model_id, transform_config=transform_config, source="asked for when loading",
                       where=str(path))
    return loaded


def ranked_classes(
    db: ClassVectorStore, vectors: torch.Tensor, *, backend: TorchBackend | FaissBackend, top_k: int, reject: bool
) -> SearchResult:
    """The ``top_k`` classes of each query by ``backend``; with ``reject``, which queries pass the threshold."""
    features = torch.from_numpy(db.classifier.query_features(vectors.double().numpy()))
    scores, indexes = backend.search(queries=features, top_k=top_k)
    labels = db.labels
    ranked = [[labels[index] for index in row] for row in indexes.tolist()]
    chances = None
    if hasattr(db.classifier, "temperature_"):
        chances = torch.from_numpy(db.classifier.predict_proba(vectors.double().numpy())).gather(1, indexes)
    if not reject:
        return SearchResult(labels=ranked, scores=scores, indexes=indexes, probabilities=chances)
    if db.threshold is None:
        raise ClassDBError("The store has no threshold for unknown queries: calibrate it with images of its "
                           "classes that it does not hold (`calibrate`), or search without reject.")
    unknown_scores = db.classifier.score_samples(vectors.double().numpy())
    return SearchResult(labels=ranked, scores=scores, indexes=indexes, probabilities=chances,
                        known=(unknown_scores >= db.threshold).tolist(), unknown_scores=unknown_scores.tolist())


def add_calibration_samples(
    db: ClassVectorStore, *, embeddings: Vectors, labels: Sequence[str], true_positive_rate: float = 0.95,
    model_id: str | None = None,
) -> None:
    """Calibrate on held-out samples of the store's classes, then add them to their classes. The threshold
    stays current: adding a class's own samples raises its known scores a little, so the threshold keeps at
    least its stated share."""
    db.calibrate(embeddings=embeddings, true_positive_rate=true_positive_rate, model_id=model_id)
    db.update_classes(embeddings=embeddings, labels=labels, model_id=model_id)
    db.classifier.threshold_stale_ = False


def check_new_label(db: ClassVectorStore, label: str) -> None:
    """Refuse a label that is empty, reserved for queries of no known class, or already a class of ``db``."""
    if not isinstance(label, str) or not label.strip():
        raise ClassDBError(f"A class label must be a non-empty string, got {label!r}.")
    if label == prototypes.UNKNOWN_TEXT_LABEL:
        raise ClassDBError(
            f"The label '{label}' is reserved for queries of no known class (classify prints it for them); "
            "name the class otherwise."
        )
    if label in db:
        raise ClassDBError(
            f"Class '{label}' is already in the store: use update_class (CLI: update-class) to add images to it, "
            "or remove it first."
        )


def import_embeddings(
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
    imported = ClassVectorStore(
        dim=embeddings.shape[1], model_name=model_name, model_id=model_id, transform_config=transform_config
    )
    imported.add_classes(embeddings=embeddings, labels=[str(target) for target in targets])
    return imported
