"""The tensor decode path (JPEG bytes in the loader, decoding, resizing and normalising on the device) against
today's PIL path: close embeddings, the files it cannot take routed through PIL and counted, its own cache key.
The same code runs with nvJPEG on CUDA (``cuda`` marker, skipped without a GPU)."""

from __future__ import annotations

import copy
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import banerjee
import engine
import store
from simsearch import decoding, protocol


def embed(encoder, folder: pathlib.Path, *, decode: str, cache=None) -> torch.Tensor:
    maker = banerjee.DatasetMaker(dataset_path=folder)
    transform = engine.eval_transform(encoder.model)[1]
    embeddings, targets = protocol.embed_all_images(encoder=encoder, maker=maker, transform=transform, batch_size=8,
                                                    workers=0, decode=decode, cache=cache)
    assert targets.tolist() == maker.get_image_labels().tolist()
    return embeddings


def cosines(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(left, right, dim=1)


@pytest.fixture(scope="module")
def cpu_encoder(lite0_model):
    return engine.Encoder(model=lite0_model, device="cpu")


def test_the_tensor_path_embeds_every_jpeg_close_to_the_pil_path(cpu_encoder, image_folder):
    tensor, pil = embed(cpu_encoder, image_folder, decode="tensor"), embed(cpu_encoder, image_folder, decode="pil")
    similarity = cosines(tensor, pil)
    assert similarity.min() > 0.99  # bicubic resampling of tensors and of PIL images rounds differently
    assert similarity.mean() > 0.995


def odd_files(folder: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """One class of files the device decoder must not take (PNG, CMYK, EXIF-rotated, progressive) and one of plain
    JPEGs, a grey one among them."""
    image = Image.open(source).convert("RGB")
    odd, plain = folder / "odd", folder / "plain"
    odd.mkdir(parents=True)
    plain.mkdir()
    image.save(odd / "a.png")
    image.convert("CMYK").save(odd / "b.jpg")
    exif = Image.Exif()
    exif[decoding.EXIF_ORIENTATION] = 6
    image.save(odd / "c.jpg", exif=exif)
    image.save(odd / "d.jpg", progressive=True)
    image.save(plain / "e.jpg")
    image.convert("L").save(plain / "f.jpg")
    return folder


def test_files_the_device_decoder_cannot_take_go_through_pil_and_are_counted(cpu_encoder, image_folder, tmp_path,
                                                                           capsys):
    folder = odd_files(tmp_path / "set", next(image_folder.rglob("*.jpg")))
    maker = banerjee.DatasetMaker(dataset_path=folder)
    item, pipeline = decoding.tensor_pipeline(engine.split_normalization(
        engine.eval_transform(cpu_encoder.model)[1])[0], device=cpu_encoder.device,
        normalize=engine.split_normalization(engine.eval_transform(cpu_encoder.model)[1])[1])
    kinds = [item(path)[0] for path in maker.get_image_paths()]
    assert kinds == ["pixels"] * 4 + ["jpeg"] * 2
    tensor, pil = embed(cpu_encoder, folder, decode="tensor"), embed(cpu_encoder, folder, decode="pil")
    np.testing.assert_allclose(tensor[:4].numpy(), pil[:4].numpy(), atol=1e-4)  # the same PIL pixels
    assert cosines(tensor[4:], pil[4:]).min() > 0.99


def test_the_decoder_is_part_of_the_cache_key(cpu_encoder, image_folder, tmp_path):
    cache = store.EmbeddingCache(tmp_path / "cache")
    embed(cpu_encoder, image_folder, decode="pil", cache=cache)
    embed(cpu_encoder, image_folder, decode="tensor", cache=cache)
    assert len(list((tmp_path / "cache").glob("embeddings-*.pt"))) == 2


def test_an_unknown_decoder_is_refused(cpu_encoder, image_folder):
    with pytest.raises(ValueError, match="Unknown decoder 'nvdec'; use one of pil, tensor"):
        embed(cpu_encoder, image_folder, decode="nvdec")


@pytest.mark.cuda
def test_nvjpeg_on_cuda_embeds_close_to_pil_on_the_cpu(lite0_model, image_folder):
    cuda = engine.Encoder(model=copy.deepcopy(lite0_model), device="cuda")  # the session's model stays on the CPU
    nvjpeg = embed(cuda, image_folder, decode="tensor").cpu()
    pil = embed(engine.Encoder(model=lite0_model, device="cpu"), image_folder, decode="pil")
    assert cosines(nvjpeg, pil).min() > 0.99


def test_a_jpeg_damaged_past_its_header_fails_as_on_the_pil_path_naming_it(cpu_encoder, image_folder, tmp_path):
    """Unchecked listing (``check_images=False``): the batch decode fails, each image is decoded alone, and the
    damaged one goes through PIL, which names it; the good one in the same batch still decodes on the device."""
    folder = tmp_path / "set" / "a"
    folder.mkdir(parents=True)
    source = next(image_folder.rglob("*.jpg"))
    shutil.copy(source, folder / "good.jpg")
    data = source.read_bytes()
    (folder / "half.jpg").write_bytes(data[: len(data) // 2])
    maker = banerjee.DatasetMaker(dataset_path=folder.parent, check_images=False)
    transform = engine.eval_transform(cpu_encoder.model)[1]
    for decode in ("pil", "tensor"):
        with pytest.raises(banerjee.UnreadableImageError, match="half.jpg: OSError: image file is truncated"):
            protocol.embed_all_images(encoder=cpu_encoder, maker=maker, transform=transform, batch_size=2, workers=0,
                                      decode=decode)
    image_transform, normalize = engine.split_normalization(transform)
    item, pipeline = decoding.tensor_pipeline(image_transform, device=cpu_encoder.device, normalize=normalize)
    pipeline([item(folder / "good.jpg"), item(folder / "good.jpg")])
    assert (pipeline.decoded, pipeline.fallbacks) == (2, 0)
