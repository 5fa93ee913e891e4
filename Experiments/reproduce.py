"""Rerun a table of the paper, and print ours beside the paper's numbers.

    python -m Experiments.reproduce --table 2 --data tiktok --data_dir D [--models diffmm,lightgcn] [--epoch N]
    python -m Experiments.reproduce --table 2 --data mydata --seeds 421,422 --tune      # any dataset, grids
    python -m Experiments.reproduce --table 3 --data tiktok --epoch 10                 # DiffMM's ablations
    python -m Experiments.reproduce --table 4 --data tiktok --seeds 421,422            # DiffMM's τ x λ1 grid

Table 2 runs every registered model (or `--models`) on the dataset, each with its published command
for that dataset where its authors give one (`--preset MODEL-DATA`, `Params.PRESETS`), else its defaults; with
`--tune`, each model's hyper-parameter grid (MMRec's, `Experiments.sweep --grid NAME`) is run and the
cell selected on validation (`--select mmrec`: MMRec's test-selected rule). It writes `comparison.md`
and `comparison.csv` (model x Recall/NDCG/Precision@K, mean ± sample std over seeds, both protocols,
the paper's Table 2 beside ours where the paper has the model) and `groups.png` (Figure 2, one bar per
model, from the same runs). A model that needs item features is skipped, with a note, on a dataset
without feature files. Every run goes through `Experiments.sweep` (DIR/<model>/<cell>/seed<k>/);
finished runs are not rerun. Any other flag (`--device`, `--quiet`, `--patience`, ...) is passed to
every run. `--workers N`, `--devices 0,1` or `--storage URL` run them all as one Optuna study shared by
several processes or machines (`Experiments/workers.py`; README, Many runs at once).

Ours are reported under both protocols: the paper's (epoch of the best test Recall, as the authors
did) and the validation protocol (epoch chosen on validation, test reported there).
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("diffmm")

# paper Table 1: the modalities each dataset had
PAPER_MODALITIES = {"tiktok": ["image", "text", "audio"], "baby": ["image", "text"], "sports": ["image", "text"]}

# Published Recall@20, NDCG@20, Precision@20 and where they were published. DiffMM's Table 2: its MF-BPR ...
# LATTICE rows equal MMSSL's table digit for digit (copied from MMSSL's runs, not re-run on DiffMM's files);
# the MMSSL and MDMNS rows are each system's own (MMSSL's README; MDMNS's Table II, read off its figure).
_DIFFMM_T2 = "DiffMM Table 2"
PUBLISHED = {
    "mf": {"tiktok": (0.0346, 0.0130, 0.0017), "baby": (0.0440, 0.0200, 0.0024), "sports": (0.0430, 0.0202, 0.0023)},
    "lightgcn": {"tiktok": (0.0653, 0.0282, 0.0033), "baby": (0.0698, 0.0319, 0.0037),
                 "sports": (0.0782, 0.0369, 0.0042)},
    "diffrec": {"tiktok": (0.0708, 0.0317, 0.0035), "baby": (0.0717, 0.0334, 0.0038),
                "sports": (0.0823, 0.0407, 0.0044)},
    "vbpr": {"tiktok": (0.0380, 0.0134, 0.0018), "baby": (0.0486, 0.0213, 0.0026), "sports": (0.0582, 0.0265, 0.0031)},
    "lattice": {"tiktok": (0.0843, 0.0367, 0.0042), "baby": (0.0829, 0.0368, 0.0044),
                "sports": (0.0915, 0.0424, 0.0048)},
    "bm3": {"tiktok": (0.0957, 0.0404, 0.0048), "baby": (0.0839, 0.0361, 0.0044), "sports": (0.0975, 0.0442, 0.0051)},
    "diffmm": {"tiktok": (0.1129, 0.0456, 0.0056), "baby": (0.0975, 0.0411, 0.0051),
               "sports": (0.1017, 0.0458, 0.0054)},
    "mmssl": {"tiktok": (0.0921, 0.0392, 0.0046), "baby": (0.0962, 0.0422, 0.0051),
              "sports": (0.0998, 0.0470, 0.0052)},
    "mdmns": {"tiktok": (0.1193, 0.0525, 0.0060), "baby": (0.1009, 0.0433, 0.0053),
              "sports": (0.1093, 0.0496, 0.0058)},
}
PUBLISHED_IN = {"mmssl": "MMSSL README", "mdmns": "MDMNS Table II"}
# models DiffMM's paper does not have (no published number on its datasets)
NOT_IN_PAPER = {"freedom": "not in DiffMM's paper", "lgmrec": "not in DiffMM's paper"}
# paper Table 3: Recall@20, NDCG@20 per variant
TABLE3 = {
    "tiktok": {"no_cl": (0.1026, 0.0420), "no_dm": (0.1075, 0.0433), "no_msi": (0.1086, 0.0426), "none": (0.1129, 0.0456)},
    "baby": {"no_cl": (0.0929, 0.0388), "no_dm": (0.0935, 0.0402), "no_msi": (0.0970, 0.0408), "none": (0.0975, 0.0411)},
    "sports": {"no_cl": (0.0942, 0.0418), "no_dm": (0.0980, 0.0440), "no_msi": (0.0996, 0.0445), "none": (0.1017, 0.0458)},
}
# paper Table 4: Recall@20, NDCG@20 per (τ, λ1)
_T4_KEYS = [(t, l) for t in (0.1, 0.5, 1.0) for l in (1.0, 0.1, 0.01)]
TABLE4 = {
    "tiktok": dict(zip(_T4_KEYS, [(0.0474, 0.0198), (0.0411, 0.0186), (0.0987, 0.0417), (0.0722, 0.0313),
                                  (0.0849, 0.0373), (0.1129, 0.0456), (0.0740, 0.0323), (0.0983, 0.0410),
                                  (0.1064, 0.0432)])),
    "baby": dict(zip(_T4_KEYS, [(0.0722, 0.0309), (0.0871, 0.0372), (0.0933, 0.0393), (0.0924, 0.0399),
                                (0.0975, 0.0411), (0.0944, 0.0393), (0.0959, 0.0400), (0.0956, 0.0401),
                                (0.0940, 0.0389)])),
    "sports": dict(zip(_T4_KEYS, [(0.0828, 0.0364), (0.0945, 0.0421), (0.1017, 0.0458), (0.0955, 0.0425),
                                  (0.0996, 0.0441), (0.0956, 0.0427), (0.0971, 0.0431), (0.0961, 0.0426),
                                  (0.0943, 0.0422)])),
}
GRIDS = {
    3: {"ablation": ["none", "no_cl", "no_msi", "no_dm"]},
    4: {"temp": ["0.1", "0.5", "1.0"], "ssl_reg": ["1", "0.1", "0.01"]},
}
ABLATION_NAMES = {"none": "DiffMM", "no_cl": "w/o CL", "no_msi": "w/o MSI", "no_dm": "w/o DM"}
METRICS = ("Recall", "NDCG", "Precision")


def modality_note(data: str, folder: Path) -> tuple:
    """(found modalities, one sentence on what the local copy has against the paper's Table 1)."""
    from DataHandler import feature_files

    found = list(feature_files(folder)) if folder.is_dir() else []
    if data not in PAPER_MODALITIES:
        return found, f"{data} has {', '.join(found) or 'no'} item features (not a dataset of the paper)."
    missing = [m for m in PAPER_MODALITIES[data] if m not in found]
    if missing:
        return found, (f"{data} here has {', '.join(found) or 'no'} features but lacks {', '.join(missing)}, which "
                       f"the paper used: our numbers come from fewer modalities and are not a like-for-like "
                       f"reproduction.")
    return found, f"{data} here has every modality the paper used ({', '.join(found)})."


def _mean_std(values: Sequence[float]) -> str:
    return f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def _summaries(run_dirs: Sequence[Path]) -> List[dict]:
    return [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs]


# ---------------------------------------------------------------------------------------------
# Table 2: every model on one dataset
# ---------------------------------------------------------------------------------------------

def table2_sweeps(data: str, data_dir: Path, models: Sequence[str], epoch: Optional[int], tune: bool,
                  rest: Sequence[str]) -> Dict[str, object]:
    """Per model, its sweep: (grid, base command line): its published command for `data` or its defaults, its
    grid with `tune` (else none); or a string saying why the model is skipped. Shared by the sequential
    Table 2 and its workers (`Experiments.workers`), so that both make the same runs."""
    from Experiments.sweep import preset
    from Models import get_model
    from Params import PRESETS

    found, _ = modality_note(data, data_dir / data)
    out: Dict[str, object] = {}
    for model in models:
        if get_model(model).needs_features and not found:
            out[model] = f"skipped: {model} needs item features and {data} has no <modality>_feat.npy"
            continue
        base = ["--data", data, "--data_dir", str(data_dir), "--model", model]
        base += ["--preset", f"{model}-{data}"] if f"{model}-{data}" in PRESETS else []
        base += (["--epoch", str(epoch)] if epoch is not None else []) + list(rest)
        out[model] = (preset(model) if tune and get_model(model).grid else {}, base)
    return out


def table2(data: str, data_dir: Path, models: Sequence[str], seeds: Sequence[int], sweep_dir: Path,
           epoch: Optional[int], tune: bool, select: str, rest: Sequence[str]) -> Dict[str, object]:
    """Run every model (its published command for `data`, or its defaults; its grid with `tune`).

    Returns, per model, the run folders of the selected setting (one per seed) and that setting, or
    a string saying why the model was skipped.
    """
    from Experiments.sweep import cell_name, run_dir_of, sweep

    out: Dict[str, object] = {}
    for model, plan in table2_sweeps(data, data_dir, models, epoch, tune, rest).items():
        if isinstance(plan, str):
            out[model] = plan
            continue
        grid, base = plan
        result = sweep(grid, seeds, sweep_dir / model, base, select)
        cell = {f: result["selected"][f] for f in grid} if grid else {}
        out[model] = {"setting": cell_name(cell) if grid else "default",
                      "runs": [run_dir_of(sweep_dir / model, cell, s) for s in seeds]}
    return out


def table2_rows(data: str, results: Dict[str, object]) -> List[dict]:
    """One row per model that ran: the paper's numbers and ours (mean, std over seeds) under both protocols."""
    rows = []
    for model, result in results.items():
        if isinstance(result, str):
            continue
        summaries = _summaries(result["runs"])
        k = summaries[0]["config"]["topk"]
        row: dict = {"model": model, "setting": result["setting"], "seeds": len(summaries), "k": k,
                     "epochs_run": float(np.mean([s["epochs_run"] for s in summaries])),
                     "seconds_per_epoch": float(np.mean([np.median([e["epoch"] for e in s["timing"]["per_epoch"]])
                                                         for s in summaries]))}
        paper = PUBLISHED.get(model, {}).get(data)
        row["published_in"] = (PUBLISHED_IN.get(model, _DIFFMM_T2) if paper
                               else NOT_IN_PAPER.get(model, "no published number"))
        for metric, value in zip(METRICS, paper or (None,) * 3):
            row[f"published_{metric}@20"] = value
        for protocol in ("paper", "validation"):
            for metric in METRICS:
                values = [s["protocols"][protocol]["test"][f"{metric}@{k}"] for s in summaries]
                row[f"{protocol}_protocol_{metric}@{k}"] = values
        rows.append(row)
    return rows


def write_table2(data: str, note: str, results: Dict[str, object], sweep_dir: Path) -> str:
    """comparison.md (returned) and comparison.csv, and groups.png (Figure 2) in sweep_dir."""
    from Utils.figures import model_group_bars

    rows = table2_rows(data, results)
    k = rows[0]["k"] if rows else 20
    header = (["model", "setting", "seeds", "epochs run", "s/epoch (median)", "published in"]
              + [f"published {m}@20" for m in METRICS]
              + [f"ours {m}@{k} (paper protocol)" for m in METRICS]
              + [f"ours {m}@{k} (validation protocol)" for m in METRICS])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["setting"], str(row["seeds"]), f"{row['epochs_run']:.0f}",
                 f"{row['seconds_per_epoch']:.2f}", row["published_in"]]
        cells += [f"{row[f'published_{m}@20']:.4f}" if row[f"published_{m}@20"] is not None else "—"
                  for m in METRICS]
        cells += [_mean_std(row[f"{p}_protocol_{m}@{k}"]) for p in ("paper", "validation") for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"- {model}: {why}" for model, why in results.items() if isinstance(why, str)]
    text = "\n".join([f"Paper Table 2 on {data}: the published numbers (each on the authors' full-feature data) beside ours "
                      f"(mean ± sample std over seeds; the value alone for one seed).", f"Note: {note}", ""]
                     + lines + ([""] + skipped if skipped else []) + [""])
    (sweep_dir / "comparison.md").write_text(text)
    with open(sweep_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "setting", "seeds", "epochs_run", "seconds_per_epoch", "published_in"]
                        + [f"published_{m}@20" for m in METRICS]
                        + [f"{p}_protocol_{m}@{k}_{stat}" for p in ("paper", "validation") for m in METRICS
                           for stat in ("mean", "std")])
        for row in rows:
            stats = []
            for p in ("paper", "validation"):
                for m in METRICS:
                    values = row[f"{p}_protocol_{m}@{k}"]
                    stats += [np.mean(values), np.std(values, ddof=1) if len(values) > 1 else 0.0]
            writer.writerow([row["model"], row["setting"], row["seeds"], row["epochs_run"], row["seconds_per_epoch"],
                             row["published_in"]] + [row[f"published_{m}@20"] for m in METRICS] + stats)
    if rows:
        model_group_bars({row["model"]: results[row["model"]]["runs"][0] for row in rows}, sweep_dir / "groups.png")
    return text


# ---------------------------------------------------------------------------------------------
# Tables 3 and 4: DiffMM's ablations and its τ x λ1 grid
# ---------------------------------------------------------------------------------------------

def paper_values(table: int, data: str, cell: Dict[str, str]) -> tuple:
    if table == 3:
        return TABLE3[data][cell["ablation"]]
    return TABLE4[data][(float(cell["temp"]), float(cell["ssl_reg"]))]


def cell_label(table: int, cell: Dict[str, str]) -> str:
    if table == 3:
        return ABLATION_NAMES[cell["ablation"]]
    return f"τ={cell['temp']} λ1={cell['ssl_reg']}"


def comparison(table: int, data: str, sweep_dir: Path, seeds: Sequence[int]) -> str:
    """A markdown table: the paper's numbers beside ours under both protocols (mean over seeds)."""
    from Experiments.sweep import cells, run_dir_of

    metrics = ("Recall", "NDCG")
    all_summaries = [_summaries([run_dir_of(sweep_dir, cell, s) for s in seeds]) for cell in cells(GRIDS[table])]
    k = all_summaries[0][0]["config"]["topk"]
    header = (["setting"] + [f"paper {m}@20" for m in metrics] + [f"ours {m}@{k} (paper protocol)" for m in metrics]
              + [f"ours {m}@{k} (validation protocol)" for m in metrics])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell, summaries in zip(cells(GRIDS[table]), all_summaries):
        row = [cell_label(table, cell)] + [f"{v:.4f}" for v in paper_values(table, data, cell)]
        row += [_mean_std([s["protocols"][p]["test"][f"{m}@{k}"] for s in summaries])
                for p in ("paper", "validation") for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from DataHandler import DataError
    from Experiments import workers
    from Experiments.sweep import cells, run_dir_of, sweep
    from Models import model_names
    from Utils.helpers import UsageError, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description="Rerun paper Table 2 (every model), 3 or 4 (DiffMM) on a dataset and "
                                            "print our numbers beside the paper's; other flags go to Main.py.",
                                allow_abbrev=False)
    p.add_argument("--table", type=int, required=True, choices=[2, 3, 4],
                   help="2: every model; 3: DiffMM's ablations none/no_cl/no_msi/no_dm; 4: DiffMM's τ x λ1 grid")
    p.add_argument("--data", required=True, help="dataset folder under --data_dir (Tables 3-4: tiktok, baby, sports)")
    p.add_argument("--data_dir", default="Datasets", type=Path, help="folder holding <data>/")
    p.add_argument("--models", default=None, help=f"Table 2: comma-separated models (default all: "
                                                  f"{','.join(model_names())})")
    p.add_argument("--epoch", type=int, default=None, help="override every command's epochs (the paper ran 50)")
    p.add_argument("--seeds", default="421", help="comma-separated seeds (the authors' default is 421)")
    p.add_argument("--tune", action="store_true", help="Table 2: run each model's hyper-parameter grid and "
                                                       "report the selected setting")
    p.add_argument("--select", default="validation", choices=["validation", "mmrec"],
                   help="with --tune: select on validation (default) or by MMRec's rule (test)")
    p.add_argument("--sweep_dir", type=Path, default=None, help="runs folder (default runs/reproduce-<data>-table<N>)")
    workers.add_worker_args(p)
    args, rest = p.parse_known_args(argv)
    setup_logging("--quiet" in rest)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    sweep_dir = args.sweep_dir or Path("runs") / f"reproduce-{args.data}-table{args.table}"

    folder = args.data_dir / args.data
    if not (folder / "trnMat.pkl").is_file():
        log.error(f"error: {folder} holds no trnMat.pkl, so paper Table {args.table} on {args.data} cannot be run "
                  f"here; pass --data_dir to the folder that holds {args.data}/.")
        return 2
    found, note = modality_note(args.data, folder)
    log.info(f"note: {note}")
    try:
        if args.table == 2:
            models = [m.strip() for m in args.models.split(",")] if args.models else model_names()
            unknown = [m for m in models if m not in model_names()]
            if unknown:
                raise UsageError(f"unknown model {', '.join(unknown)}; the known models are {', '.join(model_names())}")
            if workers.wanted(args):  # every model's runs as one study (README, Many runs at once); then as always
                sweeps = table2_sweeps(args.data, args.data_dir, models, args.epoch, args.tune, rest)
                plan = workers.plan_of(sweep_dir, [(sweep_dir / model, s[0], seeds, s[1]) for model, s in sweeps.items()
                                                   if not isinstance(s, str)])
                if workers.execute(args, argv, rest, "Experiments.reproduce", sweep_dir, plan=plan) is None:
                    return 0  # a worker started by a parent, which writes the tables
            results = table2(args.data, args.data_dir, models, seeds, sweep_dir, args.epoch, args.tune, args.select,
                             rest)
            text = write_table2(args.data, note, results, sweep_dir)
        else:
            if args.data not in TABLE3:
                raise UsageError(f"paper Table {args.table} has numbers for {', '.join(TABLE3)} only, not {args.data}")
            if not found:
                log.error(f"error: {folder} has none of the paper's {args.data} feature files, and DiffMM cannot run "
                          f"without item features, so paper Table {args.table} cannot be reproduced on this copy.")
                return 1
            base = ["--preset", f"diffmm-{args.data}", "--data_dir", str(args.data_dir)]
            base += (["--epoch", str(args.epoch)] if args.epoch is not None else []) + list(rest)
            if workers.wanted(args):
                plan = workers.plan_of(sweep_dir, [(sweep_dir, GRIDS[args.table], seeds, base)])
                if workers.execute(args, argv, rest, "Experiments.reproduce", sweep_dir, plan=plan) is None:
                    return 0
            sweep(GRIDS[args.table], seeds, sweep_dir, base)
            if args.table == 3:
                from Utils.figures import ablation_bars
                ablation_bars([run_dir_of(sweep_dir, c, s) for c in cells(GRIDS[3]) for s in seeds],
                              sweep_dir / "ablation.png")
            epochs = _summaries([run_dir_of(sweep_dir, cells(GRIDS[args.table])[0], seeds[0])])[0]["epochs_run"]
            text = "\n".join([
                f"Paper Table {args.table} on {args.data}: the paper's numbers (full features, 50 epochs) beside ours "
                f"({epochs} epoch{'s' if epochs != 1 else ''}, seeds {','.join(map(str, seeds))}; mean ± sample std "
                f"when several seeds).", f"Note: {note}", "", comparison(args.table, args.data, sweep_dir, seeds), ""])
            (sweep_dir / "comparison.md").write_text(text)
    except (DataError, UsageError, ValueError) as e:
        log.error(f"error: {e}")
        return 2
    except workers.WorkersFailed as e:
        log.error(f"error: {e}")
        return 1
    print(text)
    print(f"runs, tables, figures and comparison.md in {sweep_dir}")
    return 0


if __name__ == "__main__":
    from Utils.helpers import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
