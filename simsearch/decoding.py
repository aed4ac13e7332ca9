"""JPEG decoding and resizing as tensors on the encoder's device (nvJPEG on CUDA), beside today's PIL path.

On a GPU the PIL path decodes and resizes every image on the CPU, which leaves the GPU waiting. The ``tensor`` path
splits the work differently: loader workers only read a JPEG's bytes (and check its header), the device decodes a
whole batch at once (``torchvision.io.decode_jpeg``, nvJPEG on CUDA) and resizes and crops each image with the
model's own geometric steps (torchvision's ``Resize`` and ``CenterCrop`` work on tensors), still as 8-bit pixels;
then the batch is normalised there. Files the device decoder would not read as PIL does (not a JPEG, CMYK, an EXIF
orientation, progressive, or a header PIL cannot parse) go through the PIL path in the worker, counted.

The two paths agree to a cosine of about 0.99 per image, not bit for bit (tensor and PIL bicubic resampling round
differently), so the decoder is part of the embedding cache's key (see ``benchmarks/decode_paths.py``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
import torchvision

from simsearch import datasets

__all__ = ["DECODERS", "TensorPipeline", "collate_encoded", "tensor_pipeline"]

DECODERS = ("pil", "tensor")
EXIF_ORIENTATION = 0x0112
JPEG = "jpeg"  # an item holding a JPEG file's bytes, decoded on the device
PIXELS = "pixels"  # an item decoded and resized by PIL in the worker


@dataclasses.dataclass(frozen=True)
class EncodedItem:
    """A loader worker's part of the tensor path: the bytes of a JPEG the device can decode, else PIL pixels."""

    pil_transform: Callable

    def __call__(self, path: pathlib.Path) -> tuple[str, torch.Tensor, str]:
        if _device_decodable(path):
            return JPEG, torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), str(path)
        return PIXELS, self.pil_transform(datasets.load_rgb_image(path)), str(path)


def _device_decodable(path: pathlib.Path) -> bool:
    """Whether a JPEG decoder on tensors reads ``path`` as the PIL path does; only the header is read."""
    try:
        with PIL.Image.open(path) as image:
            return (image.format == "JPEG" and image.mode in ("RGB", "L") and not image.info.get("progressive")
                    and image.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # noqa: BLE001  the PIL path reads the file again and reports what is wrong with it
        return False


def collate_encoded(batch: Sequence[tuple[tuple[str, torch.Tensor, str], int]]) -> tuple[list, torch.Tensor]:
    """A batch of :class:`EncodedItem` outputs as a list (JPEG bytes differ in length) and its targets."""
    return [item for item, _ in batch], torch.as_tensor([target for _, target in batch])


@dataclasses.dataclass
class TensorPipeline:
    """The device's part of the tensor path: decode a batch's JPEGs, resize and crop each, normalise the batch.

    ``fallbacks`` counts the images that came through the PIL path instead.
    """

    geometry: Callable  # the model's resize and crop, on uint8 tensors
    normalize: Callable  # uint8 batch [N, C, H, W] to the model's input (engine's batch normalisation)
    pil_transform: Callable  # the PIL path, for a JPEG the device decoder refuses after all
    device: torch.device
    fallbacks: int = 0
    decoded: int = 0

    def __call__(self, items: list[tuple[str, torch.Tensor, str]]) -> torch.Tensor:
        jpegs = [(data, path) for kind, data, path in items if kind == JPEG]
        decoded = iter(self._decode(jpegs) if jpegs else [])
        pixels = [next(decoded) if kind == JPEG else data.to(self.device, non_blocking=True)
                  for kind, data, _ in items]
        self.fallbacks += len(items) - len(jpegs)
        return self.normalize(torch.stack(pixels))

    def _decode(self, jpegs: list[tuple[torch.Tensor, str]]) -> list[torch.Tensor]:
        """Resized pixels of each JPEG: the batch decoded at once, or, where that fails (a file damaged past its
        header), one by one, and what the device still refuses through PIL, which names a damaged file."""
        try:
            images = [self.geometry(image) for image in _decode_jpegs([data for data, _ in jpegs], self.device)]
            self.decoded += len(jpegs)
            return images
        except RuntimeError:
            return [self._decode_one(data, path) for data, path in jpegs]

    def _decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor:
        try:
            (image,) = _decode_jpegs([data], self.device)
        except RuntimeError:
            self.fallbacks += 1
            return self.pil_transform(datasets.load_rgb_image(path)).to(self.device)
        self.decoded += 1
        return self.geometry(image)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device)


def tensor_pipeline(
    transform: Any, *, device: torch.device, normalize: Callable | None
) -> tuple[EncodedItem, TensorPipeline] | None:
    """The worker and device parts of the tensor path for a model's evaluation ``transform`` (as
    :func:`engine.split_normalization` splits it: resize, crop, to 8-bit pixels), or None when ``transform`` is not
    that shape (the PIL path then serves)."""
    steps = list(getattr(transform, "transforms", []))
    if normalize is None or not steps or type(steps[-1]) is not torchvision.transforms.PILToTensor:
        return None
    geometric = (torchvision.transforms.Resize, torchvision.transforms.CenterCrop)
    if not all(type(step) in geometric for step in steps[:-1]):
        return None
    geometry = torchvision.transforms.Compose(steps[:-1])
    return EncodedItem(pil_transform=transform), TensorPipeline(geometry=geometry, normalize=normalize,
                                                                pil_transform=transform, device=device)
