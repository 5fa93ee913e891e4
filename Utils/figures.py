"""Figures of the paper's experiments from run folders (matplotlib, Agg backend, PNG).

    python -m Utils.figures RUN_DIR [RUN_DIR ...] [--out ablation.png] [--modality image] [--data_dir D]

For every run folder: `curves.png` (losses and val/test metrics per epoch, from metrics.jsonl),
`groups.png` (Figure 2: test metrics per user group, from summary.json) and `case_study.png`
(Figure 5: generated edges against item-item feature similarity, from generated_items.npz and the
dataset's feature file). With two or more run folders: one ablation bar chart (Table 3), bars
labelled by each run's --ablation. `Utils.sweep` draws its heatmap / lines with `sweep_figure`.
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

ABLATION_LABELS = {"none": "DiffMM", "no_cl": "w/o CL", "no_msi": "w/o MSI", "no_dm": "w/o DM"}


def _records(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run in {run_dir} has not finished")
    return json.loads(path.read_text())


def _topk(run_dir: Path, records: Sequence[dict]) -> int:
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        return int(json.loads(summary.read_text())["config"]["topk"])
    for r in records:
        if "test" in r:
            return int(next(k for k in r["test"] if k.startswith("Recall@")).split("@")[1])
    return 20


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_title(run_dir: Path) -> str:
    """'<model> on <data>, run <folder name>' from the run's configuration: no path of the machine it ran on."""
    run_dir = Path(run_dir)
    config = {}
    for line in (run_dir / "log.txt").read_text().splitlines()[:3] if (run_dir / "log.txt").is_file() else []:
        if "configuration: " in line:
            config = json.loads(line.split("configuration: ", 1)[1])
    if (run_dir / "summary.json").is_file():
        config = json.loads((run_dir / "summary.json").read_text()).get("config", config)
    return f"{config.get('model', 'diffmm')} on {config.get('data', '?')}, run {run_dir.name}"


def training_curves(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Losses (BPR, contrastive, total, generator per modality) and val/test Recall/NDCG@K per epoch."""
    run_dir = Path(run_dir)
    recs = _records(run_dir)
    k = _topk(run_dir, recs)
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
    return _save(fig, out or run_dir / "curves.png")


def group_bars(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Paper Figure 2: test Recall@K and NDCG@K per user group by number of train interactions."""
    run_dir = Path(run_dir)
    summary = _summary(run_dir)
    groups = (summary.get("groups") or {}).get("per_group")
    if not groups:
        raise ValueError(f"{run_dir / 'summary.json'} has no per-group metrics (a run from before --groups)")
    k = summary["config"]["topk"]
    names = list(groups)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("Recall", "NDCG")):
        values = [groups[g][f"{metric}@{k}"] or 0.0 for g in names]
        bars = ax.bar(names, values, color="tab:blue")
        for bar, g in zip(bars, names):
            ax.annotate(f"n={groups[g]['users']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set(title=f"test {metric}@{k} (epoch {summary['groups']['epoch']})",
               xlabel="train interactions per user", ylabel=f"{metric}@{k}")
    fig.suptitle(f"{run_title(run_dir)}: performance by user group (paper Figure 2)")
    return _save(fig, out or run_dir / "groups.png")


def ablation_bars(run_dirs: Sequence[Path], out: Path, protocol: str = "validation") -> Path:
    """Paper Table 3 as bars: test Recall@K and NDCG@K per --ablation (runs sharing one are averaged, ± std)."""
    by_label: Dict[str, List[dict]] = {}
    k = None
    for run_dir in run_dirs:
        summary = _summary(Path(run_dir))
        k = summary["config"]["topk"]
        label = ABLATION_LABELS.get(summary["config"].get("ablation", "none"), summary["config"].get("ablation"))
        by_label.setdefault(label, []).append(summary["protocols"][protocol]["test"])
    order = [v for v in ABLATION_LABELS.values() if v in by_label] + [v for v in by_label
                                                                       if v not in ABLATION_LABELS.values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("Recall", "NDCG")):
        values = [[t[f"{metric}@{k}"] for t in by_label[label]] for label in order]
        spread = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]  # sample std, as the sweep tables
        ax.bar(order, [np.mean(v) for v in values], yerr=spread if max(spread) > 0 else None, capsize=4,
               color=["tab:red" if label == "DiffMM" else "tab:gray" for label in order])
        ax.set(title=f"test {metric}@{k} ({protocol} protocol)", ylabel=f"{metric}@{k}")
    fig.suptitle("ablation (paper Table 3)")
    return _save(fig, out)


def model_group_bars(runs: Dict[str, Path], out: Path) -> Path:
    """Paper Figure 2 across models: test Recall@K and NDCG@K per user group, one bar per model.

    `runs` maps a label (the model) to its run folder; each run's groups are those of its validation
    protocol's epoch.
    """
    summaries = {label: _summary(Path(d)) for label, d in runs.items()}
    summaries = {label: s for label, s in summaries.items() if (s.get("groups") or {}).get("per_group")}
    if not summaries:
        raise ValueError("none of the runs has per-group metrics")
    first = next(iter(summaries.values()))
    k, names = first["config"]["topk"], list(first["groups"]["per_group"])
    width = 0.8 / len(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ("Recall", "NDCG")):
        for j, (label, summary) in enumerate(summaries.items()):
            groups = summary["groups"]["per_group"]
            ax.bar(np.arange(len(names)) + j * width, [groups[g][f"{metric}@{k}"] or 0.0 for g in names], width,
                   label=label)
        users = [first["groups"]["per_group"][g]["users"] for g in names]
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [f"{g}\n(n={n})" for g, n in zip(names, users)])
        ax.set(title=f"test {metric}@{k} (validation protocol)", xlabel="train interactions per user",
               ylabel=f"{metric}@{k}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{first['data']['name']}: performance by user group per model (paper Figure 2)")
    return _save(fig, out)


def _load_case_inputs(run_dir: Path, modality: Optional[str], data_dir: Optional[Path]):
    """(modality, generated U x k items, train CSR, raw item features) of a run folder."""
    from DataHandler import feature_files, load_features, load_matrix

    summary = _summary(run_dir)
    generated = np.load(run_dir / "generated_items.npz")
    if not generated.files:
        raise ValueError(f"{run_dir / 'generated_items.npz'} holds no generated graph (the run had no epoch)")
    modality = modality or generated.files[0]
    if modality not in generated.files:
        raise ValueError(f"no generated graph for modality {modality!r} in {run_dir} (has: {generated.files})")
    config = summary["config"]
    folder = Path(data_dir or config["data_dir"]) / config["data"]
    files = feature_files(folder)
    if modality not in files:
        raise FileNotFoundError(f"no {modality}_feat.npy in {folder}: pass --data_dir to the dataset folder's parent")
    train = load_matrix(folder / "trnMat.pkl")
    return modality, generated[modality], train, load_features(files[modality], train.shape[1])


def case_study(run_dir: Path, out: Optional[Path] = None, modality: Optional[str] = None, n_users: int = 3,
               max_items: int = 12, seed: int = 0, data_dir: Optional[Path] = None) -> Path:
    """Paper Figure 5: sampled users' generated and train items next to their items' feature similarity.

    Left: the sub-graph of `n_users` users sampled (with `seed`) among those with train items, over the
    union of their generated items (last epoch, generated_items.npz) and train items (at most
    `max_items`, generated first): cells mark train, generated or both. Right: the item-item cosine
    similarity of the modality's raw features. The title gives, over all users, the mean cosine
    similarity between a generated item and the user's train items, against a random item's.
    """
    run_dir = Path(run_dir)
    modality, generated, train, features = _load_case_inputs(run_dir, modality, data_dir)
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

    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sim = unit[items] @ unit[items].T
    # global check: generated items vs the user's train items, against a random item
    deg = np.diff(train.indptr)
    profile = (train @ unit) / np.maximum(deg, 1)[:, None]
    has = deg > 0
    gen_sim = float(np.mean(np.einsum("ukd,ud->uk", unit[generated[has]], profile[has])))
    rand_sim = float(np.mean(profile[has] @ unit.mean(0)))

    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(6 + 0.6 * len(items), 1.5 + 0.45 * len(items)),
                                     gridspec_kw={"width_ratios": [1, 1.2]})
    cmap = ListedColormap(["white", "lightgray", "tab:orange", "tab:red"])
    ax_g.imshow(kind, cmap=cmap, vmin=0, vmax=3, aspect="auto")
    ax_g.set_xticks(range(len(items)), [str(i) for i in items], rotation=90)
    ax_g.set_yticks(range(len(users)), [f"user {u}" for u in users])
    ax_g.set(title="gray: train, orange: generated, red: both", xlabel="item")
    im = ax_s.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
    ax_s.set_xticks(range(len(items)), [str(i) for i in items], rotation=90)
    ax_s.set_yticks(range(len(items)), [str(i) for i in items])
    if len(items) <= 12:
        for a in range(len(items)):
            for b in range(len(items)):
                ax_s.text(b, a, f"{sim[a, b]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax_s.set(title=f"{modality} feature cosine similarity")
    fig.colorbar(im, ax=ax_s, fraction=0.046)
    fig.suptitle(f"case study (paper Figure 5): mean cos(generated item, user's train items) {gen_sim:.3f} "
                 f"vs random item {rand_sim:.3f}", fontsize=9)
    return _save(fig, out or run_dir / "case_study.png")


def sweep_figure(rows: Sequence[dict], flags: Sequence[str], k: int, out: Path) -> Path:
    """Sweep results: lines for one swept flag, a heatmap for two, bars over the cells otherwise.

    `rows`: one per grid cell with the flag values (strings, in grid order) and 'test_Recall@K_mean',
    'test_Recall@K_std', 'test_NDCG@K_mean', ..., 'val_Recall@K_mean' (Utils.sweep.summarise).
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
    p.add_argument("run_dirs", nargs="+", type=Path, help="run folders (from Main.py or Utils.sweep)")
    p.add_argument("--out", type=Path, default=None,
                   help="ablation chart path when several folders are given (default: <parent of the first>/ablation.png)")
    p.add_argument("--modality", default=None, help="modality of the case study (default: the first generated)")
    p.add_argument("--data_dir", type=Path, default=None, help="dataset root, when not the one in the run's config")
    p.add_argument("--users", type=int, default=3, help="users sampled for the case study")
    p.add_argument("--seed", type=int, default=0, help="seed of the case study's user sample")
    args = p.parse_args(argv)
    failed = 0
    for run_dir in args.run_dirs:
        jobs = [("curves", lambda d=run_dir: training_curves(d)), ("groups", lambda d=run_dir: group_bars(d)),
                ("case study", lambda d=run_dir: case_study(d, modality=args.modality, n_users=args.users,
                                                             seed=args.seed, data_dir=args.data_dir))]
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
