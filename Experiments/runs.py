"""Run a plan: the one entry of every driver (`run_plan`), then each sweep's tables.

    results = run_plan(GridPlan(sweep_dir, [Sweep.of(sweep_dir, grid, seeds, base_argv)]), Options())

A `GridPlan` runs in this process, one run after the other (a finished run is skipped, an interrupted one
resumed from its last.pt), or, with any flag of many runs at once (`Options.study`: --workers, --devices,
--storage or $DIFFMM_STORAGE, --prune), as the trials of an Optuna study (`Experiments.study`); either way each
sweep's tables are then written from its run folders by the same functions (`Experiments.tables`). A
`SearchPlan` always runs through a study, and its table has a row per cell TPE tried.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from DataHandler import DataError
from Experiments.plan import Cell, Job, Plan, SearchPlan, Sweep, train
from Experiments.study import WorkersFailed, execute, search_cells, wanted
from Experiments.tables import select_row, summarise, write_tables
from Utils.errors import UsageError
from Utils.run_folder import finished_summary

log = logging.getLogger("diffmm")

# what a driver ends on with one sentence: bad input (exit code 2), runs a study left unfinished (exit code 1)
FAILURES = (DataError, UsageError, ValueError, WorkersFailed)


@dataclass
class Options:
    """How a plan runs. `select`: how each sweep's table selects its cell ('validation', or 'mmrec': MMRec's rule,
    the best mean test Recall); `study`: the driver's parsed flags of many runs at once
    (`Experiments.study.add_worker_args`), None for one run after the other in this process; `argv`: the command
    line as given, which the workers get back; `rest`: its Main.py flags; `module`: the driver the workers run
    (`python -m module`)."""

    select: str = "validation"
    study: Optional[argparse.Namespace] = None
    argv: Sequence[str] = ()
    rest: Sequence[str] = ()
    module: str = "Experiments.sweep"


@dataclass
class SweepResult:
    """A sweep's tables: its rows (one per cell), the selected row, the files written; and which runs this command
    trained (`ran`) and found finished (`skipped`) in this process."""

    folder: Path
    rows: List[dict]
    selected: Optional[dict]
    files: List[Path]
    ran: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def run_plan(plan: Plan, options: Optional[Options] = None) -> Optional[List[SweepResult]]:
    """Run every run of `plan` that is not finished, then write each sweep's tables; one result per sweep of a
    GridPlan (in order), one for a SearchPlan. None in a worker that a parent started (the parent writes the
    tables). Bad input raises before anything is written (UsageError, ValueError); runs left unfinished by a
    study, `Experiments.study.WorkersFailed`."""
    options = options or Options()
    if isinstance(plan, SearchPlan) or (options.study is not None and wanted(options.study)):
        if options.study is None:
            raise ValueError("a search (--search tpe) runs through a study: give Options.study the driver's flags")
        study = execute(plan, options.study, options.argv, options.rest, options.module)
        if study is None:
            return None
        if isinstance(plan, SearchPlan):
            return [search_tables(plan, study, options.select)]
    else:
        plan.check()  # every command line first, so a bad value fails before hours of training
    return [run_sweep(sweep, jobs, options.select) for sweep, jobs in zip(plan.sweeps, plan.jobs_by_sweep)]


def run_sweep(sweep: Sweep, jobs: Sequence[Job], select: str = "validation") -> SweepResult:
    """Train each of the sweep's runs that is not finished, here, one after the other; then its tables."""
    ran, skipped = [], []
    for i, job in enumerate(jobs):
        if finished_summary(job.run_dir) is not None:
            skipped.append(str(job.run_dir))
            continue
        train(job, label=f"sweep run {i + 1}/{len(jobs)}: ")
        ran.append(str(job.run_dir))
    rows = summarise(sweep.folder, sweep.grid, sweep.seeds)
    selected = select_row(rows, select)
    files = write_tables(rows, list(sweep.grid), sweep.folder, selected, select)
    log.info(f"sweep: {len(ran)} runs done, {len(skipped)} already there; wrote {', '.join(map(str, files))}")
    return SweepResult(sweep.folder, rows, selected, files, ran, skipped)


def search_tables(plan: SearchPlan, study: object, select: str = "validation") -> SweepResult:
    """A finished search's tables: a row per cell that TPE tried, ordered by the flags' values."""
    found = sorted(search_cells(study), key=_by_value)
    rows = summarise(plan.sweep_dir, {}, plan.seeds, found)
    selected = select_row(rows, select)
    files = write_tables(rows, list(plan.space), plan.sweep_dir, selected, select)
    log.info(f"search: {len(found)} cells tried; wrote {', '.join(map(str, files))}")
    return SweepResult(plan.sweep_dir, rows, selected, files)


def failed(error: Exception) -> int:
    """A driver's end on one of FAILURES: its sentence logged; the exit code, 1 for runs that did not finish, 2 for
    bad input."""
    log.error(f"error: {error}")
    return 1 if isinstance(error, WorkersFailed) else 2


def _by_value(cell: Cell) -> tuple:
    """A cell's place in a search's table: by each flag's value, numbers before text."""
    def number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None
    return tuple((0, number(v), "") if number(v) is not None else (1, 0.0, v) for v in cell.values())
