"""All-rank Recall / Precision / NDCG against a brute-force numpy ranking."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from Utils.metrics import dot_scorer, evaluate, per_user_metrics, popularity_scores

CPU = torch.device("cpu")


def brute_force(scores: np.ndarray, train: np.ndarray, heldout: np.ndarray, topks):
    """Per-user metrics by an explicit loop: mask train items, sort, count hits."""
    per_user = {}
    users = []
    for u in range(scores.shape[0]):
        truth = set(np.flatnonzero(heldout[u]).tolist())
        if not truth:
            continue
        users.append(u)
        s = scores[u].astype(np.float64).copy()
        s[train[u] != 0] = -np.inf
        ranking = np.argsort(-s, kind="stable")
        for k in topks:
            top = ranking[:k].tolist()
            hits = [r for r, item in enumerate(top) if item in truth]
            dcg = sum(1.0 / math.log2(r + 2) for r in hits)
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(truth), k)))
            per_user.setdefault(f"Recall@{k}", []).append(len(hits) / len(truth))
            per_user.setdefault(f"Precision@{k}", []).append(len(hits) / k)
            per_user.setdefault(f"NDCG@{k}", []).append(dcg / idcg)
    return np.array(users), {name: np.array(v) for name, v in per_user.items()}


def make_case(U=26, I=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    train = np.zeros((U, I))
    heldout = np.zeros((U, I))
    for u in range(U):
        items = rng.permutation(I)
        n_train = int(rng.integers(0, 12))
        train[u, items[:n_train]] = 1
        n_held = [0, 1, 2, 3, 6][u % 5]              # users without held-out items are skipped
        heldout[u, items[n_train:n_train + n_held]] = 1
    user_vec = rng.normal(size=(U, d)).astype(np.float32)
    item_vec = rng.normal(size=(I, d)).astype(np.float32)
    # plant some hits so that the metrics are not all ~0
    for u in range(0, U, 3):
        for i in np.flatnonzero(heldout[u])[:2]:
            item_vec[i] += 0.3 * user_vec[u]
    return user_vec, item_vec, train, heldout


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [4, 256])
def test_per_user_metrics_brute_force(seed, batch):
    user_vec, item_vec, train, heldout = make_case(seed=seed)
    topks = [1, 3, 5, 10, 20]
    scores = user_vec.astype(np.float64) @ item_vec.astype(np.float64).T
    ref_users, ref = brute_force(scores, train, heldout, topks)
    users, got = per_user_metrics(dot_scorer(torch.from_numpy(user_vec), torch.from_numpy(item_vec)),
                                  sp.csr_matrix(train), sp.csr_matrix(heldout), topks, batch, CPU)
    np.testing.assert_array_equal(users, ref_users)
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert ref["Recall@20"].mean() > 0.1   # the case is not degenerate


def test_evaluate_averages_over_users_with_heldout_items():
    user_vec, item_vec, train, heldout = make_case(seed=5)
    topks = [2, 10, 20]
    scores = user_vec.astype(np.float64) @ item_vec.astype(np.float64).T
    ref_users, ref = brute_force(scores, train, heldout, topks)
    assert len(ref_users) < train.shape[0]
    got = evaluate(dot_scorer(torch.from_numpy(user_vec), torch.from_numpy(item_vec)), sp.csr_matrix(train),
                   sp.csr_matrix(heldout), topks, 7, CPU)
    assert set(got) == {f"{m}@{k}" for m in ("Recall", "Precision", "NDCG") for k in topks}
    for name, values in ref.items():
        assert got[name] == pytest.approx(values.mean(), rel=1e-6, abs=1e-9), name


def test_perfect_and_worst_rankings():
    # user 0 holds out items 0 and 1; the scores put them first, then last
    train = np.zeros((1, 6))
    train[0, 5] = 1
    heldout = np.zeros((1, 6))
    heldout[0, [0, 1]] = 1
    user = torch.ones(1, 1)
    best = evaluate(dot_scorer(user, torch.tensor([[6.0], [5], [4], [3], [2], [100]])), sp.csr_matrix(train),
                    sp.csr_matrix(heldout), [1, 2, 4], 8, CPU)
    # the train item 5 has the top score but is masked
    assert best["Recall@1"] == pytest.approx(0.5) and best["Precision@1"] == pytest.approx(1.0)
    assert best["NDCG@1"] == pytest.approx(1.0) and best["NDCG@2"] == pytest.approx(1.0)
    assert best["Recall@2"] == pytest.approx(1.0) and best["Precision@4"] == pytest.approx(0.5)
    worst = evaluate(dot_scorer(user, torch.tensor([[1.0], [2], [3], [4], [5], [0]])), sp.csr_matrix(train),
                     sp.csr_matrix(heldout), [2, 4], 8, CPU)
    assert worst["Recall@2"] == 0.0
    # ranking 4, 3, 2, 1, 0 (item 5 masked): item 1 hits at 0-based rank 3, item 0 is 5th
    assert worst["Recall@4"] == pytest.approx(0.5)
    assert worst["NDCG@4"] == pytest.approx((1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_popularity_scores_rank_by_train_counts():
    rng = np.random.default_rng(0)
    U, I = 30, 12
    # distinct item counts: item i is liked by i+1 users (no ties)
    train = np.zeros((U, I))
    for i in range(I):
        train[rng.choice(U, size=i + 1, replace=False), i] = 1
    heldout = np.zeros((U, I))
    for u in range(U):
        free = np.flatnonzero(train[u] == 0)
        heldout[u, rng.choice(free, size=min(2, len(free)), replace=False)] = 1
    user_vec, item_vec = popularity_scores(sp.csr_matrix(train), CPU)
    scores = (user_vec @ item_vec.T).numpy()
    counts = train.sum(0)
    for u in range(U):
        np.testing.assert_array_equal(scores[u], counts)
    _, ref = brute_force(np.tile(counts, (U, 1)), train, heldout, [3, 5])
    got = evaluate(dot_scorer(user_vec, item_vec), sp.csr_matrix(train), sp.csr_matrix(heldout), [3, 5], 256, CPU)
    for name, values in ref.items():
        assert got[name] == pytest.approx(values.mean(), rel=1e-6), name
