"""Item-item kNN graphs from item features, built in row chunks and kept sparse (LATTICE, FREEDOM).

MMRec builds these graphs densely (`utils/utils.py:119-137`, `models/freedom.py:79-100`): cos(X) is an
I x I matrix, `torch.topk` keeps the k largest entries of each row (the item itself included, cos = 1),
the rest is zero, and the normalisation sums rows of that matrix. Here no I x I matrix ever exists: a
block of `chunk` rows of cos(X) is formed at a time, `torch.topk` runs on each of its rows, and only the
k kept values and their columns stay. A row block of X̂X̂ᵀ is not always bit-identical to the same rows
of the full product (the matrix-multiply kernel may sum in another order: differences in the last bits,
2.4e-7 measured), so where two cosines of a row are that close (a near-tie at the k-th place) the block
may keep another column than a dense topk would; exact ties (equal values in both) are broken the same
way as on the full row (tested). Row sums over the kept values equal the dense row sums to float
rounding, because every other entry of the dense matrix is zero.

A graph is a triple `(rows, cols, values)` of equal-length tensors (COO, duplicates allowed until
`coalesce`); `values` may carry gradient (LATTICE's learned graph), and `to_csr` + `torch.sparse.mm`
is differentiable in both the values and the dense operand.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

Coo = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # rows, cols, values

# elements of one chunk x I block of cos(X): 2^24 float32 = 64 MB (Sports, 18,357 items: 914 rows a block)
BLOCK_ELEMENTS = 1 << 24


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """X̂ = X / ‖X‖₂ per row (MMRec's `build_sim` divides by the norm; an all-zero row, NaN there, is 0 here)."""
    return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min(1e-12)


def default_chunk(n_items: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(n_items, 1))


@torch.no_grad()
def cosine_topk(features: torch.Tensor, k: int, chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of every row of cos(X) = X̂ X̂ᵀ: (values, columns), each I x k, without gradient.

    Row block by row block (`chunk` rows of I columns each); per row the same `torch.topk` as on the
    dense matrix (`build_knn_neighbourhood`, `get_knn_adj_mat`), so the same columns are kept, up to
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


def symnorm(graph: Coo, n: int, eps: float = 0.0) -> Coo:
    """D^-1/2 S D^-1/2 with D = row sums (+ eps) over the kept values; inf -> 0 (`compute_normalized_laplacian`).

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


def coalesce(graph: Coo, n: int) -> Coo:
    """Duplicate (row, col) entries summed, sorted row-major; differentiable in the values (an index_add)."""
    rows, cols, values = graph
    keys, slot = torch.unique(rows * n + cols, return_inverse=True)
    summed = torch.zeros(len(keys), dtype=values.dtype, device=values.device).index_add(0, slot, values)
    return keys // n, keys % n, summed


def to_csr(graph: Coo, n: int) -> torch.Tensor:
    """A coalesced graph as an n x n torch CSR tensor; `torch.sparse.mm(csr, X)` back-propagates to the values."""
    rows, cols, values = graph
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return torch.sparse_csr_tensor(crow, cols, values, (n, n), check_invariants=False)


def to_scipy(graph: Coo, n: int) -> sp.csr_matrix:
    """The graph as a float32 scipy CSR matrix (duplicates summed), e.g. for `Utils.layers.Graph`."""
    rows, cols, values = (t.detach().cpu().numpy() for t in graph)
    return sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=(n, n))
