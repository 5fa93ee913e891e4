"""Every graph the models build, in one place: the user-item graph and its normalisations, edge dropout,
COO to CSR, and the item-item kNN graphs.

Three normalisations of the user-item graph are in use, each the one its authors' code computes:
- DiffMM's (`normalized_graph`): Â = D^-1/2 (A + I) D^-1/2, self-loops included (HKUDS/DiffMM at fae20e6,
  DataHandler.py:38-52, and Main.py:96-104 for the generated graphs); DiffMM and MDMNS.
- MMRec's (`symmetric_graph`): Â = D^-1/2 A D^-1/2 with D = row sums + 1e-7, no self-loops (enoche/MMRec at
  e775373, src/models/lightgcn.py:65-101); LightGCN, BM3, FREEDOM, LGMRec. FREEDOM's pruned graph is the same
  normalisation of a subset of the edges, built on the device (`symmetric_edge_graph`).
- LATTICE's (`row_normalized_graph`): P = D^-1 (A + I), not symmetric (MMRec src/models/lattice.py:100-122).
- MMSSL's one-sided pair (`one_sided_graphs`): D_u^-1/2 R and D_i^-1/2 Rᵀ (HKUDS/MMSSL at f8d8955,
  MMSSL/main.py:89-103).
A = [[0, R], [Rᵀ, 0]] throughout, R the binary U x I matrix (`bipartite`). The host graphs are scipy CSR
matrices (float32), turned into device graphs by `Utils.layers.Graph`; the device graphs are COO triples
`(rows, cols, values)` of tensors, whose values may carry gradient (LATTICE's learned item graph).

Item-item kNN graphs (LATTICE, FREEDOM): MMRec builds them densely (src/utils/utils.py:119-137,
src/models/freedom.py:79-100): cos(X) is an I x I matrix, `torch.topk` keeps the k largest entries of each row
(the item itself included, cos = 1), the rest is zero, and the normalisation sums rows of that matrix. Here
no I x I matrix ever exists: a block of `chunk` rows of cos(X) is formed at a time, `torch.topk` runs on each
of its rows, and only the k kept values and their columns stay. A row block of X̂X̂ᵀ is not always
bit-identical to the same rows of the full product (the matrix-multiply kernel may sum in another order:
differences in the last bits, 2.4e-7 measured), so where two cosines of a row are that close (a near-tie at
the k-th place) the block may keep another column than a dense topk would; exact ties (equal values in both)
are broken the same way as on the full row (tested). Row sums over the kept values equal the dense row sums
to float rounding, because every other entry of the dense matrix is zero.

Two functions compute D^-1/2 S D^-1/2 on purpose: `symmetric_normalized` on the host (scipy, the user-item
graphs, built once) and `symnorm` on the device (torch, differentiable in the values: LATTICE's learned graph
is normalised at every rebuild). Each keeps the float arithmetic its callers were measured with.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from Utils.layers import Graph

Coo = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # rows, cols, values
GraphPair = Tuple[Graph, Graph]   # (U x I user-side graph, I x U item-side graph)

# elements of one chunk x I block of cos(X): 2^24 float32 = 64 MB (Sports, 18,357 items: 914 rows a block)
BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# The user-item graph on the host (scipy)
# ---------------------------------------------------------------------------------------------

def interactions(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """R: the binary U x I float32 matrix of the (user, item) pairs; a pair listed twice counts once."""
    r = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items))
    r.sum_duplicates()
    r.data[:] = 1.0
    return r


def binary(matrix: sp.spmatrix) -> sp.csr_matrix:
    """R: 1.0 (float32) wherever `matrix` stores a non-zero (the train matrix, whatever its values)."""
    return sp.csr_matrix((matrix != 0).astype(np.float32))


def bipartite(r: sp.spmatrix, self_loops: bool = False) -> sp.csr_matrix:
    """A = [[0, R], [Rᵀ, 0]], (U+I) x (U+I) float32 CSR, plus the identity with `self_loops`."""
    a = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    if self_loops:
        a = a + sp.identity(a.shape[0], np.float32, "csr")
    return a


def symmetric_normalized(a: sp.spmatrix, eps: float = 0.0) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 with D = row sums of A + eps; a row of degree 0 gets 0 (float32 CSR)."""
    degree = np.asarray(a.sum(axis=1)).ravel() + eps
    with np.errstate(divide="ignore"):
        d_inv_sqrt = np.where(degree > 0, degree ** -0.5, 0.0).astype(np.float32)
    d = sp.diags(d_inv_sqrt)
    return (d @ a @ d).tocsr().astype(np.float32)


def row_normalized(a: sp.spmatrix, eps: float = 0.0) -> sp.csr_matrix:
    """D^-1 A with D = row sums of A + eps (every row of the result sums to 1, or to 0 where A's row is empty
    and eps > 0)."""
    d_inv = (1.0 / (np.asarray(a.sum(axis=1)).ravel() + eps)).astype(np.float32)
    return (sp.diags(d_inv) @ a).tocsr().astype(np.float32)


def normalized_graph(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """DiffMM's Â = D^-1/2 (A + I) D^-1/2 of the (user, item) pairs (the paper's normalised adjacency; HKUDS/DiffMM
    at fae20e6, DataHandler.py:38-52 for the train graph, Main.py:96-104 for the generated ones).

    Duplicate pairs count once; every node has its self-loop, so no degree is 0. Symmetric, float32 CSR.
    """
    return symmetric_normalized(bipartite(interactions(users, items, n_users, n_items), self_loops=True))


def symmetric_graph(train: sp.spmatrix) -> sp.csr_matrix:
    """MMRec's Â = D^-1/2 A D^-1/2 of the train matrix, **no self-loops**, D = row sums + 1e-7 (enoche/MMRec at
    e775373, src/models/lightgcn.py:65-101; the same in bm3.py, freedom.py, lgmrec.py). Not DiffMM's `adj`."""
    return symmetric_normalized(bipartite(binary(train)), eps=1e-7)


def row_normalized_graph(train: sp.spmatrix) -> sp.csr_matrix:
    """LATTICE's P = D^-1 (A + I), D the row sums of A + I (enoche/MMRec at e775373, src/models/lattice.py:100-122;
    LATTICE-official codes/utility/load_data.py:145). Every row sum is >= 1 (the self-loop)."""
    return row_normalized(bipartite(binary(train), self_loops=True))


def drop_edges(graph: sp.csr_matrix, keep_rate: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep each stored entry (self-loops included) with probability keep_rate, scaling kept ones by 1/keep_rate
    (DiffMM's `SpAdjDropEdge`, HKUDS/DiffMM at fae20e6, Model.py:222-235); keep_rate >= 1 returns `graph`."""
    if keep_rate >= 1.0:
        return graph
    coo = graph.tocoo()
    keep = rng.random(coo.nnz) < keep_rate
    return sp.csr_matrix((coo.data[keep] / keep_rate, (coo.row[keep], coo.col[keep])), shape=graph.shape)


# ---------------------------------------------------------------------------------------------
# Graphs on the device (torch COO triples), differentiable in their values
# ---------------------------------------------------------------------------------------------

def coalesce(graph: Coo, n: int) -> Coo:
    """Duplicate (row, col) entries summed, sorted row-major (n = the number of columns); differentiable in the
    values (an index_add)."""
    rows, cols, values = graph
    keys, slot = torch.unique(rows * n + cols, return_inverse=True)
    summed = torch.zeros(len(keys), dtype=values.dtype, device=values.device).index_add(0, slot, values)
    return keys // n, keys % n, summed


def coo_to_csr(graph: Coo, shape: Tuple[int, int], coalesced: bool = False) -> torch.Tensor:
    """COO entries (each (row, col) at most once) as a torch CSR matrix; `torch.sparse.mm(csr, X)` back-propagates
    to the values. `coalesced`: the entries are already sorted row-major (`coalesce`'s result), else sorted here."""
    rows, cols, values = graph
    if not coalesced:
        order = torch.argsort(rows * shape[1] + cols)
        rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    return torch.sparse_csr_tensor(crow, cols, values, size=shape, check_invariants=False)


def to_scipy(graph: Coo, n: int) -> sp.csr_matrix:
    """An n x n graph as a float32 scipy CSR matrix (duplicates summed), e.g. for `Utils.layers.Graph`."""
    rows, cols, values = (t.detach().cpu().numpy() for t in graph)
    return sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=(n, n))


def symnorm(graph: Coo, n: int, eps: float = 0.0) -> Coo:
    """D^-1/2 S D^-1/2 with D = row sums (+ eps) over the kept values; inf -> 0 (MMRec's
    `compute_normalized_laplacian`, src/utils/utils.py:131-137).

    S need not be symmetric: column j is scaled by row j's sum, as the dense `diag @ S @ diag`.
    FREEDOM's binary graph adds eps = 1e-7 to the row sums (`freedom.py:95`), LATTICE adds nothing.
    """
    rows, cols, values = graph
    degree = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values) + eps
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt = torch.where(torch.isinf(inv_sqrt), torch.zeros_like(inv_sqrt), inv_sqrt)
    return rows, cols, inv_sqrt[rows] * values * inv_sqrt[cols]


def weighted_sum(graphs: Sequence[Coo], weights: Sequence) -> Coo:
    """Σ_m w_m S_m on the union of the patterns (concatenated; duplicates add up, see `coalesce`)."""
    rows = torch.cat([g[0] for g in graphs])
    cols = torch.cat([g[1] for g in graphs])
    values = torch.cat([w * g[2] for g, w in zip(graphs, weights)])
    return rows, cols, values


def edge_inverse_sqrt_degrees(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int
                              ) -> torch.Tensor:
    """1/√((d_u + 1e-7)(d_i + 1e-7)) per edge, degrees counted over the given edges (MMRec's `_normalize_adj_m`,
    src/models/freedom.py:145-154): the entries of `symmetric_graph` restricted to these edges."""
    d_user = torch.bincount(users, minlength=n_users).float() + 1e-7
    d_item = torch.bincount(items, minlength=n_items).float() + 1e-7
    return d_user[users].pow(-0.5) * d_item[items].pow(-0.5)


def symmetric_edge_graph(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, plain: bool = False
                         ) -> Graph:
    """MMRec's Â_sym (no self-loops, degrees + 1e-7) of a subset of the train edges, both directions, built on
    the edges' device (FREEDOM's pruned graph, src/models/freedom.py:128-143); symmetric, so its own transpose."""
    values = edge_inverse_sqrt_degrees(users, items, n_users, n_items)
    items = items + n_users
    coo = (torch.cat([users, items]), torch.cat([items, users]), torch.cat([values, values]))
    n = n_users + n_items
    return Graph.from_tensors(coo_to_csr(coalesce(coo, n), (n, n), coalesced=True), plain=plain)


def one_sided_graphs(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, plain: bool = False
                     ) -> GraphPair:
    """MMSSL's G_u = D_u^-1/2 A (U x I) and G_i = D_i^-1/2 Aᵀ (I x U), A = counts of the (user, item) pairs
    (repeats summed), D = row sums + 1e-8 (the authors' csr_norm(mean_flag=True), HKUDS/MMSSL at f8d8955,
    MMSSL/main.py:89-103; the same for its generated graphs). Built with tensor ops on the pairs' device."""
    keys, counts = torch.unique(users * n_items + items, return_counts=True)
    rows, cols, weight = keys // n_items, keys % n_items, counts.float()
    user_degree = torch.zeros(n_users, device=weight.device).index_add_(0, rows, weight) + 1e-8
    item_degree = torch.zeros(n_items, device=weight.device).index_add_(0, cols, weight) + 1e-8
    user_values = weight * user_degree[rows].pow(-0.5)
    item_values = weight * item_degree[cols].pow(-0.5)
    user_graph = Graph.from_tensors(coo_to_csr((rows, cols, user_values), (n_users, n_items)),
                                    coo_to_csr((cols, rows, user_values), (n_items, n_users)), plain)
    item_graph = Graph.from_tensors(coo_to_csr((cols, rows, item_values), (n_items, n_users)),
                                    coo_to_csr((rows, cols, item_values), (n_users, n_items)), plain)
    return user_graph, item_graph


# ---------------------------------------------------------------------------------------------
# Item-item kNN graphs of features (LATTICE, FREEDOM), in row blocks
# ---------------------------------------------------------------------------------------------

def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """X̂ = X / ‖X‖₂ per row (MMRec's `build_sim` divides by the norm; an all-zero row, NaN there, is 0 here)."""
    return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min(1e-12)


def default_chunk(n_items: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(n_items, 1))


@torch.no_grad()
def cosine_topk(features: torch.Tensor, k: int, chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of every row of cos(X) = X̂ X̂ᵀ: (values, columns), each I x k, without gradient.

    Row block by row block (`chunk` rows of I columns each); per row the same `torch.topk` as on the
    dense matrix (MMRec's `build_knn_neighbourhood`, `get_knn_adj_mat`), so the same columns are kept, up to
    near-ties that the block's last-bit rounding may order differently (module docstring).
    """
    normed = unit_rows(features.float())
    n = normed.shape[0]
    chunk = chunk or default_chunk(n)
    values, columns = [], []
    with torch.autocast(normed.device.type, enabled=False):   # fp32 cosines under --precision bf16 too
        for start in range(0, n, chunk):
            block = normed[start:start + chunk] @ normed.T
            top_values, top_columns = torch.topk(block, k, dim=-1)
            values.append(top_values)
            columns.append(top_columns)
    return torch.cat(values), torch.cat(columns)


def gathered_cosine(features: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """cos(x_i, x_j) for every kept pair (i, columns[i, :]): I x k, differentiable in `features`.

    The same values (to float rounding) and the same gradient as the kept entries of the dense
    `build_sim` + `build_knn_neighbourhood`, whose backward reaches X only through the kept entries.
    """
    normed = unit_rows(features.float())
    return (normed[:, None, :] * normed[columns]).sum(-1)


def knn_coo(values: torch.Tensor, columns: torch.Tensor) -> Coo:
    """The I x I kNN graph as COO: row i holds values[i] at columns[i] (the order of `torch.topk`'s result)."""
    rows = torch.arange(columns.shape[0], device=columns.device).repeat_interleave(columns.shape[1])
    return rows, columns.reshape(-1), values.reshape(-1)
