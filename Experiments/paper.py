"""DiffMM's paper as data: what its tables published, the modalities of its datasets, the grids of its Tables 3 and 4,
and what Table 2 runs for each model.

The numbers live on the model classes, each beside its model: `published` (Recall, NDCG, Precision@20 per
dataset) and `published_in`, DiffMM's Tables 3 and 4 as `DiffMM.published_ablations` and
`DiffMM.published_temp_ssl`. A model's name in the tables is its class's `paper` text before the colon
(`display_name`: "LightGCN: simplified graph convolution ..." -> LightGCN), so a new model needs no line here.
DiffMM's Table 2: its MF-BPR ... LATTICE rows equal MMSSL's table digit for digit (copied from MMSSL's runs, not
re-run on DiffMM's files); the MMSSL and MDMNS rows are each system's own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from Experiments.plan import Cell, Sweep, cell_name, named_grid, run_dir_of
from Model import DiffMM
from Models import get_model, model_names
from Utils import run_folder

METRICS = ("Recall", "NDCG", "Precision")   # of every table, in the order of each published triple
# paper Table 1: the modalities each dataset had
PAPER_MODALITIES = {"tiktok": ["image", "text", "audio"], "baby": ["image", "text"], "sports": ["image", "text"]}
DATASET_NAMES = {"tiktok": "TikTok", "baby": "Amazon-Baby", "sports": "Amazon-Sports"}
PUBLISHED = {name: get_model(name).published for name in model_names() if get_model(name).published}
PUBLISHED_IN = {name: get_model(name).published_in for name in model_names()}
REFERENCE = "diffmm"  # the model every other one is compared with, as in the paper
TABLE3 = DiffMM.published_ablations   # data -> --ablation -> (Recall@20, NDCG@20)
TABLE4 = DiffMM.published_temp_ssl    # data -> (τ, λ1) -> (Recall@20, NDCG@20)
GRIDS = {
    3: {"ablation": ["none", "no_cl", "no_msi", "no_dm"]},
    4: {"temp": ["0.1", "0.5", "1.0"], "ssl_reg": ["1", "0.1", "0.01"]},
}
ABLATION_NAMES = {"none": "DiffMM", "no_cl": "w/o CL", "no_msi": "w/o MSI", "no_dm": "w/o DM"}   # Table 3's rows


def display_name(model: str) -> str:
    """The model's name in a table: its class's `paper` up to the colon (MF-BPR, LightGCN, DiffMM, ...)."""
    return get_model(model).paper.split(":", 1)[0].strip() if model in model_names() else model


def table2_order(models: Sequence[str]) -> List[str]:
    """`models` in Table 2's row order: the registry's (the paper's column order, Models/__init__.py), the
    reference last."""
    order = {m: i for i, m in enumerate(model_names())}
    return sorted(models, key=lambda m: (m == REFERENCE, order.get(m, len(order)), m))


def recorded_modalities(sweep_dir: Path) -> Optional[List[str]]:
    """The modalities the finished runs under `sweep_dir` read (their summary.json), None when there are none:
    what Table 2 goes by when the tables are written from committed records without the dataset."""
    for path in sorted(Path(sweep_dir).rglob(run_folder.SUMMARY)):
        summary = run_folder.finished_summary(path.parent)
        if summary and "modalities" in run_folder.run_data(summary):   # [] for an interaction-only dataset
            return list(run_folder.run_data(summary)["modalities"])
    return None


def modality_note(data: str, folder: Path, recorded: Optional[List[str]] = None) -> Tuple[List[str], str]:
    """(found modalities, one sentence on what the local copy has against the paper's Table 1); without the
    folder, the modalities `recorded` by finished runs."""
    from DataHandler import feature_files

    found = list(feature_files(folder)) if folder.is_dir() else list(recorded or [])
    if data not in PAPER_MODALITIES:
        return found, f"{data} has {', '.join(found) or 'no'} item features (not a dataset of the paper)."
    missing = [m for m in PAPER_MODALITIES[data] if m not in found]
    if missing:
        return found, (f"{data} here has {', '.join(found) or 'no'} features but lacks {', '.join(missing)}, which "
                       f"the paper used: our numbers come from fewer modalities and are not a like-for-like "
                       f"reproduction.")
    return found, f"{data} here has every modality the paper used ({', '.join(found)})."


# ---------------------------------------------------------------------------------------------
# What each table runs
# ---------------------------------------------------------------------------------------------

def table2_sweeps(data: str, data_dir: Path, found: Sequence[str], models: Sequence[str], epoch: Optional[int],
                  tune: bool, rest: Sequence[str], seeds: Sequence[int], sweep_dir: Path
                  ) -> Dict[str, Union[Sweep, str]]:
    """Per model, its sweep in SWEEP_DIR/<model>: its published command for `data` (`--preset MODEL-DATA`) or its
    defaults, with its named grid when `tune` (else one cell); or a string saying why the model is skipped
    (`found`: the dataset's modalities, `modality_note`)."""
    from Params import presets

    out: Dict[str, Union[Sweep, str]] = {}
    for model in models:
        if get_model(model).needs_features and not found:
            out[model] = f"skipped: {model} needs item features and {data} has no <modality>_feat.npy"
            continue
        base = ["--data", data, "--data_dir", str(data_dir), "--model", model]
        base += ["--preset", f"{model}-{data}"] if f"{model}-{data}" in presets() else []
        base += (["--epoch", str(epoch)] if epoch is not None else []) + list(rest)
        out[model] = Sweep.of(Path(sweep_dir) / model, named_grid(model) if tune and get_model(model).grid else {},
                              seeds, base)
    return out


def table2_results(sweeps: Dict[str, Union[Sweep, str]], results: Sequence[object]) -> Dict[str, object]:
    """Per model, the run folders of its selected cell (one per seed) and that cell's name ('default' without a
    grid), or the reason it was skipped. `results`: the sweeps' results (`run_plan`), in order."""
    done = iter(results)
    out: Dict[str, object] = {}
    for model, sweep in sweeps.items():
        if isinstance(sweep, str):
            out[model] = sweep
            continue
        selected = next(done).selected
        cell = {f: selected[f] for f in sweep.grid} if sweep.grid else {}
        out[model] = {"setting": cell_name(cell) if sweep.grid else "default",
                      "runs": [run_dir_of(sweep.folder, cell, s) for s in sweep.seeds]}
    return out


def table_sweep(table: int, data: str, data_dir: Path, epoch: Optional[int], rest: Sequence[str],
                seeds: Sequence[int], sweep_dir: Path) -> Sweep:
    """Table 3 or 4: DiffMM's published command for `data` over the table's grid."""
    base = ["--preset", f"diffmm-{data}", "--data_dir", str(data_dir)]
    base += (["--epoch", str(epoch)] if epoch is not None else []) + list(rest)
    return Sweep.of(sweep_dir, GRIDS[table], seeds, base)


def paper_values(table: int, data: str, cell: Cell) -> tuple:
    """The paper's (Recall@20, NDCG@20) of a cell of Table 3 or 4."""
    if table == 3:
        return TABLE3[data][cell["ablation"]]
    return TABLE4[data][(float(cell["temp"]), float(cell["ssl_reg"]))]


def cell_label(table: int, cell: Cell) -> str:
    """A cell's row label in Table 3 or 4."""
    if table == 3:
        return ABLATION_NAMES[cell["ablation"]]
    return f"τ={cell['temp']} λ1={cell['ssl_reg']}"
