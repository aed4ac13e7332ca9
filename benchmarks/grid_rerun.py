"""The model x dataset grid from a cold cache and again from a warm one, timed side by side in one run.

Two image datasets are made from a class-folder dataset by symbolic links (its classes split in two halves, at most
``--per-class`` images each), so the benchmark needs nothing but the data at hand; two models (EfficientNet-Lite0 and
Lite1, offline weights) and two classifiers make 8 cells. The first ``grid.run_grid`` encodes everything; the
second, same settings, reads embeddings and finished cells back. Printed: both times and their ratio (target:
the warm rerun at most 5 % of the cold run), then the grid's Markdown table::

    python -m benchmarks.grid_rerun --dataset ../shared/data/caltech101 --per-class 20 --runs 20
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from benchmarks.offline_models import lite_weights
from simsearch import grid


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/caltech101", help="class-folder image dataset")
    parser.add_argument("--per-class", type=int, default=20, help="images per class in the two halves")
    parser.add_argument("--runs", type=int, default=20, help="partitions per dataset")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    return parser.parse_args(argv)


def link_classes(classes: list[pathlib.Path], target: pathlib.Path, *, per_class: int) -> pathlib.Path:
    """A class-folder dataset at ``target`` of symbolic links to the first ``per_class`` images of ``classes``."""
    for folder in classes:
        (target / folder.name).mkdir(parents=True)
        for image in sorted(path for path in folder.iterdir() if path.is_file())[:per_class]:
            (target / folder.name / image.name).symlink_to(image.resolve())
    return target


def per_class_subset(dataset: pathlib.Path, target: pathlib.Path, *, per_class: int) -> pathlib.Path:
    """``dataset`` itself (``per_class`` 0), or a dataset of links to the first ``per_class`` images of each class."""
    if not per_class:
        return dataset
    return link_classes(sorted(path for path in dataset.iterdir() if path.is_dir()), target, per_class=per_class)


def split_dataset(source: pathlib.Path, target: pathlib.Path, *, per_class: int) -> list[pathlib.Path]:
    """Two class-folder datasets of links: the first and second half of ``source``'s classes."""
    classes = sorted(path for path in source.iterdir() if path.is_dir())
    middle = len(classes) // 2
    return [link_classes(classes[:middle], target / "first-half", per_class=per_class),
            link_classes(classes[middle:], target / "second-half", per_class=per_class)]


def offline_models() -> list[grid.ModelSpec]:
    return [grid.ModelSpec(name=f"tf_efficientnet_lite{variant}", weights=lite_weights(variant)) for variant in (0, 1)]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        datasets = split_dataset(pathlib.Path(args.dataset), folder / "data", per_class=args.per_class)
        options = dict(datasets=datasets, models=offline_models(), classifiers=["mean", "decorrelated"],
                       out=folder / "out", cache_dir=folder / "cache",
                       settings=grid.GridSettings(runs=args.runs, workers=args.workers))
        seconds = []
        for _ in ("cold", "warm"):
            started = time.perf_counter()
            table = grid.run_grid(**options)
            seconds.append(time.perf_counter() - started)
        print(f"grid of {len(table)} cells: cold {seconds[0]:.1f} s, warm rerun {seconds[1]:.1f} s, "
              f"ratio {seconds[1] / seconds[0]:.3f} (target <= 0.05)")
        print((folder / "out" / "grid.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
