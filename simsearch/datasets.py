"""Class-folder image datasets (Sourav Banerjee's Animal-90 and any ``<root>/<class>/<images>`` layout).

``DatasetMaker`` enumerates and checks the files once, then splits them per class into training, validation and
test parts; ``Animal90`` is the ``torch.utils.data.Dataset`` each part becomes. A part is described by plain lists
(``Animal90.get_state``), so a partition can be saved with a checkpoint and rebuilt later without the pixels.

For Animal-90 pass the folder that holds the 90 class folders (``.../animals/animals`` in the Kaggle download),
not the one with ``name of the animals.txt`` beside it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import numbers
import os
import pathlib
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import timm.data.transforms
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from tqdm import tqdm

from simsearch import utils

__all__ = [
    "IMAGE_EXTENSIONS",
    "Animal90",
    "DatasetError",
    "DatasetMaker",
    "DOWNLOADS",
    "TextDataset",
    "TextDatasetMaker",
    "UnreadableImageError",
    "augment_data",
    "check_shares",
    "detect_modality",
    "download_dataset",
    "list_image_files",
    "load_rgb_image",
    "make_dataset_maker",
    "split_class_members",
    "write_digits",
]

PathLike = str | os.PathLike

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

# Grayscale modes with more than 8 bits per pixel; ``convert("RGB")`` would clip them instead of scaling.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# How many skipped paths a warning or error message lists before pointing to ``DatasetMaker.skipped``.
_LISTED_PATHS = 20


class DatasetError(utils.UserError):
    """The dataset folder, its structure or the requested split cannot be used as asked."""


class UnreadableImageError(OSError):
    """An image file cannot be decoded into pixels; ``path`` and ``reason`` say which one and why."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"Cannot decode image {path}: {reason}. Re-save it in a common format or delete it.")
        self.path = pathlib.Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[pathlib.Path, str]]:
        # Default exception pickling replays ``args`` (the message), which does not fit ``__init__``; DataLoader
        # workers and thread pools need to pass this error around.
        return type(self), (self.path, self.reason)


def load_rgb_image(path: PathLike, *, strict: bool = False) -> Image.Image:
    """Decode an image the way a camera or browser shows it: EXIF orientation applied, 3-channel 8-bit RGB.

    Pixels are loaded here so that a truncated file fails now, with its path, rather than inside a transform.
    With ``strict`` an image above ``PIL.Image.MAX_IMAGE_PIXELS`` is refused instead of only warned about.
    """
    return _decode(path, strict=strict, draft=False)


def _decode(path: PathLike, *, strict: bool, draft: bool) -> Image.Image:
    """Shared by loading and checking; ``draft`` decodes JPEGs at 1/8 scale, which still reads every byte."""
    try:
        with Image.open(path) as image:
            if strict and Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise UnreadableImageError(
                    path,
                    f"{image.width}x{image.height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS="
                    f"{Image.MAX_IMAGE_PIXELS} (possible decompression bomb)",
                )
            if draft:
                image.draft(None, (1, 1))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except UnreadableImageError:
        raise
    # PIL plugins report damaged data with OSError, ValueError, SyntaxError, struct.error, EOFError and others.
    except Exception as error:
        raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Three 8-bit channels; transparency is composited over white, as an image viewer would show it."""
    if image.mode in _WIDE_GRAY_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` (timm augmentations use it) for one block only."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class LabelledSamples(torch.utils.data.Dataset):
    """Samples of one dataset part with their labels, of which an *active* subset is served: the part of
    :class:`Animal90` (images) and :class:`TextDataset` (sentences) that does not depend on what a sample is.

    ``images[i] = (sample name, label index)`` (for images the file name relative to its class folder, for
    sentences the text) and ``labels[j] = (class name, first sample index, end sample index)``: samples are stored
    class by class. Selecting classes with ``use_labels`` renumbers them 0..k-1 (the *active* label indexes
    ``__getitem__`` returns) without touching the stored lists, so every part of a split keeps the same label
    numbering. ``global_indexes`` (default: position in ``images``) identifies each sample across parts; it seeds
    per-sample augmentation (``set_sample_seed``), so a sample is augmented the same way whichever part it lands in.
    """

    def __init__(
        self,
        *,
        dataset_path: PathLike,
        images: Sequence[Sequence[Any]],
        labels: Sequence[Sequence[Any]],
        transform: Callable | None = None,
        global_indexes: Sequence[int] | None = None,
    ) -> None:
        self._dataset_path = pathlib.Path(dataset_path)
        self._images, self._labels = _parse_layout(images=images, labels=labels)
        if global_indexes is None:
            global_indexes = range(len(self._images))
        self._global_indexes = [int(index) for index in global_indexes]
        if len(self._global_indexes) != len(self._images):
            raise ValueError(f"Got {len(self._global_indexes)} global indexes for {len(self._images)} images.")
        self._transform = transform
        self._sample_seed: int | None = None
        self._act_labels: list[tuple[int, int, int]] = []  # (label index, first, end active image index)
        self._act_images: list[tuple[int, int]] = []  # (image index, active label index)
        self.use_labels()

    def __len__(self) -> int:
        return len(self._act_images)

    def __getitem__(self, act_image_idx: int) -> tuple[Any, int]:
        image_idx, act_label_idx = self._act_images[act_image_idx]
        sample = self._load(image_idx)
        if self._transform is None:
            return sample, act_label_idx
        if self._sample_seed is None:
            return self._transform(sample), act_label_idx
        with _seeded_rngs(self._sample_seed + self._global_indexes[image_idx]):
            return self._transform(sample), act_label_idx

    def _load(self, image_idx: int) -> Any:
        """The sample stored at ``image_idx``, before the transform."""
        raise NotImplementedError

    def use_labels(
        self,
        *,
        label_indexes: Iterable[int] | None = None,
        share: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Serve only some classes, chosen by index or as a random ``share`` of all classes (rounded down)."""
        if label_indexes is not None and share is not None:
            raise ValueError("Select labels either by label_indexes or by share, not both.")
        num_labels = len(self._labels)
        if share is not None:
            if not isinstance(share, numbers.Real) or not 0.0 <= share <= 1.0:
                raise DatasetError(f"share must be a number in [0, 1], got {share!r}.")
            label_indexes = torch.randperm(num_labels, generator=generator)[: int(share * num_labels)].tolist()
        if label_indexes is None:
            label_indexes = range(num_labels)
        label_indexes = sorted(int(index) for index in label_indexes)
        bad = [index for index in label_indexes if not 0 <= index < num_labels]
        if bad:
            raise DatasetError(f"Label indexes {bad} are outside 0..{num_labels - 1} ({num_labels} labels).")
        if len(set(label_indexes)) != len(label_indexes):
            raise DatasetError(f"Label indexes must be unique, got {label_indexes}.")
        self._act_labels = []
        self._act_images = []
        for act_label_idx, label_idx in enumerate(label_indexes):
            _, begin, end = self._labels[label_idx]
            first = len(self._act_images)
            self._act_images.extend((image_idx, act_label_idx) for image_idx in range(begin, end))
            self._act_labels.append((label_idx, first, len(self._act_images)))

    def get_label(self, act_label_idx: int) -> str:
        return self._labels[self._act_labels[act_label_idx][0]][0]

    def get_labels(self) -> list[str]:
        """All label names, active or not, in label index order."""
        return [label for label, _, _ in self._labels]

    def get_act_labels(self) -> list[tuple[str, int]]:
        """For callers of the original: ``(label name, label index)`` of each active label, in active label order."""
        return [(self._labels[label_idx][0], label_idx) for label_idx, _, _ in self._act_labels]

    def act_label_idx_to_label_idx(self, act_label_idx: int) -> int:
        return self._act_labels[act_label_idx][0]

    def get_num_labels(self) -> int:
        return len(self._labels)

    def get_num_act_labels(self) -> int:
        return len(self._act_labels)

    def get_num_images(self) -> int:
        """All images of this part, including those of inactive labels (``len`` counts active ones)."""
        return len(self._images)

    def get_num_images_by_label(self, act_label_idx: int) -> int:
        _, first, end = self._act_labels[act_label_idx]
        return end - first

    def get_targets(self) -> list[int]:
        """Active label index of each active image, in dataset order, without loading any image."""
        return [act_label_idx for _, act_label_idx in self._act_images]

    def get_state(self) -> dict[str, list]:
        """Plain lists (JSON and ``torch.load(weights_only=True)`` safe) that rebuild this part; no transform."""
        return {
            "images": [[name, label_idx] for name, label_idx in self._images],
            "labels": [[label, begin, end] for label, begin, end in self._labels],
            "act_labels": [label_idx for label_idx, _, _ in self._act_labels],
        }

    def get_transform(self) -> Callable | None:
        return self._transform

    def set_transform(self, transform: Callable | None) -> None:
        self._transform = transform

    def set_sample_seed(self, seed: int | None) -> None:
        """Make random augmentation a function of (seed, image) alone, independent of DataLoader workers/order."""
        if seed is not None and not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {seed!r}.")
        self._sample_seed = None if seed is None else int(seed)


class Animal90(LabelledSamples):
    """Images of one dataset part (``__getitem__`` returns ``(RGB image, active label index)``), as the original
    names it; any class-folder image dataset works."""

    def __init__(
        self,
        *,
        dataset_path: PathLike,
        images: Sequence[Sequence[Any]],
        labels: Sequence[Sequence[Any]],
        pil_images: bool = True,
        transform: Callable | None = None,
        global_indexes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dataset_path=dataset_path, images=images, labels=labels, transform=transform,
                         global_indexes=global_indexes)
        self._image_type = "pil" if pil_images else "tensor"

    def _load(self, image_idx: int) -> Image.Image | torch.Tensor | pathlib.Path:
        path = self._path(image_idx)
        if self._image_type == "path":
            return path  # the transform reads the file itself (decoding.EncodedItem)
        image = load_rgb_image(path)
        return image if self._image_type == "pil" else TF.pil_to_tensor(image)

    def _path(self, image_idx: int) -> pathlib.Path:
        name, label_idx = self._images[image_idx]
        return self._dataset_path / self._labels[label_idx][0] / name

    def get_image_path(self, act_image_idx: int) -> pathlib.Path:
        return self._path(self._act_images[act_image_idx][0])

    def set_image_type(self, image_type: str) -> None:
        """``"pil"`` for PIL images, ``"tensor"`` (or ``"tsr"``) for uint8 CHW RGB tensors, ``"path"`` for the
        file's path (a transform that reads the file itself)."""
        kind = {"tsr": "tensor"}.get(image_type.lower(), image_type.lower())
        if kind not in ("pil", "tensor", "path"):
            raise ValueError(f"Unknown image type {image_type!r}; use 'pil', 'tensor', 'tsr' or 'path'.")
        self._image_type = kind


def _parse_layout(
    *, images: Sequence[Sequence[Any]], labels: Sequence[Sequence[Any]]
) -> tuple[list[tuple[str, int]], list[tuple[str, int, int]]]:
    """Typed copies of image/label lists, refused unless stored class by class (e.g. a hand-edited state)."""
    images = [(str(name), int(label_idx)) for name, label_idx in images]
    labels = [(str(label), int(begin), int(end)) for label, begin, end in labels]
    end = 0
    for label_idx, (label, begin, label_end) in enumerate(labels):
        if begin != end or not begin <= label_end <= len(images):
            raise DatasetError(
                f"labels[{label_idx}] = ({label!r}, {begin}, {label_end}) should start at {end} and end "
                f"within the {len(images)} images: labels must cover the image list contiguously, class by class."
            )
        stray = next((index for index in range(begin, label_end) if images[index][1] != label_idx), None)
        if stray is not None:
            raise DatasetError(
                f"Image {stray} {images[stray]} lies in the range of label {label_idx} ({label!r}) "
                "but carries another label index."
            )
        end = label_end
    if end != len(images):
        raise DatasetError(f"Labels cover {end} images but {len(images)} are listed.")
    return images, labels


def _warn_about_linked_duplicates(paths: Sequence[pathlib.Path], *, dataset_path: pathlib.Path) -> None:
    """Say when symbolic links make one file count as several samples (a class folder linked to the dataset root
    holds every image again): the copies inflate the class sizes and land in training and validation alike."""
    first_path: dict[str, pathlib.Path] = {}
    duplicates = []
    for path in paths:
        real = os.path.realpath(path)
        if real in first_path:
            duplicates.append((first_path[real], path))
        else:
            first_path[real] = path
    if duplicates:
        first, again = duplicates[0]
        warnings.warn(
            f"{len(duplicates)} sample(s) of {dataset_path} are files already listed under another path (symbolic "
            f"links), e.g. {again} is {first}; each copy counts as a separate sample. Remove the links or copies.",
            stacklevel=3,
        )


def _list_class_folders(root: pathlib.Path) -> list[str]:
    """Sorted names of the visible sub-folders (symlinked ones included)."""
    if not root.exists():
        raise DatasetError(
            f"Dataset folder {root} does not exist. Pass the folder that holds one sub-folder per class."
        )
    if not root.is_dir():
        raise DatasetError(
            f"Dataset path {root} is a file, not a folder. Pass the folder that holds one sub-folder per class."
        )
    with os.scandir(root) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"No class folders in {root}: expected {root}/<class name>/<image files>. "
            "Pass the folder that holds one sub-folder per class."
        )
    return classes


def list_image_files(class_dir: pathlib.Path) -> tuple[list[str], list[tuple[pathlib.Path, str]]]:
    """Image files under a folder (nested folders too) as sorted relative paths, and dangling entries.

    Symlinked files are followed; symlinked sub-folders are not, so a link cycle cannot loop forever.
    """
    names: list[str] = []
    dangling: list[tuple[pathlib.Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                names.append(os.path.relpath(path, class_dir).replace(os.sep, "/"))
            else:
                dangling.append((pathlib.Path(path), "broken symbolic link or not a regular file"))
    return sorted(names), dangling


def _image_problem(path: pathlib.Path, *, strict: bool) -> str | None:
    """Why ``path`` cannot be used, or None when it decodes."""
    try:
        _decode(path, strict=strict, draft=True)
    except UnreadableImageError as error:
        return error.reason
    return None


def _describe(skipped: Sequence[tuple[pathlib.Path, str]]) -> str:
    lines = [f"  {path}: {reason}" for path, reason in skipped[:_LISTED_PATHS]]
    if len(skipped) > _LISTED_PATHS:
        lines.append(f"  ... and {len(skipped) - _LISTED_PATHS} more (all are in DatasetMaker.skipped)")
    return "\n".join(lines)


class SampleListing:
    """A dataset's samples listed once, in a *global* order (classes sorted by name, samples in a fixed order within
    a class), and the dataset parts built from that listing: what :class:`DatasetMaker` (class folders of images),
    :class:`TextDatasetMaker` (labelled sentences) and :class:`ListedSamples` (an embedding set's listing) share.

    A subclass lists its samples into ``_install`` and says what a sample is (:meth:`get_samples`) and how the
    listing is fingerprinted for caches (:meth:`get_fingerprint`).
    """

    modality: str
    sample_kind: str
    _layout_hint: str
    _part_class: type[LabelledSamples]
    _dataset_path: pathlib.Path
    _strict: bool
    skipped: list[tuple[pathlib.Path, str]]

    def _install(self, classes: dict[str, list[str]], *, empty: str) -> None:
        """Number the samples of ``classes`` (label -> sample names, labels in order) and report what was skipped."""
        self._labels: list[tuple[str, int, int]] = []
        self._images: list[tuple[str, int]] = []
        for label, names in classes.items():
            if not names:
                self.skipped.append((self._dataset_path / label, f"{empty}; class dropped"))
                continue
            begin = len(self._images)
            self._images.extend((name, len(self._labels)) for name in names)
            self._labels.append((label, begin, len(self._images)))
        self._image_labels = torch.tensor([label_idx for _, label_idx in self._images], dtype=torch.long)
        self._global_index = {
            (self._labels[label_idx][0], name): index for index, (name, label_idx) in enumerate(self._images)
        }
        self._report_skipped()

    def _report_skipped(self) -> None:
        if not self._images:
            raise DatasetError(
                f"No readable {self.sample_kind}s in {self._dataset_path} ({self._layout_hint}). "
                f"Problems found:\n{_describe(self.skipped) or '  (none: the dataset is empty)'}"
            )
        if not self.skipped:
            return
        if self._strict:
            raise DatasetError(
                f"{len(self.skipped)} problem(s) in {self._dataset_path}:\n{_describe(self.skipped)}\n"
                "Fix or remove these files, or drop --strict (strict=False in Python) to skip them."
            )
        warnings.warn(
            f"Skipped {len(self.skipped)} path(s) in {self._dataset_path}:\n{_describe(self.skipped)}",
            stacklevel=3,
        )

    @property
    def dataset_path(self) -> pathlib.Path:
        return self._dataset_path

    def get_num_labels(self) -> int:
        return len(self._labels)

    def get_labels(self) -> list[str]:
        return [label for label, _, _ in self._labels]

    def get_num_images(self) -> int:
        return len(self._images)

    def get_samples(self) -> list[pathlib.Path] | list[str]:
        """Every sample in global order, as an encoder takes it: image paths, or texts."""
        raise NotImplementedError

    def get_fingerprint(self) -> list[tuple[str, int, int]]:
        """One entry per sample that changes whenever the sample does (the embedding cache's key)."""
        raise NotImplementedError

    def get_image_labels(self) -> torch.Tensor:
        """Label index of each image in global order (a LongTensor)."""
        return self._image_labels.clone()

    def split_indexes(
        self, *, valid_share: float, test_share: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random per-class split into (train, valid, test) global image indexes.

        Each class takes ``int(n * share)`` validation and test images, so every class is represented in the
        same proportion; the rest is training data.
        """
        check_shares(valid_share=valid_share, test_share=test_share)
        counts = [end - begin for _, begin, end in self._labels]
        starved = [
            f"{label!r} ({n} images)"
            for (label, _, _), n in zip(self._labels, counts)
            if n - int(n * valid_share) - int(n * test_share) < 1
        ]
        if starved:
            raise DatasetError(
                f"valid_share={valid_share} and test_share={test_share} leave no training image for class(es) "
                f"{', '.join(starved)} in {self._dataset_path}. Lower the shares or add images to those classes."
            )
        return split_class_members(
            class_members=[torch.arange(begin, end) for _, begin, end in self._labels],
            valid_share=valid_share, test_share=test_share, generator=generator,
        )

    def datasets_from_indexes(
        self, *, indexes: torch.Tensor | Sequence[int], transform: Callable | None = None
    ) -> LabelledSamples:
        """A dataset of the given global images, grouped by class (order kept within a class).

        Every label is kept, even one with no image here, so label indexes agree across all parts.
        """
        indexes = torch.as_tensor(indexes, dtype=torch.long)
        if indexes.dim() != 1:
            raise ValueError(f"indexes must be one-dimensional, got shape {tuple(indexes.shape)}.")
        if len(indexes) and not (0 <= int(indexes.min()) and int(indexes.max()) < len(self._images)):
            low, high = int(indexes.min()), int(indexes.max())
            raise IndexError(f"Image indexes must lie in 0..{len(self._images) - 1}, got {low}..{high}.")
        image_labels = self._image_labels[indexes]
        grouped = indexes[torch.argsort(image_labels, stable=True)].tolist()
        counts = torch.bincount(image_labels, minlength=len(self._labels)).tolist()
        labels, begin = [], 0
        for (label, _, _), count in zip(self._labels, counts):
            labels.append((label, begin, begin + count))
            begin += count
        return self._part_class(
            dataset_path=self._dataset_path,
            images=[self._images[index] for index in grouped],
            labels=labels,
            transform=transform,
            global_indexes=grouped,
        )

    def full_dataset(self, *, transform: Callable | None = None) -> LabelledSamples:
        """All images in global order."""
        return self.datasets_from_indexes(indexes=torch.arange(len(self._images)), transform=transform)

    # --- The original's calls, kept for code written against it; nothing in the package calls them but the
    # original's own store.load_checkpoint.

    def make_datasets(
        self,
        *,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        valid_share: float = 0.1,
        test_share: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> tuple[LabelledSamples, LabelledSamples, LabelledSamples]:
        """For callers of the original: random (train, valid, test) datasets; the same generator state gives the same
        partition. The package's protocols draw indexes (:meth:`split_indexes`) and build parts from them."""
        train, valid, test = self.split_indexes(valid_share=valid_share, test_share=test_share, generator=generator)
        return (
            self.datasets_from_indexes(indexes=train, transform=train_transform),
            self.datasets_from_indexes(indexes=valid, transform=eval_transform),
            self.datasets_from_indexes(indexes=test, transform=eval_transform),
        )

    def restore_datasets(
        self,
        *,
        train_ds_state: dict[str, list] | None = None,
        valid_ds_state: dict[str, list] | None = None,
        test_ds_state: dict[str, list] | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
    ) -> tuple[LabelledSamples | None, LabelledSamples | None, LabelledSamples | None]:
        """For callers of the original: rebuild parts saved with ``Animal90.get_state`` (None stays None);
        transforms are not part of a state."""
        return (
            self._restore(state=train_ds_state, transform=train_transform, part="train"),
            self._restore(state=valid_ds_state, transform=eval_transform, part="valid"),
            self._restore(state=test_ds_state, transform=eval_transform, part="test"),
        )

    def _restore(
        self, *, state: dict[str, list] | None, transform: Callable | None, part: str
    ) -> LabelledSamples | None:
        if state is None:
            return None
        try:
            images, labels, act_labels = state["images"], state["labels"], state["act_labels"]
        except (KeyError, TypeError) as error:
            raise DatasetError(
                f"The {part} state is not an Animal90.get_state() dict (needs images, labels, act_labels)."
            ) from error
        images, labels = _parse_layout(images=images, labels=labels)
        keys = [(labels[label_idx][0], name) for name, label_idx in images]
        missing = [f"{label}/{name}" for label, name in keys if (label, name) not in self._global_index]
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) of the saved {part} part are not in {self._dataset_path} "
                f"(e.g. {missing[:3]}). The dataset changed since the state was saved; make new partitions."
            )
        dataset = self._part_class(
            dataset_path=self._dataset_path,
            images=images,
            labels=labels,
            transform=transform,
            global_indexes=[self._global_index[key] for key in keys],
        )
        dataset.use_labels(label_indexes=act_labels)
        return dataset


class DatasetMaker(SampleListing):
    """Enumerates ``dataset_path/<class>/...`` once and builds dataset parts from it.

    Images are numbered in a *global* order: classes sorted by folder name, files sorted by relative path.
    ``check_images`` decodes every file up front so that a damaged one is reported here, with its path, rather
    than halfway through an epoch. Unusable files and classes left without images are dropped, recorded in
    ``skipped`` and reported in one warning; ``strict=True`` raises instead.
    """

    modality = "image"
    sample_kind = "image"
    _layout_hint = f"looked for {', '.join(IMAGE_EXTENSIONS)} files in its class folders"
    _part_class = Animal90

    def __init__(self, *, dataset_path: PathLike, check_images: bool = True, strict: bool = False) -> None:
        self._dataset_path = pathlib.Path(dataset_path)
        self._strict = strict
        self.skipped: list[tuple[pathlib.Path, str]] = []
        classes: dict[str, list[str]] = {}
        for label in _list_class_folders(self._dataset_path):
            names, dangling = list_image_files(self._dataset_path / label)
            classes[label] = names
            self.skipped.extend(dangling)
        if check_images:
            self._drop_unreadable(classes)
        self._install(classes, empty=f"class folder has no readable {', '.join(IMAGE_EXTENSIONS)} files")
        _warn_about_linked_duplicates(self.get_image_paths(), dataset_path=self._dataset_path)
        if len(self._labels) == 1 and any("/" in name for name, _ in self._images):
            warnings.warn(
                f"{self._dataset_path} holds a single class folder with nested folders; if those are the classes "
                f"(as in Animal-90's animals/animals), pass {self._dataset_path / self._labels[0][0]} instead.",
                stacklevel=2,
            )

    def _drop_unreadable(self, classes: dict[str, list[str]]) -> None:
        paths = [self._dataset_path / label / name for label, names in classes.items() for name in names]
        # Pillow releases the GIL while decoding, so threads check images in parallel.
        with ThreadPoolExecutor() as pool:
            problems = list(
                tqdm(
                    pool.map(partial(_image_problem, strict=self._strict), paths),
                    total=len(paths),
                    desc="Checking images",
                    unit="image",
                    leave=False,
                )
            )
        bad = {path: reason for path, reason in zip(paths, problems) if reason is not None}
        self.skipped.extend(bad.items())
        for label, names in classes.items():
            classes[label] = [name for name in names if self._dataset_path / label / name not in bad]

    def get_image_paths(self) -> list[pathlib.Path]:
        """Path of every image in global order (``dataset_path`` joined as given)."""
        return [self._dataset_path / self._labels[label_idx][0] / name for name, label_idx in self._images]

    def get_samples(self) -> list[pathlib.Path]:
        return self.get_image_paths()

    def get_fingerprint(self) -> list[tuple[str, int, int]]:
        """``(class/file, size, mtime_ns)`` per image: changes whenever a file is added, removed or rewritten."""
        fingerprint = []
        for name, label_idx in self._images:
            relative = f"{self._labels[label_idx][0]}/{name}"
            stat = os.stat(self._dataset_path / relative)
            fingerprint.append((relative, stat.st_size, stat.st_mtime_ns))
        return fingerprint

def split_class_members(
    *,
    class_members: Sequence[torch.Tensor],
    valid_share: float,
    test_share: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each class's image indexes at random into (train, valid, test), classes kept in order.

    Per class: ``torch.randperm(n)``, then ``n - n_valid - n_test`` training, ``int(n * valid_share)`` validation
    and ``int(n * test_share)`` test images. The one place the partition rule lives, so that the dataset splitter
    and analyses on cached embeddings draw identical partitions from the same generator state.
    """
    check_shares(valid_share=valid_share, test_share=test_share)
    parts: tuple[list[torch.Tensor], ...] = ([], [], [])
    for members in class_members:
        n = len(members)
        num_valid, num_test = int(n * valid_share), int(n * test_share)
        order = members[torch.randperm(n, generator=generator)]
        for part, chunk in zip(parts, order.split([n - num_valid - num_test, num_valid, num_test])):
            part.append(chunk)
    train, valid, test = (torch.cat(part) for part in parts)
    return train, valid, test


def check_shares(*, valid_share: float, test_share: float) -> None:
    """Refuse shares outside [0, 1] or adding up to 1 or more, before any work depends on them."""
    for name, value in (("valid_share", valid_share), ("test_share", test_share)):
        if not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise DatasetError(f"{name} must be a number in [0, 1], got {value!r}.")
    if valid_share + test_share >= 1.0:
        raise DatasetError(
            f"valid_share + test_share must be below 1 so that training images remain, got "
            f"{valid_share} + {test_share} = {valid_share + test_share}."
        )


def augment_data(data_config: dict[str, Any]) -> T.Compose:
    """Light augmentation around a timm model's eval preprocessing (resize, crop, flip, colour jitter).

    The resize is only 5 % above the crop, so most of each image survives; ``data_config`` is what
    ``timm.data.resolve_data_config`` returns for the model.
    """
    crop_size = tuple(data_config["input_size"][1:3])
    return T.Compose(
        [
            T.Resize(int(1.05 * max(crop_size)), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(crop_size),
            T.RandomHorizontalFlip(p=0.5),
            T.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4)),
            timm.data.transforms.MaybeToTensor(),
            T.Normalize(mean=tuple(data_config["mean"]), std=tuple(data_config["std"])),
        ]
    )


# --- Sentences ------------------------------------------------------------------------------------------------------


class TextDataset(LabelledSamples):
    """Sentences of one dataset part: ``__getitem__`` returns ``(text, active label index)``.

    The sample names of the layout are the texts themselves, so a part's state (``get_state``) and the embedding
    cache's fingerprint depend on the data, not on where a row sat in a file.
    """

    def _load(self, image_idx: int) -> str:
        return self._images[image_idx][0]

    def get_text(self, act_image_idx: int) -> str:
        return self._images[self._act_images[act_image_idx][0]][0]


class TextDatasetMaker(SampleListing):
    """Labelled sentences, split per class exactly like images.

    Two layouts: a CSV/TSV file (``.csv``, ``.tsv``; UTF-8) with a text column and a label column chosen by name
    (``label_column="coarse,fine"`` joins several columns with ``:``), or class folders of ``.txt`` files, one
    sample per file. Empty texts, files that are not UTF-8 and repeated samples (same text, same label) are
    skipped and reported like unreadable images (``strict=True`` makes them an error).
    """

    modality = "text"
    sample_kind = "text"
    _layout_hint = "a CSV/TSV file with a text and a label column, or class folders of .txt files"
    _part_class = TextDataset

    def __init__(
        self,
        *,
        dataset_path: PathLike,
        text_column: str = "text",
        label_column: str = "label",
        strict: bool = False,
    ) -> None:
        self._dataset_path = pathlib.Path(dataset_path)
        self._strict = strict
        self.skipped: list[tuple[pathlib.Path, str]] = []
        if self._dataset_path.suffix.lower() in TEXT_TABLE_SUFFIXES and not self._dataset_path.is_file():
            raise DatasetError(f"No text dataset file at {self._dataset_path}.")
        if self._dataset_path.is_file():
            rows = self._read_table(text_column=text_column, label_column=label_column)
        else:
            rows = self._read_folders()
        classes: dict[str, list[str]] = {}
        seen: set[tuple[str, str]] = set()
        for where, label, text in rows:
            text = text.strip()  # a copy that differs only by surrounding spaces is the same sample
            if not text:
                self.skipped.append((where, "empty text"))
            elif (label, text) in seen:
                self.skipped.append((where, f"repeats an earlier sample of class {label!r}"))
            else:
                seen.add((label, text))
                classes.setdefault(label, []).append(text)
        self._install(dict(sorted(classes.items())), empty="class has no usable text")

    def _read_table(self, *, text_column: str, label_column: str) -> list[tuple[pathlib.Path, str, str]]:
        import pandas as pd

        path = self._dataset_path
        if path.suffix.lower() not in TEXT_TABLE_SUFFIXES:
            raise DatasetError(f"{path}: a text dataset file must be {' or '.join(TEXT_TABLE_SUFFIXES)}.")
        try:
            table = pd.read_csv(
                path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False,
                encoding="utf-8",
            )
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise DatasetError(f"Cannot read {path} as UTF-8 {path.suffix[1:].upper()}: {error}") from error
        label_columns = [name.strip() for name in label_column.split(",")]
        missing = [name for name in [text_column, *label_columns] if name not in table.columns]
        if missing:
            raise DatasetError(
                f"{path} has no column {', '.join(repr(name) for name in missing)}; its columns are "
                f"{', '.join(repr(name) for name in table.columns)}. Choose them with --text-column/--label-column."
            )
        labels = table[label_columns].agg(":".join, axis=1) if len(table) else table[label_columns[0]]
        # Row numbers as a spreadsheet shows them: the header is row 1.
        return [
            (pathlib.Path(f"{path}:row {number + 2}"), label, text)
            for number, (label, text) in enumerate(zip(labels, table[text_column]))
        ]

    def _read_folders(self) -> list[tuple[pathlib.Path, str, str]]:
        rows = []
        for label in _list_class_folders(self._dataset_path):
            for dirpath, dirnames, filenames in sorted(os.walk(self._dataset_path / label)):
                dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
                for name in sorted(filenames):
                    if name.startswith(".") or not name.lower().endswith(".txt"):
                        continue
                    path = pathlib.Path(dirpath) / name
                    try:
                        rows.append((path, label, path.read_text(encoding="utf-8").strip()))
                    except UnicodeDecodeError:
                        self.skipped.append((path, "not UTF-8 text"))
                    except OSError as error:
                        self.skipped.append((path, f"cannot be read ({error.strerror or error})"))
        return rows

    def get_texts(self) -> list[str]:
        """Every sample's text in global order."""
        return [text for text, _ in self._images]

    def get_samples(self) -> list[str]:
        return self.get_texts()

    def get_fingerprint(self) -> list[tuple[str, int, int]]:
        """``(label/sha256 of the text, length, 0)`` per sample: changes whenever a sample or label changes."""
        return [
            (f"{self._labels[label_idx][0]}/{hashlib.sha256(text.encode()).hexdigest()[:16]}", len(text), 0)
            for text, label_idx in self._images
        ]



class ListedSamples(SampleListing):
    """A listing handed over whole (labels to sample names, in the global order) for samples whose content is
    elsewhere: an embedding set lists the samples it was encoded from, so the protocol draws the same partitions as
    on the dataset itself without reading one. ``skipped`` is what the original listing skipped, reported then."""

    _layout_hint = "a listing of labelled samples"

    def __init__(
        self,
        *,
        modality: str,
        dataset_path: PathLike,
        classes: dict[str, list[str]],
        fingerprint: str,
        skipped: Sequence[tuple[pathlib.Path, str]] = (),
    ) -> None:
        self.modality = modality
        self.sample_kind = "text" if modality == "text" else "image"
        self._part_class = TextDataset if modality == "text" else Animal90
        self._dataset_path = pathlib.Path(dataset_path)
        self._strict = False
        self._fingerprint = fingerprint
        self.skipped = []
        self._install(classes, empty="no samples listed")
        self.skipped = list(skipped)

    def get_samples(self) -> list[pathlib.Path] | list[str]:
        """The listed samples: image paths, or texts."""
        names = [name for name, _ in self._images]
        return names if self.modality == "text" else [pathlib.Path(name) for name in names]

    def get_fingerprint(self) -> list[tuple[str, int, int]]:
        return [(self._fingerprint, len(self._images), 0)]

TEXT_TABLE_SUFFIXES = (".csv", ".tsv")


def make_dataset_maker(
    *,
    dataset_path: PathLike,
    modality: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    strict: bool = False,
) -> SampleListing:
    """The maker for ``dataset_path``: sentences for a CSV/TSV file or class folders of ``.txt`` files, else images."""
    if modality == "auto":
        modality = detect_modality(dataset_path)
    if modality == "text":
        return TextDatasetMaker(
            dataset_path=dataset_path, text_column=text_column, label_column=label_column, strict=strict
        )
    if modality == "image":
        return DatasetMaker(dataset_path=dataset_path, strict=strict)
    raise DatasetError(f"Unknown modality {modality!r}; use 'auto', 'image' or 'text'.")


def detect_modality(dataset_path: PathLike) -> str:
    """``"text"`` for a CSV/TSV file or class folders that hold ``.txt`` files and no images, else ``"image"``."""
    path = pathlib.Path(dataset_path)
    if path.suffix.lower() in TEXT_TABLE_SUFFIXES:
        return "text"
    if not path.is_dir():
        return "image"
    suffixes = {
        file.suffix.lower() for folder in path.iterdir() if folder.is_dir() for file in folder.rglob("*")
        if file.is_file()
    }
    return "text" if ".txt" in suffixes and not suffixes & set(IMAGE_EXTENSIONS) else "image"


DOWNLOADS = ("animal90", "caltech101", "digits")


def download_dataset(name: str, *, root: PathLike, kaggle_dataset: str, per_class: int | None = None) -> pathlib.Path:
    """The class-folder root of a dataset fetched into ``root``: ``animal90`` (the article's, with kagglehub and
    Kaggle credentials), ``caltech101`` (torchvision, about 130 MB) or ``digits`` (scikit-learn's bundled
    handwritten digits, no network: see :func:`write_digits`); offline, a download is one clear error."""
    root = pathlib.Path(root)
    if name == "digits":
        return write_digits(root / ("digits" if per_class is None else f"digits-{per_class}-per-class"),
                            per_class=per_class)
    if per_class is not None:
        raise DatasetError(f"--download-per-class applies to --download digits, not to {name}.")
    if name == "caltech101":
        return _download_caltech101(root)
    if name != "animal90":
        raise DatasetError(f"Unknown download {name!r}; choose among {', '.join(DOWNLOADS)}.")
    import kagglehub

    try:
        folder = pathlib.Path(kagglehub.dataset_download(kaggle_dataset))
    except Exception as error:
        raise DatasetError(
            f"Could not download {kaggle_dataset} with kagglehub ({type(error).__name__}: {error}). It needs "
            "network access and Kaggle credentials; otherwise download it by hand and pass --dataset DIR."
        ) from error
    return next(path for path in (folder / "animals" / "animals", folder / "animals", folder) if path.is_dir())


def _download_caltech101(root: pathlib.Path) -> pathlib.Path:
    """Caltech-101 through torchvision (about 130 MB); its class folders, ``BACKGROUND_Google`` included."""
    import torchvision

    folder = root / "caltech101" / "101_ObjectCategories"
    if not folder.is_dir():
        try:
            torchvision.datasets.Caltech101(root=str(root), download=True)
        except Exception as error:
            raise DatasetError(
                f"Could not download Caltech-101 with torchvision into {root} ({type(error).__name__}: {error}). "
                "It needs network access; otherwise pass a class-folder dataset with --dataset DIR."
            ) from error
    return folder


def write_digits(folder: PathLike, *, per_class: int | None = None) -> pathlib.Path:
    """scikit-learn's bundled 1,797 handwritten digits (8 x 8 pixels, 16 grey levels) as ``folder/<digit>/*.png``,
    so a fresh machine has a small real dataset with no network; written once, into a temporary folder renamed at
    the end, so an interrupted write is never taken for the dataset. ``per_class`` keeps the first images of each
    digit."""
    from sklearn.datasets import load_digits

    folder = pathlib.Path(folder)
    if folder.is_dir():
        return folder
    if per_class is not None and per_class < 1:
        raise DatasetError(f"--download-per-class must be at least 1, got {per_class}.")
    digits = load_digits()
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    written = collections.Counter()
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and written[target] >= per_class:
            continue
        (temporary / str(target)).mkdir(exist_ok=True)
        pixels = (image * (255 / 16)).round().astype(np.uint8)  # 0..16 grey levels to 8 bits
        Image.fromarray(pixels, mode="L").save(temporary / str(target) / f"{index:04d}.png")
        written[target] += 1
    os.replace(temporary, folder)
    return folder
