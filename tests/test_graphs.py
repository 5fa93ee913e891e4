"""Utils/graphs.py: the pieces the per-model graph tests do not reach, each against dense numpy written here.

(DiffMM's graph: tests/test_data.py; MMRec's: tests/test_baselines.py; LATTICE's and the kNN graphs:
tests/test_item_graphs.py; MMSSL's one-sided pair: tests/test_mmssl.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from Utils.graphs import (binary, bipartite, coo_to_csr, edge_inverse_sqrt_degrees, row_normalized,
                          symmetric_edge_graph, symmetric_graph, symmetric_normalized)


def random_train(seed: int = 0, n_users: int = 9, n_items: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = (rng.random((n_users, n_items)) < 0.3) * rng.integers(1, 4, (n_users, n_items))   # values > 1 count as 1
    r[2] = 0                                                                                 # a user without items
    r[:, 4] = 0                                                                              # an item without users
    return r.astype(np.float64)


def dense_bipartite(r: np.ndarray, self_loops: bool) -> np.ndarray:
    u, i = r.shape
    a = np.zeros((u + i, u + i))
    a[:u, u:], a[u:, :u] = r != 0, (r != 0).T
    return a + np.eye(u + i) if self_loops else a


@pytest.mark.parametrize("self_loops", [False, True])
def test_bipartite_of_the_binary_train_matrix(self_loops):
    r = random_train()
    got = bipartite(binary(sp.csr_matrix(r)), self_loops=self_loops)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.toarray(), dense_bipartite(r, self_loops))


def test_symmetric_normalized_zeroes_the_rows_of_degree_zero():
    a = dense_bipartite(random_train(), self_loops=False)
    degree = a.sum(1)
    d = np.array([x ** -0.5 if x > 0 else 0.0 for x in degree])
    got = symmetric_normalized(sp.csr_matrix(a.astype(np.float32))).toarray()
    np.testing.assert_allclose(got, d[:, None] * a * d[None, :], rtol=1e-6)
    assert not got[2].any() and not got[9 + 4].any()                      # the isolated user and item


def test_row_normalized_with_eps_is_lgmrecs_mean_of_the_users_items():
    r = random_train()
    got = row_normalized(binary(sp.csr_matrix(r)), eps=1e-7).toarray()
    counts = (r != 0).sum(1)
    want = (r != 0) / (counts[:, None] + 1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not got[2].any()                                               # no items: a zero row, no NaN


@pytest.mark.parametrize("sort", [True, False])
def test_coo_to_csr_in_any_order(sort):
    rows, cols = torch.tensor([2, 0, 3, 0, 2]), torch.tensor([1, 4, 0, 2, 0])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    if not sort:   # given sorted row-major, as `coalesce` returns: taken as it is
        order = torch.argsort(rows * 5 + cols)
        rows, cols, values = rows[order], cols[order], values[order]
    csr = coo_to_csr((rows, cols, values), (4, 5), coalesced=not sort)
    want = np.zeros((4, 5))
    want[rows.numpy(), cols.numpy()] = values.numpy()
    np.testing.assert_array_equal(csr.to_dense().numpy(), want)
    assert csr.crow_indices().tolist() == [0, 2, 2, 4, 5]


def test_symmetric_edge_graph_is_mmrecs_graph_of_the_kept_edges():
    r = random_train(seed=3)
    users, items = (torch.from_numpy(x) for x in np.nonzero(r))
    n_users, n_items = r.shape
    # every edge: the host graph, to float rounding
    full = symmetric_edge_graph(users, items, n_users, n_items).to_dense().numpy()
    np.testing.assert_allclose(full, symmetric_graph(sp.csr_matrix(r)).toarray(), rtol=1e-6)
    # a subset: degrees counted over the kept edges only
    keep = torch.arange(len(users)) % 3 != 0
    kept = np.zeros_like(r)
    kept[users[keep].numpy(), items[keep].numpy()] = 1.0
    a = dense_bipartite(kept, self_loops=False)
    d = (a.sum(1) + 1e-7) ** -0.5
    got = symmetric_edge_graph(users[keep], items[keep], n_users, n_items).to_dense().numpy()
    np.testing.assert_allclose(got, d[:, None] * a * d[None, :], rtol=1e-6)
    values = edge_inverse_sqrt_degrees(users[keep], items[keep], n_users, n_items).numpy()
    np.testing.assert_allclose(values, (d[:n_users][users[keep]] * d[n_users:][items[keep]]), rtol=1e-6)
