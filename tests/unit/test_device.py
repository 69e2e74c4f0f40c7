"""Device resolution, memory caps, GPU probes (with fakes) and the spare-GPU gate."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from swarm_node.train import device as dev
from swarm_node.train.device import (
    DeviceError,
    GpuProbe,
    NullProbe,
    NvidiaSmiProbe,
    SpareGpuGate,
    apply_memory_cap,
    describe_device,
    make_probe,
    parse_compute_app_pids,
    resolve_device,
)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_cpu_and_auto_without_gpu(no_cuda: None) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" AUTO ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_is_a_plain_error(no_cuda: None, spec: str) -> None:
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", ""])
def test_unknown_specs_rejected(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # get past the GPU check
    with pytest.raises(DeviceError):
        resolve_device(spec)


def test_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="only 1 GPU"):
        resolve_device("cuda:1")


def test_memory_cap_validates_and_is_noop_on_cpu() -> None:
    cpu = torch.device("cpu")
    apply_memory_cap(cpu, None)
    apply_memory_cap(cpu, 0.5)
    apply_memory_cap(cpu, 1.0)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            apply_memory_cap(cpu, bad)


def test_describe_cpu() -> None:
    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------ probes


def test_parse_compute_app_pids() -> None:
    assert parse_compute_app_pids("") == []
    assert parse_compute_app_pids("No running processes found\n") == []
    assert parse_compute_app_pids("1234\n 5678 \n\n[N/A]\n") == [1234, 5678, None]
    assert parse_compute_app_pids("42, python, 100 MiB\n") == [42]


def test_nvidia_smi_probe_counts_only_foreign_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no UUID: use the env mapping
    seen: list[list[str]] = []
    me = os.getpid()

    def runner(argv: list[str]) -> str:
        seen.append(argv)
        return f"{me}\n111\n222\n"

    probe = NvidiaSmiProbe(runner=runner)
    assert isinstance(probe, GpuProbe)
    assert probe.foreign_gpu_processes(1) == 2
    assert seen[0][:3] == ["nvidia-smi", "-i", "5"]  # torch index 1 -> physical GPU 5
    assert "--query-compute-apps=pid" in seen[0] and "--format=csv,noheader" in seen[0]
    assert NvidiaSmiProbe(runner=lambda argv: f"{me}\n").foreign_gpu_processes(0) == 0
    assert NvidiaSmiProbe(runner=lambda argv: "[N/A]\n").foreign_gpu_processes(0) == 1


def test_make_probe_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*a: object, **k: object) -> None:
        raise dev.ProbeUnavailable("nope")

    monkeypatch.setattr(dev, "NvmlProbe", unavailable)
    monkeypatch.setattr(dev, "NvidiaSmiProbe", unavailable)
    assert isinstance(make_probe(), NullProbe)
    assert NullProbe().foreign_gpu_processes(0) == 0


# ------------------------------------------------------------------ gate


class FakeProbe:
    """Returns the scripted counts in order, then repeats the last one."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = list(counts)
        self.calls = 0

    def foreign_gpu_processes(self, device_index: int) -> int:
        self.calls += 1
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_gate_free_gpu_returns_immediately() -> None:
    t = FakeTime()
    gate = SpareGpuGate(FakeProbe([0]), 0, poll_interval_s=2.0, clock=t.clock, sleep=t.sleep)
    assert not gate.should_pause()
    assert gate.wait_until_free(threading.Event()) == 0.0
    assert t.sleeps == []


def test_gate_pauses_while_busy_then_resumes() -> None:
    t = FakeTime()
    probe = FakeProbe([1, 2, 2, 0])
    gate = SpareGpuGate(probe, 0, poll_interval_s=2.0, clock=t.clock, sleep=t.sleep)
    pauses: list[int] = []
    paused = gate.wait_until_free(threading.Event(), on_pause=pauses.append)
    assert paused == 6.0  # three polls of 2 s until the count hit 0
    assert t.sleeps == [2.0, 2.0, 2.0]
    assert pauses == [1, 2]  # at the start, and when the count changed
    assert probe.calls == 4


def test_gate_returns_early_when_stopped() -> None:
    t = FakeTime()
    stop = threading.Event()

    def sleep(s: float) -> None:
        t.sleep(s)
        if len(t.sleeps) == 2:
            stop.set()

    gate = SpareGpuGate(FakeProbe([1]), 0, poll_interval_s=1.0, clock=t.clock, sleep=sleep)
    assert gate.wait_until_free(stop) == 2.0
    already = threading.Event()
    already.set()
    assert gate.wait_until_free(already) == 0.0  # busy but stopped: no sleeping at all


def test_gate_default_sleep_wakes_on_stop() -> None:
    gate = SpareGpuGate(FakeProbe([1]), 0, poll_interval_s=30.0)
    stop = threading.Event()
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    try:
        assert gate.wait_until_free(stop) < 5.0  # not the 30 s poll interval
    finally:
        timer.cancel()


def test_gate_fails_open_when_probe_breaks() -> None:
    class Broken:
        def foreign_gpu_processes(self, device_index: int) -> int:
            raise RuntimeError("nvidia-smi exploded")

    gate = SpareGpuGate(Broken(), 0, poll_interval_s=1.0)
    assert not gate.should_pause()
    assert gate.wait_until_free(threading.Event()) == 0.0


def test_gpu_readings_are_none_on_cpu_and_survive_a_driver_without_utilization(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dev.gpu_readings(torch.device("cpu")) is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert dev.gpu_readings(cuda) is None  # never initialises CUDA itself
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 3 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 8 << 20)

    def no_nvml(d):
        raise ModuleNotFoundError("pynvml")
    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    assert dev.gpu_readings(cuda) == (3 << 20, 8 << 20, None)
    monkeypatch.setattr(torch.cuda, "utilization", lambda d: 42)
    assert dev.gpu_readings(cuda) == (3 << 20, 8 << 20, 0.42)


@pytest.mark.gpu
def test_gpu_readings_on_a_real_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = torch.ones(1 << 20, device="cuda")
    allocated, reserved, util = dev.gpu_readings(x.device)
    assert allocated >= x.numel() * 4 and reserved >= allocated and (util is None or 0.0 <= util <= 1.0)
