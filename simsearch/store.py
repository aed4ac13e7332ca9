"""Saving and loading embeddings, checkpoints and the per-image embedding cache.

Every write goes to a temporary file in the target directory and is renamed into place, so an interrupted or
failed save never leaves a half-written file where a good one used to be.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import pathlib
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from simsearch import utils

__all__ = [
    "EmbeddingCache",
    "MAX_UNPACKED_BYTES",
    "StoreError",
    "acquire_writer_lock",
    "atomic_path",
    "cache_key",
    "check_unpacked_sizes",
    "load_checkpoint",
    "load_embeddings",
    "plain_json",
    "save_checkpoint",
    "save_embeddings",
    "write_csv",
    "write_json",
]

PathLike = str | os.PathLike


class StoreError(utils.UserError):
    """A file on disk is missing, damaged or belongs to something else."""


MAX_UNPACKED_BYTES = 4 * 2**30  # a ZIP member unpacking to more is refused (a damaged file or a zip bomb)


def check_unpacked_sizes(archive: zipfile.ZipFile, *, path: PathLike) -> None:
    """Refuse an archive whose members would unpack to more than ``MAX_UNPACKED_BYTES`` each, before reading any:
    a few kilobytes of compressed zeros can otherwise fill the memory."""
    for member in archive.infolist():
        if member.file_size > MAX_UNPACKED_BYTES:
            raise StoreError(
                f"{path}: member {member.filename} would unpack to {member.file_size:,} bytes, above the limit of "
                f"{MAX_UNPACKED_BYTES:,} (store.MAX_UNPACKED_BYTES). Raise the limit only for a file you trust."
            )


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = pathlib.Path(temporary)
    try:
        yield temporary
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, so atomically written files get the usual permissions rather than mkstemp's 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _zip_name(filename: PathLike) -> pathlib.Path:
    filename = pathlib.Path(filename)
    return filename if filename.suffix.lower() == ".zip" else filename.with_name(filename.name + ".zip")


def save_embeddings(
    *,
    embeddings: np.ndarray | torch.Tensor,
    targets: Sequence[Any] | np.ndarray | None = None,
    filename: PathLike,
    inform: bool = False,
    targes: Sequence[Any] | np.ndarray | None = None,
) -> pathlib.Path:
    """Write one CSV (target first, then one column per dimension) inside a ZIP archive.

    Floats are written with enough digits (9 for float32, 17 for float64) for an exact round trip. ``targes`` is
    the original's spelling of ``targets``, accepted with a deprecation warning.
    """
    if targes is not None:
        if targets is not None:
            raise TypeError("Pass targets only (targes is its deprecated spelling), not both.")
        warnings.warn("save_embeddings(targes=...) is deprecated; use targets=...", DeprecationWarning, stacklevel=2)
        targets = targes
    if targets is None:
        raise TypeError("save_embeddings needs targets=... (one label per embedding row).")
    embeddings = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings)
    targets = np.asarray(targets)
    if embeddings.ndim != 2 or len(targets) != len(embeddings):
        raise ValueError(
            f"Expected embeddings of shape (n, dim) and n targets; got {embeddings.shape} and {len(targets)} targets."
        )
    path = _zip_name(filename)
    frame = pd.DataFrame(embeddings)
    # text labels stay Python strings: pandas' Arrow-backed strings refuse a folder name that is not valid UTF-8
    frame.insert(loc=0, column="target",
                 value=pd.Series(targets.tolist(), dtype=object) if targets.dtype.kind in "UO" else targets)
    digits = "%.9g" if embeddings.dtype == np.float32 else "%.17g"
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # CRLF line ends make the CSV writer quote any field holding a carriage return (a label may), which an
        # unquoted CSV would read back as a line break.
        text = frame.to_csv(index=False, float_format=digits, lineterminator="\r\n")
        archive.writestr(path.stem + ".csv", text.encode("utf-8", errors="surrogateescape"))  # see write_csv
    if inform:
        print("Embeddings have been saved:", path, sep="\n  ")
    return path


def load_embeddings(
    *, filename: PathLike, inform: bool = False, text_targets: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(targets, embeddings)`` from the first CSV member of a ZIP written by :func:`save_embeddings`.

    Targets are parsed as pandas does (numbers become numbers, as in the original); ``text_targets=True`` keeps
    them as written (``"01"`` stays ``"01"``), for labels that must match exactly.
    """
    path = pathlib.Path(filename)
    try:
        with zipfile.ZipFile(path) as archive:
            check_unpacked_sizes(archive, path=path)
            members = [name for name in archive.namelist() if name.lower().endswith(".csv")]
            if not members:
                raise StoreError(f"{path} holds no CSV file; expected one written by store.save_embeddings.")
            # object, not str: pandas' Arrow-backed strings refuse labels that are not valid UTF-8
            options = {"dtype": {"target": object}, "keep_default_na": False} if text_targets else {}
            frame = pd.read_csv(io.BytesIO(archive.read(members[0])), encoding_errors="surrogateescape", **options)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise StoreError(f"Cannot read embeddings from {path}: {error}. Is the file complete and a ZIP?") from error
    if frame.shape[1] < 2 or frame.columns[0] != "target":
        raise StoreError(f"{path}: the CSV must start with a 'target' column followed by the embedding columns.")
    try:
        embeddings = frame.iloc[:, 1:].to_numpy(dtype=np.float32)
    except ValueError as error:
        raise StoreError(f"{path}: some embedding values are not numbers ({error}).") from error
    if np.isnan(embeddings).any():
        raise StoreError(f"{path}: some embedding values are missing or not numbers.")
    if inform:
        print("Embeddings have been loaded:", path, sep="\n  ")
    return frame.iloc[:, 0].to_numpy(), embeddings


def save_checkpoint(
    *,
    filename: PathLike,
    model: torch.nn.Module,
    train_ds: Any | None = None,
    valid_ds: Any | None = None,
    test_ds: Any | None = None,
    config: dict[str, Any] | None = None,
    inform: bool = False,
) -> pathlib.Path:
    """Save model weights, its timm config and the dataset partitions (image names only, not transforms)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    state = {
        "model_name": pretrained_cfg.get("architecture", type(model).__name__),
        "model_config": plain_json(pretrained_cfg),
        "model": model.state_dict(),
        "config": plain_json(config or {}),
        "train_ds_state": train_ds.get_state() if train_ds is not None else None,
        "valid_ds_state": valid_ds.get_state() if valid_ds is not None else None,
        "test_ds_state": test_ds.get_state() if test_ds is not None else None,
    }
    path = pathlib.Path(filename)
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    if inform:
        print("A checkpoint has been saved:", path, sep="\n  ")
    return path


def load_checkpoint(
    *, checkpoint_path: PathLike, dataset_path: PathLike | None = None, inform: bool = False
) -> tuple[torch.nn.Module, Any, Any, Any]:
    """Rebuild the model (and, given ``dataset_path``, the saved partitions) from :func:`save_checkpoint` output.

    Loading uses ``weights_only=True``: a file that needs arbitrary code to unpickle is refused.
    """
    import timm

    from simsearch import datasets

    path = pathlib.Path(checkpoint_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise StoreError(f"Cannot load checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("model_config", {}), dict):
        raise StoreError(f"{path} is not a checkpoint written by store.save_checkpoint.")
    # The original's checkpoints record no model name: its timm config names the architecture.
    model_name = state.get("model_name") or state.get("model_config", {}).get("architecture")
    if not model_name:
        raise StoreError(f"{path} names no model (neither model_name nor model_config['architecture']).")
    try:
        num_classes = _head_size(model_name=model_name, weights=state["model"])
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise StoreError(f"{path}: cannot rebuild model '{model_name}' from it: {error}") from error
    model.pretrained_cfg = state.get("model_config") or model.pretrained_cfg
    parts: tuple[Any, Any, Any] = (None, None, None)
    part_states = [state.get(f"{part}_ds_state") for part in ("train", "valid", "test")]
    if dataset_path is not None and any(part_states):
        maker = datasets.DatasetMaker(dataset_path=dataset_path, check_images=False)
        parts = maker.restore_datasets(
            train_ds_state=part_states[0], valid_ds_state=part_states[1], test_ds_state=part_states[2]
        )
    if inform:
        print("A checkpoint has been loaded:", path, sep="\n  ")
    return (model, *parts)


def _head_size(*, model_name: str, weights: dict[str, torch.Tensor]) -> int:
    """Classes of the saved classifier head (0 for a headless encoder), read from timm's name for the head."""
    import timm

    classifier = timm.models.get_pretrained_cfg_value(model_name, "classifier") or "head"
    classifier_weight = weights.get(f"{classifier}.weight")
    return 0 if classifier_weight is None else int(classifier_weight.shape[0])


def plain_json(value: Any) -> Any:
    """``value`` reduced to JSON types (dict with string keys, list, str, int, float, bool, None): dataclasses become
    dicts of their fields, tuples lists, anything else its text. Configs stored this way load with ``weights_only``
    and compare equal to themselves after a JSON round trip."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: PathLike, content: dict[str, Any]) -> pathlib.Path:
    """``content`` as indented JSON (:func:`plain_json`, floats rounded to 10 digits), written atomically."""

    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 10)
        if isinstance(value, dict):
            return {key: rounded(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rounded(item) for item in value]
        return value

    path = pathlib.Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(rounded(plain_json(content)), indent=2), encoding="utf-8")
    return path


def write_csv(path: PathLike, frame: pd.DataFrame | dict[str, Sequence[Any]]) -> pathlib.Path:
    """A results table for people and spreadsheets, written atomically: text cells that a spreadsheet would run as
    formulas are neutralised (``utils.spreadsheet_safe``), and every text cell is quoted, so one holding a carriage
    return or another control character reads back as the one cell it is.

    A mapping of column names to values is made into the table by ``utils.table``, which keeps text as Python
    strings: a file name that is not valid UTF-8 is written as its bytes."""
    path = pathlib.Path(path)
    if not isinstance(frame, pd.DataFrame):
        frame = utils.table(frame)
    text_columns = frame.select_dtypes(include=["object", "string"]).columns
    safe = frame.assign(**{column: pd.Series([utils.spreadsheet_safe(cell) for cell in frame[column]], dtype=object,
                                             index=frame.index) for column in text_columns})
    with atomic_path(path) as temporary:
        # a file name that is not valid UTF-8 (a label or a path decoded with surrogates) is written back as its own
        # bytes, and reads back equal with encoding_errors="surrogateescape"
        safe.to_csv(temporary, index=False, quoting=csv.QUOTE_NONNUMERIC, errors="surrogateescape")
    return path


def set_aside(files: Sequence[pathlib.Path], *, folder: pathlib.Path) -> pathlib.Path:
    """Move ``files`` (of ``folder``) together into a new ``folder/replaced-<time>/`` and return it: how a new
    experiment or grid keeps the results of an earlier one that it would otherwise overwrite."""
    aside = folder / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for item in files:
        os.replace(item, aside / item.name)
    return aside


def cache_key(*, model_id: str, transform: Any, fingerprint: Sequence[Sequence[Any]]) -> str:
    """Hash of everything that determines the embeddings: model and weights, preprocessing, image files."""
    digest = hashlib.sha256()
    digest.update(json.dumps([model_id, repr(transform), [list(item) for item in fingerprint]]).encode())
    return digest.hexdigest()[:32]


def acquire_writer_lock(path: PathLike, *, timeout: float) -> Any:
    """Take the lock every writer of ``path`` takes (a hidden ``.<name>.lock`` beside it) and return it, held.

    Two writers of one file (two ``add-class`` commands, two runs into one ``--out``) would otherwise both report
    success while one's work is lost or interleaved. Waits up to ``timeout`` seconds (0: not at all), then stops
    with a clear error. Within one process the same lock is returned again, so re-running a notebook cell does
    not lock itself out; release it with ``.release()`` (the operating system releases it when the process ends).
    """
    import filelock

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path.parent / f".{path.name}.lock", timeout=timeout, is_singleton=True)
    try:
        lock.acquire()
    except filelock.Timeout as error:
        raise StoreError(
            f"Another process is writing {path} (it holds {lock.lock_file}). Wait for it to finish, or write to "
            "another file or folder."
        ) from error
    except OSError as error:  # the folder does not let this user create the lock file
        raise StoreError(
            f"Cannot write {path}: its folder {path.parent} does not let this user create files "
            f"({error.strerror or error}), and every writer first creates a lock file there. Give yourself write "
            "access to the folder, or copy the file to a folder you can write to and work on the copy."
        ) from error
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # of a writer killed mid-write
        leftover.unlink(missing_ok=True)
    return lock


class EmbeddingCache:
    """Per-image embeddings on disk, one ``<key>.pt`` file per (model, transform, file list) combination.

    A different key means a different file, so a stale cache is never served: it is simply not found. A file under
    the right name is still checked before use (its key, shapes, the expected labels and a SHA-256 of its tensors):
    a damaged, truncated or edited file is reported in a warning and encoded again.
    """

    def __init__(self, directory: PathLike) -> None:
        self.directory = pathlib.Path(directory)

    def path(self, key: str) -> pathlib.Path:
        return self.directory / f"embeddings-{key}.pt"

    def load(self, key: str, *, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(embeddings, targets)`` for ``key``; None when absent, or (with a warning) when it fails a check.

        ``targets``, when given, are the label indexes the dataset expects, image by image.
        """
        path = self.path(key)
        if not path.exists():
            return None
        problem = None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            embeddings, stored_targets = state["embeddings"], state["targets"]
        except Exception as error:
            problem = f"unreadable as a torch file of this package ({type(error).__name__})"
        else:
            if state.get("key") != key:
                problem = "it was written for another key"
            elif embeddings.ndim != 2 or stored_targets.shape != (len(embeddings),):
                problem = f"embeddings {list(embeddings.shape)} do not fit targets {list(stored_targets.shape)}"
            elif targets is not None and not torch.equal(stored_targets, targets.cpu()):
                problem = f"its {len(stored_targets)} labels are not the dataset's {len(targets)}"
            elif state.get("checksum") != _tensor_checksum(embeddings, stored_targets):
                problem = "its contents do not match their checksum (edited, damaged or written by an older version)"
        if problem is not None:
            warnings.warn(f"Embedding cache {path} is not used: {problem}. Encoding again.", stacklevel=2)
            return None
        return embeddings, stored_targets

    def save(self, key: str, *, embeddings: torch.Tensor, targets: torch.Tensor) -> pathlib.Path:
        path = self.path(key)
        embeddings, targets = embeddings.cpu().contiguous(), targets.cpu().contiguous()
        state = {"key": key, "embeddings": embeddings, "targets": targets,
                 "checksum": _tensor_checksum(embeddings, targets)}
        with atomic_path(path) as temporary:
            torch.save(state, temporary)
        return path


def _tensor_checksum(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
