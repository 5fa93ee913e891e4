"""Speed benchmark: run N epochs of Main.py's training and report the median seconds per phase.

    python -m Experiments.benchmark --data tiktok --epochs 3 --reg 1e-4 --trans 1 --cl_method 1 --json bench/tiktok.json

Takes every flag of Main.py, `--model` included (`--epochs N` sets `--epoch`); the run folder goes
to a temporary directory unless `--out_dir` is given. Prints and writes (JSON) the median seconds of
each phase the model times (DiffMM: denoiser training, graph rebuild, negative sampling, recommender
training; every model: evaluation) and of the whole epoch, the CPU threads, peak resident memory, and peak
CUDA memory on a GPU (where the timer synchronises before and after each phase, so queued kernels are
charged to the phase that queued them). `--compare` runs the straightforward reference path and the fast
path side by side (see `compare`); `--models all --precisions fp32,tf32,bf16` docs/performance.md's per-model
epoch table. The first epoch is reported too but left out of the medians when more than one epoch runs
(it includes warm-up).

    python -m Experiments.benchmark --models all --precisions fp32,tf32,bf16 --data tiktok --data_dir D --epochs 3
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

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
from Params import name_list, parse_args
from Utils import run_folder
from Utils.cli import setup_logging
from Utils.device import resolve_device
from Utils.errors import UsageError

log = logging.getLogger("diffmm")


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def benchmark(argv: List[str], epochs: int, json_path: Optional[Path]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = parse_args(argv + ["--epoch", str(epochs)])
        if args.out_dir is None:
            args.out_dir = str(Path(tmp) / "run")
        cuda = args.device != "cpu" and torch.cuda.is_available()
        if cuda:  # peak memory of this run alone, on the device it runs on
            torch.cuda.reset_peak_memory_stats(resolve_device(args.device, args.gpu))
        summary = Main.run(args)
    per_epoch = run_folder.epoch_seconds(summary)
    machine = run_folder.run_machine(summary)
    measured = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
    phases = list(dict.fromkeys(p for e in per_epoch for p in e))
    result = {
        "command": " ".join(["python -m Experiments.benchmark", "--epochs", str(epochs)] + argv),
        "model": run_folder.run_config(summary)["model"],
        "data": run_folder.run_data(summary),
        "precision": args.precision,
        "device": machine["device"],
        "epochs": len(per_epoch),
        "median_seconds": {p: float(np.median([e.get(p, 0.0) for e in measured])) for p in phases},
        "first_epoch_seconds": per_epoch[0],
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "threads": machine["threads"],
        "peak_cuda_gib": (round(torch.cuda.max_memory_allocated(resolve_device(args.device, args.gpu)) / 2**30, 3)
                          if cuda else None),
        "test_paper_protocol": run_folder.protocol_metrics(summary, "paper"),
        "versions": machine["versions"],
    }
    print(json.dumps(result, indent=2))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


REFERENCE = ["--reverse", "direct", "--kernels", "plain"]


def in_own_process(argv: List[str], epochs: int) -> dict:
    """`benchmark` in a fresh process, so that its peak memory (host and CUDA) is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "Experiments.benchmark", "--epochs", str(epochs), "--json", str(out), *argv]
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            raise UsageError(f"this benchmark failed (run it alone to see why): {' '.join(command[1:])}")
        return json.loads(out.read_text())


def table(models: List[str], precisions: List[str], argv: List[str], epochs: int, json_path: Optional[Path]) -> str:
    """The per-model epoch table (docs/performance.md): every model x precision in its own process, each model with
    its published command for the dataset where its authors give one (`--preset MODEL-DATA`), else its defaults."""
    from Params import presets

    data = parse_args(argv).data
    rows, results = [], []
    for model in models:
        command = ["--preset", f"{model}-{data}"] if f"{model}-{data}" in presets() else ["--model", model]
        for precision in precisions:
            result = in_own_process(command + argv + ["--precision", precision], epochs)
            results.append(result)
            seconds = result["median_seconds"]
            phases = ", ".join(f"{p} {v:.2f}" for p, v in seconds.items() if p != "epoch")
            cuda = f"{result['peak_cuda_gib']:.2f}" if result["peak_cuda_gib"] is not None else "—"
            rows.append(f"| {model} | {precision} | {seconds['epoch']:.2f} | {phases} | {result['peak_rss_gib']:.2f} | "
                        f"{cuda} | {result['test_paper_protocol']['Recall@20']:.4f} |")
    device = results[0]["device"] if results else "?"
    text = "\n".join([f"{data}, {epochs} epochs each, median epoch after the first; device {device}", "",
                      "| model | precision | epoch s | phases s | peak RSS GiB | peak CUDA GiB | test Recall@20 |",
                      "|---|---|---|---|---|---|---|", *rows, ""])
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
    return text


def compare(argv: List[str], epochs: int, json_path: Optional[Path]) -> dict:
    """The straightforward reference path (direct reverse process, torch's plain autograd for the sparse
    products and InfoNCE) and the fast path, each in a fresh process (so each peak memory is its own),
    on the same data and flags; prints the median seconds per phase and the ratio fast / reference."""
    results = {name: in_own_process(argv + extra, epochs) for name, extra in (("reference", REFERENCE), ("fast", []))}
    ref, fast = results["reference"]["median_seconds"], results["fast"]["median_seconds"]
    lines = [f"{'phase':<14}{'reference s':>13}{'fast s':>10}{'fast/ref':>10}"]
    for phase in ref:
        ratio = fast.get(phase, 0.0) / ref[phase] if ref[phase] else float("nan")
        lines.append(f"{phase:<14}{ref[phase]:>13.3f}{fast.get(phase, 0.0):>10.3f}{ratio:>10.2f}")
    rss = (results["reference"]["peak_rss_gib"], results["fast"]["peak_rss_gib"])
    lines.append(f"{'peak RSS GiB':<14}{rss[0]:>13.3f}{rss[1]:>10.3f}")
    print("\n".join(lines))
    result = {"reference_flags": REFERENCE, "device": results["fast"]["device"], **results,
              "ratio": {p: fast.get(p, 0.0) / ref[p] for p in ref if ref[p]}}
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --model is Main.py's, not an abbreviation of --models
    parser.add_argument("--epochs", type=int, default=3, help="epochs to run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--compare", action="store_true",
                        help="run the reference path (" + " ".join(REFERENCE) + ") and the fast path, each in its "
                             "own process, and print the ratio per phase")
    parser.add_argument("--models", type=name_list, default=None,
                        help="a table: each of these models (comma-separated, or 'all') x each --precisions, each "
                             "in its own process, with its published command for --data where one exists")
    parser.add_argument("--precisions", type=name_list, default=["fp32"], help="with --models: e.g. fp32,tf32,bf16")
    own, rest = parser.parse_known_args(argv)
    setup_logging(quiet=True)
    try:
        if own.models:
            from Models import model_names
            table(model_names() if own.models == ["all"] else own.models, own.precisions, rest, own.epochs, own.json)
        elif own.compare:
            compare(rest, own.epochs, own.json)
        else:
            benchmark(rest + ["--quiet"], own.epochs, own.json)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    from Utils.cli import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
