"""NGCF (Models/ngcf.py) against references written here on toy data: the graphs of --adj_type (dense numpy), one
propagation layer as explicit sums of messages over each node's neighbours (paper Eq. 3-4 with the code's
normalisation, each flag's variant), the concatenation of the normalised layers, the loss, the dropout draws (node
dropout's masks, message dropout off at evaluation), the authors' batches; then through the harness: it beats
popularity, --kernels plain gives the same loss, and an interrupted run resumes to the same numbers."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import Main
from DataHandler import Data
from Models.ngcf import NGCF, ngcf_adjacency
from Params import parse_args

from conftest import assert_resumes_exactly

CPU = torch.device("cpu")
SLOPE = 0.2


def toy_data(n_users=6, n_items=7, seed=0) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.35).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0   # every user has a train item
    train[:, -1] = 0.0                                                   # an item without interactions
    train[0, :] = 0.0                                                    # and a user without any
    train[0, 1] = 1.0
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return Data("toy", sp.csr_matrix(train), empty, empty, {})


def build(*flags, data=None, seed=0):
    args = parse_args(["--model", "ngcf", "--quiet", "--embed_size", "4", "--layer_size", "[3,5]", *flags])
    torch.manual_seed(seed)
    model = NGCF(args, data or toy_data(), CPU)
    with torch.no_grad():   # non-zero biases of either sign, so that both LeakyReLU branches are exercised
        for name, value in model.weights.items():
            if name.startswith("b") and value.requires_grad:
                value.normal_(0.0, 0.5)
    return model


def dense_adjacency(r: np.ndarray, adj_type: str) -> np.ndarray:
    """Â written out densely: A = [[0, R], [Rᵀ, 0]] and each --adj_type's normalisation."""
    U, I = r.shape
    a = np.zeros((U + I, U + I))
    a[:U, U:], a[U:, :U] = r, r.T
    eye = np.eye(U + I)

    def inv(d, power):
        return np.array([x ** power if x > 0 else 0.0 for x in d])

    if adj_type == "plain":
        return a
    if adj_type == "norm":
        return inv((a + eye).sum(1), -1.0)[:, None] * (a + eye)
    if adj_type == "gcmc":
        return inv(a.sum(1), -1.0)[:, None] * a
    if adj_type == "mean":
        return inv(a.sum(1), -1.0)[:, None] * a + eye
    d = inv(a.sum(1), -0.5)
    return d[:, None] * a * d[None, :] + eye            # laplacian: the paper's L + I


def leaky(x):
    return np.where(x > 0, x, SLOPE * x)


def numpy_params(model):
    w = {k: v.detach().numpy().astype(np.float64) for k, v in model.weights.items()}
    e0 = torch.cat([model.user_emb, model.item_emb]).detach().numpy().astype(np.float64)
    return e0, w


def layer_by_messages(adj: np.ndarray, ego: np.ndarray, w: dict, k: int, activation: str, bi_messages: str):
    """Paper Eq. 3-4 node by node: for each neighbour j of u (self-loop included when Â_uu ≠ 0) the messages
    Â_uj e_j W1 and Â_uj (e_j ⊙ e_u) W2 (the latter not for j = u with bi_messages=neighbours), summed, biased,
    activated per branch (split) or once (joint)."""
    out = np.zeros((ego.shape[0], w[f"W_gc_{k}"].shape[1]))
    for u in range(ego.shape[0]):
        sum_msg = np.zeros(out.shape[1])
        bi_msg = np.zeros(out.shape[1])
        for j in range(ego.shape[0]):
            if adj[u, j] == 0.0:
                continue
            sum_msg += adj[u, j] * ego[j] @ w[f"W_gc_{k}"]
            if j != u or bi_messages == "all":
                bi_msg += adj[u, j] * (ego[j] * ego[u]) @ w[f"W_bi_{k}"]
        s, b = sum_msg + w[f"b_gc_{k}"][0], bi_msg + w[f"b_bi_{k}"][0]
        out[u] = leaky(s) + leaky(b) if activation == "split" else leaky(s + b)
    return out


@pytest.mark.parametrize("adj_type", ["norm", "plain", "gcmc", "mean", "laplacian"])
def test_adjacency_types(adj_type):
    data = toy_data()
    want = dense_adjacency(data.train.toarray().astype(np.float64), adj_type)
    got = ngcf_adjacency(data.train, adj_type)
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=1e-7)
    assert got.has_sorted_indices and got.dtype == np.float32


@pytest.mark.parametrize("flags", [(), ("--activation", "joint"), ("--bi_messages", "neighbours"),
                                   ("--adj_type", "laplacian", "--bi_messages", "neighbours", "--activation", "joint",
                                    "--use_bias", "false"),
                                   ("--adj_type", "gcmc", "--bi_messages", "neighbours")])
def test_one_layer_is_the_sum_of_its_messages(flags):
    model = build(*flags)
    args = model.args
    adj = dense_adjacency(model.data.train.toarray().astype(np.float64), args.adj_type)
    e0, w = numpy_params(model)
    if not args.use_bias:
        assert all(np.all(v == 0) for k, v in w.items() if k.startswith("b"))
    want = layer_by_messages(adj, e0, w, 0, args.activation, args.bi_messages)
    draws = model.no_draws()
    ego = torch.cat([model.user_emb, model.item_emb])
    got = model.layer(0, ego, draws.graphs[0], draws.diagonals[0], None).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_representation_concatenates_the_normalised_layers_without_dropout_in_eval():
    model = build()
    adj = dense_adjacency(model.data.train.toarray().astype(np.float64), "norm")
    e0, w = numpy_params(model)
    e1 = layer_by_messages(adj, e0, w, 0, "split", "all")
    e2 = layer_by_messages(adj, e1, w, 1, "split", "all")          # the unnormalised E¹ feeds layer 2
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)   # noqa: E731
    want = np.concatenate([e0, unit(e1), unit(e2)], axis=1)
    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
        again = torch.cat(model.embeddings()).numpy()
    got = torch.cat([users, items]).numpy()
    assert got.shape == (13, 4 + 3 + 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(got, again)                               # evaluation draws nothing
    # --norm_layers false: the raw outputs (the paper's Eq. 9)
    raw = build("--norm_layers", "false").eval()
    with torch.no_grad():
        got_raw = torch.cat(raw.embeddings()).numpy()
    np.testing.assert_allclose(got_raw, np.concatenate([e0, e1, e2], axis=1), rtol=1e-5, atol=1e-6)


def test_message_dropout_in_training_only_unless_asked():
    model = build("--mess_dropout", "[0.5]")
    users, pos, neg = torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([6, 5])
    model.eval()
    with torch.no_grad():
        eval_losses = {model.batch_loss(users, pos, neg)["bpr"].item() for _ in range(3)}
        clean = torch.cat(model.embeddings())
    assert len(eval_losses) == 1
    model.train()
    with torch.no_grad():
        train_losses = {model.batch_loss(users, pos, neg)["bpr"].item() for _ in range(3)}
    assert len(train_losses) == 3
    # the mask: inverted dropout of each layer's output, rows scaled by 1/(1-p) where kept
    draws = model.draw(torch.Generator().manual_seed(5))
    uniform = torch.Generator().manual_seed(5)
    for keep, size in zip(draws.keeps, (3, 5)):
        want = torch.floor(0.5 + torch.rand(13, size, generator=uniform)) * 2.0
        assert torch.equal(keep, want)
    # --eval_mess_dropout (the PyTorch port): on at evaluation, the same draw at every evaluation
    port = build("--mess_dropout", "[0.5]", "--eval_mess_dropout", "true").eval()
    with torch.no_grad():
        first, second = torch.cat(port.embeddings()), torch.cat(port.embeddings())
    assert torch.equal(first, second) and not torch.allclose(first, clean)


def test_node_dropout_masks_entries_once_per_batch_or_nodes_per_layer():
    model = build("--node_dropout_flag", "1", "--node_dropout", "[0.4]", "--mess_dropout", "[0.0]")
    adj = ngcf_adjacency(model.data.train, "norm")
    draws = model.draw(torch.Generator().manual_seed(3))
    u = torch.rand(adj.nnz, generator=torch.Generator().manual_seed(3)).numpy()
    keep = np.floor(0.6 + u)                                        # the authors' floor(keep + U), CSR order
    want = sp.csr_matrix((adj.data * keep / np.float32(0.6), adj.indices, adj.indptr), shape=adj.shape).toarray()
    assert 0 < keep.sum() < adj.nnz
    for graph, diagonal in zip(draws.graphs, draws.diagonals):    # the same dropped graph in every layer
        np.testing.assert_allclose(graph.to_dense().numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(graph.matrix_t.to_dense().numpy(), want.T, rtol=1e-6)
        np.testing.assert_allclose(diagonal.numpy(), np.diag(want), rtol=1e-6)
    assert draws.keeps == [None, None]
    # the paper's node dropout: per layer, each node's column (its outgoing messages) kept with 1 - p
    nodes = build("--node_dropout_flag", "1", "--node_dropout", "[0.4]", "--node_dropout_type", "nodes")
    draws = nodes.draw(torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    full = adj.toarray()
    for graph in draws.graphs:
        column_keep = np.floor(0.6 + torch.rand(13, generator=g).numpy())
        np.testing.assert_allclose(graph.to_dense().numpy(), full * column_keep[None, :] / np.float32(0.6), rtol=1e-6)
    # evaluation: Â itself
    nodes.eval()
    with torch.no_grad():
        assert torch.equal(torch.cat(nodes.embeddings()), torch.cat(build("--node_dropout_flag", "0").eval()
                                                                      .embeddings()))


@pytest.mark.parametrize("target", ["outputs", "parameters"])
def test_the_loss(target):
    model = build("--regs", "[0.03]", "--batch", "3", "--reg_target", target).eval()
    users, pos, neg = torch.tensor([1, 4, 1]), torch.tensor([2, 0, 5]), torch.tensor([6, 3, 0])
    terms = model.batch_loss(users, pos, neg)
    with torch.no_grad():
        vec = torch.cat(model.embeddings()).numpy().astype(np.float64)
    uv, iv = vec[:6], vec[6:]
    u, p, n = uv[users.numpy()], iv[pos.numpy()], iv[neg.numpy()]
    diff = (u * p).sum(1) - (u * n).sum(1)
    assert terms["bpr"].item() == pytest.approx(-np.mean(np.log(1.0 / (1.0 + np.exp(-diff)))), rel=1e-5)
    if target == "outputs":     # λ·½(‖u‖²+‖p‖²+‖n‖²)/B on the final vectors (NGCF.py:278-292)
        want = 0.03 * ((u ** 2).sum() + (p ** 2).sum() + (n ** 2).sum()) / 2 / 3
    else:                       # λ‖Θ‖², Θ = Eu, Ei and the W matrices (paper Eq. 11)
        e0, w = numpy_params(model)
        want = 0.03 * ((e0 ** 2).sum() + sum((v ** 2).sum() for k, v in w.items() if k.startswith("W")))
    assert terms["emb"].item() == pytest.approx(want, rel=1e-5)


def test_the_authors_batches():
    data = toy_data(n_users=8, n_items=9, seed=2)
    model = build("--batch", "5", data=data)
    train = data.train.toarray() > 0
    assert model.n_batches() == data.train.nnz // 5 + 1
    negatives_of_1 = set()
    for _ in range(300):
        users, pos, neg = (t.numpy() for t in model.sample_batch())
        assert len(set(users.tolist())) == 5                        # distinct users, each with a train item
        assert train[users, pos].all() and not train[users, neg].any()
        negatives_of_1.update(neg[users == 1].tolist())
    assert negatives_of_1 == set(np.flatnonzero(~train[1]).tolist())   # every non-train item can be drawn
    big = build("--batch", "20", data=data)                         # more than the users: with replacement
    users = big.sample_batch()[0].numpy()
    assert len(users) == 20 and train[users].any(axis=1).all()


def test_defaults_are_the_authors_and_bad_flags_are_refused():
    args = parse_args(["--model", "ngcf"])
    assert (args.embed_size, args.layer_size, args.regs, args.lr, args.batch, args.epoch) == (
        64, [64, 64, 64], [1e-5], 1e-4, 1024, 400)
    assert (args.node_dropout_flag, args.node_dropout, args.mess_dropout, args.adj_type, args.activation) == (
        0, [0.1], [0.1, 0.1, 0.1], "norm", "split")
    assert (args.tstEpoch, args.patience) == (10, 5)
    for change, phrase in [({"mess_dropout": [0.1, 0.1]}, "one rate or one per layer"),
                           ({"node_dropout": [1.0]}, "in [0, 1)"), ({"regs": [-1.0]}, "negative")]:
        problem = NGCF.check_flags(argparse.Namespace(**{**vars(args), **change}))
        assert problem and phrase in problem
    with pytest.raises(SystemExit):                                 # refused when the command line is parsed
        parse_args(["--model", "ngcf", "--mess_dropout", "[0.1,0.2]"])
    full = toy_data()
    dense = full.train.toarray()
    dense[2, :] = 1.0
    crowded = Data("c", sp.csr_matrix(dense), full.val, full.test, {})
    assert "every item" in NGCF.check(parse_args(["--model", "ngcf"]), crowded)


def test_plain_kernels_give_the_same_loss_and_gradients():
    results = []
    for kernels in ("fast", "plain"):
        model = build("--kernels", kernels, "--node_dropout_flag", "1")
        draws = model.draw(torch.Generator().manual_seed(9))
        terms = model.batch_loss(torch.tensor([1, 2, 3]), torch.tensor([0, 4, 2]), torch.tensor([6, 5, 6]), draws)
        (terms["bpr"] + terms["emb"]).backward()
        results.append((terms, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (plain, plain_grads) = results
    for name in ("bpr", "emb"):
        assert plain[name].item() == pytest.approx(fast[name].item(), rel=1e-6, abs=1e-7)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(plain_grads[name], grad, rtol=1e-5, atol=1e-7)


FAST = ("--model", "ngcf", "--embed_size", "16", "--layer_size", "[16,16]", "--batch", "64", "--tstEpoch", "1")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """The default generated dataset of `python Main.py` (1,200 users x 600 items; generated, not real): `gen` of
    conftest is so popularity-driven that LightGCN only ties popularity on it in 5 epochs."""
    from Utils.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "synthetic")
    return root


def test_trains_beats_popularity_and_the_checkpoint_reloads_identically(synthetic_dir, tmp_path):
    out = tmp_path / "ngcf"
    argv = ["--data_dir", str(synthetic_dir), "--model", "ngcf", "--quiet", "--out_dir", str(out), "--epoch", "5",
            "--lr", "0.015", "--batch", "512", "--embed_size", "32", "--layer_size", "[32,32]"]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (ours, popularity)
    assert set(summary["timing"]["seconds_per_phase_mean"]) == {"sampling", "augment", "recommender", "evaluation"}
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["loss"]) == {"bpr", "emb", "loss"}
    from evaluate import evaluate_run
    assert evaluate_run(out, device="cpu")["identical"]


def test_interrupted_run_resumes_to_the_same_numbers(tiny_dir, tmp_path, monkeypatch):
    """last.pt holds Adam and the batches' generator (node and message dropout draws included)."""
    extra = (*FAST, "--epoch", "3", "--batch", "16", "--node_dropout_flag", "1")
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, *extra)
