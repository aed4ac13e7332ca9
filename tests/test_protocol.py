"""protocol.py: cached and original protocols agree, the cache is used and keyed, runs resume, workers don't matter."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import banerjee
import engine
import store
from simsearch import config, protocol
from simsearch.classifiers import prototypes


@pytest.fixture(scope="module")
def setup(image_folder, lite0_model):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    _, transform = engine.eval_transform(lite0_model)
    encoder = engine.Encoder(model=lite0_model, device="cpu", config=SimpleNamespace(topk=2))
    return maker, transform, encoder


def cached_run(setup, *, runs=3, seed=5, workers=0, classifier="mean", **kwargs):
    maker, transform, encoder = setup
    return protocol.run_cached_protocol(
        encoder=encoder, maker=maker, transform=transform, batch_size=16, workers=workers,
        settings=config.RunSettings(runs=runs, valid_share=0.3, seed=seed, top_k=2, classifier=classifier), **kwargs,
    )


def test_cached_protocol_matches_the_original_protocol(setup):
    maker, transform, encoder = setup
    cached = cached_run(setup, runs=2)
    original = protocol.run_original_protocol(
        encoder=encoder, maker=maker, encode_transform=transform, eval_transform=transform, batch_size=8, workers=0,
        settings=config.RunSettings(runs=2, valid_share=0.3, seed=5, top_k=2),
    )
    assert cached.embeddings.shape == (40, 1280)
    assert cached.targets.tolist() == maker.get_image_labels().tolist()
    assert original.embeddings is None and len(original) == len(cached) == 2
    for fast, slow in zip(cached, original):
        assert fast.valid_indexes == slow.valid_indexes
        assert fast.topk_predictions == slow.topk_predictions
        assert fast.accuracy == slow.accuracy == 1.0
        assert fast.train_accuracy == slow.train_accuracy == 1.0
    assert cached.classifier.classes_.tolist() == original.classifier.classes_.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(cached.classifier.class_sums_, original.classifier.class_sums_, rtol=1e-5)


def test_protocols_take_the_classifier_and_leave_the_encoder_unchanged(setup):
    maker, transform, encoder = setup
    before = {name: value for name, value in vars(encoder).items()}
    decorrelated = cached_run(setup, runs=2, classifier=prototypes.DecorrelatedClassifier())
    assert vars(encoder) == before and encoder.fitted_classifier is None
    assert isinstance(decorrelated.classifier, prototypes.DecorrelatedClassifier)
    assert [run.accuracy for run in decorrelated] == [1.0, 1.0]
    interval = decorrelated.accuracy(confidence=0.9)
    assert (interval.mean, interval.n) == (1.0, 2)
    assert decorrelated.partitions[1][1].tolist() == decorrelated[1].valid_indexes
    assert decorrelated.targets_per_run == [run.targets for run in decorrelated]


def test_runs_record_balanced_accuracy_and_margins_that_follow_from_the_classifier(setup):
    runs = cached_run(setup, runs=2)
    last = runs[-1]
    scores = runs.classifier.class_scores(runs.embeddings.numpy()[last.valid_indexes])
    ordered = np.sort(scores, axis=1)
    np.testing.assert_allclose(last.margins, ordered[:, -1] - ordered[:, -2], rtol=1e-6)
    assert last.balanced_accuracy == 1.0 and runs.balanced_accuracy().mean == 1.0
    forged = protocol.Run(**{**vars(last), "targets": [0] * len(last.targets)})
    with pytest.raises(protocol.RunLogError, match="its scores do not follow"):
        forged.check_scores(source="log")
    unbalanced = protocol.Run(**{**vars(last), "balanced_accuracy": 0.5})
    with pytest.raises(protocol.RunLogError, match="its scores do not follow"):
        unbalanced.check_scores(source="log")
    assert protocol.run_table(runs)[0]["balanced_accuracy"] == 1.0


def test_partitions_differ_between_runs_and_follow_the_seed(setup):
    first = cached_run(setup, runs=3, seed=1)
    again = cached_run(setup, runs=3, seed=1)
    other = cached_run(setup, runs=3, seed=2)
    assert [r.valid_indexes for r in first] == [r.valid_indexes for r in again]
    assert len({tuple(r.valid_indexes) for r in first}) == 3
    assert [r.valid_indexes for r in first] != [r.valid_indexes for r in other]


def test_cache_is_reused_and_never_stale(setup, tmp_path, monkeypatch):
    maker, transform, encoder = setup
    cache = store.EmbeddingCache(tmp_path)
    embeddings = cached_run(setup, cache=cache).embeddings
    assert len(list(tmp_path.glob("embeddings-*.pt"))) == 1

    def no_encoding(**_kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(encoder, "embed", no_encoding)
    again = cached_run(setup, cache=cache).embeddings
    assert torch.equal(again, embeddings)
    monkeypatch.setattr(encoder, "model", torch.nn.Identity())
    with pytest.raises(AssertionError, match="cache should have been used"):
        cached_run(setup, cache=cache)


def test_resume_continues_an_interrupted_experiment(setup, tmp_path):
    log = tmp_path / "runs.jsonl"
    full = cached_run(setup, runs=4, run_log=log)
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    completed = protocol.load_run_records(log)
    assert len(completed) == 2
    resumed = cached_run(setup, runs=4, run_log=log, completed=completed)
    assert [r.topk_predictions for r in resumed] == [r.topk_predictions for r in full]
    assert resumed.runs[:2] == tuple(completed)
    assert [json.loads(line)["run"] for line in log.read_text().splitlines()] == [0, 1, 2, 3]


def test_worker_count_does_not_change_results(setup):
    serial = cached_run(setup, runs=2, workers=0)
    parallel = cached_run(setup, runs=2, workers=2)
    assert torch.allclose(serial.embeddings, parallel.embeddings, atol=1e-5)
    assert [r.topk_predictions for r in serial] == [r.topk_predictions for r in parallel]


def test_augmented_original_protocol_is_reproducible_across_workers(setup):
    maker, transform, encoder = setup
    data_config, _ = engine.eval_transform(encoder.model)
    augment = banerjee.augment_data(data_config)

    def augmented(workers):
        return protocol.run_original_protocol(
            encoder=encoder, maker=maker, encode_transform=augment, eval_transform=transform, batch_size=8,
            workers=workers, settings=config.RunSettings(runs=1, valid_share=0.3, seed=3, top_k=2), augment_seed=11,
        )

    serial, parallel = augmented(0), augmented(2)
    assert serial[0].topk_predictions == parallel[0].topk_predictions
    assert serial[0].train_accuracy == parallel[0].train_accuracy
    assert serial[0].accuracy >= 0.9


def test_loader_rejects_bad_sizes(setup):
    maker, transform, _ = setup
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        protocol.make_loader(maker.full_dataset(transform=transform), batch_size=0, workers=0,
                             device=torch.device("cpu"))


def test_single_class_and_never_validated_classes_are_warned_about(tmp_path, setup):
    from conftest import CLASS_STYLES, make_class_folders

    _, transform, encoder = setup
    root = make_class_folders(tmp_path / "uneven", classes=list(CLASS_STYLES)[:3], images_per_class=[10, 10, 2])
    with pytest.warns(UserWarning, match=r"1 class\(es\) .* never measured: 'blue triangle'"):
        protocol.run_cached_protocol(
            encoder=encoder, maker=banerjee.DatasetMaker(dataset_path=root), transform=transform, batch_size=16,
            workers=0, settings=config.RunSettings(runs=1, valid_share=0.3, seed=0, top_k=1),
        )
    single = make_class_folders(tmp_path / "single", classes=list(CLASS_STYLES)[:1], images_per_class=6)
    with pytest.warns(UserWarning, match="single class: every prediction is right"):
        runs = protocol.run_cached_protocol(
            encoder=encoder, maker=banerjee.DatasetMaker(dataset_path=single), transform=transform, batch_size=16,
            workers=0, settings=config.RunSettings(runs=1, valid_share=0.3, seed=0, top_k=1),
        )
    assert runs[0].accuracy == 1.0


def test_a_split_that_validates_no_class_is_refused_before_any_encoding(tmp_path):
    from conftest import make_class_folders

    folders = make_class_folders(tmp_path / "tiny", classes=["red circle", "green square"], images_per_class=4)
    maker = banerjee.DatasetMaker(dataset_path=folders)
    with pytest.raises(banerjee.DatasetError, match=r"No class of .*tiny is large enough to get a validation sample "
                                                    r"at --valid-share 0.2 \(the largest has 4 samples\).*at least "
                                                    r"0.25, or add samples"):
        protocol.run_cached_protocol(
            encoder=None, maker=maker, transform=None, batch_size=4, workers=0,
            settings=config.RunSettings(runs=2, valid_share=0.2, seed=0, top_k=1),
        )
    protocol.check_validation_samples(maker=maker, valid_share=0.25)  # one validation image per class: fine


def test_an_encoder_built_from_other_settings_than_the_protocols_is_refused(setup):
    maker, transform, _ = setup
    short = engine.Encoder(model=setup[2].model, device="cpu", config=config.EncoderConfig(short_run_batches=1))
    with pytest.raises(ValueError, match="The encoder stops after 1 batches but the settings' short_run is None"):
        protocol.run_cached_protocol(encoder=short, maker=maker, transform=transform, batch_size=8, workers=0,
                                     settings=config.RunSettings(runs=1, valid_share=0.3, top_k=2))
