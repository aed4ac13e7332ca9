"""The distributed encode on a local Ray of 2 CPUs: Parquet embedding sets equal the single-process encode, shard
statistics merge into a single fit, the protocol gives the same results on a set, and bad sets are refused."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import banerjee
import engine
import utils
from simsearch import cli, config, protocol
from simsearch.classifiers import prototypes

ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")  # CI installs the extra
from simsearch import distributed  # noqa: E402

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def test_the_package_imports_without_ray_and_names_the_extra_to_install():
    blocked = ("import sys; sys.modules['ray'] = None\n"
               "import engine\nfrom simsearch import cli, distributed\nfrom simsearch.classifiers import prototypes\n"
               "try:\n    distributed.require_ray()\n"
               "except Exception as error:\n    print(type(error).__name__, error)\n")
    completed = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=REPOSITORY,
                               check=True)
    assert completed.stdout.startswith("UserError Distributed encoding needs Ray Data")
    assert "pip install -e '.[distributed]'" in completed.stdout


@pytest.fixture(scope="module")
def local_ray():
    distributed.init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(lite0_weights) -> distributed.EncoderSpec:
    return distributed.EncoderSpec(modality="image", model_name="tf_efficientnet_lite0", weights=str(lite0_weights))


@pytest.fixture(scope="module")
def embedding_set(local_ray, image_folder, spec, tmp_path_factory):
    """The 40 images of four classes, encoded by 2 actors into shards of at most 16 rows."""
    out = tmp_path_factory.mktemp("set") / "shapes"
    maker = banerjee.make_dataset_maker(dataset_path=image_folder)
    manifest = distributed.encode_dataset(maker=maker, spec=spec, out=out, actors=2, batch_size=8, rows_per_shard=16)
    return out, manifest, maker


@pytest.fixture(scope="module")
def single_process(embedding_set, lite0_model):
    _, _, maker = embedding_set
    encoder = engine.Encoder(model=lite0_model, device="cpu")
    return protocol.embed_all_images(encoder=encoder, maker=maker, transform=engine.eval_transform(lite0_model)[1],
                                     batch_size=8, workers=0)


def test_the_set_equals_the_single_process_encode_in_the_same_order(embedding_set, single_process):
    out, manifest, maker = embedding_set
    read = distributed.read_embedding_set(out, model_id=manifest["model_id"])
    embeddings, targets = single_process
    assert len(manifest["shards"]) >= 3  # rows_per_shard=16; Ray may split blocks further
    assert manifest["num_samples"] == 40 and manifest["counts"] == [10] * 4
    assert manifest["classes"] == maker.get_labels() and manifest["embedding_dim"] == 1280
    assert manifest["allocator_environment"]["MALLOC_ARENA_MAX"] == "1"  # the actors' model runs in a thread
    assert read.names == [str(path) for path in maker.get_image_paths()]
    assert torch.equal(read.targets, targets)
    assert (read.embeddings - embeddings).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["mean", "decorrelated", "balanced", "lda"])
def test_shard_statistics_merge_into_a_single_fit(embedding_set, name):
    out, _, _ = embedding_set
    read = distributed.read_embedding_set(out)
    single = prototypes.make_classifier(name).fit(read.embeddings.numpy(), read.targets.numpy())
    for use_ray in (True, False):
        merged = distributed.fit_shards(out, prototypes.make_classifier(name), use_ray=use_ray)
        expected, got = single.get_statistics(), merged.get_statistics()
        assert set(got) == set(expected)
        first_shard = distributed.shard_statistics(distributed.list_shards(out)[0], prototypes.make_classifier(name))
        for key, value in expected.items():
            if key == "unknown_score":  # the first shard's choice, here the single fit's
                assert got[key] == value
                continue
            if key == "temperature":  # fitted on the first shard's held-out folds
                assert got[key] == first_shard[key]
                continue
            # squared float32 scores, summed over the images in another order; the single fit (fewer images than
            # features) decomposes in the images' space, the merged one factorises the F x F matrix
            tolerance = dict(rtol=1e-4, atol=0) if key == "unknown_moments" else dict(rtol=0, atol=1e-10)
            np.testing.assert_allclose(got[key], value, err_msg=key, **tolerance)
        np.testing.assert_allclose(merged.decision_function(read.embeddings.numpy()),
                                   single.decision_function(read.embeddings.numpy()), atol=1e-10)
        # standardised by those moments: the merged fit's float32 Cholesky factor is the less accurate (on these
        # 40 images 3e-4 off float64 distances of 30, the single fit's n x n spectrum 2e-6)
        np.testing.assert_allclose(merged.score_samples(read.embeddings.numpy()),
                                   single.score_samples(read.embeddings.numpy()), rtol=1e-5, atol=1e-4)


def test_merge_refuses_estimators_with_other_parameters():
    X, y = np.random.default_rng(0).normal(size=(20, 4)), np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match="differ in class or parameters"):
        prototypes.merge_statistics([prototypes.make_classifier("decorrelated").fit(X, y),
                                     prototypes.make_classifier("balanced").fit(X, y)])


def test_the_protocol_on_the_set_gives_the_cached_protocols_results(embedding_set, single_process, lite0_model):
    out, _, maker = embedding_set
    read = distributed.read_embedding_set(out)
    common = dict(batch_size=8, workers=0,
                  settings=config.RunSettings(runs=4, valid_share=0.3, seed=5, top_k=2, classifier="balanced"))
    encoded = protocol.run_cached_protocol(
        encoder=engine.Encoder(model=lite0_model, device="cpu"), maker=maker,
        transform=engine.eval_transform(lite0_model)[1], **common)
    from_set = protocol.run_cached_protocol(
        encoder=None, maker=read.listing(), transform=None,
        embeddings=(read.embeddings, read.targets), **common)
    assert [run.valid_indexes for run in from_set] == [run.valid_indexes for run in encoded]
    assert [run.accuracy for run in from_set] == pytest.approx([run.accuracy for run in encoded], abs=1e-12)
    assert [run.predictions for run in from_set] == [run.predictions for run in encoded]


def test_a_rerun_resumes_by_doing_nothing_and_another_model_is_refused(embedding_set, spec):
    out, manifest, maker = embedding_set
    shards = sorted((out / distributed.SHARDS).iterdir())
    stamps = [path.stat().st_mtime_ns for path in shards]
    assert distributed.encode_dataset(maker=maker, spec=spec, out=out, actors=2) == manifest
    assert [path.stat().st_mtime_ns for path in shards] == stamps
    other = distributed.EncoderSpec(modality="image", model_name=spec.model_name, weights=spec.weights,
                                    precision="bf16")
    with pytest.raises(distributed.EmbeddingSetError, match="holds a complete embedding set whose model_id differ"):
        distributed.encode_dataset(maker=maker, spec=other, out=out)
    with pytest.raises(distributed.EmbeddingSetError, match=r"was encoded by tf_efficientnet_lite0\+sha256:[0-9a-f]+, "
                                                            r"not by tf_efficientnet_lite1"):
        distributed.read_embedding_set(out, model_id="tf_efficientnet_lite1")


def test_an_unfinished_set_is_never_read_and_a_new_run_clears_it(embedding_set, single_process, spec, tmp_path):
    out, _, maker = embedding_set
    partial = tmp_path / "partial"
    shutil.copytree(out / distributed.SHARDS, partial / distributed.SHARDS)
    with pytest.raises(distributed.EmbeddingSetError, match="has no manifest.json .its shards are from a run that "
                                                            "did not finish"):
        distributed.read_embedding_set(partial)
    (partial / distributed.SHARDS / "stale-from-another-run.parquet").write_bytes(b"not parquet")
    manifest = distributed.encode_dataset(maker=maker, spec=spec, out=partial, actors=1, rows_per_shard=40)
    assert len(manifest["shards"]) == 1
    assert sorted(path.name for path in (partial / distributed.SHARDS).iterdir()) == [
        entry["name"] for entry in manifest["shards"]]
    assert distributed.read_embedding_set(partial).targets.tolist() == maker.get_image_labels().tolist()
    # one actor holds both CPUs, so two threads decode its images: the same embeddings in the same order
    assert manifest["cpus_per_actor"] == 2
    assert (distributed.read_embedding_set(partial).embeddings - single_process[0]).abs().max() <= 1e-5


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--cpus-per-actor", "0.5", "--cpus-per-actor must be at least 1, got 0.5."),
    ("--num-cpus", "0", "--num-cpus must be at least 1, got 0."),  # a local Ray without CPUs would hang
])
def test_the_command_refuses_cpu_counts_ray_cannot_run(capsys, option, value, message):
    with pytest.raises(SystemExit) as stopped:
        cli.distributed_main(["data", "--out", "set", option, value])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_set_with_a_missing_shard_is_refused(embedding_set, tmp_path):
    out, manifest, _ = embedding_set
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / distributed.SHARDS / manifest["shards"][1]["name"]).unlink()
    with pytest.raises(distributed.EmbeddingSetError, match=f"lacks 1 of its {len(manifest['shards'])} shards"):
        distributed.read_embedding_set(damaged)


def test_the_script_runs_on_an_embedding_set_as_on_the_dataset(embedding_set, image_folder, lite0_weights,
                                                               tmp_path):
    """Same seed, same partitions: the script on the set reports the accuracies of the script on the images."""
    import json

    from conftest import run_script

    out, _, _ = embedding_set
    common = ("--runs", "3", "--valid-share", "0.3", "--top-k", "2", "--classifier", "balanced")
    on_set = run_script("--embeddings", out, "--out", tmp_path / "set", *common, "--analysis", "confusion",
                        cwd=tmp_path)
    assert on_set.returncode == 0, on_set.stderr[-3000:]
    on_images = run_script("--dataset", image_folder, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights,
                           "--out", tmp_path / "images", *common, cwd=tmp_path)
    assert on_images.returncode == 0, on_images.stderr[-3000:]
    from_set = json.loads((tmp_path / "set" / "results.json").read_text())
    from_images = json.loads((tmp_path / "images" / "results.json").read_text())
    assert from_set["accuracies"] == pytest.approx(from_images["accuracies"], abs=1e-9)
    assert from_set["final_stats"]["model_name"] == from_images["final_stats"]["model_name"]
    assert from_set["final_stats"]["encode_seconds"] < from_images["final_stats"]["encode_seconds"]
    assert "skipped for an embedding set (no encoder)" in on_set.stdout
    assert (tmp_path / "set" / "confusion.png").stat().st_size > 1000


def test_a_class_store_built_from_the_set_equals_one_built_from_the_images(embedding_set, image_folder,
                                                                           lite0_weights, tmp_path, capsys):
    from simsearch import cli
    from simsearch.classdb import vector_store

    out, _, _ = embedding_set
    assert cli.class_store_main(["build", "--embeddings", str(out), "--out", str(tmp_path / "set.npz")]) == 0
    assert cli.class_store_main(["build", "--dataset", str(image_folder), "--model", "tf_efficientnet_lite0",
                                 "--weights", str(lite0_weights), "--out", str(tmp_path / "images.npz")]) == 0
    from_set = vector_store.ClassVectorStore.load(path=tmp_path / "set.npz")
    from_images = vector_store.ClassVectorStore.load(path=tmp_path / "images.npz")
    assert from_set.labels == from_images.labels and from_set.identity == from_images.identity
    np.testing.assert_allclose(from_set.classifier.class_sums_, from_images.classifier.class_sums_, atol=1e-4)
    # batches of 8 vs 32, and BLAS threads chosen by the load (matrices.blas_threads_for_load): float32 sums
    assert from_set.threshold == pytest.approx(from_images.threshold, rel=1e-4)
    assert "Built" in capsys.readouterr().out


def test_the_grid_scores_an_embedding_set_as_it_scores_the_dataset(embedding_set, image_folder, lite0_weights,
                                                                   tmp_path):
    from simsearch import grid

    out, _, _ = embedding_set
    settings = grid.GridSettings(runs=3, valid_share=0.3, top_k=2)
    common = dict(classifiers=["mean", "balanced"], cache_dir=tmp_path / "cache", settings=settings)
    from_set = grid.run_grid(datasets=[], models=[], embedding_sets=[out], out=tmp_path / "set", **common)
    from_images = grid.run_grid(datasets=[image_folder], out=tmp_path / "images", **common,
                                models=[grid.ModelSpec(name="tf_efficientnet_lite0", weights=str(lite0_weights))])
    columns = ["dataset", "model", "classifier", "samples", "classes", "accuracy", "balanced_accuracy"]
    assert from_set[columns].to_dict("records") == from_images[columns].to_dict("records")


# --- damaged, foreign and mismatched sets (round 4): every reader checks each shard against its manifest --------


def copy_of_set(embedding_set, tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A copy of the set to damage, and its manifest as a fresh dictionary to edit."""
    out, _, _ = embedding_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, json.loads((copy / distributed.MANIFEST).read_text())


def write_shard(path: pathlib.Path, *, index, label, name, embedding) -> None:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({
        "index": np.asarray(index), "label": np.asarray(label), "name": [str(item) for item in name],
        "embedding": [row.tolist() for row in np.asarray(embedding, dtype=np.float32)],
    }), path)


def test_a_shard_cut_in_half_is_refused_by_every_reader_in_one_line(embedding_set, tmp_path, capsys):
    copy, manifest = copy_of_set(embedding_set, tmp_path)
    shard = copy / distributed.SHARDS / manifest["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = f"The shard {shard} is not the file its manifest lists (SHA-256 differs)"
    with pytest.raises(distributed.EmbeddingSetError, match=re.escape(message)):
        distributed.read_embedding_set(copy)
    with pytest.raises(distributed.EmbeddingSetError, match=re.escape(message)):
        distributed.fit_shards(copy, prototypes.make_classifier("mean"), use_ray=False)
    assert cli.class_store_main(["build", "--embeddings", str(copy), "--out", str(tmp_path / "s.npz")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "s.npz").exists()


def test_an_unparseable_shard_that_its_manifest_pins_is_refused_as_unreadable(embedding_set, tmp_path):
    copy, manifest = copy_of_set(embedding_set, tmp_path)
    shard = copy / distributed.SHARDS / manifest["shards"][0]["name"]
    shard.write_bytes(b"not parquet at all")
    manifest["shards"][0]["sha256"] = __import__("hashlib").sha256(b"not parquet at all").hexdigest()
    (copy / distributed.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(distributed.EmbeddingSetError, match=f"The shard {re.escape(str(shard))} is not a readable "
                                                            "embedding shard"):
        distributed.read_embedding_set(copy)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda manifest: manifest.pop("shards"), "lacks or mistypes shards; the manifest was edited or damaged"),
    (lambda manifest: manifest.update(shards=["a.parquet"]), "lacks or mistypes shards"),
    (lambda manifest: manifest["shards"][0].update(name="../../elsewhere.parquet"), "lacks or mistypes shards"),
    (lambda manifest: manifest.update(embedding_dim="1280"), "lacks or mistypes embedding_dim"),
    (lambda manifest: manifest.update(format=1), "written by an earlier version whose shards are not pinned"),
])
def test_a_damaged_manifest_is_refused_in_one_line_naming_it(embedding_set, tmp_path, edit, message):
    copy, manifest = copy_of_set(embedding_set, tmp_path)
    edit(manifest)
    (copy / distributed.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(distributed.EmbeddingSetError, match=re.escape(str(copy / distributed.MANIFEST))) as info:
        distributed.read_embedding_set(copy)
    assert message in str(info.value)


def test_shards_of_another_set_under_the_listed_names_are_refused(embedding_set, tmp_path):
    """Another model's shards renamed to the listed names, and one shard swapped for another set's shard of the same
    sample indexes: the SHA-256 tells them apart."""
    copy, manifest = copy_of_set(embedding_set, tmp_path)
    first = distributed.list_shards(copy)[0]
    part = first.read()
    write_shard(pathlib.Path(first.path), index=part["index"], label=part["label"], name=part["name"],
                embedding=part["embedding"][:, ::-1])  # same samples, other vectors (another model's)
    with pytest.raises(distributed.EmbeddingSetError, match="is not the file its manifest lists"):
        distributed.read_embedding_set(copy)


def test_a_manifest_forged_to_fit_narrower_shards_is_refused_by_dimension(embedding_set, tmp_path):
    import hashlib

    copy, manifest = copy_of_set(embedding_set, tmp_path)
    for entry, shard in zip(manifest["shards"], distributed.list_shards(copy)):
        part = shard.read()
        write_shard(pathlib.Path(shard.path), index=part["index"], label=part["label"], name=part["name"],
                    embedding=part["embedding"][:, :512])  # a 512-d model's shards
        entry.update(sha256=hashlib.sha256(pathlib.Path(shard.path).read_bytes()).hexdigest(), dim=512)
    (copy / distributed.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(distributed.EmbeddingSetError, match="holds 512-d embeddings, the set's manifest says 1280"):
        distributed.read_embedding_set(copy)


def test_actors_the_cluster_cannot_place_are_refused_before_any_work(local_ray, embedding_set, spec, tmp_path):
    _, _, maker = embedding_set
    with pytest.raises(utils.UserError, match=r"The Ray cluster has 0 GPUs .* too few for 1 actor\(s\) of 1 GPU\(s\) "
                                              r"each: lower --actors or --gpus-per-actor \(0 encodes on CPUs\)"):
        distributed.encode_dataset(maker=maker, spec=spec, out=tmp_path / "gpu", gpus_per_actor=1)
    with pytest.raises(utils.UserError, match=r"too few for 3 actor\(s\) of 1 CPU\(s\) each"):
        distributed.encode_dataset(maker=maker, spec=spec, out=tmp_path / "cpu", actors=3, cpus_per_actor=1)
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "cpu").exists()


def test_an_address_where_no_cluster_answers_is_refused_within_the_timeout(image_folder, tmp_path):
    started = __import__("time").perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "simsearch", "distributed", str(image_folder), "--out", str(tmp_path / "set"),
         "--address", "127.0.0.1:1"], capture_output=True, text=True, cwd=REPOSITORY, timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert completed.returncode == 1, completed.stderr[-2000:]
    assert completed.stderr.startswith("error: No Ray cluster answers at 127.0.0.1:1 within 10 s")
    assert __import__("time").perf_counter() - started < 60
    assert not (tmp_path / "set").exists()
