"""Grid sweeps over Main.py flags with several seeds (paper Table 4, Figure 3, Figure 4, MMRec's grids).

    python -m Experiments.sweep --grid "temp=0.1,0.5,1.0 ssl_reg=1,0.1,0.01" --seeds 421,422 --sweep_dir runs/t4 \
        --data tiktok --reg 1e-4 --epoch 50 --trans 1 --e_loss 0.1 --cl_method 1
    python -m Experiments.sweep --grid lightgcn --sweep_dir runs/lgn --data tiktok    # a model's MMRec grid

A `--grid` that names a model is that model's preset: its MMRec hyper-parameter grid (the class
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

With `--workers N`, `--devices 0,1`, `--storage URL` (or `--search tpe`, `--prune`) the runs are the
trials of an Optuna study that several processes or machines share (`Experiments/workers.py`; README,
Many runs at once); the tables are written by the same functions, from the same run folders.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import csv
import itertools
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("diffmm")
FORBIDDEN = ("seed", "out_dir")
METRICS = ("Recall", "NDCG", "Precision")


def parse_grid(tokens: Sequence[str], base_argv: Sequence[str] = ()) -> Dict[str, List[str]]:
    """'temp=0.1,0.5 ssl_reg=1,0.1' (one string or several) -> {'temp': ['0.1', '0.5'], 'ssl_reg': ['1', '0.1']}.

    Flags are checked against the parser of the model named in `base_argv` (default diffmm).
    """
    from Params import build_parser, model_of

    known = {opt.lstrip("-") for action in build_parser(model_of(base_argv))._actions
             for opt in action.option_strings}
    grid: Dict[str, List[str]] = {}
    for token in " ".join(tokens).split():
        name, sep, values = token.partition("=")
        name = name.lstrip("-")
        if not sep or not values:
            raise ValueError(f"grid entry {token!r} is not flag=value1,value2,... (or a model name: "
                             f"{', '.join(preset_names())})")
        if name not in known:
            raise ValueError(f"grid flag {name!r} is not a flag of model {model_of(base_argv)}")
        if name in FORBIDDEN:
            raise ValueError(f"grid flag {name!r} is set by the sweep itself (use --seeds / --sweep_dir)")
        if name in grid:
            raise ValueError(f"grid flag {name!r} is given twice")
        grid[name] = [v for v in values.split(",") if v]
    return grid


def preset_names() -> List[str]:
    """The models with an MMRec grid preset."""
    from Models import get_model, model_names

    return [n for n in model_names() if getattr(get_model(n), "grid", None)]


def preset(name: str) -> Dict[str, List[str]]:
    """A model's hyper-parameter grid, as strings (its class attribute `grid`)."""
    from Models import get_model

    return {flag: [str(v) for v in values] for flag, values in get_model(name).grid.items()}


def cells(grid: Dict[str, List[str]]) -> List[Dict[str, str]]:
    """Every combination of the grid's values, the first flag varying slowest."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def cell_name(cell: Dict[str, str]) -> str:
    """Folder name of a cell: 'temp=0.1_ssl_reg=1' ('base' for an empty grid)."""
    safe = lambda v: v.replace("/", "-").replace(" ", "")  # noqa: E731
    return "_".join(f"{k}={safe(v)}" for k, v in cell.items()) or "base"


def cell_argv(cell: Dict[str, str]) -> List[str]:
    return [item for k, v in cell.items() for item in (f"--{k}", v)]


def run_dir_of(sweep_dir: Path, cell: Dict[str, str], seed: int) -> Path:
    return Path(sweep_dir) / cell_name(cell) / f"seed{seed}"


def with_keep_last(argv: Sequence[str]) -> List[str]:
    """`argv` with `--keep_last false` unless it sets --keep_last: a sweep's finished runs drop their last.pt
    (the largest file of a DiffMM run folder; docs/many-runs.md), keeping best_model.pt."""
    given = any(a == "--keep_last" or a.startswith("--keep_last=") for a in argv)
    return list(argv) + ([] if given else ["--keep_last", "false"])


def run_argv(base_argv: Sequence[str], cell: Dict[str, str], seed: int, sweep_dir: Path) -> List[str]:
    """The Main.py command line of one cell x seed of a sweep (the same for the sequential sweep and workers)."""
    return with_keep_last(base_argv) + cell_argv(cell) + ["--seed", str(seed), "--out_dir",
                                                          str(run_dir_of(sweep_dir, cell, seed))]


def finished_summary(run_dir: Path) -> Optional[dict]:
    """The summary of a finished run (its epochs, early-stopped or pruned; not `stopped`), else None."""
    from Utils import run_folder

    return run_folder.finished_summary(run_dir)


def run_cell(args: argparse.Namespace, run_dir: Path, label: str = "",
             on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train one run of a sweep through Main.run: resumed from its last.pt when there is one (an interrupted
    run), else from scratch (a folder without last.pt holds no epoch to keep, so it is removed first)."""
    import Main
    from Utils import run_folder

    if run_folder.has_last(run_dir):  # an interrupted run: continue it from its last epoch
        log.info(f"{label}resuming {run_dir}")
        return Main.run(argparse.Namespace(**dict(vars(args), resume=str(run_dir))), on_epoch=on_epoch)
    if run_dir.exists():
        log.info(f"removing the unfinished run folder {run_dir} (no last.pt) to run it again")
        shutil.rmtree(run_dir)
    log.info(f"{label}{run_dir.parent.name} seed {args.seed} -> {run_dir}")
    return Main.run(args, on_epoch=on_epoch)


def sweep(grid: Dict[str, List[str]], seeds: Sequence[int], sweep_dir: Path, base_argv: Sequence[str] = (),
          select: str = "validation") -> dict:
    """Run every missing cell x seed, then write the tables and the figure.

    Returns what ran, the rows and the selected row (`select`: 'validation' or 'mmrec', see the module).
    """
    from Params import parse_args

    sweep_dir = Path(sweep_dir)
    plan = [(cell, seed) for cell in cells(grid) for seed in seeds]
    # parse every command line first, so a bad value fails before hours of training
    parsed = {(cell_name(cell), seed): parse_args(run_argv(base_argv, cell, seed, sweep_dir)) for cell, seed in plan}
    ran, skipped = [], []
    for i, (cell, seed) in enumerate(plan):
        run_dir = run_dir_of(sweep_dir, cell, seed)
        if finished_summary(run_dir) is not None:
            skipped.append(str(run_dir))
            continue
        run_cell(parsed[(cell_name(cell), seed)], run_dir, f"sweep run {i + 1}/{len(plan)}: ")
        ran.append(str(run_dir))
    rows = summarise(sweep_dir, grid, seeds)
    selected = select_row(rows, select)
    written = write_tables(rows, list(grid), sweep_dir, selected, select)
    log.info(f"sweep: {len(ran)} runs done, {len(skipped)} already there; wrote {', '.join(map(str, written))}")
    return {"ran": ran, "skipped": skipped, "rows": rows, "selected": selected, "files": written}


def select_row(rows: List[dict], select: str = "validation") -> Optional[dict]:
    """The row with the best mean validation Recall@k, or (select='mmrec') the best mean test Recall@k."""
    rows = [row for row in rows if not row.get("pruned")]  # a pruned cell (--prune) stopped early: never selected
    if not rows:
        return None
    k = rows[0]["k"]
    key = f"val_Recall@{k}_mean" if select == "validation" else f"test_Recall@{k}_mean"
    return max(rows, key=lambda row: row[key])


def _mean_std(values: List[float]) -> tuple:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(sweep_dir: Path, grid: Dict[str, List[str]], seeds: Sequence[int],
              cell_list: Optional[List[Dict[str, str]]] = None) -> List[dict]:
    """One row per cell (of the grid, or `cell_list`: a search's cells): flag values, seeds, K, and mean/std over
    seeds of the validation protocol's metrics; `pruned` when a run of the cell was pruned (--prune), whose
    later seeds (--search tpe) may not have run."""
    from Utils import run_folder

    rows = []
    for cell in cell_list if cell_list is not None else cells(grid):
        run_dirs = [run_dir_of(sweep_dir, cell, s) for s in seeds]
        summaries = [run_folder.read_summary(d) for d in run_dirs if (d / run_folder.SUMMARY).is_file()]
        pruned = any("pruned" in s for s in summaries)
        if not pruned:  # every seed's run is there (a missing one fails here, as it always did)
            summaries = [run_folder.read_summary(d) for d in run_dirs]
        k = summaries[0]["config"]["topk"]
        row: dict = dict(cell)
        if pruned:
            row["pruned"] = True
        row["seeds"] = len(summaries)
        row["k"] = k
        row["epoch_mean"] = float(np.mean([s["protocols"]["validation"]["epoch"] for s in summaries]))
        for split, metrics in (("val", ("Recall",)), ("test", METRICS)):
            for metric in metrics:
                key = f"{split}_{metric}@{k}"
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(
                    [s["protocols"]["validation"][split][f"{metric}@{k}"] for s in summaries])
        rows.append(row)
    return rows


def write_tables(rows: List[dict], flags: List[str], sweep_dir: Path, selected: Optional[dict] = None,
                 select: str = "validation") -> List[Path]:
    """table.csv (every number), table.md (mean ± std) and, for two cells or more, sweep.png in sweep_dir."""
    from Utils.figures import sweep_figure

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    k = rows[0]["k"] if rows else 20
    keys = [f"val_Recall@{k}"] + [f"test_{m}@{k}" for m in METRICS]
    columns = flags + ["seeds", "epoch_mean"] + [f"{key}_{stat}" for key in keys for stat in ("mean", "std")]
    pruned = [row for row in rows if row.get("pruned")]
    columns += ["pruned"] if pruned else []
    with open(sweep_dir / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = flags + ["seeds"] + [key.replace("_", " ", 1) for key in keys]
    lines = ["Validation protocol (epoch chosen on validation Recall, test reported there); "
             "mean ± std over seeds (sample std; the value alone for one seed).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells_ = [str(row[f]) for f in flags] + [str(row["seeds"])]
        # one seed has no spread: print the value alone rather than a misleading "± 0"
        cells_ += [f"{row[f'{key}_mean']:.4f}" + (f" ± {row[f'{key}_std']:.4f}" if row["seeds"] > 1 else "")
                   for key in keys]
        lines.append("| " + " | ".join(cells_) + " |")
    if pruned:
        lines += ["", "Pruned (--prune stopped a run early; never selected): "
                  + "; ".join(" ".join(f"{f}={row[f]}" for f in flags) or "base" for row in pruned)]
    if selected is not None and flags:
        rule = ("best mean validation Recall" if select == "validation"
                else "best mean test Recall (MMRec's rule: it selects on test)")
        lines += ["", f"Selected ({rule}@{k}): " + " ".join(f"{f}={selected[f]}" for f in flags)]
    (sweep_dir / "table.md").write_text("\n".join(lines) + "\n")
    written = [sweep_dir / "table.md", sweep_dir / "table.csv"]
    if len(rows) > 1:  # one cell (Table 2's runs of a model without --tune) has nothing to draw beyond table.md
        written.append(sweep_figure(rows, flags, k, sweep_dir / "sweep.png"))
    return written


def int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds such as 421,422, got {text!r}"
                                         ) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from DataHandler import DataError
    from Experiments import workers
    from Utils.helpers import UsageError, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        description="Run a grid of Main.py flags x seeds and tabulate it (paper Table 4, Figures 3-4, MMRec's "
                    "grids); every other flag is passed to Main.py.", allow_abbrev=False)
    p.add_argument("--grid", nargs="+", required=True,
                   help='flags and values, e.g. "temp=0.1,0.5,1.0 ssl_reg=1,0.1,0.01" (paper Table 4), '
                        '"e_loss=0.01,0.1,0.5" or "ris_lambda=0.1,0.5,1.0" (Figure 3), "fusion_ratio=0,0.5,1" '
                        '(Figure 4), or a model name for its MMRec grid (mf, lightgcn, vbpr, ...)')
    p.add_argument("--seeds", default=[421], type=int_list, help="comma-separated seeds, one run each per cell")
    p.add_argument("--sweep_dir", required=True, type=Path, help="folder of the sweep's runs and tables")
    p.add_argument("--select", default="validation", choices=["validation", "mmrec"],
                   help="how the table's selected cell is chosen: best validation Recall, or MMRec's best test "
                        "Recall at the best-validation epoch (selects on test)")
    workers.add_worker_args(p, search=True)
    args, rest = p.parse_known_args(argv)
    setup_logging("--quiet" in rest)
    for flag in rest:
        if flag.split("=")[0] in ("--seed", "--out_dir"):
            log.error(f"error: {flag.split('=')[0]} is set by the sweep; use --seeds and --sweep_dir.")
            return 2
    try:
        if len(args.grid) == 1 and "=" not in args.grid[0]:
            name = args.grid[0]
            if name not in preset_names():
                raise ValueError(f"--grid {name!r} is neither flag=values nor a model with a grid preset "
                                 f"({', '.join(preset_names())})")
            grid, rest = preset(name), rest + ["--model", name]
        else:
            grid = parse_grid(args.grid, rest)
        if workers.wanted(args):  # through an Optuna study (docs/many-runs.md)
            result = workers.sweep_in_study(grid, args, rest, argv)
            if result is None:  # a worker started by a parent, which writes the tables
                return 0
        else:
            result = sweep(grid, args.seeds, args.sweep_dir, rest, args.select)
    except (ValueError, DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    except workers.WorkersFailed as e:
        log.error(f"error: {e}")
        return 1
    print((args.sweep_dir / "table.md").read_text())
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    from Utils.helpers import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
