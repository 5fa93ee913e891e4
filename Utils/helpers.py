"""Run set-up: the device, seeding, the run folder and its log, package versions, phase timing."""
from __future__ import annotations

import logging
import os
import platform
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np
import scipy
import torch

log = logging.getLogger("diffmm")


class UsageError(Exception):
    """A command-line or environment problem: the message is one sentence saying what to do."""


def resolve_device(name: str, gpu: str = "0") -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto.")
        return torch.device(f"cuda:{gpu}" if gpu.isdigit() else "cuda")
    return torch.device("cpu")


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), e.g. to say whether it has AMX or AVX512-BF16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")


def bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a size x 4size by 4size x size product on this CPU (> 1: bf16 pays).

    Measured rather than read off the flags: AVX512-BF16 without AMX is slower than fp32 on one Intel
    Xeon and twice as fast on an AMD EPYC (Zen 4) of this project (README, Performance).
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


def make_run_dir(out_dir: Optional[str], data: str) -> Path:
    """Create the run folder; refuse a folder that already holds files so nothing is overwritten."""
    path = Path(out_dir) if out_dir else Path("runs") / f"{data}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"the output folder {path} already exists and is not empty; pass another --out_dir "
                         f"(nothing there is overwritten), or --resume {path} to continue its run.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {path} ({e.strerror or e}); pass an --out_dir you "
                         f"can write to.") from None
    return path


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file in the same folder and rename it into place, so that a kill
    leaves either the old file or the new one, never half of one. `write(tmp_path)` writes the content."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path} ({e.strerror or e}); free some space or make the folder writable, "
                         f"then resume with --resume {path.parent}.") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: object, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    """Wall-clock seconds per named phase; synchronises CUDA once at each phase end, never per element."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
