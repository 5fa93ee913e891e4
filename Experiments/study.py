"""Many runs at once: the runs of a plan as the trials of one Optuna study, worked on by several processes or machines.

Every run of a `GridPlan` is one point of an `optuna.samplers.GridSampler` over exactly those runs (a `SearchPlan`:
TPE's trials, each a cell over every seed), and each trial trains one ordinary run folder through `plan.train`, as
the sequential sweep does (finished: read, never rerun; interrupted: resumed from its last.pt). The study lives in
a storage that every worker reaches (`Experiments.storage`); its name is the sweep folder's name and a digest of
what the plan computes, so the same command joins the same study wherever it runs. The storage coordinates; there
is no other queue:

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

`execute` is the entry (`Experiments.runs.run_plan` calls it): it checks the flags (`add_worker_args`), then
works here or starts --workers processes (`launch`: `python -m DRIVER` with the storage in their $DIFFMM_STORAGE,
never on their command line) and waits. `progress_lines` is `python -m Experiments.workers`.
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
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from Experiments.plan import Cell, GridPlan, Job, Plan, SearchPlan, train
from Experiments.storage import (STORAGE_ENV, open_storage, parse_storage, quiet_optuna, require_optuna,
                                 storage_text)
from Utils.cli import flag_value, has_flag, without_flags
from Utils.errors import UsageError
from Utils.run_folder import finished_summary, protocol_metrics, pruned_reason, run_config

if TYPE_CHECKING:  # optuna is imported where it is used, so that a sequential sweep does not need it
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger("diffmm")

PARENT_FLAGS = ("--workers", "--devices")                        # the parent's own; its workers get the rest


# ---------------------------------------------------------------------------------------------
# The flags, and whether a command runs through a study
# ---------------------------------------------------------------------------------------------

# the pruner's settings (--prune_startup, --prune_warmup) and their defaults
PRUNE_DEFAULTS = {"prune_startup": 5, "prune_warmup": 0}


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
                        f"sqlite:///SWEEP_DIR/optuna.db, or ${STORAGE_ENV} when set; the same command with the same "
                        f"storage on another machine joins the study; keep a password out of the URL (~/.pgpass)")
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
        g.add_argument("--prune_startup", type=int, default=PRUNE_DEFAULTS["prune_startup"],
                       help="--prune: finished runs before any is pruned (refused without --prune)")
        g.add_argument("--prune_warmup", type=int, default=PRUNE_DEFAULTS["prune_warmup"],
                       help="--prune: epochs of a run before it can be pruned (refused without --prune)")


def unused_prune_flags(opts: argparse.Namespace) -> Optional[str]:
    """One sentence when a pruner setting is given (a value other than its default) without --prune, which alone
    turns the pruner on: refused, so that a sweep meant to be pruned does not run every cell to the end."""
    given = [f"--{name}" for name, default in PRUNE_DEFAULTS.items()
             if getattr(opts, name, default) != default]
    if given and not getattr(opts, "prune", False):
        return (f"{' and '.join(given)} {'sets' if len(given) == 1 else 'set'} the pruner of --prune, which is not "
                f"given; add --prune, or leave {' and '.join(given)} out.")
    return None


def wanted(opts: argparse.Namespace) -> bool:
    """Whether the command runs through a study (any of the flags above, or $DIFFMM_STORAGE, which stands for
    --storage) rather than the sequential sweep."""
    return (opts.workers is not None or opts.devices is not None or storage_text(opts.storage) is not None
            or opts.worker_index is not None or getattr(opts, "search", "grid") != "grid"
            or getattr(opts, "prune", False))


def check_options(opts: argparse.Namespace, rest: Sequence[str]) -> Tuple[int, List[int]]:
    """(number of workers, CUDA devices) or a UsageError sentence; nothing is written before this passes."""
    problem = unused_prune_flags(opts)
    if problem:
        raise UsageError(problem)
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
        if any(has_flag(rest, f) for f in ("--device", "--gpu")):
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


def study_name(sweep_dir: Path, identity: object) -> str:
    """The sweep folder's name and a digest of what the command computes (its plan's `identity`: the runs' command
    lines without how they run: --quiet, --device, --gpu, --threads), so that every worker of the same command
    agrees."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{Path(sweep_dir).name}-{digest}"


def make_study(storage: "optuna.storages.BaseStorage", name: str, plan: Plan, prune: bool, opts: argparse.Namespace,
               seed: int) -> "optuna.Study":
    """The study (created by the first worker, joined by the others): GridSampler over the plan's runs, or TPE."""
    import optuna

    sampler = (optuna.samplers.TPESampler(seed=seed) if isinstance(plan, SearchPlan)
               else optuna.samplers.GridSampler(plan.space, seed=0))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=opts.prune_startup, n_warmup_steps=opts.prune_warmup)
              if prune else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


# ---------------------------------------------------------------------------------------------
# One worker: trials until every run is finished
# ---------------------------------------------------------------------------------------------

def validation_recall(summary: dict) -> float:
    k = run_config(summary)["topk"]
    return float(protocol_metrics(summary, "validation", "val")[f"Recall@{k}"])


class Worker:
    """Runs trials of the study until every run of a GridPlan (or every trial of a SearchPlan) is finished."""

    def __init__(self, study: "optuna.Study", plan: Plan, run_flags: Sequence[str], poll: float,
                 prune: bool = False) -> None:
        self.study, self.plan, self.run_flags, self.poll, self.prune = study, plan, list(run_flags), poll, prune
        self.given_up: set = set()  # runs that failed here with a reason (a non-finite loss): not retried here
        self.jobs = {job.key: job for job in plan.jobs} if isinstance(plan, GridPlan) else {}
        self.finished: set = set()  # run folders seen finished (they stay so): not read again

    # -- the objective ----------------------------------------------------------------------------

    def objective(self, trial: "optuna.Trial") -> float:
        import optuna

        from Main import TrainingStopped

        key, jobs = self.plan.trial_runs(trial)
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
            if pruned_reason(summary) is not None:
                raise optuna.TrialPruned(pruned_reason(summary))
            values.append(validation_recall(summary))
        return float(sum(values) / len(values))

    def run(self, job: Job, trial: Optional["optuna.Trial"], number: int) -> dict:
        """Read a finished run, else train it (resuming from its last.pt when there is one)."""
        summary = finished_summary(job.run_dir)
        if summary is not None:
            log.info(f"trial {number}: {job.key} has finished already; its summary is read, not rerun")
            return summary
        log.info(f"trial {number}: {job.key}")
        if trial is None:
            return train(job, self.run_flags)
        from Params import parse_args

        k = parse_args(list(job.argv) + self.run_flags).topk
        return train(job, self.run_flags, on_epoch=self.pruning_hook(trial, k))

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
        if isinstance(self.plan, GridPlan):
            return not self.is_finished(self.jobs[key].run_dir)
        cell = (trial.user_attrs.get("cell") if trial else None) or {}
        return not all(self.is_finished(job.run_dir) for job in self.plan.jobs_of(cell))

    def requeue(self, include_errors: bool) -> int:
        """Put back in the queue every unfinished run that no trial holds any more (its trial failed: Ctrl-C, a
        crash; or completed into another folder), with the same parameters; runs that failed with a reason
        (a non-finite loss) only when `include_errors` (once per command). Returns how many."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        held = {t.user_attrs.get("run") for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        latest = self.latest(trials)
        keys = list(self.jobs) if isinstance(self.plan, GridPlan) else list(latest)
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
            if isinstance(self.plan, GridPlan):
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
                fresh = done + held < self.plan.trials
                if not (fresh or waiting or running):
                    return
            if waiting or fresh:
                self.study.optimize(self.objective, n_trials=1, catch=(TrainingStopped,), gc_after_trial=False)
            else:  # what is left runs elsewhere: wait, and take it over if its worker dies
                time.sleep(self.poll)


# ---------------------------------------------------------------------------------------------
# Worker processes: their command line and environment
# ---------------------------------------------------------------------------------------------

def worker_argv(argv: Sequence[str], name: str, index: int, run_flags: Sequence[str]) -> List[str]:
    """The command line of worker `index`: the parent's, without --workers/--devices and without --storage
    (which may hold a password, and every user sees a command line: the storage goes in `worker_env`), with the
    study and the run flags (its device or threads)."""
    out = without_flags(argv, PARENT_FLAGS + ("--storage", "--study"))
    return out + ["--study", name, "--worker_index", str(index), *run_flags]


def worker_env(storage: str, run_flags: Sequence[str], base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a worker: `base` (default this process's) with the storage URL in $DIFFMM_STORAGE
    and, when its run flags set --threads, that many BLAS threads unless `base` sets them."""
    base = dict(os.environ) if base is None else base
    env = dict(base, **{STORAGE_ENV: storage})
    threads = flag_value(run_flags, "--threads")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if threads and var not in base:  # numpy's BLAS pools too, not only torch's
            env[var] = threads
    return env


def run_flags_of(index: int, workers: int, devices: List[int], rest: Sequence[str]) -> List[str]:
    """Worker `index`'s own Main.py flags: its GPU, and its share of the CPU threads (unless --threads is given)."""
    from Utils.device import available_cpus

    flags = ["--device", "cuda", "--gpu", str(devices[index])] if devices else []
    if not has_flag(rest, "--threads"):
        flags += ["--threads", str(max(1, available_cpus() // workers))]
    return flags


def launch(module: str, argv: Sequence[str], storage: str, name: str, workers: int, devices: List[int],
           rest: Sequence[str]) -> List[int]:
    """Start the workers (`python -m module ...`, the storage URL `storage` in their $DIFFMM_STORAGE), wait for
    them; their exit codes. Ctrl-C reaches them too."""
    procs = []
    for i in range(workers):
        flags = run_flags_of(i, workers, devices, rest)
        command = [sys.executable, "-m", module, *worker_argv(argv, name, i, flags)]
        procs.append(subprocess.Popen(command, env=worker_env(storage, flags)))
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


# ---------------------------------------------------------------------------------------------
# The entry: validate, then work here or start workers and wait
# ---------------------------------------------------------------------------------------------

def execute(plan: Plan, opts: argparse.Namespace, argv: Sequence[str], rest: Sequence[str],
            module: str) -> Optional["optuna.Study"]:
    """Run every run of `plan` (a SearchPlan: its trials) through the study, here or in --workers processes; the
    study when every run is finished and this process writes the tables, None in a worker that a parent started.
    Bad input is a UsageError before anything is written; runs left unfinished, WorkersFailed.

    `opts`: the flags of `add_worker_args`; `argv`: the command line as given (the workers get it back without
    --workers/--devices); `rest`: its Main.py flags; `module`: the driver the workers run (`python -m module`).
    """
    require_optuna()
    workers, devices = check_options(opts, rest)
    plan.check()  # every command line first, so a bad value fails before hours of training
    sweep_dir = plan.sweep_dir
    given = storage_text(opts.storage)  # a worker started by a parent: $DIFFMM_STORAGE
    spec = parse_storage(given, sweep_dir)
    name = opts.study or study_name(sweep_dir, plan.identity())
    if spec.kind == "rdb" and given is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)  # the default database lives in the sweep folder
    storage = open_storage(spec, opts.heartbeat)
    quiet_optuna()
    index, prune = opts.worker_index, bool(getattr(opts, "prune", False))
    search = isinstance(plan, SearchPlan)
    seed = (plan.seeds[0] if search else 0) + (index or 0)  # TPE: each worker its own random stream
    study = make_study(storage, name, plan, prune, opts, seed)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study.set_user_attr("sweep_dir", str(sweep_dir.resolve()))
    poll = min(opts.heartbeat / 2, 2.0)  # how often an idle worker looks again (a cheap query)
    if index is not None:  # a worker started by a parent (its run flags are in `rest`): work, no tables
        _prefix_console(index)
        log.info(f"worker {index}: study {name} in {spec.shown()}")
        Worker(study, plan, [], poll, prune).work()
        return None
    total = plan.trials if search else len(plan.jobs)
    log.info(f"study {name} in {spec.shown()}: {total} {'trials' if search else 'runs'}, {workers} worker"
             f"{'s' if workers > 1 else ''}; more workers join with the same command and storage {spec.shown()} "
             f"(as --storage or ${STORAGE_ENV}, a password in ~/.pgpass rather than the URL)")
    here = Worker(study, plan, ["--device", "cuda", "--gpu", str(devices[0])] if devices else [], poll, prune)
    here.requeue(include_errors=True)  # a new command retries, once, what failed before
    if workers == 1:
        here.work()
    else:
        for i, code in enumerate(launch(module, argv, spec.url(), name, workers, devices, rest)):
            if code:
                log.warning(f"warning: worker {i} ended with exit code {code}")
    left = unfinished_keys(study, plan)
    if left:
        raise WorkersFailed(left, study)
    return study


def unfinished_keys(study: "optuna.Study", plan: Plan) -> List[str]:
    """The runs not finished on disk (TPE: of the trials that did not end pruned)."""
    from optuna.trial import TrialState

    if isinstance(plan, GridPlan):
        return [job.key for job in plan.jobs if finished_summary(job.run_dir) is None]
    left = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        cell = t.user_attrs.get("cell")
        if cell is not None and t.user_attrs.get("duplicate_of") is None and t.state != TrialState.PRUNED:
            left += [job.key for job in plan.jobs_of(cell) if finished_summary(job.run_dir) is None]
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


def search_cells(study: "optuna.Study") -> List[Cell]:
    """The distinct cells of a TPE study's trials that ran (completed or pruned), in trial order."""
    from optuna.trial import TrialState

    cells: Dict[str, Cell] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                    key=lambda t: t.number):
        if t.user_attrs.get("duplicate_of") is None and t.user_attrs.get("cell") is not None:
            cells.setdefault(t.user_attrs["run"], t.user_attrs["cell"])
    return list(cells.values())


# ---------------------------------------------------------------------------------------------
# Progress: python -m Experiments.workers --storage URL (or $DIFFMM_STORAGE)
# ---------------------------------------------------------------------------------------------

def progress_lines(given: Optional[str], only: Optional[str] = None) -> List[str]:
    """Each study of a storage (`given`, else $DIFFMM_STORAGE): its trials by state and the runs being trained now
    (`only`: that study alone). A UsageError sentence when there is no such storage."""
    require_optuna()
    quiet_optuna()
    text = storage_text(given)
    if text is None:
        raise UsageError(f"name the sweep's storage with --storage URL or ${STORAGE_ENV}.")
    spec = parse_storage(text, Path("."))
    local = (Path(spec.target) if spec.kind == "journal"
             else Path(spec.target.split(":///", 1)[1]) if spec.target.startswith("sqlite") else None)
    if local is not None and not local.is_file():  # opening it would create it
        raise UsageError(f"{spec.shown()} does not exist: no sweep has used that storage yet.")
    storage = open_storage(spec, 60)
    import optuna
    from optuna.trial import TrialState

    lines = []
    for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        if only and s.study_name != only:
            continue
        trials = optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
        counts: Dict[str, int] = {}
        for t in trials:
            state = "yielded" if t.user_attrs.get("duplicate_of") is not None else t.state.name.lower()
            counts[state] = counts.get(state, 0) + 1
        lines.append(f"{s.study_name}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        lines += [f"  running: {t.user_attrs.get('run', '?')} (trial {t.number}, since {t.datetime_start:%H:%M:%S})"
                  for t in trials if t.state == TrialState.RUNNING]
    return lines
