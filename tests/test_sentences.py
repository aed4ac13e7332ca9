"""Sentences through the same code path as images: text datasets, the MiniLM encoder, protocols, script and store."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, TOPIC_WORDS, run_script, topic_sentences

import banerjee
import engine
from simsearch import cli, config, protocol
from simsearch.classdb import vector_store
from simsearch.classifiers import prototypes


def write_table(path, rows, *, sep=",", columns=("topic", "sentence")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, sep=sep, index=False)
    return path


# --- text datasets ----------------------------------------------------------------------------------------------------


def test_csv_dataset_uses_the_named_columns_and_skips_empty_and_repeated_rows(tmp_path):
    rows = topic_sentences(per_class=4) + [("sports", "   "), ("cooking", topic_sentences(per_class=4)[0][1])]
    path = write_table(tmp_path / "texts.csv", rows)
    with pytest.warns(UserWarning, match="Skipped 2 path"):
        maker = banerjee.TextDatasetMaker(dataset_path=path, text_column="sentence", label_column="topic")
    assert maker.modality == "text" and maker.get_labels() == ["cooking", "sports", "weather"]
    assert maker.get_num_images() == 12 and maker.get_texts()[:4] == [text for _, text in rows[:4]]
    assert [(str(where), reason) for where, reason in maker.skipped] == [
        (f"{path}:row 14", "empty text"),
        (f"{path}:row 15", "repeats an earlier sample of class 'cooking'"),
    ]
    with pytest.raises(banerjee.DatasetError, match=r"strict=False"):
        banerjee.TextDatasetMaker(dataset_path=path, text_column="sentence", label_column="topic", strict=True)


def test_a_sentence_repeated_with_surrounding_spaces_is_one_sample(tmp_path):
    rows = topic_sentences(per_class=3)
    padded = [("cooking", f"  {rows[0][1]}\t"), ("cooking", f"{rows[1][1]} ")]
    path = write_table(tmp_path / "texts.csv", rows + padded)
    with pytest.warns(UserWarning, match="Skipped 2 path"):
        maker = banerjee.TextDatasetMaker(dataset_path=path, text_column="sentence", label_column="topic")
    assert maker.get_num_images() == len(rows) and maker.get_texts()[:3] == [text for _, text in rows[:3]]
    assert [reason for _, reason in maker.skipped] == ["repeats an earlier sample of class 'cooking'"] * 2


def test_missing_column_names_the_columns_there_are(tmp_path):
    path = write_table(tmp_path / "texts.tsv", topic_sentences(per_class=2), sep="\t")
    with pytest.raises(banerjee.DatasetError, match="has no column 'label'; its columns are 'topic', 'sentence'"):
        banerjee.TextDatasetMaker(dataset_path=path, text_column="sentence")
    joined = banerjee.TextDatasetMaker(dataset_path=path, text_column="sentence", label_column="topic,topic")
    assert joined.get_labels() == ["cooking:cooking", "sports:sports", "weather:weather"]


def test_text_folders_one_sample_per_file_and_undecodable_files_skipped(tmp_path):
    for index, (label, text) in enumerate(topic_sentences(per_class=3)):
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f"{index:02d}.txt").write_text(text + "\n", encoding="utf-8")
    (tmp_path / "sports" / "latin1.txt").write_bytes("Le caf\xe9 gagne".encode("latin-1"))
    assert banerjee.detect_modality(tmp_path) == "text"
    with pytest.warns(UserWarning, match="not UTF-8 text"):
        maker = banerjee.make_dataset_maker(dataset_path=tmp_path)
    assert isinstance(maker, banerjee.TextDatasetMaker) and maker.get_num_images() == 9
    train, valid, _ = maker.split_indexes(valid_share=1 / 3, test_share=0.0, generator=torch.Generator().manual_seed(0))
    part = maker.datasets_from_indexes(indexes=valid)
    assert len(part) == 3 and [part.get_label(part[i][1]) for i in range(3)] == ["cooking", "sports", "weather"]
    assert part[0][0] == part.get_text(0) and part[0][0] in maker.get_texts()


def test_fingerprint_follows_the_texts_not_the_file(tmp_path):
    rows = topic_sentences(per_class=3)
    first = banerjee.TextDatasetMaker(dataset_path=write_table(tmp_path / "a.csv", rows), text_column="sentence",
                                      label_column="topic")
    same = banerjee.TextDatasetMaker(dataset_path=write_table(tmp_path / "b.csv", rows), text_column="sentence",
                                     label_column="topic")
    edited = banerjee.TextDatasetMaker(
        dataset_path=write_table(tmp_path / "c.csv", [*rows[:-1], (rows[-1][0], rows[-1][1] + "!")]),
        text_column="sentence", label_column="topic",
    )
    assert first.get_fingerprint() == same.get_fingerprint() != edited.get_fingerprint()


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(banerjee.DatasetError, match="No text dataset file at .*missing.csv"):
        banerjee.make_dataset_maker(dataset_path=tmp_path / "missing.csv")


# --- the real sentence encoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("topics") / "topics.csv", topic_sentences(per_class=15, seed=1))


@pytest.fixture(scope="module")
def text_encoder(minilm_folder):
    return engine.TextEncoder(model=engine.create_text_model(model_name=minilm_folder), device="cpu")


def test_minilm_embeddings_are_the_sentence_transformers_ones(text_encoder):
    texts = ["Where is the Louvre ?", "Who wrote Hamlet ?"]
    ours = text_encoder.embed_texts(texts=texts, batch_size=1)
    theirs = text_encoder.model.encode(texts, convert_to_tensor=True)
    assert ours.shape == (2, 384) and text_encoder.num_features == 384
    torch.testing.assert_close(ours, theirs.cpu(), atol=1e-5, rtol=0)
    assert engine.model_id(text_encoder.model).startswith("all-MiniLM-L6-v2+sha256:")


def test_bf16_text_embeddings_come_from_a_cast_copy_close_to_fp32(text_encoder):
    sentences = [sentence for _, sentence in topic_sentences(per_class=4)]
    bf16 = engine.TextEncoder(model=text_encoder.model, device="cpu", config=engine.EncoderConfig(precision="bf16"))
    with torch.inference_mode():
        reference, rounded = text_encoder._forward(sentences), bf16._forward(sentences)
    assert rounded.dtype == torch.float32 and not torch.equal(reference, rounded)
    assert torch.nn.functional.cosine_similarity(reference, rounded).min() >= 0.999
    assert next(text_encoder.model.parameters()).dtype == torch.float32  # the shared model is left as it was
    assert bf16.embedding_id == text_encoder.embedding_id + "+bf16-weights"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sentences_on_cuda_embed_close_to_the_cpu(text_encoder, precision):
    """On CUDA the whole loader batch is one inner batch, in fp32, bf16 or fp16; embeddings stay those of the CPU."""
    sentences = [sentence for _, sentence in topic_sentences(per_class=10)]
    cuda = engine.TextEncoder(model=copy.deepcopy(text_encoder.model), device="cuda",
                              config=engine.EncoderConfig(precision=precision))
    with torch.inference_mode():
        reference, on_cuda = text_encoder._forward(sentences), cuda._forward(sentences)
    assert on_cuda.dtype == torch.float32 and on_cuda.device.type == "cuda"
    assert torch.nn.functional.cosine_similarity(reference, on_cuda.cpu()).min() >= 0.999


def test_text_model_that_cannot_be_fetched_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(engine.ModelError, match="Without network access, pass a local model folder"):
        engine.create_text_model(model_name="sentence-transformers/no-such-model-here")


@pytest.mark.parametrize("classifier", [prototypes.ClassMeanClassifier(), prototypes.DecorrelatedClassifier()],
                         ids=repr)
def test_cached_protocol_classifies_topics(topics_csv, text_encoder, classifier):
    maker = banerjee.TextDatasetMaker(dataset_path=topics_csv, text_column="sentence", label_column="topic")
    runs = protocol.run_cached_protocol(
        encoder=text_encoder, maker=maker, transform=None, batch_size=16, workers=0,
        settings=config.RunSettings(runs=3, valid_share=0.2, seed=3, top_k=2, classifier=classifier),
    )
    assert runs.embeddings.shape == (45, 384)
    assert [run.accuracy for run in runs] == [1.0, 1.0, 1.0]
    hits = engine.class_hits(classifier=runs.classifier, labels=maker.get_labels(), top_k=4,
                             queries=text_encoder.embed_inputs(inputs="Whisk the eggs with a pinch of sugar."))[0]
    assert hits[0]["label"] == "cooking" and len(hits) == 3


def test_script_runs_on_a_csv_of_sentences(topics_csv, minilm_folder, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        "--dataset", topics_csv, "--text-column", "sentence", "--label-column", "topic", "--model", minilm_folder,
        "--runs", 3, "--top-k", 2, "--classifier", "decorrelated", "--out", out, "--analysis", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(3 classes, 45 texts, 0 skipped)" in result.stdout
    assert re.search(r"^Accuracy: 1\.0000 ± 0\.0000 \(95% confidence, n=3\)$", result.stdout, re.M)
    text = re.search(r"^Text: (.+)$", result.stdout, re.M).group(1)
    assert any(text.startswith(start) for starts, _, _ in TOPIC_WORDS.values() for start in starts)
    assert "Target is among predicted: True" in result.stdout
    assert not (out / "examples.png").exists()
    assert json.loads((out / "results.json").read_text())["settings"]["text_column"] == "sentence"
    assert (out / "tsne.png").exists() and (out / "prototypes.csv").exists()


def test_script_refuses_image_options_for_text(topics_csv, minilm_folder, tmp_path):
    result = run_script("--dataset", topics_csv, "--text-column", "sentence", "--label-column", "topic", "--model",
                        minilm_folder, "--top-k", 2, "--augment-encode", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1
    assert "apply to image models only" in result.stderr


# --- class store of sentences -----------------------------------------------------------------------------------------


def test_text_store_build_add_classify_and_refuse_images(topics_csv, minilm_folder, tmp_path, image_folder, capsys):
    store_path = tmp_path / "topics.npz"
    model = ["--model", str(minilm_folder)]
    assert cli.class_store_main(["build", "--dataset", str(topics_csv), "--text-column", "sentence", "--label-column",
                                 "topic", "--out", str(store_path), "--classifier", "decorrelated",
                                 "--calibrate-share", "0", *model]) == 0
    (tmp_path / "music.txt").write_text("The band played a loud guitar solo.\nThe orchestra tuned the violins.\n"
                                        "The singer hit a high note.\n", encoding="utf-8")
    assert cli.class_store_main(["add-class", "--store", str(store_path), "--texts", str(tmp_path / "music.txt"),
                                 "--label", "music", *model]) == 0
    db = vector_store.ClassVectorStore.load(path=store_path)
    assert db.identity.modality == "text" and db.labels == ["cooking", "music", "sports", "weather"]
    assert db.counts.tolist() == [15, 3, 15, 15]
    (tmp_path / "queries.txt").write_text("Simmer the beans until soft.\n\nA drummer joined the band on stage.\n",
                                          encoding="utf-8")
    capsys.readouterr()
    assert cli.class_store_main(["classify", "--store", str(store_path), str(tmp_path / "queries.txt"), *model]) == 0
    lines = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines() if line.startswith("queries")]
    assert lines == [["queries.txt:1", "cooking"], ["queries.txt:3", "music"]]
    image_model = ["--model", "tf_efficientnet_lite0"]
    assert cli.class_store_main(["classify", "--store", str(store_path), str(image_folder), *image_model]) == 1
    assert "No texts found in" in capsys.readouterr().err
    with pytest.raises(vector_store.ModelMismatchError, match="holds text classes, not image ones"):
        db.check_model(modality="image")


@pytest.mark.skipif(not (SHARED_DATA / "trec" / "train.csv").exists(), reason="../shared/data/trec is absent")
def test_trec_coarse_is_read_as_published():
    with pytest.warns(UserWarning, match="repeats an earlier sample"):
        maker = banerjee.TextDatasetMaker(dataset_path=SHARED_DATA / "trec" / "train.csv", label_column="coarse")
    assert maker.get_labels() == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert maker.get_num_images() + len(maker.skipped) == 5444
    assert np.bincount(maker.get_image_labels().numpy()).sum() == maker.get_num_images()
