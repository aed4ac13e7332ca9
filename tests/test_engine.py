"""engine.py: model creation and the Encoder (encode / evaluate / infer over prototypes) on separable classes."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import banerjee
import engine
import utils
from simsearch import protocol
from simsearch.classifiers import prototypes


def test_offline_lite0_weights_are_the_genuine_imagenet_ones(lite0_model, lite0_weights):
    source = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    assert torch.equal(lite0_model.conv_stem.weight, source["_conv_stem.weight"])
    assert engine.model_id(lite0_model).startswith("tf_efficientnet_lite0+sha256:")
    assert lite0_model.num_features == 1280


@pytest.fixture(scope="module")
def fitted_encoder(image_folder, lite0_model):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    _, transform = engine.eval_transform(lite0_model)
    train_ds, valid_ds, _ = maker.make_datasets(
        train_transform=transform, eval_transform=transform, valid_share=0.3, test_share=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    device = torch.device("cpu")
    encoder = engine.Encoder(
        model=lite0_model, device=device,
        train_dl=protocol.make_loader(train_ds, batch_size=8, workers=0, device=device),
        valid_dl=protocol.make_loader(valid_ds, batch_size=8, workers=0, device=device),
        config=SimpleNamespace(topk=2, short_run_batches=None),
    )
    stats = encoder.encode()
    return encoder, stats, transform, valid_ds


def test_encode_builds_one_vector_per_class(fitted_encoder):
    encoder, stats, _, _ = fitted_encoder
    assert stats["num_labels"] == 4 and stats["num_images"] == 28 and stats["embedding_dim"] == 1280
    assert encoder.embeddings.shape == (4, 1280)
    assert list(encoder.labels) == ["blue triangle", "green square", "red circle", "yellow stripes"]


def test_evaluate_separates_generated_classes(fitted_encoder):
    encoder, _, _, _ = fitted_encoder
    stats = encoder.evaluate(dataset_part="valid")
    assert stats["num_images"] == 12
    assert stats["accuracy"] == 1.0 and stats["topk_accuracy"] == 1.0
    assert stats["predictions"] == stats["targets"]
    with pytest.raises(ValueError, match="Unknown dataset part 'holdout'"):
        encoder.evaluate(dataset_part="holdout")
    with pytest.raises(ValueError, match="No data loader for the 'test' part"):
        encoder.evaluate(dataset_part="test")


def test_infer_accepts_tensors_files_and_pil_images(fitted_encoder):
    encoder, _, transform, valid_ds = fitted_encoder
    path = valid_ds.get_image_path(0)
    expected = valid_ds.get_label(valid_ds[0][1])
    from_tensor = encoder.infer(inputs=valid_ds[0][0])
    from_path = encoder.infer(inputs=path)
    from_pil = encoder.infer(inputs=[Image.open(path).convert("L")], transform=transform)
    assert from_tensor[0][0]["label"] == from_path[0][0]["label"] == expected
    assert from_pil[0][0]["label"] == expected
    assert len(from_path[0]) == 2 and from_path[0][0]["score"] >= from_path[0][1]["score"]
    assert from_tensor[0][0]["score"] == pytest.approx(from_path[0][0]["score"], abs=1e-4)


def test_short_run_stops_after_the_given_number_of_batches(fitted_encoder):
    encoder, _, _, _ = fitted_encoder
    short = engine.Encoder(
        model=encoder.model, device="cpu", train_dl=encoder.train_dl,
        config=SimpleNamespace(short_run_batches=1),
    )
    embeddings, _ = short.embed(dataloader=encoder.train_dl)
    assert embeddings.shape[0] == 8


def test_prefetching_the_next_batch_gives_the_same_embeddings_in_order(fitted_encoder):
    encoder, _, _, _ = fitted_encoder
    assert encoder.config.prefetch and encoder.valid_dl.num_workers == 0
    prefetched, targets = encoder.embed(dataloader=encoder.valid_dl)
    serial = engine.Encoder(model=encoder.model, device="cpu", config=engine.EncoderConfig(prefetch=False))
    plain, plain_targets = serial.embed(dataloader=encoder.valid_dl)
    assert torch.equal(prefetched, plain) and torch.equal(targets, plain_targets)


def test_channels_last_gives_the_same_embeddings(fitted_encoder):
    encoder, _, _, _ = fitted_encoder
    fast, _ = encoder.embed(dataloader=encoder.valid_dl)
    contiguous = engine.Encoder(model=encoder.model, device="cpu", config=SimpleNamespace(channels_last=False))
    plain, _ = contiguous.embed(dataloader=encoder.valid_dl)
    encoder.model.to(memory_format=torch.channels_last)
    assert torch.allclose(fast, plain, atol=1e-4)


def test_encode_fits_the_given_classifier_and_infer_ranks_by_its_scores(fitted_encoder):
    encoder, _, _, valid_ds = fitted_encoder
    decorrelated = engine.Encoder(
        model=encoder.model, device="cpu", train_dl=encoder.train_dl, valid_dl=encoder.valid_dl,
        config=SimpleNamespace(topk=3), classifier=prototypes.DecorrelatedClassifier(),
    )
    decorrelated.encode()
    assert isinstance(decorrelated.fitted_classifier, prototypes.DecorrelatedClassifier)
    assert decorrelated.classifier.get_params() == prototypes.DecorrelatedClassifier().get_params()
    assert decorrelated.evaluate(dataset_part="valid")["accuracy"] == 1.0
    hits = decorrelated.infer(inputs=valid_ds[0][0])[0]
    scores = decorrelated.fitted_classifier.class_scores(decorrelated.embed_images(
        images=[valid_ds.get_image_path(0)], transform=engine.eval_transform(encoder.model)[1]).numpy())[0]
    assert [hit["label_idx"] for hit in hits] == np.argsort(-scores)[:3].tolist()
    assert hits[0]["score"] == pytest.approx(scores.max(), abs=1e-4)


def test_class_mean_infer_equals_semantic_search_over_the_means(fitted_encoder):
    encoder, _, _, valid_ds = fitted_encoder
    query = encoder.embed_images(images=[valid_ds.get_image_path(1)], transform=engine.eval_transform(encoder.model)[1])
    expected = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(encoder.embeddings, dim=1).T
    hits = encoder.infer(inputs=valid_ds.get_image_path(1))[0]
    assert [hit["corpus_id"] for hit in hits] == expected[0].argsort(descending=True)[:2].tolist()
    best_two = expected[0].sort(descending=True).values[:2].tolist()
    assert [hit["score"] for hit in hits] == pytest.approx(best_two, abs=1e-5)


def test_encode_and_evaluate_durations_are_timedeltas_like_the_original(fitted_encoder):
    encoder, stats, _, _ = fitted_encoder
    assert isinstance(stats["duration"], datetime.timedelta)
    assert isinstance(encoder.evaluate(dataset_part="valid")["duration"], datetime.timedelta)


def test_infer_before_encode_is_a_clear_error(lite0_model):
    with pytest.raises(RuntimeError, match="call encode"):
        engine.Encoder(model=lite0_model, device="cpu").infer(inputs=torch.zeros(1, 3, 224, 224))


# --- Precision and torch.compile -------------------------------------------------------------------------------------


def test_precisions_the_device_cannot_run_are_refused_by_name():
    with pytest.raises(engine.ModelError, match="--precision fp16 is not available on cpu; use fp32 "
                                                r"\(fp16 needs CUDA\)"):
        engine.autocast_dtype(precision="fp16", device=torch.device("cpu"))
    with pytest.raises(engine.ModelError, match="Unknown precision 'fp8'; use fp32, bf16, fp16"):
        engine.autocast_dtype(precision="fp8", device=torch.device("cpu"))
    assert engine.autocast_dtype(precision="fp32", device=torch.device("cpu")) is None


def test_script_names_the_engines_precisions():
    from simsearch import cli

    assert cli.PRECISIONS == tuple(engine.PRECISIONS)


@pytest.mark.filterwarnings("ignore:This CPU has neither")
def test_bf16_embeddings_stay_close_to_fp32_and_are_cached_apart(lite0_model):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fp32 = engine.Encoder(model=lite0_model, device="cpu")
    bf16 = engine.Encoder(model=lite0_model, device="cpu", config=engine.EncoderConfig(precision="bf16"))
    with torch.inference_mode():
        reference, rounded = fp32._forward(images), bf16._forward(images)
    assert rounded.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(reference, rounded).min() >= 0.999
    assert not torch.equal(reference, rounded)
    assert bf16.embedding_id == fp32.embedding_id + "+bf16" and "+" in fp32.embedding_id


def test_bf16_on_a_cpu_without_fast_bf16_warns(lite0_model, monkeypatch):
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 is emulated and usually slower than fp32"):
        engine.Encoder(model=lite0_model, device="cpu", config=engine.EncoderConfig(precision="bf16"))


def test_compile_that_fails_at_the_first_batch_falls_back_to_eager_with_a_warning(lite0_model, monkeypatch):
    def broken_compile(model):
        def compiled(_inputs):
            raise RuntimeError("no working C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    encoder = engine.Encoder(model=lite0_model, device="cpu", config=engine.EncoderConfig(compile=True))
    with torch.inference_mode(), pytest.warns(UserWarning, match="torch.compile failed .*no working C\\+\\+ "
                                                                 "compiler.*running eager"):
        embeddings = encoder._forward(images)
    with torch.inference_mode():
        torch.testing.assert_close(embeddings, engine.Encoder(model=lite0_model, device="cpu")._forward(images))
    assert encoder._compiled is None  # later batches go straight to the eager model
