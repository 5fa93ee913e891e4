"""SGL (Models/sgl.py) against references written here: the three augmentations on a toy graph (plain loops and
dense numpy), the InfoNCE of every --ssl_mode as a loop over anchors, the whole batch loss and its gradients in
dense float64 autograd; then the authors' sampler, the flags, a short training run that beats popularity,
--kernels plain, and an exact resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import inference
import Main
from DataHandler import Data
from Models.sgl import (SGL, aug_type, edge_dropout, host_distinct, node_dropout, propagate_views, ssl_loss,
                        user_first_sample)
from Params import build_parser, parse_args
from Models.base import PhaseTimer
from conftest import assert_resumes_exactly, tiny_args

CPU = torch.device("cpu")


def toy_data(n_users=7, n_items=9, seed=0) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.4).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0   # every user has a train item
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return Data("toy", sp.csr_matrix(train), empty, empty, {})


def toy_model(*extra, data=None, seed=0) -> SGL:
    torch.manual_seed(seed)
    data = data or toy_data()
    return SGL(parse_args(["--model", "sgl", "--quiet", "--embed_size", "4", *extra]), data, CPU)


def dense_norm(edges, n_users, n_items):
    """D^-1/2 A D^-1/2 of a set of (u, i) edges by loops: A binary bipartite, no self-loops, 0 where D is 0."""
    n = n_users + n_items
    a = np.zeros((n, n))
    for u, i in edges:
        a[u, n_users + i] = a[n_users + i, u] = 1.0
    degree = a.sum(1)
    out = np.zeros_like(a)
    for r in range(n):
        for c in range(n):
            if a[r, c]:
                out[r, c] = a[r, c] / math.sqrt(degree[r] * degree[c])
    return out


def edges_of(graph, n_users):
    """The (u, i) edges a normalised graph holds (its non-zero user-item block)."""
    block = graph.to_dense().numpy()[:n_users, n_users:]
    return {(int(u), int(i)) for u, i in zip(*np.nonzero(block))}


def train_edges(data):
    return {(int(u), int(i)) for u, i in zip(*data.train.nonzero())}


# ------------------------------------------------------------------------------------------ augmentations
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_edge_dropout_keeps_int_of_e_times_one_minus_rho_train_edges_normalised_as_the_code(ratio):
    model = toy_model("--aug_type", "ed", "--ssl_ratio", str(ratio))
    data = model.data
    everything = train_edges(data)
    graph = model.subgraph(np.random.default_rng(3))
    kept = edges_of(graph, data.n_users)
    assert len(kept) == int(len(everything) * (1 - ratio)) and kept < everything
    np.testing.assert_allclose(graph.to_dense().numpy(), dense_norm(kept, data.n_users, data.n_items), rtol=1e-6)
    # the full graph: every train edge, the same normalisation (no self-loops, no epsilon)
    np.testing.assert_allclose(model.graph.to_dense().numpy(), dense_norm(everything, data.n_users, data.n_items),
                               rtol=1e-6)
    # --ssl_ratio 0: both views are the train graph, as the code (no draw)
    unchanged = toy_model("--ssl_ratio", "0")
    assert unchanged.subgraph(np.random.default_rng(3)) is unchanged.graph


def test_bernoulli_draws_drop_each_edge_and_node_with_probability_rho():
    rng = np.random.default_rng(0)
    masks = np.stack([edge_dropout(1000, 0.3, rng, "bernoulli") for _ in range(200)])
    assert abs(masks.mean() - 0.7) < 0.005 and len({int(m.sum()) for m in masks}) > 10   # not a fixed count
    users, items = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    counts = [len(node_dropout(users, items, 1000, 500, 0.2, rng, "bernoulli")[1]) for _ in range(100)]
    assert abs(np.mean(counts) - 200) < 5 and len(set(counts)) > 5


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_node_dropout_removes_every_edge_of_a_dropped_node_and_no_other(ratio):
    data = toy_data(n_users=10, n_items=12, seed=1)
    model = toy_model("--aug_type", "nd", "--ssl_ratio", str(ratio), data=data)
    _, dropped_users, dropped_items = node_dropout(model.edge_users, model.edge_items, data.n_users, data.n_items,
                                                   ratio, np.random.default_rng(5))
    assert len(set(dropped_users.tolist())) == len(dropped_users) == int(data.n_users * ratio)
    assert len(set(dropped_items.tolist())) == len(dropped_items) == int(data.n_items * ratio)
    want = set()
    for u, i in train_edges(data):                       # the reference: a plain loop over the train edges
        if u not in set(dropped_users.tolist()) and i not in set(dropped_items.tolist()):
            want.add((u, i))
    graph = model.subgraph(np.random.default_rng(5))     # the same draws through the model
    assert edges_of(graph, data.n_users) == want
    np.testing.assert_allclose(graph.to_dense().numpy(), dense_norm(want, data.n_users, data.n_items), rtol=1e-6)


def test_random_walk_draws_a_fresh_graph_per_layer_and_view_and_propagates_through_them():
    model = toy_model("--aug_type", "rw", "--n_layers", "3", "--ssl_ratio", "0.3")
    data = model.data
    first, second = model.augment(np.random.default_rng(2))
    assert len(first) == len(second) == 3
    dense = [g.to_dense().numpy() for g in (*first, *second)]
    assert all(not np.array_equal(dense[a], dense[b]) for a in range(6) for b in range(a))
    n_kept = int(len(train_edges(data)) * 0.7)
    for g in (*first, *second):
        kept = edges_of(g, data.n_users)
        assert len(kept) == n_kept
        np.testing.assert_allclose(g.to_dense().numpy(), dense_norm(kept, data.n_users, data.n_items), rtol=1e-6)
    # E_l = G_l E_{l-1}, mean over l = 0..3, by a loop in float64
    x = np.random.default_rng(0).normal(size=(data.n_users + data.n_items, 4))
    layers, e = [x], x
    for d in dense[:3]:
        e = d @ e
        layers.append(e)
    got = propagate_views(first, torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got, np.mean(layers, 0), rtol=1e-5, atol=1e-6)
    # ed and nd: one graph per view, used at every layer; the two views differ
    for aug in ("ed", "nd"):
        one, two = toy_model("--aug_type", aug, "--ssl_ratio", "0.3").augment(np.random.default_rng(2))
        assert len(one) == 3 and one[0] is one[1] is one[2] and two[0] is two[2]
        assert not np.array_equal(one[0].to_dense().numpy(), two[0].to_dense().numpy())


# ------------------------------------------------------------------------------------------ InfoNCE
def loop_info_nce(z1, z2, anchors, temp):
    """Σ over anchors (duplicates counted) of -log(exp(s(z1_a, z2_a)/τ) / Σ_v exp(s(z1_a, z2_v)/τ)), cosines."""
    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    total = 0.0
    for a in anchors:
        denominator = sum(math.exp(cos(z1[a], z2[v]) / temp) for v in range(len(z2)))
        total += -math.log(math.exp(cos(z1[a], z2[a]) / temp) / denominator)
    return total


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("mode", ["both_side", "user_side", "item_side", "merge"])
def test_info_nce_matches_a_loop_over_anchors(mode, plain):
    rng = np.random.default_rng(4)
    u1, u2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    i1, i2 = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    users, items = np.array([0, 3, 3, 5, 1]), np.array([2, 2, 7, 0, 4])
    temp = 0.3
    if mode == "merge":       # distinct batch users and items, each against that merged set only
        keep_u, keep_i = sorted(set(users.tolist())), sorted(set(items.tolist()))
        z1 = np.concatenate([u1[keep_u], i1[keep_i]])
        z2 = np.concatenate([u2[keep_u], i2[keep_i]])
        want = loop_info_nce(z1, z2, range(len(z1)), temp)
    else:
        want = ((loop_info_nce(u1, u2, users, temp) if mode != "item_side" else 0.0)
                + (loop_info_nce(i1, i2, items, temp) if mode != "user_side" else 0.0))
    t = [torch.from_numpy(a).float() for a in (u1, i1, u2, i2)]
    got = ssl_loss((t[0], t[1]), (t[2], t[3]), torch.from_numpy(users), torch.from_numpy(items), temp, mode, plain)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # the train loop's distinct anchors, found on the host per batch, give the same sum
    unique = (host_distinct([users], CPU)[0], host_distinct([items], CPU)[0])
    again = ssl_loss((t[0], t[1]), (t[2], t[3]), torch.from_numpy(users), torch.from_numpy(items), temp, mode, plain,
                     unique)
    assert float(again) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------ the batch loss
@pytest.mark.parametrize("extra", [("--aug_type", "ed"), ("--aug_type", "rw", "--reg_scope", "all"),
                                   ("--aug_type", "nd", "--ssl_mode", "merge")])
def test_batch_loss_and_gradients_match_a_dense_float64_reference(extra):
    model = toy_model("--ssl_ratio", "0.3", "--reg", "0.01", "--ssl_reg", "0.5", *extra)
    data, args = model.data, model.args
    U, I = data.n_users, data.n_items
    model.views = model.augment(np.random.default_rng(7))
    users, positives, negatives = np.array([0, 2, 2, 5, 6]), np.array([1, 3, 3, 0, 8]), np.array([4, 4, 0, 7, 2])
    terms = model.batch_loss(*(torch.from_numpy(a) for a in (users, positives, negatives)))
    sum(terms.values()).backward()

    # the reference: views rebuilt from the edges they hold, everything dense in float64
    full = torch.from_numpy(dense_norm(train_edges(data), U, I))
    views = [[torch.from_numpy(dense_norm(edges_of(g, U), U, I)) for g in view] for view in model.views]
    eu = model.user_emb.detach().double().clone().requires_grad_()
    ei = model.item_emb.detach().double().clone().requires_grad_()
    ego = torch.cat([eu, ei])

    def lightgcn(graphs):
        out, e = [ego], ego
        for g in graphs:
            e = g @ e
            out.append(e)
        return sum(out) / len(out)

    main = lightgcn([full] * args.n_layers)
    bpr = sum(-torch.log(torch.sigmoid(main[u] @ main[U + p] - main[u] @ main[U + n]))
              for u, p, n in zip(users, positives, negatives))
    z1, z2 = (torch.nn.functional.normalize(lightgcn(v), dim=1) for v in views)

    def nce(anchors, candidates):          # anchor a (a node index) against every candidate node
        return sum(torch.logsumexp(torch.stack([z1[a] @ z2[v] / args.ssl_temp for v in candidates]), 0)
                   - z1[a] @ z2[a] / args.ssl_temp for a in anchors)

    if args.ssl_mode == "merge":
        merged = sorted(set(users.tolist())) + [U + i for i in sorted(set(positives.tolist()))]
        ssl = nce(merged, merged)
    else:
        ssl = nce(users, range(U)) + nce([U + p for p in positives], range(U, U + I))
    if args.reg_scope == "all":
        reg = (eu ** 2).sum() + (ei ** 2).sum()
    else:
        reg = 0.5 * sum((eu[u] ** 2).sum() + (ei[p] ** 2).sum() + (ei[n] ** 2).sum()
                        for u, p, n in zip(users, positives, negatives))
    want = {"bpr": bpr, "ssl": args.ssl_reg * ssl, "reg": args.reg * reg}
    sum(want.values()).backward()
    for name in want:
        assert float(terms[name].detach()) == pytest.approx(float(want[name].detach()), rel=1e-5, abs=1e-6), name
    np.testing.assert_allclose(model.user_emb.grad.numpy(), eu.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.item_emb.grad.numpy(), ei.grad.numpy(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ sampler and flags
def test_the_authors_sampler_draws_users_uniformly_then_one_of_their_train_items():
    data = toy_data(n_users=12, n_items=10, seed=3)
    train = data.train.toarray()
    train[4] = 0                                                          # a user without a train item
    train = sp.csr_matrix(train)
    users, positives = user_first_sample(train, 60000, np.random.default_rng(0))
    assert len(users) == 60000 and 4 not in set(users.tolist())
    assert all(train[u, p] == 1 for u, p in zip(users[:500], positives[:500]))
    counts = np.bincount(users, minlength=12)
    assert np.all(np.abs(counts[np.arange(12) != 4] / 60000 - 1 / 11) < 0.005)   # users uniform, not by degree
    model = toy_model()
    users, positives, negatives, batches = model.sample()
    assert len(users) == model.data.train.nnz and not np.any(model.data.train[users, negatives])
    pair_users, _, _, _ = toy_model("--sampler", "pair").sample()
    assert sorted(pair_users.tolist()) == sorted(model.edge_users.tolist())      # each train pair once


def test_defaults_are_the_authors_and_impossible_values_are_refused():
    args = parse_args(["--model", "sgl"])
    assert (args.embed_size, args.n_layers, args.reg, args.ssl_reg, args.ssl_ratio, args.ssl_temp, args.aug_type,
            args.ssl_mode, args.batch, args.lr, args.epoch, args.patience) == (
        64, 3, 1e-4, 0.1, 0.1, 0.2, "ed", "both_side", 2048, 1e-3, 1000, 10)
    assert [aug_type(v) for v in ("0", "1", "2", "ND", "Ed", "rw")] == ["nd", "ed", "rw", "nd", "ed", "rw"]
    assert all(getattr(args, flag) in values for flag, values in SGL.grid.items())
    for flags, phrase in [(["--ssl_ratio", "1.0"], "--ssl_ratio"), (["--ssl_temp", "0"], "--ssl_temp"),
                          (["--embed_size", "0"], "--embed_size")]:
        problem = SGL.check_flags(build_parser("sgl").parse_args(["--model", "sgl", *flags]))
        assert phrase in problem and "\n" not in problem


# ------------------------------------------------------------------------------------------ through the harness
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """The default generated dataset of `python Main.py` (1,200 users x 600 items; generated, not real). On the
    smaller `gen_dir` (120 items, a strong popularity signal) SGL's uniformity term keeps it below popularity
    for the first epochs."""
    from Utils.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "synthetic")
    return root


def test_trains_beats_popularity_and_times_the_augmentation(synthetic_dir, tmp_path):
    out = tmp_path / "sgl"
    argv = ["--data_dir", str(synthetic_dir), "--model", "sgl", "--quiet", "--out_dir", str(out),
            "--epoch", "4", "--batch", "1024", "--lr", "0.05", "--embed_size", "32"]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (ours, popularity)
    assert set(summary["timing"]["seconds_per_phase_mean"]) == {"augment", "sampling", "recommender", "evaluation"}
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["loss"]) == {"bpr", "ssl", "reg", "loss"}
    from evaluate import evaluate_run
    assert evaluate_run(out, device="cpu")["identical"]     # best_model.pt reloads to the same numbers


def test_plain_kernels_give_the_same_losses(tiny_dir, tmp_path):
    losses = {}
    for kernels in ("fast", "plain"):
        args = parse_args(tiny_args(tiny_dir, tmp_path, "--model", "sgl", "--kernels", kernels, "--batch", "32"))
        torch.manual_seed(0)
        model = inference.build_model(args, inference.load_run_data(args, False), CPU)
        losses[kernels] = [model.train_epoch(epoch, PhaseTimer(CPU))["loss"] for epoch in range(2)]
    for fast, plain in zip(losses["fast"], losses["plain"]):
        assert fast == pytest.approx(plain, rel=1e-5)


def test_an_interrupted_run_resumes_to_the_same_numbers(tiny_dir, tmp_path, monkeypatch):
    extra = ("--model", "sgl", "--epoch", "3", "--batch", "16", "--embed_size", "8", "--aug_type", "rw")
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, *extra)
