"""Command lines: the parser with a one-line error, reading one flag of a command line without parsing the rest,
console and run logging, Ctrl-C, and what a run reports of its software (durations, package versions).
"""
from __future__ import annotations

import argparse
import logging
import platform
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Dict, Iterator, List, Optional, Sequence

import numpy as np
import scipy
import torch

log = logging.getLogger("diffmm")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `Main.py: error: argument --lr: invalid float value: 'x' (see --help)`
    and exit code 2, instead of the whole usage block before it (Main.py, evaluate.py, recommend.py)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# One flag of a command line, without parsing the rest: the one place that scans an argv
# ---------------------------------------------------------------------------------------------

def flag_value(argv: Sequence[str], name: str, default: Optional[str] = None) -> Optional[str]:
    """The value of flag `name` ('--model') in a command line (`--model X` or `--model=X`, the last one given wins;
    no abbreviations), else `default`; read as argparse reads it, without knowing the other flags."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(name, default=default)
    return getattr(pre.parse_known_args(list(argv))[0], name.lstrip("-"))


def has_flag(argv: Sequence[str], name: str) -> bool:
    """Whether a command line gives flag `name` ('--keep_last'), as `--name`, `--name VALUE` or `--name=VALUE`."""
    return any(a == name or a.startswith(name + "=") for a in argv)


def given_flags(argv: Sequence[str]) -> List[str]:
    """The names of the flags a command line gives, in order ('--lr=0.1' -> '--lr'), repeats kept."""
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def without_flags(argv: Sequence[str], names: Collection[str], standalone: Collection[str] = ()) -> List[str]:
    """`argv` without the flags `names` and their values (`--name VALUE` or `--name=VALUE`); a flag of `standalone`
    (such as `--quiet`, whose value is optional) takes the next token as its value only when it is not a flag."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in names:
            skip = "=" not in a and not (name in standalone and (i + 1 == len(argv) or argv[i + 1].startswith("--")))
            continue
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------
# Logging, Ctrl-C, what a run reports
# ---------------------------------------------------------------------------------------------

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


def duration(seconds: float) -> str:
    """'1h 02m', '12m 30s' or '45s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def package_versions() -> Dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}
