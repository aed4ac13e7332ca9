"""The model x dataset x classifier grid: identical partitions, paired differences, reuse on a rerun."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import topic_sentences

import banerjee
import engine
import store
import utils
from simsearch import cli, grid, protocol
from simsearch.classifiers import baselines, prototypes

SETTINGS = grid.GridSettings(runs=3, valid_share=0.3, top_k=2, seed=5)


@pytest.fixture(scope="module")
def sentences_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "topics.csv"
    pd.DataFrame(topic_sentences(per_class=12), columns=["label", "text"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def grid_run(image_folder, sentences_csv, lite0_weights, minilm_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    models = [grid.ModelSpec(name="tf_efficientnet_lite0", weights=str(lite0_weights)),
              grid.ModelSpec(name=str(minilm_folder), modality="text")]
    table = grid.run_grid(datasets=[image_folder, sentences_csv], models=models,
                          classifiers=["mean", "decorrelated"], out=folder / "out", cache_dir=folder / "cache",
                          settings=SETTINGS)
    return folder, models, table


def test_grid_has_one_row_per_matching_cell_with_paired_differences(grid_run, image_folder):
    folder, _, table = grid_run
    assert table[["dataset", "model", "classifier"]].values.tolist() == [
        [image_folder.name, "tf_efficientnet_lite0", "mean"],
        [image_folder.name, "tf_efficientnet_lite0", "decorrelated"],
        ["topics.csv", "all-MiniLM-L6-v2", "mean"],
        ["topics.csv", "all-MiniLM-L6-v2", "decorrelated"],
    ]
    assert table["embedding_dim"].tolist() == [1280, 1280, 384, 384]
    assert (table["samples_per_second"] > 0).all()
    cells = [json.loads(path.read_text()) for path in (folder / "out" / "cells").glob("*.json")
             if not path.name.startswith("encoding-")]
    assert len(cells) == 4
    by_cell = {(cell["dataset"], cell["classifier"]): np.asarray(cell["accuracies"]) for cell in cells}
    for dataset in (image_folder.name, "topics.csv"):
        rows = table[table.dataset == dataset].set_index("classifier")
        assert rows.loc["mean", "diff"] == 0.0 and rows.loc["mean", "diff_ci"] == 0.0
        difference = by_cell[(dataset, "decorrelated")] - by_cell[(dataset, "mean")]
        assert rows.loc["decorrelated", "diff"] == pytest.approx(difference.mean())
        assert rows.loc["decorrelated", "accuracy"] == pytest.approx(by_cell[(dataset, "decorrelated")].mean())
        for name in ("mean", "decorrelated"):
            balanced = [cell["balanced_accuracies"] for cell in cells if (cell["dataset"], cell["classifier"]) ==
                        (dataset, name)][0]
            assert rows.loc[name, "balanced_accuracy"] == pytest.approx(np.mean(balanced))
            log_losses = [cell["log_losses"] for cell in cells if (cell["dataset"], cell["classifier"]) ==
                          (dataset, name)][0]
            assert len(log_losses) == 3 and rows.loc[name, "log_loss"] == pytest.approx(np.mean(log_losses))
    written = pd.read_csv(folder / "out" / "grid.csv")
    assert written["accuracy"].tolist() == pytest.approx(table["accuracy"].tolist())
    markdown = (folder / "out" / "grid.md").read_text()
    header = ("| dataset | model | classifier | accuracy | balanced accuracy | top-2 | diff vs baseline | "
              "calibration error | log loss | samples/s | dim |")
    assert header in markdown
    assert markdown.count("\n| ") == 5


def test_every_cell_of_a_dataset_sees_the_partitions_of_the_research_protocol(grid_run, image_folder, lite0_model):
    folder, _, table = grid_run
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    encoder = engine.Encoder(model=lite0_model, device="cpu")
    direct = protocol.run_cached_protocol(
        encoder=encoder, maker=maker, transform=engine.eval_transform(lite0_model)[1], batch_size=16, workers=0,
        settings=SETTINGS.run_settings(prototypes.DecorrelatedClassifier()),
        cache=store.EmbeddingCache(folder / "cache"),
    )
    row = table[(table.dataset == image_folder.name) & (table.classifier == "decorrelated")].iloc[0]
    assert row["accuracy"] == pytest.approx(np.mean([run.accuracy for run in direct]))


def test_rerun_reads_every_cell_back_without_computing(grid_run, image_folder, sentences_csv, monkeypatch):
    folder, models, table = grid_run

    def refuse(**_kwargs):
        raise AssertionError("a finished cell was computed again")

    monkeypatch.setattr(protocol, "run_cached_protocol", refuse)
    again = grid.run_grid(datasets=[image_folder, sentences_csv], models=models, classifiers=["mean", "decorrelated"],
                          out=folder / "out", cache_dir=folder / "cache", settings=SETTINGS)
    pd.testing.assert_frame_equal(again, table)


def test_a_chosen_baseline_pairs_the_differences_with_it(grid_run, image_folder):
    folder, models, _ = grid_run
    table = grid.run_grid(datasets=[image_folder], models=models[:1], classifiers=["mean", "decorrelated"],
                          out=folder / "out", cache_dir=folder / "cache", settings=SETTINGS,
                          baseline=("tf_efficientnet_lite0", "decorrelated")).set_index("classifier")
    assert table.loc["decorrelated", "diff"] == 0.0
    assert table.loc["mean", "diff"] == pytest.approx(table.loc["mean", "accuracy"] - table.loc["decorrelated",
                                                                                                 "accuracy"])
    assert (table["baseline"] == "tf_efficientnet_lite0 + decorrelated").all()
    with pytest.raises(engine.ModelError, match="Baseline tf_efficientnet_lite0 with nope is not a cell"):
        grid.run_grid(datasets=[image_folder], models=models[:1], classifiers=["mean"], out=folder / "out",
                      cache_dir=folder / "cache", settings=SETTINGS, baseline=("tf_efficientnet_lite0", "nope"))


def test_a_baseline_classifier_is_a_cell_like_any_other(grid_run, image_folder, lite0_model):
    """``knn1`` (registry.ESTIMATOR_NAMES) runs on the partitions of the research protocol, as the class means do."""
    folder, models, _ = grid_run
    table = grid.run_grid(datasets=[image_folder], models=models[:1], classifiers=["mean", "knn1"],
                          out=folder / "baseline-out", cache_dir=folder / "cache", settings=SETTINGS)
    direct = protocol.run_cached_protocol(
        encoder=engine.Encoder(model=lite0_model, device="cpu"), maker=banerjee.DatasetMaker(dataset_path=image_folder),
        transform=engine.eval_transform(lite0_model)[1], batch_size=16, workers=0,
        settings=SETTINGS.run_settings(baselines.NearestNeighbourClassifier(k=1)),
        cache=store.EmbeddingCache(folder / "cache"),
    )
    row = table.set_index("classifier").loc["knn1"]
    assert row["accuracy"] == pytest.approx(np.mean([run.accuracy for run in direct]))
    assert row["diff"] == pytest.approx(row["accuracy"] - table.set_index("classifier").loc["mean", "accuracy"])
    assert cli.grid_parser().parse_args(["--datasets", "d", "--classifiers", "probe", "kmeans3"]).classifiers == [
        "probe", "kmeans3"]


def test_grid_errors_are_one_line(image_folder, tmp_path, capsys):
    status = cli.grid_main(["--datasets", str(image_folder), "--text-models", "some/model", "--out",
                            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert status == 1
    assert capsys.readouterr().err.strip() == f"error: No image model given for {image_folder}."
    with pytest.raises(SystemExit):
        cli.grid_main(["--datasets", str(image_folder)])
    assert "give at least one model" in capsys.readouterr().err
    with pytest.raises(engine.ModelError, match="a text model takes no weights file"):
        grid.parse_model_spec("folder=weights.pth", modality="text")
    twins = [grid.ModelSpec(name="tf_efficientnet_lite0", weights="a.pth"),
             grid.ModelSpec(name="tf_efficientnet_lite0", weights="b.pth")]
    with pytest.raises(engine.ModelError, match="The image models tf_efficientnet_lite0=a.pth, "
                                                "tf_efficientnet_lite0=b.pth would share the table label "
                                                "'tf_efficientnet_lite0'; run one grid per model"):
        grid.run_grid(datasets=[image_folder], models=twins, classifiers=["mean"], out=tmp_path / "out",
                      cache_dir=tmp_path / "cache", settings=SETTINGS)
    with pytest.raises(utils.UserError, match="The classifier mean is given more than once"):
        grid.run_grid(datasets=[image_folder], models=twins[:1], classifiers=["mean", "mean"],
                      out=tmp_path / "out", cache_dir=tmp_path / "cache", settings=SETTINGS)
    with pytest.raises(utils.UserError, match="is given more than once"):
        grid.run_grid(datasets=[image_folder, image_folder / ".." / image_folder.name], models=twins[:1],
                      classifiers=["mean"], out=tmp_path / "out", cache_dir=tmp_path / "cache", settings=SETTINGS)
    assert not (tmp_path / "out").exists()


def test_grid_cell_key_changes_with_every_shared_setting():
    keys = {grid._cell_key("k", "mean", SETTINGS)}
    for change in ({"runs": 4}, {"valid_share": 0.2}, {"top_k": 3}, {"seed": 6}):
        keys.add(grid._cell_key("k", "mean", grid.GridSettings(**{**SETTINGS.__dict__, **change})))
    keys.add(grid._cell_key("k", "decorrelated", SETTINGS))
    keys.add(grid._cell_key("other", "mean", SETTINGS))
    assert len(keys) == 7


def test_damaged_cell_is_computed_again_with_a_warning(grid_run, image_folder):
    folder, models, table = grid_run
    cells = sorted(path for path in (folder / "out" / "cells").glob("*.json") if not path.name.startswith("enc"))
    damaged = next(path for path in cells if json.loads(path.read_text())["dataset"] == image_folder.name)
    forged = {**json.loads(damaged.read_text()), "accuracies": [1.5, 0.2, 0.1]}
    damaged.write_text(json.dumps(forged))
    with pytest.warns(UserWarning, match=f"Grid cell {damaged} is damaged"):
        again = grid.run_grid(datasets=[image_folder], models=models[:1], classifiers=["mean", "decorrelated"],
                              out=folder / "out", cache_dir=folder / "cache", settings=SETTINGS)
    expected = table[table.dataset == image_folder.name].reset_index(drop=True)
    assert again["accuracy"].tolist() == pytest.approx(expected["accuracy"].tolist())
    assert json.loads(damaged.read_text())["accuracies"] != forged["accuracies"]


@pytest.mark.parametrize(("device", "fits_on"), [("cpu", None), ("cuda:0", "cuda:0"), ("mps", None)])
def test_the_grid_fits_its_classifiers_where_its_encoder_runs(device, fits_on):
    """The grid once handed classifier names to the protocols, so their fits ran on the CPU whatever --device said;
    now each cell's classifier is made on the grid's device by the one function the script uses."""
    settings = grid._run_settings("decorrelated", settings=grid.GridSettings(device=device))
    assert isinstance(settings.classifier, prototypes.DecorrelatedClassifier)
    assert settings.classifier.device == fits_on
    assert grid._run_settings("mean", settings=grid.GridSettings(device=device)).classifier.get_params() == {
        "normalize": False}  # the class mean has no device: it stays in NumPy


def test_a_second_grid_into_the_same_folder_keeps_the_first_ones_table(grid_run, image_folder, capsys):
    folder, models, _ = grid_run
    out = folder / "kept"

    def grid_of(classifiers: list[str]) -> pd.DataFrame:
        return grid.run_grid(datasets=[image_folder], models=models[:1], classifiers=classifiers, out=out,
                             cache_dir=folder / "cache", settings=SETTINGS)

    first = grid_of(["mean", "decorrelated"])
    grid_of(["mean", "decorrelated"])  # the same grid again: nothing to keep aside
    assert not list(out.glob("replaced-*")) and "was moved" not in capsys.readouterr().out
    grid_of(["mean"])
    (aside,) = out.glob("replaced-*")
    assert f"held the table of an earlier grid (2 cells); it was moved to {aside}" in capsys.readouterr().out
    kept = pd.read_csv(aside / "grid.csv")
    assert kept["classifier"].tolist() == first["classifier"].tolist() == ["mean", "decorrelated"]
    assert pd.read_csv(out / "grid.csv")["classifier"].tolist() == ["mean"]
    assert (aside / "grid.md").read_text(encoding="utf-8").count("| decorrelated |") == 1


def test_the_grid_reads_a_sentence_file_with_its_own_column_names(minilm_folder, tmp_path, capsys):
    rows = topic_sentences(per_class=10)
    path = tmp_path / "questions.csv"
    pd.DataFrame([(text, label) for label, text in rows], columns=["question", "coarse"]).to_csv(path, index=False)
    status = cli.grid_main(["--datasets", str(path), "--text-models", str(minilm_folder), "--classifiers", "mean",
                            "--text-column", "question", "--label-column", "coarse", "--runs", "2", "--out",
                            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert status == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "out" / "grid.csv")
    assert table["classes"].tolist() == [len({label for label, _ in rows})] and table["samples"].tolist() == [len(rows)]
