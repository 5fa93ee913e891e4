"""All-rank top-K evaluation: Recall, Precision and NDCG per user, batched on the device.

Every item is scored for every evaluated user, the user's train items are excluded, and metrics are
averaged over the users with at least one held-out item (as DiffMM's code evaluates). `--eval_users mmrec`
also drops the users without a train item, as MMRec does (its dataset.py split(), filter_out_cod_start_users).
Over several runs (seeds), a metric's spread is `mean_std`, the one definition the tables and figures share.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from Utils.batches import DeviceRows

METRICS = ("Recall", "NDCG", "Precision")
Scorer = Callable[[torch.Tensor], torch.Tensor]


def dot_scorer(user_vec: torch.Tensor, item_vec: torch.Tensor) -> Scorer:
    """Scores of a batch of users over all items as dot products of their vectors."""
    user_vec, item_vec = user_vec.float(), item_vec.float()
    return lambda users: user_vec[users] @ item_vec.T


EVAL_USERS = ("all", "mmrec")


def evaluated_users(heldout: sp.csr_matrix, train: Optional[sp.csr_matrix] = None, rule: str = "all") -> np.ndarray:
    """The users averaged over: those with at least one held-out item ('all', DiffMM's code); 'mmrec' keeps
    only those of them with at least one train item too (MMRec drops val/test users unseen in train)."""
    keep = np.diff(heldout.indptr) > 0
    if rule == "mmrec":
        keep &= np.diff(train.indptr) > 0
    elif rule != "all":
        raise ValueError(f"unknown evaluation user rule {rule!r}: expected one of {EVAL_USERS}")
    return np.flatnonzero(keep)


def hit_metrics(hits: torch.Tensor, n_heldout: torch.Tensor, topks: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Per-user metrics from the hit matrix (users x max K, 1 where the ranked item is held out).

    Recall@K = hits/|held-out|, Precision@K = hits/K,
    NDCG@K = Σ_hits 1/log2(rank+2) / Σ_{r < min(|held-out|, K)} 1/log2(r+2).
    """
    discount = 1.0 / torch.log2(torch.arange(hits.shape[1], device=hits.device, dtype=torch.float32) + 2.0)
    ideal = torch.cumsum(discount, 0)
    out = {}
    for k in topks:
        top_hits = hits[:, :k]
        n_hits = top_hits.sum(1)
        out[f"Recall@{k}"] = n_hits / n_heldout
        out[f"Precision@{k}"] = n_hits / k
        out[f"NDCG@{k}"] = (top_hits * discount[:k]).sum(1) / ideal[(n_heldout.clamp(max=k) - 1).long()]
    return out


@torch.no_grad()
def per_user_metrics(score: Scorer, train: sp.csr_matrix, heldout: sp.csr_matrix, topks: Sequence[int],
                     batch: int, device: torch.device, eval_users: str = "all"
                     ) -> tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Score every item for every evaluated user, exclude train items, rank, and compute metrics.

    `score(users)` gives a batch of users' scores over all items. Returns the evaluated users (chosen by
    `eval_users`, see evaluated_users) and, per metric name ('Recall@20', ...), one value per such user.
    """
    users = evaluated_users(heldout, train, eval_users)
    k_max = min(max(topks), train.shape[1])
    # Results go into buffers allocated once: small per-batch tensors kept alive between the large
    # batch x items ones fragment the CPU heap (+4 GB over 140k users of a 50k-item dataset).
    names = [f"{metric}@{k}" for k in topks for metric in ("Recall", "Precision", "NDCG")]
    out = {name: torch.empty(len(users), device=device) for name in names}
    # the users and both matrices cross to the device once, so that no batch waits on a host round trip
    device_users = torch.from_numpy(users).to(device)
    train_rows, heldout_rows = DeviceRows(train, device), DeviceRows(heldout, device)
    for start in range(0, len(users), batch):
        rows = device_users[start:start + batch]
        scores = score(rows).float()
        scores = scores.masked_fill(train_rows.dense(rows) > 0, float("-inf"))
        top = torch.topk(scores, k_max, dim=1).indices
        truth = heldout_rows.dense(rows)
        hits = torch.gather(truth, 1, top)
        for name, value in hit_metrics(hits, truth.sum(1), topks).items():
            out[name][start:start + len(rows)] = value
    return users, {name: values.cpu().numpy() for name, values in out.items()}


def evaluate(score: Scorer, train: sp.csr_matrix, heldout: sp.csr_matrix, topks: Sequence[int], batch: int,
             device: torch.device, eval_users: str = "all") -> Dict[str, float]:
    """Mean of every metric over the evaluated users (at least one held-out item; see evaluated_users)."""
    _, values = per_user_metrics(score, train, heldout, topks, batch, device, eval_users)
    return {name: float(v.mean()) for name, v in values.items()}


def popularity_scores(train: sp.csr_matrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(user, item) vectors whose dot product ranks items by their number of train interactions."""
    counts = np.asarray(train.sum(axis=0), dtype=np.float32).reshape(-1, 1)
    return torch.ones(train.shape[0], 1, device=device), torch.from_numpy(counts).to(device)


def group_name(edges: Sequence[int], index: int) -> str:
    """'0-5', '5-10', ..., '50+' for the group [edges[index], edges[index+1])."""
    low = edges[index]
    return f"{low}-{edges[index + 1]}" if index + 1 < len(edges) else f"{low}+"


def group_metrics(train_counts: np.ndarray, values: Dict[str, np.ndarray], edges: Sequence[int]
                  ) -> Dict[str, Dict[str, object]]:
    """Mean of every per-user metric within each group of users by number of train interactions.

    `train_counts[j]` is the number of train items of the j-th evaluated user (aligned with `values`);
    group g holds the users with edges[g] <= count < edges[g+1] (the last group is open-ended), so with
    edges[0] = 0 the groups partition the evaluated users. Each group: {'users': n, metric: mean or None}.
    """
    out: Dict[str, Dict[str, object]] = {}
    for g, low in enumerate(edges):
        high = edges[g + 1] if g + 1 < len(edges) else np.inf
        mask = (train_counts >= low) & (train_counts < high)
        n = int(mask.sum())
        out[group_name(edges, g)] = {"users": n, **{name: (float(v[mask].mean()) if n else None)
                                                    for name, v in values.items()}}
    return out


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """The mean of a metric over seeds and its sample standard deviation (n − 1), 0.0 for one seed."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
