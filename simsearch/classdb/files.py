"""The class store's two file formats, each with one reader and one writer: what is on disk, nothing else.

* ``.npz``: every float64 statistic of the store's estimator (exact across sessions) and the metadata as JSON;
* ``.zip``: the original's CSV of float32 class means (``store.load_embeddings`` reads it) and ``classdb.json``
  with the labels, image counts and calibration; class-mean stores only.

Both carry a SHA-256 of their content. From format version 3 on it covers everything read back (statistics,
labels, counts, calibration and the metadata), and a file without one is refused: a missing checksum is only
accepted from versions written before checksums existed, and then only without a threshold (thresholds and
checksums arrived together in version 2's lifetime, so a calibrated store always had one). :mod:`classdb` turns
the ``(metadata, statistics)`` pair these functions exchange into an editable store.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
import zlib
from typing import Any

import numpy as np

from simsearch import store, utils

__all__ = ["ClassDBError", "FORMAT", "FORMAT_VERSION", "METADATA_MEMBER", "file_kind", "read", "write"]

FORMAT = "classdb"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
COVERING_CHECKSUM_VERSION = 3  # from this version on the checksum covers the metadata too and is required
METADATA_MEMBER = "classdb.json"
# What a .zip store's metadata keeps beside the class means under "calibration": the unknown-class threshold and the
# probabilities' temperature (stores written before probabilities lack it)
CALIBRATION_KEYS = ("threshold", "true_positive_rate", "threshold_stale", "calibration_count", "temperature")
VERSION_1_NAMES = {"labels": "classes", "sums": "class_sums", "counts": "class_counts"}

PathLike = str | os.PathLike
Statistics = dict[str, np.ndarray]


class ClassDBError(utils.UserError):
    """A class vector store operation or file was invalid: unknown class, duplicate label, bad vectors or file."""


def file_kind(path: pathlib.Path) -> str:
    """``"zip"`` or ``"npz"`` from the file name; any other suffix is refused before any work."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in (".zip", ".npz"):
        raise ClassDBError(
            f"Unsupported store file name {path}: use a .zip (CSV, readable by store.load_embeddings) "
            "or a .npz (compact binary) suffix."
        )
    return suffix[1:]


def write(path: PathLike, *, metadata: dict[str, Any], statistics: Statistics) -> pathlib.Path:
    """Write a store atomically in the format its suffix names; ``statistics`` as ``get_statistics`` gives them,
    plus ``classes``."""
    path = pathlib.Path(path)
    metadata = {**metadata, "format": FORMAT, "version": FORMAT_VERSION}
    (_write_zip if file_kind(path) == "zip" else _write_npz)(path, metadata=metadata, statistics=statistics)
    return path


def read(path: PathLike) -> tuple[dict[str, Any], Statistics]:
    """``(metadata, statistics)`` of a store file, its checksum and format checked; the estimator checks the
    statistics' consistency when they are installed."""
    path = pathlib.Path(path)
    kind = file_kind(path)
    if not path.is_file():
        raise FileNotFoundError(f"No class vector store at {path}: create one with `python -m simsearch store build`.")
    return _read_zip(path) if kind == "zip" else _read_npz(path)


# --- .npz ------------------------------------------------------------------------------------------------------------


def _write_npz(path: pathlib.Path, *, metadata: dict[str, Any], statistics: Statistics) -> None:
    metadata = {**metadata, "checksum": _checksum(statistics, metadata=metadata)}
    with store.atomic_path(path) as temporary, temporary.open("wb") as stream:
        np.savez_compressed(stream, metadata=np.array(json.dumps(metadata)), **statistics)


def _read_npz(path: pathlib.Path) -> tuple[dict[str, Any], Statistics]:
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
    version = _version(metadata, path=path)
    covering = version >= COVERING_CHECKSUM_VERSION
    _verify(metadata, expected=_checksum(statistics, metadata=metadata if covering else None),
            calibrated="threshold" in statistics, path=path)
    return metadata, {VERSION_1_NAMES.get(name, name): value for name, value in statistics.items()}


# --- .zip ------------------------------------------------------------------------------------------------------------


def _write_zip(path: pathlib.Path, *, metadata: dict[str, Any], statistics: Statistics) -> None:
    counts = np.asarray(statistics["class_counts"], dtype=np.int64)
    means = (np.asarray(statistics["class_sums"]) / counts[:, None]).astype(np.float32)
    calibration = {key: statistics[key].item() for key in CALIBRATION_KEYS if key in statistics}
    metadata = {**metadata, "labels": [str(label) for label in statistics["classes"]], "counts": counts.tolist(),
                "calibration": calibration}
    with (
        store.atomic_path(path) as temporary,
        tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder,
    ):
        written = store.save_embeddings(
            embeddings=means, targets=np.array(metadata["labels"], dtype=object),
            filename=pathlib.Path(folder) / path.name,
        )
        with zipfile.ZipFile(written, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            (table,) = archive.namelist()
            metadata["checksum"] = _zip_checksum(archive.read(table), metadata=metadata)
            archive.writestr(METADATA_MEMBER, json.dumps(metadata, indent=1))
        os.replace(written, temporary)


def _read_zip(path: pathlib.Path) -> tuple[dict[str, Any], Statistics]:
    targets, means = store.load_embeddings(filename=path, text_targets=True)
    with zipfile.ZipFile(path) as archive:
        store.check_unpacked_sizes(archive, path=path)
        if METADATA_MEMBER not in archive.namelist():
            raise ClassDBError(
                f"{path} has no {METADATA_MEMBER}: it is a plain store.save_embeddings file that records no model "
                f"or image counts. Import it with `python -m simsearch store import --embeddings {path} "
                "--store NEW.zip --model M` (or vector_store.import_embeddings)."
            )
        try:
            metadata = json.loads(archive.read(METADATA_MEMBER))
        except json.JSONDecodeError as error:
            raise ClassDBError(f"{path}: {METADATA_MEMBER} is not valid JSON ({error}); the file is damaged.") \
                from error
        tables = [name for name in archive.namelist() if name != METADATA_MEMBER]
        table = archive.read(tables[0]) if len(tables) == 1 else b""
    version = _version(metadata, path=path)
    calibration = metadata.get("calibration") or {}
    if version >= COVERING_CHECKSUM_VERSION:
        expected = _zip_checksum(table, metadata=metadata)
    else:
        expected = _version_2_zip_checksum(table, metadata.get("counts"))
    _verify(metadata, expected=expected if table else "",
            calibrated=isinstance(calibration, dict) and "threshold" in calibration, path=path)
    labels = [str(label) for label in metadata.get("labels", [])]
    if labels != targets.tolist():
        raise ClassDBError(
            f"{path}: the labels of {METADATA_MEMBER} and the CSV's target column differ (in order or content), "
            "so vectors would get the wrong names; the file was edited or damaged. Rebuild the store."
        )
    counts = np.asarray(metadata.get("counts", []))
    sums = means.astype(np.float64) * counts[:, None] if counts.shape == (len(means),) else means
    if not isinstance(calibration, dict):
        raise ClassDBError(f"{path}: the calibration in {METADATA_MEMBER} is not a mapping; the file is damaged.")
    return metadata, {"classes": np.array(labels), "class_sums": sums, "class_counts": counts,
                      **{name: np.asarray(value) for name, value in calibration.items()}}


# --- versions and checksums ------------------------------------------------------------------------------------------


def _version(metadata: Any, *, path: pathlib.Path) -> int:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ClassDBError(f"{path} is not a class vector store (its metadata has no format '{FORMAT}').")
    version = metadata.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ClassDBError(
            f"{path} uses class store format version {version!r}; this code reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Rebuild the store with this version."
        )
    return version


def _checksum(arrays: Statistics, *, metadata: dict[str, Any] | None = None) -> str:
    """SHA-256 of named arrays (names, types, shapes and bytes) and, from version 3 on, of the metadata but its
    checksum (canonical JSON), so an edited or damaged store is refused."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode())
        digest.update(value.tobytes())
    if metadata is not None:
        covered = {key: value for key, value in metadata.items() if key != "checksum"}
        digest.update(json.dumps(covered, sort_keys=True).encode())
    return digest.hexdigest()


def _zip_checksum(table: bytes, *, metadata: dict[str, Any]) -> str:
    """A version-3 ``.zip`` store's checksum: its CSV of class means and all of its metadata (labels, counts as
    written, calibration, model)."""
    return _checksum({"table": np.frombuffer(table, dtype=np.uint8)}, metadata=metadata)


def _version_2_zip_checksum(table: bytes, counts: Any) -> str:
    """A version-2 ``.zip`` store's checksum: its CSV of class means and image counts only."""
    if not isinstance(counts, list) or not all(type(count) is int for count in counts):
        return ""  # counts that are not JSON whole numbers (2.5, "8", true) match no checksum, rather than rounding
    return _checksum({"table": np.frombuffer(table, dtype=np.uint8), "counts": np.asarray(counts, dtype=np.int64)})


def _verify(metadata: dict[str, Any], *, expected: str, calibrated: bool, path: pathlib.Path) -> None:
    """Refuse a store whose content does not match its checksum, or that lacks one it must have."""
    recorded = metadata.get("checksum")
    if recorded is None:
        if metadata["version"] >= COVERING_CHECKSUM_VERSION or calibrated:
            raise ClassDBError(
                f"{path} has no checksum, which every class store of format version {metadata['version']}"
                f"{' with a threshold' if calibrated else ''} is written with: it was edited or damaged. Rebuild "
                "the store or restore a copy."
            )
        return  # a version 1 or 2 store written before checksums
    if recorded != expected:
        raise ClassDBError(
            f"{path}: its content does not match the checksum written with it; the file was edited or damaged. "
            "Rebuild the store or restore a copy."
        )
