"""The harness: one run of any registered model, on any dataset, under both protocols.

    python Main.py                                   # DiffMM on generated data, about 2 minutes on 2 CPU cores
    python Main.py --data tiktok --reg 1e-4 --ssl_reg 1e-2 --epoch 50 --trans 1 --e_loss 0.1 --cl_method 1
    python Main.py --model lightgcn --data tiktok    # any model of Models.REGISTRY; --model NAME --help

`run(args) -> summary` is the one entry point: data, device, seeding, the epoch loop, evaluation on
validation and test after each epoch, early stopping (`EarlyStopping`), the run folder (its files are
named, written and read by `Utils/run_folder.py`) and timing. It drives a model only through the contract of
`Models/base.py` and knows nothing of any model's internals. Building a run's data and model, restoring a
checkpoint and evaluating are `inference.py`'s, which `api.py` uses too.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: sets the OpenMP wait policy before torch loads its thread pool)

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from DataHandler import Data, DataError
from inference import (build_model, checkpoint_args, evaluate_model, load_run_data, require_dataset,
                       restore_checkpoint)
from Models import get_model
from Models.base import PhaseTimer, RecModel
from Params import parse_args
from Utils import run_folder
from Utils.cli import deferred_interrupt, duration, exit_on_interrupt, package_versions, run_log, setup_logging
from Utils.device import bf16_speedup, cpu_flags, device_name, matmul_precision, resolve_device, resolve_threads
from Utils.errors import UsageError
from Utils.metrics import dot_scorer, evaluate, popularity_scores
from Utils.seeding import rng_state, set_rng_state

log = logging.getLogger("diffmm")


def fmt(metrics: Dict[str, float], k: int) -> str:
    return " ".join(f"{name}@{k}={metrics[f'{name}@{k}']:.4f}" for name in ("Recall", "NDCG", "Precision"))


def loss_text(losses: Dict[str, float]) -> str:
    """'loss 0.75 (bpr 0.39, cl 0.34)': the total first, then the other terms."""
    terms = ", ".join(f"{name} {value:.4f}" for name, value in losses.items() if name != "loss")
    return f"loss {losses.get('loss', 0.0):.4f}" + (f" ({terms})" if terms else "")


class TrainingStopped(Exception):
    """The run stopped before its last epoch (a non-finite loss): one sentence, and the exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after the run folder was written: still a KeyboardInterrupt, so that whoever called
    the run (a sweep, the test suite) stops too instead of going on to the next one. Its text says how to resume."""

    exit_code = 130


class EarlyStopping:
    """The best epoch of each protocol and the patience count: what decides which model is kept and when a run
    stops early. Its `state()` is the `best` and `stale` of last.pt's harness state, so a resumed run goes on.

    paper = the epoch with the best test Recall@K (the authors' protocol); validation = the epoch with the best
    validation Recall@K (its model is best_model.pt); `stale` counts the evaluations since the validation one
    last improved, and with `patience` > 0 the run stops once `stale` reaches it.
    """

    def __init__(self, k: int, patience: int, state: Optional[dict] = None):
        self.k, self.patience = k, patience
        state = state or {"best": {"paper": None, "validation": None}, "stale": 0}
        self.best: Dict[str, Optional[dict]] = state["best"]
        self.stale: int = state["stale"]

    def update(self, record: dict) -> List[str]:
        """Take an epoch's record; return the protocols whose best epoch it now is ('paper', 'validation')."""
        if "test" not in record:  # not evaluated this epoch (--tstEpoch)
            return []
        key, improved = f"Recall@{self.k}", []
        if self.best["paper"] is None or record["test"][key] > self.best["paper"]["test"][key]:
            self.best["paper"] = record
            improved.append("paper")
        if self.best["validation"] is None or record["val"][key] > self.best["validation"]["val"][key]:
            self.best["validation"], self.stale = record, 0
            improved.append("validation")
        else:
            self.stale += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience and self.stale >= self.patience)

    def state(self) -> dict:
        return {"best": self.best, "stale": self.stale}


class RunPruned(Exception):
    """Raised by an `on_epoch` callback (a sweep's pruner) to end a run early on purpose: the run ends cleanly, its
    summary.json gets `pruned` with the epoch and this text as the reason, and it counts as finished (not resumed)."""


def run(args: argparse.Namespace, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train and evaluate one configuration; write the run folder; return the summary.

    `--resume RUN_DIR` continues a run from RUN_DIR/last.pt, the state after its last completed epoch.
    `on_epoch(record)`, if given, is called after each epoch's files are written (a sweep's pruner reports
    there); raising `RunPruned` in it ends the run cleanly as pruned.
    Logging: adds the run's log.txt to the 'diffmm' logger for the run's duration and removes it
    afterwards; the caller's console set-up is left as it is.
    """
    vars(args).update(run_folder.upgrade_config(vars(args)))  # arguments built before a flag existed: its old value
    allow_shared_dir = args.allow_shared_dir
    if args.resume:
        return resume(Path(args.resume), quiet=args.quiet, epoch=args.epoch, threads=args.threads, on_epoch=on_epoch,
                      allow_shared_dir=allow_shared_dir)
    device = resolve_device(args.device, args.gpu)
    resolve_threads(args.threads, device)
    model_class = get_model(args.model)
    data = load_run_data(args, model_class.needs_features, generate=True)
    problem = model_class.check(args, data)
    if problem:
        raise UsageError(problem)
    if args.tensorboard:
        run_folder.require_tensorboard()
    with matmul_precision(args.precision, device):  # checked (tf32 on a CPU) before the run folder is made
        run_dir = run_folder.make_run_dir(args.out_dir, args.data, args.model, allow_shared_dir)
        with run_log(run_dir):
            return train_and_report(args, data, device, run_dir, on_epoch=on_epoch)


def resume(run_dir: Path, quiet: bool = False, epoch: Optional[int] = None, threads: Optional[str] = None,
           on_epoch: Optional[Callable[[dict], None]] = None, allow_shared_dir: bool = False) -> dict:
    """Continue the run in `run_dir` from its last completed epoch, with its own configuration.

    `epoch`: a new total number of epochs (to give a long run more, or to end it early: at or below the
    epochs already run, it ends now and writes its summary). `threads`: the CPU threads of this machine's share
    (a run resumed elsewhere need not use the threads it started with; it changes no number but speed).
    `allow_shared_dir`: resume even where other users can write `run_dir` (--allow_shared_dir).
    What last.pt's configuration may not decide: the run folder (it stays `run_dir`, whatever out_dir it names),
    --allow_shared_dir (the command line's), and where data is written (its dataset is read, never generated).
    """
    run_dir = Path(run_dir)
    run_folder.refuse_shared(run_dir, allow_shared_dir, "resume the run")
    state = run_folder.load_last(run_dir)
    args = checkpoint_args(state, run_dir / run_folder.LAST)
    args.quiet, args.resume = quiet or args.quiet, None
    args.out_dir, args.allow_shared_dir = str(run_dir), allow_shared_dir
    if epoch is not None and epoch != args.epoch:
        log.info(f"{run_dir}: the run now ends after at most {epoch} epochs (it was {args.epoch})")
        args.epoch = epoch
    if state["harness"]["finished"]:
        raise UsageError(f"the run in {run_dir} has already finished ({len(state['harness']['history'])} epochs); "
                         f"its results are in {run_dir / run_folder.SUMMARY}.")
    if args.tensorboard:
        run_folder.require_tensorboard()
    device = resolve_device(args.device, args.gpu)
    if threads is not None:  # this machine's share; else the threads the run started with
        args.threads = threads
    resolve_threads(args.threads, device)
    require_dataset(args, f"put it back there to resume the run (a resumed run reads the data folder its "
                          f"{run_folder.LAST} names, and never writes one)")
    data = load_run_data(args, get_model(args.model).needs_features)
    run_folder.write_config(run_dir, vars(args))  # the run's configuration as it goes on (a new --epoch, --threads)
    with matmul_precision(args.precision, device), run_log(run_dir):
        log.info(f"resuming {run_dir} after epoch {state['harness']['history'][-1]['epoch']}")
        return train_and_report(args, data, device, run_dir, state, on_epoch)


def train_and_report(args: argparse.Namespace, data: Data, device: torch.device, run_dir: Path,
                     resume_state: Optional[dict] = None, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Build the model, train the epochs left (`epoch_loop`), then write the summary (`finish`)."""
    if resume_state is None:
        log.info("configuration: " + json.dumps(vars(args), sort_keys=True))
        run_folder.write_config(run_dir, vars(args))
    try:
        model, popularity, history, tracker = start_training(args, data, device, resume_state)
        writer = run_folder.EpochWriter(run_dir, args.tensorboard, history)
    except KeyboardInterrupt:  # before this process's first epoch: nothing new to write
        raise RunInterrupted(f"interrupted (Ctrl-C) before training. {next_step(run_dir)}") from None
    try:
        stopped, pruned = epoch_loop(model, data, args, run_dir, history, tracker, writer, on_epoch)
    finally:
        writer.close()
    return finish(model, data, args, device, run_dir, history, tracker, popularity, stopped, pruned)


def start_training(args: argparse.Namespace, data: Data, device: torch.device, resume_state: Optional[dict]
                   ) -> tuple:
    """(model, popularity metrics, history, tracker): the model built (and restored from last.pt when resuming)
    and what the epoch loop carries from one epoch to the next."""
    modalities = ", ".join(f"{m} ({f.shape[1]}-d)" for m, f in data.features.items()) or "none used"
    log.info(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.train.nnz} train / "
             f"{data.val.nnz} val / {data.test.nnz} test interactions; modalities {modalities}; "
             f"model {args.model}; device {device_name(device)}; {torch.get_num_threads()} CPU threads "
             f"(--threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    if args.precision == "bf16" and device.type == "cpu":
        speedup = bf16_speedup()
        if speedup < 1.0:
            units = "AMX" if "amx_bf16" in cpu_flags() else "AVX512-BF16 but no AMX" if "avx512_bf16" in cpu_flags() \
                else "no bf16 matrix units"
            log.warning(f"warning: on this CPU ({units}) a bf16 matrix product is {1 / speedup:.1f}x slower than "
                        f"fp32 (measured now), so --precision bf16 slows this run down; use fp32")

    model = build_model(args, data, device)
    popularity = {split: evaluate(dot_scorer(*popularity_scores(data.train, device)), data.train, heldout,
                                  args.topks, args.tstBat, device, args.eval_users)
                  for split, heldout in (("val", data.val), ("test", data.test))}
    log.info(f"popularity baseline, test: {fmt(popularity['test'], args.topk)}")
    if resume_state is None:
        return model, popularity, [], EarlyStopping(args.topk, args.patience)
    # args.out_dir is the resumed folder (`resume` sets it): a last.pt that does not fit is one sentence naming it
    restore_checkpoint(model, resume_state, Path(args.out_dir) / run_folder.LAST,
                       lambda state: (model.load_training_state(state["model"]), set_rng_state(state["rng"])))
    harness = resume_state["harness"]
    return model, popularity, harness["history"], EarlyStopping(args.topk, args.patience, harness)


def next_step(run_dir: Path) -> str:
    """How to go on after a stop: resume from last.pt, or, with no epoch completed, run the configuration again."""
    if run_folder.has_last(run_dir):
        return f"Resume with: {run_folder.resume_command(run_dir)}"
    return f"No epoch completed, so there is nothing to resume; run it again with: {run_folder.rerun_command(run_dir)}"


def epoch_loop(model: RecModel, data: Data, args: argparse.Namespace, run_dir: Path, history: List[dict],
               tracker: EarlyStopping, writer: run_folder.EpochWriter,
               on_epoch: Optional[Callable[[dict], None]] = None) -> tuple:
    """Train from the epoch after `history`'s last to --epoch, writing each epoch's files; (stopped, pruned): why
    the loop ended before its last epoch (a dict with 'reason', 'epoch', 'exit_code'), or None each."""
    k = args.topk
    start = history[-1]["epoch"] + 1 if history else 0
    for epoch in range(start, args.epoch):
        written = False
        try:
            record = train_one_epoch(model, data, args, epoch)
            per_user = record.pop("test_per_user", None)  # arrays: saved below for a protocol's epoch, not logged
            bad = non_finite_loss(record, model)
            if bad:
                return {"reason": f"epoch {epoch}, phase {bad}: the loss is not finite", "epoch": epoch,
                        "exit_code": 3}, None
            with deferred_interrupt():  # a Ctrl-C waits for the epoch's files, so they all hold the same epoch
                history.append(record)
                line = (f"epoch {epoch}/{args.epoch}: {loss_text(record.get('loss', {}))}, "
                        f"{record['seconds']['epoch']:.1f}s")
                if "test" in record:
                    line += f" | val {fmt(record['val'], k)} | test {fmt(record['test'], k)}"
                improved = tracker.update(record)
                for protocol in improved:
                    run_folder.write_per_user(run_dir, protocol, per_user, epoch)
                if "validation" in improved and args.save_model:
                    save_checkpoint(model, args, run_dir, epoch)
                finished = tracker.should_stop or epoch == args.epoch - 1
                remaining = 0 if finished else args.epoch - 1 - epoch
                left = duration(np.mean([h['seconds']['epoch'] for h in history]) * remaining)
                log.info(line + f" | {'at most ' if args.patience and remaining else ''}{left} left")
                # each file written atomically (a kill leaves the previous epoch's files whole), last.pt first
                writer.write(history, {"config": vars(args), "model": model.training_state(),
                                       "harness": {"history": history, **tracker.state(), "finished": finished},
                                       "rng": rng_state()})
                written = True
            if on_epoch is not None:  # after the epoch's files, so a callback sees (and may stop at) a resumable state
                try:
                    on_epoch(record)
                except RunPruned as e:
                    log.info(f"pruned after epoch {epoch}: {e}")
                    return None, {"epoch": epoch, "reason": str(e)}
        except KeyboardInterrupt:
            # after a written last epoch the run has finished: it gets its summary, and the Ctrl-C still stops
            # the caller (`finish`)
            return {"reason": f"interrupted (Ctrl-C) {'after' if written else 'during'} epoch {epoch}", "epoch": epoch,
                    "exit_code": RunInterrupted.exit_code, "finished": written and finished}, None
        if tracker.should_stop:
            log.info(f"early stop: validation Recall@{k} did not improve for {args.patience} evaluations")
            break
    return None, None


def finish(model: RecModel, data: Data, args: argparse.Namespace, device: torch.device, run_dir: Path,
           history: List[dict], tracker: EarlyStopping, popularity: dict, stopped: Optional[dict],
           pruned: Optional[dict]) -> dict:
    """The end of a run, also of a stopped one: artifacts, summary.json, curves.png; then the stop is raised
    (TrainingStopped, RunInterrupted) or the results reported."""
    model.save_artifacts(run_dir)
    summary = make_summary(args, data, device, history, tracker.best, popularity)
    halted = stopped is not None and not stopped.get("finished")
    if halted:
        summary["stopped"] = {"reason": stopped["reason"], "epoch": stopped["epoch"]}
        if run_folder.has_last(run_dir):
            summary["stopped"]["resume"] = run_folder.resume_command(run_dir)
        else:
            summary["stopped"]["rerun"] = run_folder.rerun_command(run_dir)
    if pruned is not None:
        summary["pruned"] = pruned
    run_folder.write_summary(run_dir, summary)
    if history or not halted:
        write_curves(run_dir)  # a stopped run's curves too: the epochs it ran
    if halted:
        last = f"epoch {history[-1]['epoch']}" if run_folder.has_last(run_dir) else "none: no epoch completed"
        message = (f"{stopped['reason']}; stopped. The last good checkpoint ({last}) is kept in "
                   f"{run_dir / run_folder.LAST} and summary.json says why.")
        if stopped["exit_code"] == RunInterrupted.exit_code:
            raise RunInterrupted(f"{message} {next_step(run_dir)}")
        raise TrainingStopped(message, stopped["exit_code"])
    if not args.keep_last:  # finished (its epochs, early-stopped or pruned): best_model.pt stays
        run_folder.drop_last(run_dir)
    if run_folder.protocol_result(summary, "validation") is not None:  # none: pruned before its first evaluation
        report(summary, run_dir)
    if stopped is not None:  # Ctrl-C as the last epoch's files were written: finished, and the caller stops too
        raise RunInterrupted(f"{stopped['reason']}, its last: the run has finished and {run_dir / run_folder.SUMMARY} "
                             f"holds its results.")
    return summary


def train_one_epoch(model: RecModel, data: Data, args: argparse.Namespace, epoch: int) -> dict:
    """pre_epoch, train_epoch (timed by phase) and, every --tstEpoch epochs and at the last, evaluation."""
    timer = PhaseTimer(model.device)
    model.train()
    model.pre_epoch(epoch, timer)
    record = {"epoch": epoch, **model.train_epoch(epoch, timer)}
    if epoch % args.tstEpoch == 0 or epoch == args.epoch - 1:
        with timer.phase("evaluation"):
            record.update(evaluate_model(model, data, args))
    record["seconds"] = dict(timer.seconds, epoch=sum(timer.seconds.values()))
    return record


def non_finite_loss(record: dict, model: RecModel) -> Optional[str]:
    """'recommender (bpr = nan)' for the first non-finite loss term of an epoch's record, else None."""
    for group, phase in model.loss_phases.items():
        for term, value in (record.get(group) or {}).items():
            if not np.isfinite(value):
                return f"{phase} ({term} = {value})"
    return None


def write_curves(run_dir: Path) -> None:
    """Training curves (losses, val/test metrics per epoch) as run_dir/curves.png; a failure only warns."""
    try:
        from Utils.figures import training_curves
        training_curves(run_dir)
    except Exception as e:  # a figure must never fail a finished run
        log.warning(f"could not draw the training curves ({type(e).__name__}: {e})")


def save_checkpoint(model: RecModel, args: argparse.Namespace, run_dir: Path, epoch: int) -> None:
    """best_model.pt: the epoch, the model's name, the configuration and the model's checkpoint_state()."""
    run_folder.save_best(run_dir, {"epoch": epoch, "model": args.model, "config": vars(args),
                                   **model.checkpoint_state()})


def make_summary(args: argparse.Namespace, data: Data, device: torch.device, history: List[dict], best: dict,
                 popularity: dict) -> dict:
    phases = list(dict.fromkeys(p for h in history for p in h["seconds"] if p != "epoch"))
    per_phase = {p: [h["seconds"].get(p, 0.0) for h in history] for p in phases}
    epoch_seconds = [h["seconds"]["epoch"] for h in history] or [0.0]
    evaluated = [h for h in history if "test" in h]

    def protocol(record: Optional[dict], description: str) -> Optional[dict]:
        if record is None:  # no evaluation yet (a run stopped in its first epoch)
            return None
        return {"description": description, "epoch": record["epoch"], "val": record["val"], "test": record["test"]}

    return {
        "model": args.model,
        "data": {"name": data.name, "users": data.n_users, "items": data.n_items, "train": int(data.train.nnz),
                 "val": int(data.val.nnz), "test": int(data.test.nnz), "modalities": data.modalities},
        "protocols": {
            "paper": protocol(best["paper"], "epoch with the best test Recall (the authors' protocol)"),
            "validation": protocol(best["validation"], "epoch with the best validation Recall; test reported at "
                                                       "that epoch"),
        },
        "groups": {"description": "test metrics per user group by number of train interactions ([low, high) "
                                  "each, the last open-ended) at the validation protocol's epoch (paper Figure 2)",
                   "epoch": (best["validation"] or {}).get("epoch"), "edges": list(args.groups),
                   "per_group": (best["validation"] or {}).get("groups")},
        "baselines": {"popularity": popularity},
        "epochs_run": len(history),
        "evaluations": len(evaluated),
        "config": vars(args),
        "timing": {"seconds_per_epoch_mean": float(np.mean(epoch_seconds)),
                   "seconds_per_phase_mean": {p: float(np.mean(v)) for p, v in per_phase.items()},
                   "per_epoch": [h["seconds"] for h in history],
                   "total": float(np.sum(epoch_seconds))},
        "device": device_name(device),
        "threads": torch.get_num_threads(),  # CPU threads of the run (--threads), on a GPU too (data, sampling)
        "versions": package_versions(),
    }


def report(summary: dict, run_dir: Path) -> None:
    k = summary["config"]["topk"]
    paper, val = run_folder.protocol_result(summary, "paper"), run_folder.protocol_result(summary, "validation")
    pop = summary["baselines"]["popularity"]["test"]
    log.info(f"paper protocol      (best test epoch {paper['epoch']}): test {fmt(paper['test'], k)}")
    log.info(f"validation protocol (best val epoch {val['epoch']}): test {fmt(val['test'], k)}")
    log.info(f"popularity baseline: test {fmt(pop, k)}")
    log.info(f"{summary['model']} test Recall@{k} {val['test'][f'Recall@{k}']:.4f} vs popularity "
             f"{pop[f'Recall@{k}']:.4f} (validation protocol); {summary['timing']['seconds_per_epoch_mean']:.2f}s "
             f"per epoch; run folder {run_dir}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    try:
        run(args)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    except TrainingStopped as e:
        log.error(f"error: {e}")
        return e.exit_code
    except RunInterrupted as e:
        log.error(f"error: {e}")
        raise  # the caller stops too; on the command line `exit_on_interrupt` turns it into exit code 130
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_interrupt(main))
