"""The class-store commands of the command line: build, edit, calibrate and query a :mod:`classdb` store.

``cli.class_store_parser`` parses them and ``cli.class_store_main`` (``python -m simsearch store``,
``similarity-classdb``) runs :func:`run_command` inside the error boundary::

    python -m simsearch store build --dataset DIR --model M [--weights FILE] --out store.npz [--classifier balanced]
    python -m simsearch store add-class --store store.zip --images DIR --label NAME
    python -m simsearch store update-class --store store.zip --images DIR --label NAME
    python -m simsearch store remove-class --store store.zip NAME
    python -m simsearch store rename-class --store store.zip OLD NEW
    python -m simsearch store calibrate --store store.npz --dataset DIR
    python -m simsearch store classify --store store.zip IMAGE_OR_DIR [--top-k 4] [--csv predictions.csv]
    python -m simsearch store build --dataset questions.csv --label-column coarse --model MINILM_DIR --out questions.npz
    python -m simsearch store classify --store questions.npz queries.txt        # a text store: one query per line
    python -m simsearch store info --store store.zip
    python -m simsearch store import --embeddings original.zip --store store.zip --model M [--weights FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simsearch import metrics, store, utils
from simsearch.classdb import vector_store
from simsearch.classdb.files import ClassDBError
from simsearch.classifiers import registry
from simsearch.identity import ModelIdentity

if TYPE_CHECKING:  # the encoder and the dataset lister load torchvision and timm: only where something is encoded
    from simsearch import datasets, encoders

__all__ = ["COMMANDS", "run_command"]

PathLike = vector_store.PathLike


@dataclasses.dataclass
class _Model:
    """An encoder with the identity a store records of it."""

    identity: ModelIdentity
    transform: Any
    encoder: encoders.Encoder | None
    batch_size: int

    @classmethod
    def create(cls, *, modality: str, model_name: str, weights: str | None, cpu: bool, batch_size: int) -> _Model:
        from simsearch import encoders

        encoder = encoders.create_encoder(
            modality=modality, model_name=model_name, weights=weights, device=utils.get_device(force_cpu=cpu)
        )
        transform = None if modality == "text" else encoders.eval_transform(encoder.model)[1]
        return cls(identity=encoders.model_identity(encoder, model_name=model_name), transform=transform,
                   encoder=encoder, batch_size=batch_size)

    def embed(self, samples: Sequence[pathlib.Path] | Sequence[str]) -> torch.Tensor:
        if self.identity.modality == "text":
            return self.encoder.embed_texts(texts=samples, batch_size=self.batch_size, inform=True)
        return self.encoder.embed_images(
            images=samples, transform=self.transform, batch_size=self.batch_size, inform=True
        )

    def embed_dataset(self, maker: datasets.SampleListing, *, cache_dir: str | None) -> torch.Tensor:
        """Every sample of ``maker`` in its global order, through the research script's embedding cache in
        ``cache_dir`` (a dataset the script encoded before is read back, not encoded again)."""
        from simsearch import protocol

        embeddings, _ = protocol.embed_all_images(
            encoder=self.encoder, maker=maker, transform=self.transform, batch_size=self.batch_size, workers=0,
            cache=store.EmbeddingCache(cache_dir) if cache_dir else None, inform=True,
        )
        return embeddings

    def check(self, db: vector_store.ClassVectorStore, *, path: pathlib.Path) -> None:
        db.check_model(
            model_id=self.identity.model_id, transform_config=self.identity.transform_config,
            modality=self.identity.modality, source="--model/--weights", where=str(path),
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
    from simsearch import datasets

    names, _ = datasets.list_image_files(path)
    if not names:
        raise ClassDBError(f"No images ({', '.join(datasets.IMAGE_EXTENSIONS)}) found under {path}.")
    return [path / name for name in names]


def _open(args: argparse.Namespace) -> tuple[pathlib.Path, vector_store.ClassVectorStore]:
    path = pathlib.Path(args.store)
    return path, vector_store.ClassVectorStore.load(path=path)


def _model_for(args: argparse.Namespace, *, modality: str, db: vector_store.ClassVectorStore | None = None) -> _Model:
    model_name = args.model or (db.identity.model_name if db is not None else None)
    if model_name is None:
        raise ClassDBError(
            "Name the encoder with --model (a timm model name such as tf_efficientnet_lite0 for images, a "
            "sentence-transformers name or folder for texts)."
        )
    if db is not None and modality == "image" and args.weights is None and "+sha256:" in db.identity.model_id:
        raise ClassDBError(
            f"{args.store} was built from a local weights file ({db.identity.model_id}): pass that file with --weights."
        )
    return _Model.create(
        modality=modality, model_name=model_name, weights=args.weights, cpu=args.cpu, batch_size=args.batch_size
    )


def _summary(db: vector_store.ClassVectorStore) -> str:
    return (f"{len(db)} classes, {int(db.counts.sum())} {db.identity.modality}s, {db.classifier_name} classifier, "
            f"model {db.identity.model_id}")


def _new_store_path(args: argparse.Namespace) -> pathlib.Path:
    """Where a command that creates a store writes it: checked before any slow work, never replaced by accident."""
    path = pathlib.Path(args.store)
    vector_store.file_kind(path)
    if path.exists() and not args.force:
        raise ClassDBError(
            f"{path} already exists: pass --force to replace it, or edit it with add-class/update-class/remove-class."
        )
    return path


def _cmd_build(args: argparse.Namespace) -> int:
    path = _new_store_path(args)
    classifier = args.classifier or ("mean" if vector_store.file_kind(path) == "zip" else "balanced")
    if classifier != "mean" and vector_store.file_kind(path) == "zip":
        raise ClassDBError(f"A '{classifier}' store needs the .npz format: use --out {path.with_suffix('.npz')}.")
    if not 0.0 <= args.calibrate_share < 1.0:
        raise ClassDBError(f"--calibrate-share must lie in [0, 1), got {args.calibrate_share}.")
    if args.embeddings is not None:
        maker, model, embeddings = _from_embedding_set(args)
    else:
        from simsearch import datasets

        maker = datasets.make_dataset_maker(
            dataset_path=args.dataset, modality=args.modality, text_column=args.text_column,
            label_column=args.label_column,
        )
        model = _model_for(args, modality=maker.modality)
        embeddings = model.embed_dataset(maker, cache_dir=args.cache_dir)
    labels = np.array(maker.get_labels(), dtype=str)[maker.get_image_labels().numpy()]
    db = vector_store.ClassVectorStore(
        dim=embeddings.shape[1], **model.identity.record(),
        classifier=registry.make_estimator(classifier, class_vectors=True),
    )
    held_out = np.zeros(0, dtype=np.int64)
    if args.calibrate_share > 0:
        _, held_out_indexes, _ = maker.split_indexes(
            valid_share=args.calibrate_share, test_share=0.0, generator=torch.Generator().manual_seed(0)
        )
        held_out = held_out_indexes.numpy()  # numpy indexes: one torch index would pick a single label, not a list
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    db.add_classes(embeddings=embeddings[kept], labels=labels[kept].tolist(), model_id=model.identity.model_id)
    if len(held_out):
        vector_store.add_calibration_samples(db, embeddings=embeddings[held_out], labels=labels[held_out].tolist(),
                                   true_positive_rate=args.true_positive_rate, model_id=model.identity.model_id)
    db.save(path=path)
    print(f"Built {path}: {_summary(db)}; {_threshold_line(db)}.")
    _note_small_calibration(db)
    if args.calibrate_share > 0 and not len(held_out):
        print(f"No class has enough samples to hold out {args.calibrate_share:.0%} for the threshold; calibrate later "
              "with `calibrate --dataset DIR`.")
    return 0


def _from_embedding_set(args: argparse.Namespace) -> tuple[datasets.SampleListing, _Model, torch.Tensor]:
    """The listing, model identity and embeddings of a ``python -m simsearch distributed`` embedding set: a store
    built from it equals one built from the dataset, without encoding."""
    from simsearch import distributed

    embedding_set = distributed.read_embedding_set(args.embeddings)
    manifest = embedding_set.manifest
    if manifest["precision"] != "fp32":
        raise ClassDBError(f"{args.embeddings} was encoded in {manifest['precision']}; the store's commands encode "
                           "queries in fp32, so build it from an fp32 embedding set.")
    if args.model is not None and args.model != manifest["model_name"]:
        raise ClassDBError(f"{args.embeddings} was encoded by {manifest['model_id']}, not by --model {args.model}.")
    model = _Model(identity=embedding_set.identity(), transform=None, encoder=None, batch_size=args.batch_size)
    return embedding_set.listing(), model, embedding_set.embeddings


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from simsearch import datasets

    path, db = _open(args)
    maker = datasets.make_dataset_maker(
        dataset_path=args.dataset, text_column=args.text_column, label_column=args.label_column
    )
    strangers = sorted(set(maker.get_labels()) - set(db.labels))
    if strangers:
        shown = ", ".join(repr(label) for label in strangers[:5]) + (" ..." if len(strangers) > 5 else "")
        raise ClassDBError(f"{args.dataset} holds classes the store does not know ({shown}): calibration needs "
                           "samples of the store's own classes.")
    model = _model_for(args, modality=db.identity.modality, db=db)
    model.check(db, path=path)
    embeddings = model.embed(maker.get_samples())
    db.calibrate(embeddings=embeddings, true_positive_rate=args.true_positive_rate,
                 model_id=model.identity.model_id)
    db.save(path=path)
    print(f"Calibrated {path}: {_threshold_line(db)}.")
    _note_small_calibration(db)
    return 0


def _note_small_calibration(db: vector_store.ClassVectorStore) -> None:
    """Warn on stderr when the threshold rests on too few samples for its stated share to hold within 5 points
    (at 95 % confidence) on new samples of the same classes."""
    count = getattr(db.classifier, "calibration_count_", None)
    if db.threshold is None or count is None:
        return
    rate = db.classifier.true_positive_rate_
    needed = metrics.samples_for_margin(rate=rate)
    if count < needed:
        margin = metrics.proportion_margin(count=count, rate=rate)
        print(f"warning: the threshold rests on {_counted(count, db.identity.modality)}: on new samples it keeps "
              f"{rate:.0%} ± "
              f"{margin:.0%} of them (95 % confidence); calibrate on at least {needed} for ± 5 points "
              "(`calibrate --dataset DIR`).", file=sys.stderr)


def _note_stale_threshold(db: vector_store.ClassVectorStore, *, path: pathlib.Path) -> None:
    """Say on stderr when the unknown-query threshold no longer fits the classes (the store holds no samples to
    recalibrate on by itself)."""
    if db.threshold is not None and db.threshold_stale:
        print(f"note: the threshold for unknown queries of {path} was set before its classes last changed, so it may "
              "keep fewer or more known samples than it says; run `python -m simsearch store calibrate --store "
              f"{path} --dataset DIR` with samples of its classes that it does not hold.", file=sys.stderr)


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _threshold_line(db: vector_store.ClassVectorStore) -> str:
    if db.threshold is None:
        return "no threshold for unknown queries (run `calibrate`)"
    note = " (STALE: the classes changed since; run `calibrate`)" if db.threshold_stale else ""
    count = getattr(db.classifier, "calibration_count_", None)
    basis = f" (set on {_counted(count, db.identity.modality)})" if count is not None else ""
    return (f"unknown below {db.threshold:.4f}, keeping {db.classifier.true_positive_rate_:.0%} of known samples"
            f"{basis}{note}")


def _cmd_add_or_update(args: argparse.Namespace) -> int:
    path, db = _open(args)
    if args.command == "add-class":
        vector_store.check_new_label(db, args.label)
    else:
        db.index(args.label)
    _, samples = _samples(args.samples, modality=db.identity.modality)
    model = _model_for(args, modality=db.identity.modality, db=db)
    model.check(db, path=path)
    embeddings = model.embed(samples)
    if args.command == "add-class":
        db.add_class(label=args.label, embeddings=embeddings, model_id=model.identity.model_id)
    else:
        db.update_class(label=args.label, embeddings=embeddings, model_id=model.identity.model_id)
    db.save(path=path)
    count = int(db.counts[db.index(args.label)])
    verb = "Added" if args.command == "add-class" else "Updated"
    print(f"{verb} '{utils.printable(args.label)}' ({count} {db.identity.modality}s) in {path}: {_summary(db)}.")
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
    print(f"preprocessing: {db.identity.transform_config}")
    for label, count in zip(db.labels, db.counts.tolist()):
        print(f"{count:8d}  {utils.printable(label)}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    path = _new_store_path(args)
    model = _model_for(args, modality="image")
    with warnings.catch_warnings(record=True) as caught:  # its caveat as one line, like the commands' others
        warnings.simplefilter("always")
        db = vector_store.import_embeddings(
            path=args.embeddings, model_name=model.identity.model_name, model_id=model.identity.model_id,
            transform_config=model.identity.transform_config,
        )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    db.save(path=path)
    print(f"Imported {args.embeddings} into {path}: {_summary(db)}.")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    path, db = _open(args)
    names, samples = _samples(args.samples, modality=db.identity.modality)
    model = _model_for(args, modality=db.identity.modality, db=db)
    model.check(db, path=path)
    reject = db.threshold is not None if args.reject is None else args.reject
    if reject:
        _note_stale_threshold(db, path=path)
    result = db.search(
        queries=model.embed(samples),
        top_k=args.top_k,
        backend=args.backend,
        model_id=model.identity.model_id,
        device=model.encoder.device,
        reject=reject,
    )
    if args.csv is not None:  # first: a reader that closes the printed table early must not cost the file
        _write_predictions(path=pathlib.Path(args.csv), names=names, result=result)
    known = result.known or [True] * len(names)
    chances = result.probabilities.tolist() if result.probabilities is not None else [[None] * top for top in
                                                                                      map(len, result.labels)]
    for index, (name, labels, scores) in enumerate(zip(names, result.labels, result.scores.tolist())):
        shown = [utils.printable(label) for label in labels]
        values = [f"{score:.4f}" + (f" (p {chance:.3f})" if chance is not None else "")
                  for score, chance in zip(scores, chances[index])]
        if not known[index]:
            print(f"{utils.printable(name)}\tunknown\t{result.unknown_scores[index]:.4f} < {db.threshold:.4f}"
                  f"\t[nearest: {shown[0]} {values[0]}]")
            continue
        alternatives = " | ".join(f"{label} {value}" for label, value in zip(shown[1:], values[1:]))
        print(f"{utils.printable(name)}\t{shown[0]}\t{values[0]}" + (f"\t[{alternatives}]" if alternatives else ""))
    if args.csv is not None:
        print(f"Predictions written to {args.csv}.")
    return 0


def _write_predictions(*, path: pathlib.Path, names: list[str], result: vector_store.SearchResult) -> None:
    """One row per image: ``image, label_1, score_1, probability_1, ..., label_k, score_k, probability_k``
    (no probabilities for a store saved before they existed); with rejection also ``known`` and ``unknown_score``
    (the labels are then the nearest classes)."""
    top_k = result.scores.shape[1]
    fields = ("label", "score", "probability") if result.probabilities is not None else ("label", "score")
    header = ["image"] + [f"{field}_{rank}" for rank in range(1, top_k + 1) for field in fields]
    rejecting = result.known is not None
    header += ["known", "unknown_score"] if rejecting else []
    rows = []
    columns = [result.scores.tolist()] + ([result.probabilities.tolist()] if result.probabilities is not None else [])
    for index, (name, labels) in enumerate(zip(names, result.labels)):
        row = [name] + [value for values in zip(labels, *(column[index] for column in columns)) for value in values]
        rows.append(row + ([bool(result.known[index]), float(result.unknown_scores[index])] if rejecting else []))
    store.write_csv(path, {name: [row[column] for row in rows] for column, name in enumerate(header)})


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
