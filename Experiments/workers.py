"""Many runs at once: the runs of a sweep (or of a reproduced table) as the trials of one Optuna study.

    python -m Experiments.sweep --grid "temp=0.1,0.5 ssl_reg=1,0.1" --seeds 1,2 --sweep_dir runs/t4 --workers 2 ...
    python -m Experiments.sweep ... --devices 0,1,2,3                    # one worker per GPU
    python -m Experiments.sweep ... --storage postgresql://u@host/db     # the same command on every machine
    python -m Experiments.workers --storage sqlite:///runs/t4/optuna.db   # progress: the studies and their trials

Every grid cell x seed (Table 2: every model's cells x seeds) is one point of an `optuna.samplers.GridSampler`
over exactly those runs, and each trial trains one ordinary run folder through `Main.run`, as the sequential
sweep does (finished: read, never rerun; interrupted: resumed from its last.pt). The study lives in a storage
that every worker reaches: a database URL (sqlite:///FILE on one machine, postgresql://... for several) or
Optuna's journal file (`journal:PATH`, or a path ending in .log, on a shared filesystem). Its name is the
sweep folder's name and a digest of the runs' command lines, so the same command joins the same study
wherever it runs. The storage coordinates; there is no other queue:

- a worker killed mid-run stops its trial's heartbeat; after the grace period (twice `--heartbeat`) any
  worker fails the stale trial and Optuna's retry callback puts a copy with the same parameters in the
  queue (WAITING), which the next free worker takes and resumes from the run's last.pt;
- two workers never train the same run at once: a trial first records its run (user attribute `run`),
  waits until every earlier running trial has recorded its own, and yields without training (pruned, with
  `duplicate_of`) when an earlier running or waiting trial holds the same run. Trial numbers are handed out
  by the storage, so of two trials of one run exactly the earlier one trains (GridSampler may give one
  grid point to two workers in a race);
- a worker ends only when every run is finished (or has failed with a reason in this command): while the
  last runs train elsewhere it waits, so a run whose worker dies is still picked up.

`--search tpe --trials K` (ranges such as temp=0.05:1.0:log) and `--prune` (MedianPruner on the validation
Recall@topk of every evaluated epoch) go beyond MMRec's grids; they are not what MMRec does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from Experiments.sweep import cell_name, cells, finished_summary, run_argv, run_dir_of
from Utils.helpers import UsageError

if TYPE_CHECKING:  # optuna is imported where it is used, so that a sequential sweep does not need it
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger("diffmm")

DB_SCHEMES = ("sqlite", "postgresql", "mysql")
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL (and use mysql+pymysql://)"}
IDENTITY_SKIP = ("--quiet", "--device", "--gpu", "--threads")  # how a run is executed, not what it computes
PARENT_FLAGS = ("--workers", "--devices")                        # the parent's own; its workers get the rest


def require_optuna() -> None:
    """One sentence instead of an ImportError when optuna (requirements.txt) is missing."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError("many runs at once (--workers, --storage, --devices, --search, --prune) need optuna, which "
                         "is not installed: pip install -r requirements.txt.") from None


# ---------------------------------------------------------------------------------------------
# What to run: the plan (a grid of runs) or a search space (TPE)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One run folder: its name in the study (its path under the sweep folder), folder and Main.py command."""

    key: str
    run_dir: Path
    argv: Tuple[str, ...]
    params: Tuple[Tuple[str, Union[str, int]], ...]


@dataclass
class Plan:
    """Every run of a command; `space` is the GridSampler search space whose points are exactly these runs."""

    sweep_dir: Path
    jobs: List[Job]
    space: Dict[str, list]
    _by_params: Dict[tuple, Job] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_params = {job.params: job for job in self.jobs}

    def job_of(self, params: Dict[str, object]) -> Job:
        return self._by_params[tuple(sorted(params.items()))]


def plan_of(sweep_dir: Path, sweeps: Sequence[Tuple[Path, Dict[str, List[str]], Sequence[int], Sequence[str]]]) -> Plan:
    """The plan of one or several sweeps (folder, grid, seeds, base command line), with the run folders and
    command lines that `Experiments.sweep.sweep` gives them. One sweep's space is its grid plus `seed`
    (MMRec's grid cell for cell); several (Table 2: a grid per model) are one parameter `run` naming each."""
    sweep_dir = Path(sweep_dir)
    single = len(sweeps) == 1 and Path(sweeps[0][0]) == sweep_dir
    jobs = []
    for folder, grid, seeds, base in sweeps:
        for cell in cells(grid):
            for seed in seeds:
                run_dir = run_dir_of(folder, cell, seed)
                key = run_dir.relative_to(sweep_dir).as_posix()
                params = {**cell, "seed": int(seed)} if single else {"run": key}
                jobs.append(Job(key, run_dir, tuple(run_argv(base, cell, seed, folder)), tuple(sorted(params.items()))))
    if single:
        grid, seeds = sweeps[0][1], sweeps[0][2]
        space: Dict[str, list] = {**{flag: list(values) for flag, values in grid.items()},
                                  "seed": [int(s) for s in seeds]}
    else:
        space = {"run": [job.key for job in jobs]}
    return Plan(sweep_dir, jobs, space)


@dataclass(frozen=True)
class Range:
    """A flag's range for --search tpe: 'low:high[:log][:int]'."""

    low: float
    high: float
    log: bool
    integer: bool


def parse_search(grid: Dict[str, List[str]]) -> Dict[str, Union[Range, List[str]]]:
    """Each flag of a parsed --grid as a Range (one value 'low:high[:log][:int]') or its list of values."""
    space: Dict[str, Union[Range, List[str]]] = {}
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


def suggest_cell(trial: "optuna.Trial", search: Dict[str, Union[Range, List[str]]]) -> Dict[str, str]:
    """A TPE trial's cell: each flag's value as the text passed to Main.py (floats to 4 significant digits)."""
    cell = {}
    for flag, spec in search.items():
        if isinstance(spec, list):
            cell[flag] = trial.suggest_categorical(flag, spec)
        elif spec.integer:
            cell[flag] = str(trial.suggest_int(flag, int(spec.low), int(spec.high), log=spec.log))
        else:
            cell[flag] = f"{trial.suggest_float(flag, spec.low, spec.high, log=spec.log):.4g}"
    return cell


# ---------------------------------------------------------------------------------------------
# Options, storage, study
# ---------------------------------------------------------------------------------------------

def add_worker_args(p: argparse.ArgumentParser, search: bool = False) -> None:
    """The flags of many runs at once (docs/many-runs.md); `search`: also --search/--trials/--prune."""
    g = p.add_argument_group("many runs at once (an Optuna study; docs/many-runs.md)")
    g.add_argument("--workers", type=int, default=None,
                   help="start N worker processes on this machine (CPU: each gets cores/N threads)")
    g.add_argument("--devices", default=None,
                   help="comma-separated CUDA device indices, one worker per device (--device cuda --gpu K)")
    g.add_argument("--storage", default=None,
                   help="the study's storage, which every worker reaches: sqlite:///FILE, postgresql://USER@HOST/DB, "
                        "or a journal file journal:PATH (or PATH.log) on a shared filesystem; default "
                        "sqlite:///SWEEP_DIR/optuna.db; the same command with the same --storage on another machine "
                        "joins the study")
    g.add_argument("--study", default=None, help="the study's name (default: the sweep folder's name and a digest "
                                                  "of the runs' command lines)")
    g.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a worker's heartbeats; a run silent for twice that is taken over (resumed)")
    g.add_argument("--worker_index", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent
    if search:
        g.add_argument("--search", default="grid", choices=["grid", "tpe"],
                       help="grid: every cell (MMRec's way); tpe: Optuna's TPE sampler over ranges such as "
                            "temp=0.05:1.0:log or latdim=32:128:int (not what MMRec does)")
        g.add_argument("--trials", type=int, default=None, help="--search tpe: the number of trials")
        g.add_argument("--prune", action="store_true",
                       help="stop runs whose validation Recall@topk is below the median of earlier runs at the same "
                            "epoch (Optuna's MedianPruner; not what MMRec does); a pruned run is never selected")
        g.add_argument("--prune_startup", type=int, default=5, help="--prune: finished runs before any is pruned")
        g.add_argument("--prune_warmup", type=int, default=0, help="--prune: epochs of a run before it can be pruned")


def wanted(opts: argparse.Namespace) -> bool:
    """Whether the command runs through a study (any of the flags above) rather than the sequential sweep."""
    return (opts.workers is not None or opts.devices is not None or opts.storage is not None
            or opts.worker_index is not None or getattr(opts, "search", "grid") != "grid"
            or getattr(opts, "prune", False))


def _given(rest: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in rest)


def check_options(opts: argparse.Namespace, rest: Sequence[str]) -> Tuple[int, List[int]]:
    """(number of workers, CUDA devices) or a UsageError sentence; nothing is written before this passes."""
    devices: List[int] = []
    if opts.devices is not None:
        try:
            devices = [int(d) for d in opts.devices.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--devices takes comma-separated CUDA device indices such as 0,1, got "
                             f"{opts.devices!r}.") from None
        if not devices or len(set(devices)) != len(devices) or min(devices) < 0:
            raise UsageError(f"--devices takes distinct CUDA device indices such as 0,1, got {opts.devices!r}.")
        import torch

        count = torch.cuda.device_count()
        missing = [d for d in devices if d >= count]
        if missing:
            have = f"{count} CUDA device{'s' if count != 1 else ''} (0-{count - 1})" if count else "no CUDA device"
            raise UsageError(f"--devices lists GPU {', '.join(map(str, missing))}, but torch sees {have} on this "
                             f"machine.")
        if any(_given(rest, f) for f in ("--device", "--gpu")):
            raise UsageError("--devices sets --device cuda and --gpu of every run; leave --device and --gpu out.")
        if opts.workers is not None and opts.workers != len(devices):
            raise UsageError(f"--devices {opts.devices} starts one worker per device ({len(devices)}); leave "
                             f"--workers out or make it {len(devices)}.")
    workers = len(devices) if devices else opts.workers if opts.workers is not None else 1
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}.")
    if opts.heartbeat < 1:
        raise UsageError(f"--heartbeat must be at least 1 second, got {opts.heartbeat}.")
    search = getattr(opts, "search", "grid")
    if search == "tpe" and (opts.trials is None or opts.trials < 1):
        raise UsageError("--search tpe needs --trials K (K >= 1), the number of trials to run.")
    if search == "grid" and getattr(opts, "trials", None) is not None:
        raise UsageError("--trials counts the trials of --search tpe; a grid runs every cell (leave --trials out).")
    return workers, devices


@dataclass(frozen=True)
class StorageSpec:
    """A parsed --storage: a database URL (kind 'rdb') or a journal file (kind 'journal')."""

    kind: str
    target: str

    def shown(self) -> str:
        """The storage as it may be printed (a database password hidden)."""
        if self.kind == "journal":
            return f"journal:{self.target}"
        from sqlalchemy.engine import make_url

        return make_url(self.target).render_as_string(hide_password=True)

    def url(self) -> str:
        """The storage as workers are told it (--storage)."""
        return f"journal:{self.target}" if self.kind == "journal" else self.target


def parse_storage(text: Optional[str], sweep_dir: Path) -> StorageSpec:
    """--storage as a StorageSpec (default sqlite:///SWEEP_DIR/optuna.db), or a UsageError sentence."""
    if text is None:
        return StorageSpec("rdb", f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}")
    usage = ("is neither a database URL (sqlite:///FILE, postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, "
             "mysql://...) nor a journal file (journal:PATH, or a path ending in .log)")
    if text.startswith("journal:") or ("://" not in text and text.endswith(".log")):
        path = Path(text[len("journal:"):] if text.startswith("journal:") else text)
        if not path.name or path.is_dir():
            raise UsageError(f"--storage {text} names no journal file; give journal:PATH, e.g. "
                             f"journal:/shared/sweep.log.")
        if not path.parent.is_dir():
            raise UsageError(f"--storage {text}: the folder {path.parent} does not exist; create it (on a filesystem "
                             f"every worker sees) or give another path.")
        return StorageSpec("journal", str(path.resolve()))
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme.split("+")[0] not in DB_SCHEMES:
        raise UsageError(f"--storage {text!r} {usage}.")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise UsageError(f"--storage {text!r} is not a well-formed database URL; write it as "
                         f"postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE or sqlite:///FILE.") from None
    if scheme.startswith("sqlite"):
        if not url.database or url.database == ":memory:":
            raise UsageError(f"--storage {text} names no database file; give sqlite:///PATH/optuna.db (an in-memory "
                             f"database is not shared between workers).")
        if not Path(url.database).resolve().parent.is_dir():
            raise UsageError(f"--storage {text}: the folder {Path(url.database).parent} does not exist; create it or "
                             f"give another path.")
    elif not url.host or not url.database:
        raise UsageError(f"--storage {url.render_as_string(hide_password=True)} needs a host and a database, "
                         f"e.g. postgresql://USER@HOST:5432/DATABASE.")
    return StorageSpec("rdb", text)


def _retry_callback() -> object:
    """Optuna's retry of a stale trial (same parameters, intermediate values kept); named by the version."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=None, inherit_intermediate_values=True)


def heartbeat_journal_storage(backend: object, interval: int, grace: int, callback: object) -> object:
    """Optuna's JournalStorage with the heartbeat RDBStorage has (its own has none, as of optuna 5.0).

    The heartbeat is a trial system attribute written every `interval` seconds; a RUNNING trial silent for
    `grace` seconds (by the clock of the worker that checks) is stale and goes to `callback` like RDBStorage's.
    Through optuna's heartbeat interface, `study.optimize` beats and fails stale trials as it does for RDBStorage.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker declared it stale: nothing to record
                pass

        def _get_stale_trial_ids(self, study_id: int) -> List[int]:
            now = time.time()
            stale = []
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                last = trial.system_attrs.get("heartbeat")
                if last is None:
                    last = trial.datetime_start.timestamp() if trial.datetime_start else now
                if now - last > grace:
                    stale.append(trial._trial_id)
            return stale

        def get_heartbeat_interval(self) -> Optional[int]:
            return interval

        def get_heartbeat_stale_trial_callback(self) -> object:
            return callback

        get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the abstract name before optuna 4.9

    return HeartbeatJournalStorage(backend)


def open_storage(spec: StorageSpec, heartbeat: int) -> "optuna.storages.BaseStorage":
    """The storage with heartbeat `heartbeat` s and grace 2 x heartbeat; a missing driver or an unreachable
    database is a UsageError sentence."""
    import optuna
    from optuna.storages import RDBStorage

    grace = 2 * heartbeat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = _retry_callback()
        if spec.kind == "journal":
            try:
                from optuna.storages.journal import JournalFileBackend
            except ImportError:  # optuna < 4.0
                from optuna.storages import JournalFileStorage as JournalFileBackend
            try:
                return heartbeat_journal_storage(JournalFileBackend(spec.target), heartbeat, grace, callback)
            except OSError as e:
                raise UsageError(f"cannot open the journal file {spec.target} ({e.strerror or e}).") from None
        import inspect

        from sqlalchemy.exc import SQLAlchemyError

        name = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                in inspect.signature(RDBStorage.__init__).parameters else "failed_trial_callback")
        scheme = spec.target.split("://", 1)[0].split("+")[0]
        # a lock held by another worker is waited for (SQLite); an unreachable server fails in seconds, not minutes
        connect = {"timeout": 60} if scheme == "sqlite" else {"connect_timeout": 10}
        try:
            return RDBStorage(with_driver(spec.target), engine_kwargs={"connect_args": connect},
                              heartbeat_interval=heartbeat, grace_period=grace, **{name: callback})
        except ImportError:
            raise UsageError(f"--storage {spec.shown()} needs a Python driver for {scheme}, which is not installed: "
                             f"pip install {DRIVERS.get(scheme, scheme)}.") from None
        except (SQLAlchemyError, OSError) as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise UsageError(f"cannot reach the database {spec.shown()} ({reason}); check that it runs and that the "
                             f"URL, user and database are right.") from None


def with_driver(url: str) -> str:
    """postgresql://... with the driver that is installed: SQLAlchemy 2.1 takes psycopg (3) for a plain
    postgresql://, 2.0 psycopg2; either serves, so a plain URL gets psycopg2 when only that one is there."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def study_name(sweep_dir: Path, identity: object) -> str:
    """The sweep folder's name and a digest of what the command computes (its runs' command lines, without
    how they run: --quiet, --device, --gpu, --threads), so that every worker of the same command agrees."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{Path(sweep_dir).name}-{digest}"


def _identity_argv(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in IDENTITY_SKIP:
            # --quiet may stand alone; the others take a value
            skip = "=" not in a and not (name == "--quiet" and (i + 1 == len(argv) or argv[i + 1].startswith("--")))
            continue
        out.append(a)
    return out


def plan_identity(plan: Plan) -> dict:
    return {"runs": {job.key: _identity_argv(job.argv) for job in plan.jobs}}


# ---------------------------------------------------------------------------------------------
# One worker: trials until every run is finished
# ---------------------------------------------------------------------------------------------

def _quiet_optuna() -> None:
    """Optuna's own messages off (a failed trial would print a traceback): the workers log each event themselves."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def validation_recall(summary: dict) -> float:
    k = summary["config"]["topk"]
    return float(summary["protocols"]["validation"]["val"][f"Recall@{k}"])


class Worker:
    """Runs trials of the study until every run of the plan (or every TPE trial) is finished."""

    def __init__(self, study: "optuna.Study", plan: Optional[Plan], run_flags: Sequence[str], poll: float,
                 search: Optional[dict] = None, prune: bool = False) -> None:
        self.study, self.plan, self.run_flags, self.poll, self.prune = study, plan, list(run_flags), poll, prune
        self.search = search  # TPE: {"space", "seeds", "base", "sweep_dir", "trials"}
        self.given_up: set = set()  # runs that failed here with a reason (a non-finite loss): not retried here
        self.jobs = {job.key: job for job in plan.jobs} if plan is not None else {}
        self.finished: set = set()  # run folders seen finished (they stay so): not read again

    # -- the objective ----------------------------------------------------------------------------

    def jobs_of(self, trial: "optuna.Trial") -> Tuple[str, List[Job]]:
        """The trial's run key and run folders (grid: one run; TPE: one cell, every seed)."""
        if self.search is None:
            params = {name: trial.suggest_categorical(name, values) for name, values in self.plan.space.items()}
            job = self.plan.job_of(params)
            return job.key, [job]
        s = self.search
        cell = suggest_cell(trial, s["space"])
        trial.set_user_attr("cell", cell)
        jobs = [Job(run_dir_of(s["sweep_dir"], cell, seed).relative_to(s["sweep_dir"]).as_posix(),
                    run_dir_of(s["sweep_dir"], cell, seed), tuple(run_argv(s["base"], cell, seed, s["sweep_dir"])), ())
                for seed in s["seeds"]]
        return cell_name(cell), jobs

    def objective(self, trial: "optuna.Trial") -> float:
        import optuna

        from Main import TrainingStopped

        key, jobs = self.jobs_of(trial)
        trial.set_user_attr("run", key)
        if trial.user_attrs.get("duplicate_of") is not None:  # a retried copy of a trial that had yielded
            trial.set_user_attr("duplicate_of", None)
        holder = self.earlier_holder(trial.number, key)
        if holder is not None:
            trial.set_user_attr("duplicate_of", holder)
            log.info(f"trial {trial.number}: {key} is being run by trial {holder}; this one yields")
            raise optuna.TrialPruned(f"{key} is run by trial {holder}")
        values = []
        for i, job in enumerate(jobs):
            try:
                summary = self.run(job, trial if self.prune and i == 0 else None, trial.number)
            except TrainingStopped as e:
                trial.set_user_attr("error", str(e))
                self.given_up.add(key)
                log.error(f"error: trial {trial.number} ({job.key}): {e}")
                raise
            if "pruned" in summary:
                raise optuna.TrialPruned(summary["pruned"]["reason"])
            values.append(validation_recall(summary))
        return float(sum(values) / len(values))

    def run(self, job: Job, trial: Optional["optuna.Trial"], number: int) -> dict:
        """Read a finished run, else train it through Main.run (resuming from its last.pt when there is one)."""
        from Experiments.sweep import run_cell
        from Params import parse_args

        summary = finished_summary(job.run_dir)
        if summary is not None:
            log.info(f"trial {number}: {job.key} has finished already; its summary is read, not rerun")
            return summary
        args = parse_args(list(job.argv) + self.run_flags)
        log.info(f"trial {number}: {job.key}")
        return run_cell(args, job.run_dir, on_epoch=self.pruning_hook(trial, args.topk) if trial else None)

    @staticmethod
    def pruning_hook(trial: "optuna.Trial", k: int):
        """Report each evaluated epoch's validation Recall@k; stop the run (Main.RunPruned) when the pruner says so."""
        from Main import RunPruned

        def on_epoch(record: dict) -> None:
            if "val" not in record:
                return
            value = record["val"][f"Recall@{k}"]
            trial.report(value, record["epoch"])
            if trial.should_prune():
                raise RunPruned(f"validation Recall@{k} {value:.4f} at epoch {record['epoch']} is below the median of "
                                f"the earlier runs at that epoch (--prune, Optuna's MedianPruner)")
        return on_epoch

    def earlier_holder(self, number: int, key: str) -> Optional[int]:
        """The number of an earlier running or waiting trial of the same run, else None.

        Trials are numbered by the storage and each records its run before it looks, so of two trials of one run
        the later one always sees the earlier; earlier running trials that have not recorded their run yet
        (they do within milliseconds, or go stale) are waited for.
        """
        from optuna.trial import TrialState

        while True:
            earlier = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
                       if t.number < number]
            same = [t.number for t in earlier if t.user_attrs.get("run") == key]
            if same:
                return min(same)
            if not any(t.state == TrialState.RUNNING and "run" not in t.user_attrs for t in earlier):
                return None
            self.fail_stale()
            time.sleep(0.1)

    # -- the loop ---------------------------------------------------------------------------------

    def fail_stale(self) -> None:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def latest(self, trials: Sequence["FrozenTrial"]) -> Dict[str, "FrozenTrial"]:
        """Each run's latest trial (by number)."""
        out: Dict[str, "FrozenTrial"] = {}
        for t in sorted(trials, key=lambda t: t.number):
            if t.user_attrs.get("run") is not None:
                out[t.user_attrs["run"]] = t
        return out

    def is_finished(self, run_dir: Path) -> bool:
        if run_dir not in self.finished and finished_summary(run_dir) is not None:
            self.finished.add(run_dir)
        return run_dir in self.finished

    def unfinished(self, key: str, trial: Optional["FrozenTrial"]) -> bool:
        """Whether the run (TPE: the cell, over every seed) of `key` is not finished on disk."""
        if self.search is None:
            return not self.is_finished(self.jobs[key].run_dir)
        s = self.search
        cell = (trial.user_attrs.get("cell") if trial else None) or {}
        return not all(self.is_finished(run_dir_of(s["sweep_dir"], cell, seed)) for seed in s["seeds"])

    def requeue(self, include_errors: bool) -> int:
        """Put back in the queue every unfinished run that no trial holds any more (its trial failed: Ctrl-C, a
        crash; or completed into another folder), with the same parameters; runs that failed with a reason
        (a non-finite loss) only when `include_errors` (once per command). Returns how many."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        held = {t.user_attrs.get("run") for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        latest = self.latest(trials)
        keys = [job.key for job in self.plan.jobs] if self.search is None else list(latest)
        queued = 0
        for key in keys:
            last = latest.get(key)
            if key in held or key in self.given_up or last is None:
                continue  # held, or given up here, or never started (the sampler hands it out)
            if last.state == TrialState.PRUNED and last.user_attrs.get("duplicate_of") is None:
                continue  # pruned on purpose
            if last.user_attrs.get("error") and not include_errors:
                continue
            if not self.unfinished(key, last):
                continue
            self.study.enqueue_trial(dict(last.params), user_attrs={"run": key})
            log.info(f"{key} is not finished and no worker holds it: queued again")
            queued += 1
        return queued

    def work(self) -> None:
        """Trials until nothing is left: every run finished, or failed here with a reason, or (TPE) --trials done."""
        from optuna.trial import TrialState

        from Main import TrainingStopped

        while True:
            self.fail_stale()
            self.requeue(include_errors=False)
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            if self.search is None:
                started = {t.user_attrs.get("run") for t in trials}
                # a run whose latest trial failed with a reason (here or in another worker) is not waited for
                failed = {k for k, t in self.latest(trials).items()
                          if t.state == TrialState.FAIL and t.user_attrs.get("error")}
                pending = [key for key, job in self.jobs.items() if key not in self.given_up | failed
                           and not self.is_finished(job.run_dir)]
                if not pending:
                    return
                fresh = any(key not in started for key in pending)  # the grid sampler still has these to give
            else:
                done = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                           and t.user_attrs.get("duplicate_of") is None)
                held = sum(1 for t in running if t.user_attrs.get("duplicate_of") is None)
                fresh = done + held < self.search["trials"]
                if not (fresh or waiting or running):
                    return
            if waiting or fresh:
                self.study.optimize(self.objective, n_trials=1, catch=(TrainingStopped,), gc_after_trial=False)
            else:  # what is left runs elsewhere: wait, and take it over if its worker dies
                time.sleep(self.poll)


def make_study(storage: "optuna.storages.BaseStorage", name: str, search: Optional[dict], space: Optional[dict],
               prune: bool, opts: argparse.Namespace, seed: int) -> "optuna.Study":
    """The study (created by the first worker, joined by the others): GridSampler over the plan's runs, or TPE."""
    import optuna

    sampler = (optuna.samplers.TPESampler(seed=seed) if search is not None
               else optuna.samplers.GridSampler(space, seed=0))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=opts.prune_startup, n_warmup_steps=opts.prune_warmup)
              if prune else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


# ---------------------------------------------------------------------------------------------
# The drivers' entry: validate, then work here or start workers and wait
# ---------------------------------------------------------------------------------------------

def worker_argv(argv: Sequence[str], storage: str, name: str, index: int, run_flags: Sequence[str]) -> List[str]:
    """The command line of worker `index`: the parent's, without --workers/--devices, with the storage, the
    study and the run flags (its device or threads)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name_ = a.split("=", 1)[0]
        if name_ in PARENT_FLAGS + ("--storage", "--study"):
            skip = "=" not in a
            continue
        out.append(a)
    return out + ["--storage", storage, "--study", name, "--worker_index", str(index), *run_flags]


def run_flags_of(index: int, workers: int, devices: List[int], rest: Sequence[str]) -> List[str]:
    """Worker `index`'s own Main.py flags: its GPU, and its share of the CPU threads (unless --threads is given)."""
    from Utils.helpers import available_cpus

    flags = ["--device", "cuda", "--gpu", str(devices[index])] if devices else []
    if not _given(rest, "--threads"):
        flags += ["--threads", str(max(1, available_cpus() // workers))]
    return flags


def launch(module: str, argv: Sequence[str], storage: str, name: str, workers: int, devices: List[int],
           rest: Sequence[str]) -> List[int]:
    """Start the workers (`python -m module ...`), wait for them; their exit codes. Ctrl-C reaches them too."""
    procs = []
    for i in range(workers):
        flags = run_flags_of(i, workers, devices, rest)
        env = dict(os.environ)
        threads = flags[flags.index("--threads") + 1] if "--threads" in flags else None
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            if threads and var not in os.environ:  # numpy's BLAS pools too, not only torch's
                env[var] = threads
        command = [sys.executable, "-m", module, *worker_argv(argv, storage, name, i, flags)]
        procs.append(subprocess.Popen(command, env=env))
    log.info(f"started {workers} workers (process ids {', '.join(str(p.pid) for p in procs)}); waiting for them")
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # they share the terminal's Ctrl-C; a background parent forwards it
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise


def _prefix_console(index: int) -> None:
    """Worker lines on the shared console start with [worker i] (log.txt of each run is unchanged)."""
    for handler in log.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setFormatter(logging.Formatter(f"[worker {index}] %(message)s"))


def execute(opts: argparse.Namespace, argv: Sequence[str], rest: Sequence[str], module: str, sweep_dir: Path,
            plan: Optional[Plan] = None, search: Optional[dict] = None) -> Optional["optuna.Study"]:
    """Run every run of `plan` (or the trials of the TPE `search`) through the study, here or in --workers
    processes; the study when every run is finished and this process writes the tables, None in a worker that
    a parent started. Bad input is a UsageError before anything is written; runs left unfinished, WorkersFailed.

    `argv`: the command line as given (the workers get it back without --workers/--devices); `rest`: its
    Main.py flags; `module`: the driver the workers run (`python -m module`).
    """
    from Params import parse_args

    require_optuna()
    workers, devices = check_options(opts, rest)
    for job in plan.jobs if plan is not None else []:
        parse_args(list(job.argv))  # every command line first, so a bad value fails before hours of training
    spec = parse_storage(opts.storage, sweep_dir)
    identity = plan_identity(plan) if plan is not None else {
        "search": {f: (vars(s) if isinstance(s, Range) else s) for f, s in search["space"].items()},
        "seeds": list(search["seeds"]), "base": _identity_argv(search["base"])}
    name = opts.study or study_name(sweep_dir, identity)
    if spec.kind == "rdb" and opts.storage is None:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)  # the default database lives in the sweep folder
    storage = open_storage(spec, opts.heartbeat)
    _quiet_optuna()
    index, prune = opts.worker_index, bool(getattr(opts, "prune", False))
    seed = (search["seeds"][0] if search else 0) + (index or 0)  # TPE: each worker its own random stream
    study = make_study(storage, name, search, plan.space if plan else None, prune, opts, seed)
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    study.set_user_attr("sweep_dir", str(Path(sweep_dir).resolve()))
    if search is not None:
        search = dict(search, sweep_dir=Path(sweep_dir))
    poll = min(opts.heartbeat / 2, 2.0)  # how often an idle worker looks again (a cheap query)
    if index is not None:  # a worker started by a parent (its run flags are in `rest`): work, no tables
        _prefix_console(index)
        log.info(f"worker {index}: study {name} in {spec.shown()}")
        Worker(study, plan, [], poll, search, prune).work()
        return None
    total = len(plan.jobs) if plan else search["trials"]
    log.info(f"study {name} in {spec.shown()}: {total} {'runs' if plan else 'trials'}, {workers} worker"
             f"{'s' if workers > 1 else ''}; more workers join with the same command and --storage {spec.url()}")
    here = Worker(study, plan, ["--device", "cuda", "--gpu", str(devices[0])] if devices else [], poll, search, prune)
    here.requeue(include_errors=True)  # a new command retries, once, what failed before
    if workers == 1:
        here.work()
    else:
        for i, code in enumerate(launch(module, argv, spec.url(), name, workers, devices, rest)):
            if code:
                log.warning(f"warning: worker {i} ended with exit code {code}")
    left = unfinished_keys(study, plan, search)
    if left:
        raise WorkersFailed(left, study)
    return study


def sweep_in_study(grid: Dict[str, List[str]], opts: argparse.Namespace, rest: Sequence[str],
                   argv: Sequence[str]) -> Optional[dict]:
    """`Experiments.sweep` through a study: the grid's runs (or --search tpe's trials) by the workers, then the
    tables from the run folders by the sweep's own functions. None in a worker that a parent started."""
    from Experiments.sweep import select_row, summarise, sweep, write_tables
    from Params import parse_args

    sweep_dir = Path(opts.sweep_dir)
    if opts.search == "grid":
        ranges = [f"{f}={v[0]}" for f, v in grid.items() if any(":" in x for x in v)]
        if ranges:
            raise UsageError(f"--grid {ranges[0]} is a range, which only --search tpe samples; list the grid's "
                             f"values (flag=a,b,c).")
        plan = plan_of(sweep_dir, [(sweep_dir, grid, opts.seeds, rest)])
        if execute(opts, argv, rest, "Experiments.sweep", sweep_dir, plan=plan) is None:
            return None
        return sweep(grid, opts.seeds, sweep_dir, rest, opts.select)  # every run is finished: the tables only
    space = parse_search(grid)
    for flag, spec in space.items():  # each bound through Main.py's parser, before anything is written
        for value in spec if isinstance(spec, list) else (spec.low, spec.high):
            parse_args(run_argv(rest, {flag: str(value)}, opts.seeds[0], sweep_dir))
    search = {"space": space, "seeds": list(opts.seeds), "base": list(rest), "trials": opts.trials}
    study = execute(opts, argv, rest, "Experiments.sweep", sweep_dir, search=search)
    if study is None:
        return None

    def order(cell: Dict[str, str]) -> tuple:
        return tuple((0, float(v), "") if _is_number(v) else (1, 0.0, v) for v in cell.values())

    found = sorted(search_cells(study), key=order)
    rows = summarise(sweep_dir, {}, opts.seeds, found)
    selected = select_row(rows, opts.select)
    files = write_tables(rows, list(space), sweep_dir, selected, opts.select)
    log.info(f"search: {len(found)} cells tried; wrote {', '.join(map(str, files))}")
    return {"rows": rows, "selected": selected, "files": files}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unfinished_keys(study: "optuna.Study", plan: Optional[Plan], search: Optional[dict]) -> List[str]:
    """The runs not finished on disk (TPE: of the trials that did not end pruned)."""
    from optuna.trial import TrialState

    if plan is not None:
        return [job.key for job in plan.jobs if finished_summary(job.run_dir) is None]
    left = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        cell = t.user_attrs.get("cell")
        if cell is not None and t.user_attrs.get("duplicate_of") is None and t.state != TrialState.PRUNED:
            left += [run_dir_of(Path(search["sweep_dir"]), cell, s).relative_to(search["sweep_dir"]).as_posix()
                     for s in search["seeds"] if finished_summary(run_dir_of(search["sweep_dir"], cell, s)) is None]
    return sorted(set(left))


class WorkersFailed(Exception):
    """Runs left unfinished when the workers ended: one sentence naming them and why."""

    def __init__(self, keys: List[str], study: "optuna.Study"):
        errors = {t.user_attrs.get("run"): t.user_attrs.get("error") for t in study.get_trials(deepcopy=False)
                  if t.user_attrs.get("error")}
        shown = "; ".join(f"{k}" + (f" ({errors[k]})" if errors.get(k) else "") for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        super().__init__(f"{len(keys)} run{'s' if len(keys) > 1 else ''} did not finish: {shown}{more}; see "
                         f"their log.txt, then run the same command again to retry them.")


def search_cells(study: "optuna.Study") -> List[Dict[str, str]]:
    """The distinct cells of a TPE study's trials that ran (completed or pruned), in trial order."""
    from optuna.trial import TrialState

    cells: Dict[str, Dict[str, str]] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                    key=lambda t: t.number):
        if t.user_attrs.get("duplicate_of") is None and t.user_attrs.get("cell") is not None:
            cells.setdefault(t.user_attrs["run"], t.user_attrs["cell"])
    return list(cells.values())


# ---------------------------------------------------------------------------------------------
# Progress: python -m Experiments.workers --storage URL
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print each study of a storage: its trials by state and the runs being trained now."""
    from Utils.helpers import setup_logging

    p = argparse.ArgumentParser(description="Progress of the studies of many runs at once (docs/many-runs.md): "
                                            "trials by state, runs in progress.", allow_abbrev=False)
    p.add_argument("--storage", required=True, help="the --storage of the sweep (sqlite:///DIR/optuna.db by default)")
    p.add_argument("--study", default=None, help="only this study")
    args = p.parse_args(argv)
    setup_logging()
    try:
        require_optuna()
        _quiet_optuna()
        spec = parse_storage(args.storage, Path("."))
        local = (Path(spec.target) if spec.kind == "journal"
                 else Path(spec.target.split(":///", 1)[1]) if spec.target.startswith("sqlite") else None)
        if local is not None and not local.is_file():  # opening it would create it
            raise UsageError(f"{args.storage} does not exist: no sweep has used that storage yet.")
        storage = open_storage(spec, 60)
        import optuna

        summaries = optuna.study.get_all_study_summaries(storage, include_best_trial=False)
    except UsageError as e:
        log.error(f"error: {e}")
        return 2
    import optuna
    from optuna.trial import TrialState

    for s in summaries:
        if args.study and s.study_name != args.study:
            continue
        trials = optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
        counts: Dict[str, int] = {}
        for t in trials:
            state = "yielded" if t.user_attrs.get("duplicate_of") is not None else t.state.name.lower()
            counts[state] = counts.get(state, 0) + 1
        running = [f"{t.user_attrs.get('run', '?')} (trial {t.number}, since {t.datetime_start:%H:%M:%S})"
                   for t in trials if t.state == TrialState.RUNNING]
        print(f"{s.study_name}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        for line in running:
            print(f"  running: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
