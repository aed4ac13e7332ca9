from __future__ import annotations

import os
import pstats
import subprocess
import sys
import threading

import pytest
import torch
from conftest import REPO_ROOT

import utils


def test_get_device_force_cpu():
    assert utils.get_device(force_cpu=True) == torch.device("cpu")


def test_get_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.get_device() == torch.device("cuda:0")
    assert utils.get_device(force_cpu=True) == torch.device("cpu")


def test_resolve_device_refuses_what_the_machine_lacks_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert utils.resolve_device("auto") == torch.device("cpu") == utils.resolve_device("cpu")
    with pytest.raises(utils.UserError, match=r"^--device cuda:1: this machine has 0 CUDA device\(s\)\. Use --device"):
        utils.resolve_device("cuda:1")
    with pytest.raises(utils.UserError,
                       match="--device 'gpu7' is not a device name; use auto, cpu, cuda, cuda:N or mps"):
        utils.resolve_device("gpu7")
    with pytest.raises(utils.UserError, match="--device mps: Apple's Metal backend is not available here"):
        utils.resolve_device("mps")



def test_check_cuda_support_prints_only_when_asked(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setitem(utils._allocator_state, "allocator", "system default")
    assert utils.check_cuda_support() == (False, False)
    assert capsys.readouterr().out == ""
    assert utils.check_cuda_support(inform=True) == (False, False)
    assert capsys.readouterr().out == "CUDA support: False\nBF16 support: none\nMemory allocator: system default\n"


def test_check_cuda_support_reports_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert utils.check_cuda_support() == (True, True)
    assert utils.bf16_support() == "CUDA"


def test_the_banner_names_cpu_bf16_where_cuda_has_none(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: True)
    assert utils.check_cuda_support(inform=True) == (False, False)  # the original's return: bf16 on CUDA
    assert "BF16 support: CPU (AVX512-BF16/AMX)\n" in capsys.readouterr().out


@pytest.mark.skipif(utils._glibc() is None, reason="mallopt's parameters are glibc's")
def test_the_tuned_allocator_keeps_freed_buffers_instead_of_faulting_them_in_again():
    """A child process frees and reallocates 64 MiB buffers: with the default allocator each one is a new mmap
    (a page fault per 4 KiB page); tuned, the heap keeps them."""
    probe = (
        "import resource, sys, torch, utils\n"
        "state = utils.tune_allocator(enabled=sys.argv[1] == 'on')\n"
        "torch.empty(1 << 24).fill_(1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): torch.empty(1 << 24).fill_(1)\n"
        "print(state['tuned'], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    results = {}
    for switch in ("on", "off"):
        completed = subprocess.run([sys.executable, "-c", probe, switch], capture_output=True, text=True, check=True,
                                   cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": "."})
        tuned, faults = completed.stdout.split()
        results[switch] = (tuned == "True", int(faults))
    assert results["on"][0] and not results["off"][0]
    assert results["off"][1] > 20 * (1 << 26) // 4096 // 2  # about one fault per page of every buffer
    assert results["on"][1] < results["off"][1] // 5  # at most a buffer or two faulted in, against twenty


@pytest.mark.skipif(utils._glibc() is None, reason="the variables are glibc's")
def test_the_allocator_environment_reaches_a_thread_that_allocated_before_the_tuning():
    """Ray Data runs an actor's model in a thread of its own: once that thread has an arena, ``mallopt`` no longer
    reaches its large buffers (every 128 MiB buffer is mapped again), while a process started with
    ``allocator_environment`` keeps them in the one heap."""
    probe = (
        "import resource, threading, torch, utils\n"
        "def work():\n"
        "    torch.empty(1 << 10).fill_(1)  # the thread's first allocation gives it an arena\n"
        "    utils.tune_allocator()\n"
        "    torch.empty(1 << 25).fill_(1)\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(10): torch.empty(1 << 25).fill_(1)\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "thread = threading.Thread(target=work); thread.start(); thread.join()\n"
    )
    faults = {}
    for name, extra in (("mallopt", {}), ("environment", utils.allocator_environment())):
        completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                   cwd=REPO_ROOT,
                                   env={**os.environ, "PYTHONPATH": ".", **extra})
        faults[name] = int(completed.stdout)
    assert utils.allocator_environment()["MALLOC_MMAP_THRESHOLD_"] == str(utils.ALLOCATOR_THRESHOLD)
    assert faults["mallopt"] > 10 * (1 << 27) // 4096 // 2  # about one fault per page of every buffer
    assert faults["environment"] < faults["mallopt"] // 5


def _busy_function() -> int:
    return sum(i * i for i in range(20_000))


def test_profile_writes_loadable_prof_and_log(tmp_path):
    with utils.Profile() as profiler:
        _busy_function()
    profiler.dump(filename=tmp_path / "run")
    stats = pstats.Stats(str(tmp_path / "run.prof"))
    assert any(name == "_busy_function" for _, _, name in stats.stats)
    log = (tmp_path / "run.log").read_text(encoding="utf-8")
    assert "_busy_function" in log
    assert "Ordered by: cumulative time" in log


def test_profile_strip_dirs_sort_and_string_filename(tmp_path):
    with utils.Profile(active=True) as profiler:
        _busy_function()
    profiler.dump(filename=str(tmp_path / "sub" / "run"), sort_by="tottime", strip_dirs=True)
    files = {file for file, _, _ in pstats.Stats(str(tmp_path / "sub" / "run.prof")).stats}
    assert "test_utils.py" in files
    assert not any("/" in file for file in files)
    assert "Ordered by: internal time" in (tmp_path / "sub" / "run.log").read_text(encoding="utf-8")


def test_inactive_profile_writes_nothing(tmp_path):
    with utils.Profile(active=False) as profiler:
        _busy_function()
    profiler.dump(filename=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_profile_does_not_swallow_exceptions():
    with pytest.raises(KeyError):
        with utils.Profile():
            raise KeyError("boom")


def _tiny_training_step(scaler: utils.NativeScalerV2, *, scale_loss: float = 1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    loss = model(torch.ones(4, 3)).pow(2).mean() * scale_loss
    optimizer.zero_grad()
    scaler(loss=loss, optimizer=optimizer)
    return before, model.weight.detach()


def test_native_scaler_steps_and_reports_it():
    scaler = utils.NativeScalerV2(device="cpu")
    scale = scaler.get_scale()
    assert isinstance(scale, float) and scale >= 1.0
    assert not scaler.has_stepped()
    before, after = _tiny_training_step(scaler)
    assert not torch.equal(before, after)
    assert scaler.has_stepped()
    assert scaler.get_scale() == scale


def test_native_scaler_reports_a_skipped_step():
    scaler = utils.NativeScalerV2(device=torch.device("cpu"))
    if not scaler._scaler.is_enabled():
        pytest.skip("GradScaler is disabled on CPU in this torch version: it never skips a step")
    scale = scaler.get_scale()
    before, after = _tiny_training_step(scaler, scale_loss=float("inf"))
    assert torch.equal(before, after)
    assert not scaler.has_stepped()
    assert scaler.get_scale() == scale * 0.5


def test_native_scaler_accumulation_call_does_not_step():
    scaler = utils.NativeScalerV2(device="cpu")
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    scaler(loss=model(torch.ones(2, 3)).sum(), optimizer=optimizer, need_update=False)
    assert torch.equal(before, model.weight.detach())
    assert model.weight.grad is not None
    assert not scaler.has_stepped()


def test_prefetch_keeps_order_raises_the_sources_error_and_stops_when_left():
    assert list(utils.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("image 2 cannot be read")

    with pytest.raises(OSError, match="image 2 cannot be read"):
        list(utils.prefetch(failing()))
    pulled = []

    def counted():
        for number in range(1000):
            pulled.append(number)
            yield number

    items = utils.prefetch(counted(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # what a loop left early does
    assert len(pulled) <= 3 + 2 + 1  # the three taken, at most the queue's depth, and one in hand
    assert not any(thread.name == "prefetch" and thread.is_alive() for thread in threading.enumerate())
