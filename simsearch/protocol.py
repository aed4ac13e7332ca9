"""Accuracy over many random train/validation partitions, the way the article measures it.

Two protocols give the same partitions for the same generator state:

* ``run_original_protocol`` re-encodes the training part and evaluates both parts in every partition, like the
  original script (kept as a faithful baseline and for augmented runs);
* ``run_cached_protocol`` encodes every image once (optionally through an on-disk cache) and then fits the
  class-vector classifier and scores on those tensors, so each further partition costs milliseconds.

Both take the classifier (an unfitted :mod:`prototypes` estimator) and ``top_k`` explicitly, return typed
:class:`Runs`, and leave the encoder as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import sklearn.base
import torch
from tqdm import tqdm

from simsearch import config, datasets, decoding, encoders, metrics, randomness, store, utils
from simsearch.classifiers import probabilities, prototypes, registry

__all__ = [
    "Run",
    "RunLogError",
    "Runs",
    "check_validation_samples",
    "describe_final_stats",
    "embed_all_images",
    "embedding_key",
    "evaluate_partition",
    "final_stats",
    "load_run_records",
    "make_loader",
    "run_cached_protocol",
    "run_original_protocol",
    "run_table",
]


class RunLogError(utils.UserError):
    """A run log (``runs.jsonl``) that cannot be resumed: not of this version, edited, or of another experiment."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One partition's result: validation scores, the predictions behind them and the partition itself.

    ``balanced_accuracy`` is the mean of the per-class accuracies (every class weighs the same); ``margins`` holds
    each validation sample's best minus second-best class score, small near a decision boundary (NaN with one
    class). ``calibration_error`` and ``log_loss`` judge the fitted classifier's probabilities on the validation part
    (NaN for a classifier without them, and in logs written before they existed); ``choice`` is what the fit chose to
    score with (``prototypes.describe_choice``: ``lda`` falling back to the class mean says ``mean``).
    """

    run: int
    accuracy: float
    balanced_accuracy: float
    topk_accuracy: float
    train_accuracy: float
    num_images: int
    targets: list[int]
    predictions: list[int]
    topk_predictions: list[list[int]]
    margins: list[float]
    train_indexes: list[int]
    valid_indexes: list[int]
    seconds: float
    calibration_error: float = math.nan
    log_loss: float = math.nan
    choice: str = ""

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, source: str) -> Run:
        """A run read back from a log line; names what is missing instead of failing later."""
        names = [field.name for field in dataclasses.fields(cls) if field.name in record
                 or field.default is dataclasses.MISSING]
        missing = [name for name in names if name not in record]
        if missing:
            raise RunLogError(
                f"{source}: a run record lacks {', '.join(missing)}; the file is not a run log of this version."
            )
        run = cls(**{name: record[name] for name in names})
        run.check_scores(source=source)
        return run

    def check_scores(self, *, source: str) -> None:
        """Refuse a record whose scores do not follow from its own targets and predictions (edited or damaged),
        so a resumed experiment never reports numbers it did not measure."""
        problem = "its scores do not follow from its targets and predictions"
        try:
            rescored = metrics.score_predictions(
                targets=np.asarray(self.targets, dtype=np.int64),
                topk_predictions=np.asarray(self.topk_predictions, dtype=np.int64).reshape(len(self.targets), -1),
            )
            consistent = (
                rescored["predictions"] == self.predictions
                and rescored["num_images"] == self.num_images == len(self.valid_indexes)
                and _same_score(rescored["accuracy"], self.accuracy)
                and _same_score(rescored["balanced_accuracy"], self.balanced_accuracy)
                and len(self.margins) == len(self.targets)
                and _same_score(rescored["topk_accuracy"], self.topk_accuracy)
            )
        except (TypeError, ValueError, RuntimeError) as error:
            consistent, problem = False, f"its targets or predictions are malformed ({type(error).__name__})"
        if not consistent:
            raise RunLogError(
                f"{source}: partition {self.run}: {problem}; the log was edited or damaged. Start again without "
                "--resume, or with another --out directory."
            )


@dataclasses.dataclass(frozen=True)
class Runs:
    """The series of partitions of one experiment, plus what later analyses need from it.

    ``classifier`` is the estimator fitted on the last partition's training part (None when every partition was
    resumed from a log of the original protocol); ``embeddings``/``targets`` are every image's embedding and label
    index in global order (cached protocol only). ``encode_seconds`` is the time spent obtaining embeddings (encoding,
    or loading them from the cache); ``short_run`` marks a quick check on truncated encoding passes, not a result.
    """

    runs: tuple[Run, ...]
    protocol: str
    top_k: int
    classifier: Any = None
    embeddings: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    encode_seconds: float = 0.0
    short_run: bool = False

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __getitem__(self, index: int) -> Run:
        return self.runs[index]

    def accuracy(self, *, confidence: float = 0.95) -> metrics.MeanInterval:
        """Mean validation accuracy over partitions with its Student-t interval."""
        return metrics.mean_confidence_interval([run.accuracy for run in self.runs], confidence=confidence)

    def balanced_accuracy(self, *, confidence: float = 0.95) -> metrics.MeanInterval:
        """Mean balanced accuracy (mean of per-class accuracies) over partitions with its Student-t interval."""
        return metrics.mean_confidence_interval([run.balanced_accuracy for run in self.runs], confidence=confidence)

    def topk_accuracy(self, *, confidence: float = 0.95) -> metrics.MeanInterval:
        """Mean top-k validation accuracy over partitions with its Student-t interval."""
        return metrics.mean_confidence_interval([run.topk_accuracy for run in self.runs], confidence=confidence)

    def calibration_error(self, *, confidence: float = 0.95) -> metrics.MeanInterval | None:
        """Mean expected calibration error over partitions with its Student-t interval; None where a partition has
        no probabilities."""
        return _interval_if_measured([run.calibration_error for run in self.runs], confidence=confidence)

    def log_loss(self, *, confidence: float = 0.95) -> metrics.MeanInterval | None:
        """Mean validation log loss over partitions with its Student-t interval; None where a partition has no
        probabilities."""
        return _interval_if_measured([run.log_loss for run in self.runs], confidence=confidence)

    def choices(self) -> dict[str, int]:
        """How many partitions' fits chose each scorer (``Run.choice``), most frequent first; empty where the
        classifier chooses nothing."""
        counts = collections.Counter(run.choice for run in self.runs if run.choice)
        return dict(counts.most_common())

    @property
    def partitions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(train_indexes, valid_indexes)`` of every partition, as analyses take them."""
        return [(torch.tensor(run.train_indexes), torch.tensor(run.valid_indexes)) for run in self.runs]

    @property
    def targets_per_run(self) -> list[list[int]]:
        return [run.targets for run in self.runs]

    @property
    def predictions_per_run(self) -> list[list[int]]:
        return [run.predictions for run in self.runs]


def _interval_if_measured(values: list[float], *, confidence: float) -> metrics.MeanInterval | None:
    return None if any(math.isnan(value) for value in values) else metrics.mean_confidence_interval(
        values, confidence=confidence)


LOADER_PREFETCH = 4  # batches each loader worker prepares ahead


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    collate_fn: Callable | None = None,
) -> torch.utils.data.DataLoader:
    """An ordered loader; pinned memory only pays off when batches go to a GPU, and workers keep several batches
    each on their way (``prefetch_factor``) so that a fast device does not wait for the next one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}.")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=randomness.seed_worker,
        generator=generator,
        prefetch_factor=LOADER_PREFETCH if workers else None,
        collate_fn=collate_fn,
    )


def embedding_key(
    *, encoder: encoders.Encoder, maker: datasets.SampleListing, transform: Callable, decode: str = "pil"
) -> str:
    """The cache key of a dataset's embeddings: model, weights and precision, preprocessing (the decoder included:
    the tensor path's pixels differ slightly from PIL's), and the sample files."""
    preprocessing = transform if decode == "pil" else f"{transform!r} decoded as {decode}s on the device"
    return store.cache_key(model_id=encoder.embedding_id, transform=preprocessing,
                           fingerprint=maker.get_fingerprint())


def embed_all_images(
    *,
    encoder: encoders.Encoder,
    maker: datasets.SampleListing,
    transform: Callable,
    batch_size: int,
    workers: int,
    cache: store.EmbeddingCache | None = None,
    inform: bool = False,
    decode: str = "pil",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and label indexes of every image in global order, from the cache when the key matches.

    ``decode="tensor"`` reads JPEGs as bytes in the loader and decodes, resizes and normalises them on the encoder's
    device (:mod:`decoding`); other files, and models whose preprocessing is not a resize and crop, take PIL's path.
    """
    if decode not in decoding.DECODERS:
        raise ValueError(f"Unknown decoder {decode!r}; use one of {', '.join(decoding.DECODERS)}.")
    image_transform, batch_transform = encoders.split_normalization(transform)
    pipeline = decoding.tensor_pipeline(image_transform, device=encoder.device, normalize=batch_transform) \
        if decode == "tensor" else None
    key = embedding_key(encoder=encoder, maker=maker, transform=transform, decode="tensor" if pipeline else "pil")
    cached = cache.load(key, targets=maker.get_image_labels()) if cache is not None else None
    if cached is not None:
        if inform:
            print(f"[Embed/All] Using cached embeddings: {cache.path(key)}")
        return cached
    dataset = maker.full_dataset(transform=pipeline[0] if pipeline else image_transform)
    if pipeline:
        dataset.set_image_type("path")
        batch_transform = pipeline[1]
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, device=encoder.device,
                         collate_fn=decoding.collate_encoded if pipeline else None)
    embeddings, targets = encoder.embed(dataloader=loader, desc="[Embed/All]", inform=inform,
                                        batch_transform=batch_transform)
    if pipeline and inform:
        print(f"[Embed/All] Decoded {pipeline[1].decoded} JPEGs on {encoder.device}; {pipeline[1].fallbacks} "
              "files through PIL (not a plain RGB or grey baseline JPEG)")
    if cache is not None:
        cache.save(key, embeddings=embeddings, targets=targets)
    return embeddings, targets


def evaluate_partition(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    train_indexes: torch.Tensor,
    valid_indexes: torch.Tensor,
    classifier: Any,
    top_k: int,
    run: int = 0,
) -> tuple[Run, Any]:
    """Fit a copy of ``classifier`` on the training part and score both parts; returns the run and the fit."""
    started = time.perf_counter()
    X, y = embeddings.numpy(), targets.numpy()  # views: from here on the partition stays in numpy
    train, valid = np.asarray(train_indexes), np.asarray(valid_indexes)
    return score_partition(
        run=run, classifier=classifier, train=(X[train], y[train]), valid=(X[valid], y[valid]),
        indexes=(train_indexes, valid_indexes), top_k=top_k, started=started,
    )


def score_partition(
    *,
    run: int,
    classifier: Any,
    train: tuple[np.ndarray, np.ndarray],
    valid: tuple[np.ndarray, np.ndarray],
    indexes: tuple[torch.Tensor, torch.Tensor],
    top_k: int,
    started: float,
) -> tuple[Run, Any]:
    """One partition of either protocol: fit a copy of ``classifier`` on ``train = (X, y)``, rank ``valid``
    (:func:`prototypes.fit_and_rank`) and score it, all in numpy; returns the run and the fit."""
    fitted, scores, ranked = prototypes.fit_and_rank(
        classifier, train=train, queries=valid[0], top_k=max(top_k, 2)
    )  # two for the margin
    train_predictions = prototypes.predict_topk(fitted, train[0], 1)
    valid_scores = metrics.score_predictions(targets=valid[1], topk_predictions=ranked[:, :top_k])
    calibration_error, log_loss = prototypes.probability_quality(fitted, *valid)
    return Run(
        run=run,
        accuracy=valid_scores["accuracy"],
        balanced_accuracy=valid_scores["balanced_accuracy"],
        topk_accuracy=valid_scores["topk_accuracy"],
        train_accuracy=metrics.topk_accuracies(topk_indices=train_predictions, targets=train[1])[0],
        num_images=valid_scores["num_images"],
        targets=valid_scores["targets"],
        predictions=valid_scores["predictions"],
        topk_predictions=valid_scores["topk_predictions"],
        margins=prototypes.margins(scores).tolist(),
        train_indexes=indexes[0].tolist(),
        valid_indexes=indexes[1].tolist(),
        seconds=time.perf_counter() - started,
        calibration_error=calibration_error,
        log_loss=log_loss,
        choice=prototypes.describe_choice(fitted),
    ), fitted


def _same_score(expected: float, recorded: Any) -> bool:
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
        return False
    return math.isclose(expected, recorded, abs_tol=1e-9) or (math.isnan(expected) and math.isnan(recorded))


def load_run_records(path: pathlib.Path) -> list[Run]:
    """Runs already written by an earlier, interrupted experiment, each checked against its checksum; a
    half-written last line (a write cut short) is dropped, a damaged line before it is refused by number."""
    lines = _log_lines(path)
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunLogError(
                f"{path}, line {number}: the line is damaged (not JSON), so the log cannot be trusted. Start again "
                "without --resume, or with another --out directory."
            ) from None
        source = f"{path}, line {number}"
        if not isinstance(record, dict) or record.pop("checksum", None) != _record_checksum(record):
            raise RunLogError(
                f"{source}: the record does not match its checksum (edited, damaged, or written by an older "
                "version). Start again without --resume, or with another --out directory."
            )
        records.append(Run.from_dict(record, source=source))
    return records


def _log_lines(path: pathlib.Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def _complete_records(lines: list[str]) -> int:
    """Lines of a log that hold a whole record: all but a half-written last one."""
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            return len(lines) - 1
    return len(lines)


def _record_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of a run record's canonical JSON: an edit that keeps the record consistent still changes it."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


class _RunLog:
    """Appends one JSON line per finished partition so an interrupted experiment can resume."""

    def __init__(self, path: pathlib.Path | None, completed: list[Run]) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _keep_replaced_log(path, completed=completed)
            with store.atomic_path(path) as temporary:
                temporary.write_text("".join(_json_line(run) for run in completed), encoding="utf-8")

    def append(self, run: Run) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(_json_line(run))
            stream.flush()
            os.fsync(stream.fileno())


def _keep_replaced_log(path: pathlib.Path, *, completed: list[Run]) -> None:
    """Move aside (and say so) an earlier experiment whose log holds more than ``completed``: the log and every
    other file beside it (results, tables, figures) go together into ``replaced-<time>/``, so a new experiment
    never empties an old one and the folder never mixes two, even if the new one then crashes. Folders (an
    embedding cache, say) and hidden files (the writer's lock) stay."""
    records = _complete_records(_log_lines(path))
    if records <= len(completed):
        return
    files = [item for item in path.parent.iterdir() if item.is_file() and not item.name.startswith(".")]
    folder = store.set_aside(files, folder=path.parent)
    print(f"{path.parent} held an earlier experiment ({records} partitions in {path.name}); its {len(files)} "
          f"files were moved to {folder}.")


def _json_line(run: Run) -> str:
    record = dataclasses.asdict(run)
    return json.dumps({**record, "checksum": _record_checksum(record)}) + "\n"


def _partitions(
    *,
    maker: datasets.SampleListing,
    runs: int,
    valid_share: float,
    generator: torch.Generator,
    completed: list[Run],
    run_log: pathlib.Path | None,
    desc: str,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, Callable[[Run], None]]]:
    """Yield ``(run, train_indexes, valid_indexes, append)`` for runs not yet done; replay the done ones' draws."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}.")
    _warn_about_uninformative_classes(maker=maker, valid_share=valid_share)
    completed = completed[:runs]
    log = _RunLog(run_log, completed)
    for run in tqdm(range(runs), desc=desc, leave=True):
        train_indexes, valid_indexes, _ = maker.split_indexes(
            valid_share=valid_share, test_share=0.0, generator=generator
        )
        if run < len(completed):
            if completed[run].valid_indexes != valid_indexes.tolist():
                raise RunLogError(
                    f"Cannot resume: partition {run} differs from the one saved in {run_log}. The seed, shares or "
                    "dataset changed; start again without --resume or with another --out directory."
                )
            if completed[run].targets != maker.get_image_labels()[valid_indexes].tolist():
                raise RunLogError(
                    f"Cannot resume: partition {run} of {run_log} holds the same samples with other labels than the "
                    "dataset gives them now (its class folders or label column changed); start again without "
                    "--resume or with another --out directory."
                )
            continue
        yield run, train_indexes, valid_indexes, log.append


def check_validation_samples(*, maker: datasets.SampleListing, valid_share: float) -> None:
    """Refuse, before any encoding, a split that gives no class a validation sample: nothing could be measured."""
    largest = int(torch.bincount(maker.get_image_labels()).max()) if maker.get_num_images() else 0
    if int(largest * valid_share) == 0:
        needed = math.ceil(100 / max(largest, 1)) / 100
        raise datasets.DatasetError(
            f"No class of {maker.dataset_path} is large enough to get a validation sample at --valid-share "
            f"{valid_share} (the largest has {largest} samples), so there is nothing to measure. Raise --valid-share "
            f"to at least {needed:g}, or add samples."
        )


def _warn_about_uninformative_classes(*, maker: datasets.SampleListing, valid_share: float) -> None:
    """Say when the accuracy cannot mean what it seems: one class only, or classes that are never validated."""
    if maker.get_num_labels() == 1:
        warnings.warn(
            f"{maker.dataset_path} has a single class: every prediction is right, so an accuracy of 1.0 says nothing "
            "about the model. Add classes.",
            stacklevel=3,
        )
    sizes = torch.bincount(maker.get_image_labels(), minlength=maker.get_num_labels()).tolist()
    unvalidated = [label for label, size in zip(maker.get_labels(), sizes) if int(size * valid_share) == 0]
    if unvalidated:
        shown = ", ".join(repr(label) for label in unvalidated[:10]) + (" ..." if len(unvalidated) > 10 else "")
        warnings.warn(
            f"{len(unvalidated)} class(es) of {maker.dataset_path} are too small to get a validation sample at "
            f"valid_share={valid_share}, so their accuracy is never measured: {shown}. Add samples or raise the share.",
            stacklevel=3,
        )


def run_cached_protocol(
    *,
    encoder: encoders.Encoder | None,
    maker: datasets.SampleListing,
    transform: Callable | None,
    settings: config.RunSettings,
    batch_size: int,
    workers: int,
    cache: store.EmbeddingCache | None = None,
    completed: list[Run] | None = None,
    run_log: pathlib.Path | None = None,
    inform: bool = False,
    embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    decode: str = "pil",
) -> Runs:
    """Encode every image once (``decode``: see :func:`embed_all_images`), then fit ``settings.classifier`` and score
    ``settings.runs`` partitions.

    Each partition costs one fit and two matrix products; the encoder is only used to embed, never changed.
    ``embeddings`` (every sample's embedding and label index in the maker's global order, e.g. an embedding set of
    :mod:`distributed`) replace the encode pass; ``encoder`` and ``transform`` may then be None.
    """
    classifier, generator = _prepare(settings=settings, maker=maker, encoder=encoder)
    short_run = embeddings is None and settings.short_run is not None
    started = time.perf_counter()
    if embeddings is None:
        embeddings = embed_all_images(
            encoder=encoder, maker=maker, transform=transform, batch_size=batch_size, workers=workers,
            cache=None if short_run else cache, inform=inform, decode=decode,
        )
    elif not torch.equal(embeddings[1], maker.get_image_labels()):
        raise ValueError("The given embeddings' labels are not the dataset's, in its global order.")
    embeddings, targets = embeddings
    encode_seconds = time.perf_counter() - started
    records = list(completed or [])[:settings.runs]
    fitted = None
    for run, train_indexes, valid_indexes, append in _partitions(
        maker=maker, runs=settings.runs, valid_share=settings.valid_share, generator=generator, completed=records,
        run_log=run_log, desc="[Run/cached]",
    ):
        if short_run:  # only the first batches were encoded: keep the samples that were
            train_indexes, valid_indexes = train_indexes[train_indexes < len(targets)], valid_indexes[
                valid_indexes < len(targets)]
        record, fitted = evaluate_partition(
            embeddings=embeddings, targets=targets, train_indexes=train_indexes, valid_indexes=valid_indexes,
            classifier=classifier, top_k=settings.top_k, run=run,
        )
        records.append(record)
        append(record)
    if fitted is None:
        last_train = torch.tensor(records[-1].train_indexes)
        fitted = sklearn.base.clone(classifier).fit(embeddings[last_train].numpy(), targets[last_train].numpy())
    return Runs(
        runs=tuple(records), protocol="cached", top_k=settings.top_k, classifier=fitted, embeddings=embeddings,
        targets=targets, encode_seconds=encode_seconds, short_run=short_run,
    )


def run_original_protocol(
    *,
    encoder: encoders.Encoder,
    maker: datasets.SampleListing,
    encode_transform: Callable,
    eval_transform: Callable,
    settings: config.RunSettings,
    batch_size: int,
    workers: int,
    augment_seed: int | None = None,
    completed: list[Run] | None = None,
    run_log: pathlib.Path | None = None,
    inform: bool = False,
) -> Runs:
    """Re-encode the training and validation parts in every partition, as the original script does.

    ``augment_seed`` seeds random augmentation per image and partition, so results do not depend on ``workers``.
    """
    classifier, generator = _prepare(settings=settings, maker=maker, encoder=encoder)
    records = list(completed or [])[:settings.runs]
    fitted = None
    encode_seconds = 0.0
    for run, train_indexes, valid_indexes, append in _partitions(
        maker=maker, runs=settings.runs, valid_share=settings.valid_share, generator=generator, completed=records,
        run_log=run_log, desc="[Run/original]",
    ):
        started = time.perf_counter()
        parts = []
        for indexes, transform, name in ((train_indexes, encode_transform, "Train"),
                                         (valid_indexes, eval_transform, "Valid")):
            dataset = maker.datasets_from_indexes(indexes=indexes, transform=transform)
            if augment_seed is not None:
                dataset.set_sample_seed(augment_seed + run * maker.get_num_images())
            loader = make_loader(dataset, batch_size=batch_size, workers=workers, device=encoder.device)
            parts.append(encoder.embed(dataloader=loader, desc=f"[Encode/{name}DS]", inform=inform))
        train, valid = ((embeddings.numpy(), targets.numpy()) for embeddings, targets in parts)
        encode_seconds += time.perf_counter() - started
        record, fitted = score_partition(
            run=run, classifier=classifier, train=train, valid=valid, indexes=(train_indexes, valid_indexes),
            top_k=settings.top_k, started=started,
        )
        records.append(record)
        append(record)
    return Runs(
        runs=tuple(records), protocol="original", top_k=settings.top_k, classifier=fitted,
        encode_seconds=encode_seconds, short_run=settings.short_run is not None,
    )


def _prepare(
    *, settings: config.RunSettings, maker: datasets.SampleListing, encoder: encoders.Encoder | None
) -> tuple[Any, torch.Generator]:
    """What both protocols start from: the shares checked, the unfitted classifier and the partitions' generator."""
    check_validation_samples(maker=maker, valid_share=settings.valid_share)
    if encoder is not None and encoder.config.short_run_batches != settings.short_run:
        raise ValueError(f"The encoder stops after {encoder.config.short_run_batches} batches but the settings' "
                         f"short_run is {settings.short_run}: build the encoder from the same settings.")
    return registry.make_estimator(settings.classifier), randomness.make_torch_generator(seed=settings.seed)


def run_table(runs: Runs) -> list[dict[str, Any]]:
    """One row per partition with its scores and time, for ``runs.csv``."""
    return [
        {"run": run.run, "accuracy": run.accuracy, "balanced_accuracy": run.balanced_accuracy,
         "topk_accuracy": run.topk_accuracy, "calibration_error": run.calibration_error, "log_loss": run.log_loss,
         "choice": run.choice, "train_accuracy": run.train_accuracy, "seconds": run.seconds}
        for run in runs
    ]


def final_stats(
    *, runs: Runs, model: dict[str, Any], maker: datasets.SampleListing, confidence: float, total_seconds: float
) -> dict[str, Any]:
    """The experiment's summary: model (:meth:`encoders.Encoder.describe`, or an embedding set's), data, intervals
    and where the time went (saved in ``results.json``)."""
    return {
        **model,
        "dataset": str(maker.dataset_path),
        "modality": maker.modality,
        "num_labels": maker.get_num_labels(),
        "num_valid_samples": runs[-1].num_images,
        "runs": len(runs),
        "protocol": runs.protocol,
        "short_run": runs.short_run,
        "classifier": repr(runs.classifier),
        "accuracy": runs.accuracy(confidence=confidence),
        "balanced_accuracy": runs.balanced_accuracy(confidence=confidence),
        "topk": runs.top_k,
        "topk_accuracy": runs.topk_accuracy(confidence=confidence),
        "calibration_error": runs.calibration_error(confidence=confidence),
        "log_loss": runs.log_loss(confidence=confidence),
        "choices": runs.choices(),
        "encode_seconds": runs.encode_seconds,
        "partition_seconds": sum(run.seconds for run in runs),
        "total_seconds": total_seconds,
    }


NO_PROBABILITIES = "n/a (the classifier gives no probabilities)"


def describe_final_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The printed lines of :func:`final_stats`."""
    note = "; SHORT RUN: truncated encoding passes, not a result" if stats["short_run"] else ""
    return {
        **encoders.describe_model(stats),
        "Dataset": f"{stats['dataset']} ({stats['num_labels']} classes, {stats['modality']})",
        f"Validation {stats['modality']}s per partition": stats["num_valid_samples"],
        "Partitions": f"{stats['runs']} ({stats['protocol']} protocol{note})",
        "Classifier": stats["classifier"],
        "Accuracy": stats["accuracy"],
        "Balanced accuracy (mean of per-class accuracies)": stats["balanced_accuracy"],
        f"Top {stats['topk']} accuracy": stats["topk_accuracy"],
        f"Calibration error ({probabilities.CALIBRATION_BINS} bins)": stats["calibration_error"] or NO_PROBABILITIES,
        "Log loss": stats["log_loss"] or NO_PROBABILITIES,
        **({"Chosen per partition": ", ".join(f"{name} {count}" for name, count in stats["choices"].items())}
           if stats["choices"] else {}),
        "Encoding duration": f"{stats['encode_seconds']:.1f} s",
        "Partitions duration": f"{stats['partition_seconds']:.1f} s (classifier fits and searches included)",
        "Total duration": f"{stats['total_seconds']:.1f} s",
    }
