"""What a driver runs: grids and their cells, run folders and their command lines, and the two kinds of plan.

A grid is flag -> values (the text of a command line); a cell holds one value per flag. Every cell x seed of a
sweep is one ordinary run folder, SWEEP_DIR/<cell name>/seed<k>/, which `Main.run` trains with the sweep's base
command line, the cell's flags, --seed and --out_dir (`run_argv`). A plan is every run of one command:

- `GridPlan`: the cells x seeds of one sweep or of several (Table 2: one sweep per model), known in advance;
  `Experiments.runs.run_plan` trains them one after the other, or as the grid points of an Optuna study;
- `SearchPlan` (`--search tpe`): a range or a list of values per flag, whose cells Optuna's TPE sampler picks,
  `trials` of them, each over every seed; always through a study.

`train` is how every run of a plan is trained, in this process or in a worker: from its last.pt when an earlier
attempt was interrupted, else from scratch.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

from Utils.cli import flag_value, has_flag, without_flags
from Utils.errors import UsageError

if TYPE_CHECKING:  # optuna is imported where it is used, so that a sequential sweep does not need it
    import optuna

log = logging.getLogger("diffmm")

Grid = Dict[str, List[str]]   # flag -> its values, as text
Cell = Dict[str, str]         # flag -> one value
FORBIDDEN = ("seed", "out_dir")                                    # set by the sweep itself
IDENTITY_SKIP = ("--quiet", "--device", "--gpu", "--threads")      # how a run is executed, not what it computes


# ---------------------------------------------------------------------------------------------
# Grids: --grid "flag=a,b ..." or a model's named grid
# ---------------------------------------------------------------------------------------------

def seed_list(text: str) -> List[int]:
    """--seeds '421,422' -> [421, 422] (any integers, 0 and negative ones included)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds such as 421,422, got {text!r}"
                                         ) from None


def grid_names() -> List[str]:
    """The models with a named grid (their class attribute `grid`: MMRec's hyper-parameter grid)."""
    from Models import get_model, model_names

    return [n for n in model_names() if getattr(get_model(n), "grid", None)]


def named_grid(name: str) -> Grid:
    """A model's hyper-parameter grid, as text (its class attribute `grid`)."""
    from Models import get_model

    return {flag: [str(v) for v in values] for flag, values in get_model(name).grid.items()}


def parse_grid(tokens: Sequence[str], base_argv: Sequence[str] = ()) -> Grid:
    """'temp=0.1,0.5 ssl_reg=1,0.1' (one string or several) -> {'temp': ['0.1', '0.5'], 'ssl_reg': ['1', '0.1']}.

    Flags are checked against the parser of the model named in `base_argv` (default diffmm).
    """
    from Params import build_parser

    model = flag_value(base_argv, "--model", "diffmm")
    known = {opt.lstrip("-") for action in build_parser(model)._actions for opt in action.option_strings}
    grid: Grid = {}
    for token in " ".join(tokens).split():
        name, sep, values = token.partition("=")
        name = name.lstrip("-")
        if not sep or not values:
            raise ValueError(f"grid entry {token!r} is not flag=value1,value2,... (or a model name: "
                             f"{', '.join(grid_names())})")
        if name not in known:
            raise ValueError(f"grid flag {name!r} is not a flag of model {model}")
        if name in FORBIDDEN:
            raise ValueError(f"grid flag {name!r} is set by the sweep itself (use --seeds / --sweep_dir)")
        if name in grid:
            raise ValueError(f"grid flag {name!r} is given twice")
        grid[name] = [v for v in values.split(",") if v]
    return grid


def grid_argument(tokens: Sequence[str], rest: Sequence[str]) -> Tuple[Grid, List[str]]:
    """A sweep's --grid: flag=values, or one model name for that model's named grid with `--model NAME` added to
    the command line `rest`. Returns (grid, command line)."""
    if len(tokens) == 1 and "=" not in tokens[0]:
        name = tokens[0]
        if name not in grid_names():
            raise ValueError(f"--grid {name!r} is neither flag=values nor a model with a grid preset "
                             f"({', '.join(grid_names())})")
        return named_grid(name), list(rest) + ["--model", name]
    return parse_grid(tokens, rest), list(rest)


def reject_ranges(grid: Grid) -> None:
    """A grid run through a study lists its values; a range (low:high) is for --search tpe."""
    ranges = [f"{f}={v[0]}" for f, v in grid.items() if any(":" in x for x in v)]
    if ranges:
        raise UsageError(f"--grid {ranges[0]} is a range, which only --search tpe samples; list the grid's "
                         f"values (flag=a,b,c).")


def cells(grid: Grid) -> List[Cell]:
    """Every combination of the grid's values, the first flag varying slowest."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


# ---------------------------------------------------------------------------------------------
# Run folders and their command lines
# ---------------------------------------------------------------------------------------------

def cell_name(cell: Cell) -> str:
    """Folder name of a cell: 'temp=0.1_ssl_reg=1' ('base' for an empty grid)."""
    safe = lambda v: v.replace("/", "-").replace(" ", "")  # noqa: E731
    return "_".join(f"{k}={safe(v)}" for k, v in cell.items()) or "base"


def cell_argv(cell: Cell) -> List[str]:
    return [item for k, v in cell.items() for item in (f"--{k}", v)]


def run_dir_of(sweep_dir: Path, cell: Cell, seed: int) -> Path:
    return Path(sweep_dir) / cell_name(cell) / f"seed{seed}"


def job_key(sweep_dir: Path, run_dir: Path) -> str:
    """A run's name in its plan and in the plan's study: its folder's path under the plan's folder
    ('temp=0.1/seed421', 'lightgcn/base/seed421')."""
    return Path(run_dir).relative_to(sweep_dir).as_posix()


def with_keep_last(argv: Sequence[str]) -> List[str]:
    """`argv` with `--keep_last false` unless it sets --keep_last: a sweep's finished runs drop their last.pt
    (the largest file of a DiffMM run folder; docs/many-runs.md), keeping best_model.pt."""
    return list(argv) + ([] if has_flag(argv, "--keep_last") else ["--keep_last", "false"])


def run_argv(base_argv: Sequence[str], cell: Cell, seed: int, sweep_dir: Path) -> List[str]:
    """The Main.py command line of one cell x seed of a sweep (the same in this process and in a worker)."""
    return with_keep_last(base_argv) + cell_argv(cell) + ["--seed", str(seed), "--out_dir",
                                                          str(run_dir_of(sweep_dir, cell, seed))]


def identity_argv(argv: Sequence[str]) -> List[str]:
    """`argv` without how its run is executed (IDENTITY_SKIP): what it computes (--quiet may stand alone; the others
    take a value)."""
    return without_flags(argv, IDENTITY_SKIP, standalone=("--quiet",))


@dataclass(frozen=True)
class Job:
    """One run folder: its name in the study (its path under the sweep folder), folder and Main.py command."""

    key: str
    run_dir: Path
    argv: Tuple[str, ...]
    params: Tuple[Tuple[str, Union[str, int]], ...] = ()


def train(job: Job, run_flags: Sequence[str] = (), label: str = "",
          on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train one run through Main.run (its command line plus `run_flags`: a worker's device or threads): resumed
    from its last.pt when there is one (an interrupted run), else from scratch (a folder without last.pt holds no
    epoch to keep, so it is removed first)."""
    import Main
    from Params import parse_args
    from Utils import run_folder

    args, run_dir = parse_args(list(job.argv) + list(run_flags)), job.run_dir
    if run_folder.has_last(run_dir):  # an interrupted run: continue it from its last epoch
        log.info(f"{label}resuming {run_dir}")
        return Main.run(argparse.Namespace(**dict(vars(args), resume=str(run_dir))), on_epoch=on_epoch)
    if run_dir.exists():
        log.info(f"removing the unfinished run folder {run_dir} (no last.pt) to run it again")
        shutil.rmtree(run_dir)
    log.info(f"{label}{run_dir.parent.name} seed {args.seed} -> {run_dir}")
    return Main.run(args, on_epoch=on_epoch)


# ---------------------------------------------------------------------------------------------
# A grid's runs, known in advance
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    """One grid x seeds with its base Main.py command line, in its folder (its tables: table.md, table.csv)."""

    folder: Path
    grid: Grid
    seeds: Tuple[int, ...]
    base: Tuple[str, ...]

    @classmethod
    def of(cls, folder: Path, grid: Grid, seeds: Sequence[int], base: Sequence[str]) -> "Sweep":
        return cls(Path(folder), dict(grid), tuple(int(s) for s in seeds), tuple(base))


@dataclass
class GridPlan:
    """Every run of one or several sweeps. `space` is the GridSampler search space whose points are exactly these
    runs: one sweep in the plan's own folder has its grid plus `seed` (MMRec's grid, cell for cell); several
    (Table 2: a sweep per model) have one parameter `run` naming each."""

    sweep_dir: Path
    sweeps: List[Sweep]
    jobs_by_sweep: List[List[Job]] = field(init=False, repr=False)
    jobs: List[Job] = field(init=False, repr=False)
    space: Dict[str, list] = field(init=False)
    _by_params: Dict[tuple, Job] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sweep_dir = Path(self.sweep_dir)
        single = len(self.sweeps) == 1 and self.sweeps[0].folder == self.sweep_dir
        self.jobs_by_sweep = []
        for s in self.sweeps:
            jobs = []
            for cell in cells(s.grid):
                for seed in s.seeds:
                    run_dir = run_dir_of(s.folder, cell, seed)
                    key = job_key(self.sweep_dir, run_dir)
                    params = {**cell, "seed": int(seed)} if single else {"run": key}
                    jobs.append(Job(key, run_dir, tuple(run_argv(s.base, cell, seed, s.folder)),
                                    tuple(sorted(params.items()))))
            self.jobs_by_sweep.append(jobs)
        self.jobs = [job for jobs in self.jobs_by_sweep for job in jobs]
        if single:
            self.space = {**{flag: list(values) for flag, values in self.sweeps[0].grid.items()},
                          "seed": list(self.sweeps[0].seeds)}
        else:
            self.space = {"run": [job.key for job in self.jobs]}
        self._by_params = {job.params: job for job in self.jobs}

    def job_of(self, params: Dict[str, object]) -> Job:
        return self._by_params[tuple(sorted(params.items()))]

    def check(self) -> None:
        """Parse every command line, so that a bad value fails before hours of training."""
        from Params import parse_args

        for job in self.jobs:
            parse_args(list(job.argv))

    def identity(self) -> dict:
        """What the plan computes (its runs' command lines without how they run), for the study's name."""
        return {"runs": {job.key: identity_argv(job.argv) for job in self.jobs}}

    def trial_runs(self, trial: "optuna.Trial") -> Tuple[str, List[Job]]:
        """The run of a study's trial (a grid point): its key and its one job."""
        job = self.job_of({name: trial.suggest_categorical(name, values) for name, values in self.space.items()})
        return job.key, [job]


# ---------------------------------------------------------------------------------------------
# A search: ranges sampled by TPE
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """A flag's range for --search tpe: 'low:high[:log][:int]'."""

    low: float
    high: float
    log: bool
    integer: bool


Space = Dict[str, Union[Range, List[str]]]


def parse_search(grid: Grid) -> Space:
    """Each flag of a parsed --grid as a Range (one value 'low:high[:log][:int]') or its list of values."""
    space: Space = {}
    for flag, values in grid.items():
        if len(values) != 1 or ":" not in values[0]:
            if any(":" in v for v in values):
                raise UsageError(f"--grid {flag}={','.join(values)} mixes a range and values; give either "
                                 f"low:high[:log][:int] or a list of values.")
            space[flag] = values
            continue
        low, high, *options = values[0].split(":")
        if any(o not in ("log", "int") for o in options):
            raise UsageError(f"--grid {flag}={values[0]}: a range is low:high with the options log and int "
                             f"(e.g. temp=0.05:1.0:log, latdim=32:128:int), got {':'.join(options)!r}.")
        integer = "int" in options
        try:
            lo, hi = (int(low), int(high)) if integer else (float(low), float(high))
        except ValueError:
            raise UsageError(f"--grid {flag}={values[0]}: the bounds of a{'n integer' if integer else ''} range "
                             f"must be numbers, e.g. {flag}=0.05:1.0:log.") from None
        if not lo < hi or ("log" in options and lo <= 0):
            raise UsageError(f"--grid {flag}={values[0]}: a range needs low < high (and low > 0 with log).")
        space[flag] = Range(lo, hi, "log" in options, integer)
    return space


@dataclass(frozen=True)
class SearchPlan:
    """`trials` cells picked by TPE from `space`, each run with every seed in SWEEP_DIR/<cell>/seed<k>/."""

    sweep_dir: Path
    space: Space
    seeds: Tuple[int, ...]
    base: Tuple[str, ...]
    trials: Optional[int]

    @classmethod
    def of(cls, sweep_dir: Path, grid: Grid, seeds: Sequence[int], base: Sequence[str],
           trials: Optional[int]) -> "SearchPlan":
        """The search of a --grid of ranges or values (a UsageError sentence for a bad range)."""
        return cls(Path(sweep_dir), parse_search(grid), tuple(int(s) for s in seeds), tuple(base), trials)

    def jobs_of(self, cell: Cell) -> List[Job]:
        """The runs of a cell, one per seed."""
        run_dirs = [run_dir_of(self.sweep_dir, cell, seed) for seed in self.seeds]
        return [Job(job_key(self.sweep_dir, run_dir), run_dir, tuple(run_argv(self.base, cell, seed, self.sweep_dir)))
                for seed, run_dir in zip(self.seeds, run_dirs)]

    def check(self) -> None:
        """Each value and each bound through Main.py's parser, before anything is written."""
        from Params import parse_args

        for flag, spec in self.space.items():
            for value in spec if isinstance(spec, list) else (spec.low, spec.high):
                parse_args(run_argv(self.base, {flag: str(value)}, self.seeds[0], self.sweep_dir))

    def identity(self) -> dict:
        """What the search computes (its space, seeds and command line without how it runs), for the study's name."""
        return {"search": {f: (vars(s) if isinstance(s, Range) else s) for f, s in self.space.items()},
                "seeds": list(self.seeds), "base": identity_argv(self.base)}

    def suggest(self, trial: "optuna.Trial") -> Cell:
        """A TPE trial's cell: each flag's value as the text passed to Main.py (floats to 4 significant digits)."""
        cell = {}
        for flag, spec in self.space.items():
            if isinstance(spec, list):
                cell[flag] = trial.suggest_categorical(flag, spec)
            elif spec.integer:
                cell[flag] = str(trial.suggest_int(flag, int(spec.low), int(spec.high), log=spec.log))
            else:
                cell[flag] = f"{trial.suggest_float(flag, spec.low, spec.high, log=spec.log):.4g}"
        return cell

    def trial_runs(self, trial: "optuna.Trial") -> Tuple[str, List[Job]]:
        """The runs of a study's trial: the cell TPE suggests (kept in the trial's user attribute `cell`, which the
        tables read back), every seed."""
        cell = self.suggest(trial)
        trial.set_user_attr("cell", cell)
        return cell_name(cell), self.jobs_of(cell)


Plan = Union[GridPlan, SearchPlan]
