"""Measured memory of a training process, to set beside the freeze map's estimate.

The freeze map estimates what a run will need before it starts; this module measures what it used, so every
run checks the estimate (`summary.json` `memory`: estimated, measured, ratio) and `bench/memory.py` can
show where the estimate is off. The baseline is taken just before the model loads, so the tokenised data,
the imported libraries and (in the TUI) the app itself are not counted.

- CUDA: `torch.cuda.max_memory_allocated` and `max_memory_reserved` of every visible device, counted from the
  baseline; the measured peak is the largest reserved figure (what the caching allocator held: it is what
  runs out).
- CPU: the peak resident set size above the baseline. On Linux the kernel keeps the peak (VmHWM), and
  writing "5" to /proc/self/clear_refs resets it to the current size; elsewhere (or when that is refused)
  a thread samples the resident size every 20 ms, which can miss a short spike.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_S = 0.02


@dataclass(frozen=True)
class MemoryPeak:
    """Peaks since the baseline, in bytes. `measured` is the figure compared with the estimate."""

    measured: int
    host: int
    cuda_allocated: list[int] | None
    cuda_reserved: list[int] | None

    def step_fields(self) -> dict[str, Any]:
        """The `step` event's memory fields."""
        return {
            "memory_peak_bytes": self.measured,
            "host_peak_bytes": self.host,
            "cuda_max_allocated_bytes": self.cuda_allocated,
            "cuda_max_reserved_bytes": self.cuda_reserved,
        }


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`), so that memory freed before the baseline and
    reused afterwards counts as growth; a no-op without glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(name).malloc_trim(0)


class MemoryMeter:
    """Peak memory of this process from `start()` on (the baseline), on the run's device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._baseline = 0
        self._cuda_baseline: list[tuple[int, int]] = []  # (allocated, reserved) per device
        self._peak = 0
        self._peak_lock = threading.Lock()  # the sampler thread and host_peak() both raise it
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        _release_free_heap()
        self._baseline = self._peak = psutil.Process().memory_info().rss
        if not self._reset_kernel_peak():
            self._sampler = threading.Thread(target=self._sample, name="finetui-memory", daemon=True)
            self._sampler.start()
        if self.device == "cuda":
            torch.cuda.empty_cache()  # blocks cached by an earlier run of this process are not this run's
            self._cuda_baseline = []
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
                self._cuda_baseline.append((torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)))

    def _reset_kernel_peak(self) -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(_SAMPLE_S):
            self._raise_peak(process.memory_info().rss)

    def _raise_peak(self, rss: int) -> int:
        with self._peak_lock:
            self._peak = max(self._peak, rss)
            return self._peak

    def stop(self) -> None:
        self._stop.set()

    def host_peak(self) -> int:
        """Peak resident memory above the baseline."""
        if self._sampler is not None:
            reading = psutil.Process().memory_info().rss
        else:
            reading = 1024 * (_status_kib("VmHWM") or 0)
        # every reading is kept: the kernel's VmHWM can read a few pages lower later (its RSS counters are lazy)
        return max(0, self._raise_peak(reading) - self._baseline)

    def peak(self) -> MemoryPeak:
        host = self.host_peak()
        if self.device != "cuda" or not self._cuda_baseline:
            return MemoryPeak(measured=host, host=host, cuda_allocated=None, cuda_reserved=None)
        allocated = [max(0, torch.cuda.max_memory_allocated(i) - a) for i, (a, _) in enumerate(self._cuda_baseline)]
        reserved = [max(0, torch.cuda.max_memory_reserved(i) - r) for i, (_, r) in enumerate(self._cuda_baseline)]
        return MemoryPeak(measured=max(reserved), host=host, cuda_allocated=allocated, cuda_reserved=reserved)


def memory_record(estimated: int | None, peak: MemoryPeak, device: str) -> dict[str, Any]:
    """`summary.json`'s `memory`: the estimate, the measured peak (bytes) and their ratio (estimated / measured)."""
    ratio = round(estimated / peak.measured, 4) if estimated and peak.measured else None
    record: dict[str, Any] = {"estimated": estimated, "measured": peak.measured, "ratio": ratio, "device": device}
    if peak.cuda_reserved is not None:
        record.update(cuda_max_allocated=peak.cuda_allocated, cuda_max_reserved=peak.cuda_reserved)
    return record
