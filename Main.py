"""The harness: one run of any registered model, on any dataset, under both protocols.

    python Main.py                                   # DiffMM on generated data, under 2 minutes on a laptop CPU
    python Main.py --data tiktok --reg 1e-4 --ssl_reg 1e-2 --epoch 50 --trans 1 --e_loss 0.1 --cl_method 1
    python Main.py --model lightgcn --data tiktok    # any model of Models.REGISTRY; --model NAME --help

`run(args) -> summary` is the one entry point: data, device, seeding, the epoch loop, evaluation on
validation and test after each epoch, early stopping, the run folder (log.txt, metrics.jsonl,
best_model.pt, summary.json, curves.png) and timing. It drives a model only through the contract of
`Models/base.py` and knows nothing of any model's internals.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from DataHandler import Data, DataError, load_data
from Models import get_model
from Models.base import RecModel
from Params import parse_args
from Utils.helpers import (PhaseTimer, UsageError, cpu_has_bf16_units, device_name, make_run_dir, package_versions,
                           resolve_device, run_log, seed_everything, setup_logging)
from Utils.metrics import dot_scorer, evaluate, group_metrics, per_user_metrics, popularity_scores
from Utils.synthetic import write_synthetic

log = logging.getLogger("diffmm")


def load_run_data(args: argparse.Namespace, needs_features: bool) -> Data:
    """The dataset of the run; the default 'synthetic' one is generated on first use."""
    data_dir = Path(args.data_dir)
    if args.data == "synthetic" and not (data_dir / "synthetic" / "trnMat.pkl").is_file():
        log.info(f"writing the generated dataset to {data_dir / 'synthetic'} (generated, not real data)")
        write_synthetic(data_dir / "synthetic")
    return load_data(args.data, data_dir, args.modalities, needs_features=needs_features)


@torch.no_grad()
def evaluate_model(model: RecModel, data: Data, args: argparse.Namespace) -> Dict[str, dict]:
    """All-rank metrics on validation and test from one scorer (the model's evaluation forward).

    Per-user metrics are computed once per split and averaged overall ('val', 'test') and, for test,
    per user group by number of train interactions ('groups', paper Figure 2, edges --groups).
    """
    model.eval()
    score = model.scorer()
    out: Dict[str, dict] = {}
    for split, heldout in (("val", data.val), ("test", data.test)):
        users, values = per_user_metrics(score, data.train, heldout, args.topks, args.tstBat, model.device)
        out[split] = {name: float(v.mean()) for name, v in values.items()}
        if split == "test":
            counts = np.diff(data.train.indptr)
            out["groups"] = group_metrics(counts[users], values, args.groups)
    return out


def build_model(args: argparse.Namespace, data: Data, device: torch.device) -> RecModel:
    """Seed every generator with --seed, then build --model (the order of a run, so runs repeat)."""
    seed_everything(args.seed)
    return get_model(args.model)(args, data, device)


def fmt(metrics: Dict[str, float], k: int) -> str:
    return " ".join(f"{name}@{k}={metrics[f'{name}@{k}']:.4f}" for name in ("Recall", "NDCG", "Precision"))


def loss_text(losses: Dict[str, float]) -> str:
    """'loss 0.75 (bpr 0.39, cl 0.34)': the total first, then the other terms."""
    terms = ", ".join(f"{name} {value:.4f}" for name, value in losses.items() if name != "loss")
    return f"loss {losses.get('loss', 0.0):.4f}" + (f" ({terms})" if terms else "")


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate one configuration; write the run folder; return the summary.

    Logging: adds the run's log.txt to the 'diffmm' logger for the run's duration and removes it
    afterwards; the caller's console set-up is left as it is.
    """
    device = resolve_device(args.device, args.gpu)
    model_class = get_model(args.model)
    data = load_run_data(args, model_class.needs_features)
    problem = model_class.check(args, data)
    if problem:
        raise UsageError(problem)
    run_dir = make_run_dir(args.out_dir, f"{args.data}-{args.model}")
    with run_log(run_dir):
        return train_and_report(args, data, device, run_dir)


def train_and_report(args: argparse.Namespace, data: Data, device: torch.device, run_dir: Path) -> dict:
    log.info("configuration: " + json.dumps(vars(args), sort_keys=True))
    modalities = ", ".join(f"{m} ({f.shape[1]}-d)" for m, f in data.features.items()) or "none used"
    log.info(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.train.nnz} train / "
             f"{data.val.nnz} val / {data.test.nnz} test interactions; modalities {modalities}; "
             f"model {args.model}; device {device_name(device)}")
    if args.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        log.warning("warning: this CPU has no bf16 matrix units (no AMX or AVX512-BF16), so --precision bf16 "
                    "runs much slower than fp32 here")

    model = build_model(args, data, device)
    k = args.topk
    popularity = {split: evaluate(dot_scorer(*popularity_scores(data.train, device)), data.train, heldout,
                                  args.topks, args.tstBat, device)
                  for split, heldout in (("val", data.val), ("test", data.test))}
    log.info(f"popularity baseline, test: {fmt(popularity['test'], k)}")

    history: List[dict] = []
    best = {"paper": None, "validation": None}
    stale = 0
    with open(run_dir / "metrics.jsonl", "w") as metrics_file:
        for epoch in range(args.epoch):
            timer = PhaseTimer(device)
            model.train()
            model.pre_epoch(epoch, timer)
            record = {"epoch": epoch, **model.train_epoch(epoch, timer)}
            if epoch % args.tstEpoch == 0 or epoch == args.epoch - 1:
                with timer.phase("evaluation"):
                    record.update(evaluate_model(model, data, args))
            record["seconds"] = dict(timer.seconds, epoch=sum(timer.seconds.values()))
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

            line = f"epoch {epoch}/{args.epoch}: {loss_text(record.get('loss', {}))}, {record['seconds']['epoch']:.1f}s"
            if "test" in record:
                line += f" | val {fmt(record['val'], k)} | test {fmt(record['test'], k)}"
                if best["paper"] is None or record["test"][f"Recall@{k}"] > best["paper"]["test"][f"Recall@{k}"]:
                    best["paper"] = record
                if best["validation"] is None or record["val"][f"Recall@{k}"] > best["validation"]["val"][f"Recall@{k}"]:
                    best["validation"], stale = record, 0
                    if args.save_model:
                        save_checkpoint(model, args, run_dir / "best_model.pt", epoch)
                else:
                    stale += 1
            log.info(line)
            if args.patience and stale >= args.patience:
                log.info(f"early stop: validation Recall@{k} did not improve for {args.patience} evaluations")
                break
    model.save_artifacts(run_dir)

    summary = make_summary(args, data, device, history, best, popularity)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report(summary, run_dir)
    write_curves(run_dir)
    return summary


def write_curves(run_dir: Path) -> None:
    """Training curves (losses, val/test metrics per epoch) as run_dir/curves.png; a failure only warns."""
    try:
        from Utils.figures import training_curves
        training_curves(run_dir)
    except Exception as e:  # a figure must never fail a finished run
        log.warning(f"could not draw the training curves ({type(e).__name__}: {e})")


def save_checkpoint(model: RecModel, args: argparse.Namespace, path: Path, epoch: int) -> None:
    torch.save({"epoch": epoch, "model": args.model, "config": vars(args), **model.checkpoint_state()}, path)


def make_summary(args: argparse.Namespace, data: Data, device: torch.device, history: List[dict], best: dict,
                 popularity: dict) -> dict:
    phases = list(dict.fromkeys(p for h in history for p in h["seconds"] if p != "epoch"))
    per_phase = {p: [h["seconds"].get(p, 0.0) for h in history] for p in phases}
    epoch_seconds = [h["seconds"]["epoch"] for h in history]
    evaluated = [h for h in history if "test" in h]
    return {
        "model": args.model,
        "data": {"name": data.name, "users": data.n_users, "items": data.n_items, "train": int(data.train.nnz),
                 "val": int(data.val.nnz), "test": int(data.test.nnz), "modalities": data.modalities},
        "protocols": {
            "paper": {"description": "epoch with the best test Recall (the authors' protocol)",
                      "epoch": best["paper"]["epoch"], "test": best["paper"]["test"], "val": best["paper"]["val"]},
            "validation": {"description": "epoch with the best validation Recall; test reported at that epoch",
                           "epoch": best["validation"]["epoch"], "val": best["validation"]["val"],
                           "test": best["validation"]["test"]},
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
        "versions": package_versions(),
    }


def report(summary: dict, run_dir: Path) -> None:
    k = summary["config"]["topk"]
    paper, val = summary["protocols"]["paper"], summary["protocols"]["validation"]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
