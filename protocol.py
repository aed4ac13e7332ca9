"""Accuracy over many random train/validation partitions, the way the article measures it.

Two protocols give the same partitions for the same generator state:

* ``run_original_protocol`` re-encodes the training part and evaluates both parts in every partition, like the
  original script (kept as a faithful baseline and for augmented runs);
* ``run_cached_protocol`` encodes every image once (optionally through an on-disk cache) and then builds class
  means and runs the search on those tensors, so each further partition costs milliseconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

import banerjee
import engine
import randomness
import store

__all__ = [
    "embed_all_images",
    "evaluate_partition",
    "load_run_records",
    "make_loader",
    "run_cached_protocol",
    "run_original_protocol",
]

RunRecord = dict[str, Any]


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """An ordered loader; pinned memory only pays off when batches go to a GPU."""
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
    )


def embed_all_images(
    *,
    encoder: engine.Encoder,
    maker: banerjee.DatasetMaker,
    transform: Callable,
    batch_size: int,
    workers: int,
    cache: store.EmbeddingCache | None = None,
    inform: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and label indexes of every image in global order, from the cache when the key matches."""
    key = store.cache_key(
        model_id=engine.model_id(encoder.model), transform=transform, fingerprint=maker.get_fingerprint()
    )
    cached = cache.load(key) if cache is not None else None
    if cached is not None:
        if inform:
            print(f"[Embed/All] Using cached embeddings: {cache.path(key)}")
        return cached
    loader = make_loader(
        maker.full_dataset(transform=transform), batch_size=batch_size, workers=workers, device=encoder.device
    )
    embeddings, targets = encoder.embed(dataloader=loader, desc="[Embed/All]", inform=inform)
    if cache is not None:
        cache.save(key, embeddings=embeddings, targets=targets)
    return embeddings, targets


def evaluate_partition(
    *,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    train_indexes: torch.Tensor,
    valid_indexes: torch.Tensor,
    num_labels: int,
    top_k: int,
) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor]:
    """Scores of the class-mean search on the training and validation parts, plus the class vectors."""
    vectors = engine.class_means(
        embeddings=embeddings[train_indexes], targets=targets[train_indexes], num_labels=num_labels
    )

    def scores_of(indexes: torch.Tensor) -> dict[str, Any]:
        _, predicted = engine.search(queries=embeddings[indexes], corpus=vectors, top_k=top_k)
        return engine.score_predictions(targets=targets[indexes], topk_predictions=predicted)

    return scores_of(train_indexes), scores_of(valid_indexes), vectors


def _record(
    *, run: int, train: dict[str, Any], valid: dict[str, Any], indexes: tuple[torch.Tensor, torch.Tensor], seconds: float
) -> RunRecord:
    return {
        "run": run,
        "accuracy": valid["accuracy"],
        "topk_accuracy": valid["topk_accuracy"],
        "train_accuracy": train["accuracy"],
        "num_images": valid["num_images"],
        "targets": valid["targets"],
        "predictions": valid["predictions"],
        "topk_predictions": valid["topk_predictions"],
        "train_indexes": indexes[0].tolist(),
        "valid_indexes": indexes[1].tolist(),
        "seconds": seconds,
    }


def load_run_records(path: pathlib.Path) -> list[RunRecord]:
    """Records already written by an earlier, interrupted run; a half-written last line is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class _RunLog:
    """Appends one JSON line per finished partition so an interrupted experiment can resume."""

    def __init__(self, path: pathlib.Path | None, completed: list[RunRecord]) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with store.atomic_path(path) as temporary:
                temporary.write_text("".join(json.dumps(record) + "\n" for record in completed), encoding="utf-8")

    def append(self, record: RunRecord) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())


def _partitions(
    *,
    maker: banerjee.DatasetMaker,
    runs: int,
    valid_share: float,
    generator: torch.Generator,
    completed: list[RunRecord],
    run_log: pathlib.Path | None,
    desc: str,
):
    """Yield ``(run, train_indexes, valid_indexes, append)`` for runs not yet done; replay the done ones' draws."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}.")
    completed = completed[:runs]
    log = _RunLog(run_log, completed)
    for run in tqdm(range(runs), desc=desc, leave=True):
        train_indexes, valid_indexes, _ = maker.split_indexes(
            valid_share=valid_share, test_share=0.0, generator=generator
        )
        if run < len(completed):
            if completed[run]["valid_indexes"] != valid_indexes.tolist():
                raise ValueError(
                    f"Cannot resume: partition {run} differs from the one saved in {run_log}. The seed, shares or "
                    "dataset changed; start again without --resume or with another --out directory."
                )
            continue
        yield run, train_indexes, valid_indexes, log.append


def run_cached_protocol(
    *,
    encoder: engine.Encoder,
    maker: banerjee.DatasetMaker,
    transform: Callable,
    runs: int,
    valid_share: float,
    batch_size: int,
    workers: int,
    generator: torch.Generator,
    cache: store.EmbeddingCache | None = None,
    completed: list[RunRecord] | None = None,
    run_log: pathlib.Path | None = None,
    inform: bool = False,
) -> tuple[list[RunRecord], torch.Tensor, torch.Tensor]:
    """Encode once, then score ``runs`` partitions; returns the records and the per-image embeddings and targets.

    After the loop ``encoder`` holds the class vectors of the last partition, ready for ``infer``.
    """
    embeddings, targets = embed_all_images(
        encoder=encoder, maker=maker, transform=transform, batch_size=batch_size, workers=workers, cache=cache,
        inform=inform,
    )
    records = list(completed or [])[:runs]
    vectors = None
    for run, train_indexes, valid_indexes, append in _partitions(
        maker=maker, runs=runs, valid_share=valid_share, generator=generator, completed=records, run_log=run_log,
        desc="[Run/cached]",
    ):
        started = time.perf_counter()
        train, valid, vectors = evaluate_partition(
            embeddings=embeddings, targets=targets, train_indexes=train_indexes, valid_indexes=valid_indexes,
            num_labels=maker.get_num_labels(), top_k=encoder.topk,
        )
        records.append(
            _record(run=run, train=train, valid=valid, indexes=(train_indexes, valid_indexes),
                    seconds=time.perf_counter() - started)
        )
        append(records[-1])
    if vectors is None:
        last = records[-1]
        vectors = engine.class_means(
            embeddings=embeddings[last["train_indexes"]], targets=targets[last["train_indexes"]],
            num_labels=maker.get_num_labels(),
        )
    encoder.set_class_vectors(
        embeddings=vectors, label_indexes=torch.arange(maker.get_num_labels()), labels=maker.get_labels()
    )
    return records, embeddings, targets


def run_original_protocol(
    *,
    encoder: engine.Encoder,
    maker: banerjee.DatasetMaker,
    encode_transform: Callable,
    eval_transform: Callable,
    runs: int,
    valid_share: float,
    batch_size: int,
    workers: int,
    generator: torch.Generator,
    augment_seed: int | None = None,
    completed: list[RunRecord] | None = None,
    run_log: pathlib.Path | None = None,
    inform: bool = False,
) -> list[RunRecord]:
    """Re-encode the training part and evaluate both parts in every partition, as the original script does.

    ``augment_seed`` seeds random augmentation per image and partition, so results do not depend on ``workers``.
    """
    records = list(completed or [])[:runs]
    for run, train_indexes, valid_indexes, append in _partitions(
        maker=maker, runs=runs, valid_share=valid_share, generator=generator, completed=records, run_log=run_log,
        desc="[Run/original]",
    ):
        started = time.perf_counter()
        parts = []
        for indexes, transform in ((train_indexes, encode_transform), (valid_indexes, eval_transform)):
            dataset = maker.datasets_from_indexes(indexes=indexes, transform=transform)
            if augment_seed is not None:
                dataset.set_sample_seed(augment_seed + run * maker.get_num_images())
            parts.append(make_loader(dataset, batch_size=batch_size, workers=workers, device=encoder.device))
        encoder.train_dl, encoder.valid_dl = parts
        encoder.encode(inform=inform)
        train = encoder.evaluate(dataset_part="train", inform=inform)
        valid = encoder.evaluate(dataset_part="valid", inform=inform)
        records.append(
            _record(run=run, train=train, valid=valid, indexes=(train_indexes, valid_indexes),
                    seconds=time.perf_counter() - started)
        )
        append(records[-1])
    return records
