"""Table 2's statistics (Improv., paired t-test over seeds, Wilcoxon over users), comparison.csv/.md/.tex, and the
readable figures (colours, "no users", wrapped titles, no sweep.png for one cell). Hand-made run folders only: every
expected value is computed here by its formula, not by the code under test."""
from __future__ import annotations

import csv
import itertools
import math
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from Experiments import paper, stats, tables
from Models import model_names
from Utils import figures, run_folder

METRICS = ("Recall", "NDCG", "Precision")
SEEDS = (421, 422, 423)
GROUPS = ("0-5", "5-10", "10-20", "20-50", "50+")


# ------------------------------------------------------------------------------------------------
# the statistics, against their formulas
# ------------------------------------------------------------------------------------------------

def test_improvement_is_relative_to_the_best_other():
    assert stats.improvement(0.12, 0.10) == pytest.approx(20.0)
    # MMSSL's README: TikTok R@20 0.0921 against SLMRec's 0.0845 is printed as 8.99%
    assert round(stats.improvement(0.0921, 0.0845), 2) == 8.99
    assert stats.improvement(0.09, 0.10) == pytest.approx(-10.0)


def t_p_two_dof(d) -> float:
    """Two-sided p of the paired t-test with 3 pairs (2 degrees of freedom), by the closed form of Student's t
    with 2 dof: P(|T| > t) = 1 - t / sqrt(2 + t^2)."""
    d = np.asarray(d, dtype=float)
    t = abs(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))
    return 1 - t / math.sqrt(2 + t * t)


def test_paired_t_p_matches_the_closed_form():
    ours, other = [0.110, 0.121, 0.113], [0.100, 0.104, 0.111]
    expected = t_p_two_dof(np.subtract(ours, other))
    assert stats.paired_t_p(ours, other) == pytest.approx(expected, rel=1e-9)
    assert 0.05 < expected < 0.5                                  # a spread-out difference: not significant
    tight = t_p_two_dof([0.020, 0.021, 0.019])
    assert stats.paired_t_p([0.12, 0.121, 0.119], [0.1, 0.1, 0.1]) == pytest.approx(tight) and tight < 0.01
    assert stats.paired_t_p([0.1], [0.2]) is None             # one seed: no test
    assert stats.paired_t_p([0.2, 0.3], [0.1, 0.2]) is None   # the same difference twice: t undefined


def exact_wilcoxon_p(d) -> float:
    """Two-sided exact p of the signed-rank test (no ties, no zeros): W+ = the sum of the ranks of |d| over the
    positive d; under H0 each rank is in W+ with probability 1/2, so P(W+ = w) = #{subsets of 1..n summing to w}
    / 2^n, counted here by dynamic programming (for small n, `enumerated_wilcoxon_p` checks it)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_plus = int(ranks[d > 0].sum())
    counts = np.zeros(n * (n + 1) // 2 + 1)
    counts[0] = 1
    for r in range(1, n + 1):
        counts[r:] = counts[r:] + counts[:-r].copy()
    pmf = counts / 2.0 ** n
    return min(1.0, 2 * min(pmf[:w_plus + 1].sum(), pmf[w_plus:].sum()))


def enumerated_wilcoxon_p(d) -> float:
    """The same p by enumerating every sign pattern."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_plus = ranks[np.asarray(d) > 0].sum()
    all_w = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))]
    return min(1.0, 2 * min(np.mean([w <= w_plus for w in all_w]), np.mean([w >= w_plus for w in all_w])))


def test_wilcoxon_p_matches_the_exact_distribution():
    d = np.array([0.31, -0.07, 0.52, 0.18, -0.11, 0.44, 0.26, 0.05])   # distinct magnitudes, no zero
    other = np.linspace(0.0, 0.5, len(d))
    assert exact_wilcoxon_p(d) == pytest.approx(enumerated_wilcoxon_p(d))
    assert stats.wilcoxon_p(other + d, other) == pytest.approx(exact_wilcoxon_p(d), rel=1e-9)
    all_up = np.array([0.3, 0.1, 0.5, 0.2, 0.4, 0.6])
    assert stats.wilcoxon_p(all_up, np.zeros(6)) == pytest.approx(2 / 2 ** 6)   # only the all-positive pattern
    assert stats.wilcoxon_p(np.ones(5), np.ones(5)) is None                     # nothing differs


# ------------------------------------------------------------------------------------------------
# comparison.csv / .md / .tex from hand-made run folders
# ------------------------------------------------------------------------------------------------

# per model, per seed: test Recall@20 under the validation protocol (NDCG = 0.4 x, Precision = 0.05 x; the paper
# protocol adds 0.002); DiffMM is ahead of bm3 by a steady margin and level with lightgcn
RECALL = {"diffmm": (0.110, 0.112, 0.111), "bm3": (0.090, 0.093, 0.091), "lightgcn": (0.105, 0.118, 0.107),
          "mf": (0.050, 0.052, 0.049)}
USERS = np.arange(0, 60, 2)   # the evaluated test users (ids), the same for every run


def per_user_recall(model: str) -> np.ndarray:
    """Seed 421's per-user test Recall: DiffMM higher than bm3 for most users, mixed against lightgcn."""
    rng = np.random.default_rng(len(model))
    base = rng.uniform(0, 0.2, len(USERS))
    return {"diffmm": base, "bm3": base - rng.uniform(0.01, 0.05, len(USERS)),
            "lightgcn": base + rng.normal(0, 0.03, len(USERS)), "mf": base * 0.5}[model]


def metric_value(model: str, seed_index: int, protocol: str, metric: str) -> float:
    recall = RECALL[model][seed_index] + (0.002 if protocol == "paper" else 0.0)
    return recall * {"Recall": 1.0, "NDCG": 0.4, "Precision": 0.05}[metric]


def write_run(run_dir: Path, model: str, seed_index: int) -> Path:
    run_dir.mkdir(parents=True)
    protocols = {p: {"epoch": 3 if p == "paper" else 4,
                     "test": {f"{m}@20": metric_value(model, seed_index, p, m) for m in METRICS}}
                 for p in ("paper", "validation")}
    groups = {g: {"users": 0 if g in ("10-20", "20-50") else 10, "Recall@20": None if g in ("10-20", "20-50")
                  else 0.1, "NDCG@20": None if g in ("10-20", "20-50") else 0.05} for g in GROUPS}
    summary = {"model": model, "data": {"name": "tiktok"}, "epochs_run": 5,
               "config": {"topk": 20, "seed": SEEDS[seed_index], "model": model, "data": "tiktok"},
               "timing": {"per_epoch": [{"epoch": 1.0}] * 5}, "protocols": protocols,
               "groups": {"epoch": 4, "per_group": groups}}
    run_folder.write_summary(run_dir, summary)
    if seed_index == 0:
        values = per_user_recall(model)
        for protocol, epoch in (("paper", 3), ("validation", 4)):
            per_user = {"users": USERS, "Recall@20": values, "NDCG@20": values * 0.4, "Precision@20": values * 0.05}
            run_folder.write_per_user(run_dir, protocol, per_user, epoch)
    return run_dir


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """write_table2 on hand-made runs of 4 models x 3 seeds: (folder, CSV rows by model, comparison.md text)."""
    root = tmp_path_factory.mktemp("table2")
    results = {model: {"setting": "default", "runs": [write_run(root / model / "base" / f"seed{s}", model, i)
                                                       for i, s in enumerate(SEEDS)]} for model in RECALL}
    results["mmssl"] = "skipped: for the test"
    text = tables.write_table2("tiktok", "a hand-made note", results, root)
    with open(root / "comparison.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    return root, rows, text


def test_csv_p_values_and_improvement_against_the_formulas(table):
    _, rows, _ = table
    for protocol in ("paper", "validation"):
        for metric in METRICS:
            key = f"{protocol}_protocol_{metric}@20"
            ours = [metric_value("diffmm", i, protocol, metric) for i in range(3)]
            for model in ("bm3", "lightgcn", "mf"):
                theirs = [metric_value(model, i, protocol, metric) for i in range(3)]
                assert float(rows[model][f"{key}_ttest_p"]) == pytest.approx(
                    t_p_two_dof(np.subtract(ours, theirs)), rel=1e-6)
                # 30 users, no ties: the exact distribution (scipy's choice up to 50 pairs)
                d = per_user_recall("diffmm") - per_user_recall(model)
                assert float(rows[model][f"{key}_wilcoxon_p"]) == pytest.approx(exact_wilcoxon_p(d), rel=1e-6)
                assert float(rows[model][f"{key}_mean"]) == pytest.approx(np.mean(theirs))
                assert float(rows[model][f"{key}_std"]) == pytest.approx(np.std(theirs, ddof=1))
            # the best other model by mean is lightgcn; improvement by the formula
            best = max(("bm3", "lightgcn", "mf"),
                       key=lambda m: np.mean([metric_value(m, i, protocol, metric) for i in range(3)]))
            best_mean = np.mean([metric_value(best, i, protocol, metric) for i in range(3)])
            assert rows["diffmm"][f"{key}_best_other"] == best == "lightgcn"
            assert float(rows["diffmm"][f"{key}_improv_pct"]) == pytest.approx(
                (np.mean(ours) - best_mean) / best_mean * 100)
            assert rows["diffmm"][f"{key}_ttest_p"] == ""                   # no test against itself
    # published: DiffMM's 0.1129 over the best other DiffMM Table 2 row held here (bm3, 0.0957)
    assert rows["diffmm"]["published_Recall@20_best_other"] == "bm3"
    assert float(rows["diffmm"]["published_Recall@20_improv_pct"]) == pytest.approx((0.1129 - 0.0957) / 0.0957 * 100)
    assert rows["bm3"]["seed_list"] == "421;422;423"


def test_markdown_marks_where_p_is_below_alpha(table):
    _, rows, text = table
    lines = {}  # the first table's row of each model (the p-value table below repeats the names)
    for line in text.splitlines():
        if line.startswith("| "):
            lines.setdefault(line.split(" | ")[0].strip("| "), line)
    for model in ("bm3", "lightgcn", "mf"):
        cells = lines[model].strip("| ").split(" | ")[-6:]     # ours: paper protocol x 3, validation x 3
        for cell, (protocol, metric) in zip(cells, [(p, m) for p in ("paper", "validation") for m in METRICS]):
            key = f"{protocol}_protocol_{metric}@20"
            assert ("*" in cell) == (float(rows[model][f"{key}_ttest_p"]) < 0.05), (model, cell)
            assert ("†" in cell) == (float(rows[model][f"{key}_wilcoxon_p"]) < 0.05), (model, cell)
    assert "*" in lines["bm3"] and "*" not in lines["lightgcn"]      # the hand-made numbers do test both ways
    assert "- mmssl: skipped: for the test" in text
    assert "% over lightgcn" in text


def strip_tex(cell: str) -> tuple:
    """(text of the number(s), bold, underlined, marks) of a .tex cell."""
    bold, under = cell.startswith("\\textbf{"), cell.startswith("\\underline{")
    marks = "".join(sym for sym, tex in (("*", "$^{*}$"), ("†", "$^{\\dagger}$")) if tex in cell)
    for token in ("$^{*}$", "$^{\\dagger}$", "\\textbf{", "\\underline{", "}"):
        cell = cell.replace(token, "")
    return cell.strip(), bold, under, marks


def tex_blocks(tex: str) -> dict:
    """{block title's first word(s): {row label: [cells]}} of comparison.tex."""
    blocks, current = {}, None
    for line in tex.splitlines():
        title = re.match(r"\\multicolumn\{\d+\}\{l\}\{\\textit\{(.*)\}\} \\\\$", line)
        if title:
            current = blocks.setdefault(title.group(1).split(" (")[0], {})
        elif current is not None and line.endswith(" \\\\"):
            label, *cells = [c.strip() for c in line[:-3].split(" & ")]
            current[label] = cells
    return blocks


def test_tex_cells_equal_the_csv_everywhere(table):
    root, rows, _ = table
    blocks = tex_blocks((root / "comparison.tex").read_text())
    assert set(blocks) == {"Ours, validation protocol", "Ours, paper protocol", "Published"}
    names = {paper.display_name(m): m for m in model_names()}
    for title, protocol in (("Ours, validation protocol", "validation"), ("Ours, paper protocol", "paper")):
        block = blocks[title]
        assert list(block)[:4] == ["MF-BPR", "LightGCN", "BM3", "DiffMM"]       # the paper's order, DiffMM last
        for j, metric in enumerate(METRICS):
            key = f"{protocol}_protocol_{metric}@20"
            shown = {}
            for label in ("MF-BPR", "LightGCN", "BM3", "DiffMM"):
                row = rows[names[label]]
                text, bold, under, marks = strip_tex(block[label][j])
                assert text == f"{float(row[f'{key}_mean']):.4f}$\\pm${float(row[f'{key}_std']):.4f}"
                expected_marks = "".join(sym for sym, test in (("*", "ttest"), ("†", "wilcoxon"))
                                         if row[f"{key}_{test}_p"] and float(row[f"{key}_{test}_p"]) < 0.05)
                assert marks == expected_marks
                shown[label] = (round(float(row[f"{key}_mean"]), 4), bold, under)
            order = sorted({v for v, _, _ in shown.values()}, reverse=True)
            for label, (value, bold, under) in shown.items():
                assert bold == (value == order[0]) and under == (value == order[1]), (title, metric, label)
            assert block["Improv."][j] == f"{float(rows['diffmm'][f'{key}_improv_pct']):+.2f}\\%"
            assert block["p-value"][j] == f"{float(rows['lightgcn'][f'{key}_ttest_p']):.1e}"
    published = blocks["Published"]
    for label in ("MF-BPR", "LightGCN", "BM3", "DiffMM"):
        for j, metric in enumerate(METRICS):
            text, _, _, marks = strip_tex(published[label][j])
            assert text == f"{float(rows[names[label]][f'published_{metric}@20']):.4f}" and marks == ""
    assert strip_tex(published["DiffMM"][0])[1] and strip_tex(published["BM3"][0])[2]   # best bold, second underlined
    assert published["Improv."][0] == f"{(0.1129 - 0.0957) / 0.0957 * 100:+.2f}\\%"


def test_merge_writes_one_tex_over_datasets_from_their_folders(table, tmp_path):
    """`reproduce --table 2 --merge A,B`: comparison.csv read back gives write_table2's comparison.tex exactly, and
    the merged table holds each dataset's columns as that dataset's own table has them."""
    from Experiments import reproduce
    root, _, _ = table
    rows = tables.read_table2_csv(root / "comparison.csv")
    assert tables.table2_tex({"tiktok": rows}, tables.table2_caption("tiktok", "a hand-made note", rows)) == (
        root / "comparison.tex").read_text()
    baby = tmp_path / "baby"
    results = {model: {"setting": "default", "runs": [write_run(baby / model / "base" / f"seed{s}", model, i)
                                                       for i, s in enumerate(SEEDS)]} for model in ("diffmm", "mf")}
    tables.write_table2("baby", "another note", results, baby)
    assert reproduce.main(["--table", "2", "--merge", f"{root},{baby}", "--sweep_dir", str(tmp_path / "m")]) == 0
    merged = (tmp_path / "m" / "comparison.tex").read_text()
    assert "TikTok" in merged and "Amazon-Baby" in merged and "a hand-made note another note" in merged
    one, both = tex_blocks((root / "comparison.tex").read_text()), tex_blocks(merged)
    for title, block in one.items():
        for label, cells in block.items():
            if label in ("MF-BPR", "DiffMM", "LightGCN"):
                assert both[title][label][:3] == cells, (title, label)
        assert both[title]["LightGCN"][3:] == ["--"] * 3                     # not run on baby
    assert both["Published"]["DiffMM"][3] == "\\textbf{0.0975}"              # DiffMM's published Baby Recall@20


@pytest.mark.slow
def test_comparison_tex_compiles_with_pdflatex(table, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-base)")
    root, _, _ = table
    shutil.copy(root / "comparison.tex", tmp_path / "comparison.tex")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "comparison.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "comparison.pdf").read_bytes()[:5] == b"%PDF-"
    log = (tmp_path / "comparison.log").read_text(errors="replace")
    assert "Float too large" not in log and "Overfull" not in log       # the table fits its page


def test_a_missing_per_user_file_is_a_note_not_a_failure(tmp_path):
    results = {model: {"setting": "default", "runs": [write_run(tmp_path / model / f"seed{s}", model, i)
                                                       for i, s in enumerate(SEEDS)]} for model in ("diffmm", "mf")}
    (results["mf"]["runs"][0] / run_folder.PER_USER["validation"]).unlink()
    text = tables.write_table2("tiktok", "note", results, tmp_path)
    with open(tmp_path / "comparison.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    mf = rows["mf"]
    assert mf["validation_protocol_Recall@20_wilcoxon_p"] == "" and mf["paper_protocol_Recall@20_wilcoxon_p"] != ""
    assert "no Wilcoxon test of diffmm against mf (validation protocol)" in text
    # the published Improv. is over the paper's best baseline held here, whether it ran or not (BM3 on TikTok)
    assert rows["diffmm"]["published_NDCG@20_best_other"] == "bm3"
    assert float(rows["diffmm"]["published_NDCG@20_improv_pct"]) == pytest.approx((0.0456 - 0.0404) / 0.0404 * 100)


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------

def captured(monkeypatch) -> list:
    """Make figures._save keep the figure instead of closing it; returns the list the figures go to."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path, rect=None: kept.append(fig) or Path(path))
    return kept


def test_sixteen_models_each_get_their_own_look(table, tmp_path, monkeypatch):
    root, _, _ = table
    runs = {f"model{j}": root / "diffmm" / "base" / "seed421" for j in range(16)}
    kept = captured(monkeypatch)
    figures.model_group_bars(runs, tmp_path / "groups.png")
    for ax in kept[0].axes:
        looks = [(tuple(np.round(c.patches[0].get_facecolor(), 3)), c.patches[0].get_hatch() or "")
                 for c in ax.containers]
        assert len(looks) == 16 and len(set(looks)) == 16
        assert len({color for color, _ in looks[:10]}) == 10        # the palette's colours first, all different
    plt.close("all")


def test_empty_groups_say_no_users(table, tmp_path, monkeypatch):
    root, _, _ = table
    kept = captured(monkeypatch)
    figures.model_group_bars({"diffmm": root / "diffmm" / "base" / "seed421",
                              "mf": root / "mf" / "base" / "seed421"}, tmp_path / "groups.png")
    figures.group_bars(root / "diffmm" / "base" / "seed421", tmp_path / "one.png")
    for fig in kept:
        for ax in fig.axes:
            labels = [t for t in ax.texts if t.get_text() == figures.NO_USERS]
            assert len(labels) == 2                                   # the groups 10-20 and 20-50 have no user
            ticks = {round(x, 6): t.get_text() for x, t in zip(ax.get_xticks(), ax.get_xticklabels())}
            assert sorted(ticks[round(t.get_position()[0], 6)].split("\n")[0] for t in labels) == ["10-20", "20-50"]
    plt.close("all")


def test_long_titles_are_wrapped_inside_the_figure():
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].set_title("a long axes title that runs well past the edge of the narrow axes it sits above")
    fig.suptitle("a figure title much longer than the figure is wide, which matplotlib alone would cut at both "
                  "edges of the image")
    fig.canvas.draw()
    assert fig._suptitle.get_window_extent().width > fig.bbox.width        # the test can fail: it is cut as is
    figures._wrap_titles(fig)
    fig.tight_layout()
    fig.canvas.draw()
    for text in (fig._suptitle, axes[0].title):
        box = text.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and "\n" in text.get_text()
    plt.close(fig)


def sweep_row(label: str) -> dict:
    stats = {f"{key}_{stat}": 0.1 for key in ("val_Recall@20", "test_Recall@20", "test_NDCG@20", "test_Precision@20")
             for stat in ("mean", "std")}
    return {"temp": label, "seeds": 1, "k": 20, "epoch_mean": 1.0, **stats}


def test_no_sweep_png_for_one_cell(tmp_path):
    written = tables.write_tables([sweep_row("0.1")], [], tmp_path / "one")
    assert not (tmp_path / "one" / "sweep.png").exists() and all(p.exists() for p in written)
    tables.write_tables([sweep_row("0.1"), sweep_row("0.5")], ["temp"], tmp_path / "two")
    assert (tmp_path / "two" / "sweep.png").is_file()


# ------------------------------------------------------------------------------------------------
# Figure 5's statistics, against loops over a hand-made case
# ------------------------------------------------------------------------------------------------

def test_case_study_stats_against_loops():
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    n_users, n_items = 5, 9
    features = rng.normal(size=(n_items, 4)) + 0.5
    train_sets = [{0, 1, 2}, {3}, {4, 5}, {1, 6, 7, 8}, {2}]
    generated = np.array([[3, 1], [3, 8], [4, 0], [0, 2], [2, 5]])   # some generated items are train items
    users = [u for u, s in enumerate(train_sets) for _ in s]
    items = [i for s in train_sets for i in sorted(s)]
    train = sp.csr_matrix((np.ones(len(items)), (users, items)), shape=(n_users, n_items))

    def expected(x, gen_rows):
        cos = lambda a, b: x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b])  # noqa: E731
        gen, rand, pct = [], [], []
        for u, items in enumerate(train_sets):
            unseen = [i for i in range(n_items) if i not in items]
            mean_to_u = {i: np.mean([cos(i, j) for j in items]) for i in range(n_items)}
            for g in gen_rows[u]:
                others = [j for j in items if j != g]
                if others:
                    gen.append(np.mean([cos(g, j) for j in others]))
                    rand.append(np.mean([mean_to_u[i] for i in unseen]))
                if g not in items:
                    rest = [mean_to_u[i] for i in unseen if i != g]
                    pct.append((sum(v < mean_to_u[g] for v in rest) + 0.5 * sum(v == mean_to_u[g] for v in rest))
                               / len(rest))
        return np.mean(gen), np.mean(rand), np.mean(pct)

    permuted = generated[np.random.default_rng(0).permutation(n_users)]   # "another user's", as documented
    assert (permuted != generated).any()
    for centre in (False, True):
        stats = figures.case_study_stats(generated, train, features, centre=centre, block=2)
        x = features - features.mean(0) if centre else features
        gen, rand, pct = expected(x, generated)
        assert stats["generated"] == pytest.approx(gen) and stats["random"] == pytest.approx(rand)
        assert stats["percentile"] == pytest.approx(pct)
        assert stats["percentile_shuffled"] == pytest.approx(expected(x, permuted)[2])
        assert stats["pairs"] == 8               # users 1 and 4 have no train item besides their generated 3, 2
    assert stats["in_train"] == pytest.approx(4 / 10)                # 1 of user 0, 3 of 1, 4 of 2, 2 of 4
    assert stats["distinct"] == 7 and stats["top_share"] == pytest.approx(2 / 10)
