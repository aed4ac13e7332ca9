"""randomness: global seeding, DataLoader worker seeding and private generators."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import randomness


@pytest.fixture
def restore_torch_flags():
    """set_determinism changes process-wide switches; put them back for the other tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def draw_from_global_generators() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_set_determinism_repeats_every_global_generator(monkeypatch, restore_torch_flags):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    randomness.set_determinism(seed=123)
    first = draw_from_global_generators()
    randomness.set_determinism(seed=123)
    assert draw_from_global_generators() == first
    randomness.set_determinism(seed=124)
    assert all(a != b for a, b in zip(draw_from_global_generators(), first))
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False
    assert torch.are_deterministic_algorithms_enabled() is False
    assert os.environ["PYTHONHASHSEED"] == "124"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_set_determinism_switches_deterministic_algorithms_and_keeps_user_cublas_config(
    monkeypatch, restore_torch_flags
):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    randomness.set_determinism(seed=0, use_deterministic_algorithms=True)
    assert torch.are_deterministic_algorithms_enabled() is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7"])
def test_set_determinism_rejects_seeds_numpy_cannot_take(seed, restore_torch_flags):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        randomness.set_determinism(seed=seed)


def test_make_torch_generator_with_seed_is_repeatable_and_seed_dependent():
    first = torch.randperm(50, generator=randomness.make_torch_generator(seed=5))
    again = torch.randperm(50, generator=randomness.make_torch_generator(seed=5))
    other = torch.randperm(50, generator=randomness.make_torch_generator(seed=6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert randomness.make_torch_generator(seed=5).initial_seed() == 5
    assert randomness.make_torch_generator(seed=5).device == torch.device("cpu")


def test_make_torch_generator_without_seed_repeats_like_the_original():
    default = torch.randperm(50, generator=torch.Generator())
    first = torch.randperm(50, generator=randomness.make_torch_generator())
    second = torch.randperm(50, generator=randomness.make_torch_generator())
    assert torch.equal(first, default) and torch.equal(first, second)
    assert not torch.equal(first, torch.randperm(50, generator=randomness.make_torch_generator(seed=1)))


class WorkerDraws(torch.utils.data.Dataset):
    """Reports, per item, the worker's torch seed and its first NumPy and ``random`` draws."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int, float]:
        return torch.initial_seed(), int(np.random.randint(2**30)), random.random()


def worker_draws(seed: int) -> list[tuple[int, int, float]]:
    loader = torch.utils.data.DataLoader(
        WorkerDraws(),
        batch_size=None,
        num_workers=2,
        worker_init_fn=randomness.seed_worker,
        generator=randomness.make_torch_generator(seed=seed),
    )
    return [(int(a), int(b), float(c)) for a, b, c in loader]


def test_seed_worker_seeds_numpy_and_random_from_the_worker_torch_seed():
    draws = worker_draws(seed=11)
    assert worker_draws(seed=11) == draws
    assert worker_draws(seed=12) != draws
    (seed_a, numpy_a, python_a), (seed_b, numpy_b, python_b) = draws
    assert seed_a != seed_b and numpy_a != numpy_b
    for torch_seed, numpy_value, python_value in draws:
        assert numpy_value == np.random.RandomState(torch_seed % 2**32).randint(2**30)
        assert python_value == random.Random(torch_seed % 2**32).random()
