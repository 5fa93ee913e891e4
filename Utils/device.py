"""Where and how a run computes: the device, the CPU threads, the matrix-product precision, and what the machine is.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from Utils.errors import UsageError


def resolve_device(name: str, gpu: str = "0") -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto.")
        return torch.device(f"cuda:{gpu}" if gpu.isdigit() else "cuda")
    return torch.device("cpu")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a cgroup, `taskset` or a cluster job may give
    it fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_threads(text: str) -> str:
    """'auto' or a whole number, as text (checked against the machine by `resolve_threads` when the run starts)."""
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip().isdigit():
        return str(int(text))
    raise argparse.ArgumentTypeError(f"expected auto or a whole number of threads, got {text!r}")


def resolve_threads(spec: str, device: torch.device) -> int:
    """The number of CPU threads of a run: --threads N, or for 'auto' the CPUs this process may use, never more
    than torch's own default; applied with `torch.set_num_threads`.

    torch's default counts the machine's cores and ignores the affinity mask, so a job given 2 of 64 cores
    would start 64 threads that fight over 2. Several runs on one machine each take their share (`--threads
    cores/runs`); docs/performance.md ("Shared machines and several runs") says why this matters.
    """
    default = torch_default_threads()
    allowed = available_cpus()
    if spec == "auto":
        threads = max(1, min(allowed, default))
    else:
        threads = int(spec)
        if threads < 1:
            raise UsageError(f"--threads must be at least 1 (or auto), got {threads}.")
        if threads > allowed:
            raise UsageError(f"--threads {threads} is more than the {allowed} CPUs this process may use; pass "
                             f"--threads auto or at most {allowed}.")
    torch.set_num_threads(threads)
    return threads


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # read at import, before any run changes it


def torch_default_threads() -> int:
    """torch's own choice of intra-op threads in this process (OMP_NUM_THREADS if set, else the core count)."""
    return _TORCH_DEFAULT_THREADS


@contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 matrix products and convolutions for the block under --precision tf32 (CUDA only), restored after,
    so that a run in a process that goes on (a test, a sweep) leaves torch's settings as it found them.

    TF32 keeps fp32's range with a 10-bit mantissa in the products only (Ampere and later tensor cores);
    fp32 and bf16 leave the settings alone (bf16 is autocast, `RecModel.autocast`).
    """
    if precision != "tf32":
        yield
        return
    if device.type != "cuda":
        raise UsageError("--precision tf32 is a CUDA setting (tensor-core products) and this run is on the CPU; use "
                         "--precision fp32 (or bf16) here.")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), e.g. to say whether it has AMX or AVX512-BF16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")


def bf16_speedup(size: int = 256, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a size x 4size by 4size x size product on this CPU (> 1: bf16 pays).

    Measured rather than read off the flags: AVX512-BF16 without AMX is slower than fp32 on one Intel
    Xeon and twice as fast on an AMD EPYC (Zen 4) of this project, and a CPU with AVX2 only (Zen 3) runs bf16
    about 100x slower, so the product is small: at 1024 it took 40 s there (docs/performance.md).
    """
    a, b = torch.randn(size, 4 * size), torch.randn(4 * size, size)
    seconds = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            x @ y
        seconds.append(time.perf_counter() - start)
    return seconds[0] / seconds[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
