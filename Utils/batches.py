"""Batches on the device: user rows of a CSR matrix, index batches, training pairs and negatives.

Nothing here builds a dense users x items matrix: user rows are densified one batch at a time (`dense_rows` on the
host, `DeviceRows` on the device). The arrays come from `DataHandler.py`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from Utils.errors import DataError


# ---------------------------------------------------------------------------------------------
# User rows on the device
# ---------------------------------------------------------------------------------------------

def dense_rows(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a CSR matrix as a dense float32 tensor, sliced on the host (`DeviceRows`: gathered on the device)."""
    return torch.from_numpy(matrix[rows].toarray().astype(np.float32, copy=False)).to(device)


class DeviceRows:
    """A CSR matrix copied to the device once, whose batches of rows are then built there, dense or as CSR.

    Why: `dense_rows` slices the scipy matrix on the host and copies the dense rows over, and on CUDA every
    such (blocking) host-to-device copy waits for the device to finish its queue, once per batch of every
    loop over user rows. Here only the matrix crosses, once; a batch is gathered on the device without any
    host round trip. `dense(rows)` pads every row to the longest row of the matrix, a shape known on the
    host, so no size comes back from the device; `csr(rows, host_rows)` takes the batch's number of
    entries from its indices on the host. They give exactly `dense_rows(matrix, rows)` and
    `to_torch_csr(matrix[rows])` (tests/test_data.py).
    """

    def __init__(self, matrix: sp.spmatrix, device: torch.device):
        matrix = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
        matrix.sum_duplicates()  # one entry per (row, column), in column order: what toarray() sums duplicates to
        self.shape, self.device = matrix.shape, device
        self.host_indptr = matrix.indptr.astype(np.int64)
        counts = np.diff(self.host_indptr)
        self.width = int(counts.max()) if len(counts) else 0  # the longest row
        self.indptr = torch.from_numpy(self.host_indptr).to(device)
        self.indices = torch.from_numpy(matrix.indices.astype(np.int64)).to(device)
        self.values = torch.from_numpy(matrix.data).to(device)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows (indices on the device, repeats allowed) as a dense float32 len(rows) x columns tensor.

        Each row's entries are read at the fixed width of the longest row: the slots past a row's end add
        0.0 to whatever column they point at, which changes no value (each true entry is added once).
        """
        out = torch.zeros(len(rows), self.shape[1], dtype=torch.float32, device=self.device)
        if self.width == 0 or len(rows) == 0:
            return out
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        slot = torch.arange(self.width, device=self.device)
        inside = slot[None, :] < counts[:, None]
        position = (starts[:, None] + slot[None, :]).clamp_(max=len(self.indices) - 1)
        values = torch.where(inside, self.values[position], torch.zeros((), device=self.device))
        return out.scatter_add_(1, self.indices[position], values)

    def csr(self, rows: torch.Tensor, host_rows: Optional[np.ndarray] = None) -> torch.Tensor:
        """The rows as a len(rows) x columns sparse CSR tensor (float32 values, int64 indices), as `to_torch_csr`.

        `host_rows`: the same indices on the host, which give the number of entries without a device sync
        (without them one scalar comes back from the device).
        """
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        if host_rows is not None:
            total = int((self.host_indptr[host_rows + 1] - self.host_indptr[host_rows]).sum())
        else:
            total = int(counts.sum())
        crow = torch.zeros(len(rows) + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(counts, 0)
        entry_row = torch.repeat_interleave(torch.arange(len(rows), device=self.device), counts, output_size=total)
        position = torch.arange(total, device=self.device) - crow[entry_row] + starts[entry_row]
        return torch.sparse_csr_tensor(crow, self.indices[position], self.values[position],
                                       size=(len(rows), self.shape[1]), check_invariants=False)


def device_batches(batches: Sequence[np.ndarray], device: torch.device) -> List[torch.Tensor]:
    """The index batches of `user_batches` as tensors on the device, moved in one copy (one host-device
    synchronisation per epoch instead of one per batch); on the CPU views of one array, the same values."""
    if not batches:
        return []
    order = torch.from_numpy(np.concatenate(batches)).to(device)
    return list(torch.split(order, [len(b) for b in batches]))


# ---------------------------------------------------------------------------------------------
# Batches, training pairs and negatives
# ---------------------------------------------------------------------------------------------

def user_batches(n: int, batch: int, shuffle: bool) -> List[np.ndarray]:
    """Index batches of size `batch` over range(n), shuffled with torch's seeded generator when asked."""
    order = torch.randperm(n).numpy() if shuffle else np.arange(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def train_pairs(train: sp.csr_matrix) -> tuple:
    """(users, items) of every train interaction, in row-major order."""
    coo = train.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


def sample_negatives(train: sp.csr_matrix, users: np.ndarray, rng: np.random.Generator,
                     max_rounds: int = 1000, candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """One negative per pair, uniform over the items the user has not interacted with in train.

    `candidates`: draw only among these items (MMRec draws among the items that occur in train);
    None: among all items (DiffMM). Rejection sampling done for all pairs at once: draw, find the
    draws that hit a train item (a binary search in the sorted user*I+item keys), redraw only those.
    """
    n_items = train.shape[1]
    coo = train.tocoo()
    keys = np.sort(coo.row.astype(np.int64) * n_items + coo.col)

    def draw(size: int) -> np.ndarray:
        if candidates is None:
            return rng.integers(0, n_items, size=size)
        return candidates[rng.integers(0, len(candidates), size=size)]

    negatives = draw(len(users))
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        query = users[todo] * n_items + negatives[todo]
        pos = np.searchsorted(keys, query)
        hit = keys[np.minimum(pos, len(keys) - 1)] == query
        todo = todo[hit]
        if len(todo) == 0:
            return negatives
        negatives[todo] = draw(len(todo))
    full = np.unique(users[todo])
    raise DataError(f"cannot sample a negative item for users {full[:5].tolist()}: they interacted with "
                    f"(nearly) every item in the train matrix.")
