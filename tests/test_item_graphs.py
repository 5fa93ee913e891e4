"""LATTICE and FREEDOM and their sparse item-item kNN graphs, each against a dense reference written here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import Main
import Models
from DataHandler import Data
from Models.freedom import FREEDOM, modality_weights
from Models.lattice import LATTICE
from Params import parse_args
from Models.base import PhaseTimer
from Utils.graphs import coalesce, coo_to_csr, cosine_topk, knn_coo, row_normalized_graph, symnorm

from conftest import assert_resumes_exactly

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# references: MMRec's dense construction (utils/utils.py:119-137, freedom.py:79-100), written out here
# ---------------------------------------------------------------------------------------------

def dense_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """build_sim + build_knn_neighbourhood: the full I x I cosine matrix, top-k per row scattered into zeros."""
    normed = x / torch.norm(x, p=2, dim=-1, keepdim=True)
    sim = normed @ normed.T
    values, columns = torch.topk(sim, k, dim=-1)
    return torch.zeros_like(sim).scatter_(-1, columns, values)


def dense_symnorm(a: torch.Tensor) -> torch.Tensor:
    """compute_normalized_laplacian: diag(d^-1/2) A diag(d^-1/2), d = row sums, inf -> 0."""
    d = a.sum(-1).pow(-0.5)
    d[torch.isinf(d)] = 0.0
    return torch.diag(d) @ a @ torch.diag(d)


def np_dense(rows, cols, values, n) -> np.ndarray:
    out = np.zeros((n, n))
    np.add.at(out, (rows.detach().numpy(), cols.detach().numpy()), values.detach().numpy().astype(np.float64))
    return out


def toy_data(n_users=14, n_items=12, seed=0, modalities=("image", "text")) -> Data:
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.3).astype(np.float32)
    train[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0    # every user has a train item
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    dims = {"image": 6, "text": 5, "audio": 4}
    features = {m: rng.normal(size=(n_items, dims[m])).astype(np.float32) for m in modalities}
    return Data("toy", sp.csr_matrix(train), empty, empty, features)


def args_for(model, *extra, parse=parse_args):
    return parse(["--model", model, "--quiet", "--embedding_size", "8", "--feat_embed_dim", "8", "--knn_k", "3",
                  *extra])


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(Models.REGISTRY, "lattice", "Models.lattice:LATTICE")
    monkeypatch.setitem(Models.REGISTRY, "freedom", "Models.freedom:FREEDOM")


@pytest.fixture(autouse=True)
def _register_for_parsing(registered):
    """parse_args knows a model only through the registry (the lead adds the permanent lines)."""


# ---------------------------------------------------------------------------------------------
# Utils/graphs.py: the item kNN graphs
# ---------------------------------------------------------------------------------------------

def test_chunked_knn_equals_the_dense_topk():
    x = torch.randn(23, 7, generator=torch.Generator().manual_seed(1))
    values, columns = cosine_topk(x, 4, chunk=5)                          # 5 rows a block, 23 items
    want = dense_knn(x, 4)
    rows, cols, vals = knn_coo(values, columns)
    got = np_dense(rows, cols, vals, 23)
    assert np.array_equal(got != 0, want.numpy() != 0)                    # the same kept entries
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    assert np.all(np.diag(got) == pytest.approx(1.0))                     # the item itself (cos 1) is kept
    # symnorm over the kept values: the dense normalisation of the dense kNN matrix
    sym = symnorm((rows, cols, vals), 23)
    np.testing.assert_allclose(np_dense(*sym, 23), dense_symnorm(want).numpy(), rtol=1e-5, atol=1e-7)


def test_chunked_knn_breaks_ties_as_topk_on_the_full_row():
    # ±1 vectors of 16 dimensions: norm 4, so every cosine is an exact multiple of 1/8 and many tie
    x = torch.from_numpy(np.random.default_rng(2).choice([-1.0, 1.0], size=(30, 16)).astype(np.float32))
    x[7] = x[3]                                                           # duplicates: cos 1 twice in a row
    k = 5
    sim = (x / 4) @ (x / 4).T
    full_values, full_columns = torch.topk(sim, k, dim=-1)
    ordered = torch.sort(sim, dim=-1, descending=True).values
    assert (ordered[:, k - 1] == ordered[:, k]).sum() > 10                # the k-th value ties in many rows
    for chunk in (1, 4, 7, 30):
        values, columns = cosine_topk(x, k, chunk=chunk)
        assert torch.equal(columns, full_columns) and torch.equal(values, full_values)


def test_coalesce_sums_duplicates_and_csr_product_backpropagates_to_values():
    rows, cols = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([1, 2, 1, 1, 2])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    r, c, v = coalesce((rows, cols, values), 3)
    want = np.zeros((3, 3))
    np.add.at(want, (rows.numpy(), cols.numpy()), values.detach().numpy())
    np.testing.assert_allclose(np_dense(r, c, v, 3), want)
    assert len(v) == 3
    x = torch.randn(3, 2, requires_grad=True)
    out = torch.sparse.mm(coo_to_csr((r, c, v), (3, 3), coalesced=True), x)
    np.testing.assert_allclose(out.detach().numpy(), want @ x.detach().numpy(), rtol=1e-6)
    out.sum().backward()
    # d/d value_e of Σ (A x) = Σ_j x[col_e, j], for every duplicate
    np.testing.assert_allclose(values.grad.numpy(), x.detach().sum(1).numpy()[cols.numpy()], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# LATTICE
# ---------------------------------------------------------------------------------------------

def test_lattice_user_item_graph_is_row_normalised_with_self_loops():
    data = toy_data()
    r = data.train.toarray().astype(np.float64)
    U, I = r.shape
    a = np.eye(U + I)
    a[:U, U:], a[U:, :U] = r, r.T
    want = a / a.sum(1, keepdims=True)
    got = row_normalized_graph(data.train).toarray()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.allclose(got.sum(1), 1.0) and not np.allclose(got, got.T)  # rows sum to 1; not symmetric


def lattice_reference(model: LATTICE, data: Data, lam: float) -> torch.Tensor:
    """G = (1-λc)·symnorm(Σ α_m knn(cos(Linear_m X_m))) + λc·Σ α_m symnorm(knn(cos(X_m⁰))) densely (float64),
    differentiable in the float64 copies of the parameters attached to `model.ref`."""
    k = model.args.knn_k
    alpha = torch.softmax(model.ref["w"], 0)
    learned = sum(a * dense_knn(model.ref[m + "_x"] @ model.ref[m + "_W"].T + model.ref[m + "_b"], k)
                  for a, m in zip(alpha, data.features))
    frozen = sum(a * dense_symnorm(dense_knn(torch.from_numpy(x).double(), k))
                 for a, m, x in zip(alpha, data.features, data.features.values()))
    return (1 - lam) * dense_symnorm(learned) + lam * frozen


def attach_float64_copies(model: LATTICE) -> None:
    model.ref = {"w": model.modal_weight.detach().double().requires_grad_(),
                 "Eu": model.user_emb.detach().double().requires_grad_(),
                 "Ei": model.item_emb.detach().double().requires_grad_()}
    for m, x in model.features.items():
        model.ref[m + "_x"] = x.detach().double().requires_grad_()
        model.ref[m + "_W"] = model.projections[m].weight.detach().double().requires_grad_()
        model.ref[m + "_b"] = model.projections[m].bias.detach().double().requires_grad_()


@pytest.mark.parametrize("modalities", [("image", "text"), ("image", "text", "audio"), ("audio",)])
def test_lattice_item_graph_normalises_and_combines_as_mmrec(modalities):
    data = toy_data(modalities=modalities, seed=len(modalities))
    model = LATTICE(args_for("lattice", "--lambda_coeff", "0.7"), data, CPU)
    with torch.no_grad():
        model.modal_weight.copy_(torch.linspace(-0.5, 0.8, len(modalities)))   # unequal α
        for x in model.features.values():                                # trained features differ from X⁰
            x.add_(0.3 * torch.randn_like(x))
    attach_float64_copies(model)
    with torch.no_grad():
        got = np_dense(*model.build_item_graph(model.learned_topk()), data.n_items)
    want = lattice_reference(model, data, 0.7).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if len(modalities) > 1:   # the swapped orders (frozen: combine then normalise, learned: the reverse) differ
        ref, k = model.ref, 3
        alpha = torch.softmax(ref["w"], 0)
        learned = [dense_knn(ref[m + "_x"] @ ref[m + "_W"].T + ref[m + "_b"], k) for m in data.features]
        frozen = [dense_knn(torch.from_numpy(x).double(), k) for x in data.features.values()]
        swapped = (0.3 * sum(a * dense_symnorm(t) for a, t in zip(alpha, learned))
                   + 0.7 * dense_symnorm(sum(a * s for a, s in zip(alpha, frozen))))
        assert np.abs(swapped.detach().numpy() - got).max() > 1e-3


def test_lattice_rebuild_batch_gradient_equals_dense_autograd():
    data = toy_data(modalities=("image", "text"))
    model = LATTICE(args_for("lattice", "--reg_weight", "0.1", "--batch", "4"), data, CPU)
    with torch.no_grad():
        model.modal_weight.copy_(torch.tensor([0.2, -0.4]))
    attach_float64_copies(model)
    users, pos, neg = torch.tensor([0, 3, 5, 9]), torch.tensor([1, 2, 7, 4]), torch.tensor([6, 0, 11, 3])
    model.pre_epoch(0, PhaseTimer(CPU))
    terms = model.batch_loss(users, pos, neg)
    sum(terms.values()).backward()
    # the G kept for the epoch's later batches (built on the device, Graph.from_tensors): G and its transpose
    want_graph = lattice_reference(model, data, 0.9).detach().numpy()
    np.testing.assert_allclose(model.item_graph.to_dense().numpy(), want_graph, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_graph.matrix_t.to_dense().numpy(), want_graph.T, rtol=1e-5, atol=1e-6)

    # the dense reference: P = D^-1(A+I), 2 mean layers, items + normalize(G Ei), BPR + λ·½Σ‖·‖²/batch
    ref = model.ref
    p = torch.from_numpy(row_normalized_graph(data.train).toarray()).double()
    e0 = torch.cat([ref["Eu"], ref["Ei"]])
    nodes = (e0 + p @ e0 + p @ (p @ e0)) / 3
    h = lattice_reference(model, data, 0.9) @ ref["Ei"]
    user_vec = nodes[: data.n_users]
    item_vec = nodes[data.n_users:] + h / h.norm(dim=1, keepdim=True)
    u, ip, ineg = user_vec[users], item_vec[pos], item_vec[neg]
    bpr = -torch.nn.functional.logsigmoid((u * ip).sum(1) - (u * ineg).sum(1)).mean()
    reg = 0.1 * 0.5 * ((u ** 2).sum() + (ip ** 2).sum() + (ineg ** 2).sum()) / 4
    (bpr + reg).backward()
    assert terms["bpr"].item() == pytest.approx(bpr.item(), rel=1e-5)
    assert terms["reg"].item() == pytest.approx(reg.item(), rel=1e-5)
    pairs = [(model.modal_weight, "w"), (model.user_emb, "Eu"), (model.item_emb, "Ei")]
    for m in data.features:
        pairs += [(model.features[m], m + "_x"), (model.projections[m].weight, m + "_W"),
                  (model.projections[m].bias, m + "_b")]
    for param, name in pairs:
        want = ref[name].grad.numpy()
        assert np.abs(want).max() > 0, name                              # the learned graph does get gradient
        np.testing.assert_allclose(param.grad.numpy(), want, rtol=1e-3, atol=1e-6 * np.abs(want).max(), err_msg=name)

    # a later batch of the epoch reuses G detached: no gradient to Linear_m, X_m, w
    model.zero_grad(set_to_none=True)
    sum(model.batch_loss(users, pos, neg).values()).backward()
    assert model.modal_weight.grad is None and all(x.grad is None for x in model.features.values())
    assert model.item_emb.grad is not None


def test_lattice_item_graph_is_fp32_under_bf16_autocast():
    """--precision bf16: the rebuild batch runs under autocast, yet G (columns and recomputed cosines) is the
    fp32 graph, bit for bit."""
    data = toy_data(modalities=("image", "text"))
    model = LATTICE(args_for("lattice", "--precision", "bf16", "--batch", "4"), data, CPU)
    with torch.no_grad():
        want = model.build_item_graph(model.learned_topk())
    model.pre_epoch(0, PhaseTimer(CPU))
    with model.autocast():
        assert torch.is_autocast_enabled("cpu")
        with torch.no_grad():
            got = model.build_item_graph(model.learned_topk())
        model.batch_loss(torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([6, 0]))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    kept = model.item_graph.matrix
    assert kept.values().dtype == torch.float32
    assert torch.equal(kept.to_dense(), coo_to_csr(want, (data.n_items, data.n_items), coalesced=True).to_dense())


def test_lattice_evaluation_rebuilds_the_graph_from_current_parameters():
    data = toy_data()
    model = LATTICE(args_for("lattice"), data, CPU)
    model.pre_epoch(0, PhaseTimer(CPU))
    model.batch_loss(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))    # G of the rebuild batch
    with torch.no_grad():
        for proj in model.projections.values():
            proj.weight.mul_(-2.0).add_(0.5)
    attach_float64_copies(model)
    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
    ref = model.ref
    p = torch.from_numpy(row_normalized_graph(data.train).toarray()).double()
    e0 = torch.cat([ref["Eu"], ref["Ei"]])
    nodes = (e0 + p @ e0 + p @ (p @ e0)) / 3
    h = lattice_reference(model, data, 0.9) @ ref["Ei"]
    want = nodes[data.n_users:] + h / h.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(items.numpy(), want.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(users.numpy(), nodes[: data.n_users].detach().numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# FREEDOM
# ---------------------------------------------------------------------------------------------

def binary_knn_reference(x: np.ndarray, k: int) -> np.ndarray:
    """freedom.py:79-100 densely: 1 at the top-k columns of cos(X) per row, then 1/√(r_i r_j), r = row sums + 1e-7."""
    normed = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = normed @ normed.T
    a = np.zeros_like(sim)
    np.put_along_axis(a, np.argsort(-sim, axis=1)[:, :k], 1.0, axis=1)
    r = (a.sum(1) + 1e-7) ** -0.5
    return r[:, None] * a * r[None, :]


def test_freedom_modality_weights():
    assert modality_weights(["image", "text"], 0.1) == pytest.approx([0.1, 0.9])            # MMRec
    assert modality_weights(["image", "text", "audio"], 0.1) == pytest.approx([0.1, 0.45, 0.45])
    assert modality_weights(["image", "audio"], 0.1) == pytest.approx([0.1, 0.9])           # TikTok here
    assert modality_weights(["text", "audio"], 0.1) == pytest.approx([0.5, 0.5])            # no image
    assert modality_weights(["image"], 0.1) == pytest.approx([1.0])
    assert modality_weights(["image", "text"], 0.1, [0.3, 0.7]) == pytest.approx([0.3, 0.7])


@pytest.mark.parametrize("modalities,extra,betas", [
    (("image",), (), [1.0]),
    (("image", "text", "audio"), (), [0.1, 0.45, 0.45]),
    (("image", "text"), ("--mm_weights", "0.25,0.75"), [0.25, 0.75]),
])
def test_freedom_frozen_item_graph(modalities, extra, betas):
    data = toy_data(modalities=modalities, seed=3)
    model = FREEDOM(args_for("freedom", *extra), data, CPU)
    got = model.item_graph.to_dense().numpy().astype(np.float64)
    per_modality = [binary_knn_reference(x.astype(np.float64), 3) for x in data.features.values()]
    np.testing.assert_allclose(got, sum(b * s for b, s in zip(betas, per_modality)), rtol=1e-6, atol=1e-9)
    for s in per_modality:                                               # every kept entry is 1/k
        assert np.allclose(s[s != 0], 1 / 3) and np.all((s != 0).sum(1) == 3)


def test_freedom_pruning_draws_as_multinomial_and_renormalises():
    data = toy_data(n_users=40, n_items=25, seed=5)
    model = FREEDOM(args_for("freedom", "--dropout", "0.6", "--seed", "11"), data, CPU)
    state = model.pruning_generator.get_state()
    model.pre_epoch(0, PhaseTimer(CPU))
    got = model.train_graph.to_dense().numpy().astype(np.float64)

    # the same draw from the same generator state, on weights ω = 1/√(d_u d_i) computed here
    r = data.train.toarray()
    U, I = r.shape
    edge_u, edge_i = np.nonzero(r)                                       # row-major, as the model's pairs
    d_u, d_i = r.sum(1) + 1e-7, r.sum(0) + 1e-7
    omega = 1.0 / np.sqrt(d_u[edge_u] * d_i[edge_i])
    np.testing.assert_allclose(model.edge_weights.numpy(), omega, rtol=1e-6)
    n_keep = math.floor(len(edge_u) * 0.4)
    generator = torch.Generator()
    generator.set_state(state)
    kept = torch.multinomial(torch.tensor(omega, dtype=torch.float32), n_keep, replacement=False,
                             generator=generator).numpy()
    assert len(set(kept.tolist())) == n_keep                             # no edge twice
    kept_u, kept_i = edge_u[kept], edge_i[kept]
    dk_u = np.bincount(kept_u, minlength=U) + 1e-7
    dk_i = np.bincount(kept_i, minlength=I) + 1e-7
    want = np.zeros((U + I, U + I))
    want[kept_u, U + kept_i] = 1.0 / np.sqrt(dk_u[kept_u] * dk_i[kept_i])
    want += want.T
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (got != 0).sum() == 2 * n_keep and np.all(np.diag(got) == 0)
    # the next epoch draws another graph; --dropout 0 trains on the full graph
    model.pre_epoch(1, PhaseTimer(CPU))
    assert not np.array_equal(model.train_graph.to_dense().numpy(), got.astype(np.float32))
    unpruned = FREEDOM(args_for("freedom", "--dropout", "0"), data, CPU)
    unpruned.pre_epoch(0, PhaseTimer(CPU))
    assert unpruned.train_graph is unpruned.full_graph


def test_freedom_trains_on_the_pruned_graph_and_evaluates_on_the_full_one():
    data = toy_data(n_users=30, n_items=20, seed=6, modalities=("image", "audio"))
    model = FREEDOM(args_for("freedom", "--dropout", "0.5", "--reg_weight", "0.3"), data, CPU)
    model.pre_epoch(0, PhaseTimer(CPU))
    pruned = model.train_graph.to_dense().double()
    r = data.train.toarray().astype(np.float64)
    U, I = r.shape
    a = np.zeros((U + I, U + I))
    a[:U, U:], a[U:, :U] = r, r.T
    d = (a.sum(1) + 1e-7) ** -0.5
    full = torch.from_numpy(d[:, None] * a * d[None, :])
    s = torch.from_numpy(0.1 * binary_knn_reference(data.features["image"].astype(np.float64), 3)
                         + 0.9 * binary_knn_reference(data.features["audio"].astype(np.float64), 3))
    e0 = torch.cat([model.user_emb, model.item_emb]).detach().double()
    h = s @ model.item_emb.detach().double()

    def forward(adj):
        nodes = (e0 + adj @ e0 + adj @ (adj @ e0)) / 3
        return nodes[:U], nodes[U:] + h                                  # items + S Ei, not normalised

    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
    want_u, want_i = forward(full)
    np.testing.assert_allclose(users.numpy(), want_u.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(items.numpy(), want_i.numpy(), rtol=1e-5, atol=1e-6)

    model.train()
    b_u, b_p, b_n = torch.tensor([0, 4, 9]), torch.tensor([1, 5, 2]), torch.tensor([3, 8, 19])
    terms = model.batch_loss(b_u, b_p, b_n)
    user_vec, item_vec = forward(pruned)

    def bpr(u, p, n):
        return float(-torch.nn.functional.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean())

    u = user_vec[b_u]
    assert terms["bpr"].item() == pytest.approx(bpr(u, item_vec[b_p], item_vec[b_n]), rel=1e-5)
    modal = 0.0
    for m, x in data.features.items():
        f = torch.from_numpy(x).double() @ model.projections[m].weight.detach().double().T \
            + model.projections[m].bias.detach().double()
        modal += bpr(u, f[b_p], f[b_n])
    assert terms["modal_bpr"].item() == pytest.approx(0.3 * modal, rel=1e-5)
    assert set(terms) == {"bpr", "modal_bpr"}                            # no L2 term


# ---------------------------------------------------------------------------------------------
# both
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,extra,word,needs_data", [
    ("lattice", ("--knn_k", "0"), "--knn_k", False),
    ("lattice", ("--knn_k", "12"), "--knn_k", True),
    ("freedom", ("--knn_k", "12"), "--knn_k", True),
    ("freedom", ("--mm_weights", "0.2,0.3,0.5"), "--mm_weights", True),
    ("freedom", ("--mm_weights", "0.2,0.3"), "--mm_weights", False),
    ("freedom", ("--feat_embed_dim", "4"), "--feat_embed_dim", False),
    ("freedom", ("--dropout", "1.0"), "--dropout", False),
    ("freedom", ("--mm_image_weight", "1.5"), "--mm_image_weight", False),
])
def test_check_names_impossible_configurations_in_one_sentence(model, extra, word, needs_data):
    from Params import build_parser

    data = toy_data()                                                    # 12 items, image + text
    cls = {"lattice": LATTICE, "freedom": FREEDOM}[model]
    assert cls.check(args_for(model), data) is None
    args = args_for(model, *extra, parse=build_parser(model).parse_args)   # not checked when parsed
    problem = cls.check(args, data)
    assert isinstance(problem, str) and word in problem and "\n" not in problem and ". " not in problem
    # a check that needs no data is check_flags', so the command line is refused when parsed (a sweep's grid too)
    assert (cls.check_flags(args) is None) == needs_data
    if not needs_data:
        with pytest.raises(SystemExit):
            args_for(model, *extra)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from Utils.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "synthetic")
    return root


@pytest.mark.parametrize("model", ["lattice", "freedom"])
def test_model_trains_and_beats_popularity(synthetic_dir, tmp_path, model):
    out = tmp_path / model
    argv = ["--data_dir", str(synthetic_dir), "--model", model, "--quiet", "--out_dir", str(out),
            "--epoch", "3", "--batch", "512", "--lr", "0.01", "--embedding_size", "32", "--feat_embed_dim", "32"]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (model, ours, popularity)
    assert summary["data"]["modalities"] == ["image", "text", "audio"]
    # best_model.pt reloads into a model that scores exactly as at the best validation epoch (LATTICE: its
    # frozen graphs from the dataset's features, the trained ones from the checkpoint)
    import evaluate
    assert evaluate.evaluate_run(out, device="cpu")["identical"]


def test_freedom_interrupted_run_resumes_to_the_same_numbers(tiny_dir, tmp_path, monkeypatch):
    """The pruning generator is saved in last.pt: the resumed epochs draw the uninterrupted run's graphs."""

    extra = ("--model", "freedom", "--epoch", "4", "--knn_k", "3", "--batch", "16", "--embedding_size", "8",
             "--feat_embed_dim", "8")
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, *extra)
