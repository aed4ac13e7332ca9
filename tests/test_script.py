"""The research script end to end, with the offline EfficientNet-Lite0 weights on a generated class-folder set."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from conftest import CLASS_STYLES, REPO_ROOT, make_class_folders

SCRIPT = REPO_ROOT / "p1_similarity_search_rsch.py"


def run_script(*args, cwd):
    environment = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory):
    return make_class_folders(
        tmp_path_factory.mktemp("six"), classes=list(CLASS_STYLES), images_per_class=[10, 12, 10, 12, 10, 11], seed=7
    )


def test_end_to_end_run_prints_intervals_and_writes_outputs(six_classes, lite0_weights, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        "--dataset", six_classes, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights, "--runs", 5,
        "--top-k", 2, "--out", out, "--save-embeddings", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"^Accuracy: ([0-9.]+) ± ([0-9.]+) \(95% confidence, n=5\)$", result.stdout, re.M)
    assert printed, result.stdout[-3000:]
    assert float(printed.group(1)) >= 0.9
    assert re.search(r"^Top 2 accuracy: [0-9.]+ ± [0-9.]+", result.stdout, re.M)
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracies"]) == 5 and min(results["accuracies"]) >= 0.9
    assert results["skipped_files"] == []
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["run"]) == [0, 1, 2, 3, 4]
    assert runs["accuracy"].tolist() == pytest.approx(results["accuracies"])
    classes = pd.read_csv(out / "class_accuracy.csv")
    assert sorted(classes["label"]) == sorted(CLASS_STYLES)
    for name in ("cumacc.png", "examples.png", "embeddings-tf_efficientnet_lite0.zip"):
        assert (out / name).stat().st_size > 1000, name
    assert "Target is among predicted: True" in result.stdout


def test_single_run_prints_the_value_without_an_interval(six_classes, lite0_weights, tmp_path):
    result = run_script(
        "--dataset", six_classes, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights, "--runs", 1,
        "--top-k", 2, "--out", tmp_path / "out", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Accuracy: [0-9.]+ \(n=1, no interval\)$", result.stdout, re.M), result.stdout[-2000:]


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    result = run_script("--dataset", tmp_path / "absent", "--model", "tf_efficientnet_lite0", "--weights",
                        tmp_path / "w.pth", cwd=tmp_path)
    assert result.returncode != 0
    assert f"No dataset at {tmp_path / 'absent'}" in result.stderr
    assert "--download" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--runs", "0"), "--runs, --batch-size and --top-k must be at least 1"),
        (("--batch-size", "0"), "--runs, --batch-size and --top-k must be at least 1"),
        (("--confidence", "1.5"), "--confidence must lie strictly between 0 and 1"),
    ],
)
def test_bad_parameters_are_rejected_before_any_work(tmp_path, args, message):
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_top_k_larger_than_the_class_count_is_rejected(six_classes, lite0_weights, tmp_path):
    result = run_script("--dataset", six_classes, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights,
                        "--top-k", 7, cwd=tmp_path)
    assert result.returncode != 0
    assert "--top-k 7 exceeds the 6 classes" in result.stderr
