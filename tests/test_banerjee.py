"""banerjee: enumeration, per-class splits, saved states, label selection, loading and augmentation."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import CLASS_STYLES, SHARED_DATA, make_class_folders
from PIL import Image

import banerjee

pytestmark = pytest.mark.filterwarnings("error::UserWarning")

UNEVEN_COUNTS = [7, 13, 20, 3]
DATA_CONFIG = {"input_size": (3, 64, 64), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture(scope="module")
def uneven_folder(tmp_path_factory) -> pathlib.Path:
    """Four classes of 7, 13, 20 and 3 images: per-class rounding and empty parts show up."""
    return make_class_folders(
        tmp_path_factory.mktemp("uneven"), classes=list(CLASS_STYLES)[:4], images_per_class=UNEVEN_COUNTS, seed=1
    )


@pytest.fixture(scope="module")
def uneven(uneven_folder) -> banerjee.DatasetMaker:
    return banerjee.DatasetMaker(dataset_path=uneven_folder)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def paths_of(dataset: banerjee.Animal90) -> list[pathlib.Path]:
    return [dataset.get_image_path(index) for index in range(len(dataset))]


# ---------------------------------------------------------------------------------------------------------------
# Enumeration
# ---------------------------------------------------------------------------------------------------------------


def test_enumeration_orders_classes_and_files_by_name(image_folder):
    maker = banerjee.DatasetMaker(dataset_path=str(image_folder))
    classes = sorted(list(CLASS_STYLES)[:4])
    assert maker.dataset_path == image_folder
    assert maker.get_labels() == classes
    assert maker.get_num_labels() == 4
    assert maker.get_num_images() == 40
    expected = [image_folder / label / f"img_{index:03d}.jpg" for label in classes for index in range(10)]
    assert maker.get_image_paths() == expected
    assert maker.get_image_labels().tolist() == [label for label in range(4) for _ in range(10)]
    assert maker.get_image_labels().dtype == torch.long
    assert maker.skipped == []


def test_fingerprint_has_relative_path_size_and_mtime(image_folder):
    fingerprint = banerjee.DatasetMaker(dataset_path=image_folder, check_images=False).get_fingerprint()
    first = sorted(list(CLASS_STYLES)[:4])[0]
    stat = (image_folder / first / "img_000.jpg").stat()
    assert len(fingerprint) == 40
    assert fingerprint[0] == (f"{first}/img_000.jpg", stat.st_size, stat.st_mtime_ns)


def test_fingerprint_changes_when_a_file_is_rewritten(tmp_path):
    root = make_class_folders(tmp_path, classes=list(CLASS_STYLES)[:2], images_per_class=2)
    before = banerjee.DatasetMaker(dataset_path=root).get_fingerprint()
    path = root / "green square" / "img_001.jpg"
    Image.new("RGB", (50, 50), (1, 2, 3)).save(path)
    after = banerjee.DatasetMaker(dataset_path=root).get_fingerprint()
    assert [before[0], *before[2:]] == [after[0], *after[2:]]  # "green square" sorts before "red circle"
    assert before[1] != after[1] and after[1][0] == "green square/img_001.jpg"


def test_animal90_kaggle_layout_uses_the_inner_folder_and_warns_about_the_outer_one(tmp_path):
    outer = tmp_path / "animals"
    make_class_folders(outer / "animals", classes=list(CLASS_STYLES)[:3], images_per_class=2)
    (outer / "name of the animals.txt").write_text("red circle\ngreen square\nblue triangle\n")
    maker = banerjee.DatasetMaker(dataset_path=outer / "animals")
    assert maker.get_labels() == ["blue triangle", "green square", "red circle"]
    with pytest.warns(UserWarning, match=r"single class folder.*pass .*animals/animals instead"):
        wrong = banerjee.DatasetMaker(dataset_path=outer)
    assert wrong.get_labels() == ["animals"]


@pytest.mark.skipif(not (SHARED_DATA / "caltech101").is_dir(), reason="shared caltech101 data is absent")
def test_caltech101_enumeration_and_checking():
    root = SHARED_DATA / "caltech101"
    maker = banerjee.DatasetMaker(dataset_path=root, check_images=True)
    assert maker.get_num_labels() == 101
    assert maker.get_num_images() == 8677
    assert maker.skipped == []
    train, valid, test = maker.split_indexes(valid_share=0.2, test_share=0.0, generator=generator(0))
    counts = [end - begin for _, begin, end in maker.full_dataset().get_state()["labels"]]
    assert len(valid) == sum(int(n * 0.2) for n in counts)
    assert len(train) + len(valid) == 8677 and len(test) == 0


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


def test_split_parts_are_disjoint_cover_everything_and_keep_per_class_counts(uneven):
    train, valid, test = uneven.split_indexes(valid_share=0.15, test_share=0.25, generator=generator(0))
    assert set(train.tolist()).isdisjoint(valid.tolist())
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert set(valid.tolist()).isdisjoint(test.tolist())
    assert sorted(torch.cat([train, valid, test]).tolist()) == list(range(sum(UNEVEN_COUNTS)))
    labels = uneven.get_image_labels()
    sorted_counts = [UNEVEN_COUNTS[index] for index in (2, 1, 0, 3)]  # classes sorted by name
    for label_idx, n in enumerate(sorted_counts):
        assert int((labels[valid] == label_idx).sum()) == int(n * 0.15)
        assert int((labels[test] == label_idx).sum()) == int(n * 0.25)
        assert int((labels[train] == label_idx).sum()) == n - int(n * 0.15) - int(n * 0.25)
    for part in (train, valid, test):  # classes are concatenated in class order
        assert labels[part].tolist() == sorted(labels[part].tolist())


def test_split_depends_only_on_the_generator_seed(uneven):
    first = uneven.split_indexes(valid_share=0.2, test_share=0.2, generator=generator(3))
    again = uneven.split_indexes(valid_share=0.2, test_share=0.2, generator=generator(3))
    other = uneven.split_indexes(valid_share=0.2, test_share=0.2, generator=generator(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_make_datasets_gives_the_split_indexes_partition(uneven):
    paths = uneven.get_image_paths()
    indexes = uneven.split_indexes(valid_share=0.2, test_share=0.1, generator=generator(9))
    datasets = uneven.make_datasets(valid_share=0.2, test_share=0.1, generator=generator(9))
    for part, dataset in zip(indexes, datasets):
        assert paths_of(dataset) == [paths[index] for index in part.tolist()]
        assert dataset.get_targets() == uneven.get_image_labels()[part].tolist()


def test_make_datasets_applies_train_and_eval_transforms(uneven):
    train_ds, valid_ds, test_ds = uneven.make_datasets(
        train_transform=TF.hflip, eval_transform=TF.to_grayscale, generator=generator(0)
    )
    assert train_ds.get_transform() is TF.hflip
    assert valid_ds.get_transform() is TF.to_grayscale and test_ds.get_transform() is TF.to_grayscale


def test_label_indexes_align_across_parts_when_a_class_has_no_valid_image(uneven):
    train_ds, valid_ds, test_ds = uneven.make_datasets(valid_share=0.2, test_share=0.2, generator=generator(0))
    # The 3-image class gets int(3 * 0.2) = 0 validation and test images but keeps its label index.
    small = uneven.get_labels().index("yellow stripes")
    for dataset in (train_ds, valid_ds, test_ds):
        assert dataset.get_labels() == uneven.get_labels()
        assert dataset.get_num_act_labels() == 4
    assert valid_ds.get_num_images_by_label(small) == 0
    assert train_ds.get_num_images_by_label(small) == 3
    valid_labels = [path.parent.name for path in paths_of(valid_ds)]
    assert [valid_ds.get_label(target) for target in valid_ds.get_targets()] == valid_labels


def test_restore_datasets_round_trips_through_json(uneven):
    parts = uneven.make_datasets(valid_share=0.2, test_share=0.2, generator=generator(1))
    parts[0].use_labels(label_indexes=[0, 2])
    states = [json.loads(json.dumps(dataset.get_state())) for dataset in parts]
    assert states == [dataset.get_state() for dataset in parts]
    restored = uneven.restore_datasets(
        train_ds_state=states[0], valid_ds_state=states[1], test_ds_state=states[2], eval_transform=TF.hflip
    )
    for original, copy in zip(parts, restored):
        assert paths_of(copy) == paths_of(original)
        assert copy.get_targets() == original.get_targets()
        assert copy.get_act_labels() == original.get_act_labels()
    assert restored[0].get_num_act_labels() == 2
    assert restored[1].get_transform() is TF.hflip and restored[0].get_transform() is None


def test_restore_datasets_leaves_missing_states_as_none(uneven):
    train_ds, _, _ = uneven.make_datasets(generator=generator(0))
    restored = uneven.restore_datasets(train_ds_state=train_ds.get_state())
    assert restored[1] is None and restored[2] is None
    assert len(restored[0]) == len(train_ds)


def test_datasets_from_indexes_groups_by_class_and_keeps_order_within_a_class(uneven):
    paths = uneven.get_image_paths()
    labels = uneven.get_image_labels()
    indexes = [30, 2, 41, 0, 25, 5]
    dataset = uneven.datasets_from_indexes(indexes=indexes)
    expected = sorted(indexes, key=lambda index: int(labels[index]))  # sorted() is stable
    assert paths_of(dataset) == [paths[index] for index in expected]
    assert dataset.get_targets() == [int(labels[index]) for index in expected]


def test_full_dataset_is_the_global_order(uneven):
    dataset = uneven.full_dataset()
    assert paths_of(dataset) == uneven.get_image_paths()
    assert dataset.get_targets() == uneven.get_image_labels().tolist()
    assert dataset.get_num_images() == len(dataset) == sum(UNEVEN_COUNTS)


# ---------------------------------------------------------------------------------------------------------------
# Active labels
# ---------------------------------------------------------------------------------------------------------------


def test_use_labels_by_indexes_renumbers_the_selected_classes(uneven):
    dataset = uneven.full_dataset()
    labels = uneven.get_labels()
    dataset.use_labels(label_indexes=[3, 1])
    assert dataset.get_act_labels() == [(labels[1], 1), (labels[3], 3)]
    assert [dataset.act_label_idx_to_label_idx(index) for index in (0, 1)] == [1, 3]
    assert [dataset.get_label(index) for index in (0, 1)] == [labels[1], labels[3]]
    sizes = [13, 3]  # "green square", "yellow stripes"
    assert len(dataset) == sum(sizes)
    assert [dataset.get_num_images_by_label(index) for index in (0, 1)] == sizes
    assert dataset.get_targets() == [0] * 13 + [1] * 3
    assert dataset[13][1] == 1 and dataset.get_image_path(13).parent.name == labels[3]
    assert dataset.get_num_images() == sum(UNEVEN_COUNTS) and dataset.get_num_labels() == 4
    dataset.use_labels()
    assert len(dataset) == sum(UNEVEN_COUNTS)


def test_use_labels_by_share_draws_from_the_generator(uneven):
    dataset = uneven.full_dataset()
    chosen = []
    for seed in (0, 0, 1, 2, 3):
        dataset.use_labels(share=0.5, generator=generator(seed))
        chosen.append([label_idx for _, label_idx in dataset.get_act_labels()])
    assert all(len(labels) == 2 and labels == sorted(labels) for labels in chosen)
    assert chosen[0] == chosen[1]
    assert len({tuple(labels) for labels in chosen}) > 1
    dataset.use_labels(share=0.0)
    assert len(dataset) == 0 and dataset.get_num_act_labels() == 0


def test_use_labels_refuses_ambiguous_or_bad_selections(uneven):
    dataset = uneven.full_dataset()
    with pytest.raises(ValueError, match="either by label_indexes or by share"):
        dataset.use_labels(label_indexes=[0], share=0.5)
    with pytest.raises(banerjee.DatasetError, match=r"share must be a number in \[0, 1\], got 1.5"):
        dataset.use_labels(share=1.5)
    with pytest.raises(banerjee.DatasetError, match=r"\[4\] are outside 0..3"):
        dataset.use_labels(label_indexes=[0, 4])
    with pytest.raises(banerjee.DatasetError, match="unique"):
        dataset.use_labels(label_indexes=[1, 1])


# ---------------------------------------------------------------------------------------------------------------
# Items, image types and transforms
# ---------------------------------------------------------------------------------------------------------------


def test_getitem_returns_rgb_pil_or_uint8_tensor(image_folder):
    dataset = banerjee.DatasetMaker(dataset_path=image_folder).full_dataset()
    image, target = dataset[15]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (96, 96)
    assert target == 1
    dataset.set_image_type("Tensor")
    tensor, _ = dataset[15]
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 96, 96)
    assert torch.equal(tensor, TF.pil_to_tensor(image))
    dataset.set_image_type("tsr")
    assert isinstance(dataset[0][0], torch.Tensor)
    dataset.set_image_type("pil")
    assert isinstance(dataset[0][0], Image.Image)
    with pytest.raises(ValueError, match="Unknown image type 'numpy'"):
        dataset.set_image_type("numpy")


def test_set_transform_is_applied_to_items(image_folder):
    dataset = banerjee.DatasetMaker(dataset_path=image_folder).full_dataset(transform=TF.to_grayscale)
    assert dataset[0][0].mode == "L"
    dataset.set_transform(None)
    assert dataset.get_transform() is None and dataset[0][0].mode == "RGB"


def test_augment_data_pipeline(image_folder):
    transform = banerjee.augment_data(DATA_CONFIG)
    names = [type(step).__name__ for step in transform.transforms]
    assert names == ["Resize", "CenterCrop", "RandomHorizontalFlip", "ColorJitter", "MaybeToTensor", "Normalize"]
    assert transform.transforms[0].size == 67  # int(1.05 * 64)
    assert transform.transforms[3].brightness == (0.6, 1.4)
    image = banerjee.load_rgb_image(image_folder / "red circle" / "img_000.jpg")
    output = transform(image)
    assert output.shape == (3, 64, 64) and output.dtype == torch.float32
    assert -2.2 < float(output.min()) and float(output.max()) < 2.7  # normalized, not raw 0..255


def augmented(dataset: banerjee.Animal90, *, num_workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, num_workers=num_workers)
    return torch.cat([inputs for inputs, _ in loader])


def test_sample_seed_makes_augmentation_independent_of_workers_and_runs(image_folder):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    dataset = maker.full_dataset(transform=banerjee.augment_data(DATA_CONFIG))
    dataset.set_sample_seed(7)
    single = augmented(dataset, num_workers=0)
    assert torch.equal(augmented(dataset, num_workers=2), single)
    assert torch.equal(augmented(dataset, num_workers=0), single)
    dataset.set_sample_seed(8)
    assert not torch.equal(augmented(dataset, num_workers=0), single)
    dataset.set_sample_seed(None)
    assert not torch.equal(dataset[0][0], dataset[0][0])  # unseeded: ColorJitter differs per call


def test_sample_seed_follows_the_image_not_its_position(image_folder):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    transform = banerjee.augment_data(DATA_CONFIG)
    full = maker.full_dataset(transform=transform)
    train_ds, _, _ = maker.make_datasets(train_transform=transform, generator=generator(0))
    restored, _, _ = maker.restore_datasets(train_ds_state=train_ds.get_state(), train_transform=transform)
    for dataset in (full, train_ds, restored):
        dataset.set_sample_seed(3)
    path_index = {path: index for index, path in enumerate(maker.get_image_paths())}
    for index in (0, 5, 17):
        path = train_ds.get_image_path(index)
        assert torch.equal(train_ds[index][0], full[path_index[path]][0])
        assert torch.equal(restored[index][0], train_ds[index][0])


def test_sample_seed_leaves_the_global_generators_alone(image_folder):
    maker = banerjee.DatasetMaker(dataset_path=image_folder)
    dataset = maker.full_dataset(transform=banerjee.augment_data(DATA_CONFIG))
    dataset.set_sample_seed(0)
    state = torch.get_rng_state()
    dataset[0]
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        dataset.set_sample_seed(0.5)


def test_unreadable_image_error_survives_pickling(tmp_path):
    error = banerjee.UnreadableImageError(tmp_path / "x.jpg", "broken")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, OSError)
    assert (copy.path, copy.reason, str(copy)) == (error.path, "broken", str(error))


def test_a_listing_handed_over_whole_restores_saved_parts_as_a_dataset_listing_does(tmp_path):
    """An embedding set's listing once filled a SampleListing's private attributes from outside and left its
    global index unset, so restoring saved parts failed; built through ListedSamples it lists as the dataset."""
    make_class_folders(tmp_path / "data", classes=list(CLASS_STYLES)[:3], images_per_class=4)
    maker = banerjee.DatasetMaker(dataset_path=tmp_path / "data")
    names = [str(path) for path in maker.get_image_paths()]
    counts = torch.bincount(maker.get_image_labels()).tolist()
    starts = [sum(counts[:row]) for row in range(len(counts) + 1)]
    listed = banerjee.ListedSamples(
        modality="image", dataset_path=maker.dataset_path, fingerprint="embedding-set:x",
        classes={label: names[starts[row]:starts[row + 1]] for row, label in enumerate(maker.get_labels())},
    )
    assert listed.get_labels() == maker.get_labels()
    assert torch.equal(listed.get_image_labels(), maker.get_image_labels())
    part = listed.datasets_from_indexes(indexes=[1, 5, 9])
    _, restored, _ = listed.restore_datasets(valid_ds_state=part.get_state())
    assert restored.get_state() == part.get_state() and restored._global_indexes == [1, 5, 9]
    assert [restored.get_image_path(index) for index in range(3)] == [maker.get_image_paths()[i] for i in (1, 5, 9)]
