"""Run set-up: the device, seeding, the run folder and its log, package versions, phase timing."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator

import numpy as np
import scipy
import torch

from Utils.errors import UsageError  # noqa: F401  (re-exported: the harness's refusal)
from Utils.files import atomic_torch_save, atomic_write, atomic_write_text  # noqa: F401  (re-exported)

log = logging.getLogger("diffmm")




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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's legacy generator and torch; make cuDNN deterministic (no benchmarking)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """The state of every global random generator a run draws from (Python, NumPy's legacy one, torch),
    as types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    legacy = state["numpy"]
    np.random.set_state(("MT19937", legacy["keys"].numpy().astype(np.uint32), legacy["pos"], legacy["has_gauss"],
                         legacy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def duration(seconds: float) -> str:
    """'1h 02m', '12m 30s' or '45s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def exit_on_interrupt(entry: Callable[[], int]) -> int:
    """Run a command-line entry point; Ctrl-C ends the process with 130 (128 + SIGINT) and no traceback. Inside
    the package a Ctrl-C stays a KeyboardInterrupt, so a sweep or the test suite stops as a whole."""
    try:
        return entry()
    except KeyboardInterrupt:
        return 130


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C back until the block has run, then raise it: a run's epoch files (each written atomically)
    then all belong to the same epoch. Only in the main thread and where Ctrl-C raises KeyboardInterrupt (a
    background job that ignores SIGINT keeps ignoring it)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `Main.py: error: argument --lr: invalid float value: 'x' (see --help)`
    and exit code 2, instead of the whole usage block before it (Main.py, evaluate.py, recommend.py)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see {self.prog} --help)\n")


def setup_logging(quiet: bool = False) -> None:
    """Console logging of the 'diffmm' logger for a command-line entry point (Main.py, the drivers)."""
    log.handlers[:] = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
    log.setLevel(logging.INFO)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


@contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Also log to `run_dir/log.txt` while the block runs; every other handler is left as it is."""
    file = logging.FileHandler(run_dir / "log.txt")
    file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(file)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(file)
        file.close()


def package_versions() -> Dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class PhaseTimer:
    """Seconds per named phase, summed over the phase's entries (MMSSL enters its phases once per batch).

    On the CPU: wall-clock time. On CUDA, kernels are queued asynchronously, so the host clock would charge a
    phase for the work queued before it and end before its own work did; a synchronisation at every phase
    boundary would stall the GPU once per batch instead. So each phase records a CUDA event at its start and
    at its end, in stream order, and `seconds` synchronises once, when it is read (once per epoch): an event
    pair spans exactly the device timeline between the phase's start and the end of its work, host work
    inside the phase included.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._seconds: Dict[str, float] = {}
        self._events: Dict[str, list] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            yield
            end.record(stream)
            self._events.setdefault(name, []).append((begin, end))
            return
        start = time.perf_counter()
        yield
        self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def seconds(self) -> Dict[str, float]:
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                self._seconds[name] = self._seconds.get(name, 0.0) + sum(b.elapsed_time(e) for b, e in pairs) / 1000
            self._events = {}
        return dict(self._seconds)
