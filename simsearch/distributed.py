"""Beyond one machine: Ray Data encodes a dataset into a Parquet embedding set; estimators fit shard by shard and merge.

An *embedding set* is a folder of Parquet shards (columns ``index``, ``label``, ``name``, ``embedding``) and a
``manifest.json`` written last and atomically: the model with its weights digest, the preprocessing, precision,
classes, counts, skipped files and the shard list. A folder without a manifest is an unfinished run and is never
read. Every estimator of :mod:`prototypes` is built from additive statistics, so each shard is fitted where it lies
and the parts merge exactly (:func:`prototypes.merge_statistics`); the leave-one-out ridge selection runs shard by
shard against the merged statistics.

Ray (``pip install -e .[distributed]``) is imported only by the functions that need it::

    python -m simsearch distributed DATASET --out embeddings/caltech --weights lite0.pth --actors 2
    RAY_ADDRESS=auto python -m simsearch distributed DATASET --out s3-or-shared-folder/ --actors 8 --gpus-per-actor 1
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import socket
import time
import warnings
from typing import Any

import numpy as np
import sklearn.base
import torch

from simsearch import datasets, encoders, store, utils
from simsearch.classifiers import prototypes
from simsearch.identity import ModelIdentity

__all__ = [
    "EmbeddingSet",
    "EmbeddingSetError",
    "EncoderSpec",
    "MANIFEST",
    "Shard",
    "encode_dataset",
    "fit_shards",
    "init_ray",
    "list_shards",
    "read_embedding_set",
    "require_ray",
    "shard_statistics",
]

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT = 2  # 2: every shard pinned by SHA-256, rows, dimension and a digest of its sample indexes and names
SHARD_KEYS = ("name", "sha256", "rows", "dim", "samples")
MANIFEST_KEYS = {"modality": str, "model_id": str, "model_name": str, "precision": str, "dataset": str,
                 "classes": list, "counts": list, "num_samples": int, "embedding_dim": int, "skipped": list,
                 "shards": list, "fingerprint": str}
CONNECT_TIMEOUT_S = 10.0  # how long a cluster address may stay silent before it is refused
TASK_RETRIES = 3  # a batch whose actor died is run again on a fresh actor this many times


class EmbeddingSetError(utils.UserError):
    """An embedding set that is missing, unfinished, damaged or made by another model."""


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or one line saying which extra installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise utils.UserError(
            f"Distributed encoding needs Ray Data ({error}); install the extra: pip install -e '.[distributed]' "
            "(ray[data] and pyarrow)."
        ) from error
    return ray


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray of ``num_cpus`` CPUs, offline and
    without usage statistics; a second call reuses the running one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if num_cpus is not None and num_cpus < 1:
        raise utils.UserError(f"A local Ray needs at least one CPU (--num-cpus), got {num_cpus}.")
    if address is not None:
        _check_reachable(address)
    importable = str(pathlib.Path(__file__).resolve().parents[1])  # where the workers find the package itself
    ray.init(
        address=address, num_cpus=None if address else num_cpus, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": importable, "RAY_USAGE_STATS_ENABLED": "0",
                                  "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}},
    )
    return ray


def _check_reachable(address: str) -> None:
    """Refuse a cluster address nothing answers at within ``CONNECT_TIMEOUT_S``: Ray itself retries forever."""
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    if address in ("auto", "local") or ":" not in host_port:
        return  # Ray finds these itself, and says so when there is none
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as error:
        raise utils.UserError(
            f"No Ray cluster answers at {address} within {CONNECT_TIMEOUT_S:g} s ({error}); start one with "
            "`ray start --head`, or fix --address / RAY_ADDRESS (leave both out for a local Ray)."
        ) from error


def check_cluster_fits(ray: Any, *, actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse, before any work, actors the cluster can never place: Ray would wait for them forever."""
    total = ray.cluster_resources()
    largest = {kind: max([node.get("Resources", {}).get(kind, 0.0) for node in ray.nodes() if node.get("Alive")],
                         default=0.0) for kind in ("CPU", "GPU")}
    for kind, per_actor, option in (("CPU", cpus_per_actor, "--cpus-per-actor"),
                                    ("GPU", gpus_per_actor, "--gpus-per-actor")):
        if per_actor and (largest[kind] < per_actor or total.get(kind, 0.0) < actors * per_actor):
            raise utils.UserError(
                f"The Ray cluster has {total.get(kind, 0.0):g} {kind}s ({largest[kind]:g} on its largest node), too "
                f"few for {actors} actor(s) of {per_actor:g} {kind}(s) each: lower --actors or {option}"
                f"{' (0 encodes on CPUs)' if kind == 'GPU' else ''}, or add nodes."
            )


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything an actor needs to build the same encoder as the research script, resolved once on the driver."""

    modality: str
    model_name: str
    weights: str | None = None
    precision: str = "fp32"
    compile: bool = False
    tune_allocator: bool = True

    def build(self, *, device: str) -> tuple[encoders.Encoder, Any, Any]:
        """``(encoder, per-sample transform, batch transform)``; texts have no transforms."""
        config = encoders.EncoderConfig(precision=self.precision, compile=self.compile,
                                      tune_allocator=self.tune_allocator)
        encoder = encoders.create_encoder(modality=self.modality, model_name=self.model_name, weights=self.weights,
                                        device=device, config=config)
        if self.modality == "text":
            return encoder, None, None
        return encoder, *encoders.split_normalization(encoders.eval_transform(encoder.model)[1])

    def preprocessing(self, encoder: encoders.Encoder) -> str:
        """The preprocessing as text, as the embedding cache keys it."""
        return "" if self.modality == "text" else repr(encoders.eval_transform(encoder.model)[1])


class _EmbedBatch:
    """The Ray Data actor: one encoder per actor, a batch of ``{index, label, name}`` rows in, embeddings out.

    ``decoders`` threads decode and resize a batch's images (Pillow releases the GIL there): an actor given several
    CPUs, such as a GPU actor with a node's cores, prepares a batch on all of them instead of one image at a time.
    """

    def __init__(self, spec: EncoderSpec, decoders: int = 1) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.modality = spec.modality
        self.encoder, self.sample_transform, self.batch_transform = spec.build(device=device)
        # one decoder decodes in the actor's own thread: through a pool of one, two 1-CPU actors ran about 12 %
        # slower on 3,741 Caltech-101 images
        self.decoding = (concurrent.futures.ThreadPoolExecutor(max_workers=decoders, thread_name_prefix="decode")
                         if decoders > 1 else None)

    def _load(self, name: str) -> torch.Tensor:
        return self.sample_transform(datasets.load_rgb_image(name))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [str(name) for name in batch["name"]]
        with torch.inference_mode():
            if self.modality == "text":
                embeddings = self.encoder._forward(names)
            else:
                decode = self.decoding.map if self.decoding is not None else map
                images = torch.stack(list(decode(self._load, names)))
                embeddings = self.encoder._forward(self.batch_transform(images))
        return {"index": batch["index"], "label": batch["label"], "name": batch["name"],
                "embedding": embeddings.cpu().numpy().astype(np.float32)}


def _samples(maker: datasets.SampleListing) -> list[dict[str, Any]]:
    """One row per sample in the maker's global order: file path (images) or text, and label index."""
    names = [str(sample) for sample in maker.get_samples()]
    labels = maker.get_image_labels().tolist()
    return [{"index": index, "label": label, "name": name} for index, (name, label) in enumerate(zip(names, labels))]


def _fingerprint_digest(maker: datasets.SampleListing) -> str:
    return hashlib.sha256(json.dumps(maker.get_fingerprint()).encode()).hexdigest()


def encode_dataset(
    *,
    maker: datasets.SampleListing,
    spec: EncoderSpec,
    out: str | os.PathLike,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    batch_size: int = 32,
    rows_per_shard: int = 100_000,
    cpus_per_actor: float | None = None,
) -> dict[str, Any]:
    """Embed every sample of ``maker`` on the running Ray cluster (see :func:`init_ray`) into an embedding set at
    ``out``, and return its manifest.

    ``cpus_per_actor`` (default: the cluster's CPUs shared out among the actors, one with GPUs) is also the torch
    thread count of each actor and the number of threads that decode its images. A folder holding the complete set
    of the same model, preprocessing and samples is returned as it is (a rerun resumes by doing nothing); a complete
    set of anything else is refused; shards without a manifest (a run that died) are removed first, so two runs
    never mix.
    """
    ray = require_ray()
    out = pathlib.Path(out)
    if cpus_per_actor is None:
        cpus_per_actor = 1.0 if gpus_per_actor else max(1.0, ray.cluster_resources().get("CPU", 1) // actors)
    check_cluster_fits(ray, actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
    encoder, _, _ = spec.build(device="cpu")  # the driver's copy names the model and weights, as the cache does
    identity = encoders.model_identity(encoder, model_name=spec.model_name)
    expected = {"model_id": identity.model_id, "preprocessing": spec.preprocessing(encoder),
                "transform_config": identity.transform_config, "fingerprint": _fingerprint_digest(maker)}
    finished = _finished_set(out, expected=expected)
    if finished is not None:
        return finished
    samples = _samples(maker)
    started = time.perf_counter()
    embedded = _embedded(ray, samples, spec=spec, actors=actors, gpus_per_actor=gpus_per_actor,
                         cpus_per_actor=cpus_per_actor, batch_size=batch_size)
    embedded.write_parquet(str(out / SHARDS), max_rows_per_file=rows_per_shard)
    seconds = time.perf_counter() - started
    shards = [_pin_shard(path) for path in sorted((out / SHARDS).glob("*.parquet"))]
    manifest = {
        "format": FORMAT, **identity.record(), **expected, "precision": spec.precision,
        "dataset": str(maker.dataset_path), "classes": maker.get_labels(),
        "counts": torch.bincount(maker.get_image_labels(), minlength=maker.get_num_labels()).tolist(),
        "num_samples": len(samples), "embedding_dim": encoder.num_features,
        "skipped": [{"path": str(path), "reason": reason} for path, reason in maker.skipped],
        "shards": shards, "encode_seconds": seconds, "actors": actors, "cpus_per_actor": cpus_per_actor,
        "allocator_environment": utils.allocator_environment() if spec.tune_allocator else {},
    }
    rows = sum(entry["rows"] for entry in shards)
    if rows != len(samples):
        raise EmbeddingSetError(f"The shards in {out / SHARDS} hold {rows} rows for {len(samples)} samples; "
                                "the run is incomplete, so no manifest was written. Run it again.")
    store.write_json(out / MANIFEST, manifest)
    return _read_manifest(out)


def _finished_set(out: pathlib.Path, *, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete set at ``out`` made as ``expected`` says (a rerun has nothing to do), None where
    there is none (the shards of a run that died are removed); a complete set of anything else is refused."""
    if (out / MANIFEST).is_file():
        manifest = _read_manifest(out)
        differing = [name for name, value in expected.items() if manifest.get(name) != value]
        if not differing:
            print(f"{out} already holds this embedding set ({manifest['num_samples']} samples); nothing to do.")
            return manifest
        raise EmbeddingSetError(
            f"{out} holds a complete embedding set whose {', '.join(differing)} differ from this run's "
            f"({manifest.get('model_id')} on {manifest.get('dataset')}); choose another --out or remove that folder."
        )
    if (out / SHARDS).exists():
        print(f"Removing the shards of an unfinished earlier run in {out / SHARDS} (it wrote no manifest).")
        shutil.rmtree(out / SHARDS)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _embedded(
    ray: Any, samples: list[dict[str, Any]], *, spec: EncoderSpec, actors: int, gpus_per_actor: float,
    cpus_per_actor: float, batch_size: int,
) -> Any:
    """The Ray dataset of the samples' embeddings, computed by a pool of ``actors`` encoder actors as it streams."""
    # Blocks of about 8 batches keep every actor busy and stream (two huge blocks per actor ran at 0.6 x the rate
    # on Caltech-101); each block becomes a shard, split further at rows_per_shard.
    dataset = ray.data.from_items(samples, override_num_blocks=max(actors * 4, -(-len(samples) // (batch_size * 8))))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options as keywords, yet names no parameter for these two; its own
        # default retries a failing batch forever.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(
            _EmbedBatch, fn_constructor_kwargs={"spec": spec, "decoders": max(1, int(cpus_per_actor))},
            batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None,
            num_cpus=cpus_per_actor,
            max_restarts=TASK_RETRIES, max_task_retries=TASK_RETRIES,
            runtime_env={"env_vars": utils.allocator_environment()} if spec.tune_allocator else None,
        )


def _pin_shard(path: pathlib.Path) -> dict[str, Any]:
    """What the manifest records of a shard it lists, so that a reader refuses any other file under that name."""
    data = path.read_bytes()
    return {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(),
            **_shard_contents(_parse_shard(data, path=path))}


def _shard_contents(part: dict[str, np.ndarray]) -> dict[str, Any]:
    """A parsed shard's rows, embedding dimension and samples digest, as its manifest entry holds them."""
    return {"rows": len(part["index"]), "dim": int(part["embedding"].shape[1]), "samples": _samples_digest(part)}


def _samples_digest(part: dict[str, np.ndarray]) -> str:
    """SHA-256 of a shard's sample indexes and names (paths or texts), in its row order."""
    return hashlib.sha256(json.dumps([part["index"].tolist(), [str(name) for name in part["name"]]]).encode()
                          ).hexdigest()


def _read_manifest(folder: pathlib.Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (its shards are from a run that did not finish)" if (folder / SHARDS).exists() else ""
        raise EmbeddingSetError(f"{folder} is not an embedding set: it has no {MANIFEST}{hint}. Encode it with "
                                "python -m simsearch distributed.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EmbeddingSetError(f"Cannot read {path}: {error}. Encode the set again.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        older = " (written by an earlier version whose shards are not pinned by checksums)" if found == 1 else ""
        raise EmbeddingSetError(f"{path} is not an embedding set manifest of format {FORMAT}{older}; remove "
                                f"{folder} and encode the set again with python -m simsearch distributed.")
    wrong = [key for key, kind in MANIFEST_KEYS.items() if type(manifest.get(key)) is not kind]
    if "shards" not in wrong and not all(_is_shard_entry(entry) for entry in manifest["shards"]):
        wrong.append("shards")
    if wrong:
        raise EmbeddingSetError(f"{path} lacks or mistypes {', '.join(wrong)}; the manifest was edited or damaged. "
                                "Encode the set again.")
    return manifest


def _is_shard_entry(entry: Any) -> bool:
    """A manifest's shard entry: every key, and a plain file name (no path that leads out of ``shards/``)."""
    if not isinstance(entry, dict) or any(key not in entry for key in SHARD_KEYS):
        return False
    name = entry["name"]
    return isinstance(name, str) and pathlib.Path(name).name == name and name not in ("", ".", "..")


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
    """A read embedding set, samples in the dataset's global order."""

    embeddings: torch.Tensor  # [N, D] float32
    targets: torch.Tensor  # [N] label indexes into manifest["classes"]
    names: list[str]  # file paths or texts
    manifest: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """The model fields of :meth:`encoders.Encoder.describe`, as far as the set knows them."""
        return {"model_name": self.manifest["model_id"], "num_trainable_params": "unknown (embedding set)",
                "embedding_dim": self.manifest["embedding_dim"]}

    def identity(self) -> ModelIdentity:
        """The model, preprocessing and modality the set was encoded with."""
        return ModelIdentity.from_record(self.manifest)

    def listing(self) -> datasets.ListedSamples:
        """The samples the set was encoded from, listed as the dataset lists them (same classes, same global
        order), so the protocol draws the same partitions as on the dataset without reading a sample."""
        manifest = self.manifest
        starts = np.concatenate([[0], np.cumsum(manifest["counts"])]).tolist()
        return datasets.ListedSamples(
            modality=manifest["modality"], dataset_path=manifest["dataset"],
            classes={label: self.names[starts[row]:starts[row + 1]] for row, label in enumerate(manifest["classes"])},
            fingerprint=f"embedding-set:{manifest['fingerprint']}",
            skipped=[(pathlib.Path(item["path"]), item["reason"]) for item in manifest["skipped"]],
        )


def _read_shard(path: pathlib.Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """The columns of one shard, after checking it is the file its manifest entry pins (read once, from memory)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EmbeddingSetError(f"Cannot read the shard {path}: {error}. Encode the set again.") from error
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise EmbeddingSetError(f"The shard {path} is not the file its manifest lists (SHA-256 differs): it was "
                                "replaced, edited or damaged. Encode the set again.")
    part = _parse_shard(data, path=path)
    differing = [key for key, value in _shard_contents(part).items() if entry[key] != value]
    if differing:
        raise EmbeddingSetError(f"The shard {path} does not match its manifest entry ({', '.join(differing)}). "
                                "Encode the set again.")
    return part


def _parse_shard(data: bytes, *, path: pathlib.Path) -> dict[str, np.ndarray]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(pyarrow.BufferReader(data), columns=["index", "label", "name", "embedding"])
        embeddings = _tensor_column(table.column("embedding").combine_chunks())
    except (pyarrow.ArrowException, ValueError, KeyError) as error:
        raise EmbeddingSetError(f"The shard {path} is not a readable embedding shard ({error}); encode the set "
                                "again.") from error
    return {"index": table.column("index").to_numpy(), "label": table.column("label").to_numpy(),
            "name": np.asarray(table.column("name").to_pylist(), dtype=object), "embedding": embeddings}


def _tensor_column(column: Any) -> np.ndarray:
    """The ``[rows, D]`` array of an embedding column, whether Ray wrote it as its tensor type or as lists."""
    if hasattr(column.type, "to_pandas_dtype") and hasattr(column, "to_numpy_ndarray"):
        return np.asarray(column.to_numpy_ndarray(), dtype=np.float32)
    if hasattr(column, "to_numpy") and hasattr(column.type, "shape"):  # ray's ArrowTensorArray
        return np.asarray(column.to_numpy(), dtype=np.float32)
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def read_embedding_set(folder: str | os.PathLike, *, model_id: str | None = None) -> EmbeddingSet:
    """The embedding set at ``folder`` (Ray not needed); refuses an unfinished or damaged set, and one written by
    another model than ``model_id`` when given."""
    folder = pathlib.Path(folder)
    manifest = _read_manifest(folder)
    if model_id is not None and manifest["model_id"] != model_id:
        raise EmbeddingSetError(f"{folder} was encoded by {manifest['model_id']}, not by {model_id}; encode the "
                                "dataset with this model (python -m simsearch distributed) or pick the matching model.")
    missing = [entry["name"] for entry in manifest["shards"] if not (folder / SHARDS / entry["name"]).is_file()]
    if missing:
        raise EmbeddingSetError(f"{folder} lacks {len(missing)} of its {len(manifest['shards'])} shards "
                                f"({missing[0]} ...); encode the set again.")
    wrong = [entry for entry in manifest["shards"] if entry["dim"] != manifest["embedding_dim"]]
    if wrong:  # from the manifest alone, before a shard is read
        raise EmbeddingSetError(f"The shard {folder / SHARDS / wrong[0]['name']} holds {wrong[0]['dim']}-d embeddings, "
                                f"the set's manifest says {manifest['embedding_dim']}; encode the set again.")
    parts = [_read_shard(folder / SHARDS / entry["name"], entry) for entry in manifest["shards"]]
    index = np.concatenate([part["index"] for part in parts])
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(manifest["num_samples"])):
        raise EmbeddingSetError(f"The shards of {folder} do not hold samples 0..{manifest['num_samples'] - 1} once "
                                "each; encode the set again.")
    targets = torch.from_numpy(np.concatenate([part["label"] for part in parts])[order].astype(np.int64))
    if torch.bincount(targets, minlength=len(manifest["classes"])).tolist() != manifest["counts"]:
        raise EmbeddingSetError(f"The labels in the shards of {folder} do not match its manifest's class counts.")
    embeddings = torch.from_numpy(np.concatenate([part["embedding"] for part in parts])[order])
    names = np.concatenate([part["name"] for part in parts])[order].tolist()
    return EmbeddingSet(embeddings=embeddings, targets=targets, names=[str(name) for name in names],
                        manifest=manifest)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of an embedding set with its manifest entry: what a Ray task needs to read it and check it."""

    path: str
    entry: dict[str, Any]

    def read(self) -> dict[str, np.ndarray]:
        return _read_shard(pathlib.Path(self.path), self.entry)


def list_shards(folder: str | os.PathLike) -> list[Shard]:
    """The shards of the embedding set at ``folder``, in manifest order."""
    folder = pathlib.Path(folder)
    return [Shard(path=str(folder / SHARDS / entry["name"]), entry=entry) for entry in _read_manifest(folder)["shards"]]


def shard_statistics(shard: Shard, estimator: Any) -> dict[str, np.ndarray]:
    """The statistics of ``estimator``'s class fitted on one shard, as plain arrays (what crosses the network). A
    leave-one-out ridge choice is left to :func:`fit_shards` (it needs the merged statistics), so the shard is fitted
    with a fixed ridge: the statistics do not depend on it."""
    part = shard.read()
    fitted = sklearn.base.clone(estimator)
    if getattr(fitted, "alpha", None) == "loo":
        fitted.set_params(alpha=1.0)
    return fitted.fit(part["embedding"], part["label"]).get_statistics()


def _shard_hits(shard: Shard, merged: Any, decomposition: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    part = shard.read()
    return merged.leave_one_out_hits(part["embedding"], part["label"], decomposition=decomposition), part["label"]


def _shard_moments(shard: Shard, merged: Any) -> np.ndarray:
    return merged.unknown_moments(shard.read()["embedding"])


def fit_shards(folder: str | os.PathLike, estimator: Any, *, use_ray: bool = True) -> Any:
    """``estimator`` fitted on every sample of the embedding set at ``folder`` without gathering the embeddings:
    each shard is fitted by a Ray task where it lies (``use_ray=False``: one after another here), the statistics
    merge exactly, and a leave-one-out ridge selection runs shard by shard against the merged statistics (one
    eigendecomposition, shared), then the combined unknown score's moments. Which unknown score (``"auto"``) and
    the probabilities' temperature are the first shard's choices: choosing hides classes or folds of images from
    sub-fits, which needs their images in one place, and a shard is a random sample of them. Classes are the label
    indexes of the manifest's ``classes``."""
    shards = list_shards(folder)
    if use_ray:
        ray = require_ray()
        states = ray.get([ray.remote(shard_statistics).remote(shard, estimator) for shard in shards])
    else:
        states = [shard_statistics(shard, estimator) for shard in shards]
    merged = prototypes.merge_statistics(states, into=estimator)
    if not isinstance(merged, prototypes.DecorrelatedClassifier):
        return merged

    def over_shards(task: Any, *shared: Any) -> list[Any]:
        """``task(shard, merged, *shared)`` for every shard, as Ray tasks (the shared values put once) or here."""
        if not use_ray:
            return [task(shard, merged, *shared) for shard in shards]
        references = [ray.put(value) for value in (merged, *shared)]
        return ray.get([ray.remote(task).remote(shard, *references) for shard in shards])

    if merged.alpha == "loo":
        results = over_shards(_shard_hits, merged.decomposition())
        merged.select_alpha(np.concatenate([hits for hits, _ in results], axis=1),
                            np.concatenate([labels for _, labels in results]))
    if merged.unknown_score_ != "combined":
        return merged
    return merged.set_unknown_moments(np.sum(over_shards(_shard_moments), axis=0))


def describe(manifest: dict[str, Any]) -> str:
    """One line about an embedding set."""
    return (f"{manifest['num_samples']} {manifest['modality']} embeddings of {len(manifest['classes'])} classes by "
            f"{manifest['model_id']} in {len(manifest['shards'])} shards")
