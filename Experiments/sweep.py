"""Grid sweeps over Main.py flags with several seeds (paper Table 4, Figure 3, Figure 4, MMRec's grids).

    python -m Experiments.sweep --grid "temp=0.1,0.5,1.0 ssl_reg=1,0.1,0.01" --seeds 421,422 --sweep_dir runs/t4 \
        --data tiktok --reg 1e-4 --epoch 50 --trans 1 --e_loss 0.1 --cl_method 1
    python -m Experiments.sweep --grid lightgcn --sweep_dir runs/lgn --data tiktok    # a model's MMRec grid

A `--grid` that names a model is that model's named grid: its MMRec hyper-parameter grid (the class
attribute `grid` in its file), with `--model NAME` added to the command.

Every grid cell x seed is an ordinary run folder, DIR/<flag=value_flag=value>/seed<k>/, made by Main.run
with the remaining flags plus the cell's values; a finished run (a summary.json not marked `stopped`) is
skipped and an interrupted one is resumed from its last.pt (`Main.py --resume`), so an interrupted sweep
continues where it stopped; a folder without last.pt is redone. Then
DIR/table.md and DIR/table.csv give, per cell, the mean ± std over seeds (sample std; in the CSV 0 for one
seed) of the validation protocol's test Recall/NDCG/Precision@topk and validation Recall@topk, and
DIR/sweep.png draws them (lines for one swept flag, a heatmap for two, bars otherwise; none for one cell). The selected
cell is the one with the best mean validation Recall@topk (`--select mmrec`: MMRec's rule, the best
mean test Recall@topk at the best-validation epoch, which selects on test). A sweep's runs get
`--keep_last false` unless it is given (a finished run drops its last.pt).

With `--workers N`, `--devices 0,1`, `--storage URL` or `$DIFFMM_STORAGE` (or `--search tpe`, `--prune`) the
runs are the trials of an Optuna study that several processes or machines share (`Experiments/study.py`;
docs/many-runs.md); the tables are written by the same functions, from the same run folders.

This file is the command line only: the plan is `Experiments.plan`, running it `Experiments.runs.run_plan`.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from Experiments.plan import GridPlan, SearchPlan, Sweep, grid_argument, reject_ranges, seed_list
from Experiments.runs import FAILURES, Options, failed, run_plan
from Experiments.study import add_worker_args, unused_prune_flags, wanted

log = logging.getLogger("diffmm")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run a grid of Main.py flags x seeds and tabulate it (paper Table 4, Figures 3-4, MMRec's "
                    "grids); every other flag is passed to Main.py.", allow_abbrev=False)
    p.add_argument("--grid", nargs="+", required=True,
                   help='flags and values, e.g. "temp=0.1,0.5,1.0 ssl_reg=1,0.1,0.01" (paper Table 4), '
                        '"e_loss=0.01,0.1,0.5" or "ris_lambda=0.1,0.5,1.0" (Figure 3), "fusion_ratio=0,0.5,1" '
                        '(Figure 4), or a model name for its MMRec grid (mf, lightgcn, vbpr, ...)')
    p.add_argument("--seeds", default=[421], type=seed_list, help="comma-separated seeds, one run each per cell")
    p.add_argument("--sweep_dir", required=True, type=Path, help="folder of the sweep's runs and tables")
    p.add_argument("--select", default="validation", choices=["validation", "mmrec"],
                   help="how the table's selected cell is chosen: best validation Recall, or MMRec's best test "
                        "Recall at the best-validation epoch (selects on test)")
    add_worker_args(p, search=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from Utils.cli import given_flags, has_flag, setup_logging
    from Utils.errors import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser().parse_known_args(argv)
    setup_logging(has_flag(rest, "--quiet"))
    for flag in given_flags(rest):
        if flag in ("--seed", "--out_dir"):
            log.error(f"error: {flag} is set by the sweep; use --seeds and --sweep_dir.")
            return 2
    try:
        problem = unused_prune_flags(args)   # before anything is written: a sweep meant to be pruned, unpruned
        if problem:
            raise UsageError(problem)
        grid, rest = grid_argument(args.grid, rest)
        if args.search == "tpe":
            plan = SearchPlan.of(args.sweep_dir, grid, args.seeds, rest, args.trials)
        else:
            if wanted(args):
                reject_ranges(grid)
            plan = GridPlan(args.sweep_dir, [Sweep.of(args.sweep_dir, grid, args.seeds, rest)])
        options = Options(select=args.select, study=args, argv=argv, rest=rest, module="Experiments.sweep")
        results = run_plan(plan, options)
        if results is None:  # a worker started by a parent, which writes the tables
            return 0
    except FAILURES as e:
        return failed(e)
    print((args.sweep_dir / "table.md").read_text())
    return 0 if results[0].rows else 1


if __name__ == "__main__":
    from Utils.cli import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
