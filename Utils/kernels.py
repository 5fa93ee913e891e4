"""Hand-written autograd kernels, kept apart from the code that reads like the paper.

Each computes exactly what a one-line torch expression computes (tests/test_kernels.py checks value
and gradient against that expression); they exist only because they are faster on the hot path.
"""
from __future__ import annotations

import torch


class SparseMatmul(torch.autograd.Function):
    """A @ X with the gradient Aᵀ @ G from a precomputed Aᵀ (torch's own CSR backward re-sorts A each call).

    Plain form: `torch.sparse.mm(A, X)`. The product stays fp32 under autocast.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, matrix_t: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        ctx.matrix_t = matrix_t
        with torch.autocast(dense.device.type, enabled=False):
            return torch.sparse.mm(matrix, dense.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return None, None, torch.sparse.mm(ctx.matrix_t, grad.float())


class LogSumExpLogits(torch.autograd.Function):
    """logsumexp_v(x_n · y_v / τ) for every row n, with one batch x N buffer and no pass over it in backward.

    Plain form: `torch.logsumexp(x @ y.T / temp, 1)`. Same value and gradient in a third fewer passes
    over the batch x N logits, which dominate a contrastive step (N = all users or all items): the
    softmax is one fused kernel, the logsumexp is read off it at the row maximum (max - log p_max),
    and the backward scales the small factors (rows of x and of the result) instead of the big matrix.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, temp: float) -> torch.Tensor:
        logits = (x / temp) @ y.T
        row_max, argmax = logits.max(dim=1, keepdim=True)
        probs = torch.softmax(logits, dim=1)
        ctx.save_for_backward(x, y, probs)
        ctx.temp = temp
        return (row_max - probs.gather(1, argmax).log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, probs = ctx.saved_tensors
        scale = (grad / ctx.temp)[:, None]
        return (probs @ y) * scale, probs.T @ (x * scale), None
