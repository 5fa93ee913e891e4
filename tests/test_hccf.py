"""HCCF against references written here on toy data (loops and dense float64 arrays, 5-9 users), never the model's
code checked against itself: the hypergraph propagation, the local propagation with its edge dropout, the local-
global contrast, the whole loss and its gradients (the authors' TF computation and SSLRec's); then the batches, the
learning-rate decay, `--kernels plain`, a short training run against popularity and an exact resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import Main
from DataHandler import Data
from Models.hccf import HCCF, contrast, hyper_propagate
from Params import parse_args
from Models.base import PhaseTimer
from conftest import assert_resumes_exactly, write_dataset

CPU = torch.device("cpu")
SSLREC = ("--loss", "bpr", "--sampling", "pairs", "--decay", "1", "--hyper_layers", "0", "--residual", "false",
          "--local_act", "none", "--leaky", "1", "--ssl_proj", "false", "--ssl_detach", "true",
          "--ssl_negatives", "all", "--ssl_items", "pos", "--ssl_reduce", "mean", "--ssl_eps", "sslrec",
          "--temp", "0.1", "--ssl_reg", "1.0", "--reg", "1e-7", "--mult", "1.5")


def toy_data(n_users=7, n_items=9, seed=0, empty_user=False) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.35).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0
    if empty_user:
        train[-1] = 0.0
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return Data("toy", sp.csr_matrix(train), empty, empty, {})


def toy_model(*extra, data=None, scale=0.7) -> HCCF:
    args = parse_args(["--model", "hccf", "--quiet", "--latdim", "4", "--hyperNum", "3", "--batch", "4", *extra])
    torch.manual_seed(0)
    model = HCCF(args, data or toy_data(), CPU)
    with torch.no_grad():   # larger, signed entries than Xavier's on 7 rows: every LeakyReLU branch is taken
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


def leaky64(x, a):
    return torch.maximum(a * x, x)


def unit(x):
    """x / √max(Σx², 1e-12) (tf.nn.l2_normalize: a zero row stays zero)."""
    return x / torch.sqrt(torch.clamp((x ** 2).sum(), min=1e-12))


def toy_draws(model: HCCF, seed=1):
    """Masks with 40% of the entries dropped: 1/κ where kept, 0 where dropped (the model's format)."""
    g = torch.Generator().manual_seed(seed)
    nnz, h, keep = len(model.values_u), model.args.hyperNum, model.args.keepRate
    sizes = {"user_edges": (nnz,), "item_edges": (nnz,), "user_hyper": (model.data.n_users, h),
             "item_hyper": (model.data.n_items, h)}
    return [{k: (torch.rand(s, generator=g) < 0.6).float() / keep for k, s in sizes.items()}
            for _ in range(model.args.gnn_layer)]


def edge_masks(train: np.ndarray, draws):
    """The kept edges of every layer as dicts (u, i) -> bool: the user-side mask enumerates the edges row by row
    (u, then i), the item-side one column by column (i, then u)."""
    by_row = [(u, i) for u in range(train.shape[0]) for i in range(train.shape[1]) if train[u, i]]
    by_col = [(u, i) for i in range(train.shape[1]) for u in range(train.shape[0]) if train[u, i]]
    return [({e: bool(d["user_edges"][k] > 0) for k, e in enumerate(by_row)},
             {e: bool(d["item_edges"][k] > 0) for k, e in enumerate(by_col)}) for d in draws]


# ------------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("slope,steps", [(1.0, 0), (0.5, 2)])
def test_hypergraph_propagation_matches_a_dense_reference(slope, steps):
    rng = np.random.default_rng(3)
    n, h, d = 6, 3, 4
    incidence, x = rng.normal(size=(n, h)), rng.normal(size=(n, d))
    maps = rng.normal(size=(steps, h, h))
    got = hyper_propagate(torch.tensor(incidence), torch.tensor(x), torch.tensor(maps) if steps else None, slope)
    if slope == 1.0 and steps == 0:
        want = (incidence @ incidence.T) @ x                          # the N x N matrix H Hᵀ, formed here only
    else:
        def act(v):
            return np.maximum(slope * v, v)
        lam = np.zeros((h, d))
        for k in range(h):                                           # Λ_k = σ(Σ_n H_nk x_n)
            lam[k] = act(sum(incidence[m, k] * x[m] for m in range(n)))
        for v in maps:                                               # Λ ← σ(VΛ) + Λ
            lam = np.stack([act(sum(v[k, j] * lam[j] for j in range(h))) for k in range(h)]) + lam
        want = np.stack([act(sum(incidence[m, k] * lam[k] for k in range(h))) for m in range(n)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_local_propagation_with_edge_dropout_matches_a_loop_over_neighbours():
    """Z^u = σ(Σ_{i ∈ N(u), kept} ā_ui/κ e_i), Z^i = σ(Σ_{u ∈ N(i), kept'} ā_ui/κ e_u), ā_ui = 1/((√(d_u+1e-8)+1e-8)
    (√(d_i+1e-8)+1e-8)), two independent masks; values and the gradients through both products."""
    model = toy_model("--gnn_layer", "1", "--keepRate", "0.6", "--leaky", "0.3")
    draws = toy_draws(model)
    zu, zi = model.forward_layers(draws)[2][0]
    weights = torch.randn(*zu.shape, generator=torch.Generator().manual_seed(5)), \
        torch.randn(*zi.shape, generator=torch.Generator().manual_seed(6))
    ((zu * weights[0]).sum() + (zi * weights[1]).sum()).backward()

    r = model.data.train.toarray()
    keep_u, keep_i = edge_masks(r, draws)[0]
    du, di = r.sum(1), r.sum(0)
    eu = model.user_emb.detach().double().requires_grad_()
    ei = model.item_emb.detach().double().requires_grad_()
    rows_u, rows_i = [], []
    for u in range(r.shape[0]):
        acc = torch.zeros(4, dtype=torch.float64)
        for i in np.flatnonzero(r[u]):
            if keep_u[(u, i)]:
                acc = acc + ei[i] / ((math.sqrt(du[u] + 1e-8) + 1e-8) * (math.sqrt(di[i] + 1e-8) + 1e-8)) / 0.6
        rows_u.append(leaky64(acc, 0.3))
    for i in range(r.shape[1]):
        acc = torch.zeros(4, dtype=torch.float64)
        for u in np.flatnonzero(r[:, i]):
            if keep_i[(u, i)]:
                acc = acc + eu[u] / ((math.sqrt(du[u] + 1e-8) + 1e-8) * (math.sqrt(di[i] + 1e-8) + 1e-8)) / 0.6
        rows_i.append(leaky64(acc, 0.3))
    ref_u, ref_i = torch.stack(rows_u), torch.stack(rows_i)
    ((ref_u * weights[0].double()).sum() + (ref_i * weights[1].double()).sum()).backward()
    np.testing.assert_allclose(zu.detach().numpy(), ref_u.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zi.detach().numpy(), ref_i.detach().numpy(), rtol=1e-5, atol=1e-6)
    # the backward of each product runs through its exact transpose (E^i gets Z^u's gradient, E^u Z^i's)
    np.testing.assert_allclose(model.item_emb.grad.numpy(), ei.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.user_emb.grad.numpy(), eu.grad.numpy(), rtol=1e-5, atol=1e-6)


def unit_sslrec(x):
    """(x + 1e-8) / max(‖x + 1e-8‖, 1e-12) (SSLRec's F.normalize(x + 1e-8): a zero row becomes (1..1)/√d)."""
    x = x + 1e-8
    return x / max(float(np.linalg.norm(x)), 1e-12) if isinstance(x, np.ndarray) else x / torch.clamp(x.norm(), 1e-12)


@pytest.mark.parametrize("negatives,proj,eps,plain", [("batch", True, "tf", False), ("batch", False, "sslrec", True),
                                                       ("all", False, "sslrec", False), ("all", True, "tf", True)])
def test_contrast_matches_a_per_anchor_loop(negatives, proj, eps, plain):
    rng = np.random.default_rng(4)
    local, hyper = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    local[3] = 0.0                                  # a node whose edges were all dropped: the two forms differ here
    p = rng.normal(size=(5, 5)) if proj else np.eye(5)
    nodes = np.array([6, 1, 3, 4])
    temp = 0.7
    got = contrast(torch.tensor(local, dtype=torch.float32), torch.tensor(hyper, dtype=torch.float32),
                   torch.tensor(nodes), temp, torch.tensor(p, dtype=torch.float32) if proj else None, negatives, eps,
                   plain)

    def unit_(x):
        return unit(torch.tensor(x)).numpy() if eps == "tf" else unit_sslrec(x)

    want = []
    others = nodes if negatives == "batch" else range(8)
    for n in nodes:
        z = unit_(local[n])
        g = unit_(hyper[n]) @ p
        denominator = sum(math.exp(z @ (unit_(hyper[m]) @ p) / temp) for m in others)
        want.append(-math.log(math.exp(z @ g / temp) / (denominator + 1e-8) + (1e-8 if eps == "tf" else 0.0)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


# ------------------------------------------------------------------------------------ the whole loss
def reference_loss(model: HCCF, users, positives, negatives, user_nodes, item_nodes, draws):
    """The loss of one batch in float64 with dense matrices, written from the equations with the flags' variants;
    returns the terms and the gradient of every parameter."""
    a = model.args
    r = model.data.train.toarray().astype(np.float64)
    U, n_items = r.shape
    norm = np.outer(1 / (np.sqrt(r.sum(1) + 1e-8) + 1e-8), 1 / (np.sqrt(r.sum(0) + 1e-8) + 1e-8)) * r
    params = {n: p.detach().double().clone().requires_grad_() for n, p in model.named_parameters()}
    eu, ei = params["user_emb"], params["item_emb"]
    keep = a.keepRate

    def act(x):
        return leaky64(x, a.leaky)

    masks = edge_masks(r, draws) if draws else None
    hu_all, hi_all = eu @ params["user_hyper"] * a.mult, ei @ params["item_hyper"] * a.mult
    layer_u, layer_i, total_u, total_i, local, glob = eu, ei, eu, ei, [], []
    for layer in range(a.gnn_layer):
        adj_u, adj_i, hu, hi = norm.copy(), norm.copy(), hu_all, hi_all
        if draws:
            keep_u, keep_i = masks[layer]
            for (u, i), kept in keep_u.items():
                adj_u[u, i] *= kept / keep
            for (u, i), kept in keep_i.items():
                adj_i[u, i] *= kept / keep
            hu = hu_all * (draws[layer]["user_hyper"] > 0).double() / keep
            hi = hi_all * (draws[layer]["item_hyper"] > 0).double() / keep
        zu, zi = torch.tensor(adj_u) @ layer_i, torch.tensor(adj_i).T @ layer_u
        if a.local_act == "leaky":
            zu, zi = act(zu), act(zi)

        def hyper(inc, x, maps):
            lam = act(inc.T @ x)
            for v in (maps if maps is not None else []):
                lam = act(v @ lam) + lam
            return act(inc @ lam)

        gu = hyper(hu, layer_u, params["user_maps"][layer] if "user_maps" in params else None)
        gi = hyper(hi, layer_i, params["item_maps"][layer] if "item_maps" in params else None)
        local.append((zu, zi))
        glob.append((gu, gi))
        layer_u, layer_i = (zu + gu + layer_u, zi + gi + layer_i) if a.residual else (zu + gu, zi + gi)
        total_u, total_i = total_u + layer_u, total_i + layer_i
    diff = (total_u[users] * total_i[positives]).sum(-1) - (total_u[users] * total_i[negatives]).sum(-1)
    if a.loss == "hinge":
        rec = torch.clamp(1 - diff, min=0).sum() / a.batch
    else:
        rec = -torch.log(torch.sigmoid(diff)).mean()
    ssl = 0.0
    for layer in range(a.gnn_layer):
        for z_all, g_all, nodes in ((local[layer][0], glob[layer][0], user_nodes),
                                    (local[layer][1], glob[layer][1], item_nodes)):
            if a.ssl_detach:
                z_all = z_all.detach()
            p = params["ssl_proj"][layer] if "ssl_proj" in params else torch.eye(a.latdim, dtype=torch.float64)
            others = nodes if a.ssl_negatives == "batch" else range(len(g_all))
            terms = []
            norm = unit if a.ssl_eps == "tf" else unit_sslrec
            for n in nodes:
                z = norm(z_all[n])
                g = norm(g_all[n]) @ p
                den = sum(torch.exp(z @ (norm(g_all[m]) @ p) / a.temp) for m in others)
                terms.append(-torch.log(torch.exp(z @ g / a.temp) / (den + 1e-8) + (1e-8 if a.ssl_eps == "tf" else 0)))
            ssl = ssl + (sum(terms) if a.ssl_reduce == "sum" else sum(terms) / len(terms))
    reg = sum((params[n] ** 2).sum() for n in ("user_emb", "item_emb", "user_hyper", "item_hyper"))
    terms = {"hinge" if a.loss == "hinge" else "bpr": rec, "ssl": a.ssl_reg * ssl, "reg": a.reg * reg}
    sum(terms.values()).backward()
    return {k: v.item() for k, v in terms.items()}, {n: p.grad.numpy() for n, p in params.items()}


@pytest.mark.parametrize("flags", [(), SSLREC], ids=["tf", "sslrec"])
def test_loss_and_gradients_match_a_dense_reference(flags):
    # SSLRec's variant is linear (slope 1, no mapping): smaller entries keep its scores in a sigmoid's range
    model = toy_model("--keepRate", "0.6", "--ssl_reg", "0.3", "--reg", "0.01", "--hyper_layers", "2", *flags,
                      scale=0.3 if flags else 0.7)
    draws = toy_draws(model)
    users, positives = torch.tensor([0, 0, 2, 5, 6, 6]), torch.tensor([1, 4, 2, 8, 0, 0])
    negatives = torch.tensor([3, 3, 7, 1, 5, 2])
    user_nodes, item_nodes = torch.tensor([0, 2, 5, 6]), torch.tensor([0, 1, 2, 3, 4, 5, 7, 8])
    if model.args.ssl_items == "pos":
        item_nodes = torch.tensor([0, 1, 2, 4, 8])
    terms = model.batch_loss(users, positives, negatives, None, None, draws)   # anchors from the pairs
    sum(terms.values()).backward()
    want, grads = reference_loss(model, users, positives, negatives, user_nodes, item_nodes, draws)
    assert set(terms) == set(want)
    for name, value in want.items():
        assert terms[name].item() == pytest.approx(value, rel=2e-5), name
    got = {n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(got[name].numpy(), grad, rtol=2e-4, atol=2e-5 * np.abs(grad).max(), err_msg=name)


def test_evaluation_has_no_dropout_and_kernels_plain_gives_the_same_loss():
    model = toy_model("--keepRate", "0.5")
    plain = toy_model("--keepRate", "0.5", "--kernels", "plain")
    plain.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        a, b = model.embeddings(), model.embeddings()
        want = model.forward_layers(None)[:2]
    assert all(torch.equal(x, y) and torch.equal(x, w) for x, y, w in zip(a, b, want))
    draws = toy_draws(model)
    batch = torch.tensor([0, 1, 4]), torch.tensor([2, 3, 0]), torch.tensor([5, 6, 8])
    fast_terms, plain_terms = model.batch_loss(*batch, draws=draws), plain.batch_loss(*batch, draws=draws)
    for name, value in fast_terms.items():
        assert plain_terms[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name


# ------------------------------------------------------------------------------------ the training loop
def test_the_authors_batches_users_with_up_to_sampnum_positives():
    data = toy_data(n_users=9, empty_user=True)                       # user 8 has no train item
    r = data.train.toarray()
    batches = toy_model("--sampNum", "2", "--trnNum", "9", data=data).sample_epoch()
    assert len(batches) == 3                                           # 9 users in batches of 4
    seen = []
    for b in range(len(batches)):
        users, pos, neg = (t.numpy() for t in (batches.users[b], batches.positives[b], batches.negatives[b]))
        distinct = np.unique(users)
        assert len(distinct) <= 4 and np.array_equal(np.sort(batches.user_nodes[b].numpy()), distinct)
        assert np.array_equal(np.sort(batches.item_nodes[b].numpy()), np.unique(np.concatenate([pos, neg])))
        for u in distinct:                                             # min(sampNum, degree) pairs each
            assert (users == u).sum() == min(2, int(r[u].sum()))
            assert r[u, pos[users == u]].all() and not r[u, neg[users == u]].any()
        seen.extend(distinct)
    assert sorted(seen) == list(range(8))          # every user once; the one without train items adds no pair
    few = toy_model("--trnNum", "5", data=data).sample_epoch()         # trnNum users an epoch
    assert len(few) == 2 and len(np.unique(np.concatenate([t.numpy() for t in few.users]))) <= 5

    pairs = toy_model(*SSLREC, "--batch", "5", data=data).sample_epoch()
    users = np.concatenate([t.numpy() for t in pairs.users])
    items = np.concatenate([t.numpy() for t in pairs.positives])
    assert sorted(zip(users, items)) == sorted(zip(*np.nonzero(r)))   # every train pair once
    for b in range(len(pairs)):
        assert np.array_equal(pairs.item_nodes[b].numpy(), np.unique(pairs.positives[b].numpy()))   # positives only


def test_learning_rate_decays_every_trnnum_over_batch_steps():
    model = toy_model("--trnNum", "8", "--lr", "0.01", "--decay", "0.5", "--keepRate", "1.0")   # 2 batches an epoch
    rates = []
    for epoch in range(3):
        rates.append(model.optimizer.param_groups[0]["lr"])
        model.train_epoch(epoch, PhaseTimer(CPU))
    assert rates == pytest.approx([0.01, 0.005, 0.0025])


def blocks(n_users=160, n_items=80, groups=4, per_user=8, seed=0):
    """Users in 4 groups, each interacting with 10 random items of its group's 20 (8 train, 1 val, 1 test): every
    item about equally popular, so only the collaborative signal ranks the held-out item high."""
    rng = np.random.default_rng(seed)
    train, val, test = (np.zeros((n_users, n_items)) for _ in range(3))
    size = n_items // groups
    for u in range(n_users):
        items = (u % groups) * size + rng.permutation(size)[:per_user + 2]
        train[u, items[:per_user]], val[u, items[per_user]], test[u, items[per_user + 1]] = 1, 1, 1
    return train, val, test


def test_trains_and_beats_popularity(tmp_path):
    """The authors' defaults but batches of 16 users (10 steps an epoch here), 4 epochs. (On conftest's generated
    data, where popularity is strong, the TF defaults stay below popularity for 30 epochs: docs/models/hccf.md.)"""
    write_dataset(tmp_path / "data" / "blocks", *blocks())
    out = tmp_path / "hccf"
    argv = ["--data", "blocks", "--data_dir", str(tmp_path / "data"), "--model", "hccf", "--quiet", "--out_dir",
            str(out), "--epoch", "4", "--batch", "16", "--tstEpoch", "1"]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.03, (ours, popularity)
    assert set(summary["timing"]["seconds_per_phase_mean"]) == {"sampling", "augment", "recommender", "evaluation"}
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["loss"]) == {"hinge", "ssl", "reg", "loss"}


def test_an_interrupted_run_resumes_to_the_same_numbers(tiny_dir, tmp_path, monkeypatch):
    extra = ("--model", "hccf", "--epoch", "3", "--batch", "8", "--tstEpoch", "1", "--latdim", "8", "--hyperNum", "8")
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, *extra)


def test_impossible_flags_are_one_sentence():
    for flags, phrase in [(["--keepRate", "0"], "keep rate"), (["--temp", "0"], "must be positive"),
                          (["--hyperNum", "0"], "at least 1"), (["--hyper_layers", "-1"], "0 or more")]:
        args = parse_args(["--model", "hccf", "--quiet"])
        for name, value in zip(flags[::2], flags[1::2]):
            setattr(args, name[2:], type(getattr(args, name[2:]))(value))
        assert phrase in HCCF.check_flags(args)
    args = parse_args(["--model", "hccf", "--quiet"])
    assert HCCF.check_flags(args) is None
    assert (args.latdim, args.hyperNum, args.gnn_layer, args.leaky, args.keepRate, args.temp, args.ssl_reg,
            args.reg, args.batch, args.lr, args.epoch, args.patience) == (32, 128, 2, 0.5, 0.5, 1.0, 1e-4, 1e-5, 256,
                                                                          1e-3, 100, 0)
