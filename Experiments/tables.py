"""The tables of the drivers, from run folders: a sweep's table.md/table.csv/sweep.png, Table 2's comparison.md,
comparison.csv, comparison.tex and groups.png, and Tables 3 and 4's comparison.md.

Every spread is `mean_std` (`Utils/metrics.py`): the mean over seeds and the sample standard deviation (n − 1; 0 for
one seed), shown by `mean_std_text` as 0.1234 ± 0.0012, or the value alone for one seed.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from Experiments.paper import (DATASET_NAMES, GRIDS, METRICS, PUBLISHED, PUBLISHED_IN, REFERENCE,
                               cell_label, display_name, paper_values, table2_order)
from Experiments.plan import Cell, Grid, cells, run_dir_of
from Experiments.stats import ALPHA, PROTOCOLS, marks, protocol_key, table2_stats
from Utils import run_folder
from Utils.metrics import mean_std


def mean_std_text(mean: float, std: float, n: int, pm: str = " ± ") -> str:
    """'0.1234 ± 0.0012' (`pm`: LaTeX's '$\\pm$'); for one seed the value alone, not a misleading '± 0'."""
    return f"{mean:.4f}" + (f"{pm}{std:.4f}" if n > 1 else "")


def _summaries(run_dirs: Sequence[Path]) -> List[dict]:
    return [run_folder.read_summary(d) for d in run_dirs]


# ---------------------------------------------------------------------------------------------
# A sweep: table.csv, table.md, sweep.png
# ---------------------------------------------------------------------------------------------


def select_row(rows: List[dict], select: str = "validation") -> Optional[dict]:
    """The row with the best mean validation Recall@k, or (select='mmrec') the best mean test Recall@k."""
    rows = [row for row in rows if not row.get("pruned")]  # a pruned cell (--prune) stopped early: never selected
    if not rows:
        return None
    k = rows[0]["k"]
    key = f"val_Recall@{k}_mean" if select == "validation" else f"test_Recall@{k}_mean"
    return max(rows, key=lambda row: row[key])


def summarise(sweep_dir: Path, grid: Grid, seeds: Sequence[int],
              cell_list: Optional[List[Cell]] = None) -> List[dict]:
    """One row per cell (of the grid, or `cell_list`: a search's cells): flag values, seeds, K, and mean/std over
    seeds of the validation protocol's metrics; `pruned` when a run of the cell was pruned (--prune), whose
    later seeds (--search tpe) may not have run."""
    rows = []
    for cell in cell_list if cell_list is not None else cells(grid):
        run_dirs = [run_dir_of(sweep_dir, cell, s) for s in seeds]
        summaries = [run_folder.read_summary(d) for d in run_dirs if (d / run_folder.SUMMARY).is_file()]
        pruned = any(run_folder.pruned_reason(s) is not None for s in summaries)
        if not pruned:  # every seed's run is there (a missing one fails here, as it always did)
            summaries = [run_folder.read_summary(d) for d in run_dirs]
        k = run_folder.run_config(summaries[0])["topk"]
        row: dict = dict(cell)
        if pruned:
            row["pruned"] = True
        row["seeds"] = len(summaries)
        row["k"] = k
        row["epoch_mean"] = float(np.mean([run_folder.best_epoch(s, "validation") for s in summaries]))
        for split, metrics in (("val", ("Recall",)), ("test", METRICS)):
            for metric in metrics:
                key = f"{split}_{metric}@{k}"
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(
                    [run_folder.protocol_metrics(s, "validation", split)[f"{metric}@{k}"] for s in summaries])
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
        shown = [str(row[f]) for f in flags] + [str(row["seeds"])]
        shown += [mean_std_text(row[f"{key}_mean"], row[f"{key}_std"], row["seeds"]) for key in keys]
        lines.append("| " + " | ".join(shown) + " |")
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


# ---------------------------------------------------------------------------------------------
# Table 2: comparison.md, comparison.csv, comparison.tex, groups.png
# ---------------------------------------------------------------------------------------------

def table2_rows(data: str, results: Dict[str, object]) -> List[dict]:
    """One row per model that ran: the paper's numbers and ours (per seed, in seed order) under both protocols."""
    rows = []
    for model, result in results.items():
        if isinstance(result, str):
            continue
        summaries = _summaries(result["runs"])
        k = run_folder.run_config(summaries[0])["topk"]
        row: dict = {"model": model, "setting": result["setting"], "seeds": len(summaries), "k": k,
                     "seed_list": [int(run_folder.run_config(s)["seed"]) for s in summaries],
                     "epochs_run": float(np.mean([run_folder.epochs_run(s) for s in summaries])),
                     "seconds_per_epoch": float(np.mean([np.median([e["epoch"] for e in run_folder.epoch_seconds(s)])
                                                         for s in summaries]))}
        paper = PUBLISHED.get(model, {}).get(data)
        # where the number was printed; without one, why (a model DiffMM's paper lacks, or a dataset no paper has)
        row["published_in"] = PUBLISHED_IN[model] if paper or model not in PUBLISHED else "no published number"
        for metric, value in zip(METRICS, paper or (None,) * 3):
            row[f"published_{metric}@20"] = value
        for protocol in PROTOCOLS:
            for metric in METRICS:
                row[protocol_key(protocol, metric, k)] = [run_folder.protocol_metrics(s, protocol)[f"{metric}@{k}"]
                                                          for s in summaries]
        rows.append(row)
    return rows


def p_text(value: Optional[float], spec: str = ".2g") -> str:
    """A p-value as printed: '—' when there is none, '<1e-300' when scipy's value underflowed to 0."""
    if value is None:
        return "—"
    return "<1e-300" if value == 0 else format(value, spec)


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


def _tex_block(title: str, key: Callable[[str], str], published: bool, models: Sequence[str],
               by: Dict[str, Dict[str, dict]], columns: Sequence[Tuple[str, str]]) -> List[str]:
    """One block of comparison.tex: a row per model (`by`: dataset -> model -> row), then Improv. (and, for ours,
    p-value); `key(metric)`: the rows' field (a list over seeds for ours, a number for published)."""
    def value(row: Optional[dict], m: str) -> Optional[float]:
        if row is None or row.get(key(m)) is None:
            return None
        return float(row[key(m)]) if published else float(np.mean(row[key(m)]))

    ranks = {(d, m): _ranks({model: value(row, m) for model, row in by[d].items()}) for d, m in columns}
    lines = [f"\\multicolumn{{{1 + len(columns)}}}{{l}}{{\\textit{{{_tex_escape(title)}}}}} \\\\", "\\hline"]
    for model in models:
        cells = []
        for d, m in columns:
            row = by[d].get(model)
            if value(row, m) is None:
                cells.append("--")
                continue
            text = (f"{row[key(m)]:.4f}" if published
                    else mean_std_text(*mean_std(row[key(m)]), len(row[key(m)]), pm="$\\pm$"))
            rank = ranks[(d, m)][model]
            text = f"\\textbf{{{text}}}" if rank == "best" else f"\\underline{{{text}}}" if rank else text
            cells.append(text + ("" if published else marks(row, key(m), tex=True)))
        if any(c != "--" for c in cells):
            lines.append(" & ".join([_tex_escape(display_name(model))] + cells) + " \\\\")
    lines.append("\\hline")
    improv, pvals = [], []
    for d, m in columns:
        ref = by[d].get(REFERENCE) or {}
        pct = ref.get(f"{key(m)}_improv_pct")
        improv.append("--" if pct is None else f"{pct:+.2f}\\%")
        best = by[d].get(ref.get(f"{key(m)}_best_other")) or {}
        p = best.get(f"{key(m)}_ttest_p")
        pvals.append("--" if p is None else p_text(p, ".1e").replace("<", "$<$"))
    lines.append(" & ".join(["Improv."] + improv) + " \\\\")
    if not published:
        lines.append(" & ".join(["p-value"] + pvals) + " \\\\")
    return lines + ["\\hline"]


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
    models = table2_order({row["model"] for rows in tables.values() for row in rows})
    by = {data: {row["model"]: row for row in rows} for data, rows in tables.items()}
    columns = [(d, m) for d in datasets for m in METRICS]
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
    blocks = [(f"Ours, {p} protocol ({seeds} seeds)", lambda m, p=p: protocol_key(p, m, k), False)
              for p in ("validation", "paper")] + [("Published", lambda m: f"published_{m}@20", True)]
    for title, key, published in blocks:
        lines += _tex_block(title, key, published, models, by, columns)
    lines += ["\\end{tabular}}", "\\end{table}", "\\end{document}", ""]
    return "\n".join(lines)


def write_table2(data: str, note: str, results: Dict[str, object], sweep_dir: Path) -> str:
    """comparison.md (returned), comparison.csv, comparison.tex and groups.png (Figure 2) in sweep_dir.

    `results`: per model, its selected setting's name and run folders (`paper.table2_results`), or why it was
    skipped."""
    from Utils.figures import model_group_bars

    rows = table2_rows(data, results)
    order = {model: i for i, model in enumerate(table2_order([row["model"] for row in rows]))}
    rows.sort(key=lambda row: order[row["model"]])   # the paper's column order, DiffMM last, whatever --models said
    notes = table2_stats(data, rows, {row["model"]: results[row["model"]]["runs"] for row in rows})
    skipped = [f"- {model}: {why}" for model, why in results.items() if isinstance(why, str)]
    text = table2_markdown(data, note, rows) + "\n".join(
        ([""] + skipped if skipped else []) + ([""] + [f"- {n}" for n in notes] if notes else []) + [""])
    (sweep_dir / "comparison.md").write_text(text)
    write_table2_csv(rows, sweep_dir / "comparison.csv")
    if rows:
        (sweep_dir / "comparison.tex").write_text(table2_tex({data: rows}, table2_caption(data, note, rows)))
        model_group_bars({row["model"]: results[row["model"]]["runs"][0] for row in rows}, sweep_dir / "groups.png")
    return text


def _reference(rows: List[dict]) -> Optional[dict]:
    return next((row for row in rows if row["model"] == REFERENCE), None)


def table2_markdown(data: str, note: str, rows: List[dict]) -> str:
    """comparison.md's tables (the rows after `table2_stats`): per model the published numbers and ours with their
    marks; then the reference's Improv. and its p-values against each model. Ends with a newline."""
    k = rows[0]["k"] if rows else 20
    ref = _reference(rows)
    header = (["model", "setting", "seeds", "epochs run", "s/epoch (median)", "published in"]
              + [f"published {m}@20" for m in METRICS]
              + [f"ours {m}@{k} ({p} protocol)" for p in PROTOCOLS for m in METRICS])
    lines = [f"Paper Table 2 on {data}: the published numbers (each on the authors' full-feature data) beside ours "
             f"(mean ± sample std over seeds; the value alone for one seed).", f"Note: {note}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        shown = [row["model"], row["setting"], str(row["seeds"]), f"{row['epochs_run']:.0f}",
                 f"{row['seconds_per_epoch']:.2f}", row["published_in"]]
        shown += [f"{row[f'published_{m}@20']:.4f}" if row[f"published_{m}@20"] is not None else "—"
                  for m in METRICS]
        shown += [mean_std_text(*mean_std(row[protocol_key(p, m, k)]), len(row[protocol_key(p, m, k)]))
                  + (" " + marks(row, protocol_key(p, m, k))).rstrip() for p in PROTOCOLS for m in METRICS]
        lines.append("| " + " | ".join(shown) + " |")
    if ref is not None:
        lines += _improv_lines(ref, k) + _p_value_lines(rows, ref, k)
    return "\n".join(lines) + "\n"


def _improv_lines(ref: dict, k: int) -> List[str]:
    """The Improv. table of comparison.md: the reference's, ours under each protocol and published."""
    lines = ["", f"Marks: {REFERENCE} differs from that model (two-sided, p < {ALPHA}) by * a paired t-test over "
             f"the seeds, † a Wilcoxon signed-rank test over the test users' per-user metric of seed "
             f"{ref['seed_list'][0]}."
             f" Improv.: ({REFERENCE} − best other) / best other (its mean over seeds; published: over every "
             f"other model of {ref['published_in']} held here).", "",
             "| Improv. | " + " | ".join(f"{m}@{k}" for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for label, prefix in [(f"ours, {p} protocol", protocol_key(p, "{m}", k)) for p in PROTOCOLS] + \
            [(f"published ({ref['published_in']})", "published_{m}@20")]:
        shown = []
        for m in METRICS:
            key = prefix.format(m=m)
            pct, best = ref.get(f"{key}_improv_pct"), ref.get(f"{key}_best_other")
            shown.append("—" if pct is None else f"{pct:+.2f}% over {best}")
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return lines


def _p_value_lines(rows: List[dict], ref: dict, k: int) -> List[str]:
    """The p-values table of comparison.md: the reference against each other model."""
    lines = ["", f"p-values of {REFERENCE} against each model (t: paired t-test over seeds; W: Wilcoxon "
                 f"signed-rank over test users, seed {ref['seed_list'][0]}):", "",
             "| model | " + " | ".join(f"{m}@{k} {p} protocol (t / W)" for p in PROTOCOLS for m in METRICS)
             + " |", "|---|" + "---|" * (2 * len(METRICS))]
    for row in rows:
        if row is not ref:
            lines.append(f"| {row['model']} | " + " | ".join(
                f"{p_text(row[f'{protocol_key(p, m, k)}_ttest_p'])} / "
                f"{p_text(row[f'{protocol_key(p, m, k)}_wilcoxon_p'])}" for p in PROTOCOLS for m in METRICS) + " |")
    return lines


def write_table2_csv(rows: List[dict], path: Path) -> None:
    """comparison.csv: every number of every row, per protocol and metric its mean, std, values and tests."""
    k = rows[0]["k"] if rows else 20
    stats = [(p, m, stat) for p in PROTOCOLS for m in METRICS
             for stat in ("mean", "std", "values", "ttest_p", "wilcoxon_p", "improv_pct", "best_other")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "setting", "seeds", "seed_list", "epochs_run", "seconds_per_epoch", "published_in"]
                        + [f"published_{m}@20{suffix}" for m in METRICS
                           for suffix in ("", "_improv_pct", "_best_other")]
                        + [f"{protocol_key(p, m, k)}_{stat}" for p, m, stat in stats])
        for row in rows:
            out = [row["model"], row["setting"], row["seeds"], ";".join(map(str, row["seed_list"])), row["epochs_run"],
                   row["seconds_per_epoch"], row["published_in"]]
            out += [row.get(f"published_{m}@20{suffix}") for m in METRICS for suffix in ("", "_improv_pct",
                                                                                           "_best_other")]
            for p, m, stat in stats:
                values = row[protocol_key(p, m, k)]
                out.append(mean_std(values)[0] if stat == "mean" else mean_std(values)[1] if stat == "std" else
                           ";".join(repr(float(v)) for v in values) if stat == "values" else
                           row.get(f"{protocol_key(p, m, k)}_{stat}"))
            writer.writerow(["" if v is None else v for v in out])


def read_table2_csv(path: Path) -> List[dict]:
    """comparison.csv back into the rows `table2_tex` takes (`write_table2_csv`'s columns; an empty cell is None)."""
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    rows = []
    for rec in records:
        keys = [c[:-len("_values")] for c in rec if c.endswith("_values")]
        row: dict = {c: rec[c] or None for c in rec if c.startswith("published_")}
        row.update({c: float(v) for c, v in row.items() if v and not c.endswith(("_in", "_best_other"))})
        row.update(model=rec["model"], setting=rec["setting"], seeds=int(rec["seeds"]),
                   seed_list=[int(s) for s in rec["seed_list"].split(";")], k=int(keys[0].rsplit("@", 1)[1]))
        for key in keys:
            row[key] = [float(v) for v in rec[f"{key}_values"].split(";")]
            row.update({f"{key}_{t}": float(rec[f"{key}_{t}"]) if rec[f"{key}_{t}"] else None
                        for t in ("ttest_p", "wilcoxon_p", "improv_pct")})
            row[f"{key}_best_other"] = rec[f"{key}_best_other"] or None
        rows.append(row)
    return rows


def merge_table2(folders: Sequence[Path], out: Path) -> Path:
    """out/comparison.tex over several datasets, from the Table 2 folders' comparison.csv (each folder's dataset
    and note: the first two lines of its comparison.md, as `table2_markdown` writes them)."""
    tables, notes = {}, []
    for folder in map(Path, folders):
        head = (folder / "comparison.md").read_text().splitlines()
        tables[head[0].split("Paper Table 2 on ", 1)[1].split(": ", 1)[0]] = read_table2_csv(folder / "comparison.csv")
        notes.append(head[1].replace("Note: ", "", 1))
    names = ", ".join(DATASET_NAMES.get(d, d) for d in tables)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for rows in tables.values() for row in rows]
    (out / "comparison.tex").write_text(table2_tex(tables, table2_caption(names, " ".join(notes), rows)))
    return out / "comparison.tex"


def table2_caption(data: str, note: str, rows: List[dict]) -> str:
    """comparison.tex's caption: what the blocks, marks and rows are (`rows`: of one dataset, or of several)."""
    k, ref = rows[0]["k"], _reference(rows)
    seeds = ",".join(map(str, dict.fromkeys(s for row in rows for s in row["seed_list"])))
    first_seed = ref["seed_list"][0] if ref else None
    return (f"Table 2 on {DATASET_NAMES.get(data, data)} (seeds {seeds}): Recall, NDCG and Precision@{k}, "
            f"all-rank. Ours: mean ± "
            f"sample std over seeds, under the validation protocol (test at the epoch of the best validation "
            f"Recall) and the paper's (the epoch of the best test Recall). Published: DiffMM's Table 2 (MMSSL: "
            f"its README; MDMNS: its Table II). Best in bold, second underlined, per block and column. * / †: "
            f"DiffMM differs from that model, p < {ALPHA} (two-sided paired t-test over seeds / Wilcoxon "
            f"signed-rank test over the test users of seed {first_seed}); p-value: the t-test against the best "
            f"other model; Improv.: (DiffMM − best other) / best other. {note}")


# ---------------------------------------------------------------------------------------------
# Tables 3 and 4: DiffMM's ablations and its τ x λ1 grid
# ---------------------------------------------------------------------------------------------

def comparison(table: int, data: str, sweep_dir: Path, seeds: Sequence[int]) -> str:
    """A markdown table: the paper's numbers beside ours under both protocols (mean ± std over seeds)."""
    metrics = ("Recall", "NDCG")
    all_summaries = [_summaries([run_dir_of(sweep_dir, cell, s) for s in seeds]) for cell in cells(GRIDS[table])]
    k = run_folder.run_config(all_summaries[0][0])["topk"]
    header = (["setting"] + [f"paper {m}@20" for m in metrics] + [f"ours {m}@{k} (paper protocol)" for m in metrics]
              + [f"ours {m}@{k} (validation protocol)" for m in metrics])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell, summaries in zip(cells(GRIDS[table]), all_summaries):
        row = [cell_label(table, cell)] + [f"{v:.4f}" for v in paper_values(table, data, cell)]
        row += [mean_std_text(*mean_std([run_folder.protocol_metrics(s, p)[f"{m}@{k}"] for s in summaries]),
                              len(summaries))
                for p in ("paper", "validation") for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_paper_table(table: int, data: str, note: str, sweep_dir: Path, seeds: Sequence[int]) -> str:
    """Table 3 or 4's comparison.md in sweep_dir (returned; Table 3 also ablation.png, as the paper's bars)."""
    if table == 3:
        from Utils.figures import ablation_bars

        ablation_bars([run_dir_of(sweep_dir, c, s) for c in cells(GRIDS[3]) for s in seeds], sweep_dir / "ablation.png")
    epochs = run_folder.epochs_run(_summaries([run_dir_of(sweep_dir, cells(GRIDS[table])[0], seeds[0])])[0])
    text = "\n".join([
        f"Paper Table {table} on {data}: the paper's numbers (full features, 50 epochs) beside ours "
        f"({epochs} epoch{'s' if epochs != 1 else ''}, seeds {','.join(map(str, seeds))}; mean ± sample std "
        f"when several seeds).", f"Note: {note}", "", comparison(table, data, sweep_dir, seeds), ""])
    (sweep_dir / "comparison.md").write_text(text)
    return text
