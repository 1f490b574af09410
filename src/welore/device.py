"""Where and in what precision: the device (CUDA when present, never assumed), dtype by name, and
the peak memory a piece of work used there."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading

import psutil
import torch

from .errors import WeloreError


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise WeloreError(f"unknown device {device!r}; choose cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeloreError(f"device {device!r} requested but CUDA is not available")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None keeps the checkpoint's dtype; otherwise a torch dtype by name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise WeloreError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(table)}")
    return table[dtype]


class PeakMemory:
    """Peak memory inside a `with` block: CUDA peak allocated on GPU; on CPU the peak resident set
    size, sampled every 20 ms (and the process high-water mark, which also counts loading)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = torch.device(device), 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        proc = psutil.Process()
        self.start_rss = self.peak = proc.memory_info().rss  # a block shorter than one sample still counts

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_gib": self.peak / 2**30, "memory_kind": "cuda peak allocated"}
        return {"peak_memory_gib": self.peak / 2**30, "memory_kind": "peak RSS during training",
                "rss_at_start_gib": self.start_rss / 2**30,
                "process_peak_rss_gib": process_memory()["peak_rss_gib"]}


def peak_rss_bytes() -> int:
    """This process' RSS high-water mark. On Linux the kernel's VmHWM: getrusage's ru_maxrss survives
    exec, so a process spawned by a large one (welore compare's runs) would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def process_memory() -> dict:
    """This process' memory high-water marks so far: RSS, and CUDA's peak allocation when CUDA is used."""
    out = {"peak_rss_gib": peak_rss_bytes() / 2**30}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def release_memory() -> None:
    """Hand freed memory back: CUDA's cache, and on Linux glibc's free lists (without it a process
    that replaced full-precision weights by quantised ones keeps their pages, and its RSS, which is
    what peak memory is measured by on a CPU, says nothing about what it now holds)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
