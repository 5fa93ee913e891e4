"""BM3 and LGMRec as MMRec computes them, each against a dense float64 reference
written here on a toy problem, plus a short training run of each through Main.main."""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import Main
import Models
import Models.base
from DataHandler import Data
from Models.bm3 import BM3, dropout_target
from Models.lgmrec import LGMRec
from Params import parse_args
from Models.base import PhaseTimer

CPU = torch.device("cpu")
DIMS = {"image": 6, "text": 5, "audio": 4}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(Models.REGISTRY, "bm3", "Models.bm3:BM3")
    monkeypatch.setitem(Models.REGISTRY, "lgmrec", "Models.lgmrec:LGMRec")


def toy_data(modalities=("image", "text"), n_users=7, n_items=9, seed=0) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.35).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0   # every user has a train item
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    features = {m: rng.normal(size=(n_items, DIMS[m])).astype(np.float32) for m in modalities}
    return Data("toy", sp.csr_matrix(train), empty, empty, features)


def args_for(model, *extra):
    return parse_args(["--model", model, "--quiet", *extra])


def dense_norm_adj(train: np.ndarray) -> np.ndarray:
    """Â = D^-1/2 A D^-1/2, A = [[0, R], [Rᵀ, 0]], D = row sums + 1e-7 (MMRec, no self-loops)."""
    U, I = train.shape
    a = np.zeros((U + I, U + I))
    a[:U, U:], a[U:, :U] = train, train.T
    d = (a.sum(1) + 1e-7) ** -0.5
    return d[:, None] * a * d[None, :]


def t64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().clone()


# ------------------------------------------------------------------------------------------ BM3
def ref_bm3(model: BM3, data: Data, users, items, cl_weight=2.0, reg_weight=0.1, layers=1):
    """BM3's loss with dropout 0 written out in float64 autograd: targets are detached copies."""
    r = data.train.toarray().astype(np.float64)
    U = r.shape[0]
    adj = torch.from_numpy(dense_norm_adj(r))
    eu, ei = t64(model.user_emb).requires_grad_(), t64(model.item_emb).requires_grad_()
    w, b = t64(model.predictor.weight).requires_grad_(), t64(model.predictor.bias).requires_grad_()
    leaves = {"user_emb": eu, "item_emb": ei, "predictor.weight": w, "predictor.bias": b}
    e0 = torch.cat([eu, ei])
    layer, total = e0, e0
    for _ in range(layers):
        layer = adj @ layer
        total = total + layer
    nodes = total / (layers + 1)
    ubar, ibar = nodes[:U], nodes[U:] + ei

    def pred(x):
        return x @ w.T + b

    def c(a, t):
        return 1 - (torch.nn.functional.cosine_similarity(a, t, dim=-1)).mean()

    u_t, i_t = ubar.detach(), ibar.detach()
    ui = c(pred(ubar)[users], i_t[items])
    iu = c(pred(ibar)[items], u_t[users])
    reg = reg_weight * (torch.linalg.norm(ubar) + torch.linalg.norm(ibar)) / data.n_items
    modal = 0.0
    for m in data.features:
        x = t64(model.features[m]).requires_grad_()
        lw = t64(model.feature_linear[m].weight).requires_grad_()
        lb = t64(model.feature_linear[m].bias).requires_grad_()
        leaves.update({f"features.{m}": x, f"feature_linear.{m}.weight": lw, f"feature_linear.{m}.bias": lb})
        f = x @ lw.T + lb
        modal = modal + c(pred(f)[items], i_t[items]) + c(pred(f)[items], f.detach()[items])
    terms = {"ui": ui, "iu": iu, "reg": reg, "cl": cl_weight * modal}
    sum(terms.values()).backward()
    return {k: v.item() for k, v in terms.items()}, {k: v.grad.numpy() for k, v in leaves.items()}, \
        (pred(ubar).detach().numpy(), pred(ibar).detach().numpy())


@pytest.mark.parametrize("modalities,layers", [(("image", "text"), 1), (("audio",), 2)])
def test_bm3_loss_gradients_and_scores_match_a_dense_reference(modalities, layers):
    data = toy_data(modalities)
    model = BM3(args_for("bm3", "--embedding_size", "4", "--dropout", "0", "--n_layers", str(layers)), data, CPU)
    model.train()
    users, items = torch.tensor([0, 3, 3, 6, 1]), torch.tensor([2, 5, 2, 8, 5])   # item 2 and 5 twice
    terms = model.batch_loss(users, items, None)
    sum(terms.values()).backward()
    want, grads, (user_scores, item_scores) = ref_bm3(model, data, users, items, layers=layers)
    for name in ("ui", "iu", "reg", "cl"):
        assert terms[name].item() == pytest.approx(want[name], rel=1e-5, abs=1e-7), name
    # the gradients agree too: no gradient flows through the targets (U_t, I_t, T_m)
    params = dict(model.named_parameters())
    assert set(params) == set(grads)                      # raw features are parameters (trainable)
    for name, grad in grads.items():
        np.testing.assert_allclose(params[name].grad.numpy(), grad, rtol=1e-4, atol=1e-6, err_msg=name)
    model.eval()
    with torch.no_grad():
        scores = model.scorer()(torch.arange(data.n_users)).numpy()
    np.testing.assert_allclose(scores, user_scores @ item_scores.T, rtol=1e-4, atol=1e-6)   # P(Ū) P(Ī)ᵀ


def test_bm3_cl_weight_is_2_by_default_and_scales_only_the_modal_terms():
    args = args_for("bm3")
    assert (args.cl_weight, args.n_layers, args.reg_weight, args.dropout) == (2.0, 1, 0.1, 0.5)
    assert (args.batch, args.lr) == (2048, 1e-3)
    data = toy_data()
    users, items = torch.tensor([1, 2, 4]), torch.tensor([0, 7, 3])
    torch.manual_seed(0)
    model = BM3(args_for("bm3", "--dropout", "0", "--embedding_size", "4"), data, CPU)
    want, _, _ = ref_bm3(model, data, users, items, cl_weight=1.0)
    assert model.batch_loss(users, items, None)["cl"].item() == pytest.approx(2.0 * want["cl"], rel=1e-5)
    model.args.cl_weight = 0.5
    assert model.batch_loss(users, items, None)["cl"].item() == pytest.approx(0.5 * want["cl"], rel=1e-5)


def test_bm3_targets_are_inverted_dropout_always_on_without_gradient():
    x = torch.ones(40000, requires_grad=True)
    dropped = dropout_target(x, 0.3)
    assert not dropped.requires_grad
    values = np.unique(dropped.numpy())
    np.testing.assert_allclose(values, [0.0, 1 / 0.7], rtol=1e-6)           # kept entries scaled by 1/(1-p)
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.01
    # in eval mode too the targets are dropped (MMRec's F.dropout has training=True): the loss varies
    data = toy_data()
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    for p, varies in ((0.5, True), (0.0, False)):
        model = BM3(args_for("bm3", "--dropout", str(p)), data, CPU).eval()
        with torch.no_grad():
            a, b = (sum(model.batch_loss(users, items, None).values()).item() for _ in range(2))
        assert (a != b) == varies, p


def test_bm3_draws_no_negatives(monkeypatch):
    def forbidden(*_, **__):
        raise AssertionError("BM3 must not sample negatives")

    monkeypatch.setattr(Models.base, "sample_negatives", forbidden)
    data = toy_data()
    model = BM3(args_for("bm3", "--batch", "4"), data, CPU)
    seen = []
    original = model.batch_loss
    monkeypatch.setattr(model, "batch_loss", lambda u, p, n: (seen.append((len(u), n)), original(u, p, n))[1])
    losses = model.train_epoch(0, PhaseTimer(CPU))
    assert model.phases == ("recommender",)
    assert sum(n for n, _ in seen) == data.train.nnz and all(neg is None for _, neg in seen)   # (u, i) pairs only
    assert set(losses["loss"]) == {"ui", "iu", "reg", "cl", "loss"}


# ------------------------------------------------------------------------------------------ LGMRec
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def rownorm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ref_lgmrec(model: LGMRec, data: Data, noises, n_ui=2, n_mm=2, n_hyper=1, alpha=0.3):
    """LGMRec's forward in float64 with given Gumbel noises (per modality: items, then users) and no dropout."""
    r = data.train.toarray().astype(np.float64)
    U = r.shape[0]
    adj = dense_norm_adj(r)
    e0 = np.concatenate([model.user_emb.detach().numpy(), model.item_emb.detach().numpy()]).astype(np.float64)
    collab = sum(np.linalg.matrix_power(adj, l) @ e0 for l in range(n_ui + 1)) / (n_ui + 1)
    local, glob, hyper = collab.copy(), 0.0, {}
    for k, m in enumerate(data.features):
        x = data.features[m].astype(np.float64)
        item_feat = x @ model.feature_proj[m].detach().numpy()
        user_feat = np.stack([item_feat[r[u] > 0].mean(0) for u in range(U)])      # mean of the user's items
        local += rownorm(np.linalg.matrix_power(adj, n_mm) @ np.concatenate([user_feat, item_feat]))
        item_logits = x @ model.hyper_proj[m].detach().numpy()
        user_logits = np.stack([item_logits[r[u] > 0].sum(0) for u in range(U)])  # sum of the user's items
        h_item = softmax((item_logits + noises[2 * k]) / 0.2)
        h_user = softmax((user_logits + noises[2 * k + 1]) / 0.2)
        z = collab[U:]
        for _ in range(n_hyper):
            lam = h_item.T @ z
            z, zu = h_item @ lam, h_user @ lam
        hyper[m] = (zu, z)
        glob = glob + np.concatenate([zu, z])
    out = local + alpha * rownorm(glob)
    return out[:U], out[U:], hyper


def fixed_noise(model: LGMRec, monkeypatch, scale: float = 1.0) -> list:
    """Replace the model's Gumbel draws by seeded float32 noise, recorded in call order."""
    rng = np.random.default_rng(5)
    drawn = []

    def noise(logits):
        drawn.append(scale * rng.gumbel(size=tuple(logits.shape)).astype(np.float32))
        return torch.from_numpy(drawn[-1])

    monkeypatch.setattr(model, "gumbel_noise", noise)
    return drawn


@pytest.mark.parametrize("modalities,n_hyper", [(("image", "text"), 1), (("image", "text", "audio"), 2)])
def test_lgmrec_forward_matches_a_dense_reference_with_fixed_gumbel_noise(monkeypatch, modalities, n_hyper):
    data = toy_data(modalities)
    model = LGMRec(args_for("lgmrec", "--embedding_size", "4", "--hyper_num", "3", "--keep_rate", "1",
                            "--n_hyper_layer", str(n_hyper)), data, CPU)
    drawn = fixed_noise(model, monkeypatch)
    model.train()
    user_vec, item_vec, hyper = model.forward()
    assert [d.shape for d in drawn] == [s for _ in modalities for s in ((9, 3), (7, 3))]   # items, users per m
    want_u, want_i, want_hyper = ref_lgmrec(model, data, drawn, n_hyper=n_hyper)
    np.testing.assert_allclose(user_vec.detach().numpy(), want_u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(item_vec.detach().numpy(), want_i, rtol=1e-4, atol=1e-5)
    for m in modalities:
        np.testing.assert_allclose(hyper[m][0].detach().numpy(), want_hyper[m][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hyper[m][1].detach().numpy(), want_hyper[m][1], rtol=1e-4, atol=1e-5)


def test_lgmrec_evaluation_noise_dropout_and_the_deterministic_fix(monkeypatch):
    data = toy_data()
    extra = ("--embedding_size", "4", "--keep_rate", "0.5")
    # MMRec: fresh Gumbel noise at every evaluation forward, no dropout at evaluation
    model = LGMRec(args_for("lgmrec", *extra), data, CPU).eval()
    with torch.no_grad():
        first, second = model.embeddings()[0].clone(), model.embeddings()[0]
    assert not torch.allclose(first, second)
    drawn = fixed_noise(model, monkeypatch)
    with torch.no_grad():
        user_vec, item_vec = model.embeddings()
    want_u, want_i, _ = ref_lgmrec(model, data, drawn)
    np.testing.assert_allclose(user_vec.numpy(), want_u, rtol=1e-4, atol=1e-5)   # keep_rate 0.5 but no dropout
    # --deterministic_hyper: plain softmax at evaluation (zero noise), the same every time
    fixed = LGMRec(args_for("lgmrec", *extra, "--deterministic_hyper"), data, CPU).eval()
    with torch.no_grad():
        a, b = fixed.embeddings(), fixed.embeddings()
    want_u, want_i, _ = ref_lgmrec(fixed, data, [np.zeros((9, 4)), np.zeros((7, 4))] * 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    np.testing.assert_allclose(a[1].numpy(), want_i, rtol=1e-4, atol=1e-5)
    # in training the memberships are dropped (and noisy even with the fix)
    fixed.train()
    monkeypatch.setattr(fixed, "gumbel_noise", torch.zeros_like)
    with torch.no_grad():
        assert not torch.allclose(fixed.forward()[1], fixed.forward()[1])


def test_lgmrec_user_modal_features_are_the_mean_of_their_items():
    data = toy_data(("audio",))
    model = LGMRec(args_for("lgmrec", "--n_mm_layers", "0", "--embedding_size", "4"), data, CPU)
    r = data.train.toarray()
    item_feat = data.features["audio"] @ model.feature_proj["audio"].detach().numpy()
    want = [item_feat[r[u] > 0].mean(0) for u in range(data.n_users)]
    graph = model.modal_graph("audio").detach().numpy()
    np.testing.assert_allclose(graph[: data.n_users], np.stack(want), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(graph[data.n_users:], item_feat, rtol=1e-5, atol=1e-6)


def loop_nce(anchor: np.ndarray, other: np.ndarray, nodes, tau=0.2) -> float:
    """-Σ_{n in batch} log(exp(â_n·b̂_n/τ) / Σ_{every row y} exp(â_n·ŷ/τ)), one node at a time."""
    total = 0.0
    for n in nodes:
        a = anchor[n] / np.linalg.norm(anchor[n])
        pos = np.exp(a @ other[n] / np.linalg.norm(other[n]) / tau)
        denominator = sum(np.exp(a @ y / np.linalg.norm(y) / tau) for y in other)
        total -= np.log(pos / denominator)
    return total


@pytest.mark.parametrize("kernels", ["fast", "plain"])
def test_lgmrec_nce_is_summed_over_the_batch_with_all_rows_in_the_denominator(kernels):
    model = LGMRec(args_for("lgmrec", "--kernels", kernels), toy_data(), CPU)
    rng = np.random.default_rng(1)
    anchor, other = rng.normal(size=(11, 5)), rng.normal(size=(11, 5))
    nodes = [3, 0, 3, 10, 7]                                               # a duplicate counts twice
    got = model.nce(torch.from_numpy(anchor).float(), torch.from_numpy(other).float(), torch.tensor(nodes))
    assert got.item() == pytest.approx(loop_nce(anchor, other, nodes), rel=1e-5)


def test_lgmrec_loss_is_bpr_plus_hcl_over_modality_pairs_plus_reg(monkeypatch):
    data = toy_data(("image", "text", "audio"))
    model = LGMRec(args_for("lgmrec", "--embedding_size", "4", "--keep_rate", "1", "--cl_weight", "0.5",
                            "--reg_weight", "0.01"), data, CPU).train()
    monkeypatch.setattr(model, "gumbel_noise", torch.zeros_like)           # the same forward every call
    users, pos, neg = torch.tensor([0, 4, 4, 6]), torch.tensor([1, 2, 2, 8]), torch.tensor([5, 0, 7, 3])
    terms = model.batch_loss(users, pos, neg)
    with torch.no_grad():
        user_vec, item_vec, hyper = model.forward()
    u, i = user_vec.double().numpy(), item_vec.double().numpy()
    diff = (u[users] * i[pos]).sum(1) - (u[users] * i[neg]).sum(1)
    assert terms["bpr"].item() == pytest.approx(np.mean(np.log1p(np.exp(-diff))), rel=1e-5)
    reg = sum(np.linalg.norm(t) for t in (u[users], i[pos], i[neg])) / 4
    assert terms["reg"].item() == pytest.approx(0.01 * reg, rel=1e-5)
    h = {m: (zu.double().numpy(), z.double().numpy()) for m, (zu, z) in hyper.items()}
    pairs = [("image", "text"), ("image", "audio"), ("text", "audio")]     # m1 < m2 in the dataset's order
    hcl = sum(loop_nce(h[a][0], h[b][0], users.tolist()) + loop_nce(h[a][1], h[b][1], pos.tolist()) for a, b in pairs)
    assert terms["hcl"].item() == pytest.approx(0.5 * hcl, rel=1e-4)
    swapped = sum(loop_nce(h[b][0], h[a][0], users.tolist()) + loop_nce(h[b][1], h[a][1], pos.tolist())
                  for a, b in pairs)
    assert abs(0.5 * swapped - terms["hcl"].item()) > 1e-4                 # the anchor is the earlier modality
    assert list(combinations(data.modalities, 2)) == pairs


def test_lgmrec_runs_on_one_modality_without_hcl_and_keeps_features_frozen():
    data = toy_data(("image",))
    model = LGMRec(args_for("lgmrec", "--embedding_size", "4"), data, CPU).train()
    terms = model.batch_loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    assert terms["hcl"].item() == 0.0
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.feature_proj["image"].grad is not None and model.hyper_proj["image"].grad is not None
    assert not model.features["image"].requires_grad
    assert all(p.shape != data.features["image"].shape for p in model.parameters())


# ------------------------------------------------------------------------------------------ both
@pytest.mark.parametrize("model,flag,value", [
    ("bm3", "n_layers", -1), ("bm3", "dropout", 1.0), ("bm3", "dropout", -0.1),
    ("lgmrec", "n_hyper_layer", 0), ("lgmrec", "keep_rate", 0.0), ("lgmrec", "keep_rate", 1.5),
    ("lgmrec", "hyper_num", 0), ("lgmrec", "n_mm_layers", -1), ("lgmrec", "n_ui_layers", -2),
])
def test_check_rejects_impossible_configurations_in_one_sentence(model, flag, value):
    data = toy_data()
    cls = Models.get_model(model)
    args = args_for(model)
    assert cls.check(args, data) is None
    setattr(args, flag, value)
    message = cls.check(args, data)
    assert message and message.endswith(".") and "\n" not in message and message.count(". ") == 0
    assert f"--{flag}" in message and str(value) in message
    no_features = Data("toy", data.train, data.val, data.test, {})
    assert "feature" in cls.check(args_for(model), no_features)


def test_grids_name_model_flags_and_hold_the_default_point():
    assert BM3.grid == {"n_layers": [1, 2], "reg_weight": [0.1, 0.01], "dropout": [0.3, 0.5]}   # MMRec BM3.yaml
    for model in ("bm3", "lgmrec"):
        args = args_for(model)
        grid = Models.get_model(model).grid
        assert grid and all(getattr(args, flag) in values for flag, values in grid.items()), model
    args = args_for("lgmrec")
    assert (args.n_ui_layers, args.n_mm_layers, args.n_hyper_layer, args.hyper_num, args.keep_rate, args.alpha,
            args.cl_weight, args.reg_weight, args.deterministic_hyper) == (2, 2, 1, 4, 0.5, 0.3, 1e-4, 1e-6, False)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """The default generated dataset of `python Main.py` (1,200 users x 600 items; generated, not real)."""
    from Utils.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "synthetic")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model,extra", [
    ("bm3", ("--epoch", "6", "--batch", "512", "--lr", "0.02", "--embedding_size", "32")),
    ("lgmrec", ("--epoch", "2", "--batch", "512", "--lr", "0.01", "--embedding_size", "32")),
])
def test_trains_and_beats_popularity(synthetic_dir, tmp_path, model, extra):
    out = tmp_path / model
    argv = ["--data_dir", str(synthetic_dir), "--model", model, "--quiet", "--out_dir", str(out), *extra]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (model, ours, popularity)


def test_an_impossible_configuration_stops_main_with_exit_code_2(synthetic_dir, tmp_path):
    argv = ["--data_dir", str(synthetic_dir), "--model", "lgmrec", "--quiet", "--out_dir", str(tmp_path / "x"),
            "--n_hyper_layer", "0"]
    with pytest.raises(SystemExit) as refused:   # needs no data: refused when the command line is parsed
        Main.main(argv)
    assert refused.value.code == 2 and not (tmp_path / "x").exists()
