"""Class vector store: exact running means, independent classes, persistence, search backends, command line."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_class_folders

import engine
import store
from simsearch import cli
from simsearch.classdb import files, vector_store
from simsearch.classdb.vector_store import ClassDBError, ClassVectorStore, ModelMismatchError
from simsearch.classifiers import prototypes

DIM = 16
TOY = {"model_name": "toy", "model_id": "toy+sha256:000000000000", "transform_config": {"input_size": (3, 8, 8)}}


def toy_store() -> ClassVectorStore:
    return ClassVectorStore(dim=DIM, **TOY)


def random_vectors(count: int, *, seed: int, dim: int = DIM) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


def filled_store() -> ClassVectorStore:
    db = toy_store()
    for seed, label in enumerate(["cat", "dog", "emu", "owl"]):
        db.add_class(label=label, embeddings=random_vectors(5 + seed, seed=seed))
    return db


def assert_same_store(left: ClassVectorStore, right: ClassVectorStore) -> None:
    assert left.labels == right.labels
    assert vector_store.store_metadata(left) == vector_store.store_metadata(right)
    assert torch.equal(left.counts, right.counts)
    assert torch.equal(left.sums, right.sums)


def zip_members(path: pathlib.Path) -> dict[str, bytes]:
    """Member contents by kind (the CSV member is named after the file, so names differ between copies)."""
    with zipfile.ZipFile(path) as archive:
        return {pathlib.Path(name).suffix: archive.read(name) for name in archive.namelist()}


# --- running means and class independence -------------------------------------------------------------------------


def test_two_batch_update_equals_one_shot_build():
    images = random_vectors(11, seed=7)
    one_shot, two_batches = filled_store(), filled_store()
    one_shot.add_class(label="fox", embeddings=images)
    two_batches.add_class(label="fox", embeddings=images[:4])
    two_batches.update_class(label="fox", embeddings=images[4:])
    row = one_shot.index("fox")
    assert int(two_batches.counts[row]) == 11
    torch.testing.assert_close(two_batches.sums, one_shot.sums, rtol=0, atol=1e-12)
    torch.testing.assert_close(two_batches.means, one_shot.means, rtol=0, atol=1e-7)
    torch.testing.assert_close(one_shot.means[row], images.double().mean(dim=0).float(), rtol=0, atol=1e-7)


def test_remove_and_readd_gives_identical_store_and_files(tmp_path):
    original = filled_store()
    edited = filled_store()
    edited.remove_class(label="dog")
    assert "dog" not in edited and len(edited) == 3
    edited.add_class(label="dog", embeddings=random_vectors(6, seed=1))
    assert_same_store(edited, original)
    for name in ("a.zip", "b.zip"):
        (original if name == "a.zip" else edited).save(path=tmp_path / name)
    assert zip_members(tmp_path / "a.zip") == zip_members(tmp_path / "b.zip")


def test_add_update_remove_leave_other_classes_bit_identical():
    db = filled_store()
    before = {label: (db.sums[db.index(label)], int(db.counts[db.index(label)])) for label in ("cat", "emu", "owl")}
    db.add_class(label="bee", embeddings=random_vectors(3, seed=9))
    db.update_class(label="dog", embeddings=random_vectors(2, seed=10))
    db.remove_class(label="bee")
    for label, (sums, count) in before.items():
        assert torch.equal(db.sums[db.index(label)], sums)
        assert int(db.counts[db.index(label)]) == count


def test_rename_class_keeps_vector_and_order():
    db = filled_store()
    vector = db.means[db.index("dog")]
    db.rename_class(label="dog", new_label="zebra")
    assert db.labels == ["cat", "emu", "owl", "zebra"]
    assert torch.equal(db.means[db.index("zebra")], vector)
    with pytest.raises(ClassDBError, match="already in the store"):
        db.rename_class(label="cat", new_label="owl")


def test_edit_errors_name_the_class_and_the_fix():
    db = filled_store()
    with pytest.raises(ClassDBError, match="update_class"):
        db.add_class(label="cat", embeddings=random_vectors(2, seed=0))
    with pytest.raises(ClassDBError, match="Did you mean 'dog'"):
        db.update_class(label="dgo", embeddings=random_vectors(2, seed=0))
    with pytest.raises(ClassDBError, match="non-empty"):
        db.add_class(label=" ", embeddings=random_vectors(2, seed=0))
    with pytest.raises(ClassDBError, match="no classes yet"):
        toy_store().search(queries=random_vectors(1, seed=0))


def test_wrong_dimension_or_model_is_refused():
    db = filled_store()
    with pytest.raises(ClassDBError, match=rf"shape \[n >= 1, {DIM}\].*got \[3, 8\]"):
        db.add_class(label="fox", embeddings=random_vectors(3, seed=0, dim=8))
    with pytest.raises(ClassDBError, match="got \\[2, 8\\]"):
        db.search(queries=random_vectors(2, seed=0, dim=8))
    with pytest.raises(
        ModelMismatchError,
        match=re.escape("The store was built with model 'toy+sha256:000000000000', not with 'other'"),
    ):
        db.update_class(label="cat", embeddings=random_vectors(3, seed=0), model_id="other")
    with pytest.raises(ModelMismatchError, match="preprocessing"):
        db.check_model(model_id=TOY["model_id"], transform_config={"input_size": (3, 9, 9)})
    db.check_model(model_id=TOY["model_id"], transform_config={"input_size": [3, 8, 8]})
    assert db.labels == ["cat", "dog", "emu", "owl"]


# --- search ---------------------------------------------------------------------------------------------------------


def test_search_returns_labels_and_cosine_scores():
    db = filled_store()
    result = db.search(queries=db.means[[2, 0]] * 3.0, top_k=10)
    assert [row[0] for row in result.labels] == ["emu", "cat"]
    assert result.scores.shape == (2, 4)
    torch.testing.assert_close(result.scores[:, 0], torch.ones(2))
    expected = torch.nn.functional.cosine_similarity(db.means[2], db.means[3], dim=0)
    assert float(result.scores[0, result.labels[0].index("owl")]) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("num_classes", [3, 2000])
def test_backends_agree_on_top1(num_classes):
    pytest.importorskip("faiss")
    corpus = random_vectors(num_classes, seed=3, dim=64)
    picks = torch.randint(num_classes, (300,), generator=torch.Generator().manual_seed(4))
    queries = corpus[picks] + 0.5 * random_vectors(300, seed=5, dim=64)
    weights, bias = corpus, torch.linspace(-0.1, 0.1, num_classes)  # a bias, as the decorrelated classifier has
    exact = vector_store.make_backend(name="torch", weights=weights, bias=bias, device="cpu").search(
        queries=queries, top_k=5
    )
    approx = vector_store.make_backend(name="faiss", weights=weights, bias=bias).search(queries=queries, top_k=5)
    assert torch.equal(exact[1][:, 0], approx[1][:, 0])
    torch.testing.assert_close(exact[0], approx[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(exact[0][:, 0], (queries @ corpus.T + bias).max(dim=1).values, rtol=0, atol=1e-4)
    assert (exact[1][:, 0] == picks).float().mean() > 0.9


def test_faiss_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ClassDBError, match="pip install faiss-cpu"):
        filled_store().search(queries=random_vectors(1, seed=0), backend="faiss")


# --- persistence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zip", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
    db = filled_store()
    path = db.save(path=tmp_path / f"classes{suffix}")
    loaded = ClassVectorStore.load(path=path, model_id=TOY["model_id"], transform_config=TOY["transform_config"])
    assert loaded.labels == db.labels and torch.equal(loaded.counts, db.counts)
    assert vector_store.store_metadata(loaded) == vector_store.store_metadata(db)
    assert torch.equal(loaded.means, db.means)
    if suffix == ".npz":
        assert torch.equal(loaded.sums, db.sums)
    resaved = loaded.save(path=tmp_path / f"again{suffix}")
    assert torch.equal(ClassVectorStore.load(path=resaved).sums, loaded.sums)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"classes{suffix}", f"again{suffix}"])


@pytest.mark.parametrize("suffix", [".zip", ".npz"])
def test_a_store_without_classes_saves_and_loads(tmp_path, suffix):
    path = toy_store().save(path=tmp_path / f"empty{suffix}")
    loaded = ClassVectorStore.load(path=path)
    assert len(loaded) == 0 and loaded.dim == DIM
    assert vector_store.store_metadata(loaded) == vector_store.store_metadata(toy_store())


def test_zip_is_readable_by_store_load_embeddings(tmp_path):
    db = filled_store()
    db.save(path=tmp_path / "classes.zip")
    targets, embeddings = store.load_embeddings(filename=tmp_path / "classes.zip")
    assert targets.tolist() == db.labels
    assert np.array_equal(embeddings, db.means.numpy())
    metadata = json.loads(zip_members(tmp_path / "classes.zip")[".json"])
    assert metadata["counts"] == [5, 6, 7, 8] and metadata["model_id"] == TOY["model_id"]


def test_loading_another_models_file_is_refused(tmp_path):
    path = filled_store().save(path=tmp_path / "classes.npz")
    with pytest.raises(
        ModelMismatchError,
        match=re.escape(f"classes.npz was built with model '{TOY['model_id']}', not with 'timm/other'"),
    ):
        ClassVectorStore.load(path=path, model_id="timm/other")


def test_plain_save_embeddings_file_is_imported_not_loaded(tmp_path):
    vectors = random_vectors(3, seed=0)
    plain = store.save_embeddings(embeddings=vectors.numpy(), targets=["b", "a", "b"], filename=tmp_path / "plain")
    with pytest.raises(ClassDBError, match="import"):
        ClassVectorStore.load(path=plain)
    with pytest.warns(UserWarning, match="records no image counts"):
        imported = vector_store.import_embeddings(path=plain, **TOY)
    assert imported.labels == ["a", "b"] and imported.counts.tolist() == [1, 2]
    torch.testing.assert_close(imported.means[1], (vectors[0] + vectors[2]) / 2)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    db = filled_store()
    for suffix in (".zip", ".npz"):
        path = db.save(path=tmp_path / f"classes{suffix}")
        before = path.read_bytes()
        db.add_class(label=f"new{suffix}", embeddings=random_vectors(2, seed=0))
        monkeypatch.setattr(files.json, "dumps", lambda *args, **kwargs: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            db.save(path=path)
        monkeypatch.undo()
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.npz", "classes.zip"]
    with pytest.raises(ClassDBError, match=r"\.zip .* or a \.npz"):
        db.save(path=tmp_path / "classes.csv")


def test_damaged_files_are_reported(tmp_path):
    path = filled_store().save(path=tmp_path / "classes.npz")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ClassDBError, match="Is the file complete"):
        ClassVectorStore.load(path=path)
    with pytest.raises(FileNotFoundError, match="python -m simsearch store build"):
        ClassVectorStore.load(path=tmp_path / "missing.zip")


def test_edited_stores_are_refused_by_their_checksum(tmp_path):
    path = filled_store().save(path=tmp_path / "classes.npz")
    with np.load(path) as arrays:
        edited = {name: arrays[name] for name in arrays.files}
    edited["class_counts"] = edited["class_counts"] * 1000  # consistent, plausible, and wrong
    np.savez_compressed(path, **edited)
    with pytest.raises(ClassDBError, match="does not match the checksum written with it; the file was edited"):
        ClassVectorStore.load(path=path)
    zipped = filled_store().save(path=tmp_path / "classes.zip")
    with zipfile.ZipFile(zipped) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    metadata = json.loads(members[vector_store.METADATA_MEMBER])
    metadata["counts"][0] = 8000
    members[vector_store.METADATA_MEMBER] = json.dumps(metadata).encode()
    with zipfile.ZipFile(zipped, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ClassDBError, match="does not match the checksum"):
        ClassVectorStore.load(path=zipped)


def test_npz_store_with_a_few_corrupted_bytes_is_one_clear_error(tmp_path):
    path = filled_store().save(path=tmp_path / "classes.npz")
    original = path.read_bytes()
    with zipfile.ZipFile(path) as archive:  # a member's local header repeats fields its readers take elsewhere
        headers = [(member.header_offset, member.header_offset + 30 + len(member.filename))
                   for member in archive.infolist()]
    for offset in range(60, len(original) - 200, max(1, (len(original) - 260) // 12)):
        if any(start - 4 < offset < end for start, end in headers):
            continue
        damaged = bytearray(original)
        damaged[offset : offset + 4] = bytes(255 - value for value in damaged[offset : offset + 4])
        path.write_bytes(bytes(damaged))
        with pytest.raises(ClassDBError, match=f"{re.escape(str(path))}"):
            ClassVectorStore.load(path=path)


# --- real images (EfficientNet-Lite0) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shape_embeddings(image_folder, lite0_model):
    """Embeddings of the 4 x 10 shape images (one batch per class)."""
    import engine

    paths = sorted(image_folder.glob("*/*.jpg"))
    _, transform = engine.eval_transform(lite0_model)
    encoder = engine.Encoder(model=lite0_model, device="cpu")
    embeddings = encoder.embed_images(images=paths, transform=transform, batch_size=10)
    return embeddings, [path.parent.name for path in paths], [int(path.stem[-3:]) for path in paths]


def lite0_store(model) -> ClassVectorStore:
    import engine

    data_config, _ = engine.eval_transform(model)
    return ClassVectorStore(
        dim=model.num_features,
        model_name="tf_efficientnet_lite0",
        model_id=engine.model_id(model),
        transform_config=data_config,
    )


def test_unrelated_class_does_not_change_accuracy_on_the_others(shape_embeddings, lite0_model):
    embeddings, labels, numbers = shape_embeddings
    train = [i for i, number in enumerate(numbers) if number < 5]
    unrelated = "yellow stripes"
    known = [i for i, number in enumerate(numbers) if number >= 5 and labels[i] != unrelated]
    db = lite0_store(lite0_model)
    db.add_classes(
        embeddings=embeddings[[i for i in train if labels[i] != unrelated]],
        labels=[labels[i] for i in train if labels[i] != unrelated],
    )

    def accuracy() -> tuple[float, list[str]]:
        predicted = [row[0] for row in db.search(queries=embeddings[known], top_k=1, device="cpu").labels]
        return float(np.mean([p == labels[i] for p, i in zip(predicted, known)])), predicted

    baseline = accuracy()
    assert baseline[0] == 1.0
    db.add_class(label=unrelated, embeddings=embeddings[[i for i in train if labels[i] == unrelated]])
    assert accuracy() == baseline
    db.remove_class(label="red circle")
    known = [i for i in known if labels[i] != "red circle"]
    assert accuracy() == (1.0, [labels[i] for i in known])
    for backend in vector_store.BACKENDS:
        result = db.search(queries=embeddings, top_k=2, backend=backend, device="cpu")
        assert [row[0] for row in result.labels] == [row[0] for row in db.search(queries=embeddings, top_k=2).labels]


def test_two_batch_update_with_image_embeddings(shape_embeddings, lite0_model):
    embeddings, labels, _ = shape_embeddings
    blue = embeddings[[i for i, label in enumerate(labels) if label == "blue triangle"]]
    one_shot, two_batches = lite0_store(lite0_model), lite0_store(lite0_model)
    one_shot.add_class(label="blue triangle", embeddings=blue)
    two_batches.add_class(label="blue triangle", embeddings=blue[:3])
    two_batches.update_class(label="blue triangle", embeddings=blue[3:])
    torch.testing.assert_close(two_batches.means, one_shot.means, rtol=0, atol=1e-7)
    assert two_batches.counts.tolist() == [10]


# --- decorrelated stores --------------------------------------------------------------------------------------------


def decorrelated_store() -> ClassVectorStore:
    db = ClassVectorStore(dim=DIM, **TOY, classifier=prototypes.DecorrelatedClassifier())
    db.add_classes(embeddings=random_vectors(40, seed=20), labels=[f"class {i % 4}" for i in range(40)])
    return db


def test_decorrelated_store_round_trips_every_statistic_through_npz_and_refuses_zip(tmp_path):
    db = decorrelated_store()
    db.add_class(label="extra", embeddings=random_vectors(6, seed=21))
    path = db.save(path=tmp_path / "decorrelated.npz")
    loaded = ClassVectorStore.load(path=path)
    assert isinstance(loaded.classifier, prototypes.DecorrelatedClassifier)
    assert vector_store.store_metadata(loaded) == vector_store.store_metadata(db)
    assert vector_store.store_metadata(loaded)["classifier"]["name"] == "decorrelated"
    for name, value in db.classifier.get_statistics().items():
        assert np.array_equal(loaded.classifier.get_statistics()[name], value), name
    queries = random_vectors(7, seed=22)
    assert loaded.search(queries=queries).labels == db.search(queries=queries).labels
    torch.testing.assert_close(loaded.search(queries=queries).scores, db.search(queries=queries).scores)
    with pytest.raises(ClassDBError, match=r"cannot hold: save it as .*decorrelated\.npz"):
        db.save(path=tmp_path / "decorrelated.zip")


def test_decorrelated_store_scores_are_the_classifiers_on_both_backends():
    pytest.importorskip("faiss")
    db = decorrelated_store()
    queries = random_vectors(9, seed=23)
    expected = db.classifier.class_scores(queries.double().numpy())
    for backend in vector_store.BACKENDS:
        result = db.search(queries=queries, top_k=2, backend=backend, device="cpu")
        assert [row[0] for row in result.labels] == [db.labels[i] for i in expected.argmax(axis=1)]
        np.testing.assert_allclose(result.scores[:, 0].numpy(), expected.max(axis=1), atol=1e-4)


def test_a_class_added_to_a_balanced_store_with_one_image_is_found(tmp_path):
    # Four classes of 60 images in correlated noise, then a fifth from one image: its queries must find it.
    rng = np.random.default_rng(30)
    mixing = rng.standard_normal((DIM, DIM)) * 0.3
    centres = rng.standard_normal((5, DIM)) + 6.0

    def draw(label: int, count: int) -> torch.Tensor:
        return torch.from_numpy(centres[label] + rng.standard_normal((count, DIM)) @ mixing).float()
    for name in ("balanced", "decorrelated"):
        db = ClassVectorStore(dim=DIM, **TOY, classifier=prototypes.make_classifier(name))
        db.add_classes(embeddings=torch.cat([draw(label, 60) for label in range(4)]),
                       labels=[f"old {label}" for label in range(4) for _ in range(60)])
        db.add_class(label="new", embeddings=draw(4, 1))
        found = [row[0] for row in db.search(queries=draw(4, 20), top_k=1).labels]
        if name == "balanced":
            assert found.count("new") >= 19
            loaded = ClassVectorStore.load(path=db.save(path=tmp_path / "balanced.npz"))
            assert loaded.classifier_name == "balanced" and loaded.classifier.prior == "balanced"
        else:
            assert found.count("new") <= 2  # the empirical prior of one image in 241 buries it


def test_decorrelated_store_edits_leave_other_classes_alone():
    db = decorrelated_store()
    before = db.sums[[0, 2, 3]].clone()
    db.remove_class(label="class 1")
    db.rename_class(label="class 3", new_label="a new name")
    assert db.labels == ["a new name", "class 0", "class 2"]
    assert torch.equal(db.sums, before[[2, 0, 1]])
    assert db.classifier.n_samples_seen_ == 40  # the removed class stays in the shared Gram matrix as background


def test_version_1_npz_store_still_loads(tmp_path):
    db = filled_store()
    metadata = {**vector_store.store_metadata(db), "version": 1}
    del metadata["classifier"]
    path = tmp_path / "old.npz"
    with path.open("wb") as stream:
        np.savez_compressed(stream, metadata=np.array(json.dumps(metadata)), labels=np.array(db.labels),
                            sums=db.sums.numpy(), counts=db.counts.numpy())
    loaded = ClassVectorStore.load(path=path)
    assert loaded.labels == db.labels and torch.equal(loaded.sums, db.sums) and loaded.classifier_name == "mean"


# --- command line ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, lite0_weights):
    """A 3-class x 3-image dataset and the store `build` makes from it (9 encodings).

    Batches of 3 hold exactly one class, so re-encoding a class folder reproduces its embeddings bit for bit (on the
    CPU, float32 results move by ~1e-6 with the batch size).
    """
    root = tmp_path_factory.mktemp("cli")
    dataset = make_class_folders(
        root / "dataset", classes=["red circle", "green square", "cyan ring"], images_per_class=3, seed=5
    )
    model_args = ["--model", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "--batch-size", "3", "--cpu"]
    built = root / "built.zip"
    assert cli.class_store_main(["build", "--dataset", str(dataset), "--out", str(built), *model_args]) == 0
    return dataset, built, model_args


def test_cli_build_writes_a_store_of_the_dataset(cli_setup, capsys):
    _, built, _ = cli_setup
    db = ClassVectorStore.load(path=built)
    assert db.labels == ["cyan ring", "green square", "red circle"]
    assert db.counts.tolist() == [3, 3, 3] and db.identity.model_name == "tf_efficientnet_lite0"
    assert db.identity.model_id.startswith("tf_efficientnet_lite0+sha256:")
    assert cli.class_store_main(["info", "--store", str(built)]) == 0
    assert "3 classes, 9 images" in capsys.readouterr().out


def test_cli_remove_then_readd_restores_the_identical_file(cli_setup, tmp_path, capsys):
    dataset, built, model_args = cli_setup
    path = tmp_path / "edited.zip"
    shutil.copy(built, path)
    assert cli.class_store_main(["remove-class", "--store", str(path), "red circle"]) == 0
    assert ClassVectorStore.load(path=path).labels == ["cyan ring", "green square"]
    add_red_circle = [
        "add-class", "--store", str(path), "--images", str(dataset / "red circle"), "--label", "red circle",
        *model_args,
    ]
    assert cli.class_store_main(add_red_circle) == 0
    assert zip_members(path) == zip_members(built)
    assert cli.class_store_main(add_red_circle) == 1
    assert "update-class" in capsys.readouterr().err


def test_cli_update_in_two_batches_equals_build(cli_setup, tmp_path):
    dataset, built, model_args = cli_setup
    path = tmp_path / "edited.npz"
    ClassVectorStore.load(path=built).save(path=path)
    images = sorted((dataset / "green square").iterdir())
    assert cli.class_store_main(["remove-class", "--store", str(path), "green square"]) == 0
    assert (
        cli.class_store_main(
            ["add-class", "--store", str(path), "--images", str(images[0]), "--label", "green square", *model_args]
        )
        == 0
    )
    (tmp_path / "more").mkdir()
    for image in images[1:]:
        shutil.copy(image, tmp_path / "more" / image.name)
    assert (
        cli.class_store_main(
            [
                "update-class",
                "--store",
                str(path),
                "--images",
                str(tmp_path / "more"),
                "--label",
                "green square",
                *model_args,
            ]
        )
        == 0
    )
    edited, reference = ClassVectorStore.load(path=path), ClassVectorStore.load(path=built)
    assert edited.counts.tolist() == [3, 3, 3]
    assert torch.equal(edited.means[[0, 2]], reference.means[[0, 2]])
    torch.testing.assert_close(edited.means[1], reference.means[1], rtol=0, atol=1e-5)  # batches of 1 + 2, not 3


def test_cli_classify_prints_and_writes_csv(cli_setup, tmp_path, capsys):
    dataset, built, model_args = cli_setup
    csv_path = tmp_path / "predictions.csv"
    status = cli.class_store_main(
        [
            "classify",
            "--store",
            str(built),
            str(dataset / "cyan ring"),
            "--top-k",
            "2",
            "--csv",
            str(csv_path),
            *model_args,
        ]
    )
    assert status == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("img_")]
    assert [line.split("\t")[:2] for line in lines] == [[f"img_00{i}.jpg", "cyan ring"] for i in range(3)]
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    assert rows[0] == ["image", "label_1", "score_1", "probability_1", "label_2", "score_2", "probability_2"]
    assert len(rows) == 4 and all(row[1] == "cyan ring" and float(row[2]) > float(row[5]) for row in rows[1:])
    # each label's probability, printed and written, ranks as its score and is the store's predict_proba
    assert all(1.0 >= float(row[3]) > float(row[6]) > 0.0 for row in rows[1:])
    printed = [re.findall(r"\(p (\d\.\d{3})\)", line) for line in lines]
    assert printed == [[f"{float(row[3]):.3f}", f"{float(row[6]):.3f}"] for row in rows[1:]]


def test_cli_builds_a_decorrelated_store(cli_setup, tmp_path, capsys):
    dataset, built, model_args = cli_setup
    assert cli.class_store_main(["build", "--dataset", str(dataset), "--out", str(tmp_path / "d.zip"),
                                 "--classifier", "decorrelated", *model_args]) == 1
    assert "needs the .npz format: use --out" in capsys.readouterr().err
    path = tmp_path / "d.npz"
    assert cli.class_store_main(["build", "--dataset", str(dataset), "--out", str(path), "--classifier", "decorrelated",
                                 *model_args]) == 0
    db = ClassVectorStore.load(path=path)
    assert db.classifier_name == "decorrelated" and db.counts.tolist() == [3, 3, 3]
    assert torch.equal(db.counts, ClassVectorStore.load(path=built).counts)
    assert cli.class_store_main(
        ["build", "--dataset", str(dataset), "--out", str(tmp_path / "default.npz"), *model_args]) == 0
    assert "balanced classifier" in capsys.readouterr().out
    assert ClassVectorStore.load(path=tmp_path / "default.npz").classifier_name == "balanced"
    assert cli.class_store_main(["classify", "--store", str(path), str(dataset / "red circle"), *model_args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("img_")]
    assert [line.split("\t")[1] for line in lines] == ["red circle"] * 3


def test_cli_refuses_a_store_of_another_model(cli_setup, tmp_path, capsys):
    dataset, _, model_args = cli_setup
    other = ClassVectorStore(dim=1280, model_name="tf_efficientnet_lite0", model_id="timm/tf_efficientnet_lite0.in1k")
    other.add_class(label="x", embeddings=torch.ones(1, 1280))
    path = other.save(path=tmp_path / "other.zip")
    assert cli.class_store_main(["classify", "--store", str(path), str(dataset), *model_args]) == 1
    error = capsys.readouterr().err
    assert "timm/tf_efficientnet_lite0.in1k" in error and "tf_efficientnet_lite0+sha256:" in error
    assert "[Embed" not in error


def test_cli_imports_a_plain_embeddings_file(cli_setup, tmp_path, capsys):
    _, built, model_args = cli_setup
    targets, means = store.load_embeddings(filename=built)
    plain = store.save_embeddings(embeddings=means, targets=targets, filename=tmp_path / "plain")
    path = tmp_path / "imported.npz"
    assert cli.class_store_main(["import", "--embeddings", str(plain), "--store", str(path), *model_args]) == 0
    warned = capsys.readouterr().err.splitlines()  # one line, not a UserWarning with its source line
    assert [line for line in warned if "no image counts" in line] == [
        f"warning: {plain} records no image counts: each of its 3 rows counts as one image, so later update-class "
        "calls weigh an imported class mean as a single image."]
    imported = ClassVectorStore.load(path=path, model_id=ClassVectorStore.load(path=built).identity.model_id)
    assert imported.counts.tolist() == [1, 1, 1] and torch.equal(imported.means, torch.from_numpy(means))
    assert cli.class_store_main(["import", "--embeddings", str(plain), "--store", str(path), *model_args]) == 1
    assert "already exists: pass --force" in capsys.readouterr().err
    assert cli.class_store_main(["remove-class", "--store", str(path), "no such class"]) == 1
    assert "No class 'no such class'" in capsys.readouterr().err


def test_cli_asks_for_the_local_weights_file_a_store_was_built_with(cli_setup, capsys):
    dataset, built, _ = cli_setup
    assert cli.class_store_main(["classify", "--store", str(built), str(dataset)]) == 1
    error = capsys.readouterr().err
    assert "built from a local weights file (tf_efficientnet_lite0+sha256:" in error and "--weights" in error


@pytest.mark.parametrize("suffix", [".zip", ".npz"])
def test_any_folder_name_label_round_trips(tmp_path, suffix):
    db = toy_store()
    labels = ["carriage\rreturn", "new\nline", 'quote " and, comma', "=SUM(A1)", "ünïcode class"]
    db.add_classes(embeddings=random_vectors(len(labels), seed=40), labels=labels)
    loaded = ClassVectorStore.load(path=db.save(path=tmp_path / f"labels{suffix}"))
    assert loaded.labels == sorted(labels) and torch.equal(loaded.means, db.means)


# --- unknown queries ----------------------------------------------------------------------------------------------


def separable_draws(seed: int):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((DIM, DIM)) * 0.3
    centres = rng.standard_normal((4, DIM)) + 6.0

    def draw(label: int, count: int) -> torch.Tensor:
        return torch.from_numpy(centres[label] + rng.standard_normal((count, DIM)) @ mixing).float()

    return draw


@pytest.mark.parametrize(("name", "suffix"), [("balanced", "npz"), ("mean", "zip"), ("lda", "npz")])
def test_calibrated_store_marks_unknown_queries_and_keeps_its_threshold(tmp_path, name, suffix):
    draw = separable_draws(seed=40)
    db = ClassVectorStore(dim=DIM, **TOY, classifier=prototypes.make_classifier(name))
    db.add_classes(embeddings=torch.cat([draw(label, 40) for label in range(4)]),
                   labels=[f"class {label}" for label in range(4) for _ in range(40)])
    with pytest.raises(ClassDBError, match="no threshold for unknown queries: calibrate it"):
        db.search(queries=draw(0, 1), reject=True)
    db.calibrate(embeddings=torch.cat([draw(label, 20) for label in range(4)]))
    known = db.search(queries=torch.cat([draw(label, 25) for label in range(4)]), reject=True)
    assert np.mean(known.known) >= 0.85
    far = -draw(0, 5)  # pointing away from every class
    rejected = db.search(queries=far, reject=True)
    assert rejected.known == [False] * 5 and len(rejected.labels) == 5  # the nearest classes are still given
    loaded = ClassVectorStore.load(path=db.save(path=tmp_path / f"store.{suffix}"))
    assert (loaded.threshold, loaded.threshold_stale) == (db.threshold, False)
    assert vector_store.store_metadata(loaded)["classifier"]["name"] == name
    for key, value in db.classifier.get_statistics().items():  # lda's choice of scorer included
        if suffix == "npz":  # a .zip keeps the article's class vectors in float32
            assert np.array_equal(loaded.classifier.get_statistics()[key], value), key
    assert loaded.search(queries=far, reject=True).known == [False] * 5
    loaded.add_class(label="class 9", embeddings=draw(3, 2) + 2.0)
    assert loaded.threshold_stale
    reloaded = ClassVectorStore.load(path=loaded.save(path=tmp_path / f"stale.{suffix}"))
    assert reloaded.threshold_stale and reloaded.threshold == db.threshold


def test_cli_build_calibrates_and_classify_prints_unknown(cli_setup, tmp_path, capsys):
    dataset, _, model_args = cli_setup
    known_only = tmp_path / "known"
    for label in ("red circle", "green square"):
        shutil.copytree(dataset / label, known_only / label)
    path = tmp_path / "shapes.npz"
    assert cli.class_store_main(["build", "--dataset", str(known_only), "--out", str(path), "--calibrate-share", "0.34",
                                 "--true-positive-rate", "0.5", *model_args]) == 0
    db = ClassVectorStore.load(path=path)
    assert db.threshold is not None and not db.threshold_stale and db.counts.tolist() == [3, 3]
    capsys.readouterr()
    assert cli.class_store_main(["info", "--store", str(path)]) == 0
    assert f"threshold: unknown below {db.threshold:.4f}, keeping 50% of known samples" in capsys.readouterr().out
    csv_path = tmp_path / "predictions.csv"
    assert cli.class_store_main(["classify", "--store", str(path), str(dataset / "cyan ring"), "--csv", str(csv_path),
                                 *model_args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("img_")]
    unknown = [line for line in lines if line.split("\t")[1] == "unknown"]
    shape = r"img_\d+\.jpg\tunknown\t-?[\d.]+ < -?[\d.]+\t\[nearest: .+ [\d.-]+ \(p [\d.]+\)\]"
    assert unknown and all(re.fullmatch(shape, line) for line in unknown)
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    assert rows[0][-2:] == ["known", "unknown_score"] and len(rows) == 4
    assert cli.class_store_main(["classify", "--store", str(path), str(dataset / "cyan ring"), "--no-reject",
                                 *model_args]) == 0
    assert "unknown" not in capsys.readouterr().out
    assert cli.class_store_main(["add-class", "--store", str(path), "--images", str(dataset / "cyan ring"),
                                 "--label", "cyan ring", *model_args]) == 0
    assert "was set before its classes last changed" in capsys.readouterr().err
    assert cli.class_store_main(["calibrate", "--store", str(path), "--dataset", str(dataset), *model_args]) == 0
    assert "Calibrated" in capsys.readouterr().out and not ClassVectorStore.load(path=path).threshold_stale
    assert cli.class_store_main(
        ["calibrate", "--store", str(path), "--dataset", str(tmp_path / "other"), *model_args]) == 1


# --- command line: thresholds, labels and output (round 4) -----------------------------------------------------------


def test_a_build_that_holds_out_exactly_one_image_calibrates_on_it(tmp_path, lite0_weights, capsys):
    dataset = make_class_folders(tmp_path / "dataset", classes=["red circle", "green square", "cyan ring"],
                                 images_per_class=[4, 4, 5], seed=3)
    path = tmp_path / "store.npz"
    assert cli.class_store_main(["build", "--dataset", str(dataset), "--out", str(path), "--model",
                                 "tf_efficientnet_lite0", "--weights", str(lite0_weights), "--cpu"]) == 0
    db = ClassVectorStore.load(path=path)
    assert db.counts.tolist() == [5, 4, 4] and db.classifier.calibration_count_ == 1
    captured = capsys.readouterr()
    assert "(set on 1 image)" in captured.out
    assert ("warning: the threshold rests on 1 image: on new samples it keeps 95% ± 43% of them (95 % confidence); "
            "calibrate on at least 73 for ± 5 points") in captured.err


@pytest.mark.parametrize(("command", "rate"), [("calibrate", "0"), ("build", "1.5"), ("build", "x")])
def test_the_true_positive_rate_is_checked_before_any_work(command, rate, capsys):
    args = [command, "--dataset", "/no/such/folder", "--true-positive-rate", rate]
    args += ["--store", "s.npz"] if command == "calibrate" else ["--out", "s.npz"]
    with pytest.raises(SystemExit) as stopped:
        cli.class_store_main(args)
    assert stopped.value.code == 2
    assert "argument --true-positive-rate: must" in capsys.readouterr().err


def test_calibrating_on_one_image_says_what_the_threshold_rests_on(cli_setup, tmp_path, capsys):
    dataset, built, model_args = cli_setup
    path = tmp_path / "store.npz"
    ClassVectorStore.load(path=built).save(path=path)
    one = tmp_path / "one" / "red circle"
    one.mkdir(parents=True)
    shutil.copy(sorted((dataset / "red circle").iterdir())[0], one / "a.jpg")
    capsys.readouterr()
    assert cli.class_store_main(["calibrate", "--store", str(path), "--dataset", str(one.parent), *model_args]) == 0
    captured = capsys.readouterr()
    assert "keeping 95% of known samples (set on 1 image)" in captured.out
    assert "warning: the threshold rests on 1 image" in captured.err
    assert cli.class_store_main(["info", "--store", str(path)]) == 0
    assert "(set on 1 image)" in capsys.readouterr().out


def test_add_class_refuses_the_reserved_label_before_encoding(cli_setup, capsys):
    _, built, _ = cli_setup
    before = built.read_bytes()
    args = ["add-class", "--store", str(built), "--images", "/no/such/folder", "--label", "unknown"]
    assert cli.class_store_main(args) == 1
    assert "The label 'unknown' is reserved for queries of no known class" in capsys.readouterr().err
    assert built.read_bytes() == before


def test_classify_writes_its_csv_even_when_the_reader_closes_the_output(cli_setup, tmp_path):
    import subprocess

    dataset, built, model_args = cli_setup
    csv_path = tmp_path / "predictions.csv"
    command = [sys.executable, "-m", "simsearch", "store", "classify", "--store", str(built), str(dataset), "--csv",
               str(csv_path), *model_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    process.stdout.close()  # as `| head -1` does once it has its line, here before the first one
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 141, errors.decode()
    assert b"Broken pipe" not in errors and b"Traceback" not in errors
    with csv_path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 9 and {row["label_1"] for row in rows} == {"red circle", "green square", "cyan ring"}


def test_build_reads_the_research_scripts_embedding_cache(cli_setup, tmp_path, monkeypatch, capsys):
    dataset, built, model_args = cli_setup
    cache = ["--cache-dir", str(tmp_path / "cache")]
    first, again = tmp_path / "first.zip", tmp_path / "again.zip"
    assert cli.class_store_main(["build", "--dataset", str(dataset), "--out", str(first), *model_args, *cache]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached dataset was encoded again")

    monkeypatch.setattr(engine.Embedder, "embed", refuse)
    assert cli.class_store_main(["build", "--dataset", str(dataset), "--out", str(again), *model_args, *cache]) == 0
    assert "Using cached embeddings" in capsys.readouterr().out
    for path in (first, again):  # the cached embeddings give the store the dataset itself gives
        assert torch.equal(ClassVectorStore.load(path=path).sums, ClassVectorStore.load(path=built).sums)
