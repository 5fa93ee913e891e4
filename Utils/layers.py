"""Pieces every model shares: sparse graphs as torch tensors, propagation, BPR, EmbLoss, InfoNCE.

Models import these; nothing here knows a model. The fast kernels behind `Graph @ x` and `info_nce`
are in `Utils/kernels.py`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from Utils.kernels import LogSumExpLogits, SparseMatmul

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def to_torch_csr(matrix: sp.spmatrix, device: torch.device) -> torch.Tensor:
    """A scipy sparse matrix as a torch sparse CSR tensor (float32 values, int64 indices) on `device`."""
    matrix = sp.csr_matrix(matrix)
    return torch.sparse_csr_tensor(
        torch.from_numpy(matrix.indptr.astype(np.int64)), torch.from_numpy(matrix.indices.astype(np.int64)),
        torch.from_numpy(matrix.data.astype(np.float32)), size=matrix.shape, device=device,
        check_invariants=False)


class Graph:
    """A sparse matrix on the device; `graph @ dense` is differentiable in `dense` (one more sparse product).

    `plain=True`: torch's own sparse product and its autograd, the reference the fast kernel replaces
    (`--kernels plain`, for side-by-side benchmarks).
    """

    def __init__(self, matrix: sp.spmatrix, device: torch.device, symmetric: bool = False, plain: bool = False):
        csr = to_torch_csr(matrix, device)
        self._assign(csr, csr if symmetric else to_torch_csr(sp.csr_matrix(matrix).T.tocsr(), device), plain)

    @classmethod
    def from_tensors(cls, matrix: torch.Tensor, matrix_t: Optional[torch.Tensor] = None, plain: bool = False
                     ) -> "Graph":
        """A Graph from a torch CSR matrix and its transpose (None: the matrix is symmetric), without scipy:
        a graph built on the device stays there. Both must be CSR with sorted int64 column indices per row
        (e.g. `Utils.graphs.coo_to_csr` of a coalesced COO), float32 values."""
        graph = cls.__new__(cls)
        graph._assign(matrix, matrix if matrix_t is None else matrix_t, plain)
        return graph

    def _assign(self, matrix: torch.Tensor, matrix_t: torch.Tensor, plain: bool) -> None:
        """Every attribute a Graph has, set in one place for both constructors."""
        if matrix.layout != torch.sparse_csr or matrix_t.layout != torch.sparse_csr:
            raise ValueError("Graph needs torch sparse CSR tensors")
        if tuple(matrix_t.shape) != tuple(matrix.shape)[::-1]:
            raise ValueError(f"matrix_t has shape {tuple(matrix_t.shape)}, not the transpose of {tuple(matrix.shape)}")
        self.shape = tuple(int(n) for n in matrix.shape)
        self.nnz = int(matrix.values().numel())
        self.plain = plain
        self.matrix = matrix
        self.matrix_t = matrix_t

    def __matmul__(self, dense: torch.Tensor) -> torch.Tensor:
        if self.plain:
            with torch.autocast(dense.device.type, enabled=False):
                return torch.sparse.mm(self.matrix, dense.float())
        return SparseMatmul.apply(self.matrix, self.matrix_t, dense)

    def to_dense(self) -> torch.Tensor:
        return self.matrix.to_dense()

    def state(self) -> dict:
        """The matrix as plain CPU tensors, for a checkpoint that loads with `torch.load(weights_only=True)`."""
        return {"indptr": self.matrix.crow_indices().cpu(), "indices": self.matrix.col_indices().cpu(),
                "data": self.matrix.values().cpu(), "shape": list(self.shape)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device, plain: bool = False) -> "Graph":
        matrix = sp.csr_matrix((state["data"].numpy(), state["indices"].numpy(), state["indptr"].numpy()),
                               shape=tuple(state["shape"]))
        return cls(matrix, device, plain=plain)


def propagate(graph: Graph, x: torch.Tensor, layers: int, pooling: str = "mean") -> torch.Tensor:
    """Pool of the layer outputs E_0 = x, E_{l+1} = Â E_l for l < `layers`.

    `mean` is LightGCN's layer combination α_k = 1/(K+1) (He et al. 2020, Eq. 4); `sum` is DiffMM's
    (the authors' code sums the layers).
    """
    outputs = [x]
    for _ in range(layers):
        outputs.append(graph @ outputs[-1])
    stacked = torch.stack(outputs)
    return stacked.mean(0) if pooling == "mean" else stacked.sum(0)


def bpr_loss(user_vec: torch.Tensor, item_vec: torch.Tensor, users: torch.Tensor, positives: torch.Tensor,
             negatives: torch.Tensor, divisor: float | None = None) -> torch.Tensor:
    """BPR (Rendle et al. 2009): -Σ log σ(s(u, pos) - s(u, neg)), divided by `divisor` (default: the batch size).

    MMRec takes the batch mean; DiffMM's authors divide by the configured batch size even for the
    last, smaller batch (pass it as `divisor`).
    """
    u = user_vec[users]
    diff = (u * item_vec[positives]).sum(-1) - (u * item_vec[negatives]).sum(-1)
    return -F.logsigmoid(diff).sum() / (divisor if divisor is not None else len(users))


def emb_loss(*tables: torch.Tensor) -> torch.Tensor:
    """MMRec's EmbLoss: Σ_k ‖X_k‖_F / rows(X_last). The norms are *not* squared (MMRec common/loss.py)."""
    return sum(torch.linalg.norm(t) for t in tables) / tables[-1].shape[0]


def info_nce(anchor: torch.Tensor, other: torch.Tensor, nodes: torch.Tensor, temp: float,
             plain: bool = False) -> torch.Tensor:
    """InfoNCE (DiffMM Eq. 18-19): per batch node n, -log(exp(x_n·y_n/τ) / Σ_v exp(x_n·y_v/τ)), averaged.

    Rows are L2-normalised; the denominator runs over every row v of `other` (all users or all
    items), not only the batch; duplicate nodes in the batch count each time. `plain=True`: the
    straightforward autograd computation over every batch node (the reference of the fast path).
    """
    if plain:
        x, y = F.normalize(anchor[nodes]), F.normalize(other)
        logits = x @ y.T / temp
        return (torch.logsumexp(logits, dim=1) - (x * y[nodes]).sum(-1) / temp).mean()
    # A node's term depends only on the node: compute it once per distinct node, count it per occurrence.
    unique, occurrence = torch.unique(nodes, return_inverse=True)
    x = F.normalize(anchor[unique])
    y = F.normalize(other)
    positive = (x * y[unique]).sum(-1) / temp
    return (LogSumExpLogits.apply(x, y, temp) - positive)[occurrence].mean()


def xavier_uniform(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.empty(*shape)))


def xavier_normal(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.nn.init.xavier_normal_(torch.empty(*shape)))

