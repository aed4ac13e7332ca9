"""The research script end to end, with the offline EfficientNet-Lite0 weights on a generated class-folder set."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest
from conftest import CLASS_STYLES, make_class_folders, run_script


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory):
    return make_class_folders(
        tmp_path_factory.mktemp("six"), classes=list(CLASS_STYLES), images_per_class=[10, 12, 10, 12, 10, 11], seed=7
    )


def six_class_run(six_classes, lite0_weights, out, *options):
    return run_script(
        "--dataset", six_classes, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights, "--runs", 5,
        "--top-k", 2, "--out", out, *options, cwd=out.parent,
    )


@pytest.fixture(scope="module")
def analysed_run(six_classes, lite0_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return out, six_class_run(six_classes, lite0_weights, out, "--save-embeddings", "--analysis")


def test_decorrelated_classifier_run_equals_its_analysis_row(six_classes, lite0_weights, analysed_run, tmp_path):
    analysed_out, _ = analysed_run
    result = six_class_run(six_classes, lite0_weights, tmp_path / "out", "--classifier", "decorrelated",
                           "--analysis", "retrieval,prototypes", "--compare", "knn1,decorrelated")
    assert result.returncode == 0, result.stderr[-3000:]
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"retrieval.csv", "prototypes.csv"} <= written  # the analysis parts asked for, and none of the others
    assert not written & {"confusion.png", "tsne.png", "ci_coverage.json", "confused_pairs.csv"}
    compared = pd.read_csv(tmp_path / "out" / "prototypes.csv").set_index("method")
    assert list(compared.index) == ["knn1", "decorrelated"]  # the named classifiers, in the order given
    assert re.search(r"^Classifier: DecorrelatedClassifier\(\)$", result.stdout, re.M)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    prototypes = pd.read_csv(analysed_out / "prototypes.csv").set_index("method")
    assert results["final_stats"]["accuracy"]["mean"] == pytest.approx(
        prototypes.loc["decorrelated prototypes", "accuracy"]
    )
    assert results["settings"]["classifier"] == "decorrelated"
    assert compared.loc["decorrelated", "accuracy"] == pytest.approx(results["final_stats"]["accuracy"]["mean"])
    refused = run_script("--dataset", six_classes, "--compare", "mean,svm", cwd=tmp_path)
    assert refused.returncode == 2
    assert ("--compare: unknown classifier(s) svm; choose among mean, decorrelated, balanced, lda, auto, knn1"
            in refused.stderr)


def test_end_to_end_run_prints_intervals_and_writes_outputs(analysed_run):
    out, result = analysed_run
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"^Accuracy: ([0-9.]+) ± ([0-9.]+) \(95% confidence, n=5\)$", result.stdout, re.M)
    assert printed, result.stdout[-3000:]
    assert float(printed.group(1)) >= 0.9
    assert re.search(r"^Top 2 accuracy: [0-9.]+ ± [0-9.]+", result.stdout, re.M)
    calibration = re.search(r"^Calibration error \(15 bins\): ([0-9.]+) ± [0-9.]+ \(95% confidence, n=5\)$",
                            result.stdout, re.M)
    assert calibration and re.search(r"^Log loss: [0-9.]+ ± [0-9.]+", result.stdout, re.M)
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracies"]) == 5 and min(results["accuracies"]) >= 0.9
    assert results["final_stats"]["calibration_error"]["mean"] == pytest.approx(float(calibration.group(1)), abs=1e-4)
    assert results["choices"] == ["mean"] * 5 and results["final_stats"]["choices"] == {"mean": 5}
    assert results["loader"] == {"workers": 0, "batch_size": 32}  # auto on a CPU, recorded and printed
    assert results["settings"]["workers"] == "auto" and "0 loader workers, batches of 32" in result.stdout
    interval = results["final_stats"]["accuracy"]
    assert interval["n"] == 5 and interval["mean"] == pytest.approx(sum(results["accuracies"]) / 5)
    assert results["skipped_files"] == []
    assert results["settings"]["tune_allocator"] is True
    assert results["environment"]["allocator"].startswith("glibc malloc, mmap and trim thresholds 1024 MiB")
    assert re.search(r"^Memory allocator: glibc malloc, mmap and trim thresholds 1024 MiB", result.stdout, re.M)
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["run"]) == [0, 1, 2, 3, 4]
    assert runs["accuracy"].tolist() == pytest.approx(results["accuracies"])
    classes = pd.read_csv(out / "class_accuracy.csv")
    assert sorted(classes["label"]) == sorted(CLASS_STYLES)
    for name in ("cumacc.png", "examples.png", "embeddings-tf_efficientnet_lite0.zip", "confusion.png",
                 "cumacc_band.png", "tsne.png", "reliability.png"):
        assert (out / name).stat().st_size > 1000, name
    reliability = pd.read_csv(out / "reliability.csv")  # every partition's validation images, binned
    assert len(reliability) == 15 and reliability["samples"].sum() == 5 * results["final_stats"]["num_valid_samples"]
    prototypes = pd.read_csv(out / "prototypes.csv").set_index("method")
    assert prototypes.loc["class mean (raw, original)", "accuracy"] == pytest.approx(interval["mean"])
    assert pd.read_csv(out / "retrieval.csv")["k"].tolist() == [1, 4, 8]
    assert json.loads((out / "ci_coverage.json").read_text())["sample_runs"] == 20
    assert "Target is among predicted: True" in result.stdout


def test_short_run_with_the_cached_protocol_never_touches_the_cache(six_classes, lite0_weights, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = six_class_run(six_classes, lite0_weights, out, "--short-run", "1", "--batch-size", "16",
                           "--cache-dir", cache, "--decode", "tensor", "--profile")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHORT RUN: truncated encoding passes, not a result" in result.stdout
    assert "[Embed/All] Decoded 16 JPEGs on cpu; 0 files through PIL" in result.stdout  # one batch of the tensor path
    results = json.loads((out / "results.json").read_text())
    assert results["final_stats"]["short_run"] is True and results["settings"]["decode"] == "tensor"
    phases = ["options", "imports", "device start", "dataset listing and image check", "model",
              "encoding and partitions"]
    assert list(results["phases"]) == phases and all(seconds > 0 for seconds in results["phases"].values())
    printed = re.findall(r"^  (\S.*?) +([0-9.]+) s$", result.stdout.split("Phases of this run (wall time):")[1], re.M)
    assert [name for name, _ in printed] == [*phases, "stats, CAF and results", "analysis and checks", "total"]
    assert not cache.exists() or not any(cache.iterdir())


def test_help_lists_defaults_without_importing_torch(tmp_path):
    import subprocess
    import sys

    from conftest import SCRIPT

    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--classifier {mean,decorrelated,balanced,lda,auto}" in result.stdout and "(default: mean)" in result.stdout
    assert "--device DEVICE" in result.stdout and "(default: auto)" in result.stdout
    refused = subprocess.run([sys.executable, str(SCRIPT), "--classifier", "balanced", "--select-for", "balanced"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "--select-for chooses the lda classifier's prior; --classifier balanced has none." in refused.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys, simsearch.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60, cwd=SCRIPT.parent)
    assert probe.stdout.strip() == "False"


def test_cli_names_are_the_modules_own():
    from simsearch import cli
    from simsearch.classdb import vector_store
    from simsearch.classifiers import prototypes, registry

    assert cli.CLASSIFIER_NAMES == tuple(prototypes.CLASSIFIERS)
    assert cli.ESTIMATOR_NAMES == registry.ESTIMATOR_NAMES
    assert cli.SEARCH_BACKENDS == vector_store.BACKENDS


def test_store_command_help_answers_before_torch_loads():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    probe = ("import runpy, sys; sys.argv = ['simsearch', 'store', '--help']\n"
             "try:\n    runpy.run_module('simsearch', run_name='__main__')\n"
             "except SystemExit:\n    print('torch loaded:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert "{build,add-class,update-class,remove-class,rename-class,classify,calibrate,info,import}" in result.stdout
    assert result.stdout.strip().endswith("torch loaded: False")


def test_unknown_device_is_one_clear_line(six_classes, lite0_weights, tmp_path):
    result = six_class_run(six_classes, lite0_weights, tmp_path / "out", "--device", "cuda:7")
    assert result.returncode == 1
    assert re.fullmatch(r"error: --device cuda:7: this machine has \d+ CUDA device\(s\)\. Use --device cpu or auto\.",
                        result.stderr.strip())


REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(pathlib.Path(sys.prefix).resolve() != (REPOSITORY / ".venv").resolve(),
                    reason="start.sh installs into the repository's .venv; run inside it (bash .ci/run does)")
def test_the_quick_start_sets_up_and_runs_the_main_job_on_the_bundled_digits(tmp_path):
    """The README's first command on a small share of the digits: inside ``bash .ci/run`` its installs find
    everything present, then the main job runs with the offline Lite0 weights."""
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", str(REPOSITORY / "start.sh"), "--download-per-class", "8", "--runs", "3", "--top-k", "2",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert re.search(r"^Accuracy: [0-9.]+ ± [0-9.]+ \(95% confidence, n=3\)$", completed.stdout, re.M)
    results = json.loads((out / "results.json").read_text())
    assert results["final_stats"]["num_labels"] == 10
    assert results["final_stats"]["dataset"] == str(tmp_path / "cache" / "digits-8-per-class")
    assert results["final_stats"]["accuracy"]["mean"] > 0.5  # ten digits from an ImageNet encoder, 6 per class
    written = {path.name for path in out.iterdir()}
    assert {"results.json", "runs.csv", "runs.jsonl", "class_accuracy.csv", "cumacc.png", "examples.png"} <= written


def test_python_m_simsearch_run_gives_the_scripts_results_from_another_folder(six_classes, lite0_weights, tmp_path):
    """The package's own entry to the research script, run where there is no checkout on the path but the package:
    the same final accuracy as the script file run directly on the same options."""
    from conftest import REPO_ROOT

    options = ["--dataset", str(six_classes), "--model", "tf_efficientnet_lite0", "--weights", str(lite0_weights),
               "--runs", "3", "--top-k", "2"]
    direct = run_script(*options, "--out", tmp_path / "direct", cwd=tmp_path)
    packaged = subprocess.run([sys.executable, "-m", "simsearch", "run", *options, "--out", str(tmp_path / "packaged")],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert direct.returncode == 0 and packaged.returncode == 0, packaged.stderr[-2000:]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("direct", "packaged")]
    assert results[0]["accuracies"] == results[1]["accuracies"] and len(results[1]["accuracies"]) == 3


def test_a_top_k_that_names_every_class_says_its_accuracy_is_one_by_construction(six_classes, lite0_weights,
                                                                                  tmp_path):
    completed = run_script("--dataset", six_classes, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights,
                           "--runs", 2, "--top-k", 6, "--out", tmp_path / "out", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    stdout = completed.stdout
    assert (f"Note: --top-k 6 names every class of {six_classes.name}, so the top-6 accuracy is 1 by construction."
            in stdout)
    assert re.search(r"^Top 6 accuracy: 1\.0000 ± 0\.0000", stdout, re.M)
