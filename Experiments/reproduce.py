"""Rerun a table of the paper, and print ours beside the paper's numbers.

    python -m Experiments.reproduce --table 2 --data tiktok --data_dir D [--models diffmm,lightgcn] [--epoch N]
    python -m Experiments.reproduce --table 2 --data mydata --seeds 421,422 --tune      # any dataset, grids
    python -m Experiments.reproduce --table 3 --data tiktok --epoch 10                 # DiffMM's ablations
    python -m Experiments.reproduce --table 4 --data tiktok --seeds 421,422            # DiffMM's τ x λ1 grid
    python -m Experiments.reproduce --table 2 --merge runs/t2-tiktok,runs/t2-baby,runs/t2-sports   # one .tex

Table 2 runs every registered model (or `--models`) on the dataset, each with its published command
for that dataset where its authors give one (`--preset MODEL-DATA`, the class's `presets`), else its defaults; with
`--tune`, each model's hyper-parameter grid (MMRec's, `Experiments.sweep --grid NAME`) is run and the
cell selected on validation (`--select mmrec`: MMRec's test-selected rule). It writes `comparison.md`
and `comparison.csv` (model x Recall/NDCG/Precision@K, mean ± sample std over seeds, both protocols,
the paper's Table 2 beside ours where the paper has the model; DiffMM's Improv. over the best other model
and its paired tests against each: a t-test over seeds and a Wilcoxon test over test users, marked where
p < 0.05), `comparison.tex` (the table in the paper's style, for pdflatex) and `groups.png` (Figure 2, one
bar per model, from the same runs); docs/experiments.md. A model that needs item features is skipped, with
a note, on a dataset
without feature files. Every run is a run folder of a sweep (DIR/<model>/<cell>/seed<k>/, as `Experiments.sweep`
makes them); finished runs are not rerun. Any other flag (`--device`, `--quiet`, `--patience`, ...) is passed to
every run. `--workers N`, `--devices 0,1` or `--storage URL` (or `$DIFFMM_STORAGE`) run them all as one
Optuna study shared by several processes or machines (`Experiments/study.py`; docs/many-runs.md).

Ours are reported under both protocols: the paper's (epoch of the best test Recall, as the authors
did) and the validation protocol (epoch chosen on validation, test reported there).

This file is the command line only: what each table runs is `Experiments.paper`, running it
`Experiments.runs.run_plan`, its statistics `Experiments.stats` and its tables `Experiments.tables`.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from Experiments import paper, tables
from Experiments.plan import GridPlan, Sweep, seed_list
from Experiments.runs import FAILURES, Options, failed, run_plan
from Experiments.study import add_worker_args
from Models import model_names
from Utils.cli import has_flag
from Utils.formats import DataError, detect_layout

log = logging.getLogger("diffmm")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rerun paper Table 2 (every model), 3 or 4 (DiffMM) on a dataset and "
                                            "print our numbers beside the paper's; other flags go to Main.py.",
                                allow_abbrev=False)
    p.add_argument("--table", type=int, required=True, choices=[2, 3, 4],
                   help="2: every model; 3: DiffMM's ablations none/no_cl/no_msi/no_dm; 4: DiffMM's τ x λ1 grid")
    p.add_argument("--data", help="dataset folder under --data_dir (Tables 3-4: tiktok, baby, sports)")
    p.add_argument("--data_dir", default="Datasets", type=Path, help="folder holding <data>/")
    p.add_argument("--models", default=None, help=f"Table 2: comma-separated models (default all: "
                                                  f"{','.join(model_names())})")
    p.add_argument("--epoch", type=int, default=None, help="override every command's epochs (the paper ran 50)")
    p.add_argument("--seeds", default="421", type=seed_list,
                   help="comma-separated seeds (the authors' default is 421)")
    p.add_argument("--tune", action="store_true", help="Table 2: run each model's hyper-parameter grid and "
                                                       "report the selected setting")
    p.add_argument("--select", default="validation", choices=["validation", "mmrec"],
                   help="with --table 2 --tune: select each model's grid cell on validation (default) or by "
                        "MMRec's rule (test); mmrec is refused without them (each model then runs one setting, and "
                        "Tables 3 and 4 always select on validation, so nothing would follow the rule)")
    p.add_argument("--sweep_dir", type=Path, default=None, help="runs folder (default runs/reproduce-<data>-table<N>)")
    p.add_argument("--merge", default=None, type=lambda t: [Path(d) for d in t.split(",") if d],
                   help="Table 2: DIR1,DIR2,...: no run; one comparison.tex over their datasets, from each "
                        "folder's comparison.csv, in --sweep_dir (default runs/reproduce-table2-merged)")
    add_worker_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from Utils.cli import setup_logging
    from Utils.errors import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args, rest = p.parse_known_args(argv)
    setup_logging(has_flag(rest, "--quiet"))
    if args.merge and args.table == 2:
        print(f"wrote {tables.merge_table2(args.merge, args.sweep_dir or Path('runs/reproduce-table2-merged'))}")
        return 0
    if args.data is None:
        p.error("the following argument is required: --data (or --table 2 --merge DIR1,DIR2,...)")
    if args.select != "validation" and not (args.table == 2 and args.tune):
        p.error(f"--select {args.select} chooses among the cells of --tune's grids, so it needs --table 2 --tune "
                f"(without them each model runs one setting, and Tables 3 and 4 select on validation); add --tune "
                f"or leave --select out.")
    seeds = args.seeds
    sweep_dir = args.sweep_dir or Path("runs") / f"reproduce-{args.data}-table{args.table}"

    folder = args.data_dir / args.data
    recorded = paper.recorded_modalities(sweep_dir)
    try:
        detect_layout(folder)  # any layout Main.py reads (DiffMM's, MMRec's, MMSSL's; .pkl or .npz)
    except DataError as e:
        if recorded is None:
            log.error(f"error: {e} Paper Table {args.table} on {args.data} cannot be run here; pass --data_dir to the "
                      f"folder that holds {args.data}/.")
            return 2
        log.info(f"note: {folder} holds no dataset, so the tables are written from the finished records in "
                 f"{sweep_dir} alone (a run that is not finished there cannot be trained)")
    found, note = paper.modality_note(args.data, folder, recorded)
    log.info(f"note: {note}")
    # Tables 3 and 4 select on validation (--select, for --tune, was refused above for them)
    options = Options(select=args.select if args.table == 2 else "validation", study=args, argv=argv, rest=rest,
                      module="Experiments.reproduce")
    try:
        if args.table == 2:
            models = [m.strip() for m in args.models.split(",")] if args.models else model_names()
            unknown = [m for m in models if m not in model_names()]
            if unknown:
                raise UsageError(f"unknown model {', '.join(unknown)}; the known models are {', '.join(model_names())}")
            sweeps = paper.table2_sweeps(args.data, args.data_dir, found, models, args.epoch, args.tune, rest, seeds,
                                         sweep_dir)
            results = run_plan(GridPlan(sweep_dir, [s for s in sweeps.values() if isinstance(s, Sweep)]), options)
            if results is None:  # a worker started by a parent, which writes the tables
                return 0
            text = tables.write_table2(args.data, note, paper.table2_results(sweeps, results), sweep_dir)
        else:
            if args.data not in paper.TABLE3:
                raise UsageError(f"paper Table {args.table} has numbers for {', '.join(paper.TABLE3)} only, not "
                                 f"{args.data}")
            if not found:
                log.error(f"error: {folder} has none of the paper's {args.data} feature files, and DiffMM cannot run "
                          f"without item features, so paper Table {args.table} cannot be reproduced on this copy.")
                return 1
            sweep = paper.table_sweep(args.table, args.data, args.data_dir, args.epoch, rest, seeds, sweep_dir)
            if run_plan(GridPlan(sweep_dir, [sweep]), options) is None:
                return 0
            text = tables.write_paper_table(args.table, args.data, note, sweep_dir, seeds)
    except FAILURES as e:
        return failed(e)
    print(text)
    print(f"runs, tables, figures and comparison.md in {sweep_dir}")
    return 0


if __name__ == "__main__":
    from Utils.cli import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
