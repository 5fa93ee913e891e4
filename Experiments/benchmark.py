"""Speed benchmark: run N epochs of Main.py's training and report the median seconds per phase.

    python -m Experiments.benchmark --data tiktok --epochs 3 --reg 1e-4 --trans 1 --cl_method 1 --json bench/tiktok.json

Takes every flag of Main.py, `--model` included (`--epochs N` sets `--epoch`); the run folder goes
to a temporary directory unless `--out_dir` is given. Prints and writes (JSON) the median seconds of
each phase the model times (DiffMM: denoiser training, graph rebuild, negative sampling, recommender
training; every model: evaluation) and of the whole epoch, peak resident memory, and peak CUDA memory on a GPU. `--compare` runs the
straightforward reference path and the fast path side by side (see `compare`). The first epoch is reported too
but left out of the medians when more than one epoch runs (it includes warm-up).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

import Main
from DataHandler import DataError
from Params import parse_args
from Utils.helpers import UsageError, setup_logging

log = logging.getLogger("diffmm")


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def benchmark(argv: List[str], epochs: int, json_path: Optional[Path]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = parse_args(argv + ["--epoch", str(epochs)])
        if args.out_dir is None:
            args.out_dir = str(Path(tmp) / "run")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        summary = Main.run(args)
    per_epoch = summary["timing"]["per_epoch"]
    measured = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
    phases = list(dict.fromkeys(p for e in per_epoch for p in e))
    result = {
        "command": " ".join(["python -m Experiments.benchmark", "--epochs", str(epochs)] + argv),
        "model": summary["model"],
        "data": summary["data"],
        "precision": args.precision,
        "device": summary["device"],
        "epochs": len(per_epoch),
        "median_seconds": {p: float(np.median([e.get(p, 0.0) for e in measured])) for p in phases},
        "first_epoch_seconds": per_epoch[0],
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "test_paper_protocol": summary["protocols"]["paper"]["test"],
        "versions": summary["versions"],
    }
    print(json.dumps(result, indent=2))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


REFERENCE = ["--reverse", "direct", "--kernels", "plain"]


def compare(argv: List[str], epochs: int, json_path: Optional[Path]) -> dict:
    """The straightforward reference path (direct reverse process, torch's plain autograd for the sparse
    products and InfoNCE) and the fast path, each in a fresh process (so each peak memory is its own),
    on the same data and flags; prints the median seconds per phase and the ratio fast / reference."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("reference", REFERENCE), ("fast", [])):
            out = Path(tmp) / f"{name}.json"
            command = [sys.executable, "-m", "Experiments.benchmark", "--epochs", str(epochs), "--json", str(out),
                       *argv, *extra]
            if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
                raise UsageError(f"the {name} benchmark failed: {' '.join(command)}")
            results[name] = json.loads(out.read_text())
    ref, fast = results["reference"]["median_seconds"], results["fast"]["median_seconds"]
    lines = [f"{'phase':<14}{'reference s':>13}{'fast s':>10}{'fast/ref':>10}"]
    for phase in ref:
        ratio = fast.get(phase, 0.0) / ref[phase] if ref[phase] else float("nan")
        lines.append(f"{phase:<14}{ref[phase]:>13.3f}{fast.get(phase, 0.0):>10.3f}{ratio:>10.2f}")
    lines.append(f"{'peak RSS GiB':<14}{results['reference']['peak_rss_gib']:>13.3f}{results['fast']['peak_rss_gib']:>10.3f}")
    print("\n".join(lines))
    result = {"reference_flags": REFERENCE, "device": results["fast"]["device"], **results,
              "ratio": {p: fast.get(p, 0.0) / ref[p] for p in ref if ref[p]}}
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs to run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--compare", action="store_true",
                        help="run the reference path (" + " ".join(REFERENCE) + ") and the fast path, each in its "
                             "own process, and print the ratio per phase")
    own, rest = parser.parse_known_args(argv)
    setup_logging(quiet=True)
    try:
        if own.compare:
            compare(rest, own.epochs, own.json)
        else:
            benchmark(rest + ["--quiet"], own.epochs, own.json)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
