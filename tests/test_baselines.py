"""MF-BPR, LightGCN and VBPR as MMRec computes them, each against an independent reference written here."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from DataHandler import Data
from Models.lightgcn import LightGCN
from Models.mf import MF
from Models.vbpr import VBPR
from Params import parse_args
from Utils.batches import sample_negatives
from Utils.graphs import symmetric_graph
from Utils.layers import emb_loss

CPU = torch.device("cpu")


def toy_data(n_users=7, n_items=9, seed=0, features=None) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.35).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0   # every user has a train item
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return Data("toy", sp.csr_matrix(train), empty, empty, features or {})


def args_for(model, *extra):
    return parse_args(["--model", model, "--quiet", *extra])


def ref_bpr(user, pos, neg):
    """MMRec BPRLoss: mean -log(1e-10 + σ(s⁺ - s⁻)), in float64."""
    diff = (user * pos).sum(1) - (user * neg).sum(1)
    return float(np.mean(-np.log(1e-10 + 1.0 / (1.0 + np.exp(-diff)))))


def ref_emb_loss(*tables):
    """Σ_k ‖X_k‖_F / rows(X_last): Frobenius norms, not squared."""
    return sum(np.sqrt((t.astype(np.float64) ** 2).sum()) for t in tables) / tables[-1].shape[0]


def test_emb_loss_uses_unsquared_norms():
    a, b, c = (torch.randn(5, 3, dtype=torch.float64) for _ in range(3))
    want = ref_emb_loss(a.numpy(), b.numpy(), c.numpy())
    assert emb_loss(a, b, c).item() == pytest.approx(want, rel=1e-12)
    squared = sum((t ** 2).sum().item() for t in (a, b, c)) / 5
    assert abs(emb_loss(a, b, c).item() - squared) > 1e-3                 # not the squared L2


def test_symmetric_graph_has_no_self_loops_and_mmrec_degrees():
    data = toy_data()
    r = data.train.toarray().astype(np.float64)
    U, I = r.shape
    a = np.zeros((U + I, U + I))
    a[:U, U:] = r
    a[U:, :U] = r.T
    d = (a.sum(1) + 1e-7) ** -0.5
    np.testing.assert_allclose(symmetric_graph(data.train).toarray(), d[:, None] * a * d[None, :], rtol=1e-6)
    assert np.all(np.diag(symmetric_graph(data.train).toarray()) == 0)


def test_mf_scores_and_loss():
    data = toy_data()
    model = MF(args_for("mf", "--embedding_size", "4", "--reg_weight", "0.3"), data, CPU)
    users, items = model.embeddings()
    u, i = users.detach().numpy(), items.detach().numpy()
    scores = model.scorer()(torch.arange(data.n_users)).detach().numpy()
    np.testing.assert_allclose(scores, u @ i.T, rtol=1e-5, atol=1e-7)
    b_u, b_p, b_n = torch.tensor([0, 3, 3]), torch.tensor([1, 2, 5]), torch.tensor([4, 0, 8])
    terms = model.batch_loss(b_u, b_p, b_n)
    assert terms["bpr"].item() == pytest.approx(ref_bpr(u[b_u], i[b_p], i[b_n]), rel=1e-5)
    assert terms["reg"].item() == pytest.approx(0.3 * ref_emb_loss(u[b_u], i[b_p], i[b_n]), rel=1e-5)


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_lightgcn_is_the_mean_of_dense_matrix_powers(layers):
    data = toy_data(seed=layers)
    model = LightGCN(args_for("lightgcn", "--embedding_size", "5", "--n_layers", str(layers)), data, CPU)
    r = data.train.toarray().astype(np.float64)
    U, I = r.shape
    a = np.zeros((U + I, U + I))
    a[:U, U:], a[U:, :U] = r, r.T
    d = (a.sum(1) + 1e-7) ** -0.5
    norm = d[:, None] * a * d[None, :]
    e0 = torch.cat([model.user_emb, model.item_emb]).detach().numpy().astype(np.float64)
    want = sum(np.linalg.matrix_power(norm, l) @ e0 for l in range(layers + 1)) / (layers + 1)
    users, items = model.embeddings()
    np.testing.assert_allclose(torch.cat([users, items]).detach().numpy(), want, rtol=1e-5, atol=1e-6)
    # the loss: BPR on the propagated rows + λ·EmbLoss of the layer-0 rows
    b_u, b_p, b_n = torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([6, 7])
    terms = model.batch_loss(b_u, b_p, b_n)
    pu, pi = want[:U], want[U:]
    assert terms["bpr"].item() == pytest.approx(ref_bpr(pu[b_u], pi[b_p], pi[b_n]), rel=1e-5)
    eu, ei = e0[:U], e0[U:]
    assert terms["reg"].item() == pytest.approx(1e-4 * ref_emb_loss(eu[b_u], ei[b_p], ei[b_n]), rel=1e-5)


def test_vbpr_score_is_the_sum_of_its_parts():
    rng = np.random.default_rng(3)
    features = {"image": rng.normal(size=(9, 6)).astype(np.float32), "audio": rng.normal(size=(9, 4)).astype(np.float32)}
    data = toy_data(features=features)
    model = VBPR(args_for("vbpr", "--embedding_size", "3"), data, CPU)
    d = 3
    theta = model.user_emb.detach().numpy().astype(np.float64)
    gamma = model.item_emb.detach().numpy().astype(np.float64)
    w = model.item_linear.weight.detach().numpy().astype(np.float64)
    b = model.item_linear.bias.detach().numpy().astype(np.float64)
    assert theta.shape == (7, 2 * d) and np.all(b == 0)                  # bias initialised to 0
    visual = np.concatenate([features["image"], features["audio"]], axis=1) @ w.T + b   # E f_i + b, all modalities
    want = theta[:, :d] @ gamma.T + theta[:, d:] @ visual.T             # γ_u·γ_i + θ_u·(E f_i + b)
    scores = model.scorer()(torch.arange(7)).detach().numpy()
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    # features are constant: no parameter holds them
    assert all(p.shape != (9, 10) for p in model.parameters())


def test_mmrec_negatives_come_from_items_that_occur_in_train():
    data = toy_data(n_users=20, n_items=12, seed=4)
    train = data.train.tolil()
    train[:, 11] = 0                                                      # item 11 never occurs in train
    train = train.tocsr()
    train.eliminate_zeros()
    candidates = np.flatnonzero(np.diff(train.tocsc().indptr) > 0)
    users = np.repeat(np.arange(20), 50)
    neg = sample_negatives(train, users, np.random.default_rng(0), candidates=candidates)
    assert 11 not in set(neg.tolist())
    assert not np.any(train.toarray()[users, neg])                        # never a train item of the user
    assert len(set(neg.tolist())) > 5


def test_learning_rate_scheduler_multiplies_by_gamma_per_epoch():
    from Models.base import PhaseTimer

    data = toy_data()
    model = MF(args_for("mf", "--learning_rate_scheduler", "0.5,1", "--lr", "0.01"), data, CPU)
    for epoch in range(2):
        model.train_epoch(epoch, PhaseTimer(CPU))
    assert model._optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)
