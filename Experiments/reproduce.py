"""Rerun a table of the paper, and print ours beside the paper's numbers.

    python -m Experiments.reproduce --table 2 --data tiktok --data_dir D [--models diffmm,lightgcn] [--epoch N]
    python -m Experiments.reproduce --table 2 --data mydata --seeds 421,422 --tune      # any dataset, grids
    python -m Experiments.reproduce --table 3 --data tiktok --epoch 10                 # DiffMM's ablations
    python -m Experiments.reproduce --table 4 --data tiktok --seeds 421,422            # DiffMM's τ x λ1 grid

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
without feature files. Every run goes through `Experiments.sweep` (DIR/<model>/<cell>/seed<k>/);
finished runs are not rerun. Any other flag (`--device`, `--quiet`, `--patience`, ...) is passed to
every run. `--workers N`, `--devices 0,1` or `--storage URL` run them all as one Optuna study shared by
several processes or machines (`Experiments/workers.py`; docs/many-runs.md).

Ours are reported under both protocols: the paper's (epoch of the best test Recall, as the authors
did) and the validation protocol (epoch chosen on validation, test reported there).
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from Model import DiffMM
from Models import get_model, model_names

log = logging.getLogger("diffmm")

# paper Table 1: the modalities each dataset had
PAPER_MODALITIES = {"tiktok": ["image", "text", "audio"], "baby": ["image", "text"], "sports": ["image", "text"]}

# Published Recall@20, NDCG@20, Precision@20 and where they were printed live on each model's class (`published`,
# `published_in`), DiffMM's Tables 3 and 4 on DiffMM's (`published_ablations`, `published_temp_ssl`).
# DiffMM's Table 2: its MF-BPR ... LATTICE rows equal MMSSL's table digit for digit (copied from MMSSL's runs, not
# re-run on DiffMM's files); the MMSSL and MDMNS rows are each system's own.
PUBLISHED = {name: get_model(name).published for name in model_names() if get_model(name).published}
PUBLISHED_IN = {name: get_model(name).published_in for name in model_names()}
TABLE3 = DiffMM.published_ablations
TABLE4 = DiffMM.published_temp_ssl
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
    from Utils import run_folder

    return [run_folder.read_summary(d) for d in run_dirs]


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
    from Params import presets

    found, _ = modality_note(data, data_dir / data)
    out: Dict[str, object] = {}
    for model in models:
        if get_model(model).needs_features and not found:
            out[model] = f"skipped: {model} needs item features and {data} has no <modality>_feat.npy"
            continue
        base = ["--data", data, "--data_dir", str(data_dir), "--model", model]
        base += ["--preset", f"{model}-{data}"] if f"{model}-{data}" in presets() else []
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


# Display names and row order of Table 2 (the paper's column order, then the models it lacks, DiffMM last).
DISPLAY = {"mf": "MF-BPR", "lightgcn": "LightGCN", "diffrec": "DiffRec", "vbpr": "VBPR", "lattice": "LATTICE",
           "bm3": "BM3", "freedom": "FREEDOM", "lgmrec": "LGMRec", "mmssl": "MMSSL", "mdmns": "MDMNS",
           "pop": "popularity", "diffmm": "DiffMM"}
DATASET_NAMES = {"tiktok": "TikTok", "baby": "Amazon-Baby", "sports": "Amazon-Sports"}
REFERENCE = "diffmm"  # the model every other one is compared with, as in the paper
ALPHA = 0.05          # a cell is marked where p < ALPHA
PROTOCOLS = ("paper", "validation")
TESTS = {"ttest": ("*", "$^{*}$"), "wilcoxon": ("†", "$^{\\dagger}$")}  # its mark in comparison.md, .tex


def improvement(ours: float, best_other: float) -> float:
    """Relative improvement in percent, (ours − best other) / best other × 100.

    DiffMM's Table 2 prints no "Improv." (it ends with a p-value column); this is how its lab's MMSSL table
    computes its "Improv." row (MMSSL's README: TikTok R@20 8.99% = (0.0921 − 0.0845) / 0.0845, MMSSL over
    its best baseline, SLMRec).
    """
    return (ours - best_other) / best_other * 100.0


def paired_t_p(ours: Sequence[float], other: Sequence[float]) -> Optional[float]:
    """Two-sided paired t-test over seeds (scipy.stats.ttest_rel): t = mean(d) / (sd(d) / √n), d = ours − other
    per seed, n − 1 degrees of freedom. None with fewer than two pairs, or when every difference is the same up to
    rounding (sd(d) = 0: t is undefined)."""
    d = np.asarray(ours, dtype=float) - np.asarray(other, dtype=float)
    if len(d) < 2 or np.ptp(d) <= 1e-9 * np.abs(d).max():  # equal up to rounding (0.3 − 0.2 ≠ 0.2 − 0.1)
        return None
    from scipy import stats

    return float(stats.ttest_rel(ours, other).pvalue)


def wilcoxon_p(ours: np.ndarray, other: np.ndarray) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank test over paired per-user values (scipy.stats.wilcoxon; pairs with equal
    values are dropped, its default zero_method 'wilcox'). None when every pair is equal."""
    d = np.asarray(ours, dtype=float) - np.asarray(other, dtype=float)
    if not np.any(d != 0):
        return None
    from scipy import stats

    return float(stats.wilcoxon(ours, other).pvalue)


def _key(protocol: str, metric: str, k: int) -> str:
    return f"{protocol}_protocol_{metric}@{k}"


def _per_user(run_dir: Path, protocol: str) -> Optional[Dict[str, np.ndarray]]:
    """The run's per-user test metrics at its protocol's epoch in summary.json; None for a run from before
    per_user_<protocol>.npz existed, or a file of another epoch."""
    from Utils import run_folder

    arrays = run_folder.read_per_user(run_dir, protocol)
    chosen = (_summaries([run_dir])[0]["protocols"][protocol] or {}).get("epoch")
    return arrays if arrays is not None and arrays["epoch"] == chosen else None


def table2_rows(data: str, results: Dict[str, object]) -> List[dict]:
    """One row per model that ran: the paper's numbers and ours (per seed, in seed order) under both protocols."""
    rows = []
    for model, result in results.items():
        if isinstance(result, str):
            continue
        summaries = _summaries(result["runs"])
        k = summaries[0]["config"]["topk"]
        row: dict = {"model": model, "setting": result["setting"], "seeds": len(summaries), "k": k,
                     "seed_list": [int(s["config"]["seed"]) for s in summaries],
                     "epochs_run": float(np.mean([s["epochs_run"] for s in summaries])),
                     "seconds_per_epoch": float(np.mean([np.median([e["epoch"] for e in s["timing"]["per_epoch"]])
                                                         for s in summaries]))}
        paper = PUBLISHED.get(model, {}).get(data)
        # where the number was printed; without one, why (a model DiffMM's paper lacks, or a dataset no paper has)
        row["published_in"] = PUBLISHED_IN[model] if paper or model not in PUBLISHED else "no published number"
        for metric, value in zip(METRICS, paper or (None,) * 3):
            row[f"published_{metric}@20"] = value
        for protocol in PROTOCOLS:
            for metric in METRICS:
                row[_key(protocol, metric, k)] = [s["protocols"][protocol]["test"][f"{metric}@{k}"] for s in summaries]
        rows.append(row)
    return rows


def table2_stats(data: str, rows: List[dict], runs: Dict[str, Sequence[Path]], reference: str = REFERENCE
                 ) -> List[str]:
    """Add to `rows` (in place) the reference model's comparison with every other model, per protocol and metric
    (`runs`: each model's run folders, in its rows' seed order):

    - on every other row, `<key>_ttest_p` (`paired_t_p` over the seeds both ran) and `<key>_wilcoxon_p`
      (`wilcoxon_p` over the test users of the reference's first seed, from per_user_<protocol>.npz), None where
      a test cannot be made;
    - on the reference row, `<key>_improv_pct` (`improvement` of its mean over the best other model's mean) and
      `<key>_best_other`; the same for its published numbers on `data`, over every other model published in the
      same table (PUBLISHED, whether it ran or not).

    Returns one note per test that could not be made."""
    ref = next((row for row in rows if row["model"] == reference), None)
    if ref is None:
        return [f"{reference} did not run: no Improv. and no tests."]
    k, notes = ref["k"], []
    others = [row for row in rows if row["model"] != reference]
    first_seed = ref["seed_list"][0]
    mine = {p: _per_user(runs[reference][0], p) for p in PROTOCOLS}
    for row in others:
        paired = first_seed in row["seed_list"]
        run_dir = runs[row["model"]][row["seed_list"].index(first_seed)] if paired else None
        for protocol in PROTOCOLS:
            theirs = _per_user(run_dir, protocol) if paired else None
            if mine[protocol] is not None and theirs is not None:
                common, i, j = np.intersect1d(mine[protocol]["users"], theirs["users"], return_indices=True)
            else:
                notes.append(f"no Wilcoxon test of {reference} against {row['model']} ({protocol} protocol): no "
                             f"per-user test metrics at the protocol's epoch of seed {first_seed} for both "
                             f"(per_user_{protocol}.npz; runs from before it have none)")
            for metric in METRICS:
                key = _key(protocol, metric, k)
                theirs_by_seed = dict(zip(row["seed_list"], row[key]))
                seeds = [s for s in ref["seed_list"] if s in theirs_by_seed]
                row[f"{key}_ttest_p"] = paired_t_p([dict(zip(ref["seed_list"], ref[key]))[s] for s in seeds],
                                                   [theirs_by_seed[s] for s in seeds])
                row[f"{key}_wilcoxon_p"] = (wilcoxon_p(mine[protocol][f"{metric}@{k}"][i], theirs[f"{metric}@{k}"][j])
                                            if mine[protocol] is not None and theirs is not None else None)
    for protocol in PROTOCOLS:
        for metric in METRICS:
            key = _key(protocol, metric, k)
            best = max(others, key=lambda row: np.mean(row[key]), default=None)
            ref[f"{key}_best_other"] = best["model"] if best else None
            ref[f"{key}_improv_pct"] = improvement(np.mean(ref[key]), np.mean(best[key])) if best else None
    same_table = {model: values[data] for model, values in PUBLISHED.items() if model != reference
                  and data in values and PUBLISHED_IN[model] == PUBLISHED_IN[reference]}
    for j, metric in enumerate(METRICS):
        key = f"published_{metric}@20"
        best = max(same_table, key=lambda model: same_table[model][j], default=None) if ref[key] is not None \
            else None
        ref[f"{key}_best_other"] = best
        ref[f"{key}_improv_pct"] = improvement(ref[key], same_table[best][j]) if best else None
    return notes


def _p(value: Optional[float], spec: str = ".2g") -> str:
    """A p-value as printed: '—' when there is none, '<1e-300' when scipy's value underflowed to 0."""
    if value is None:
        return "—"
    return "<1e-300" if value == 0 else format(value, spec)


def _marks(row: dict, key: str, tex: bool = False) -> str:
    """The marks of the tests by which the reference model differs from this row's model (p < ALPHA)."""
    return "".join(marks[tex] for test, marks in TESTS.items()
                   if row.get(f"{key}_{test}_p") is not None and row[f"{key}_{test}_p"] < ALPHA)


def _tex_escape(text: str) -> str:
    """Plain text as LaTeX that pdflatex reads without a Unicode package: its special characters escaped, the
    symbols of our notes spelled in math mode, any other non-ASCII character reduced to its ASCII base."""
    import unicodedata

    for a, b in (("\\", "\0"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("$", "\\$"),
                 ("{", "\\{"), ("}", "\\}"), ("~", "\\~{}"), ("^", "\\^{}"), ("<", "$<$"), (">", "$>$"),
                 ("±", "$\\pm$"), ("†", "$\\dagger$"), ("×", "$\\times$"), ("−", "$-$"), ("—", "---"),
                 ("–", "--"),
                 ("≤", "$\\leq$"), ("≥", "$\\geq$"), ("≠", "$\\neq$"), ("τ", "$\\tau$"), ("λ", "$\\lambda$"),
                 ("·", "$\\cdot$")):
        text = text.replace(a, b)
    text = text.replace("\0", "\\textbackslash{}")  # last: its braces are not to be escaped
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _ranks(values: Dict[str, Optional[float]]) -> Dict[str, str]:
    """'best' / 'second' / '' per model by the value as printed (4 decimals), ties sharing a rank."""
    shown = {name: round(v, 4) for name, v in values.items() if v is not None}
    levels = sorted(set(shown.values()), reverse=True)
    return {name: "best" if v == levels[0] else "second" if len(levels) > 1 and v == levels[1] else ""
            for name, v in shown.items()}


def _ours_cell(values: Sequence[float]) -> str:
    return f"{np.mean(values):.4f}" + (f"$\\pm${np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def table2_tex(tables: Dict[str, List[dict]], caption: str) -> str:
    """comparison.tex: Table 2 in the paper's style, a document that plain pdflatex compiles (article, graphicx).

    Models as rows (the paper's order, DiffMM last), datasets x Recall/NDCG/Precision@K as columns, in three
    blocks: ours under the validation protocol, ours under the paper's protocol (mean ± sample std over seeds),
    the published numbers. In each block and column the best value as printed is bold and the second underlined;
    a baseline's cell of ours is marked * / † where DiffMM differs from it (paired t-test over seeds / Wilcoxon
    signed-rank test over users, p < ALPHA); each block ends with DiffMM's Improv. over the best other model
    (`improvement`), and ours with the paired t-test's p-value against that model (the paper's p-val. column).
    `tables`: each dataset's rows after `table2_stats`.
    """
    datasets = list(tables)
    k = next((rows[0]["k"] for rows in tables.values() if rows), 20)
    order = {m: i for i, m in enumerate(DISPLAY)}
    models = sorted({row["model"] for rows in tables.values() for row in rows},
                    key=lambda m: (m == REFERENCE, order.get(m, len(order)), m))
    by = {data: {row["model"]: row for row in rows} for data, rows in tables.items()}
    columns = [(d, m) for d in datasets for m in METRICS]
    width = 1 + len(columns)

    def block(title: str, key: Callable[[str], str], published: bool) -> List[str]:
        """One block; `key(metric)`: the rows' field (a list over seeds for ours, a number for published)."""
        def value(row: Optional[dict], m: str) -> Optional[float]:
            if row is None or row.get(key(m)) is None:
                return None
            return float(row[key(m)]) if published else float(np.mean(row[key(m)]))

        ranks = {(d, m): _ranks({model: value(row, m) for model, row in by[d].items()}) for d, m in columns}
        lines = [f"\\multicolumn{{{width}}}{{l}}{{\\textit{{{_tex_escape(title)}}}}} \\\\", "\\hline"]
        for model in models:
            cells = []
            for d, m in columns:
                row = by[d].get(model)
                if value(row, m) is None:
                    cells.append("--")
                    continue
                text = f"{row[key(m)]:.4f}" if published else _ours_cell(row[key(m)])
                rank = ranks[(d, m)][model]
                text = f"\\textbf{{{text}}}" if rank == "best" else f"\\underline{{{text}}}" if rank else text
                cells.append(text + ("" if published else _marks(row, key(m), tex=True)))
            if any(c != "--" for c in cells):
                lines.append(" & ".join([_tex_escape(DISPLAY.get(model, model))] + cells) + " \\\\")
        lines.append("\\hline")
        improv, pvals = [], []
        for d, m in columns:
            ref = by[d].get(REFERENCE) or {}
            pct = ref.get(f"{key(m)}_improv_pct")
            improv.append("--" if pct is None else f"{pct:+.2f}\\%")
            best = by[d].get(ref.get(f"{key(m)}_best_other")) or {}
            p = best.get(f"{key(m)}_ttest_p")
            pvals.append("--" if p is None else _p(p, ".1e").replace("<", "$<$"))
        lines.append(" & ".join(["Improv."] + improv) + " \\\\")
        if not published:
            lines.append(" & ".join(["p-value"] + pvals) + " \\\\")
        return lines + ["\\hline"]

    seeds = "/".join(map(str, sorted({row["seeds"] for rows in tables.values() for row in rows})))
    header = [f"\\multicolumn{{3}}{{c{'|' if i < len(datasets) - 1 else ''}}}{{{_tex_escape(DATASET_NAMES.get(d, d))}}}"
              for i, d in enumerate(datasets)]
    # a full page for the table (plain length settings, no package): 12 models x 3 blocks fit in it
    lines = ["\\documentclass{article}", "\\usepackage{graphicx}", "\\setlength{\\textwidth}{16.5cm}",
             "\\setlength{\\oddsidemargin}{-0.2cm}", "\\setlength{\\textheight}{24cm}",
             "\\setlength{\\topmargin}{-2cm}", "\\begin{document}", "\\begin{table}[p]", "\\centering", "\\small",
             f"\\caption{{{_tex_escape(caption)}}}", "\\label{tab:table2}",
             "\\resizebox{\\ifdim\\width>\\textwidth\\textwidth\\else\\width\\fi}{!}{%",
             "\\begin{tabular}{l" + "|ccc" * len(datasets) + "}", "\\hline",
             " & ".join(["Dataset"] + header) + " \\\\",
             " & ".join(["Model"] + [f"{m}@{k}" for _, m in columns]) + " \\\\", "\\hline"]
    # short block titles: a title row wider than the numbers below it would stretch the last column
    lines += block(f"Ours, validation protocol ({seeds} seeds)", lambda m: _key("validation", m, k), False)
    lines += block(f"Ours, paper protocol ({seeds} seeds)", lambda m: _key("paper", m, k), False)
    lines += block("Published", lambda m: f"published_{m}@20", True)
    lines += ["\\end{tabular}}", "\\end{table}", "\\end{document}", ""]
    return "\n".join(lines)


def write_table2(data: str, note: str, results: Dict[str, object], sweep_dir: Path) -> str:
    """comparison.md (returned), comparison.csv, comparison.tex and groups.png (Figure 2) in sweep_dir."""
    from Utils.figures import model_group_bars

    rows = table2_rows(data, results)
    runs = {row["model"]: results[row["model"]]["runs"] for row in rows}
    notes = table2_stats(data, rows, runs)
    k = rows[0]["k"] if rows else 20
    ref = next((row for row in rows if row["model"] == REFERENCE), None)
    first_seed = ref["seed_list"][0] if ref else None
    header = (["model", "setting", "seeds", "epochs run", "s/epoch (median)", "published in"]
              + [f"published {m}@20" for m in METRICS]
              + [f"ours {m}@{k} ({p} protocol)" for p in PROTOCOLS for m in METRICS])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["setting"], str(row["seeds"]), f"{row['epochs_run']:.0f}",
                 f"{row['seconds_per_epoch']:.2f}", row["published_in"]]
        cells += [f"{row[f'published_{m}@20']:.4f}" if row[f"published_{m}@20"] is not None else "—"
                  for m in METRICS]
        cells += [_mean_std(row[_key(p, m, k)]) + (" " + _marks(row, _key(p, m, k))).rstrip()
                  for p in PROTOCOLS for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    text = [f"Paper Table 2 on {data}: the published numbers (each on the authors' full-feature data) beside ours "
            f"(mean ± sample std over seeds; the value alone for one seed).", f"Note: {note}", ""] + lines
    if ref is not None:
        text += ["", f"Marks: {REFERENCE} differs from that model (two-sided, p < {ALPHA}) by * a paired t-test over "
                 f"the seeds, † a Wilcoxon signed-rank test over the test users' per-user metric of seed "
                 f"{first_seed}."
                 f" Improv.: ({REFERENCE} − best other) / best other (its mean over seeds; published: over every "
                 f"other model of {ref['published_in']} held here).", "",
                 "| Improv. | " + " | ".join(f"{m}@{k}" for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for label, prefix in [(f"ours, {p} protocol", _key(p, "{m}", k)) for p in PROTOCOLS] + \
                [(f"published ({ref['published_in']})", "published_{m}@20")]:
            cells = []
            for m in METRICS:
                key = prefix.format(m=m)
                pct, best = ref.get(f"{key}_improv_pct"), ref.get(f"{key}_best_other")
                cells.append("—" if pct is None else f"{pct:+.2f}% over {best}")
            text.append(f"| {label} | " + " | ".join(cells) + " |")
        text += ["", f"p-values of {REFERENCE} against each model (t: paired t-test over seeds; W: Wilcoxon "
                     f"signed-rank over test users, seed {first_seed}):", "",
                 "| model | " + " | ".join(f"{m}@{k} {p} protocol (t / W)" for p in PROTOCOLS for m in METRICS)
                 + " |", "|---|" + "---|" * (2 * len(METRICS))]
        for row in rows:
            if row is not ref:
                text.append(f"| {row['model']} | " + " | ".join(
                    f"{_p(row[f'{_key(p, m, k)}_ttest_p'])} / {_p(row[f'{_key(p, m, k)}_wilcoxon_p'])}"
                    for p in PROTOCOLS for m in METRICS) + " |")
    skipped = [f"- {model}: {why}" for model, why in results.items() if isinstance(why, str)]
    text += ([""] + skipped if skipped else []) + ([""] + [f"- {n}" for n in notes] if notes else []) + [""]
    text = "\n".join(text)
    (sweep_dir / "comparison.md").write_text(text)

    stats = [(p, m, stat) for p in PROTOCOLS for m in METRICS
             for stat in ("mean", "std", "values", "ttest_p", "wilcoxon_p", "improv_pct", "best_other")]
    with open(sweep_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "setting", "seeds", "seed_list", "epochs_run", "seconds_per_epoch", "published_in"]
                        + [f"published_{m}@20{suffix}" for m in METRICS
                           for suffix in ("", "_improv_pct", "_best_other")]
                        + [f"{_key(p, m, k)}_{stat}" for p, m, stat in stats])
        for row in rows:
            out = [row["model"], row["setting"], row["seeds"], ";".join(map(str, row["seed_list"])), row["epochs_run"],
                   row["seconds_per_epoch"], row["published_in"]]
            out += [row.get(f"published_{m}@20{suffix}") for m in METRICS for suffix in ("", "_improv_pct",
                                                                                           "_best_other")]
            for p, m, stat in stats:
                values = row[_key(p, m, k)]
                out.append(np.mean(values) if stat == "mean" else
                           (np.std(values, ddof=1) if len(values) > 1 else 0.0) if stat == "std" else
                           ";".join(repr(float(v)) for v in values) if stat == "values" else
                           row.get(f"{_key(p, m, k)}_{stat}"))
            writer.writerow(["" if v is None else v for v in out])
    if rows:
        seeds = ",".join(map(str, ref["seed_list"] if ref else rows[0]["seed_list"]))
        caption = (f"Table 2 on {DATASET_NAMES.get(data, data)} (seeds {seeds}): Recall, NDCG and Precision@{k}, "
                   f"all-rank. Ours: mean ± "
                   f"sample std over seeds, under the validation protocol (test at the epoch of the best validation "
                   f"Recall) and the paper's (the epoch of the best test Recall). Published: DiffMM's Table 2 (MMSSL: "
                   f"its README; MDMNS: its Table II). Best in bold, second underlined, per block and column. * / †: "
                   f"DiffMM differs from that model, p < {ALPHA} (two-sided paired t-test over seeds / Wilcoxon "
                   f"signed-rank test over the test users of seed {first_seed}); p-value: the t-test against the best "
                   f"other model; Improv.: (DiffMM − best other) / best other. {note}")
        (sweep_dir / "comparison.tex").write_text(table2_tex({data: rows}, caption))
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
            if workers.wanted(args):  # every model's runs as one study (docs/many-runs.md); then as always
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
