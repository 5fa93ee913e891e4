"""Reload a finished run's best model (best_model.pt, with its configuration) and recompute its metrics.

    python evaluate.py RUN_DIR [--topks 10,20,50] [--data_dir DIR] [--device cpu]

Prints the validation and test metrics of the reloaded model beside those summary.json recorded for
the same epoch (the validation protocol's). At the run's own cut-offs they are identical: the checkpoint
holds everything the scores need (for DiffMM, the generated graphs of that epoch as they were used at
evaluation). `--topks` re-evaluates at other cut-offs; those the run also computed are compared.
A command line over `api.Run.evaluate` (docs/using-a-run.md). It writes nothing: a dataset missing from the data
folder is one sentence (never generated there), and so is a best_model.pt this package did not write.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import api
from DataHandler import DataError
from Params import int_list
from Utils import run_folder
from Utils.cli import ArgumentParser, setup_logging
from Utils.errors import UsageError

log = logging.getLogger("diffmm")


def evaluate_run(run_dir: Path, data_dir: Optional[str] = None, device: str = "auto",
                 topks: Optional[Sequence[int]] = None) -> dict:
    """{'epoch', 'recomputed': {'val', 'test'}, 'summary': {'val', 'test'}, 'identical': bool or None}.

    'identical' compares the metrics both hold (the cut-offs the run also computed); None when they share none.
    """
    run = api.load(run_dir, device, data_dir)
    metrics = run.evaluate(topks)
    recomputed = {"val": metrics["val"], "test": metrics["test"]}
    recorded: dict = {}
    if (Path(run_dir) / run_folder.SUMMARY).is_file():
        validation = run_folder.protocol_result(run_folder.read_summary(run_dir), "validation") or {}
        recorded = {"val": validation.get("val"), "test": validation.get("test")}
    common = [(split, key) for split in ("val", "test") for key in (recorded.get(split) or {})
              if key in recomputed[split]]
    identical = all(recorded[s][key] == recomputed[s][key] for s, key in common) if common else None
    return {"epoch": run.epoch, "recomputed": recomputed, "summary": recorded, "identical": identical}


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run folder (holds best_model.pt)")
    p.add_argument("--topks", default=None, type=int_list,
                   help="cut-offs to evaluate at, e.g. 10,20,50 (default: the run's own)")
    p.add_argument("--data_dir", default=None,
                   help="the folder holding the run's dataset folder, if it moved since the run (default: the run's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    setup_logging()
    try:
        result = evaluate_run(args.run_dir, args.data_dir, args.device, args.topks)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    print(json.dumps(result, indent=2))
    if result["identical"] is None:
        log.info(f"epoch {result['epoch']}: none of these cut-offs is in summary.json, so nothing was compared")
    else:
        verdict = "identical to" if result["identical"] else "different from"
        log.info(f"epoch {result['epoch']}: the recomputed metrics are {verdict} those in summary.json")
    return 0


if __name__ == "__main__":
    from Utils.cli import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
