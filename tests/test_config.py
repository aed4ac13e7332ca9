"""Settings resolved once: loader workers and batch size chosen for the device, the protocols' settings record."""

from __future__ import annotations

import pytest

from simsearch import cli, config


@pytest.mark.parametrize(("device_type", "cpu_count", "expected"), [
    ("cuda", 16, (15, 256)),  # a worker per core but one keeps the GPU fed
    ("cuda", 64, (16, 256)),  # at most 16
    ("cuda", 1, (0, 256)),  # a single core decodes in the main process
    ("cpu", 16, (0, 32)),  # on a CPU the main process decodes fastest (docs/speed.md)
    ("mps", 8, (0, 32)),
])
def test_auto_loader_settings_fit_the_device(device_type, cpu_count, expected):
    loader = config.LoaderSettings.resolve(device_type=device_type, cpu_count=cpu_count)
    assert (loader.workers, loader.batch_size) == expected


def test_explicit_loader_settings_win_over_auto():
    loader = config.LoaderSettings.resolve(device_type="cuda", workers=2, batch_size=64, cpu_count=16)
    assert (loader.workers, loader.batch_size) == (2, 64)
    assert loader.describe() == "2 loader workers, batches of 64"


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "-1"], "argument --workers: must be auto or at least 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be auto or at least 1, got 0"),
    (["--batch-size", "many"], "argument --batch-size: must be auto or a whole number, got 'many'"),
])
def test_loader_options_take_auto_or_a_count(capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        cli.grid_main(["--datasets", "d", "--models", "m", *args])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_the_grid_gives_each_cell_the_run_settings_of_its_classifier():
    settings = config.GridSettings(runs=3, valid_share=0.3, top_k=2, seed=5, confidence=0.9)
    assert settings.run_settings("balanced") == config.RunSettings(
        runs=3, valid_share=0.3, top_k=2, seed=5, confidence=0.9, classifier="balanced")
