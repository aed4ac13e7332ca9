"""store.py: exact round trips and the embedding cache (damaged, foreign and failed saves: test_bad_inputs.py)."""

from __future__ import annotations

import csv
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

import store


def test_embeddings_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(5, 7)).astype(np.float32)
    embeddings[0, 0] = np.float32(1e-38)
    embeddings[1, 1] = np.float32(-3.4e38)
    targets = np.array(["cat", "dog, big", "naïve ox", "zebra", "42"])
    path = store.save_embeddings(embeddings=embeddings, targets=targets, filename=tmp_path / "vectors")
    assert path == tmp_path / "vectors.zip"
    loaded_targets, loaded = store.load_embeddings(filename=path)
    assert loaded.dtype == np.float32
    assert np.array_equal(loaded, embeddings)
    assert [str(t) for t in loaded_targets] == list(targets)


def test_embeddings_zip_holds_one_csv_with_target_first(tmp_path):
    path = store.save_embeddings(embeddings=np.eye(2, dtype=np.float32), targets=[0, 1], filename=tmp_path / "e.zip")
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["e.csv"]
        assert archive.read("e.csv").decode().splitlines()[0] == "target,0,1"


def test_save_embeddings_rejects_mismatched_targets(tmp_path):
    with pytest.raises(ValueError, match="3 targets"):
        store.save_embeddings(embeddings=np.zeros((2, 4)), targets=[1, 2, 3], filename=tmp_path / "bad")


def test_checkpoint_round_trip_with_datasets(tmp_path, image_folder, lite0_model):
    import banerjee

    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    train_ds, valid_ds, _ = maker.make_datasets(
        valid_share=0.3, test_share=0.0, generator=torch.Generator().manual_seed(1)
    )
    path = store.save_checkpoint(
        filename=tmp_path / "ckpt.pt", model=lite0_model, train_ds=train_ds, valid_ds=valid_ds, config={"topk": 4}
    )
    model, train_back, valid_back, test_back = store.load_checkpoint(checkpoint_path=path, dataset_path=image_folder)
    for key, value in lite0_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert test_back is None
    assert [train_back.get_image_path(i) for i in range(len(train_back))] == [
        train_ds.get_image_path(i) for i in range(len(train_ds))
    ]
    assert valid_back.get_state() == valid_ds.get_state()


def test_cache_key_depends_on_model_transform_and_files():
    base = dict(model_id="m", transform="resize 224", fingerprint=[("a/1.jpg", 10, 5)])
    key = store.cache_key(**base)
    assert key == store.cache_key(**base)
    assert key != store.cache_key(**{**base, "model_id": "m2"})
    assert key != store.cache_key(**{**base, "transform": "resize 256"})
    assert key != store.cache_key(**{**base, "fingerprint": [("a/1.jpg", 10, 6)]})


def test_embedding_cache_round_trip_and_miss(tmp_path):
    cache = store.EmbeddingCache(tmp_path / "cache")
    assert cache.load("k1") is None
    embeddings, targets = torch.randn(4, 3), torch.tensor([0, 0, 1, 2])
    cache.save("k1", embeddings=embeddings, targets=targets)
    loaded_embeddings, loaded_targets = cache.load("k1")
    assert torch.equal(loaded_embeddings, embeddings) and torch.equal(loaded_targets, targets)
    assert cache.load("k2") is None
    cache.path("k3").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"embeddings-k3\.pt is not used: unreadable .* Encoding again"):
        assert cache.load("k3") is None


def test_embedding_cache_refuses_edited_mismatched_or_misfiled_contents(tmp_path):
    cache = store.EmbeddingCache(tmp_path)
    embeddings, targets = torch.randn(4, 3), torch.tensor([0, 0, 1, 2])
    path = cache.save("k1", embeddings=embeddings, targets=targets)
    assert cache.load("k1", targets=targets)[0].equal(embeddings)
    with pytest.warns(UserWarning, match="its 4 labels are not the dataset's 5"):
        assert cache.load("k1", targets=torch.tensor([0, 0, 1, 2, 2])) is None
    state = torch.load(path, weights_only=True)
    torch.save({**state, "embeddings": state["embeddings"] * 1.01}, path)
    with pytest.warns(UserWarning, match="do not match their checksum"):
        assert cache.load("k1") is None
    torch.save(state, cache.path("k2"))
    with pytest.warns(UserWarning, match="written for another key"):
        assert cache.load("k2") is None


def test_result_csv_cells_with_control_characters_read_back_as_one_cell(tmp_path):
    frame = pd.DataFrame({"label": ["a\rb", "c\x1bd", "e\nf"], "accuracy": [0.5, float("nan"), 1.0], "n": [1, 2, 3]})
    path = store.write_csv(tmp_path / "classes.csv", frame)
    back = pd.read_csv(path)
    assert back["label"].tolist() == ["a\rb", "c\x1bd", "e\nf"] and back["n"].tolist() == [1, 2, 3]
    assert back["accuracy"].isna().tolist() == [False, True, False]
    with path.open(newline="", encoding="utf-8") as stream:
        assert [row[0] for row in csv.reader(stream)] == ["label", "a\rb", "c\x1bd", "e\nf"]
