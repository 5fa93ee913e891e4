"""Figures of the paper's experiments from run folders (matplotlib, Agg backend, PNG).

    python -m Utils.figures RUN_DIR [RUN_DIR ...] [--out ablation.png] [--modality image] [--data_dir D]
    python -m Utils.figures --case_stats [--centre] RUN_DIR [RUN_DIR ...]     # Figure 5's statistics only

For every run folder: `curves.png` (losses and val/test metrics per epoch, from metrics.jsonl),
`groups.png` (Figure 2: test metrics per user group, from summary.json) and `case_study.png`
(Figure 5: generated edges against item-item feature similarity, from generated_items.npz and the
dataset's feature file; `case_study_stats` over all users). With two or more run folders: one ablation
bar chart (Table 3), bars labelled by each run's --ablation. `Experiments.sweep` draws its heatmap /
lines with `sweep_figure`, Table 2 (`Experiments.reproduce`) its bars with `model_group_bars`. Every
model has its own colour (and a hatch past the palette), an empty user group says "no users", and
titles are wrapped to their width (docs/experiments.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from Utils import run_folder  # noqa: E402
from Utils.metrics import mean_std  # noqa: E402

ABLATION_LABELS = {"none": "DiffMM", "no_cl": "w/o CL", "no_msi": "w/o MSI", "no_dm": "w/o DM"}


# one colour per model from this palette, then the same colours again with a hatch (up to 10 x len(HATCHES) models)
PALETTE = list(plt.get_cmap("tab10").colors)
HATCHES = ("", "//", "..", "xx", "\\\\", "++")
NO_USERS = "no users"


def model_styles(labels: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """A distinct bar style per label: PALETTE's colours in order, and past the palette the same colours with a
    hatch, so that up to len(PALETTE) x len(HATCHES) models (60) never share a look."""
    return {label: {"color": PALETTE[j % len(PALETTE)], "hatch": HATCHES[(j // len(PALETTE)) % len(HATCHES)],
                    "edgecolor": "white" if j < len(PALETTE) else "black"}
            for j, label in enumerate(labels)}


def _wrap_titles(fig) -> None:
    """Wrap the figure's title and every axes' title to the width they have (an average glyph is about 0.6 of the
    font size wide), so that no title runs past the edge of the image and is cut."""
    import textwrap

    titles = [(fig._suptitle, fig.get_figwidth())] if getattr(fig, "_suptitle", None) is not None else []
    titles += [(ax.title, ax.get_position().width * fig.get_figwidth()) for ax in fig.axes]
    for text, inches in titles:
        chars = max(10, int(0.95 * inches * 72 / (0.6 * text.get_fontsize())))
        lines = [textwrap.fill(line, chars) if line else line for line in text.get_text().split("\n")]
        text.set_text("\n".join(lines))


def _save(fig, path: Path, rect: Optional[tuple] = None) -> Path:
    """Wrap the titles, lay out (inside `rect`, figure fractions, when something is placed outside the axes) and
    write the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _wrap_titles(fig)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_title(run_dir: Path) -> str:
    """'<model> on <data>, run <folder name>' from the run's configuration: no path of the machine it ran on."""
    run_dir = Path(run_dir)
    config = run_folder.title_config(run_dir)
    return f"{config.get('model', 'diffmm')} on {config.get('data', '?')}, run {run_dir.name}"


def training_curves(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Losses (BPR, contrastive, total, generator per modality) and val/test Recall/NDCG@K per epoch."""
    run_dir = Path(run_dir)
    recs = run_folder.read_metrics(run_dir)
    k = run_folder.topk(run_dir, recs)
    fig, (ax_loss, ax_gen, ax_metric) = plt.subplots(1, 3, figsize=(14, 4))
    epochs = [r["epoch"] for r in recs]
    for name in (recs[0].get("loss") or {}) if recs else ():
        ax_loss.plot(epochs, [r["loss"][name] for r in recs], marker=".", label=name)
    ax_loss.set(title="recommender loss", xlabel="epoch")
    if recs and recs[0].get("loss"):
        ax_loss.legend()
    for m in (recs[0].get("denoiser_loss") or {}) if recs else ():
        ax_gen.plot(epochs, [r["denoiser_loss"][m] for r in recs], marker=".", label=m)
    ax_gen.set(title="graph generator loss per modality", xlabel="epoch")
    if recs and recs[0].get("denoiser_loss"):
        ax_gen.legend()
    evaluated = [r for r in recs if "test" in r]
    for split, style in (("val", "--"), ("test", "-")):
        for metric in ("Recall", "NDCG"):
            ax_metric.plot([r["epoch"] for r in evaluated], [r[split][f"{metric}@{k}"] for r in evaluated],
                           style, marker=".", label=f"{split} {metric}@{k}")
    ax_metric.set(title="evaluation", xlabel="epoch")
    if evaluated:
        ax_metric.legend()
    fig.suptitle(run_title(run_dir))
    return _save(fig, out or run_dir / run_folder.CURVES)


def group_bars(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Paper Figure 2: test Recall@K and NDCG@K per user group by number of train interactions."""
    run_dir = Path(run_dir)
    summary = run_folder.read_summary(run_dir)
    groups = run_folder.user_groups(summary).get("per_group")
    if not groups:
        raise ValueError(f"{run_dir / run_folder.SUMMARY} has no per-group metrics (a run from before --groups)")
    k = run_folder.run_config(summary)["topk"]
    names = list(groups)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("Recall", "NDCG")):
        values = [groups[g][f"{metric}@{k}"] or 0.0 for g in names]
        bars = ax.bar(names, values, color="tab:blue")
        for bar, g in zip(bars, names):
            if groups[g]["users"]:  # an empty group says so upright instead (_label_empty_groups)
                ax.annotate(f"n={groups[g]['users']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        _label_empty_groups(ax, [groups[g]["users"] for g in names], np.arange(len(names)))
        ax.set(title=f"test {metric}@{k} (epoch {run_folder.user_groups(summary)['epoch']})",
               xlabel="train interactions per user", ylabel=f"{metric}@{k}")
    fig.suptitle(f"{run_title(run_dir)}: performance by user group (paper Figure 2)")
    return _save(fig, out or run_dir / run_folder.GROUPS)


def _label_empty_groups(ax, users: Sequence[int], positions: Sequence[float]) -> None:
    """Write NO_USERS, upright, where a group has no user: a bar of height 0 and an empty slot look the same."""
    for n, x in zip(users, positions):
        if not n:
            ax.text(x, 0.03, NO_USERS, transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
                    fontsize=9, color="dimgray")


def ablation_bars(run_dirs: Sequence[Path], out: Path, protocol: str = "validation") -> Path:
    """Paper Table 3 as bars: test Recall@K and NDCG@K per --ablation (runs sharing one are averaged, ± std)."""
    by_label: Dict[str, List[dict]] = {}
    k = None
    for run_dir in run_dirs:
        summary = run_folder.read_summary(Path(run_dir))
        config = run_folder.run_config(summary)
        k = config["topk"]
        label = ABLATION_LABELS.get(config.get("ablation", "none"), config.get("ablation"))
        by_label.setdefault(label, []).append(run_folder.protocol_metrics(summary, protocol))
    order = [v for v in ABLATION_LABELS.values() if v in by_label] + [v for v in by_label
                                                                       if v not in ABLATION_LABELS.values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("Recall", "NDCG")):
        values = [[t[f"{metric}@{k}"] for t in by_label[label]] for label in order]
        means, spread = zip(*(mean_std(v) for v in values))  # sample std, as the tables
        ax.bar(order, means, yerr=spread if max(spread) > 0 else None, capsize=4,
               color=["tab:red" if label == "DiffMM" else "tab:gray" for label in order])
        ax.set(title=f"test {metric}@{k} ({protocol} protocol)", ylabel=f"{metric}@{k}")
    fig.suptitle("ablation (paper Table 3)")
    return _save(fig, out)


def model_group_bars(runs: Dict[str, Path], out: Path) -> Path:
    """Paper Figure 2 across models: test Recall@K and NDCG@K per user group, one bar per model.

    `runs` maps a label (the model) to its run folder; each run's groups are those of its validation
    protocol's epoch.
    """
    summaries = {label: run_folder.read_summary(Path(d)) for label, d in runs.items()}
    summaries = {label: s for label, s in summaries.items() if run_folder.user_groups(s).get("per_group")}
    if not summaries:
        raise ValueError("none of the runs has per-group metrics")
    first = next(iter(summaries.values()))
    k, names = run_folder.run_config(first)["topk"], list(run_folder.user_groups(first)["per_group"])
    width = 0.8 / len(summaries)
    styles = model_styles(list(summaries))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric in zip(axes, ("Recall", "NDCG")):
        for j, (label, summary) in enumerate(summaries.items()):
            groups = run_folder.user_groups(summary)["per_group"]
            ax.bar(np.arange(len(names)) + j * width, [groups[g][f"{metric}@{k}"] or 0.0 for g in names], width,
                   label=label, linewidth=0.5, **styles[label])
        users = [run_folder.user_groups(first)["per_group"][g]["users"] for g in names]
        centres = np.arange(len(names)) + 0.4 - width / 2
        ax.set_xticks(centres, [f"{g}\n(n={n})" for g, n in zip(names, users)])
        _label_empty_groups(ax, users, centres)
        ax.set(title=f"test {metric}@{k} (validation protocol)", xlabel="train interactions per user",
               ylabel=f"{metric}@{k}")
    fig.suptitle(f"{run_folder.run_data(first)['name']}: performance by user group per model (paper Figure 2)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(8, len(summaries)), fontsize=8,
               frameon=False)
    return _save(fig, out, rect=(0, 0.06 * (1 + (len(summaries) - 1) // 8), 1, 1))  # room for the legend below


def _load_case_inputs(run_dir: Path, modality: Optional[str], data_dir: Optional[Path]):
    """(modality, generated U x k items, train CSR, raw item features) of a run folder, its dataset read in any
    layout Main.py reads (DataHandler.load_data: the run's --format, auto by default)."""
    from DataHandler import feature_files, load_data

    generated = np.load(run_dir / run_folder.GENERATED)
    if not generated.files:
        raise ValueError(f"{run_dir / run_folder.GENERATED} holds no generated graph (the run had no epoch)")
    modality = modality or generated.files[0]
    if modality not in generated.files:
        raise ValueError(f"no generated graph for modality {modality!r} in {run_dir} (has: {generated.files})")
    config = run_folder.read_config(run_dir)
    folder = Path(data_dir or config["data_dir"]) / config["data"]
    files = feature_files(folder)
    if modality not in files:
        raise FileNotFoundError(f"no {modality}_feat.npy in {folder}: pass --data_dir to the dataset folder's parent")
    data = load_data(config["data"], folder.parent, [modality], layout=config.get("format") or "auto")
    return modality, generated[modality], data.train, data.features[modality]


def _unit_rows(features: np.ndarray, centre: bool = False) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), after subtracting the mean row with `centre`."""
    x = features - features.mean(0) if centre else features
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def case_study_stats(generated: np.ndarray, train, features: np.ndarray, centre: bool = False,
                     block: int = 1024) -> Dict[str, float]:
    """Paper Figure 5's claim over all users: is a generated item like the user's other items in the modality?

    The paper (§3.7) reads its Figure 5 as: two items that are neighbours of one user in the generated graph have
    a high feature similarity, the highest or second highest among the items shown. Here, for every user u and each
    of its generated items g (generated_items.npz, U x k), with cos the cosine of the modality's raw features
    (`centre`: of the features minus their mean, which removes the component every item shares):

    - generated: mean over (u, g) of the mean cos(g, j) over u's train items j ≠ g (the pair g-g is never counted;
      pairs whose user has no other train item are left out);
    - random: the same for an item drawn uniformly from those u has not interacted with (its expectation,
      ((Σ_i x_i)·s_u − ‖s_u‖²) / ((I − d_u) d_u), s_u = Σ_{j∈train(u)} x_j), over the same pairs;
    - percentile: for g not in u's train items, the share of u's other unseen items less similar to u's items
      than g (ties count half): 0.5 is a random item, 1 the most similar one (the paper's "ranks the highest");
    - percentile_shuffled: the same with every user given another user's generated items (a permutation seeded
      0): what the percentile is when the item is not chosen for this user at all, so items that are close to
      every user's items in feature space do not pass for a user-specific choice;
    - in_train: share of generated items that are train items of their user; distinct: number of distinct
      generated items; top_share: share of the pairs that hold the most generated item.

    Users are scored in blocks of `block` (an items x block matrix at a time, never users x items).
    """
    unit = _unit_rows(np.asarray(features, dtype=np.float64), centre)
    n_users, n_items = train.shape
    gen = np.asarray(generated, dtype=np.int64).reshape(n_users, -1)
    deg = np.diff(train.indptr)
    sums = np.asarray(train @ unit)                                     # s_u
    rows = np.repeat(np.arange(n_users), gen.shape[1])
    in_train = (np.asarray(train[rows, gen.ravel()]).reshape(gen.shape) > 0)
    own = np.einsum("ukd,ud->uk", unit[gen], sums) - in_train * np.einsum("ukd,ukd->uk", unit[gen], unit[gen])
    others = deg[:, None] - in_train
    valid = others > 0
    unseen = n_items - deg
    rand_u = (sums @ unit.sum(0) - np.einsum("ud,ud->u", sums, sums)) / np.maximum(unseen * deg, 1)
    shuffled = gen[np.random.default_rng(0).permutation(n_users)]
    ranks: Dict[str, List[np.ndarray]] = {"percentile": [], "percentile_shuffled": []}
    for start in range(0, n_users, block):
        users = np.arange(start, min(start + block, n_users))
        sim = unit @ (sums[users] / np.maximum(deg[users], 1)[:, None]).T   # items x block: mean cos to u's items
        part = train[users].tocoo()
        sim[part.col, part.row] = np.nan                                    # u's train items are not candidates
        for name, items in (("percentile", gen[users]), ("percentile_shuffled", shuffled[users])):
            for g in items.T:
                mine = sim[g, np.arange(len(users))]                        # nan where g is a train item of u
                below = np.sum(sim < mine, axis=0) + 0.5 * (np.sum(sim == mine, axis=0) - 1)
                keep = ~np.isnan(mine) & (deg[users] > 0) & (unseen[users] > 1)
                ranks[name].append((below / np.maximum(unseen[users] - 1, 1))[keep])
    counts = np.bincount(gen.ravel(), minlength=n_items)
    return {"generated": float(((own / np.maximum(others, 1))[valid]).mean()) if valid.any() else float("nan"),
            "random": float(np.broadcast_to(rand_u[:, None], gen.shape)[valid].mean()) if valid.any() else float("nan"),
            **{name: float(np.concatenate(r).mean()) if sum(map(len, r)) else float("nan")
               for name, r in ranks.items()},
            "in_train": float(in_train.mean()), "distinct": int((counts > 0).sum()),
            "top_share": float(counts.max() / gen.size), "pairs": int(valid.sum())}


def case_study(run_dir: Path, out: Optional[Path] = None, modality: Optional[str] = None, n_users: int = 3,
               max_items: int = 12, seed: int = 0, data_dir: Optional[Path] = None, centre: bool = False) -> Path:
    """Paper Figure 5: sampled users' generated and train items next to their items' feature similarity.

    Left: the sub-graph of `n_users` users sampled (with `seed`) among those with train items, over the
    union of their generated items (last epoch, generated_items.npz) and train items (at most
    `max_items`, generated first): cells mark train, generated or both. Right: the item-item cosine
    similarity of the modality's raw features (`centre`: of the features minus their mean). The title gives
    `case_study_stats` over all users: a generated item's mean cosine similarity to the user's other items
    against a random unseen item's, and its percentile among the user's unseen items.
    """
    run_dir = Path(run_dir)
    modality, generated, train, features = _load_case_inputs(run_dir, modality, data_dir)
    stats = case_study_stats(generated, train, features, centre)
    rng = np.random.default_rng(seed)
    with_items = np.flatnonzero(np.diff(train.indptr) > 0)
    users = np.sort(rng.choice(with_items, size=min(n_users, len(with_items)), replace=False))
    items: List[int] = []
    for i in generated[users].ravel():  # generated items first, then the users' train items round-robin
        if int(i) not in items and len(items) < max_items:
            items.append(int(i))
    train_rows = [train.indices[train.indptr[u]:train.indptr[u + 1]] for u in users]
    for position in range(max(len(r) for r in train_rows)):
        for row in train_rows:
            if position < len(row) and int(row[position]) not in items and len(items) < max_items:
                items.append(int(row[position]))
    kind = np.zeros((len(users), len(items)), dtype=int)
    for r, u in enumerate(users):
        train_u = set(train.indices[train.indptr[u]:train.indptr[u + 1]].tolist())
        gen_u = set(int(i) for i in generated[u])
        for c, i in enumerate(items):
            kind[r, c] = (i in train_u) + 2 * (i in gen_u)

    unit = _unit_rows(features, centre)
    sim = unit[items] @ unit[items].T

    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(6 + 0.6 * len(items), 1.5 + 0.45 * len(items)),
                                     gridspec_kw={"width_ratios": [1, 1.2]})
    cmap = ListedColormap(["white", "lightgray", "tab:orange", "tab:red"])
    ax_g.imshow(kind, cmap=cmap, vmin=0, vmax=3, aspect="auto")
    ax_g.set_xticks(range(len(items)), [str(i) for i in items], rotation=90)
    ax_g.set_yticks(range(len(users)), [f"user {u}" for u in users])
    ax_g.set(title="gray: train, orange: generated, red: both", xlabel="item")
    # the colour scale spans the values shown: raw CNN features put most pairs within 0.7-1, which a -1..1 scale
    # paints one colour
    im = ax_s.imshow(sim, cmap="viridis", vmin=np.floor(sim.min() * 20) / 20, vmax=1)
    ax_s.set_xticks(range(len(items)), [str(i) for i in items], rotation=90)
    ax_s.set_yticks(range(len(items)), [str(i) for i in items])
    if len(items) <= 12:
        for a in range(len(items)):
            for b in range(len(items)):
                bright = im.norm(sim[a, b]) > 0.6  # viridis turns light: dark digits there
                ax_s.text(b, a, f"{sim[a, b]:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if bright else "white")
    ax_s.set(title=f"{modality} feature cosine similarity" + (" (centred)" if centre else ""))
    fig.colorbar(im, ax=ax_s, fraction=0.046)
    fig.suptitle(f"case study (paper Figure 5), all users: mean cos(generated item, user's other train items) "
                 f"{stats['generated']:.3f} vs a random unseen item {stats['random']:.3f}; the generated item's "
                 f"percentile among the user's unseen items {stats['percentile']:.2f} (0.5: random; another user's "
                 f"generated item: {stats['percentile_shuffled']:.2f}); "
                 f"{stats['distinct']} distinct generated items, the most common for {stats['top_share']:.0%} of "
                 f"users", fontsize=9)
    return _save(fig, out or run_dir / run_folder.CASE_STUDY)


def sweep_figure(rows: Sequence[dict], flags: Sequence[str], k: int, out: Path) -> Path:
    """Sweep results: lines for one swept flag, a heatmap for two, bars over the cells otherwise.

    `rows`: one per grid cell with the flag values (strings, in grid order) and 'test_Recall@K_mean',
    'test_Recall@K_std', 'test_NDCG@K_mean', ..., 'val_Recall@K_mean' (Experiments.tables.summarise).
    """
    metric = f"Recall@{k}"
    if len(flags) == 1:
        flag = flags[0]
        x = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, style in ((f"test_Recall@{k}", "-"), (f"test_NDCG@{k}", "-"), (f"val_Recall@{k}", "--")):
            ax.errorbar(x, [r[f"{key}_mean"] for r in rows], yerr=[r[f"{key}_std"] for r in rows], fmt=style,
                        marker="o", capsize=3, label=key)
        ax.set_xticks(x, [r[flag] for r in rows])
        ax.set(xlabel=flag, title=f"sweep of {flag} (mean ± std over seeds)")
        ax.legend()
    elif len(flags) == 2:
        a_vals = list(dict.fromkeys(r[flags[0]] for r in rows))
        b_vals = list(dict.fromkeys(r[flags[1]] for r in rows))
        grid = np.full((len(a_vals), len(b_vals)), np.nan)
        text = [["" for _ in b_vals] for _ in a_vals]
        for r in rows:
            i, j = a_vals.index(r[flags[0]]), b_vals.index(r[flags[1]])
            grid[i, j] = r[f"test_{metric}_mean"]
            spread = f"\n±{r[f'test_{metric}_std']:.4f}" if r["seeds"] > 1 else ""
            text[i][j] = f"{r[f'test_{metric}_mean']:.4f}{spread}"
        fig, ax = plt.subplots(figsize=(1.6 * len(b_vals) + 2.5, 1.0 * len(a_vals) + 1.8))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i in range(len(a_vals)):
            for j in range(len(b_vals)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(b_vals)), b_vals)
        ax.set_yticks(range(len(a_vals)), a_vals)
        ax.set(xlabel=flags[1], ylabel=flags[0], title=f"test {metric} (validation protocol, mean over seeds)")
        fig.colorbar(im, ax=ax)
    else:
        labels = [" ".join(f"{f}={r[f]}" for f in flags) or "base" for r in rows]
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 4))
        ax.bar(range(len(rows)), [r[f"test_{metric}_mean"] for r in rows],
               yerr=[r[f"test_{metric}_std"] for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right")
        ax.set(title=f"test {metric} (validation protocol, mean ± std over seeds)")
    return _save(fig, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Draw the paper-experiment figures of DiffMM run folders.")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run folders (from Main.py or Experiments.sweep)")
    p.add_argument("--out", type=Path, default=None,
                   help="ablation chart path when several folders are given "
                        "(default: <parent of the first>/ablation.png)")
    p.add_argument("--modality", default=None, help="modality of the case study (default: the first generated)")
    p.add_argument("--data_dir", type=Path, default=None, help="dataset root, when not the one in the run's config")
    p.add_argument("--users", type=int, default=3, help="users sampled for the case study")
    p.add_argument("--seed", type=int, default=0, help="seed of the case study's user sample")
    p.add_argument("--centre", action="store_true",
                   help="case study: cosine of the features minus their mean (the paper: of the raw features)")
    p.add_argument("--case_stats", action="store_true",
                   help="print the case study's statistics over all users (case_study_stats), one JSON line per run "
                        "and generated modality, and draw nothing")
    args = p.parse_args(argv)
    failed = 0
    if args.case_stats:
        for run_dir in args.run_dirs:
            for modality in ([args.modality] if args.modality else list(np.load(run_dir / run_folder.GENERATED).files)):
                modality, generated, train, features = _load_case_inputs(run_dir, modality, args.data_dir)
                print(json.dumps({"run": str(run_dir), "modality": modality, "centre": args.centre,
                                  **case_study_stats(generated, train, features, args.centre)}))
        return 0
    for run_dir in args.run_dirs:
        jobs = [("curves", lambda d=run_dir: training_curves(d)), ("groups", lambda d=run_dir: group_bars(d)),
                ("case study", lambda d=run_dir: case_study(d, modality=args.modality, n_users=args.users,
                                                             seed=args.seed, data_dir=args.data_dir,
                                                             centre=args.centre))]
        for name, job in jobs:
            try:
                print(f"wrote {job()}")
            except Exception as e:
                failed += 1
                print(f"{run_dir}: no {name} figure ({type(e).__name__}: {e})", file=sys.stderr)
    if len(args.run_dirs) > 1:
        out = args.out or args.run_dirs[0].parent / "ablation.png"
        try:
            print(f"wrote {ablation_bars(args.run_dirs, out)}")
        except Exception as e:
            failed += 1
            print(f"no ablation figure ({type(e).__name__}: {e})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
