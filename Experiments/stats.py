"""Table 2's statistics: DiffMM's Improv. over the best other model, and its paired tests against each model (a
t-test over seeds, a Wilcoxon signed-rank test over test users), each tested against its formula in
tests/test_table2.py (docs/experiments.md, "The statistics")."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from Experiments.paper import METRICS, PUBLISHED, PUBLISHED_IN, REFERENCE

ALPHA = 0.05          # a cell is marked where p < ALPHA
PROTOCOLS = ("paper", "validation")
TESTS = {"ttest": ("*", "$^{*}$"), "wilcoxon": ("†", "$^{\\dagger}$")}  # its mark in comparison.md, .tex


def protocol_key(protocol: str, metric: str, k: int) -> str:
    """A row's field of our test metric under a protocol: its values over seeds, and the prefix of its tests'."""
    return f"{protocol}_protocol_{metric}@{k}"


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


def per_user(run_dir: Path, protocol: str) -> Optional[Dict[str, np.ndarray]]:
    """The run's per-user test metrics at its protocol's epoch in summary.json; None for a run from before
    per_user_<protocol>.npz existed, or a file of another epoch."""
    from Utils import run_folder

    arrays = run_folder.read_per_user(run_dir, protocol)
    chosen = run_folder.best_epoch(run_folder.read_summary(run_dir), protocol)
    return arrays if arrays is not None and arrays["epoch"] == chosen else None


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
    mine = {p: per_user(runs[reference][0], p) for p in PROTOCOLS}
    for row in others:
        paired = first_seed in row["seed_list"]
        run_dir = runs[row["model"]][row["seed_list"].index(first_seed)] if paired else None
        for protocol in PROTOCOLS:
            theirs = per_user(run_dir, protocol) if paired else None
            if mine[protocol] is not None and theirs is not None:
                common, i, j = np.intersect1d(mine[protocol]["users"], theirs["users"], return_indices=True)
            else:
                notes.append(f"no Wilcoxon test of {reference} against {row['model']} ({protocol} protocol): no "
                             f"per-user test metrics at the protocol's epoch of seed {first_seed} for both "
                             f"(per_user_{protocol}.npz; runs from before it have none)")
            for metric in METRICS:
                key = protocol_key(protocol, metric, k)
                theirs_by_seed = dict(zip(row["seed_list"], row[key]))
                seeds = [s for s in ref["seed_list"] if s in theirs_by_seed]
                row[f"{key}_ttest_p"] = paired_t_p([dict(zip(ref["seed_list"], ref[key]))[s] for s in seeds],
                                                   [theirs_by_seed[s] for s in seeds])
                row[f"{key}_wilcoxon_p"] = (wilcoxon_p(mine[protocol][f"{metric}@{k}"][i], theirs[f"{metric}@{k}"][j])
                                            if mine[protocol] is not None and theirs is not None else None)
    for protocol in PROTOCOLS:
        for metric in METRICS:
            key = protocol_key(protocol, metric, k)
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


def marks(row: dict, key: str, tex: bool = False) -> str:
    """The marks of the tests by which the reference model differs from this row's model (p < ALPHA)."""
    return "".join(mark[tex] for test, mark in TESTS.items()
                   if row.get(f"{key}_{test}_p") is not None and row[f"{key}_{test}_p"] < ALPHA)

