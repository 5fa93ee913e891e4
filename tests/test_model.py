"""DiffMM (paper Eq. 15-23, 18-19, 25): the recommender's main view and contrastive views, InfoNCE, the contrastive and BPR losses.

The reference is a plain dense float64 numpy transcription of the authors' forward (docs/defaults.md: modality aggregation), one modality at a time."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from Model import Recommender, contrastive_loss
from Utils.layers import Graph, bpr_loss, info_nce

CPU = torch.device("cpu")
MODAL_DIMS = {"image": 7, "text": 5, "audio": 4}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_norm_adj(R: np.ndarray) -> np.ndarray:
    U, I = R.shape
    A = np.zeros((U + I, U + I))
    A[:U, U:] = R != 0
    A[U:, :U] = (R != 0).T
    A += np.eye(U + I)
    d = A.sum(1)
    return A / np.sqrt(np.outer(d, d))


def ref_params(model: Recommender) -> dict:
    """Float64 leaf copies of every recommender parameter (so the reference can be differentiated)."""
    return {name: p.detach().double().clone().requires_grad_(True) for name, p in model.named_parameters()}


def ref_transform(P: dict, m: str, trans: int, F: torch.Tensor) -> torch.Tensor:
    uses_linear = trans == 1 or (trans == 2 and m != "image")
    if uses_linear:
        return F @ P[f"transforms.{m}.linear.weight"].T + P[f"transforms.{m}.linear.bias"]
    h = F @ P[f"transforms.{m}.weight"]
    return torch.where(h > 0, h, 0.2 * h)  # LeakyReLU 0.2


def t_l2_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def ref_forward(P, adj, graphs, feats, trans, gnn_layer, ris_lambda, ris_adj_lambda):
    """The authors' forward transcribed with dense float64 torch matrices, one modality at a time (no sharing)."""
    adj = torch.as_tensor(adj)
    Eu, Ei = P["user_emb"], P["item_emb"]
    U = Eu.shape[0]
    w = torch.exp(P["modal_weight"]) / torch.exp(P["modal_weight"]).sum()
    H0 = 0
    views = []
    for k, m in enumerate(feats):
        G = torch.as_tensor(graphs[m])
        n = t_l2_rows(ref_transform(P, m, trans, torch.as_tensor(feats[m])))
        z = adj @ torch.cat([Eu, n])
        z = z + adj @ torch.cat([z[:U], Ei])
        z = z + ris_adj_lambda * (G @ torch.cat([Eu, Ei]))
        H0 = H0 + w[k] * z
        v = G @ torch.cat([Eu, n])
        total, cur = v, v
        for _ in range(gnn_layer):
            cur = adj @ cur
            total = total + cur
        views.append((total[:U], total[U:]))
    H, cur = H0, H0
    for _ in range(gnn_layer):
        cur = adj @ cur
        H = H + cur
    H = H + ris_lambda * t_l2_rows(H0)
    return H[:U], H[U:], views


def ref_forward_np(model, *args):
    u, i, views = ref_forward(ref_params(model), *args)
    return u.detach().numpy(), i.detach().numpy(), [(a.detach().numpy(), b.detach().numpy()) for a, b in views]


def make_case(n_mod, trans, gnn_layer, U=9, I=11, d=6, seed=0):
    rng = np.random.default_rng(seed)
    names = ["image", "text", "audio"][:n_mod]
    feats = {m: rng.normal(size=(I, MODAL_DIMS[m])) for m in names}
    R = (rng.random((U, I)) < 0.3).astype(float)
    R[0] = 0  # a user without train interaction
    R[:, 1] = 0  # an item without train interaction
    adj = dense_norm_adj(R)
    graphs = {}
    for m in names:  # any sparse matrix works: the forward is linear in it
        G = (rng.random((U + I, U + I)) < 0.15) * rng.random((U + I, U + I))
        graphs[m] = G
    torch.manual_seed(seed)
    model = Recommender(U, I, {m: torch.tensor(f, dtype=torch.float32) for m, f in feats.items()}, d,
                        gnn_layer, trans, ris_lambda=0.5, ris_adj_lambda=0.2)
    with torch.no_grad():  # random κ so that the softmax matters
        model.modal_weight.copy_(torch.tensor(rng.normal(size=n_mod), dtype=torch.float32))
    feats32 = {m: f.astype(np.float32).astype(np.float64) for m, f in feats.items()}
    adj32 = adj.astype(np.float32).astype(np.float64)
    graphs32 = {m: G.astype(np.float32).astype(np.float64) for m, G in graphs.items()}
    # the graphs as Main builds them: the train graph is symmetric, generated ones are not assumed to be
    adj_g = Graph(sp.csr_matrix(adj.astype(np.float32)), CPU, symmetric=True)
    graphs_g = {m: Graph(sp.csr_matrix(G.astype(np.float32)), CPU) for m, G in graphs.items()}
    return model, adj_g, graphs_g, adj32, graphs32, feats32


@pytest.mark.parametrize("n_mod", [1, 2, 3])
@pytest.mark.parametrize("gnn_layer", [1, 2])
@pytest.mark.parametrize("trans", [0, 1, 2])
def test_forward_matches_dense_reference(trans, gnn_layer, n_mod):
    model, adj_t, graphs_t, adj, graphs, feats = make_case(n_mod, trans, gnn_layer, seed=trans * 10 + gnn_layer + n_mod)
    ref_u, ref_i, ref_views = ref_forward_np(model, adj, graphs, feats, trans, gnn_layer, 0.5, 0.2)
    u, i, views = model(adj_t, graphs_t, with_views=False)
    assert views == []
    np.testing.assert_allclose(np64(u), ref_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np64(i), ref_i, rtol=1e-5, atol=1e-5)
    u2, i2, views2 = model(adj_t, graphs_t, with_views=True)
    np.testing.assert_allclose(np64(u2), ref_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np64(i2), ref_i, rtol=1e-5, atol=1e-5)
    assert len(views2) == n_mod
    for (vu, vi), (ru, ri) in zip(views2, ref_views):
        assert vu.shape == ru.shape and vi.shape == ri.shape
        np.testing.assert_allclose(np64(vu), ru, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np64(vi), ri, rtol=1e-5, atol=1e-5)


def test_forward_uses_ris_lambdas():
    model, adj_t, graphs_t, adj, graphs, feats = make_case(2, 0, 1, seed=3)
    model.ris_lambda, model.ris_adj_lambda = 1.7, 0.9
    ref_u, ref_i, _ = ref_forward_np(model, adj, graphs, feats, 0, 1, 1.7, 0.9)
    u, i, _ = model(adj_t, graphs_t)
    np.testing.assert_allclose(np64(u), ref_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np64(i), ref_i, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans,gnn_layer,n_mod", [(2, 2, 3), (0, 1, 2), (1, 2, 1)])
def test_gradients_match_dense_reference(trans, gnn_layer, n_mod):
    """The sparse products' backward (non-symmetric generated graphs included) against dense autograd."""
    model, adj_t, graphs_t, adj, graphs, feats = make_case(n_mod, trans, gnn_layer, seed=7 + n_mod)
    g = torch.Generator().manual_seed(0)
    U, I, d = 9, 11, 6
    cu, ci = torch.randn(U, d, generator=g), torch.randn(I, d, generator=g)
    cv = [(torch.randn(U, d, generator=g), torch.randn(I, d, generator=g)) for _ in range(n_mod)]

    def scalar(u, i, views):
        out = (u * cu.to(u.dtype)).sum() + (i * ci.to(i.dtype)).sum()
        for (a, b), (ca, cb) in zip(views, cv):
            out = out + (a * ca.to(a.dtype)).sum() + (b * cb.to(b.dtype)).sum()
        return out

    scalar(*model(adj_t, graphs_t, with_views=True)).backward()
    P = ref_params(model)
    scalar(*ref_forward(P, adj, graphs, feats, trans, gnn_layer, 0.5, 0.2)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        np.testing.assert_allclose(p.grad.double().numpy(), P[name].grad.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("n_mod", [1, 2, 3])
def test_init_modal_weight_and_xavier_tables(n_mod):
    names = ["image", "text", "audio"][:n_mod]
    U, I, d = 300, 200, 64
    feats = {m: torch.randn(I, MODAL_DIMS[m]) for m in names}
    model = Recommender(U, I, feats, d, 1, 0, 0.5, 0.2)
    np.testing.assert_allclose(np64(model.modal_weight), np.full(n_mod, 1.0 / n_mod), rtol=1e-7)
    for table, fan in ((model.user_emb, U + d), (model.item_emb, I + d)):
        bound = math.sqrt(6.0 / fan)  # Xavier uniform: U(-b, b)
        assert table.abs().max().item() <= bound + 1e-7
        assert table.abs().max().item() > 0.95 * bound
        assert table.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("trans,linear", [(0, {"image": False, "text": False, "audio": False}),
                                          (1, {"image": True, "text": True, "audio": True}),
                                          (2, {"image": False, "text": True, "audio": True})])
def test_trans_picks_the_transform(trans, linear):
    feats = {m: torch.randn(10, MODAL_DIMS[m]) for m in ("image", "text", "audio")}
    model = Recommender(5, 10, feats, 4, 1, trans, 0.5, 0.2)
    for m, is_linear in linear.items():
        n_params = sum(p.numel() for p in model.transforms[m].parameters())
        expected = MODAL_DIMS[m] * 4 + (4 if is_linear else 0)  # Linear has a bias, W does not
        assert n_params == expected, m


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------

def ref_info_nce(X, Y, nodes, temp):
    X, Y = l2_rows(np64(X)), l2_rows(np64(Y))
    total = 0.0
    for n in nodes:
        num = math.exp(float(X[n] @ Y[n]) / temp)
        den = sum(math.exp(float(X[n] @ Y[v]) / temp) for v in range(Y.shape[0]))
        total += -math.log(num / den)
    return total / len(nodes)


@pytest.mark.parametrize("temp", [0.5, 0.1, 1.0])
def test_info_nce_explicit_loop(temp):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(13, 6, generator=g) * 3
    Y = torch.randn(13, 6, generator=g)
    nodes = torch.tensor([0, 4, 4, 12, 7, 4])  # duplicates are kept
    got = info_nce(X, Y, nodes, temp).item()
    assert got == pytest.approx(ref_info_nce(X, Y, nodes.tolist(), temp), rel=1e-5)
    # the denominator runs over ALL rows: not the same as one restricted to the batch rows
    batch_only = ref_info_nce(X[nodes], Y[nodes], list(range(len(nodes))), temp)
    assert abs(got - batch_only) > 1e-3
    # not symmetric in the anchor
    assert info_nce(Y, X, nodes, temp).item() == pytest.approx(ref_info_nce(Y, X, nodes.tolist(), temp), rel=1e-5)


@pytest.mark.parametrize("temp", [0.5, 0.1])
def test_info_nce_gradient(temp):
    """Gradients w.r.t. both inputs against autograd of the explicit float64 formula."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=g, requires_grad=True)
    Y = torch.randn(12, 5, generator=g, requires_grad=True)
    nodes = torch.tensor([1, 1, 5, 11, 0])
    info_nce(X, Y, nodes, temp).backward()
    X64, Y64 = X.detach().double().requires_grad_(), Y.detach().double().requires_grad_()
    x, y = t_l2_rows(X64), t_l2_rows(Y64)
    terms = []
    for n in nodes.tolist():
        logits = torch.stack([x[n] @ y[v] / temp for v in range(12)])
        terms.append(-(logits[n] - torch.log(torch.exp(logits).sum())))
    torch.stack(terms).mean().backward()
    np.testing.assert_allclose(X.grad.double().numpy(), X64.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(Y.grad.double().numpy(), Y64.grad.numpy(), rtol=1e-4, atol=1e-6)


def _views(n_mod, U=10, I=8, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    views = [(torch.randn(U, d, generator=g), torch.randn(I, d, generator=g)) for _ in range(n_mod)]
    main = (torch.randn(U, d, generator=g), torch.randn(I, d, generator=g))
    users = torch.tensor([0, 3, 3, 9, 5])
    positives = torch.tensor([7, 2, 2, 0, 7])
    return main, views, users, positives


@pytest.mark.parametrize("n_mod", [1, 2, 3])
def test_contrastive_loss_method0_unordered_pairs(n_mod):
    main, views, users, positives = _views(n_mod)
    expected = 0.0
    for a in range(n_mod):
        for b in range(a + 1, n_mod):
            expected += ref_info_nce(views[a][0], views[b][0], users.tolist(), 0.5)
            expected += ref_info_nce(views[a][1], views[b][1], positives.tolist(), 0.5)
    got = contrastive_loss(main[0], main[1], views, users, positives, 0, 0.5).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if n_mod == 1:
        assert got == 0.0


@pytest.mark.parametrize("n_mod", [1, 2, 3])
def test_contrastive_loss_method1_main_view_anchor(n_mod):
    main, views, users, positives = _views(n_mod)
    expected = 0.0
    for m in range(n_mod):
        expected += ref_info_nce(main[0], views[m][0], users.tolist(), 0.2)
        expected += ref_info_nce(main[1], views[m][1], positives.tolist(), 0.2)
    got = contrastive_loss(main[0], main[1], views, users, positives, 1, 0.2).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_bpr_loss_divided_by_configured_batch():
    g = torch.Generator().manual_seed(2)
    user_vec, item_vec = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    users, pos, neg = torch.tensor([0, 1, 5, 5]), torch.tensor([2, 3, 8, 0]), torch.tensor([1, 1, 4, 6])
    U, I = np64(user_vec), np64(item_vec)
    total = 0.0
    for u, p, n in zip(users.tolist(), pos.tolist(), neg.tolist()):
        diff = float(U[u] @ I[p] - U[u] @ I[n])
        total += -math.log(1.0 / (1.0 + math.exp(-diff)))
    got = bpr_loss(user_vec, item_vec, users, pos, neg, 1024).item()
    assert got == pytest.approx(total / 1024, rel=1e-5)   # not / 4 (the rows in the batch)


def test_reg_loss_is_squared_norm_of_id_tables():
    model, *_ = make_case(2, 0, 1)
    expected = (np64(model.user_emb) ** 2).sum() + (np64(model.item_emb) ** 2).sum()
    assert model.reg_loss().item() == pytest.approx(expected, rel=1e-5)
    # modality transforms are not regularised
    with torch.no_grad():
        for p in model.transforms.parameters():
            p.mul_(10)
    assert model.reg_loss().item() == pytest.approx(expected, rel=1e-5)
