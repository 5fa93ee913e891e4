"""Keep a finished run's small records in the repository, so that the work outlives the machine it ran on.

    python -m Experiments.records runs/table2-tiktok --to results/tiktok      # every finished run under it

A run folder holds megabytes of weights (best_model.pt, last.pt) beside a few kilobytes that say what it
computed. This copies those kilobytes of every finished run (`run_folder.finished_summary`) under `--to`, at the
same relative path (`<model>/<cell>/seed<k>/`, the layout of `Experiments.sweep`), so that
`Experiments.reproduce --sweep_dir results/<dataset>` finds them finished and writes its tables from them:
summary.json, metrics.jsonl, config.json and log.txt of every seed, and the per-user test metrics
(`per_user_<protocol>.npz`, about 0.2 MB a run on TikTok) of the first seed of each cell only, which is
what the Wilcoxon test over users reads. Records already there are left as they are (a record is written once).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from Utils import run_folder
from Utils.cli import setup_logging

log = logging.getLogger("diffmm")

RECORDS = (run_folder.SUMMARY, run_folder.METRICS, run_folder.CONFIG, run_folder.LOG)


def finished_runs(root: Path) -> List[Path]:
    """Every finished run folder under `root`, in path order."""
    return sorted(p.parent for p in root.rglob(run_folder.SUMMARY) if run_folder.finished_summary(p.parent))


def keep_records(run_dir: Path, target: Path, per_user: bool) -> List[Path]:
    """Copy the records of one finished run into `target` (created); returns the files written."""
    target.mkdir(parents=True, exist_ok=True)
    names = list(RECORDS) + (list(run_folder.PER_USER.values()) if per_user else [])
    written = []
    for name in names:
        source, copy = run_dir / name, target / name
        if source.is_file() and not copy.exists():
            shutil.copyfile(source, copy)
            written.append(copy)
    return written


def keep_all(root: Path, to: Path) -> List[Path]:
    """The records of every finished run under `root`, the per-user files of each cell's first seed."""
    written: List[Path] = []
    first_seed = {}
    for run_dir in finished_runs(root):
        cell = run_dir.parent
        first_seed.setdefault(cell, run_dir)
        written += keep_records(run_dir, to / run_dir.relative_to(root), per_user=first_seed[cell] == run_dir)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m Experiments.records", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="a sweep or reproduce folder (runs/...)")
    p.add_argument("--to", type=Path, required=True, help="where the records go (results/<dataset>)")
    args = p.parse_args(argv)
    if not args.runs.is_dir():
        log.error(f"error: {args.runs} is not a folder; give the --sweep_dir of a sweep or reproduce run.")
        return 2
    written = keep_all(args.runs, args.to)
    log.info(f"{len(written)} record files written under {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
