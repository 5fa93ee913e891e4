"""NCL against references written here on toy data (dense float64 matrices, one loop per anchor), its E-step
(k-means) against brute force and hand-made Lloyd steps, the warm-up and E-step schedule, --kernels plain, and
runs through Main.main that beat popularity and resume to the same numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import Main
from DataHandler import Data
from Models.ncl import NCL, SPLIT_EPS, _split_empty_clusters, kmeans, nearest_centroid
from Params import parse_args
from Models.base import PhaseTimer

from conftest import assert_resumes_exactly

CPU = torch.device("cpu")


def toy_data(n_users=7, n_items=9, seed=0) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.35).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0   # every user has a train item
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return Data("toy", sp.csr_matrix(train), empty, empty, {})


def ncl(*extra: str, data: Data = None, seed: int = 0) -> NCL:
    args = parse_args(["--model", "ncl", "--quiet", "--embedding_size", "4", "--num_clusters", "3", *extra])
    torch.manual_seed(seed)
    return NCL(args, data or toy_data(), CPU)


def t64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().clone().requires_grad_()


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def ref_contrast(anchor: torch.Tensor, positive: torch.Tensor, contrast: torch.Tensor, temp: float) -> torch.Tensor:
    """-log exp(â·p̂/τ) / Σ_rows c of contrast exp(â·ĉ/τ) for one anchor, written out."""
    a = unit(anchor)
    denominator = sum(torch.exp(a @ unit(c) / temp) for c in contrast)
    return -torch.log(torch.exp(a @ unit(positive) / temp) / denominator)


def ref_loss(model: NCL, users, pos, neg, centroids=None, assignment=None, proto_alpha=1.0):
    """The whole batch loss in float64: LightGCN as dense matrix powers, the two contrastive terms one anchor at a
    time (RUCAIBox/NCL ncl.py:148-241 read as equations). Returns the terms and the two embedding gradients."""
    a = model.args
    r = model.data.train.toarray().astype(np.float64)
    U, I = r.shape
    adj = np.zeros((U + I, U + I))
    adj[:U, U:], adj[U:, :U] = r, r.T
    d = (adj.sum(1) + 1e-7) ** -0.5
    norm = torch.from_numpy(d[:, None] * adj * d[None, :])
    eu, ei = t64(model.user_emb), t64(model.item_emb)
    e0 = torch.cat([eu, ei])
    layers = [torch.linalg.matrix_power(norm, l) @ e0 for l in range(max(a.n_layers, 2 * a.hyper_layers) + 1)]
    mean = sum(layers[: a.n_layers + 1]) / (a.n_layers + 1)
    mu, mi = mean[:U], mean[U:]
    diff = (mu[users] * mi[pos]).sum(1) - (mu[users] * mi[neg]).sum(1)
    bpr = -torch.log(torch.sigmoid(diff)).mean()
    reg = (torch.linalg.norm(eu[users]) + torch.linalg.norm(ei[pos]) + torch.linalg.norm(ei[neg])) / len(users)
    ctx, ctr = layers[2 * a.hyper_layers], layers[0]
    s_user = sum(ref_contrast(ctx[u], ctr[u], ctr[:U], a.ssl_temp) for u in users.tolist())
    s_item = sum(ref_contrast(ctx[U + i], ctr[U + i], ctr[U:], a.ssl_temp) for i in pos.tolist())
    terms = {"bpr": bpr, "reg": a.reg_weight * reg, "ssl": a.ssl_reg * (s_user + a.alpha * s_item)}
    if centroids is not None:
        cu, ci = (c.double() for c in (centroids["user"], centroids["item"]))
        p_user = sum(ref_contrast(eu[u], cu[assignment["user"][u]], cu, a.ssl_temp) for u in users.tolist())
        p_item = sum(ref_contrast(ei[i], ci[assignment["item"][i]], ci, a.ssl_temp) for i in pos.tolist())
        terms["proto"] = a.proto_reg * (p_user + proto_alpha * p_item)
    gu, gi = torch.autograd.grad(sum(terms.values()), [eu, ei])
    return {k: v.item() for k, v in terms.items()}, gu.numpy(), gi.numpy()


USERS = torch.tensor([0, 3, 3, 6, 1, 2])   # user 3 twice: the sums count each occurrence
POS = torch.tensor([2, 5, 1, 8, 5, 0])
NEG = torch.tensor([4, 0, 7, 3, 6, 1])


def fixed_prototypes(model: NCL, seed: int = 1):
    """Normalised random centroids and a hand-picked assignment, the same for the model and the reference."""
    g = torch.Generator().manual_seed(seed)
    centroids = {side: torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1) for side in ("user", "item")}
    assignment = {"user": torch.tensor([0, 1, 2, 0, 1, 2, 0]), "item": torch.tensor([2, 2, 1, 0, 0, 1, 2, 1, 0])}
    model.centroids, model.assignment = centroids, assignment
    return centroids, assignment


# ------------------------------------------------------------------------------------------------ the losses
@pytest.mark.parametrize("kernels,layers,hyper,alpha", [("fast", 3, 1, 1.0), ("plain", 2, 2, 1.5),
                                                        ("fast", 1, 0, 0.5)])
def test_structure_loss_is_the_even_layer_against_layer_0_one_anchor_at_a_time(kernels, layers, hyper, alpha):
    model = ncl("--kernels", kernels, "--n_layers", str(layers), "--hyper_layers", str(hyper), "--alpha", str(alpha),
                "--ssl_reg", "1.0", "--reg_weight", "0.3")
    terms = model.batch_loss(USERS, POS, NEG)          # epoch 0: still in the warm-up, no prototype term
    assert terms["proto"].item() == 0.0
    sum(terms.values()).backward()
    want, gu, gi = ref_loss(model, USERS, POS, NEG)
    for name in ("bpr", "reg", "ssl"):
        assert terms[name].item() == pytest.approx(want[name], rel=1e-5), name
    np.testing.assert_allclose(model.user_emb.grad.numpy(), gu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.item_emb.grad.numpy(), gi, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("proto_alpha", [False, True])
def test_prototype_loss_against_a_loop_given_fixed_centroids_and_assignments(proto_alpha):
    model = ncl("--proto_reg", "0.5", "--ssl_reg", "0.7", "--alpha", "1.5", "--proto_alpha", str(proto_alpha))
    centroids, assignment = fixed_prototypes(model)
    model.proto_on = True
    terms = model.batch_loss(USERS, POS, NEG)
    sum(terms.values()).backward()
    want, gu, gi = ref_loss(model, USERS, POS, NEG, centroids, assignment, proto_alpha=1.5 if proto_alpha else 1.0)
    for name in ("bpr", "reg", "ssl", "proto"):
        assert terms[name].item() == pytest.approx(want[name], rel=1e-5), name
    np.testing.assert_allclose(model.user_emb.grad.numpy(), gu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.item_emb.grad.numpy(), gi, rtol=1e-4, atol=1e-6)


def test_scores_are_the_mean_of_the_first_n_layers_only():
    """2h = 4 > L = 2: layers 3 and 4 feed the structure term, never the scores."""
    model = ncl("--n_layers", "2", "--hyper_layers", "2")
    r = model.data.train.toarray().astype(np.float64)
    U, I = r.shape
    adj = np.zeros((U + I, U + I))
    adj[:U, U:], adj[U:, :U] = r, r.T
    d = (adj.sum(1) + 1e-7) ** -0.5
    norm = d[:, None] * adj * d[None, :]
    e0 = torch.cat([model.user_emb, model.item_emb]).detach().double().numpy()
    mean = sum(np.linalg.matrix_power(norm, l) @ e0 for l in range(3)) / 3
    with torch.no_grad():
        users, items = model.embeddings()
    np.testing.assert_allclose(users.numpy(), mean[:U], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(items.numpy(), mean[U:], rtol=1e-5, atol=1e-6)


def test_plain_kernels_give_the_same_loss_and_gradients():
    out = {}
    for kernels in ("fast", "plain"):
        model = ncl("--kernels", kernels, "--ssl_reg", "1.0", "--proto_reg", "1.0")
        fixed_prototypes(model)
        model.proto_on = True
        terms = model.batch_loss(USERS, POS, NEG)
        sum(terms.values()).backward()
        out[kernels] = ({k: v.item() for k, v in terms.items()}, model.user_emb.grad.clone(), model.item_emb.grad.clone())
    for name, value in out["fast"][0].items():
        assert out["plain"][0][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    for fast, plain in zip(out["fast"][1:], out["plain"][1:]):
        torch.testing.assert_close(plain, fast, rtol=1e-4, atol=1e-6)   # float32 rounding of sums in other orders


# ------------------------------------------------------------------------------------------------ the E-step
def test_nearest_centroid_is_the_brute_force_argmin_in_blocks():
    g = torch.Generator().manual_seed(0)
    points, centroids = torch.randn(37, 5, generator=g), torch.randn(6, 5, generator=g)
    want = [int(np.argmin([((p - c) ** 2).sum().item() for c in centroids])) for p in points]
    for chunk in (None, 1, 5, 100):
        assert nearest_centroid(points, centroids, chunk=chunk).tolist() == want
    # a tie goes to the lower index (faiss keeps the first of equal distances)
    assert nearest_centroid(torch.zeros(1, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist() == [0]


def test_kmeans_runs_lloyd_iterations_from_the_given_centroids():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(40, 3, generator=g)
    init = points[[0, 10, 20, 30]].clone()
    centroids = init.double().numpy()
    x = points.double().numpy()
    for _ in range(4):                                  # four hand-made Lloyd steps: assign, then means
        assign = np.array([np.argmin(((p - centroids) ** 2).sum(1)) for p in x])
        centroids = np.stack([x[assign == j].mean(0) for j in range(4)])
    assign = np.array([np.argmin(((p - centroids) ** 2).sum(1)) for p in x])
    got, got_assign = kmeans(points, 4, niter=4, init=init)
    np.testing.assert_allclose(got.numpy(), centroids, rtol=1e-5, atol=1e-6)
    assert got_assign.tolist() == assign.tolist()


def test_an_empty_cluster_is_split_off_a_populated_one_as_faiss_does():
    centroids = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
    counts = np.array([1.0, 0.0, 5.0], dtype=np.float32)      # only cluster 2 can be split: p = (n_j - 1)/(n - k)
    assert _split_empty_clusters(centroids, counts, n=6) == 1
    up, down = 1 + SPLIT_EPS, 1 - SPLIT_EPS
    np.testing.assert_allclose(centroids[1].numpy(), [4.0 * up, 5.0 * down, 6.0 * up], rtol=1e-7)
    np.testing.assert_allclose(centroids[2].numpy(), [4.0 * down, 5.0 * up, 6.0 * down], rtol=1e-7)
    np.testing.assert_allclose(centroids[0].numpy(), [1.0, 2.0, 3.0])
    assert counts.tolist() == [1.0, 2.5, 2.5]
    # two equal initial centroids: the second gets no point (ties go to the first), is split off a cluster and
    # the two copies pull its points apart; in the end every cluster has points, each point at its nearest
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.5, 0.5], [-0.5, -0.5]])
    points = torch.cat([offsets + torch.tensor([3.0, 1.0]), offsets + torch.tensor([10.0, 10.0])])
    init = torch.tensor([[3.0, 1.0], [3.0, 1.0], [10.0, 10.0]])
    centroids, assignment = kmeans(points, 3, init=init)
    assert sorted(set(assignment.tolist())) == [0, 1, 2]
    assert assignment.tolist() == nearest_centroid(points, centroids).tolist()


def test_kmeans_needs_as_many_points_as_clusters_and_is_repeatable():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.randn(3, 2), 4)
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    first, second = kmeans(points, 5), kmeans(points, 5)     # faiss's fixed seed: the same clusters every call
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    centroids, assignment = kmeans(points[:5], 5)            # n == k: the points are the centroids
    assert torch.equal(centroids, points[:5]) and assignment.tolist() == [0, 1, 2, 3, 4]


def test_e_step_clusters_the_layer_0_rows_and_normalises_the_centroids():
    model = ncl()
    model.e_step()
    for side, table in (("user", model.user_emb), ("item", model.item_emb)):
        raw, assign = kmeans(table.detach(), 3)
        torch.testing.assert_close(model.centroids[side], torch.nn.functional.normalize(raw, dim=1))
        assert model.assignment[side].tolist() == assign.tolist()          # assigned to the raw centroids


@pytest.mark.parametrize("warm_up,m_step,runs", [(20, 1, [20, 21, 22, 23]), (0, 1, [0, 1, 2, 3, 18, 19, 20, 21, 22, 23]),
                                                 (20, 3, [18, 21]), (2, 2, [2, 18, 20, 22])])
def test_e_step_schedule_and_warm_up(warm_up, m_step, runs):
    model = ncl("--warm_up_step", str(warm_up), "--m_step", str(m_step))
    epochs = [0, 1, 2, 3, 18, 19, 20, 21, 22, 23]
    assert [e for e in epochs if model.needs_e_step(e)] == runs
    # the prototype term is in the loss from epoch warm_up on
    model.centroids = {"user": torch.eye(3, 4), "item": torch.eye(3, 4)}
    model.assignment = {"user": torch.zeros(7, dtype=torch.long), "item": torch.zeros(9, dtype=torch.long)}
    for epoch in (max(warm_up - 1, 0), warm_up):
        model.proto_on = epoch >= warm_up
        assert (model.batch_loss(USERS, POS, NEG)["proto"].item() > 0) == (epoch >= warm_up)


def test_defaults_are_the_authors_and_the_grid_holds_them():
    args = parse_args(["--model", "ncl"])
    assert (args.embedding_size, args.n_layers, args.reg_weight, args.ssl_temp, args.ssl_reg, args.hyper_layers,
            args.alpha, args.proto_reg, args.num_clusters, args.m_step, args.warm_up_step) == \
        (64, 3, 1e-4, 0.1, 1e-7, 1, 1.0, 8e-8, 1000, 1, 20)
    assert (args.batch, args.epoch, args.patience, args.lr, args.kmeans_niter, args.proto_alpha) == \
        (4096, 300, 11, 1e-3, 25, False)
    assert all(getattr(args, flag) in values for flag, values in NCL.grid.items())


def test_check_refuses_more_clusters_than_nodes_and_bad_flags():
    data = toy_data()
    args = parse_args(["--model", "ncl", "--epoch", "30"])
    message = NCL.check(args, data)
    assert "--num_clusters 1000" in message and "7 users" in message
    args.epoch = 20                                  # the prototypes are never reached: nothing to refuse
    assert NCL.check(args, data) is None
    for flag, value in (("hyper_layers", -1), ("num_clusters", 0), ("m_step", 0), ("ssl_temp", 0.0)):
        bad = parse_args(["--model", "ncl"])
        setattr(bad, flag, value)
        assert f"--{flag}" in NCL.check_flags(bad)


# ------------------------------------------------------------------------------------------------ through the harness
RUN = ("--model", "ncl", "--warm_up_step", "1", "--num_clusters", "8", "--embedding_size", "16", "--lr", "0.02")


def test_trains_beats_popularity_and_times_the_e_step(gen_dir, tmp_path):
    out = tmp_path / "ncl"
    argv = ["--data", "gen", "--data_dir", str(gen_dir), "--quiet", "--out_dir", str(out), "--epoch", "4",
            "--batch", "256", *RUN]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (ours, popularity)
    assert set(summary["timing"]["seconds_per_phase_mean"]) == {"e_step", "negatives", "recommender", "evaluation"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["loss"]) == {"bpr", "reg", "ssl", "proto", "loss"}
    assert records[0]["loss"]["proto"] == 0.0 and records[1]["loss"]["proto"] > 0.0     # after the warm-up


def test_interrupted_run_resumes_to_the_same_numbers(tiny_dir, tmp_path, monkeypatch):
    """With --m_step 2 the prototypes of epoch 2's E-step serve epoch 3: last.pt carries them across the stop."""

    extra = (*RUN, "--num_clusters", "4", "--epoch", "5", "--m_step", "2", "--batch", "16")
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, *extra)


def test_pre_epoch_and_train_epoch_on_a_fresh_model(tiny_dir):
    """The harness's order (pre_epoch, then train_epoch) from epoch 0 with no warm-up: E-step, then the loss."""
    model = ncl("--warm_up_step", "0", "--batch", "8")
    timer = PhaseTimer(CPU)
    model.pre_epoch(0, timer)
    losses = model.train_epoch(0, timer)["loss"]
    assert set(model.centroids) == {"user", "item"} and losses["proto"] > 0 and np.isfinite(losses["loss"])
    assert set(timer.seconds) == {"e_step", "negatives", "recommender"}
