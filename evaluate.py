"""Reload a finished run's best model (best_model.pt, with its configuration) and recompute its metrics.

    python evaluate.py RUN_DIR [--data_dir DIR] [--device cpu]

Prints the validation and test metrics of the reloaded model beside those summary.json recorded for
the same epoch (the validation protocol's). They are identical: the checkpoint holds everything the
scores need (for DiffMM, the generated graphs of that epoch as they were used at evaluation).
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import torch

import Main
from DataHandler import DataError
from Utils.helpers import UsageError, setup_logging

log = logging.getLogger("diffmm")


def evaluate_run(run_dir: Path, data_dir: Optional[str] = None, device: str = "auto") -> dict:
    """{'epoch', 'recomputed': {'val', 'test'}, 'summary': {'val', 'test'}, 'identical': bool}."""
    args, data, model = Main.load_trained(run_dir, data_dir, device)
    with torch.no_grad():
        metrics = Main.evaluate_model(model, data, args)
    recorded = {}
    if (run_dir / "summary.json").is_file():
        validation = json.loads((run_dir / "summary.json").read_text())["protocols"]["validation"] or {}
        recorded = {"val": validation.get("val"), "test": validation.get("test")}
    recomputed = {"val": metrics["val"], "test": metrics["test"]}
    return {"epoch": torch.load(run_dir / "best_model.pt", weights_only=True)["epoch"], "recomputed": recomputed,
            "summary": recorded, "identical": recorded == recomputed}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run folder (holds best_model.pt)")
    p.add_argument("--data_dir", default=None, help="where the dataset folder is now, if it moved since the run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    setup_logging()
    try:
        result = evaluate_run(args.run_dir, args.data_dir, args.device)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    print(json.dumps(result, indent=2))
    verdict = "identical to" if result["identical"] else "different from"
    log.info(f"epoch {result['epoch']}: the recomputed metrics are {verdict} those in summary.json")
    return 0


if __name__ == "__main__":
    from Utils.helpers import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
