"""store.py: exact round trips, atomic writes, refusal of damaged or foreign files, the embedding cache."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
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


def test_atomic_path_discards_partial_output_on_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with store.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


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
    assert cache.load("k3") is None
