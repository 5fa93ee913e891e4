"""MMSSL (Models/mmssl.py), each piece against an independent reference written here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import inference
import Main
import Models
from DataHandler import Data
from Params import build_parser, parse_args
from Models.base import PhaseTimer
from Utils.seeding import seed_everything
from Utils.metrics import evaluate

from conftest import assert_resumes_exactly, hand_made, tiny_args

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(Models.REGISTRY, "mmssl", "Models.mmssl:MMSSL")


def toy_model(*flags, modalities=("image", "text"), empty_users=()):
    """MMSSL on a hand-made 24 x 16 dataset, small sizes; the flags override; `empty_users` have no train item."""
    from Models.mmssl import MMSSL

    train, val, test, features = hand_made(modalities=modalities)
    train[list(empty_users)] = 0.0
    data = Data("toy", *(sp.csr_matrix(m, dtype=np.float32) for m in (train, val, test)), features=features)
    args = parse_args(["--model", "mmssl", "--quiet", "--batch", "6", "--embed_size", "8", "--head_num", "2", *flags])
    seed_everything(args.seed)
    return MMSSL(args, data, CPU)


def dense(graph) -> np.ndarray:
    return graph.to_dense().numpy().astype(np.float64)


def one_sided(pairs_u, pairs_i, shape):
    """D_u^-1/2 A and D_i^-1/2 Aᵀ of the (user, item) pairs, repeats summed (§2), dense numpy."""
    a = np.zeros(shape)
    np.add.at(a, (np.asarray(pairs_u), np.asarray(pairs_i)), 1.0)
    return np.diag((a.sum(1) + 1e-8) ** -0.5) @ a, np.diag((a.sum(0) + 1e-8) ** -0.5) @ a.T


def l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def feature_views(model):
    """x_u^m = N_u f_m, x_i^m = N_i x_u^m with f_m = F_m Wᵀ + b (no dropout), dense float64 (§3.2)."""
    r = model.data.train.toarray().astype(np.float64)
    n_u, n_i = one_sided(*np.nonzero(r), r.shape)
    views = {}
    for m, feat in model.data.features.items():
        enc = model.net.encoders[m]
        f = feat.astype(np.float64) @ enc.weight.detach().numpy().T.astype(np.float64) + enc.bias.detach().numpy()
        views[m] = (n_u @ f, n_i @ (n_u @ f))
    return views


# per-modality generated pairs that differ (§6): (users, items)
GENERATED = {"image": ([0, 0, 3, 5, 5, 5], [2, 7, 7, 1, 2, 3]),
             "text": ([1, 3, 3, 6, 6, 9, 9], [4, 0, 9, 9, 11, 5, 5])}


# --- §2 graphs ------------------------------------------------------------------------------------

def test_one_sided_graphs_match_dense_numpy_with_repeats_and_empty_rows():
    from Utils.graphs import one_sided_graphs

    users = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3])
    items = torch.tensor([1, 1, 4, 0, 4, 2, 3, 4])               # (0, 1) twice; user 1 and item 5 empty
    g_u, g_i = one_sided_graphs(users, items, 5, 6)
    a = np.zeros((5, 6))
    np.add.at(a, (users.numpy(), items.numpy()), 1.0)           # repeats summed
    want_u = np.diag((a.sum(1) + 1e-8) ** -0.5) @ a
    want_i = np.diag((a.sum(0) + 1e-8) ** -0.5) @ a.T
    np.testing.assert_allclose(dense(g_u), want_u, rtol=1e-6)
    np.testing.assert_allclose(dense(g_i), want_i, rtol=1e-6)
    # the transposes the backward uses
    np.testing.assert_allclose(g_u.matrix_t.to_dense().numpy(), want_u.T, rtol=1e-6)
    np.testing.assert_allclose(g_i.matrix_t.to_dense().numpy(), want_i.T, rtol=1e-6)
    x = torch.randn(6, 3, dtype=torch.float32, requires_grad=True)
    (g_u @ x).pow(2).sum().backward()
    ref = torch.tensor(want_u, dtype=torch.float32)
    x_ref = x.detach().clone().requires_grad_(True)
    (ref @ x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    empty_u, _ = one_sided_graphs(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 5, 6)
    assert empty_u.nnz == 0 and torch.equal(empty_u @ torch.ones(6, 2), torch.zeros(5, 2))


def test_graph_from_tensors_equals_the_graph_of_the_scipy_matrix():
    """Utils.layers.Graph.from_tensors (torch CSR built on the device from unsorted (row, col, value)
    triples) against Graph(scipy matrix): the same attributes, matrices, products and gradients."""
    from Utils.graphs import coo_to_csr
    from Utils.layers import Graph

    rng = np.random.default_rng(11)
    matrix = sp.random(7, 5, density=0.4, random_state=3, dtype=np.float32, format="csr")
    order = rng.permutation(matrix.nnz)                              # not row-major
    coo = matrix.tocoo()
    rows, cols, values = (torch.from_numpy(a[order]) for a in (coo.row.astype(np.int64), coo.col.astype(np.int64),
                                                                coo.data))
    built = Graph.from_tensors(coo_to_csr((rows, cols, values), (7, 5)), coo_to_csr((cols, rows, values), (5, 7)))
    reference = Graph(matrix, CPU)
    assert vars(built).keys() == vars(reference).keys()
    assert built.shape == reference.shape == (7, 5) and built.nnz == reference.nnz and built.plain is False
    for name in ("matrix", "matrix_t"):
        a, b = getattr(built, name), getattr(reference, name)
        assert a.layout == b.layout == torch.sparse_csr and a.dtype == b.dtype
        assert torch.equal(a.crow_indices(), b.crow_indices()) and torch.equal(a.col_indices(), b.col_indices())
        assert torch.equal(a.values(), b.values())
    x = torch.randn(5, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    (built @ x).pow(2).sum().backward()
    (reference @ x_ref).pow(2).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    square = sp.csr_matrix(matrix[:5] + matrix[:5].T)                 # symmetric: its own transpose
    sym = Graph.from_tensors(Graph(square, CPU, symmetric=True).matrix, plain=True)
    assert sym.matrix_t is sym.matrix and sym.plain and sym.shape == (5, 5)
    with pytest.raises(ValueError, match="transpose"):
        Graph.from_tensors(built.matrix, built.matrix)


def test_float_list_parser():
    import argparse

    from Utils.flags import float_list

    assert float_list("0.1,0.9") == [0.1, 0.9]
    assert float_list(" [0.1, 0.9] ") == [0.1, 0.9]
    assert float_list("[1e-5,1e-5,1e-2]") == [1e-5, 1e-5, 1e-2]
    assert float_list("1e-5") == [1e-5] and float_list("[2]") == [2.0]
    for bad in ("", "[]", "a,b", "[0.1, 'x']", "[0.1, [0.2]]", "nan", "0.1,inf", "[True]", "0.1;0.2", "[0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a list of numbers"):
            float_list(bad)
    assert parse_args(["--model", "mmssl", "--regs", "[0.5, 1e-5]"]).regs == [0.5, 1e-5]


def test_train_graphs_are_the_one_sided_normalised_train_matrix():
    model = toy_model()
    r = model.data.train.toarray().astype(np.float64)
    np.testing.assert_allclose(dense(model.train_graphs[0]), np.diag((r.sum(1) + 1e-8) ** -0.5) @ r, rtol=1e-6)
    np.testing.assert_allclose(dense(model.train_graphs[1]), np.diag((r.sum(0) + 1e-8) ** -0.5) @ r.T, rtol=1e-6)


# --- §3 forward -----------------------------------------------------------------------------------

def authors_attention(views, w_q, w_k, w_cat, heads):
    """The authors' multi_head_self_attention (Models.py:139-169), operation by operation: real q/k heads,
    K re-shaped from Q, V broadcast on the query-modality axis; then the mean over modalities (:190)."""
    q = v = torch.stack(views)                                  # M x N x d
    n_modal, n, d = q.shape
    d_h = d / heads
    big_q = torch.matmul(q, w_q)                                # (their K = k @ w_k is computed and never used)
    big_q = big_q.reshape(n_modal, n, heads, int(d_h)).permute(2, 0, 1, 3)
    big_k = big_q.reshape(n_modal, n, heads, int(d_h)).permute(2, 0, 1, 3)
    big_q, big_k, big_v = big_q.unsqueeze(2), big_k.unsqueeze(1), v.unsqueeze(1)
    att = (big_q * big_k / torch.sqrt(torch.tensor(d_h))).sum(-1).unsqueeze(-1)
    att = F.softmax(att, dim=2)
    z = (att * big_v).sum(2)                                    # H x M x N x d
    z = torch.cat([head for head in z], -1) @ w_cat             # M x N x d
    return z.mean(0)


def test_authors_attention_reduces_to_mean_times_summed_w_cat():
    from Models.mmssl import modal_attention

    torch.manual_seed(0)
    d, heads = 8, 4
    for n_modal in (1, 2, 3):
        views = [torch.randn(5, d, dtype=torch.float64) for _ in range(n_modal)]
        w_q, w_k = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
        w_cat = torch.randn(heads * d, d, dtype=torch.float64)
        want = authors_attention(views, w_q, w_k, w_cat, heads)
        torch.testing.assert_close(modal_attention(views, w_cat, heads), want, rtol=1e-10, atol=1e-10)


def test_paper_attention_against_an_explicit_loop():
    from Models.mmssl import modal_attention

    torch.manual_seed(1)
    d, heads, n = 6, 3, 4
    views = [torch.randn(n, d, dtype=torch.float64) for _ in range(3)]
    w_q, w_k = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    w_cat = torch.randn(heads * d, d, dtype=torch.float64)
    dh = d // heads
    want = torch.zeros(n, d, dtype=torch.float64)
    for node in range(n):
        for y_i in views:
            concat = []
            for h in range(heads):
                q = (y_i[node] @ w_q)[h * dh:(h + 1) * dh]
                logits = torch.stack([q @ (y_j[node] @ w_k)[h * dh:(h + 1) * dh] / math.sqrt(dh) for y_j in views])
                weights = torch.softmax(logits, 0)
                concat.append(sum(weights[j] * views[j][node] for j in range(len(views))))
            want[node] += torch.cat(concat) @ w_cat / len(views)
    got = modal_attention(views, w_cat, heads, w_q, w_k)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, modal_attention(views, w_cat, heads))    # not the authors' reduction


def test_forward_against_a_dense_reference():
    """§3 written with dense matrices: feature branch on the train graph, ID branch on a generated graph,
    mean·W_Σ fusion, id_cat_rate, L = 3 layers with the last-layer softmax, model_cat_rate."""
    model = toy_model("--weight_size", "[8, 8, 8]")
    for m in model.data.modalities:
        model.set_generated(m, *(torch.tensor(a) for a in GENERATED[m]))
    model.eval()
    with torch.no_grad():
        user, item = model.embeddings()
    net, args = model.net, model.args
    r = model.data.train.toarray().astype(np.float64)
    n_u, n_i = np.diag((r.sum(1) + 1e-8) ** -0.5) @ r, np.diag((r.sum(0) + 1e-8) ** -0.5) @ r.T
    e_u, e_i = (p.detach().numpy().astype(np.float64) for p in (net.user_emb, net.item_emb))
    d = e_u.shape[1]
    w_sum = net.attn_cat.detach().numpy().astype(np.float64).reshape(args.head_num, d, d).sum(0)

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    x_u, x_i = [], []
    for m, feat in model.data.features.items():
        enc = net.encoders[m]
        f = feat.astype(np.float64) @ enc.weight.detach().numpy().T.astype(np.float64) + enc.bias.detach().numpy()
        x_u.append(n_u @ f)
        x_i.append(n_i @ x_u[-1])
    n_modal = len(model.data.features)
    y_u, y_i = [], []                                                   # y^m on each modality's own graph
    for m in model.data.features:
        g_u, g_i = one_sided(*GENERATED[m], r.shape)
        y_u.append(g_u @ e_i)
        y_i.append(g_i @ e_u)
    assert not np.allclose(y_u[0], y_u[1])                               # the modalities' graphs differ
    h_u, h_i = np.mean(y_u, 0) @ w_sum, np.mean(y_i, 0) @ w_sum
    us, its = [e_u + args.id_cat_rate * l2n(h_u)], [e_i + args.id_cat_rate * l2n(h_i)]
    for layer in range(3):
        u = n_u @ its[-1]
        u = softmax(u) if layer == 2 else u
        i = n_i @ u
        i = softmax(i) if layer == 2 else i
        us.append(u)
        its.append(i)
    want_u = np.mean(us, 0) + args.model_cat_rate * sum(l2n(x) for x in x_u)
    want_i = np.mean(its, 0) + args.model_cat_rate * sum(l2n(x) for x in x_i)
    assert n_modal == 2
    np.testing.assert_allclose(user.numpy(), want_u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(item.numpy(), want_i, rtol=1e-4, atol=1e-5)


# --- §4 adversarial pieces --------------------------------------------------------------------------

def test_masked_scores_zero_the_train_items_and_normalise_rows():
    from Models.mmssl import masked_scores

    torch.manual_seed(2)
    p, q = torch.randn(3, 4), torch.randn(6, 4)
    rows = torch.tensor([[1, 0, 0, 1, 0, 0], [0] * 6, [0, 1, 1, 1, 1, 0]], dtype=torch.float32)
    want = (p @ q.T).numpy() * (1 - rows.numpy())
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(masked_scores(p, q, rows).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["all", "noise"])
def test_real_rows_are_the_gumbel_smoothed_formula(scope):
    from Models.mmssl import real_rows

    rng = np.random.default_rng(3)
    rows = (rng.random((4, 7)) < 0.4).astype(np.float64)
    uniform = rng.random((4, 7))
    ids = rng.normal(size=(4, 7)) * 0.1
    lam, tau, scale = 0.7, 0.3, 2.0
    g = -np.log(-np.log(uniform + 1e-8) + 1e-8)
    logits = (rows + lam * g) / tau if scope == "all" else rows + lam * g / tau
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    want = soft + scale * ids
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = real_rows(*(torch.tensor(a) for a in (rows, ids, uniform)), lam, tau, scale, scope)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    other = real_rows(*(torch.tensor(a) for a in (rows, ids, uniform)), lam, tau, scale,
                      "noise" if scope == "all" else "all")
    assert not np.allclose(other.numpy(), want)                        # the two scopes differ


def test_gradient_penalty_against_a_per_row_autograd_loop():
    from Models.mmssl import Discriminator, gradient_penalty

    torch.manual_seed(4)
    critic = Discriminator(16, 0.3, 0.5, slope=0.2).double()
    for layer in critic.net:                                   # non-trivial BN statistics, then eval mode:
        if isinstance(layer, torch.nn.BatchNorm1d):            # each row's output depends on that row only
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    critic.eval()
    real, fake = torch.rand(5, 16, dtype=torch.float64), torch.rand(5, 16, dtype=torch.float64)
    alpha = torch.rand(5, 1, dtype=torch.float64)
    terms = []
    for row in range(5):
        x = (alpha[row] * real[row] + (1 - alpha[row]) * fake[row]).detach().requires_grad_(True)
        grad, = torch.autograd.grad(critic(x[None]).sum(), x)
        terms.append((grad.norm() - 1) ** 2)
    want = 0.3 * torch.stack(terms).mean()
    got = gradient_penalty(critic, real, fake, alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weight = critic.net[0].weight
    assert torch.autograd.grad(got, weight)[0].abs().sum() > 0          # built with create_graph: it trains D


def test_discriminator_is_the_authors_shape_and_slope_one_is_the_identity():
    from Models.mmssl import Discriminator

    torch.manual_seed(5)
    authors = Discriminator(40, 0.31, 0.5, slope=1.0)
    linears = [layer for layer in authors.net if isinstance(layer, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(40, 10), (10, 5), (5, 1)]
    assert all(torch.equal(l.bias, torch.zeros_like(l.bias)) for l in linears)
    leaky = Discriminator(40, 0.31, 0.5, slope=1.0)
    leaky.load_state_dict(authors.state_dict())
    leaky.net[1], leaky.net[5] = torch.nn.LeakyReLU(True), torch.nn.LeakyReLU(True)   # the authors' layers
    authors.eval(), leaky.eval()
    x = torch.randn(6, 40)
    torch.testing.assert_close(authors(x), leaky(x))
    assert torch.all((authors(x) >= 0) & (authors(x) <= 100))


# --- §5 one batch -----------------------------------------------------------------------------------

def test_contrastive_loss_against_an_explicit_loop():
    from Models.mmssl import contrastive_loss

    torch.manual_seed(6)
    a, z = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    a[2] = 0.0                                                  # an empty modality-ID row: cosine 0
    tau = 0.4

    def cos(x, y):
        nx, ny = float(torch.linalg.norm(x)), float(torch.linalg.norm(y))
        return 0.0 if nx == 0 or ny == 0 else float(x @ y) / (nx * ny)

    total = 0.0
    for i in range(5):
        within = sum(math.exp(cos(a[i], a[j]) / tau) for j in range(5))
        between = sum(math.exp(cos(a[i], z[j]) / tau) for j in range(5))
        pos = math.exp(cos(a[i], z[i]) / tau)
        total += -math.log(pos / (within + between - math.exp(cos(a[i], a[i]) / tau)) + 1e-8)
    assert contrastive_loss(a, z, tau).item() == pytest.approx(total / 5, rel=1e-10)
    empty = contrastive_loss(torch.zeros(5, 4), z.float(), 0.5)       # §6: an empty graph gives log(2B-1)
    assert empty.item() == pytest.approx(math.log(9), rel=1e-5)


def test_batch_sampling():
    model = toy_model("--batch", "10")
    train = model.data.train.toarray()
    users, positives, negatives = (t.numpy() for t in model.sample_batch())
    assert len(users) == 10 and len(set(users.tolist())) == 10                     # distinct users
    assert np.all(train[users, positives] == 1) and np.all(train[users, negatives] == 0)
    assert model.n_batches() == model.data.train.nnz // 10 + 1
    big = toy_model("--batch", "40", empty_users=(4,))                             # more than the 23 users
    users = big.sample_batch()[0].numpy()
    assert len(users) == 40 and np.all(big.data.train.toarray()[users].sum(1) > 0)
    rows = big.train_rows(torch.from_numpy(users))
    np.testing.assert_array_equal(rows.numpy(), big.data.train.toarray()[users])   # R_b from the CSR


def test_negatives_are_the_rank_th_item_outside_the_train_list(monkeypatch):
    """sample_negatives maps a rank r to the r-th item (in id order) not in the user's train list, and the
    ranks are uniform: every non-train item of every user, once, from the ranks 0 .. I - |train_u| - 1."""
    model = toy_model(empty_users=(5,))
    train = model.data.train.toarray()
    users, ranks, want = [], [], []
    for u in range(model.data.n_users):
        free = np.flatnonzero(train[u] == 0)                                       # explicit complement
        users += [u] * len(free)
        ranks += list(range(len(free)))
        want += free.tolist()
    monkeypatch.setattr(model, "uniform_below", lambda bounds: torch.tensor(ranks))
    got = model.sample_negatives(torch.tensor(users))
    np.testing.assert_array_equal(got.numpy(), want)
    monkeypatch.undo()
    # the ranks: uniform in [0, bound), each value about equally often
    bounds = torch.full((60000,), 7)
    counts = np.bincount(model.uniform_below(bounds).numpy(), minlength=8)
    assert counts[7] == 0 and np.all(np.abs(counts[:7] / 60000 - 1 / 7) < 0.01)


def test_sampling_follows_the_models_generator():
    """The batches come from the model's torch generator alone: the same state, the same batch."""
    model = toy_model("--batch", "8")
    state = model.rng.get_state()
    first = model.sample_batch()
    torch.manual_seed(123)                                                        # the global RNG is not used
    model.rng.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, model.sample_batch()))


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def reference_critic(discriminator, slope):
    """D written out in float64 (§4): Linear, LeakyReLU(slope), BatchNorm on the batch's statistics (train
    mode, biased variance, eps 1e-5), dropout p = 0, twice; Linear; 100·sigmoid. Weights copied from D."""
    layers = [(l.weight.detach().double(), l.bias.detach().double()) for l in discriminator.net
              if isinstance(l, torch.nn.Linear)]
    norms = [(b.weight.detach().double(), b.bias.detach().double()) for b in discriminator.net
             if isinstance(b, torch.nn.BatchNorm1d)]

    def critic(x):
        h = x
        for (w, b), (gamma, beta) in zip(layers[:2], norms):
            h = h @ w.T + b
            h = torch.where(h >= 0, h, slope * h)
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta
        w, b = layers[2]
        return 100.0 / (1.0 + torch.exp(-(h @ w.T + b).view(-1)))

    return critic


LOSS_FLAGS = ("--G_drop1", "0", "--G_drop2", "0", "--drop_rate", "0", "--d_slope", "0.2", "--gp_rate", "0.7",
              "--log_log_scale", "0.01", "--real_data_tau", "0.05", "--ui_pre_scale", "3", "--regs", "0.3",
              "--feat_reg_decay", "0.05", "--cl_rate", "0.4", "--G_rate", "0.2", "--tau", "0.6")


def test_discriminator_loss_against_a_reference():
    """L_D = -mean D(r) + mean D(f) + gp_rate·gp (§5.2), f = cat_m Fake_m, r repeated |M| times, from the
    model's forward outputs and fixed uniform draws, recomputed here in float64."""
    model = toy_model(*LOSS_FLAGS)
    for m in model.data.modalities:
        model.set_generated(m, *(torch.tensor(a) for a in GENERATED[m]))
    model.train()
    users = model.sample_batch()[0]
    b, n_items, n_modal = len(users), model.data.n_items, len(model.data.modalities)
    r_b = model.data.train.toarray()[users.numpy()].astype(np.float64)
    with torch.no_grad():
        out = model.forward_all()                                    # no dropout: the step's forward too
    uniform = torch.rand(b, n_items, generator=torch.Generator().manual_seed(8))
    alpha = torch.rand(n_modal * b, 1, generator=torch.Generator().manual_seed(9))
    critic = reference_critic(model.discriminator, 0.2)

    def s(p, q):                                                    # s(P, Q) of §4
        return l2n((p.double().numpy() @ q.double().numpy().T) * (1.0 - r_b))

    fake = np.concatenate([s(out["modal_user"][m][users], out["modal_item"][m]) for m in model.data.modalities])
    gumbel = -np.log(-np.log(uniform.double().numpy() + 1e-8) + 1e-8)
    logits = (r_b + 0.01 * gumbel) / 0.05
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    real = np.tile(l2n(soft + 3 * s(out["user"][users], out["item"])), (n_modal, 1))
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
    mixed = (alpha.double() * real_t + (1 - alpha.double()) * fake_t).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mixed).sum(), mixed)
    gp = 0.7 * 0.3 * ((grad.norm(dim=1) - 1) ** 2).mean()
    want = [-critic(real_t).mean(), critic(fake_t).mean(), gp]
    want.append(sum(want))
    got = model.discriminator_step(users, model.train_rows(users), uniform, alpha)
    np.testing.assert_allclose(got.numpy(), [float(w) for w in want], rtol=2e-4, atol=1e-5)


def test_recommender_loss_against_a_reference():
    """total = BPR + regs[0]·½(‖u‖²+‖p‖²+‖n‖²)/B + feat_reg_decay·½Σ_m(‖x_u^m‖²+‖x_i^m‖²)/I
    + cl_rate·Σ_m ℓ(y_u^m[b], u[b]) + G_rate·(-mean D(cat_m Fake_m)) (§5.3), y_u^m on each modality's own graph."""
    model = toy_model(*LOSS_FLAGS)
    for m in model.data.modalities:
        model.set_generated(m, *(torch.tensor(a) for a in GENERATED[m]))
    model.train()
    users, positives, negatives = model.sample_batch()
    b, n_items = len(users), model.data.n_items
    r_b = model.data.train.toarray()[users.numpy()].astype(np.float64)
    with torch.no_grad():
        out = model.forward_all()
    critic = reference_critic(model.discriminator, 0.2)
    user, item = out["user"].double().numpy(), out["item"].double().numpy()
    u, p, n = user[users.numpy()], item[positives.numpy()], item[negatives.numpy()]
    bpr = np.mean(np.log1p(np.exp(-((u * p).sum(1) - (u * n).sum(1)))))
    emb = 0.3 * 0.5 * ((u ** 2).sum() + (p ** 2).sum() + (n ** 2).sum()) / b
    feat, cl, fakes = 0.0, 0.0, []
    e_i = model.net.item_emb.detach().double().numpy()
    for m in model.data.modalities:
        x_u, x_i = out["modal_user"][m].double().numpy(), out["modal_item"][m].double().numpy()
        feat += 0.05 * 0.5 * ((x_u ** 2).sum() + (x_i ** 2).sum()) / n_items
        fakes.append(l2n((x_u[users.numpy()] @ x_i.T) * (1.0 - r_b)))
        anchor = (one_sided(*GENERATED[m], (model.data.n_users, n_items))[0] @ e_i)[users.numpy()]
        a, z = l2n(anchor), l2n(u)
        for i in range(b):                                          # ℓ written per anchor
            within = np.exp(a[i] @ a.T / 0.6).sum()
            between = np.exp(a[i] @ z.T / 0.6).sum()
            positive = np.exp(a[i] @ z[i] / 0.6)
            cl += 0.4 * -np.log(positive / (within + between - np.exp(a[i] @ a[i] / 0.6)) + 1e-8) / b
    adv = -0.2 * float(critic(torch.from_numpy(np.concatenate(fakes))).mean())
    want = [bpr, emb, feat, cl, adv, bpr + emb + feat + cl + adv]
    got = model.recommender_step(users, positives, negatives, model.train_rows(users))[0]
    assert all(abs(w) > 1e-4 for w in want)                          # every term counts
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


def test_discriminator_step_changes_only_the_discriminator():
    model = toy_model()
    model.train()
    users, _, _ = model.sample_batch()
    net_before, d_before = snapshot(model.net), snapshot(model.discriminator)
    model.discriminator_step(users, model.train_rows(users))
    assert all(torch.equal(p, net_before[n]) for n, p in model.net.named_parameters())
    assert all(not torch.equal(p, d_before[n]) for n, p in model.discriminator.named_parameters())


def test_recommender_step_changes_the_recommender_and_not_the_discriminator():
    model = toy_model()
    model.train()
    users, positives, negatives = model.sample_batch()
    net_before, d_before = snapshot(model.net), snapshot(model.discriminator)
    model.recommender_step(users, positives, negatives, model.train_rows(users))
    assert all(torch.equal(p, d_before[n]) for n, p in model.discriminator.named_parameters())
    assert all(p.grad is None for p in model.discriminator.parameters())       # frozen, not even a gradient
    changed = {n for n, p in model.net.named_parameters() if not torch.equal(p, net_before[n])}
    assert changed == set(net_before)                                          # every recommender parameter


def test_the_generator_term_reaches_only_the_feature_encoders():
    model = toy_model()
    model.train()
    users = model.sample_batch()[0]
    out = model.forward_all()
    fakes = model.fake_rows(out, users, model.train_rows(users))
    adv = -model.discriminator(torch.cat(list(fakes.values()))).mean()
    names = [n for n, _ in model.net.named_parameters()]
    grads = torch.autograd.grad(adv, list(model.net.parameters()), allow_unused=True)
    reached = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
    assert reached == {n for n in names if n.startswith("encoders.")}


# --- §6 the generated graphs ------------------------------------------------------------------------

def run_batches(model, indices):
    """Train batches with the given in-epoch indices; return each batch's users and the generated user-side
    graphs G_u^m after it (modality -> Graph)."""
    timer, seen = PhaseTimer(CPU), []
    model.train()
    for idx in indices:
        users, positives, negatives = model.sample_batch()
        model.train_batch(idx, users, positives, negatives, timer)
        seen.append((set(users.tolist()), {m: pair[0] for m, pair in model.modal_graphs.items()}))
    return seen


def graph_users(graph) -> set:
    return set(np.flatnonzero(np.diff(graph.matrix.crow_indices().numpy()) > 0).tolist())


def assert_rows_are_top_k(graph, scores, users, k):
    """Each user's row of the graph holds k items whose scores are the k largest of the user's row of
    `scores` (compared by value: ties may pick either item)."""
    rows = dense(graph)
    for u in users:
        kept = np.flatnonzero(rows[u])
        assert len(kept) == k, (u, kept)
        np.testing.assert_allclose(np.sort(scores[u, kept]), np.sort(scores[u])[-k:], rtol=1e-5, atol=1e-6)


def test_authors_schedule_with_t1_leaves_empty_graphs_from_the_third_batch():
    # k = 4 items per user, no dropout; `own` pairing: each row holds the user's own top-k (the behaviour
    # before --gen_pairing existed)
    model = toy_model("--m_topk_rate", "0.25", "--drop_rate", "0", "--gen_pairing", "own")
    # Fake_m of batch 0 computed here, from the parameters before it: masked x_u^m x_i^mᵀ (the row L2 norm
    # does not change the order); the D step does not touch the recommender, its AdamW step comes after
    mask = 1.0 - model.data.train.toarray()
    fake = {m: (x_u @ x_i.T) * mask for m, (x_u, x_i) in feature_views(model).items()}
    seen = run_batches(model, range(4))
    assert seen[0][1]["image"] is model.train_graphs[0]               # batch 0 stores, the graph is still N
    for m in model.data.modalities:
        assert graph_users(seen[1][1][m]) == seen[0][0]               # batch 1 rebuilds from batch 0's top-k
        assert seen[1][1][m].nnz == 4 * len(seen[0][0])
        assert_rows_are_top_k(seen[1][1][m], fake[m], seen[0][0], 4)
        assert seen[2][1][m].nnz == 0 and seen[3][1][m].nnz == 0      # then from an empty store, for good
    assert not np.array_equal(dense(seen[1][1]["image"]), dense(seen[1][1]["text"]))   # per modality
    k_zero = toy_model()                                              # default rate: k = ⌊16·1e-4⌋ = 0
    assert run_batches(k_zero, range(2))[1][1]["image"].nnz == 0


@pytest.mark.parametrize("pairing", ["authors", "own"])
def test_generated_pairs_follow_the_pairing_flag(pairing):
    """--gen_pairing authors: the stored pair a·k + r is (users[(a·k + r) mod B], item r of batch user a's
    top-k) (their repeat(1, k) tiling, HKUDS/MMSSL MMSSL/main.py:401); own: (users[a], that item). Checked
    against explicit index loops, in store order, and the rebuilt graph against dense numpy."""
    flags = ("--m_topk_rate", "0.25") + (() if pairing == "authors" else ("--gen_pairing", "own"))
    model = toy_model(*flags)                                         # k = ⌊16·0.25⌋ = 4, B = 6
    k, n_items = 4, model.data.n_items
    users = torch.tensor([9, 2, 17, 5, 11, 0])
    rng = np.random.default_rng(3)
    fakes = {m: torch.from_numpy(rng.permutation(len(users) * n_items).reshape(len(users), n_items)
                                 .astype(np.float32)) for m in model.data.modalities}   # distinct: no ties
    model.refresh_graphs(0, users, fakes, {})
    b = len(users)
    for m, fake in fakes.items():
        ranked = np.argsort(-fake.numpy(), axis=1)[:, :k]            # item r of batch user a: ranked[a, r]
        want_u = [int(users[(a * k + r) % b] if pairing == "authors" else users[a]) for a in range(b) for r in range(k)]
        want_i = [int(ranked[a, r]) for a in range(b) for r in range(k)]
        (got_u, got_i), = model.store[m]
        assert got_u.tolist() == want_u and got_i.tolist() == want_i
        if pairing == "authors":                                      # some rows hold another user's items
            assert any(want_u[a * k + r] != users[a] for a in range(b) for r in range(k))
    model.refresh_graphs(1, users, fakes, {})                         # idx % T == 0: rebuild from the store
    for m, fake in fakes.items():
        ranked = np.argsort(-fake.numpy(), axis=1)[:, :k]
        want_u = [int(users[(a * k + r) % b] if pairing == "authors" else users[a]) for a in range(b) for r in range(k)]
        g_u, g_i = one_sided(want_u, ranked.reshape(-1).tolist(), (model.data.n_users, n_items))
        np.testing.assert_allclose(dense(model.modal_graphs[m][0]), g_u, rtol=1e-6)
        np.testing.assert_allclose(dense(model.modal_graphs[m][1]), g_i, rtol=1e-6)
        assert not model.store[m]


def test_authors_store_survives_epochs():
    model = toy_model("--m_topk_rate", "0.25", "--T", "2")
    seen = run_batches(model, [0, 1, 2, 3, 0, 1, 2])                  # an epoch of 4 batches, then 3 more
    assert graph_users(seen[2][1]["image"]) == seen[0][0] | seen[1][0]
    assert graph_users(seen[6][1]["image"]) == seen[3][0] | seen[4][0] | seen[5][0]   # batch 3 of the last epoch


def test_full_schedule_keeps_the_top_items_of_every_user_with_a_train_item():
    empty = (2, 7)                                                    # users without a train item: no rows
    model = toy_model("--gen_graph", "full", empty_users=empty)       # k = max(1, 0)
    active = [u for u in range(model.data.n_users) if u not in empty]
    seen = run_batches(model, range(3))
    assert all(graph.nnz == len(active) for _, graphs in seen for graph in graphs.values())
    assert all(graph_users(graph) == set(active) for _, graphs in seen for graph in graphs.values())
    model = toy_model("--gen_graph", "full", "--m_topk_rate", "0.25", "--drop_rate", "0", empty_users=empty)
    model.train()
    out = model.forward_all()
    model.refresh_graphs(0, model.sample_batch()[0], {}, out)
    mask = 1.0 - model.data.train.toarray()
    for m, (x_u, x_i) in feature_views(model).items():               # each row: the top-4 masked scores
        graph = model.modal_graphs[m][0]
        assert graph_users(graph) == set(active)
        assert_rows_are_top_k(graph, (x_u @ x_i.T) * mask, active, 4)


# --- the model through the harness ---------------------------------------------------------------------

def test_trains_beats_popularity_and_the_checkpoint_reloads_identically(gen_dir, tmp_path):
    out = tmp_path / "mmssl"
    argv = ["--data", "gen", "--data_dir", str(gen_dir), "--model", "mmssl", "--quiet", "--out_dir", str(out),
            "--epoch", "3", "--batch", "128", "--lr", "0.01", "--m_topk_rate", "0.05", "--T", "2"]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (ours, popularity)
    assert set(summary["timing"]["seconds_per_phase_mean"]) == {"sampling", "discriminator", "recommender",
                                                                 "graph", "evaluation"}
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["loss"]) == {"bpr", "emb", "feat", "cl", "adv", "loss"} and "loss" in record["d_loss"]
    # the best checkpoint (with its generated graphs, without the discriminator) scores as at its epoch
    state = torch.load(out / "best_model.pt", weights_only=True)
    assert state["state_dict"] and not any(name.startswith("discriminator.") for name in state["state_dict"])
    from evaluate import evaluate_run
    assert evaluate_run(out, device="cpu")["identical"]                 # evaluate.py's reload
    args = parse_args(argv)
    data = inference.load_run_data(args, needs_features=True)
    fresh = inference.build_model(args, data, CPU)
    fresh.load_checkpoint_state(state)
    fresh.eval()
    with torch.no_grad():
        reloaded = evaluate(fresh.scorer(), data.train, data.test, [20], 256, CPU)
    assert reloaded == pytest.approx(summary["protocols"]["validation"]["test"], rel=1e-6)
    # last.pt restores the optimisers, the discriminator, the sampler and the store
    last = torch.load(out / "last.pt", weights_only=True)
    initial = {name: value.clone() for name, value in fresh.discriminator.state_dict().items()}
    fresh.load_training_state(last["model"])
    assert fresh.d_optimizer.state_dict()["state"] and fresh.optimizer.state_dict()["state"]
    trained = fresh.discriminator.state_dict()
    assert all(torch.equal(trained[name], value) for name, value in last["model"]["discriminator"].items())
    assert not torch.equal(trained["net.0.weight"], initial["net.0.weight"])
    assert torch.equal(fresh.rng.get_state(), last["model"]["stateful"]["rng"])


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_numbers(tiny_dir, tmp_path, monkeypatch):
    """last.pt holds D, both optimisers, the batch generator and the store (and the harness the global RNG):
    a run stopped after epoch 1 and resumed logs exactly the uninterrupted run's losses and metrics."""
    extra = ("--model", "mmssl", "--epoch", "3", "--batch", "16", "--embed_size", "8", "--head_num", "2",
             "--m_topk_rate", "0.25", "--T", "3")
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, *extra)


def test_impossible_configurations_are_one_sentence(tmp_path):
    from Models.mmssl import MMSSL

    model = toy_model()
    args, data = model.args, model.data
    for flags, phrase in [(["--mm_attn", "paper", "--head_num", "3"], "head_num must divide embed_size"),
                          (["--T", "0"], "--T must be at least 1"),
                          (["--tau", "0"], "--tau must be positive"),
                          (["--G_drop1", "1.0"], "--G_drop1 is a dropout rate")]:
        bad = build_parser("mmssl").parse_args(["--model", "mmssl", "--embed_size", "8", *flags])
        problem = MMSSL.check(bad, data)
        assert phrase in problem and problem.count(". ") == 0 and "\n" not in problem
        assert MMSSL.check_flags(bad) == problem   # needs no data: refused when the command line is parsed
        with pytest.raises(SystemExit):
            parse_args(["--model", "mmssl", "--embed_size", "8", *flags])
    assert MMSSL.check(args, data) is None
    small = Data("small", *(sp.csr_matrix(np.eye(5, 6, dtype=np.float32)) for _ in range(3)),
                 features={"image": np.ones((6, 2), np.float32)})
    assert "at least 8 items" in MMSSL.check(args, small)
    # no feature file: the harness's needs_features refuses it with exit code 2
    train, val, test, _ = hand_made()
    from conftest import write_dataset
    write_dataset(tmp_path / "data" / "nofeat", train, val, test)
    assert Main.main(tiny_args(tmp_path / "data", tmp_path / "run", "--model", "mmssl", data="nofeat")) == 2
