"""The hand-written kernels of Utils/kernels.py against the plain torch computation they replace."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from Utils.kernels import LogSumExpLogits, SparseMatmul
from Utils.layers import Graph, info_nce


def test_logsumexp_logits_value_and_gradient_match_plain_logsumexp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.rand(7, dtype=torch.float64, generator=g)
    fast = LogSumExpLogits.apply(x, y, 0.3)
    (fast * weights).sum().backward()
    gx, gy = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    plain = torch.logsumexp(x @ y.T / 0.3, dim=1)
    (plain * weights).sum().backward()
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gy, y.grad, rtol=1e-10, atol=1e-12)


def test_sparse_matmul_with_precomputed_transpose_matches_dense_product():
    rng = np.random.default_rng(1)
    a = sp.random(9, 6, density=0.4, format="csr", random_state=2, dtype=np.float32)
    dense = torch.tensor(rng.normal(size=(6, 3)), dtype=torch.float32, requires_grad=True)
    graph = Graph(a, torch.device("cpu"))
    out = graph @ dense
    upstream = torch.tensor(rng.normal(size=(9, 3)), dtype=torch.float32)
    (out * upstream).sum().backward()
    a_dense = torch.tensor(a.toarray())
    torch.testing.assert_close(out, a_dense @ dense.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.grad, a_dense.T @ upstream, rtol=1e-5, atol=1e-6)
    assert isinstance(SparseMatmul.apply(graph.matrix, graph.matrix_t, dense), torch.Tensor)


def test_info_nce_matches_an_explicit_loop_with_duplicate_nodes():
    g = torch.Generator().manual_seed(3)
    anchor = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    other = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    nodes = torch.tensor([1, 5, 5, 0, 7, 1, 1])
    got = info_nce(anchor, other, nodes, 0.5)
    terms = []
    for n in nodes.tolist():
        x = anchor[n] / anchor[n].norm()
        ys = other / other.norm(dim=1, keepdim=True)
        logits = ys @ x / 0.5
        terms.append(-(logits[n] - torch.logsumexp(logits, 0)))
    want = torch.stack(terms).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got, (anchor, other))
    want_grads = torch.autograd.grad(want, (anchor, other))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_the_reference_path_and_the_fast_path_train_the_same_model(tiny_dir, tmp_path):
    """`--reverse direct --kernels plain` (the reference of `Experiments.benchmark --compare`) and the
    default fast path: the same losses and metrics, to float rounding."""
    import json

    import Main
    from conftest import tiny_args

    runs = {}
    for name, extra in (("fast", ()), ("reference", ("--reverse", "direct", "--kernels", "plain"))):
        out = tmp_path / name
        assert Main.main(tiny_args(tiny_dir, out, "--epoch", "3", "--cl_method", "1", *extra)) == 0
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for fast, reference in zip(runs["fast"], runs["reference"]):
        for term, value in reference["loss"].items():
            assert fast["loss"][term] == pytest.approx(value, rel=1e-4, abs=1e-6), term
        assert fast["test"] == pytest.approx(reference["test"], rel=1e-4)
