"""Compute device selection, memory caps and spare-GPU mode.

This module owns three things:

  * turning a user's device spec ("auto", "cpu", "cuda", "cuda:N") into a `torch.device`,
    failing with a plain `DeviceError` instead of a CUDA stack trace;
  * capping this process's share of GPU memory and describing the device in one line;
  * spare-GPU mode: `SpareGpuGate` asks a `GpuProbe` whether any *other* process is
    computing on our GPU and, if so, waits (polling) until the GPU is free again.

Invariants: nothing here initialises CUDA unless the spec or device asks for CUDA;
probes never raise out of the gate (a broken probe fails open, with a log line, so a
missing nvidia-smi cannot stall training forever).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device does not exist or cannot be used."""


def resolve_device(spec: str) -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" to a concrete device (CUDA always with an index).

    "auto" picks the current CUDA device when one is visible, else the CPU.
    """
    s = spec.strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r} requested but no CUDA GPU is visible to PyTorch "
                f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); "
                "use --device cpu or auto"
            )
        if s == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        index_text = s.removeprefix("cuda:")
        if not index_text.isdigit():
            raise DeviceError(f"bad device {spec!r}: expected cuda:N with N a GPU index")
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {spec!r} requested but only {count} GPU(s) are visible")
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N")


def apply_memory_cap(device: torch.device, fraction: float | None) -> None:
    """Limit this process to `fraction` of the GPU's memory (None = no cap).

    Validates 0 < fraction <= 1 on every device; on the CPU there is nothing to cap.
    """
    if fraction is None:
        return
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def describe_device(device: torch.device) -> str:
    """One line for logs and status, e.g. "cpu (2 threads)" or "cuda:0 NVIDIA H100 80GB HBM3 (79.1 GiB)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} {props.name} ({props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def device_memory_bytes(device: torch.device) -> int:
    """Memory this process holds for training: tensors allocated on a CUDA device (not the
    allocator's cache), else the process's resident set size. Never initialises CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device)) if torch.cuda.is_initialized() else 0
    import psutil  # a dependency of swarm-node; imported here as only this gauge needs it

    return int(psutil.Process().memory_info().rss)


def gpu_readings(device: torch.device) -> tuple[int, int, float | None] | None:
    """(allocated bytes, reserved bytes, utilization 0..1 or None) of a CUDA device this process
    already uses; None for a CPU device or before CUDA is initialised. Utilization needs NVML
    (the nvidia-ml-py package) and is None without it."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    util: float | None
    try:
        util = torch.cuda.utilization(device) / 100.0
    except Exception:  # no NVML, or a driver that does not report it
        util = None
    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device)), util


# --------------------------------------------------------------------------- spare-GPU mode


class ProbeUnavailable(RuntimeError):
    """This kind of probe cannot work on this machine (library or tool missing)."""


@runtime_checkable
class GpuProbe(Protocol):
    def foreign_gpu_processes(self, device_index: int) -> int:
        """How many compute processes on this (torch-numbered) GPU are not this process."""
        ...


def gpu_selector(device_index: int) -> str:
    """Name torch's GPU `device_index` the way NVML and nvidia-smi will understand it.

    Torch numbers GPUs after CUDA_VISIBLE_DEVICES (and possibly CUDA_DEVICE_ORDER), while
    NVML / nvidia-smi number all physical GPUs in PCI order. The UUID is unambiguous, so use
    it when torch can tell us; otherwise fall back to the CUDA_VISIBLE_DEVICES entry or the
    index itself.
    """
    try:
        if torch.cuda.is_available():
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            if uuid:
                return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except Exception:  # noqa: BLE001 - best effort; fall through to the env mapping
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device_index < len(visible):
        return visible[device_index]
    return str(device_index)


def _count_foreign(pids: Iterable[int | None], own_pids: frozenset[int]) -> int:
    # An unknown pid (None) counts as foreign: we cannot prove it is us.
    return sum(1 for pid in pids if pid is None or pid not in own_pids)


class NvmlProbe:
    """Asks NVML (the `pynvml` module from nvidia-ml-py) for the GPU's compute processes."""

    def __init__(self, own_pids: Iterable[int] | None = None) -> None:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
        except Exception as e:  # ImportError, or NVMLError when there is no driver
            raise ProbeUnavailable(f"NVML unavailable: {e}") from e
        self._nvml = pynvml
        self._own = frozenset(own_pids) if own_pids is not None else frozenset({os.getpid()})

    def foreign_gpu_processes(self, device_index: int) -> int:
        nv = self._nvml
        selector = gpu_selector(device_index)
        if selector.startswith(("GPU-", "MIG-")):
            handle = nv.nvmlDeviceGetHandleByUUID(selector)
        else:
            handle = nv.nvmlDeviceGetHandleByIndex(int(selector))
        procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        return _count_foreign((p.pid for p in procs), self._own)


Runner = Callable[[list[str]], str]


def _run_command(argv: list[str], timeout_s: float = 10.0) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=True)
    return done.stdout


def parse_compute_app_pids(text: str) -> list[int | None]:
    """Parse `nvidia-smi --query-compute-apps=pid --format=csv,noheader` output.

    One pid per line; blank lines and the "No running processes found" banner of older
    drivers are ignored; an entry that is not a number (e.g. "[N/A]" inside some
    containers) is kept as None, meaning "some process, pid unknown".
    """
    pids: list[int | None] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.lower().startswith("no running"):
            continue
        first = line.split(",")[0].strip()
        pids.append(int(first) if first.isdigit() else None)
    return pids


class NvidiaSmiProbe:
    """Runs `nvidia-smi --query-compute-apps=pid` for the GPU and counts pids that are not ours.

    `runner` (argv -> stdout) is injectable for tests; it should raise on failure.
    """

    def __init__(self, runner: Runner | None = None, own_pids: Iterable[int] | None = None) -> None:
        if runner is None:
            if shutil.which("nvidia-smi") is None:
                raise ProbeUnavailable("nvidia-smi not found on PATH")
            runner = _run_command
        self._run = runner
        self._own = frozenset(own_pids) if own_pids is not None else frozenset({os.getpid()})

    def foreign_gpu_processes(self, device_index: int) -> int:
        argv = [
            "nvidia-smi",
            "-i",
            gpu_selector(device_index),
            "--query-compute-apps=pid",
            "--format=csv,noheader",
        ]
        return _count_foreign(parse_compute_app_pids(self._run(argv)), self._own)


class NullProbe:
    """Sees nothing: spare-GPU mode never pauses (used when no real probe works)."""

    def foreign_gpu_processes(self, device_index: int) -> int:
        return 0


def make_probe() -> GpuProbe:
    """The first probe that works here: NVML, then nvidia-smi, then `NullProbe`."""
    for kind in (NvmlProbe, NvidiaSmiProbe):
        try:
            return kind()
        except ProbeUnavailable as e:
            log.debug("%s: %s", kind.__name__, e)
    log.warning("spare-GPU mode: neither NVML nor nvidia-smi works here; never pausing")
    return NullProbe()


class SpareGpuGate:
    """Decides whether training should yield the GPU to other processes, and waits it out.

    `clock` and `sleep` are injectable for tests. By default sleeping is `stop.wait`, so a
    set stop event ends a wait immediately rather than after the poll interval.
    """

    def __init__(
        self,
        probe: GpuProbe,
        device_index: int,
        *,
        poll_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.probe = probe
        self.device_index = device_index
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep

    def _foreign(self) -> int:
        try:
            return self.probe.foreign_gpu_processes(self.device_index)
        except Exception as e:  # noqa: BLE001 - fail open: a broken probe must not stall training
            log.warning("spare-GPU probe %s failed (%s); not pausing", type(self.probe).__name__, e)
            return 0

    def should_pause(self) -> bool:
        """True while another process is computing on our GPU."""
        return self._foreign() > 0

    def wait_until_free(
        self, stop: threading.Event, on_pause: Callable[[int], None] | None = None
    ) -> float:
        """Block while the GPU is busy; return the seconds spent paused (0.0 if it was free).

        `on_pause(n)` is called when a pause starts and whenever the number of foreign
        processes changes during it. Returns early, without waiting for the GPU, once `stop`
        is set.
        """
        start = self._clock()
        busy = self._foreign()
        if busy == 0:
            return 0.0
        if on_pause is not None:
            on_pause(busy)
        while not stop.is_set():
            if self._sleep is None:
                stop.wait(self.poll_interval_s)
            else:
                self._sleep(self.poll_interval_s)
            if stop.is_set():
                break
            now_busy = self._foreign()
            if now_busy == 0:
                break
            if now_busy != busy and on_pause is not None:
                on_pause(now_busy)
            busy = now_busy
        return self._clock() - start
