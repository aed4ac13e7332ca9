"""Bad inputs: every case must fail loudly with the offending path/value, or be skipped and reported.

Sections: helpers; single image files (``load_rgb_image``); dataset folders (``DatasetMaker``); split shares;
saved dataset states; parameters (script options, model names, weights files); the script on a damaged dataset;
saved files (embeddings, class stores, checkpoints, atomic writes); interrupted runs; reproducibility. Add new
groups as further sections at the end.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASS_STYLES, REPO_ROOT, make_class_folders, run_script, script_call
from PIL import Image

import banerjee
import engine
import store
from simsearch import cli, config, protocol
from simsearch.classdb import commands, vector_store
from simsearch.classdb.files import ClassDBError

RED, GREEN, BLUE, WHITE = (220, 30, 30), (30, 180, 40), (30, 60, 220), (255, 255, 255)


# ===============================================================================================================
# Helpers
# ===============================================================================================================


def write_image(path: pathlib.Path, image: Image.Image | None = None, **save_options) -> pathlib.Path:
    """Save ``image`` (default: a small red RGB image) at ``path``, creating folders; the suffix picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if image is not None else Image.new("RGB", (32, 24), RED)).save(path, **save_options)
    return path


def write_bytes(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated_jpeg(path: pathlib.Path) -> pathlib.Path:
    """A JPEG cut in half: the header opens fine, the pixels do not."""
    noise = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    write_image(path, Image.fromarray(noise))
    data = path.read_bytes()
    return write_bytes(path, data[: len(data) // 2])


def copy_of(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A writable copy of a read-only session fixture folder."""
    return pathlib.Path(shutil.copytree(folder, tmp_path / "data"))


def small_dataset(root: pathlib.Path, *, per_class: int = 3) -> pathlib.Path:
    """Two good classes ("blue triangle", "red circle") with ``per_class`` images each."""
    return make_class_folders(root, classes=["red circle", "blue triangle"], images_per_class=per_class)


def skip_warnings(record: pytest.WarningsRecorder) -> list[str]:
    """Messages of DatasetMaker's skip report among the recorded warnings."""
    return [str(item.message) for item in record if str(item.message).startswith("Skipped ")]


def maker_with_one_skip_warning(root: pathlib.Path, **options) -> tuple[banerjee.DatasetMaker, str]:
    """Build a DatasetMaker and return it with its single skip warning (fails if there is not exactly one)."""
    with pytest.warns(UserWarning) as record:
        maker = banerjee.DatasetMaker(dataset_path=root, **options)
    messages = skip_warnings(record)
    assert len(messages) == 1, messages
    return maker, messages[0]


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return image.getpixel(xy)


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# ===============================================================================================================
# Single image files: load_rgb_image
# ===============================================================================================================


def test_truncated_jpeg_fails_on_load_with_its_path(tmp_path):
    path = truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(banerjee.UnreadableImageError, match="truncated") as info:
        banerjee.load_rgb_image(path)
    assert str(path) in str(info.value) and info.value.path == path


@pytest.mark.parametrize(
    ("name", "data"), [("empty.jpg", b""), ("notes.jpg", b"this is a text file, not a JPEG\n")]
)
def test_non_image_bytes_fail_with_their_path(tmp_path, name, data):
    path = write_bytes(tmp_path / name, data)
    with pytest.raises(banerjee.UnreadableImageError, match="cannot identify image file") as info:
        banerjee.load_rgb_image(path)
    assert str(path) in str(info.value)


def test_missing_file_and_folder_fail_as_unreadable_os_errors(tmp_path):
    with pytest.raises(banerjee.UnreadableImageError, match="FileNotFoundError") as info:
        banerjee.load_rgb_image(tmp_path / "gone.jpg")
    assert isinstance(info.value, OSError) and str(tmp_path / "gone.jpg") in str(info.value)
    with pytest.raises(banerjee.UnreadableImageError, match="IsADirectoryError"):
        banerjee.load_rgb_image(tmp_path)


def test_image_above_pixel_limit_warns_or_fails_depending_on_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write_image(tmp_path / "big.png", Image.new("RGB", (40, 40), RED))  # 1,600 px: above 1x, below 2x
    with pytest.warns(Image.DecompressionBombWarning):
        assert banerjee.load_rgb_image(path).size == (40, 40)
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(banerjee.UnreadableImageError, match=r"40x40 pixels exceed .*MAX_IMAGE_PIXELS=1000"):
            banerjee.load_rgb_image(path, strict=True)


def test_image_far_above_pixel_limit_always_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write_image(tmp_path / "bomb.png", Image.new("RGB", (50, 50), RED))  # 2,500 px: above 2x
    with pytest.raises(banerjee.UnreadableImageError, match="decompression bomb") as info:
        banerjee.load_rgb_image(path)
    assert str(path) in str(info.value)


def test_grayscale_and_one_bit_images_become_rgb(tmp_path):
    gray = banerjee.load_rgb_image(write_image(tmp_path / "gray.png", Image.new("L", (8, 8), 77)))
    assert gray.mode == "RGB" and pixel(gray, (3, 3)) == (77, 77, 77)
    bits = Image.new("1", (8, 8), 0)
    bits.putpixel((2, 2), 1)
    loaded = banerjee.load_rgb_image(write_image(tmp_path / "bits.bmp", bits))
    assert pixel(loaded, (2, 2)) == WHITE and pixel(loaded, (0, 0)) == (0, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)
    path = write_image(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    image = banerjee.load_rgb_image(path)
    assert image.mode == "RGB"
    assert [pixel(image, (x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), WHITE, (4, 4, 4)]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = write_image(tmp_path / "print.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    image = banerjee.load_rgb_image(path)
    assert image.mode == "RGB" and close_to(pixel(image, (8, 8)), (255, 0, 0))


def test_transparency_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (*RED, 255))
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    image = banerjee.load_rgb_image(write_image(tmp_path / "rgba.png", rgba))
    assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == RED
    assert close_to(pixel(image, (2, 0)), (255, 127, 127), tolerance=1)
    la = Image.new("LA", (2, 1), (100, 0))
    la.putpixel((1, 0), (100, 255))
    image = banerjee.load_rgb_image(write_image(tmp_path / "la.png", la))
    assert [pixel(image, (x, 0)) for x in range(2)] == [WHITE, (100, 100, 100)]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_images_with_and_without_transparency(tmp_path, suffix):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, *GREEN])
    palette.putpixel((1, 0), 1)
    opaque = banerjee.load_rgb_image(write_image(tmp_path / f"opaque{suffix}", palette))
    assert [pixel(opaque, (x, 0)) for x in range(2)] == [(0, 0, 0), GREEN]
    clear = banerjee.load_rgb_image(write_image(tmp_path / f"clear{suffix}", palette, transparency=0))
    assert [pixel(clear, (x, 0)) for x in range(2)] == [WHITE, GREEN]


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = banerjee.load_rgb_image(write_image(tmp_path / "phone.jpg", stored, exif=exif.tobytes(), quality=95))
    assert image.size == (20, 40)
    assert close_to(pixel(image, (10, 5)), RED, tolerance=12)
    assert close_to(pixel(image, (10, 35)), BLUE, tolerance=12)


# ===============================================================================================================
# Dataset folders: DatasetMaker
# ===============================================================================================================


def test_missing_dataset_path_says_where_it_looked(tmp_path):
    with pytest.raises(banerjee.DatasetError, match="does not exist") as info:
        banerjee.DatasetMaker(dataset_path=tmp_path / "no such folder")
    assert str(tmp_path / "no such folder") in str(info.value)


def test_dataset_path_that_is_a_file(tmp_path):
    path = write_bytes(tmp_path / "animals.zip", b"PK")
    with pytest.raises(banerjee.DatasetError, match="is a file, not a folder") as info:
        banerjee.DatasetMaker(dataset_path=path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("top_level_files", [[], ["name of the animals.txt", "cat.jpg"]])
def test_folder_without_class_folders(tmp_path, top_level_files):
    for name in top_level_files:
        write_image(tmp_path / name) if name.endswith(".jpg") else write_bytes(tmp_path / name, b"cat\n")
    with pytest.raises(banerjee.DatasetError, match="No class folders in") as info:
        banerjee.DatasetMaker(dataset_path=tmp_path)
    assert f"{tmp_path}/<class name>/<image files>" in str(info.value)


def test_class_folders_without_any_image(tmp_path):
    write_bytes(tmp_path / "cat" / "notes.txt", b"no images here")
    (tmp_path / "dog").mkdir()
    with pytest.raises(banerjee.DatasetError, match="No readable images in") as info:
        banerjee.DatasetMaker(dataset_path=tmp_path)
    assert str(tmp_path / "cat") in str(info.value) and str(tmp_path / "dog") in str(info.value)


def test_class_folder_without_images_is_dropped_with_one_warning(tmp_path):
    root = small_dataset(tmp_path)
    write_bytes(root / "empty class" / "readme.txt", b"nothing")
    maker, message = maker_with_one_skip_warning(root)
    assert maker.get_labels() == ["blue triangle", "red circle"]
    assert maker.get_num_images() == 6
    assert [path for path, _ in maker.skipped] == [root / "empty class"]
    assert "no readable" in maker.skipped[0][1]
    assert "Skipped 1 path(s)" in message and str(root / "empty class") in message
    with pytest.raises(banerjee.DatasetError, match=r"1 problem\(s\)") as info:
        banerjee.DatasetMaker(dataset_path=root, strict=True)
    assert str(root / "empty class") in str(info.value) and "strict=False" in str(info.value)


@pytest.fixture
def folder_with_broken_files(image_folder, tmp_path) -> tuple[pathlib.Path, dict[pathlib.Path, str]]:
    """The 4x10 shapes set plus three broken files in "green square"; maps each to a fragment of its reason."""
    root = copy_of(image_folder, tmp_path)
    broken = {
        truncated_jpeg(root / "green square" / "cut.jpg"): "truncated",
        write_bytes(root / "green square" / "empty.jpg", b""): "cannot identify image file",
        write_bytes(root / "green square" / "text.JPG", b"plain text\n"): "cannot identify image file",
    }
    return root, broken


def test_unreadable_files_are_skipped_with_reasons(folder_with_broken_files):
    root, broken = folder_with_broken_files
    maker, message = maker_with_one_skip_warning(root)
    assert maker.get_num_images() == 40
    assert maker.get_num_labels() == 4
    reasons = dict(maker.skipped)
    assert set(reasons) == set(broken)
    for path, fragment in broken.items():
        assert fragment in reasons[path]
        assert str(path) in message
    assert message.startswith(f"Skipped 3 path(s) in {root}")


def test_unreadable_files_fail_strict_enumeration_listing_all(folder_with_broken_files):
    root, broken = folder_with_broken_files
    with pytest.raises(banerjee.DatasetError, match=r"3 problem\(s\) in") as info:
        banerjee.DatasetMaker(dataset_path=root, strict=True)
    assert all(str(path) in str(info.value) for path in broken)


def test_unchecked_broken_file_fails_on_access_with_its_path(folder_with_broken_files):
    root, broken = folder_with_broken_files
    maker = banerjee.DatasetMaker(dataset_path=root, check_images=False)
    assert maker.get_num_images() == 43 and maker.skipped == []
    dataset = maker.full_dataset()
    index = [dataset.get_image_path(i) for i in range(len(dataset))].index(root / "green square" / "cut.jpg")
    with pytest.raises(banerjee.UnreadableImageError, match="truncated") as info:
        dataset[index]
    assert str(root / "green square" / "cut.jpg") in str(info.value)


def test_class_with_only_unreadable_images_is_dropped(tmp_path):
    root = small_dataset(tmp_path)
    bad = [write_bytes(root / "broken" / f"{index}.jpg", b"") for index in range(2)]
    maker, message = maker_with_one_skip_warning(root)
    assert maker.get_labels() == ["blue triangle", "red circle"]
    assert [path for path, _ in maker.skipped] == [*bad, root / "broken"]
    assert "Skipped 3 path(s)" in message


def test_decompression_bomb_in_a_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    root = small_dataset(tmp_path)  # 96x96 = 9,216 px each: under the limit
    bomb = write_image(root / "red circle" / "huge.png", Image.new("RGB", (150, 150), RED))  # 22,500 > 2x limit
    maker, message = maker_with_one_skip_warning(root)
    assert maker.skipped == [(bomb, maker.skipped[0][1])] and "decompression bomb" in maker.skipped[0][1]
    assert str(bomb) in message and maker.get_num_images() == 6
    with pytest.raises(banerjee.DatasetError, match="decompression bomb") as info:
        banerjee.DatasetMaker(dataset_path=root, strict=True)
    assert str(bomb) in str(info.value)


def test_image_just_above_the_pixel_limit_is_kept_unless_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    root = small_dataset(tmp_path)
    large = write_image(root / "red circle" / "large.png", Image.new("RGB", (120, 120), RED))  # 14,400 < 2x limit
    with pytest.warns(Image.DecompressionBombWarning):
        assert banerjee.DatasetMaker(dataset_path=root).get_num_images() == 7
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(banerjee.DatasetError, match="MAX_IMAGE_PIXELS=10000") as info:
            banerjee.DatasetMaker(dataset_path=root, strict=True)
    assert str(large) in str(info.value)


@pytest.mark.filterwarnings("error::UserWarning")
def test_nested_folders_are_included_and_hidden_or_non_image_files_ignored(tmp_path):
    root = small_dataset(tmp_path, per_class=1)
    write_bytes(root / "name of the animals.txt", b"red circle\nblue triangle\n")
    write_bytes(root / ".DS_Store", b"\0\0")
    write_image(root / ".cache" / "thumb.jpg")  # hidden folder: not a class
    cls = root / "red circle"
    write_image(cls / "sub" / "b.png")
    write_image(cls / "sub" / "deeper" / "c.JPEG")
    write_image(cls / ".hidden" / "d.jpg")
    write_bytes(cls / "._img_000.jpg", b"AppleDouble junk")  # macOS resource fork beside a real image
    write_bytes(cls / "notes.txt", b"not an image")
    write_image(cls / "scan.tiff")  # not in IMAGE_EXTENSIONS
    maker = banerjee.DatasetMaker(dataset_path=root)
    assert maker.get_labels() == ["blue triangle", "red circle"]
    state = maker.full_dataset().get_state()
    assert [name for name, _ in state["images"]] == ["img_000.jpg", "img_000.jpg", "sub/b.png", "sub/deeper/c.JPEG"]
    assert maker.full_dataset()[3][0].size == (32, 24)


@pytest.mark.filterwarnings("error::UserWarning")
def test_every_listed_extension_in_any_case(tmp_path):
    names = ["a.jpg", "b.JPEG", "c.Png", "d.bmp", "e.GIF", "f.webp"]
    for name in names:
        write_image(tmp_path / "mixed" / name)
    maker = banerjee.DatasetMaker(dataset_path=tmp_path)
    assert [path.name for path in maker.get_image_paths()] == names
    assert all(image.size == (32, 24) for image, _ in maker.full_dataset())


def test_symlinked_file_is_followed_and_broken_symlink_skipped(tmp_path):
    root = small_dataset(tmp_path / "data")
    outside = write_image(tmp_path / "elsewhere" / "real.png", Image.new("RGB", (10, 10), GREEN))
    link = root / "red circle" / "linked.png"
    link.symlink_to(outside)
    dangling = root / "red circle" / "dangling.jpg"
    dangling.symlink_to(tmp_path / "elsewhere" / "deleted.jpg")
    for check_images in (True, False):
        maker, message = maker_with_one_skip_warning(root, check_images=check_images)
        assert maker.skipped == [(dangling, "broken symbolic link or not a regular file")]
        assert str(dangling) in message
        paths = maker.get_image_paths()
        assert link in paths and maker.get_num_images() == 7
        assert pixel(maker.full_dataset()[paths.index(link)][0], (5, 5)) == GREEN


@pytest.mark.filterwarnings("error::UserWarning")
def test_symlinked_class_folder_is_used_and_folder_loops_are_not_walked(tmp_path):
    real = make_class_folders(tmp_path / "store", classes=["green square"], images_per_class=2)
    root = small_dataset(tmp_path / "data")
    (root / "green square").symlink_to(real / "green square", target_is_directory=True)
    (root / "red circle" / "loop").symlink_to(root / "red circle", target_is_directory=True)
    maker = banerjee.DatasetMaker(dataset_path=root)
    assert maker.get_labels() == ["blue triangle", "green square", "red circle"]
    assert maker.get_num_images() == 8


@pytest.mark.filterwarnings("error::UserWarning")
def test_non_ascii_and_space_class_and_file_names(tmp_path):
    shades = {"café crème": 20, "ёж  колючий": 80, "日本 猫": 140}
    for label, shade in shades.items():
        for number in range(3):
            write_image(tmp_path / label / f"фото {number}.png", Image.new("RGB", (12, 12), (shade, 0, 0)))
    maker = banerjee.DatasetMaker(dataset_path=tmp_path)
    assert maker.get_labels() == list(shades)  # already in code point order
    _, valid_ds, _ = maker.make_datasets(valid_share=0.34, test_share=0.0, generator=torch.Generator())
    _, restored, _ = maker.restore_datasets(valid_ds_state=json.loads(json.dumps(valid_ds.get_state())))
    paths = [restored.get_image_path(index) for index in range(3)]
    assert paths == [valid_ds.get_image_path(index) for index in range(3)]
    assert [path.parent.name for path in paths] == list(shades) and paths[0].name.startswith("фото ")
    assert [pixel(image, (0, 0)) for image, _ in restored] == [(shade, 0, 0) for shade in shades.values()]


# ===============================================================================================================
# Split shares
# ===============================================================================================================


@pytest.mark.parametrize(
    ("valid_share", "test_share", "message"),
    [
        (-0.1, 0.1, r"valid_share must be a number in \[0, 1\], got -0.1"),
        (0.1, 1.5, r"test_share must be a number in \[0, 1\], got 1.5"),
        (math.nan, 0.1, r"valid_share must be a number in \[0, 1\], got nan"),
        ("0.1", 0.1, r"valid_share must be a number in \[0, 1\], got '0.1'"),
        (0.5, 0.5, r"must be below 1 .* got 0.5 \+ 0.5 = 1.0"),
        (0.7, 0.6, r"got 0.7 \+ 0.6 = 1.2"),
    ],
)
def test_bad_shares_name_the_value(image_folder, valid_share, test_share, message):
    maker = banerjee.DatasetMaker(dataset_path=image_folder, check_images=False)
    with pytest.raises(banerjee.DatasetError, match=message):
        maker.split_indexes(valid_share=valid_share, test_share=test_share)
    with pytest.raises(banerjee.DatasetError, match=message):
        maker.make_datasets(valid_share=valid_share, test_share=test_share)


def test_class_left_without_training_images_is_named(tmp_path):
    # Shares summing to just below 1 where floating-point products round up: int(6 * valid) + int(6 * test) == 6.
    test_share = math.nextafter(5 / 6, 0)
    assert 1 / 6 + test_share < 1 and int(6 / 6) + int(6 * test_share) == 6
    root = make_class_folders(tmp_path, classes=["red circle", "blue triangle"], images_per_class=[6, 7])
    maker = banerjee.DatasetMaker(dataset_path=root)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(banerjee.DatasetError, match=r"no training image for class\(es\) 'red circle' \(6 images\)"):
        maker.split_indexes(valid_share=1 / 6, test_share=test_share, generator=generator)
    assert torch.equal(generator.get_state(), state)  # refused before drawing


def test_class_with_one_image_stays_in_training(tmp_path):
    root = make_class_folders(tmp_path, classes=["red circle", "blue triangle"], images_per_class=[1, 10])
    maker = banerjee.DatasetMaker(dataset_path=root)
    train_ds, valid_ds, test_ds = maker.make_datasets(valid_share=0.45, test_share=0.45)
    single = maker.get_labels().index("red circle")
    assert train_ds.get_num_images_by_label(single) == 1
    assert valid_ds.get_num_images_by_label(single) == 0 and test_ds.get_num_images_by_label(single) == 0
    assert valid_ds.get_labels() == train_ds.get_labels() == maker.get_labels()
    assert (len(train_ds), len(valid_ds), len(test_ds)) == (3, 4, 4)


def test_bad_image_indexes(image_folder):
    maker = banerjee.DatasetMaker(dataset_path=image_folder, check_images=False)
    with pytest.raises(IndexError, match=r"must lie in 0..39, got 0..40"):
        maker.datasets_from_indexes(indexes=[0, 40])
    with pytest.raises(IndexError, match=r"got -1..3"):
        maker.datasets_from_indexes(indexes=[-1, 3])
    with pytest.raises(ValueError, match=r"one-dimensional, got shape \(2, 2\)"):
        maker.datasets_from_indexes(indexes=[[0, 1], [2, 3]])


# ===============================================================================================================
# Saved dataset states (Animal90.get_state / DatasetMaker.restore_datasets)
# ===============================================================================================================


@pytest.fixture
def maker_and_state(image_folder) -> tuple[banerjee.DatasetMaker, dict]:
    maker = banerjee.DatasetMaker(dataset_path=image_folder, check_images=False)
    return maker, maker.datasets_from_indexes(indexes=[0, 1, 10, 11, 12]).get_state()


def test_state_without_its_keys(maker_and_state):
    maker, _ = maker_and_state
    with pytest.raises(banerjee.DatasetError, match="valid state is not an Animal90.get_state"):
        maker.restore_datasets(valid_ds_state={"images": []})


def test_state_with_scrambled_labels(maker_and_state):
    maker, state = maker_and_state
    gap = {**state, "labels": [[label, begin + 1, end + 1] for label, begin, end in state["labels"]]}
    with pytest.raises(banerjee.DatasetError, match=r"labels\[0\] = \('blue triangle', 1, 3\) should start at 0"):
        maker.restore_datasets(train_ds_state=gap)
    swapped = {**state, "images": [list(item) for item in state["images"]]}
    swapped["images"][0][1] = 1
    with pytest.raises(banerjee.DatasetError, match="lies in the range of label 0 .* carries another label index"):
        maker.restore_datasets(train_ds_state=swapped)
    short = {**state, "images": state["images"][:-1]}
    with pytest.raises(banerjee.DatasetError, match="end within the 4 images"):
        maker.restore_datasets(train_ds_state=short)


def test_state_naming_files_no_longer_on_disk(image_folder, tmp_path):
    root = copy_of(image_folder, tmp_path)
    state = banerjee.DatasetMaker(dataset_path=root).full_dataset().get_state()
    os.remove(root / "red circle" / "img_004.jpg")
    maker = banerjee.DatasetMaker(dataset_path=root)
    with pytest.raises(banerjee.DatasetError, match=r"1 image\(s\) of the saved test part are not in") as info:
        maker.restore_datasets(test_ds_state=state)
    assert "red circle/img_004.jpg" in str(info.value) and "make new partitions" in str(info.value)


def test_state_with_bad_active_labels(maker_and_state):
    maker, state = maker_and_state
    with pytest.raises(banerjee.DatasetError, match=r"Label indexes \[7\] are outside 0..3"):
        maker.restore_datasets(train_ds_state={**state, "act_labels": [0, 7]})


# ===============================================================================================================
# Parameters: script options, model names, weights files
# ===============================================================================================================


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--runs", "0"), "--runs and --top-k must be at least 1"),
        (("--batch-size", "0"), "argument --batch-size: must be auto or at least 1, got 0"),
        (("--top-k", "0"), "--runs and --top-k must be at least 1"),
        (("--workers", "-1"), "argument --workers: must be auto or at least 0, got -1"),
        (("--confidence", "1.5"), "--confidence must lie strictly between 0 and 1"),
        (("--valid-share", "1.2"), "--valid-share must lie strictly between 0 and 1 (a share of each class "
                                   "validates, the rest trains), got 1.2"),
        (("--valid-share", "1.0"), "--valid-share must lie strictly between 0 and 1"),
        (("--valid-share", "0"), "--valid-share must lie strictly between 0 and 1"),
        (("--short-run", "0"), "--short-run must be at least 1 batch"),
        (("--decode", "tensor", "--protocol", "original"), "--decode tensor decodes images for the cached protocol"),
        (("--decode", "tensor", "--augment-eval"), "it does not apply with --embeddings, --protocol original or "
                                                   "augmentation"),
    ],
)
def test_bad_parameters_are_rejected_before_any_work(tmp_path, args, message):
    result = run_script(*args, "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.resolve_dataset(dataset=str(tmp_path / "absent"), download=False, kaggle_dataset="owner/animals")
    message = info.value.code
    assert isinstance(message, str)  # Python prints it to stderr and exits with status 1
    assert f"No dataset at {tmp_path / 'absent'}" in message
    assert "--download" in message


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ValueError, match="Unknown timm model 'tiny_vit_11m_244'.*tiny_vit_11m_224"):
        engine.create_model(model_name="tiny_vit_11m_244")


def test_offline_download_failure_explains_the_way_out(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(engine.ModelError, match="--weights FILE"):
        engine.create_model(model_name="tf_efficientnet_lite0")


def test_an_unreachable_hub_fails_at_once_without_hf_hub_offline(monkeypatch):
    """Without HF_HUB_OFFLINE, an offline machine once waited through five download retries (52 s measured) before
    the one-line error; now one short connection attempt puts the hub library offline for the process."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = []

    def unreachable(address, timeout):
        attempts.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    started = time.perf_counter()
    with pytest.raises(engine.ModelError, match="--weights FILE"):
        engine.create_model(model_name="tf_efficientnet_lite0")
    assert time.perf_counter() - started < 20
    assert attempts == [(("huggingface.co", 443), engine.HUB_PROBE_TIMEOUT_S)]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert engine.hub_within_reach() is False and len(attempts) == 1  # offline now: no second probe


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(ValueError, match="Does --weights belong to --model"):
        engine.create_model(model_name="tf_efficientnet_lite0", weights=path)


def test_the_weights_of_a_larger_variant_are_refused_not_partly_loaded(tmp_path):
    """A Lite1 state dict holds every Lite0 tensor by name (same widths, more blocks): loading it by name would drop
    90 tensors (its classifier aside) and give confident nonsense."""
    import timm

    path = tmp_path / "lite1.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict(), path)
    with pytest.raises(engine.ModelError, match=r"holds 90 tensors that model '[^']*tf_efficientnet_lite0[^']*' does "
                                                r"not have \(e.g. 'blocks.1.2.conv_pw.weight'\): it belongs to a"):
        engine.create_model(model_name="tf_efficientnet_lite0", weights=path)


def test_a_weights_file_of_random_bytes_is_not_met_with_advice_to_unpickle_it(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(engine.ModelError) as info:
        engine.create_model(model_name="tf_efficientnet_lite0", weights=path)
    message = str(info.value)
    assert message.startswith(f"Cannot read weights file {path}: it is not a plain PyTorch state dict of tensors")
    assert "weights_only=False" not in message and "\n" not in message


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        engine.create_model(model_name="tf_efficientnet_lite0", weights=tmp_path / "nope.pth")


# ===============================================================================================================
# The script on a damaged dataset: broken files, a class too small to validate, odd names and folders
# ===============================================================================================================

TINY_CLASS = "cyan ring"
ODD_CLASS = "magenta crôss 十字"
SEED, RUNS, VALID_SHARE = 17, 3, 0.4
SERIAL, PARALLEL, OTHER_SEED = ("--workers", "0"), ("--workers", "2"), ("--seed", "18", "--runs", "1")


@pytest.fixture(scope="module")
def damaged_set(tmp_path_factory) -> tuple[pathlib.Path, dict[pathlib.Path, str]]:
    """Six classes: five of 6 images, one ("cyan ring") of 2, which is below 1 / VALID_SHARE and so never gets a
    validation image; one class folder renamed to a non-ASCII name, one image in a nested folder, and three broken
    files (mapped to a fragment of their skip reason)."""
    root = make_class_folders(
        tmp_path_factory.mktemp("damaged"), classes=list(CLASS_STYLES), images_per_class=[6, 6, 6, 6, 6, 2], seed=3
    )
    (root / "magenta cross").rename(root / ODD_CLASS)
    nested = root / "blue triangle" / "sub folder"
    nested.mkdir()
    (root / "blue triangle" / "img_005.jpg").rename(nested / "img_005.jpg")
    broken = {
        truncated_jpeg(root / "green square" / "cut.jpg"): "image file is truncated",
        write_bytes(root / "green square" / "empty.jpg", b""): "cannot identify image file",
        write_bytes(root / "red circle" / "notes.png", b"not a PNG, just text\n"): "cannot identify image file",
    }
    return root, broken


def damaged_set_args(root: pathlib.Path, weights: pathlib.Path, out: pathlib.Path) -> list:
    return ["--dataset", root, "--model", "tf_efficientnet_lite0", "--weights", weights, "--top-k", 2,
            "--valid-share", VALID_SHARE, "--runs", RUNS, "--seed", SEED, "--out", out]


@dataclasses.dataclass(frozen=True)
class ScriptRun:
    """One finished script run: its process result and its --out folder."""

    result: subprocess.CompletedProcess
    out: pathlib.Path

    def results(self) -> dict:
        return json.loads((self.out / "results.json").read_text(encoding="utf-8"))

    def partitions(self) -> list[dict]:
        """The runs.jsonl records without their timings: splits, targets and predictions of each partition."""
        return [{key: value for key, value in dataclasses.asdict(record).items() if key != "seconds"}
                for record in protocol.load_run_records(self.out / "runs.jsonl")]

    def printed_accuracies(self) -> list[str]:
        """The "Accuracy:" and "Top k accuracy:" lines of the final statistics."""
        final = self.result.stdout.split("-- Final stats --", 1)[1]
        return [line for line in final.splitlines() if re.match(r"(Top \d+ a|A)ccuracy: ", line)]


@pytest.fixture(scope="module")
def damaged_run(damaged_set, lite0_weights, tmp_path_factory) -> Callable[..., ScriptRun]:
    """Run the script on the damaged set with extra options (later options win); each option list runs once."""
    root, _ = damaged_set
    runs: dict[tuple[str, ...], ScriptRun] = {}

    def run(*options: str) -> ScriptRun:
        if options not in runs:
            out = tmp_path_factory.mktemp("out")
            result = run_script(*damaged_set_args(root, lite0_weights, out), *options, cwd=out)
            runs[options] = ScriptRun(result=result, out=out)
        return runs[options]

    return run


def test_script_skips_broken_files_and_records_them(damaged_set, damaged_run):
    root, broken = damaged_set
    run = damaged_run(*SERIAL)
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert "(6 classes, 32 images, 3 skipped)" in run.result.stdout
    assert run.result.stderr.count("UserWarning: Skipped 3 path(s) in") == 1
    assert all(str(path) in run.result.stderr for path in broken)
    skipped = {pathlib.Path(item["path"]): item["reason"] for item in run.results()["skipped_files"]}
    assert set(skipped) == set(broken)
    assert all(fragment in skipped[path] for path, fragment in broken.items())
    assert all(len(p["train_indexes"]) + len(p["valid_indexes"]) == 32 for p in run.partitions())
    labels = pd.read_csv(run.out / "class_accuracy.csv")["label"].tolist()
    assert labels == ["blue triangle", TINY_CLASS, "green square", ODD_CLASS, "red circle", "yellow stripes"]


def test_strict_script_stops_before_encoding_and_lists_broken_files(damaged_set, damaged_run):
    _, broken = damaged_set
    run = damaged_run("--strict")
    assert run.result.returncode != 0
    assert "3 problem(s) in" in run.result.stderr and "Traceback" not in run.result.stderr
    assert all(str(path) in run.result.stderr for path in broken)
    assert "[Embed" not in run.result.stderr and "Dataset:" not in run.result.stdout
    assert not (run.out / "runs.jsonl").exists()


def test_class_too_small_for_validation_gets_no_accuracy_and_no_warning_noise(damaged_run):
    run = damaged_run(*SERIAL)
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert "RuntimeWarning" not in run.result.stderr
    assert "Validation images per partition: 10" in run.result.stdout  # 5 classes x int(6 * 0.4)
    accuracy = pd.read_csv(run.out / "class_accuracy.csv").set_index("label")["accuracy"]
    assert math.isnan(accuracy[TINY_CLASS])
    assert accuracy.drop(TINY_CLASS).notna().all() and accuracy.drop(TINY_CLASS).min() >= 0.9
    tiny = accuracy.index.tolist().index(TINY_CLASS)  # rows are in label index order
    assert all(tiny not in p["targets"] for p in run.partitions())
    assert TINY_CLASS not in [item["label"] for item in run.results()["least_accurate_classes"]]


def test_top_k_larger_than_the_class_count_is_rejected(damaged_set, lite0_weights, tmp_path):
    result = run_script("--dataset", damaged_set[0], "--model", "tf_efficientnet_lite0", "--weights", lite0_weights,
                        "--top-k", 7, cwd=tmp_path)
    assert result.returncode != 0
    assert "--top-k 7 exceeds the 6 classes" in result.stderr


def test_single_run_prints_the_value_without_an_interval(damaged_run):
    result = damaged_run(*OTHER_SEED).result
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Accuracy: [0-9.]+ \(n=1, no interval\)$", result.stdout, re.M), result.stdout[-2000:]


# ===============================================================================================================
# Saved files: embeddings ZIPs, class vector stores, checkpoints, atomic writes
# ===============================================================================================================


def edit_zip_member(path: pathlib.Path, member: str, edit: Callable[[str], str]) -> None:
    """Rewrite one text member of a ZIP archive, keeping the others: a hand-edited (tampered) file."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    contents[member] = edit(contents[member].decode("utf-8")).encode("utf-8")
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


def test_load_embeddings_refuses_truncated_zip(tmp_path):
    path = store.save_embeddings(
        embeddings=np.ones((50, 20), dtype=np.float32), targets=list(range(50)), filename=tmp_path / "e"
    )
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(store.StoreError, match="Cannot read embeddings"):
        store.load_embeddings(filename=path)


def test_load_embeddings_refuses_zip_without_target_column(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other.csv", "a,b\n1,2\n")
    with pytest.raises(store.StoreError, match="'target' column"):
        store.load_embeddings(filename=path)


@pytest.mark.parametrize(
    ("cell", "message"),
    [("abc", "some embedding values are not numbers (could not convert string to float: 'abc')"),
     ("", "some embedding values are missing or not numbers")],
)
def test_load_embeddings_refuses_tampered_values(tmp_path, cell, message):
    path = store.save_embeddings(embeddings=np.eye(3, dtype=np.float32), targets=[0, 1, 2], filename=tmp_path / "e")

    def tamper(text: str) -> str:
        lines = text.splitlines()
        lines[2] = lines[2].replace(",1,", f",{cell},", 1)
        return "\n".join(lines) + "\n"

    edit_zip_member(path, "e.csv", tamper)
    with pytest.raises(store.StoreError, match=re.escape(message)) as info:
        store.load_embeddings(filename=path)
    assert str(path) in str(info.value)


def test_failed_save_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = store.save_embeddings(embeddings=np.eye(3, dtype=np.float32), targets=[0, 1, 2], filename=tmp_path / "e")
    before = path.read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.save_embeddings(embeddings=np.zeros((3, 3), dtype=np.float32), targets=[5, 6, 7], filename=path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["e.zip"]


def test_save_into_read_only_folder_keeps_previous_file(tmp_path, monkeypatch):
    path = store.save_embeddings(embeddings=np.eye(3, dtype=np.float32), targets=[0, 1, 2], filename=tmp_path / "e")
    before = path.read_bytes()

    def read_only_folder(*_args, **_kwargs):  # what mkstemp raises there (root ignores chmod, so simulate it)
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", read_only_folder)
    with pytest.raises(PermissionError, match="Permission denied"):
        store.save_embeddings(embeddings=np.zeros((3, 3), dtype=np.float32), targets=[5, 6, 7], filename=path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["e.zip"]


def test_atomic_path_discards_partial_output_on_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with store.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def toy_class_store_zip(folder: pathlib.Path) -> pathlib.Path:
    """A saved class vector store of a made-up 8-dimensional model, three classes of two images each."""
    db = vector_store.ClassVectorStore(
        dim=8, model_name="toy", model_id="toy+sha256:000000000000", transform_config={"input_size": [3, 8, 8]}
    )
    db.add_classes(embeddings=torch.randn(6, 8, generator=torch.Generator().manual_seed(0)),
                   labels=["cat", "cat", "dog", "dog", "owl", "owl"])
    return db.save(path=folder / "classes.zip")


def test_class_store_zip_of_another_model_is_refused(tmp_path):
    path = toy_class_store_zip(tmp_path)
    lite0_id = "tf_efficientnet_lite0+sha256:579344248a93"
    expected = f"{path} was built with model 'toy+sha256:000000000000', not with '{lite0_id}'"
    with pytest.raises(vector_store.ModelMismatchError, match=re.escape(expected)) as info:
        vector_store.ClassVectorStore.load(path=path, model_id=lite0_id)
    assert "--model toy with the same --weights file" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dim", 1280, "its content does not match the checksum written with it; the file was edited"),
        ("dim-without-checksum", 1280,
         r"class sums \[3, 8\] do not fit a store of dimension 1280; the file is damaged"),
        ("counts", [2, 0, 2], "its content does not match the checksum written with it; the file was edited"),
        ("counts", [2.5, 2, 2], "its content does not match the checksum written with it; the file was edited"),
        ("counts", [2.0, 2, 2], "its content does not match the checksum written with it; the file was edited"),
        ("counts-without-checksum", [2, 0, 2],
         r"every class needs an image count of at least 1 \(a whole number\); the file is damaged"),
        ("format", "something else", "is not a class vector store"),
    ],
)
def test_tampered_class_store_zip_is_refused(tmp_path, key, value, message):
    path = toy_class_store_zip(tmp_path)

    def edit(text: str) -> str:
        metadata = json.loads(text)
        if key.endswith("-without-checksum"):  # as in a version 2 store written before checksums: deeper checks
            del metadata["checksum"]
            metadata["version"] = 2
        return json.dumps({**metadata, key.removesuffix("-without-checksum"): value})

    edit_zip_member(path, vector_store.METADATA_MEMBER, edit)
    with pytest.raises(ClassDBError, match=message) as info:
        vector_store.ClassVectorStore.load(path=path)
    assert str(path) in str(info.value)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    path.write_bytes(pickle.dumps({"model": Payload(), "model_name": "x"}))
    with pytest.raises(store.StoreError, match="Cannot load checkpoint"):
        store.load_checkpoint(checkpoint_path=path)


def test_load_checkpoint_refuses_foreign_and_truncated_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(store.StoreError, match="not a checkpoint"):
        store.load_checkpoint(checkpoint_path=foreign)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(foreign.read_bytes()[:40])
    with pytest.raises(store.StoreError, match="Cannot load checkpoint"):
        store.load_checkpoint(checkpoint_path=truncated)


def test_checkpoint_with_weights_of_another_model_is_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"model_name": "tf_efficientnet_lite0", "model_config": {}, "model": {"conv.weight": torch.zeros(8)}},
               path)
    with pytest.raises(store.StoreError, match="cannot rebuild model 'tf_efficientnet_lite0'") as info:
        store.load_checkpoint(checkpoint_path=path)
    assert str(path) in str(info.value)


# ===============================================================================================================
# Interrupted runs
# ===============================================================================================================


def test_resume_with_another_seed_is_refused_and_keeps_the_log(image_folder, lite0_model, tmp_path):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    _, transform = engine.eval_transform(lite0_model)
    encoder = engine.Encoder(model=lite0_model, device="cpu", config=SimpleNamespace(topk=2))
    cache = store.EmbeddingCache(tmp_path / "cache")  # the second run reuses the embeddings of the first

    def cached_run(*, runs, seed, **kwargs):
        return protocol.run_cached_protocol(
            encoder=encoder, maker=maker, transform=transform, batch_size=16, workers=0, cache=cache,
            settings=config.RunSettings(runs=runs, valid_share=0.3, seed=seed, top_k=2), **kwargs,
        )

    log = tmp_path / "runs.jsonl"
    cached_run(runs=2, run_log=log, seed=1)
    before = protocol.load_run_records(log)
    with pytest.raises(ValueError, match="Cannot resume: partition 0 differs"):
        cached_run(runs=3, run_log=log, seed=2, completed=protocol.load_run_records(log))
    assert len(before) == 2 and protocol.load_run_records(log) == before


def test_interrupted_script_keeps_finished_partitions_and_resumes(damaged_set, lite0_weights, damaged_run, tmp_path):
    out = tmp_path / "out"
    args = [*damaged_set_args(damaged_set[0], lite0_weights, out), "--protocol", "original"]
    log = out / "runs.jsonl"
    with (tmp_path / "stdout.txt").open("w") as stdout, (tmp_path / "stderr.txt").open("w") as stderr:
        # Ctrl-C's default action in the script even where the suite itself runs with SIGINT ignored (a background
        # job of a shell), which a child would inherit and Python would then leave ignored
        process = subprocess.Popen(**script_call(*args), cwd=tmp_path, stdout=stdout, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 900
            while not protocol.load_run_records(log):  # the original protocol takes seconds per partition
                assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no partition finished in 15 minutes"
                time.sleep(0.2)
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
            process.wait(timeout=600)
        finally:
            process.kill()
            process.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 1, stderr[-3000:]
    assert f"Interrupted. Finished partitions are kept in {log}; rerun with --resume to go on." in stderr
    kept = protocol.load_run_records(log)
    assert 1 <= len(kept) < RUNS and not (out / "results.json").exists()

    resumed = ScriptRun(result=run_script(*args, "--resume", cwd=tmp_path), out=out)
    assert resumed.result.returncode == 0, resumed.result.stderr[-3000:]
    assert protocol.load_run_records(log)[: len(kept)] == kept  # reused, timings included, not recomputed
    # The uninterrupted reference uses the cached protocol; equal splits and top-k predictions of every partition
    # (asserted here) make it the same experiment, as tests/test_protocol.py shows in general.
    reference = damaged_run(*SERIAL)
    assert resumed.partitions() == reference.partitions()
    assert resumed.results()["accuracies"] == reference.results()["accuracies"]
    assert resumed.results()["topk_accuracies"] == reference.results()["topk_accuracies"]
    assert resumed.printed_accuracies() == reference.printed_accuracies()


# ===============================================================================================================
# Reproducibility
# ===============================================================================================================


def test_same_seed_gives_identical_results_with_zero_or_two_workers(damaged_run):
    serial, parallel = damaged_run(*SERIAL), damaged_run(*PARALLEL)
    assert parallel.result.returncode == 0, parallel.result.stderr[-3000:]
    assert len(serial.partitions()) == RUNS
    assert len({tuple(p["valid_indexes"]) for p in serial.partitions()}) == RUNS  # partitions differ between runs
    assert parallel.partitions() == serial.partitions()
    assert parallel.results()["accuracies"] == serial.results()["accuracies"]
    assert parallel.results()["topk_accuracies"] == serial.results()["topk_accuracies"]
    assert len(serial.printed_accuracies()) == 2
    assert parallel.printed_accuracies() == serial.printed_accuracies()


def test_another_seed_draws_other_partitions(damaged_run):
    seventeen, eighteen = damaged_run(*SERIAL).partitions(), damaged_run(*OTHER_SEED).partitions()
    assert len(eighteen) == 1
    assert eighteen[0]["valid_indexes"] != seventeen[0]["valid_indexes"]
    assert sorted(eighteen[0]["valid_indexes"] + eighteen[0]["train_indexes"]) == list(range(32))


def test_caltech101_download_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision

    def offline(**_kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "Caltech101", offline)
    with pytest.raises(banerjee.DatasetError) as info:
        cli.resolve_dataset(dataset="unused", download="caltech101", kaggle_dataset="x/y", download_dir=str(tmp_path))
    assert str(info.value).startswith(f"Could not download Caltech-101 with torchvision into {tmp_path} (OSError")
    assert "pass a class-folder dataset with --dataset DIR" in str(info.value)


def test_digits_are_written_once_as_class_folders_with_no_network(tmp_path):
    from sklearn.datasets import load_digits

    folder = banerjee.download_dataset("digits", root=tmp_path, kaggle_dataset="unused", per_class=3)
    assert folder == tmp_path / "digits-3-per-class"
    assert sorted(path.name for path in folder.iterdir()) == [str(digit) for digit in range(10)]
    maker = banerjee.DatasetMaker(dataset_path=folder)
    assert maker.get_num_images() == 30 and not maker.skipped
    first = load_digits().images[0]  # a zero, written as 0000.png
    pixels = np.asarray(Image.open(folder / "0" / "0000.png"))
    np.testing.assert_array_equal(pixels, (first * 255 / 16).round().astype(np.uint8))
    assert banerjee.download_dataset("digits", root=tmp_path, kaggle_dataset="unused", per_class=3) == folder
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary folder left
    with pytest.raises(banerjee.DatasetError, match="applies to --download digits, not to caltech101"):
        banerjee.download_dataset("caltech101", root=tmp_path, kaggle_dataset="unused", per_class=3)


# ===============================================================================================================
# Concurrent writers and earlier run logs
# ===============================================================================================================


@contextlib.contextmanager
def lock_held_elsewhere(path: pathlib.Path):
    """Another process holding the writer lock of ``path``, as a second add-class or run would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(path.parent / f".{path.name}.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_second_writer_of_a_class_store_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    path = toy_class_store_zip(tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(commands, "LOCK_TIMEOUT_S", 0.3)
    with lock_held_elsewhere(path):
        assert cli.class_store_main(["remove-class", "--store", str(path), "cat"]) == 1
    error = capsys.readouterr().err
    assert f"Another process is writing {path}" in error and "Wait for it to finish" in error
    assert path.read_bytes() == before
    assert cli.class_store_main(["remove-class", "--store", str(path), "cat"]) == 0


def test_second_run_into_the_same_out_stops_and_an_earlier_log_is_kept(image_folder, lite0_weights, lite0_model,
                                                                       tmp_path):
    out = tmp_path / "out"
    with lock_held_elsewhere(out / "runs.jsonl"):
        result = run_script("--dataset", image_folder, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights,
                            "--runs", 2, "--top-k", 2, "--out", out, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: Another process is writing {out / 'runs.jsonl'}")
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    _, transform = engine.eval_transform(lite0_model)
    encoder = engine.Encoder(model=lite0_model, device="cpu")

    def experiment(runs):
        return protocol.run_cached_protocol(
            encoder=encoder, maker=maker, transform=transform, batch_size=16, workers=0, run_log=out / "runs.jsonl",
            settings=config.RunSettings(runs=runs, valid_share=0.3, seed=1, top_k=2),
        )

    experiment(3)
    earlier = (out / "runs.jsonl").read_text()
    (out / "results.json").write_text("{}")  # what a finished run leaves beside its log
    (out / "cache").mkdir()
    experiment(2)
    kept = list(out.glob("replaced-*"))
    assert len(kept) == 1 and (kept[0] / "runs.jsonl").read_text() == earlier
    assert sorted(path.name for path in kept[0].iterdir()) == ["results.json", "runs.jsonl"]
    assert not (out / "results.json").exists() and (out / "cache").is_dir()  # nothing of the old run is left
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2


def test_class_store_zip_with_relabelled_rows_is_refused(tmp_path):
    path = toy_class_store_zip(tmp_path)
    edit_zip_member(path, vector_store.METADATA_MEMBER,
                    lambda text: json.dumps({**json.loads(text), "labels": ["dog", "cat", "owl"]}))
    with pytest.raises(ClassDBError, match="does not match the checksum written with it"):
        vector_store.ClassVectorStore.load(path=path)
    path = toy_class_store_zip(tmp_path)  # a version 2 store written before checksums: the labels still tell
    edit_zip_member(path, vector_store.METADATA_MEMBER, lambda text: json.dumps(
        {**{key: value for key, value in json.loads(text).items() if key != "checksum"}, "version": 2,
         "labels": ["dog", "cat", "owl"]}))
    with pytest.raises(ClassDBError, match="target column differ .* wrong names"):
        vector_store.ClassVectorStore.load(path=path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("counts", [2.5, 2, 2], r"image count of at least 1 \(a whole number\)"),
    ("counts", None, "labels do not fit class sums"),
])
def test_class_store_zip_with_bad_counts_is_refused(tmp_path, key, value, message):
    path = toy_class_store_zip(tmp_path)

    def edit(text: str) -> str:  # without its checksum, as a version 2 store written before them: deeper checks
        metadata = json.loads(text)
        del metadata["checksum"]
        metadata["version"] = 2
        return json.dumps({**metadata, key: value})

    edit_zip_member(path, vector_store.METADATA_MEMBER, edit)
    with pytest.raises(ClassDBError, match=message):
        vector_store.ClassVectorStore.load(path=path)


# ===============================================================================================================
# The error boundary, checks before any work, and what is read back
# ===============================================================================================================


def boundary_call(statement: str) -> subprocess.CompletedProcess:
    """A script that installs the error boundary, imports the package's leaves, then runs ``statement``."""
    code = f"from simsearch import cli\nimport utils, store\ncli.install_error_boundary()\n{statement}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


@pytest.mark.parametrize(("statement", "line"), [
    ("raise OSError(28, 'No space left on device', 'out/cumacc.png')",
     "error: [Errno 28] No space left on device: 'out/cumacc.png'"),
    ("raise store.StoreError('runs.jsonl: damaged. Start again.')", "error: runs.jsonl: damaged. Start again."),
])
def test_error_boundary_turns_user_errors_into_one_line(statement, line):
    result = boundary_call(statement)
    assert result.returncode == 1
    assert result.stderr.strip() == line


def test_error_boundary_keeps_the_traceback_of_a_bug():
    result = boundary_call("1 / 0")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().endswith("ZeroDivisionError: division by zero")


def test_every_package_error_is_a_user_error():
    import utils

    for error in (banerjee.DatasetError, store.StoreError, ClassDBError, vector_store.ModelMismatchError,
                  engine.ModelError, protocol.RunLogError):
        assert issubclass(error, utils.UserError) and issubclass(error, ValueError)
        assert cli.is_user_error(error("x"))
    assert cli.is_user_error(PermissionError(13, "Permission denied", "out"))
    assert not cli.is_user_error(KeyError("bug")) and not cli.is_user_error(ValueError("bug"))


def out_that_is_a_file(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken"


def read_only_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda tmp: ("--seed", "-1"), "--seed must lie in 0..4294967295 (NumPy's seed range), got -1"),
    (lambda tmp: ("--seed", str(2**32)), "--seed must lie in 0..4294967295"),
    (lambda tmp: ("--weights", str(tmp / "absent.pth")), "absent.pth: no such file"),
    (lambda tmp: ("--out", str(out_that_is_a_file(tmp))), "is a file, not a folder. Pass a folder path."),
    (lambda tmp: ("--cache-dir", str(out_that_is_a_file(tmp) / "cache")),
     "is a file, so no folder can be made under it"),
    (lambda tmp: ("--out", str(read_only_folder(tmp) / "out")), "locked is not writable. Pass a folder you can"),
])
def test_bad_paths_and_seeds_are_rejected_before_any_work(tmp_path, make_args, message):
    if os.geteuid() == 0 and "locked" in message:
        pytest.skip("root writes into read-only folders")
    result = run_script("--dataset", tmp_path / "absent", *make_args(tmp_path), cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]


def test_wrong_dataset_path_creates_no_out_folder(tmp_path):
    result = run_script("--dataset", tmp_path / "absent", "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"No dataset at {tmp_path / 'absent'}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_model_stops_the_script_before_listing_images_in_one_line(image_folder, tmp_path):
    result = run_script("--dataset", image_folder, "--model", "tf_efficientnet_lite9", "--out", tmp_path / "out",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Unknown timm model 'tf_efficientnet_lite9'. Close matches: ")
    assert "tf_efficientnet_lite0" in last
    assert "Checking images" not in result.stderr and not (tmp_path / "out").exists()


def test_weights_of_another_model_stop_the_script_in_one_line(image_folder, tmp_path):
    weights = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, weights)
    result = run_script("--dataset", image_folder, "--model", "tf_efficientnet_lite0", "--weights", weights,
                        "--out", tmp_path / "out", cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Weights file {weights} has 1 tensors") and "Does --weights belong" in last


def test_tensorflow_weights_in_the_pytorch_variant_warn(lite0_weights):
    with pytest.warns(UserWarning, match="TensorFlow-trained.*'efficientnet_lite0' pads and normalises differently. "
                                         "Use --model tf_efficientnet_lite0"):
        engine.create_model(model_name="efficientnet_lite0", weights=lite0_weights)


@pytest.mark.filterwarnings("error::UserWarning")
def test_tensorflow_weights_in_the_tensorflow_variant_do_not_warn(lite0_weights):
    engine.create_model(model_name="tf_efficientnet_lite0", weights=lite0_weights)


def test_class_folder_linked_to_the_dataset_root_warns_about_duplicates(tmp_path):
    root = small_dataset(tmp_path / "data")
    (root / "all").symlink_to(root, target_is_directory=True)
    with pytest.warns(UserWarning, match=r"6 sample\(s\) of .* are files already listed under another path "
                                         r"\(symbolic links\), e\.g\. .*img_000.jpg is .*img_000.jpg; each copy "
                                         "counts"):
        maker = banerjee.DatasetMaker(dataset_path=root)
    assert maker.get_num_images() == 12  # kept, as the folders say, but no longer silently


def forged_log(tmp_path: pathlib.Path, edit: Callable[[dict], None]) -> pathlib.Path:
    good = protocol.Run(run=0, accuracy=0.5, balanced_accuracy=0.5, topk_accuracy=1.0, train_accuracy=1.0,
                        num_images=2, targets=[0, 1], predictions=[0, 0], topk_predictions=[[0, 1], [0, 1]],
                        margins=[0.1, 0.2], train_indexes=[2, 3], valid_indexes=[0, 1], seconds=0.1)
    record = dataclasses.asdict(good)
    edit(record)
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({**record, "checksum": protocol._record_checksum(record)}) + "\n")
    return path  # a forger who also recomputed the checksum: the scores must still follow from the predictions


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda record: record.update(accuracy=0.99), "its scores do not follow from its targets and predictions"),
    (lambda record: record.update(topk_accuracy=0.5), "its scores do not follow"),
    (lambda record: record.update(balanced_accuracy=0.75), "its scores do not follow"),
    (lambda record: record.update(margins=[0.1]), "its scores do not follow"),
    (lambda record: record.update(predictions=[0, 1]), "its scores do not follow"),
    (lambda record: record.update(num_images=3), "its scores do not follow"),
    (lambda record: record.update(accuracy="0.5"), "its scores do not follow"),
    (lambda record: record.update(topk_predictions=[[0, 1], [0]]), "malformed"),
    (lambda record: record.update(targets=["a", 1]), "malformed"),
])
def test_forged_run_log_is_refused_with_its_file_and_partition(tmp_path, edit, problem):
    assert len(protocol.load_run_records(forged_log(tmp_path, lambda record: None))) == 1
    path = forged_log(tmp_path, edit)
    with pytest.raises(protocol.RunLogError, match=rf"{re.escape(str(path))}, line 1: partition 0: .*{problem}.*"
                                                   "without --resume"):
        protocol.load_run_records(path)


def test_run_log_edited_without_its_checksum_or_damaged_inside_is_refused_by_line(tmp_path):
    path = forged_log(tmp_path, lambda record: None)
    line = path.read_text()
    record = json.loads(line)
    edited = {**record, "targets": [1, 0], "predictions": [1, 1], "topk_predictions": [[1, 0], [1, 0]]}
    path.write_text(line + json.dumps(edited) + "\n")  # consistent scores, the old checksum
    with pytest.raises(protocol.RunLogError, match=rf"{re.escape(str(path))}, line 2: the record does not match its "
                                                   "checksum \\(edited, damaged, or written by an older version\\)"):
        protocol.load_run_records(path)
    path.write_text(line + '{"run": 1, "accur\n' + line)
    with pytest.raises(protocol.RunLogError, match=rf"{re.escape(str(path))}, line 2: the line is damaged \(not "
                                                   "JSON\\)"):
        protocol.load_run_records(path)
    path.write_text(line + '{"run": 1, "accur')  # a write cut short: the partitions before it stand
    assert [run.run for run in protocol.load_run_records(path)] == [0]


def test_resumed_log_whose_targets_were_relabelled_is_refused(image_folder, lite0_model, tmp_path):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    _, transform = engine.eval_transform(lite0_model)
    encoder = engine.Encoder(model=lite0_model, device="cpu")
    log = tmp_path / "runs.jsonl"

    def cached_run(**kwargs):
        return protocol.run_cached_protocol(
            encoder=encoder, maker=maker, transform=transform, batch_size=16, workers=0, run_log=log,
            settings=config.RunSettings(runs=2, valid_share=0.3, seed=1, top_k=2), **kwargs,
        )

    cached_run()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    swapped = {0: 1, 1: 0}  # consistent scores, other classes: the log of another dataset's labelling
    for record in records:
        for key in ("targets", "predictions"):
            record[key] = [swapped.get(value, value) for value in record[key]]
        record["topk_predictions"] = [[swapped.get(value, value) for value in row]
                                      for row in record["topk_predictions"]]
    for record in records:
        del record["checksum"]
        record["checksum"] = protocol._record_checksum(record)
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(protocol.RunLogError, match="Cannot resume: partition 0 of .* holds the same samples with "
                                                   "other labels than the dataset gives them now"):
        cached_run(completed=protocol.load_run_records(log))
    cached_run()  # a new experiment moves the edited one aside
    assert len(list(tmp_path.glob("replaced-*"))) == 1
    log.write_text(log.read_text() + '{"run": 2, "acc')  # a write cut short is the same experiment, resumed
    cached_run(completed=protocol.load_run_records(log))
    assert len(list(tmp_path.glob("replaced-*"))) == 1 and len(log.read_text().splitlines()) == 2


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    import utils

    frame = pd.DataFrame({"label": ["=HYPERLINK(\"x\")", "+1", "-sum", "@cmd", "\tx", "cat", "a=b"],
                          "accuracy": [-0.5, 1.0, 0.5, 0.25, 0.0, 1.0, 0.5]})
    store.write_csv(tmp_path / "table.csv", frame)
    read = pd.read_csv(tmp_path / "table.csv", keep_default_na=False)
    assert read["label"].tolist() == ["'=HYPERLINK(\"x\")", "'+1", "'-sum", "'@cmd", "'\tx", "cat", "a=b"]
    assert read["accuracy"].tolist() == frame["accuracy"].tolist()  # numbers stay numbers
    assert utils.spreadsheet_safe(-3) == -3 and utils.spreadsheet_safe("") == ""


def test_printable_spells_control_characters_and_keeps_other_text():
    import utils

    assert utils.printable("red\x1b[31m\nfox\r\x07") == "red\\x1b[31m\\nfox\\r\\x07"
    assert utils.printable("café 日本 cat") == "café 日本 cat"


def test_class_store_output_and_csv_cannot_inject_lines_escapes_or_formulas(tmp_path, capsys):
    evil = "=cmd|' /C calc'!A0\x1b[2J\nfake line"
    db = vector_store.ClassVectorStore(dim=4, model_name="toy", model_id="toy+sha256:0", transform_config={})
    db.add_classes(embeddings=torch.eye(4)[:2], labels=[evil, "cat"])
    path = db.save(path=tmp_path / "classes.npz")
    assert cli.class_store_main(["info", "--store", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\nfake line" not in shown
    assert "=cmd|' /C calc'!A0\\x1b[2J\\nfake line" in shown
    assert cli.class_store_main(["rename-class", "--store", str(path), evil, "x\x1bq"]) == 0
    assert "Renamed '=cmd|' /C calc'!A0\\x1b[2J\\nfake line' to 'x\\x1bq'" in capsys.readouterr().out


def test_predictions_csv_neutralises_formula_labels(tmp_path):
    db = vector_store.ClassVectorStore(dim=4, model_name="toy", model_id="toy+sha256:0", transform_config={})
    db.add_classes(embeddings=torch.eye(4)[:2], labels=["=1+1", "cat"])
    result = db.search(queries=torch.eye(4)[:1], top_k=2, model_id="toy+sha256:0")
    commands._write_predictions(path=tmp_path / "p.csv", names=["@image.png"], result=result)
    rows = list(csv.reader((tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()))
    row = dict(zip(rows[0], rows[1]))
    assert [row["image"], row["label_1"], row["label_2"]] == ["'@image.png", "'=1+1", "cat"]


def test_temporary_file_of_a_killed_store_write_is_removed_by_the_next_writer(tmp_path):
    path = toy_class_store_zip(tmp_path)
    leftover = tmp_path / f".{path.name}.k1ll3d.tmp"
    leftover.write_bytes(b"half a store")
    other = tmp_path / ".other.zip.k1ll3d.tmp"
    other.write_bytes(b"someone else's")
    assert cli.class_store_main(["remove-class", "--store", str(path), "cat"]) == 0
    assert not leftover.exists() and other.exists()
    assert vector_store.ClassVectorStore.load(path=path).labels == ["dog", "owl"]


@pytest.mark.parametrize("suffix", [".zip", ".npz"])
def test_store_member_above_the_unpacked_size_limit_is_refused_before_reading(tmp_path, monkeypatch, suffix):
    db = vector_store.ClassVectorStore(dim=4, model_name="toy", model_id="toy+sha256:0", transform_config={})
    db.add_classes(embeddings=torch.eye(4), labels=["a", "b", "c", "d"])
    path = db.save(path=tmp_path / f"classes{suffix}")
    monkeypatch.setattr(store, "MAX_UNPACKED_BYTES", 64)
    with pytest.raises(store.StoreError, match=rf"{re.escape(str(path))}: member .* would unpack to [\d,]+ bytes, "
                                               r"above the limit of 64 \(store.MAX_UNPACKED_BYTES\)"):
        vector_store.ClassVectorStore.load(path=path)


def test_zip_bomb_in_an_embeddings_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "MAX_UNPACKED_BYTES", 2**20)
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("e.csv", b"target,0\n" + b"0" * 2**22)
    assert path.stat().st_size < 2**14  # a few kilobytes that would unpack to four megabytes
    with pytest.raises(store.StoreError, match="member e.csv would unpack to 4,194,313 bytes"):
        store.load_embeddings(filename=path)


# ===============================================================================================================
# File names that are not valid UTF-8: kept as their own bytes, never a crash after the work is done
# ===============================================================================================================


def _non_utf8_dataset(root: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Two classes, one whose folder name is Latin-1 bytes (``caf\\xe9``), as an old camera or a Windows share
    leaves them; Python names it with a surrogate escape."""
    make_class_folders(root, classes=["red circle", "green square"], images_per_class=6)
    os.rename(os.fsencode(root / "red circle"), os.path.join(os.fsencode(root), b"caf\xe9"))
    return root, os.fsdecode(b"caf\xe9")


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16, never undecodable bytes")
def test_a_class_folder_name_that_is_not_utf8_round_trips_through_the_results(lite0_weights, tmp_path):
    root, label = _non_utf8_dataset(tmp_path / "data")
    assert label == "caf\udce9"
    out = tmp_path / "out"
    result = run_script("--dataset", root, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights,
                        "--runs", 2, "--top-k", 1, "--save-embeddings", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["final_stats"]["num_labels"] == 2
    accuracy = pd.read_csv(out / "class_accuracy.csv", encoding_errors="surrogateescape", dtype={"label": object})
    assert sorted(accuracy["label"]) == sorted([label, "green square"])
    assert b"caf\xe9" in (out / "class_accuracy.csv").read_bytes()  # the folder's own bytes
    targets, _ = store.load_embeddings(filename=out / "embeddings-tf_efficientnet_lite0.zip", text_targets=True)
    assert sorted(targets.tolist()) == sorted([label, "green square"])


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16, never undecodable bytes")
def test_classify_writes_image_names_that_are_not_utf8(lite0_weights, tmp_path, capsys):
    root, label = _non_utf8_dataset(tmp_path / "data")
    model = ["--model", "tf_efficientnet_lite0", "--weights", str(lite0_weights)]
    assert cli.class_store_main(["build", "--dataset", str(root), "--out", str(tmp_path / "s.npz"), *model]) == 0
    predictions = tmp_path / "predictions.csv"
    assert cli.class_store_main(["classify", "--store", str(tmp_path / "s.npz"), os.fsdecode(
        os.path.join(os.fsencode(root), b"caf\xe9")), "--csv", str(predictions), *model]) == 0
    table = pd.read_csv(predictions, encoding_errors="surrogateescape", dtype=object)
    assert len(table) == 6 and set(table["label_1"]) == {label}
    assert "caf\\udce9" in capsys.readouterr().out  # printed escaped, never raw bytes on the terminal


def test_a_folder_that_cannot_hold_the_lock_file_says_what_to_do(tmp_path, monkeypatch):
    import filelock

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    with pytest.raises(store.StoreError) as info:
        store.acquire_writer_lock(tmp_path / "shared" / "classes.npz", timeout=0)
    message = str(info.value)
    assert message.startswith(f"Cannot write {tmp_path / 'shared' / 'classes.npz'}: its folder")
    assert "(Permission denied)" in message and "copy the file to a folder you can write to" in message
    assert ".classes.npz.lock" not in message


def test_analysis_tables_keep_labels_and_paths_that_are_not_utf8(tmp_path):
    """pandas 3 stores text as Arrow strings, which refuse surrogate-escaped names: the analysis tables keep them as
    Python strings, and the CSV writer puts the folder's own bytes back."""
    from simsearch import analysis

    label, path = os.fsdecode(b"caf\xe9"), os.fsdecode(b"data/caf\xe9/1.jpg")
    labels = [label, "green square"]
    run = SimpleNamespace(run=0, valid_indexes=[0, 1, 2], targets=[0, 0, 1], predictions=[1, 0, 1],
                          margins=[0.5, 0.01, 0.2])
    confused = analysis.most_confused_pairs(confusion=np.array([[1, 1], [0, 1]]), labels=labels)
    per_class = analysis.per_class_accuracy(targets_per_run=[[0, 0, 1], [0, 1, 1]],
                                            predictions_per_run=[[1, 0, 1], [0, 1, 1]], labels=labels)
    weak = analysis.least_accurate_with_interval(per_class=per_class, threshold=0.9)
    hardest = analysis.smallest_margins(runs=[run], labels=labels, sample_names=[path, "b.jpg", "c.jpg"], count=2)
    assert confused.loc[0, "target"] == label and confused.loc[0, "predicted"] == "green square"
    assert per_class.loc[0, "label"] == label and per_class.loc[0, "mean"] == pytest.approx(0.75)
    assert weak.loc[0, "label"] == label
    assert hardest["sample"].tolist() == ["b.jpg", "c.jpg"] and hardest["target"].tolist() == [label, "green square"]
    store.write_csv(tmp_path / "per_class.csv", per_class)
    assert b"caf\xe9" in (tmp_path / "per_class.csv").read_bytes()
    read = pd.read_csv(tmp_path / "per_class.csv", encoding_errors="surrogateescape", dtype={"label": object})
    assert read["label"].tolist() == labels


# ===============================================================================================================
# Store thresholds and checksums (round 4): every value read back is covered, typed and in range
# ===============================================================================================================


def calibrated_toy_store(folder: pathlib.Path, *, suffix: str) -> pathlib.Path:
    """The toy store of :func:`toy_class_store_zip`, calibrated on six held-out vectors, saved as ``suffix``."""
    db = vector_store.ClassVectorStore.load(path=toy_class_store_zip(folder))
    db.calibrate(embeddings=torch.randn(6, 8, generator=torch.Generator().manual_seed(1)))
    return db.save(path=folder / f"calibrated{suffix}")


def rewrite_npz(path: pathlib.Path, edit: Callable[[dict, dict], None], *, recompute_checksum: bool) -> None:
    """Edit an ``.npz`` store's metadata and arrays in place; with ``recompute_checksum``, as a forger who also
    rewrites the checksum, so only the deeper checks can catch the edit."""
    with np.load(path) as arrays:
        metadata = json.loads(str(arrays["metadata"]))
        statistics = {name: arrays[name] for name in arrays.files if name != "metadata"}
    edit(metadata, statistics)
    if recompute_checksum:
        from simsearch.classdb import files

        metadata["checksum"] = files._checksum(statistics, metadata=metadata)
    with path.open("wb") as stream:
        np.savez_compressed(stream, metadata=np.array(json.dumps(metadata)), **statistics)


@pytest.mark.parametrize("threshold", [0.999, -5.0])
def test_a_zip_stores_checksum_covers_its_threshold(tmp_path, threshold):
    path = calibrated_toy_store(tmp_path, suffix=".zip")

    def edit(text: str) -> str:
        metadata = json.loads(text)
        metadata["calibration"]["threshold"] = threshold
        return json.dumps(metadata)

    edit_zip_member(path, vector_store.METADATA_MEMBER, edit)
    with pytest.raises(ClassDBError, match="does not match the checksum written with it"):
        vector_store.ClassVectorStore.load(path=path)


@pytest.mark.parametrize(("suffix", "value", "shown"), [
    (".zip", None, "None"), (".zip", [1, 2], r"\[1, 2\]"), (".npz", [1, 2], r"\[1, 2\]"), (".npz", "0.5", "'0.5'"),
])
def test_a_threshold_that_is_not_one_number_is_refused_in_one_line(tmp_path, suffix, value, shown):
    """Written by a forger who also recomputes the checksum, so the type check itself must refuse it."""
    from simsearch.classdb import files

    path = calibrated_toy_store(tmp_path, suffix=suffix)
    if suffix == ".npz":
        rewrite_npz(path, lambda _, statistics: statistics.update(threshold=np.asarray(value)),
                    recompute_checksum=True)
    else:
        with zipfile.ZipFile(path) as archive:
            (table,) = [name for name in archive.namelist() if name != vector_store.METADATA_MEMBER]
            table_bytes = archive.read(table)

        def edit(text: str) -> str:
            metadata = json.loads(text)
            metadata["calibration"]["threshold"] = value
            return json.dumps({**metadata, "checksum": files._zip_checksum(table_bytes, metadata=metadata)})

        edit_zip_member(path, vector_store.METADATA_MEMBER, edit)
    with pytest.raises(ClassDBError, match=f"calibration's threshold must be one finite number, got {shown}"):
        vector_store.ClassVectorStore.load(path=path)


def test_a_class_mean_threshold_outside_the_cosine_range_is_refused_even_with_a_forged_checksum(tmp_path):
    path = calibrated_toy_store(tmp_path, suffix=".npz")
    rewrite_npz(path, lambda _, statistics: statistics.update(threshold=np.asarray(-5.0)), recompute_checksum=True)
    with pytest.raises(ClassDBError, match=r"threshold -5 lies outside the range of this classifier's unknown "
                                                   r"scores \[-1, 1\]"):
        vector_store.ClassVectorStore.load(path=path)


def test_a_calibrated_npz_without_its_checksum_is_refused_whatever_version_it_claims(tmp_path):
    path = calibrated_toy_store(tmp_path, suffix=".npz")

    def edit(metadata: dict, statistics: dict) -> None:
        del metadata["checksum"]
        metadata["version"] = 2
        statistics["threshold"] = np.asarray(0.999)

    rewrite_npz(path, edit, recompute_checksum=False)
    with pytest.raises(ClassDBError, match=f"{re.escape(str(path))} has no checksum, which every class store "
                                                   "of format version 2 with a threshold is written with"):
        vector_store.ClassVectorStore.load(path=path)


def test_a_current_zip_without_its_checksum_is_refused(tmp_path):
    path = toy_class_store_zip(tmp_path)
    with zipfile.ZipFile(path) as archive:
        (table,) = [name for name in archive.namelist() if name != vector_store.METADATA_MEMBER]
        text = archive.read(table).decode()
    header, *rows = text.splitlines()
    label, *values = rows[0].split(",")
    rows[0] = ",".join([label, *(repr(float(value) * 50) for value in values)])  # one class pulled far away
    edit_zip_member(path, table, lambda _: "\n".join([header, *rows]) + "\n")
    edit_zip_member(path, vector_store.METADATA_MEMBER,
                    lambda text: json.dumps({key: value for key, value in json.loads(text).items()
                                             if key != "checksum"}))
    with pytest.raises(ClassDBError, match="has no checksum, which every class store of format version 3 is "
                                                   "written with"):
        vector_store.ClassVectorStore.load(path=path)


def test_the_word_unknown_is_reserved_for_rejections():
    db = vector_store.ClassVectorStore(dim=8, model_name="toy", model_id="toy")
    with pytest.raises(ClassDBError, match="The label 'unknown' is reserved for queries of no known class"):
        db.add_class(label="unknown", embeddings=torch.ones(2, 8))
    db.add_class(label="cat", embeddings=torch.ones(2, 8))
    with pytest.raises(ClassDBError, match="reserved"):
        db.rename_class(label="cat", new_label="unknown")
    assert db.labels == ["cat"]


def test_the_package_runs_the_store_commands_when_run_as_a_module(tmp_path):
    path = toy_class_store_zip(tmp_path)
    completed = subprocess.run([sys.executable, "-m", "simsearch", "store", "info", "--store", str(path)],
                               capture_output=True, text=True, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"{path}: 3 classes, 6 images, mean classifier")
    bare = subprocess.run([sys.executable, "-m", "simsearch", "store"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert bare.returncode == 2 and "error: the following arguments are required: command" in bare.stderr
