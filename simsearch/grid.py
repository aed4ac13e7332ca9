"""Models x datasets x classifiers on identical partitions: one CSV and one Markdown table of the whole grid.

Researchers compare encoders and datasets side by side (the retrieval write-up reports such a table); here each
cell is a cached-protocol experiment. Per dataset every cell sees the same partitions (one seed), so differences
between cells are paired: ``diff`` is the mean per-partition accuracy difference to the baseline cell of that
dataset, with its own Student-t half width.

Nothing is computed twice. Embeddings go through :class:`store.EmbeddingCache`; each finished cell is kept as a
small JSON file in ``OUT/cells`` under a key of everything that determines it (embedding key, classifier,
partitions, top-k), so a rerun of the same grid only lists the datasets and loads the models.

    python -m simsearch grid --datasets DIR_A DIR_B \
        --models tf_efficientnet_lite0=lite0.pth tf_efficientnet_lite1=lite1.pth \
        --classifiers mean decorrelated --cache-dir .cache --out grid-results
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from simsearch import encoders, metrics, protocol, store, utils
from simsearch.classifiers import registry
from simsearch.config import GridSettings, RunSettings
from simsearch.datasets import SampleListing, detect_modality, make_dataset_maker

__all__ = ["GridSettings", "ModelSpec", "markdown_table", "parse_model_spec", "run_grid"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One encoder of the grid: a timm name (with an optional local weights file) or a sentence-transformers name
    or folder; ``modality`` says which datasets it can encode."""

    name: str
    weights: str | None = None
    modality: str = "image"

    @property
    def label(self) -> str:
        return pathlib.Path(self.name).name if self.modality == "text" else self.name

DEFAULT_SETTINGS = GridSettings()


def parse_model_spec(text: str, *, modality: str) -> ModelSpec:
    """``NAME`` or ``NAME=WEIGHTS_FILE`` (weights for timm image models only)."""
    name, _, weights = text.partition("=")
    if weights and modality == "text":
        raise encoders.ModelError(f"{text}: a text model takes no weights file; pass its folder as the name.")
    return ModelSpec(name=name, weights=weights or None, modality=modality)


def run_grid(
    *,
    datasets: Sequence[str | pathlib.Path],
    models: Sequence[ModelSpec],
    classifiers: Sequence[str],
    out: str | pathlib.Path,
    cache_dir: str | pathlib.Path,
    settings: GridSettings = DEFAULT_SETTINGS,
    baseline: tuple[str, str] | None = None,
    embedding_sets: Sequence[str | pathlib.Path] = (),
    text_column: str = "text",
    label_column: str = "label",
) -> pd.DataFrame:
    """Every (dataset, matching model, classifier) cell, and every classifier on each embedding set of
    :mod:`distributed` (a model on a dataset, no encoder); writes ``grid.csv`` and ``grid.md`` into ``out``.

    ``baseline`` is a ``(model label, classifier)`` pair; default: each dataset's first model with the first
    classifier. ``text_column`` and ``label_column`` name the columns of CSV/TSV sentence datasets. A table of an
    earlier grid in ``out`` that this one would not repeat (other cells or settings) is moved into
    ``replaced-<time>/`` first. Returns the table (one row per cell).
    """
    out = pathlib.Path(out)
    cache = store.EmbeddingCache(cache_dir)
    modalities = [detect_modality(dataset) for dataset in datasets]
    for dataset, modality in zip(datasets, modalities):  # before any slow work
        if not any(model.modality == modality for model in models):
            raise encoders.ModelError(f"No {modality} model given for {dataset}.")
    _check_distinct(datasets=datasets, models=models, classifiers=classifiers)
    lock = store.acquire_writer_lock(out / "grid.csv", timeout=0)  # a second grid into the same folder stops here
    try:
        makers = [make_dataset_maker(dataset_path=dataset, modality=modality, text_column=text_column,
                                     label_column=label_column) for dataset, modality in zip(datasets, modalities)]
        return _run_cells(makers=makers, models=models, classifiers=classifiers, out=out, cache=cache,
                          settings=settings, baseline=baseline, embedding_sets=embedding_sets)
    finally:
        lock.release()


def _check_distinct(
    *, datasets: Sequence[str | pathlib.Path], models: Sequence[ModelSpec], classifiers: Sequence[str]
) -> None:
    """Refuse repeated entries: the table names a model by its label, and two models under one label would be
    paired and reported as one (the same architecture with two weights files, two text-model folders of one
    name)."""
    labels = [(model.modality, model.label) for model in models]
    for (modality, label), count in collections.Counter(labels).items():
        if count > 1:
            given = ", ".join(model.name + (f"={model.weights}" if model.weights else "") for model in models
                              if (model.modality, model.label) == (modality, label))
            raise encoders.ModelError(
                f"The {modality} models {given} would share the table label '{label}'; run one grid per model "
                "(a text model folder takes its folder name as label: give the folders distinct names)."
            )
    for kind, entries in (("dataset", [pathlib.Path(dataset).resolve() for dataset in datasets]),
                          ("classifier", list(classifiers))):
        repeated = sorted(str(entry) for entry, count in collections.Counter(entries).items() if count > 1)
        if repeated:
            raise utils.UserError(f"The {kind} {', '.join(repeated)} is given more than once; give each once.")


def _run_cells(
    *,
    makers: Sequence[SampleListing],
    models: Sequence[ModelSpec],
    classifiers: Sequence[str],
    out: pathlib.Path,
    cache: store.EmbeddingCache,
    settings: GridSettings,
    baseline: tuple[str, str] | None,
    embedding_sets: Sequence[str | pathlib.Path],
) -> pd.DataFrame:
    cells = []
    for folder in embedding_sets:
        cells += _embedding_set_cells(folder=folder, classifiers=classifiers, settings=settings, out=out)
    for maker in makers:
        for model in (model for model in models if model.modality == maker.modality):
            cells += _model_cells(
                maker=maker, model=model, classifiers=classifiers, settings=settings, cache=cache, out=out
            )
    table = _with_differences(utils.table(cells), baseline=baseline, confidence=settings.confidence)
    shown = table.drop(columns=["accuracies", "balanced_accuracies", "topk_accuracies"])
    markdown = markdown_table(shown, settings=settings)
    _keep_an_earlier_table(out, cells=shown, markdown=markdown)
    store.write_csv(out / "grid.csv", shown)
    with store.atomic_path(out / "grid.md") as temporary:
        temporary.write_text(markdown, encoding="utf-8")
    return shown


def _keep_an_earlier_table(out: pathlib.Path, *, cells: pd.DataFrame, markdown: str) -> None:
    """Move an earlier grid's table aside (and say so) unless this grid repeats it: the same settings line and
    every earlier cell (dataset, model, classifier) among this one's. A rerun of the same grid replaces nothing."""
    tables = [out / "grid.csv", out / "grid.md"]
    if not tables[0].is_file():
        return
    try:
        earlier = pd.read_csv(tables[0], dtype=str, keep_default_na=False)
        earlier_cells = set(zip(earlier["dataset_path"], earlier["model"], earlier["classifier"]))
        same_settings = tables[1].read_text(encoding="utf-8").split("\n", 1)[0] == markdown.split("\n", 1)[0]
    except (OSError, KeyError, ValueError, pd.errors.ParserError):
        earlier_cells, same_settings = {("unreadable",)}, False
    if same_settings and earlier_cells <= set(zip(cells["dataset_path"], cells["model"], cells["classifier"])):
        return
    aside = store.set_aside([table for table in tables if table.is_file()], folder=out)
    print(f"{out} held the table of an earlier grid ({len(earlier_cells)} cells); it was moved to {aside}.")


def _model_cells(
    *,
    maker: SampleListing,
    model: ModelSpec,
    classifiers: Sequence[str],
    settings: GridSettings,
    cache: store.EmbeddingCache,
    out: pathlib.Path,
) -> list[dict[str, Any]]:
    """The cells of one model on one dataset: read back when done before, else computed and saved."""
    encoder = encoders.create_encoder(
        modality=maker.modality, model_name=model.name, weights=model.weights, device=settings.device,
        config=encoders.EncoderConfig(topk=settings.top_k, precision=settings.precision),
    )
    transform = encoders.eval_transform(encoder.model)[1] if maker.modality == "image" else None
    embedding_key = protocol.embedding_key(encoder=encoder, maker=maker, transform=transform)
    encoding_record = out / "cells" / f"encoding-{embedding_key}.json"

    def runs_of(classifier: str) -> protocol.Runs:
        freshly_encoded = not cache.path(embedding_key).exists()
        runs = protocol.run_cached_protocol(
            encoder=encoder, maker=maker, transform=transform, batch_size=settings.batch_size,
            workers=settings.workers, cache=cache, settings=_run_settings(classifier, settings=settings),
        )
        if freshly_encoded:
            store.write_json(encoding_record, {"samples_per_second": len(runs.targets) / runs.encode_seconds})
        return runs

    def rate() -> float | None:
        return json.loads(encoding_record.read_text())["samples_per_second"] if encoding_record.exists() else None

    return _classifier_cells(maker=maker, label=model.label, embedding_key=embedding_key, classifiers=classifiers,
                             settings=settings, out=out, runs_of=runs_of, rate=rate)


def _embedding_set_cells(
    *, folder: str | pathlib.Path, classifiers: Sequence[str], settings: GridSettings, out: pathlib.Path
) -> list[dict[str, Any]]:
    """The cells of an embedding set of :mod:`distributed` (one model on one dataset), without the encoder."""
    from simsearch import distributed

    embedding_set = distributed.read_embedding_set(folder)
    manifest = embedding_set.manifest
    maker = embedding_set.listing()
    embedding_key = store.cache_key(model_id=manifest["model_id"], transform=manifest["preprocessing"],
                                    fingerprint=maker.get_fingerprint())

    def runs_of(classifier: str) -> protocol.Runs:
        return protocol.run_cached_protocol(
            encoder=None, maker=maker, transform=None, batch_size=settings.batch_size, workers=settings.workers,
            embeddings=(embedding_set.embeddings, embedding_set.targets),
            settings=_run_settings(classifier, settings=settings),
        )

    label = pathlib.Path(manifest["model_name"]).name if manifest["modality"] == "text" else manifest["model_name"]
    return _classifier_cells(maker=maker, label=label, embedding_key=embedding_key, classifiers=classifiers,
                             settings=settings, out=out, runs_of=runs_of,
                             rate=lambda: manifest["num_samples"] / max(manifest["encode_seconds"], 1e-9))


def _run_settings(classifier: str, *, settings: GridSettings) -> RunSettings:
    """One cell's partitions: the grid's settings with ``classifier``, fitting where the grid's encoder runs (on
    CUDA; else on the CPU)."""
    return settings.run_settings(registry.make_estimator(classifier, device=registry.fit_device(settings.device)))


def _classifier_cells(
    *,
    maker: SampleListing,
    label: str,
    embedding_key: str,
    classifiers: Sequence[str],
    settings: GridSettings,
    out: pathlib.Path,
    runs_of: Callable[[str], protocol.Runs],
    rate: Callable[[], float | None],
) -> list[dict[str, Any]]:
    """One cell per classifier on one (model, dataset): read back when done before, else ``runs_of`` it, saved."""
    cells = []
    for name in tqdm(classifiers, desc=f"[Grid] {maker.dataset_path.name} x {label}", leave=False):
        cell_path = out / "cells" / f"{_cell_key(embedding_key, name, settings)}.json"
        cell = _read_cell(cell_path, runs=settings.runs)
        if cell is not None:
            cells.append(cell)
            continue
        runs = runs_of(name)
        cell = {
            "dataset": maker.dataset_path.name, "dataset_path": str(maker.dataset_path), "modality": maker.modality,
            "model": label, "classifier": name,
            "samples": len(runs.targets), "classes": maker.get_num_labels(),
            "embedding_dim": int(runs.embeddings.shape[1]), "samples_per_second": rate(),
            "seconds_per_partition": float(np.mean([run.seconds for run in runs])),
            "accuracies": [run.accuracy for run in runs],
            "balanced_accuracies": [run.balanced_accuracy for run in runs],
            "topk_accuracies": [run.topk_accuracy for run in runs],
            # None for a classifier without probabilities (the baselines)
            "calibration_errors": _measured([run.calibration_error for run in runs]),
            "log_losses": _measured([run.log_loss for run in runs]),
        }
        store.write_json(cell_path, cell)
        cells.append(cell)
    return cells


CELL_FIELDS = ("dataset", "dataset_path", "modality", "model", "classifier", "samples", "classes", "embedding_dim",
               "samples_per_second", "seconds_per_partition", "accuracies", "balanced_accuracies", "topk_accuracies",
               "calibration_errors", "log_losses")


def _measured(values: list[float]) -> list[float] | None:
    return None if any(np.isnan(values)) else values


def _read_cell(path: pathlib.Path, *, runs: int) -> dict[str, Any] | None:
    """A finished cell, or None when there is none or (with a warning) when it is damaged: then it is computed
    again rather than reported."""
    if not path.exists():
        return None
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
        scores = np.asarray(
            [cell["accuracies"], cell["balanced_accuracies"], cell["topk_accuracies"]], dtype=np.float64
        )
        valid = set(cell) == set(CELL_FIELDS) and scores.shape == (3, runs) and ((scores >= 0) & (scores <= 1)).all()
    except (OSError, ValueError, TypeError, KeyError):
        valid = False
    if not valid:
        warnings.warn(f"Grid cell {path} is damaged or of another version; computing it again.", stacklevel=3)
        return None
    return cell


def _cell_key(embedding_key: str, classifier: str, settings: GridSettings) -> str:
    fields = [embedding_key, classifier, settings.runs, settings.valid_share, settings.top_k, settings.seed]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


def _with_differences(cells: pd.DataFrame, *, baseline: tuple[str, str] | None, confidence: float) -> pd.DataFrame:
    """Accuracy, balanced accuracy and top-k intervals per cell, and the paired accuracy difference to its
    dataset's baseline cell."""
    rows = []
    for _, group in cells.groupby("dataset_path", sort=False):  # two datasets may share a folder name
        chosen = group if baseline is None else group[(group.model == baseline[0]) & (group.classifier == baseline[1])]
        if chosen.empty:
            raise encoders.ModelError(
                f"Baseline {baseline[0]} with {baseline[1]} is not a cell of dataset {group.dataset.iloc[0]}."
            )
        reference = np.asarray(chosen.iloc[0]["accuracies"])
        baseline_name = f"{chosen.iloc[0]['model']} + {chosen.iloc[0]['classifier']}"
        for _, cell in group.iterrows():
            accuracy = metrics.mean_confidence_interval(cell["accuracies"], confidence=confidence)
            balanced = metrics.mean_confidence_interval(cell["balanced_accuracies"], confidence=confidence)
            topk = metrics.mean_confidence_interval(cell["topk_accuracies"], confidence=confidence)
            difference = metrics.paired_difference(cell["accuracies"], reference, confidence=confidence)
            rows.append({
                **cell.to_dict(), "accuracy": accuracy.mean, "accuracy_ci": accuracy.half_width,
                **_interval_columns(cell["calibration_errors"], name="calibration_error", confidence=confidence),
                **_interval_columns(cell["log_losses"], name="log_loss", confidence=confidence),
                "balanced_accuracy": balanced.mean, "balanced_ci": balanced.half_width,
                "topk_accuracy": topk.mean, "topk_ci": topk.half_width, "baseline": baseline_name,
                "diff": difference.mean, "diff_ci": difference.half_width,
            })
    return utils.table(rows)


def _interval_columns(values: Any, *, name: str, confidence: float) -> dict[str, float]:
    """``name`` and ``name_ci`` of a cell's per-partition values; NaN for a classifier without probabilities."""
    if not isinstance(values, list):
        return {name: np.nan, f"{name}_ci": np.nan}
    interval = metrics.mean_confidence_interval(values, confidence=confidence)
    return {name: interval.mean, f"{name}_ci": interval.half_width}


def markdown_table(table: pd.DataFrame, *, settings: GridSettings) -> str:
    """The grid as a Markdown table: one row per cell, intervals as ``mean ± half width``."""
    header = ["dataset", "model", "classifier", "accuracy", "balanced accuracy", f"top-{settings.top_k}",
              "diff vs baseline", "calibration error", "log loss", "samples/s", "dim"]
    lines = [
        f"{settings.runs} partitions per dataset (seed {settings.seed}, valid share {settings.valid_share}), "
        f"{settings.confidence:.0%} Student-t intervals; diff: paired difference to the baseline cell.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in table.iterrows():
        rate = "" if pd.isna(row["samples_per_second"]) else f"{row['samples_per_second']:.1f}"
        lines.append("| " + " | ".join([
            row["dataset"], row["model"], row["classifier"], f"{row['accuracy']:.4f} ± {row['accuracy_ci']:.4f}",
            f"{row['balanced_accuracy']:.4f} ± {row['balanced_ci']:.4f}",
            f"{row['topk_accuracy']:.4f} ± {row['topk_ci']:.4f}", f"{row['diff']:+.4f} ± {row['diff_ci']:.4f}",
            *("n/a" if pd.isna(row[name]) else f"{row[name]:.4f} ± {row[f'{name}_ci']:.4f}"
              for name in ("calibration_error", "log_loss")),
            rate, str(row["embedding_dim"]),
        ]) + " |")
    return "\n".join(lines) + "\n"
