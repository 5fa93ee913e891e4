"""On a CUDA device: every model trains, the fast kernels and the hidden-space reverse chain agree with the plain
computation, the hot paths read no value back, and every model's scores, losses and gradients agree between the
CPU and the device with the same parameters.

Every test but one is marked `cuda` and skips, saying why, where torch sees no CUDA device. The comparison helpers
take the two devices as arguments, so the last test runs the same comparison with both models on the CPU: on any
machine it exercises the helpers (model construction, the shared graphs, the probes) that the CUDA test relies on.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import inference
import Main
from conftest import small_flags, tiny_args
from Models import get_model, model_names
from Models.base import RecModel
from Models.diffrec import StepHistory
from Models.diffusion import Denoiser, GaussianDiffusion
from Models.mdmns import full_nce, guide_features, guided_losses
from Params import parse_args
from Utils.batches import DeviceRows, device_batches, sample_negatives, train_pairs
from Utils.kernels import LogSumExpLogits
from Utils.layers import Graph, info_nce, to_torch_csr
from Utils.metrics import evaluate

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
CUDA = torch.device("cuda") if HAS_CUDA else None
RTOL = 1e-4   # CPU against CUDA: relative to the largest magnitude of the compared tensor (a scalar: to itself)


def on_cuda(test: Callable) -> Callable:
    """Mark a test `cuda`, and skip it with the reason where torch sees no CUDA device."""
    reason = "no CUDA device: torch.cuda.is_available() is False (these tests prove the CUDA paths on a GPU)"
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=reason)(test))


@pytest.fixture(autouse=True)
def ieee_fp32_products():
    """Every test starts with IEEE fp32 matrix products (no TF32), and leaves torch's settings as it found them:
    the tolerances below assume fp32 products, and a TF32 setting left behind by another run would break them."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """|got - want| <= rtol · max|want| everywhere (float32 on two devices: sums in another order); where `want` is
    all zeros, |got| <= 1e-6 (a gradient that cancels exactly on one device may leave float32 dust on the other)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = want.abs().max().item() if want.numel() else 0.0
    atol = rtol * scale if scale > 0 else 1e-6
    torch.testing.assert_close(got, want, rtol=0.0, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_finite_losses(run_dir: Path, model: str) -> None:
    """Every loss term of every epoch in metrics.jsonl is finite (the harness also stops on a non-finite one)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records, f"{model}: no epoch recorded"
    for record in records:
        for group in get_model(model).loss_phases:
            values = record.get(group) or {}
            assert values and all(math.isfinite(v) for v in values.values()), (model, record["epoch"], group, values)


# ------------------------------------------------------------------------------------------------
# every model trains on CUDA
# ------------------------------------------------------------------------------------------------

# flags of the CUDA runs beyond the defaults: LGMRec's evaluation without fresh Gumbel noise, so that the reloaded
# checkpoint scores exactly as the run did
RUN_FLAGS: Dict[str, Tuple[str, ...]] = {"lgmrec": ("--deterministic_hyper", "true")}


@on_cuda
@pytest.mark.parametrize("model", model_names())
def test_every_model_trains_two_epochs_on_cuda_and_its_checkpoint_scores_the_same(gen_dir, tmp_path, model):
    out = tmp_path / model
    summary = Main.run(parse_args(tiny_args(gen_dir, out, "--model", model, "--epoch", "2", "--device", "cuda",
                                            *RUN_FLAGS.get(model, ()), data="gen")))
    assert summary["device"].startswith("cuda"), summary["device"]
    assert summary["epochs_run"] == 2
    assert_finite_losses(out, model)
    args, data, reloaded = inference.load_trained(out, device="cuda")
    assert reloaded.device.type == "cuda"
    with torch.no_grad():
        metrics = evaluate(reloaded.scorer(), data.train, data.test, args.topks, args.tstBat, reloaded.device)
    assert metrics == pytest.approx(summary["protocols"]["validation"]["test"], rel=1e-6)


# code paths whose device handling differs from the defaults', one epoch each
VARIANTS = [
    ("diffmm", ("--reverse", "hidden")),                          # the rebuild in the denoiser's hidden space
    ("diffmm", ("--reverse", "direct", "--kernels", "plain")),    # torch's own sparse autograd on CUDA
    ("diffmm", ("--ablation", "no_dm", "--rebuild_k", "2")),      # VGAE generators
    ("diffmm", ("--fusion_ratio", "0.5", "--cl_method", "1")),
    ("mdmns", ("--cl_method", "1", "--guide_fresh_per_call", "false", "--guide_at_sampling", "true")),
    ("diffrec", ("--reverse", "hidden", "--steps", "20")),
    ("diffrec", ("--mean_type", "eps", "--steps", "20")),
    ("mmssl", ("--gen_graph", "full", "--mm_attn", "paper")),
    ("lgmrec", ("--kernels", "plain")),
    ("freedom", ("--dropout", "0")),
]


@on_cuda
@pytest.mark.parametrize("model,extra", VARIANTS, ids=[f"{m}{''.join(e)}" for m, e in VARIANTS])
def test_variants_train_one_epoch_on_cuda(gen_dir, tmp_path, model, extra):
    out = tmp_path / "run"
    summary = Main.run(parse_args(tiny_args(gen_dir, out, "--model", model, "--device", "cuda", *extra, data="gen")))
    assert summary["device"].startswith("cuda") and summary["epochs_run"] == 1
    assert_finite_losses(out, model)


@on_cuda
@pytest.mark.parametrize("extra", [("--precision", "tf32"), ("--precision", "bf16", "--reverse", "hidden"),
                                   ("--precision", "bf16", "--reverse", "direct")], ids=["tf32", "bf16-hidden",
                                                                                         "bf16-direct"])
def test_diffmm_epoch_with_tf32_and_bf16_on_cuda(gen_dir, tmp_path, extra):
    before = torch.backends.cuda.matmul.allow_tf32
    out = tmp_path / "run"
    summary = Main.run(parse_args(tiny_args(gen_dir, out, "--device", "cuda", *extra, data="gen")))
    assert summary["device"].startswith("cuda") and summary["config"]["precision"] == extra[1]
    assert_finite_losses(out, "diffmm")
    assert torch.backends.cuda.matmul.allow_tf32 == before   # the run leaves torch's setting as it found it


# ------------------------------------------------------------------------------------------------
# the fast kernels and the hidden-space reverse chain against the plain computation, on CUDA
# ------------------------------------------------------------------------------------------------

@on_cuda
@pytest.mark.parametrize("symmetric", [False, True])
def test_sparse_product_with_precomputed_transpose_on_cuda(symmetric):
    """Graph @ x (Utils.kernels.SparseMatmul) and --kernels plain (torch's CSR autograd): the dense product and
    its gradient Aᵀ G; under bf16 autocast the product stays fp32."""
    a = sp.random(300, 300 if symmetric else 200, density=0.05, format="csr", random_state=2, dtype=np.float32)
    a = (a + a.T).tocsr() if symmetric else a
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.shape[1], 16, generator=g).to(CUDA)
    upstream = torch.randn(a.shape[0], 16, generator=g).to(CUDA)
    dense = torch.from_numpy(a.toarray()).to(CUDA)
    want, want_grad = dense @ x, dense.T @ upstream
    for plain in (False, True):
        graph = Graph(a, CUDA, symmetric=symmetric, plain=plain)
        leaf = x.clone().requires_grad_(True)
        out = graph @ leaf
        (out * upstream).sum().backward()
        assert_same(out, want, f"product (plain={plain})", rtol=1e-5)
        assert_same(leaf.grad, want_grad, f"gradient (plain={plain})", rtol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = graph @ x.bfloat16()
        assert low.dtype == torch.float32
        assert_same(low, dense @ x.bfloat16().float(), f"product of bf16 input (plain={plain})", rtol=1e-5)


@on_cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_logsumexp_and_info_nce_on_cuda(dtype, rtol):
    """LogSumExpLogits against torch.logsumexp, the fused InfoNCE against the plain one (duplicate nodes), and
    MDMNS's chunked full_nce against the full cross-entropy: values and gradients."""
    g = torch.Generator().manual_seed(3)
    x0, y0 = torch.randn(70, 8, generator=g, dtype=dtype), torch.randn(90, 8, generator=g, dtype=dtype)
    weights = torch.rand(70, generator=g, dtype=dtype).to(CUDA)
    nodes = torch.tensor([1, 5, 5, 0, 69, 1, 1, 33], device=CUDA)          # repeated nodes count each time

    def value_and_grads(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        x, y = x0.to(CUDA).requires_grad_(True), y0.to(CUDA).requires_grad_(True)
        value = fn(x, y)
        return (value.detach(), *torch.autograd.grad(value, (x, y)))

    checks = {
        "logsumexp": (lambda x, y: (LogSumExpLogits.apply(x, y, 0.3) * weights).sum(),
                      lambda x, y: (torch.logsumexp(x @ y.T / 0.3, dim=1) * weights).sum()),
        "info_nce": (lambda x, y: info_nce(x, y[:70], nodes, 0.5), lambda x, y: info_nce(x, y[:70], nodes, 0.5, True)),
        "full_nce": (lambda x, y: full_nce(x, y[:70], 0.5, chunk=16),
                     lambda x, y: F.cross_entropy(F.normalize(x) @ F.normalize(y[:70]).T / 0.5,
                                                  torch.arange(70, device=CUDA))),
    }
    for name, (fast, plain) in checks.items():
        for got, want in zip(value_and_grads(fast), value_and_grads(plain)):
            assert_same(got, want, name, rtol=rtol)


HIDDEN_CASES = [([64], 5, (0.1, 1e-4, 0.02), 0), ([48, 24], 7, (0.5, 1e-3, 0.05), 0),
                ([32, 16, 8], 3, (1.0, 1e-2, 0.2), 0), ([40], 6, (0.1, 1e-4, 0.02), 3)]


@on_cuda
@pytest.mark.parametrize("dims,steps,noise,sampling_steps", HIDDEN_CASES)
def test_hidden_space_reverse_process_matches_the_direct_one_on_cuda(dims, steps, noise, sampling_steps):
    """GaussianDiffusion.p_sample_hidden against p_sample on CUDA in float32 (tests/test_diffusion.py on the CPU);
    from the train rows themselves, both also against the CPU's rows."""
    torch.manual_seed(len(dims) * 10 + steps)
    n_items, k = 90, 5
    den_cpu = Denoiser(n_items, dims, 6, norm=False).eval()
    for p in den_cpu.parameters():                  # a trained-looking denoiser, not the near-zero init
        p.data.normal_(0.0, 0.3)
    den = copy.deepcopy(den_cpu).to(CUDA)
    diff = GaussianDiffusion(*noise, steps, CUDA)
    rows = sp.random(17, n_items, density=0.08, format="csr", random_state=steps)
    rows.data[:] = 1.0
    x0 = torch.from_numpy(rows.toarray().astype(np.float32)).to(CUDA)
    torch.manual_seed(1)
    direct = diff.p_sample(den, x0, sampling_steps, sampling_noise=False)
    torch.manual_seed(1)                            # the same forward noise when sampling_steps > 0
    hidden = diff.p_sample_hidden(den, x0, sampling_steps, to_torch_csr(rows, CUDA))
    torch.manual_seed(1)
    dense_start = diff.p_sample_hidden(den, x0, sampling_steps)
    assert hidden.device.type == "cuda" and hidden.dtype == torch.float32
    assert_same(hidden, direct, "hidden vs direct")
    assert_same(dense_start, direct, "hidden from dense rows vs direct")
    if sampling_steps == 0:                         # no noise: the CPU computes the same rows
        on_cpu = GaussianDiffusion(*noise, steps, CPU).p_sample(den_cpu, x0.cpu(), 0, sampling_noise=False)
        assert_same(direct, on_cpu, "CUDA vs CPU")
    # the top k agree wherever the k-th and (k+1)-th rows are apart by more than the rounding
    ordered = torch.sort(direct, dim=1, descending=True).values
    clear = (ordered[:, k - 1] - ordered[:, k]) > 10 * RTOL * direct.abs().max()
    assert clear.any()
    top = (torch.topk(m[clear], k).indices.sort().values for m in (hidden, direct))
    assert torch.equal(*top)


# ------------------------------------------------------------------------------------------------
# the hot paths read nothing back from the device
# ------------------------------------------------------------------------------------------------

@on_cuda
def test_batch_pieces_are_built_on_cuda_without_a_sync_and_match_the_cpu():
    """The per-batch pieces of the training, rebuild and evaluation loops (DataHandler.DeviceRows, the index
    batches, DiffRec's step history, the hidden-space chain's steps) run with torch's sync debug mode set to
    raise, and give the CPU's values."""
    rng = np.random.default_rng(0)
    matrix = sp.random(200, 150, density=0.06, format="csr", random_state=4, dtype=np.float32)
    matrix.data[:] = 1.0
    host_rows = rng.permutation(200)[:64]
    on_cpu, on_cuda = DeviceRows(matrix, CPU), DeviceRows(matrix, CUDA)
    batches = device_batches([host_rows[:40], host_rows[40:]], CUDA)   # one copy, before the checked block
    torch.manual_seed(0)
    t = torch.randint(0, 7, (64,)).to(CUDA)
    values = torch.rand(64).to(CUDA)
    history, reference = StepHistory(7, CUDA, 3), StepHistory(7, CPU, 3)
    den = Denoiser(150, [16], 6, norm=False).to(CUDA).eval()
    diff = GaussianDiffusion(0.1, 1e-4, 0.02, 5, CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = torch.cat(batches)
        dense, csr = on_cuda.dense(rows), on_cuda.csr(rows, host_rows)
        history.update(t, values)
        history.update(t.flip(0), values)
        with torch.no_grad():
            chain = diff.p_sample_hidden(den, dense, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    idx = torch.from_numpy(host_rows)
    assert torch.equal(dense.cpu(), on_cpu.dense(idx))
    want = on_cpu.csr(idx, host_rows)
    for got_part, want_part in zip((csr.crow_indices(), csr.col_indices(), csr.values()),
                                   (want.crow_indices(), want.col_indices(), want.values())):
        assert torch.equal(got_part.cpu(), want_part)
    reference.update(t.cpu(), values.cpu())
    reference.update(t.cpu().flip(0), values.cpu())
    assert torch.equal(history.values.cpu(), reference.values) and torch.equal(history.count.cpu(), reference.count)
    assert torch.isfinite(chain).all()


# ------------------------------------------------------------------------------------------------
# every model: the same parameters give the same scores, losses and gradients on two devices
# ------------------------------------------------------------------------------------------------

# Per model, a small configuration on the generated data whose evaluation and loss are deterministic functions of
# the parameters and the inputs: lr 0 (an optimiser step changes nothing), no dropout where eval mode does not
# switch it off (BM3's targets), LGMRec's hyperedges without Gumbel noise at evaluation, the full generated graphs
# at DiffMM's and MDMNS's evaluation, MDMNS's persistent guidance modules (not a new random one per call).
compare_flags = small_flags   # every model at small sizes (conftest: its SMALL_FLAGS line, else its defaults)
BATCH = 48   # user rows of the row-wise probes (DiffRec, the denoisers, MMSSL)


def moved_graph(graph: Graph, device: torch.device) -> Graph:
    return Graph.from_tensors(graph.matrix.to(device), graph.matrix_t.to(device), graph.plain)


def share_generated_graphs(first: RecModel, second: RecModel) -> None:
    """DiffMM, MDMNS: the first model's graph rebuild (its top items, its random edge drop) given to the second, the
    dropped graph and the views' graph still one object where they were (the recommender tests for that)."""
    first.graphs = first.rebuild_graphs()
    moved: Dict[int, Graph] = {}
    for graph in (g for pair in first.graphs.values() for g in pair.values()):
        moved.setdefault(id(graph), moved_graph(graph, second.device))
    second.graphs = {m: {kind: moved[id(g)] for kind, g in pair.items()} for m, pair in first.graphs.items()}


def share_knn_columns(first: RecModel, second: RecModel) -> None:
    """LATTICE: the kNN columns chosen on the first device, used on both (another device's rounding may order a
    near-tie at the k-th neighbour differently: another graph, not a device bug); the values are recomputed."""
    second.frozen_graphs = [tuple(t.to(second.device) for t in graph) for graph in first.frozen_graphs]
    columns = first.learned_topk()
    first.learned_topk = lambda: columns
    second.learned_topk = lambda: [c.to(second.device) for c in columns]


def share_item_graph(first: RecModel, second: RecModel) -> None:
    """FREEDOM: the frozen kNN item graph of the first device (near-ties, as LATTICE's)."""
    second.item_graph = moved_graph(first.item_graph, second.device)


Inputs = Dict[str, torch.Tensor]
Terms = Dict[str, torch.Tensor]


def probe_inputs(model: RecModel) -> Inputs:
    """One batch of every input a probe reads, drawn on the CPU from fixed seeds: the same for both devices."""
    data, rng = model.data, np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    users, items = train_pairs(data.train)
    pick = rng.choice(len(users), size=min(256, len(users)), replace=False)
    rows = torch.arange(min(BATCH, data.n_users))
    steps = getattr(model.args, "steps", 1)
    return {"users": torch.from_numpy(users[pick]), "positives": torch.from_numpy(items[pick]),
            "negatives": torch.from_numpy(sample_negatives(data.train, users[pick], rng)),
            "all_negatives": torch.from_numpy(sample_negatives(data.train, users, np.random.default_rng(1))),
            "rows": rows, "t": torch.randint(0, steps, (len(rows),), generator=g),
            "pt": 0.5 + torch.rand(len(rows), generator=g), "noise": torch.randn(len(rows), data.n_items, generator=g),
            "uniform": torch.rand(len(rows), data.n_items, generator=g),
            "alpha": torch.rand(len(data.modalities) * len(rows), 1, generator=g)}


def pairwise_loss(model: RecModel, inputs: Inputs) -> Terms:
    """MMRec's models: `batch_loss` of one batch of (user, positive, negative)."""
    users, positives, negatives = (inputs[k].to(model.device) for k in ("users", "positives", "negatives"))
    return model.batch_loss(users, positives, negatives if getattr(model, "uses_negatives", True) else None)


def diffrec_loss(model: RecModel, inputs: Inputs) -> Terms:
    """DiffRec: `batch_loss` of the first users' rows with the steps, their probabilities and the noise fed."""
    d = model.device
    draws = (inputs["t"].to(d), inputs["pt"].to(d), inputs["noise"].to(d))
    return {"loss": model.batch_loss(model.user_rows.dense(inputs["rows"].to(d)), draws)}


def diffmm_losses(model: RecModel, inputs: Inputs) -> Terms:
    """DiffMM, MDMNS: per modality the denoiser's ELBO and MSI terms with the steps and noise fed (MDMNS: guided by
    its persistent module) and the graph rebuild's reverse chain, direct and in the hidden space, from the users'
    train rows; then the recommender's mean losses over one pass of the train pairs (the same negatives, the same
    batches from the same torch seed; lr 0, so every batch sees the same parameters). The pass steps its own
    optimiser, so its losses are compared as values and its gradients as those of its last batch."""
    d = model.device
    rows = inputs["rows"].to(d)
    x0 = model.user_rows.dense(rows)
    item_emb = model.recommender.item_emb.detach()
    with torch.no_grad():
        modal_feats = model.recommender.modal_features()
    guides = guide_features(modal_feats) if getattr(model, "guided", False) else {}
    t, noise = inputs["t"].to(d), inputs["noise"].to(d)
    terms = {}
    for m, denoiser in model.generators.items():
        if m in guides:
            elbo, msi, _ = guided_losses(model.diffusion, denoiser, x0, item_emb, modal_feats[m],
                                         lambda x_t, m=m: model.guided_input(m, x_t, guides[m], rows), t=t, noise=noise)
        else:
            elbo, msi = model.diffusion.training_losses(denoiser, x0, item_emb, modal_feats[m], t=t, noise=noise)
        terms[f"{m}_elbo"], terms[f"{m}_msi"] = elbo.mean(), msi.mean()
        with torch.no_grad():
            terms[f"{m}_rebuild_rows"] = model.diffusion.p_sample(denoiser, x0, 0, False)
            terms[f"{m}_hidden_rows"] = model.diffusion.p_sample_hidden(denoiser, x0, 0, model.user_rows.csr(rows))
    torch.manual_seed(0)   # user_batches shuffles with torch's CPU generator, whatever the model's device
    losses = model.train_recommender({m: g["dropped"] for m, g in model.graphs.items()},
                                     inputs["all_negatives"].numpy(),
                                     view_graphs={m: g["view"] for m, g in model.graphs.items()})
    terms.update({f"recommender_{k}": torch.tensor(v, dtype=torch.float64) for k, v in losses.items()})
    return terms


def mmssl_losses(model: RecModel, inputs: Inputs) -> Terms:
    """MMSSL: the discriminator's and the recommender's steps on one batch with the Gumbel draws and the penalty's
    mixing weights fed (lr 0 and D_lr 0: neither step changes a parameter; each leaves its gradients)."""
    d, b = model.device, len(inputs["rows"])
    users, positives, negatives = (inputs[k][:b].to(d) for k in ("users", "positives", "negatives"))
    train_rows = model.train_rows(users)
    d_terms = model.discriminator_step(users, train_rows, inputs["uniform"].to(d), inputs["alpha"].to(d))
    g_terms = model.recommender_step(users, positives, negatives, train_rows)[0]
    return {"train_rows": train_rows, **dict(zip(("d_real", "d_fake", "d_gp", "d_loss"), d_terms)),
            **dict(zip(("bpr", "emb", "feat", "cl", "adv", "loss"), g_terms))}


Align = Optional[Callable[[RecModel, RecModel], None]]
Probe = Optional[Callable[[RecModel, Inputs], Terms]]
# per model: what the second model takes from the first besides the parameters, and how its loss is probed
# (Popularity has no loss: its scores only); a model missing here gets `probes_of`'s default
PROBES: Dict[str, Tuple[Align, Probe]] = {
    "diffmm": (share_generated_graphs, diffmm_losses),
    "mdmns": (share_generated_graphs, diffmm_losses),
    "lattice": (share_knn_columns, pairwise_loss),
    "freedom": (share_item_graph, pairwise_loss),
    "diffrec": (None, diffrec_loss),
    "mmssl": (None, mmssl_losses),
    "pop": (None, None),
}


def has_pairwise_batch_loss(model_class: type) -> bool:
    """Whether the class has MMRec's `batch_loss(users, positives, negatives, ...)` (PairwiseModel's, NGCF's...)."""
    loss = getattr(model_class, "batch_loss", None)
    if loss is None:
        return False
    names = list(inspect.signature(loss).parameters)[1:4]   # after self
    return names == ["users", "positives", "negatives"]


def probes_of(model: str) -> Tuple[Align, Probe]:
    """The model's PROBES line, else (None, pairwise_loss) for a model with a pairwise `batch_loss`; a model with
    neither fails here, naming what to add."""
    if model in PROBES:
        return PROBES[model]
    assert has_pairwise_batch_loss(get_model(model)), \
        f"{model} has no batch_loss(users, positives, negatives): add its line to PROBES (tests/test_cuda.py)"
    return None, pairwise_loss


def twin_models(gen_dir: Path, model: str, first_device: torch.device, second_device: torch.device
                ) -> Tuple[RecModel, RecModel]:
    """The model built on `first_device` with the run's seed, and the same model built on `second_device` with the
    first's parameters and buffers loaded, then aligned (`PROBES`), both in eval mode."""
    args: argparse.Namespace = parse_args(["--data", "gen", "--data_dir", str(gen_dir), "--model", model, "--quiet",
                                           "--lr", "0", *compare_flags(model)])
    model_class = get_model(model)
    data = inference.load_run_data(args, model_class.needs_features)
    assert model_class.check(args, data) is None
    first = inference.build_model(args, data, first_device)
    second = inference.build_model(args, data, second_device)
    second.load_state_dict(first.state_dict())
    align = probes_of(model)[0]
    if align is not None:
        align(first, second)
    return first.eval(), second.eval()


def probe_results(model: RecModel, probe: Callable[[RecModel, Inputs], Terms], inputs: Inputs
                  ) -> Tuple[Terms, Terms]:
    """The probe's terms, and every parameter's gradient afterwards: that of the sum of the terms that carry a
    graph, plus whatever the probe's own steps left."""
    model.zero_grad(set_to_none=True)
    terms = probe(model, inputs)
    with_graph = [v for v in terms.values() if v.requires_grad]
    if with_graph:
        torch.stack([v.float() for v in with_graph]).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return terms, grads


def compare_devices(gen_dir: Path, model: str, first_device: torch.device, second_device: torch.device) -> None:
    """The scores of a batch of users (eval mode, no gradient), the probe's loss terms and every gradient of the
    same model on two devices agree to RTOL (relative to each tensor's largest magnitude)."""
    first, second = twin_models(gen_dir, model, first_device, second_device)
    users = torch.arange(min(64, first.data.n_users))
    with torch.no_grad():
        want, got = (m.scorer()(users.to(m.device)) for m in (first, second))
    assert got.device.type == second_device.type
    assert_same(got, want, f"{model} scores")
    probe = probes_of(model)[1]
    if probe is None:
        return
    inputs = probe_inputs(first)
    want_terms, want_grads = probe_results(first, probe, inputs)
    got_terms, got_grads = probe_results(second, probe, inputs)
    assert want_terms.keys() == got_terms.keys() and want_grads.keys() == got_grads.keys()
    assert want_grads, f"{model}: the probe reached no parameter"
    for name, value in want_terms.items():
        assert_same(got_terms[name], value, f"{model} {name}")
    for name, grad in want_grads.items():
        assert_same(got_grads[name], grad, f"{model} gradient of {name}")


@on_cuda
@pytest.mark.parametrize("model", model_names())
def test_scores_losses_and_gradients_agree_between_cpu_and_cuda(gen_dir, model):
    compare_devices(gen_dir, model, CPU, CUDA)


CHEAP: Sequence[str] = ("mf", "diffmm")


@pytest.mark.parametrize("model", [m if m in CHEAP else pytest.param(m, marks=pytest.mark.slow) for m in model_names()])
def test_the_device_comparison_itself_with_two_cpu_models(gen_dir, model):
    """Not a CUDA test: the comparison above with both models on the CPU (equal numbers), so that its helpers run
    on every machine; every registered model has its configuration and probe."""
    assert set(PROBES) <= set(model_names())
    assert all(probes_of(m) for m in model_names())   # every registered model has a probe (its line or the default)
    compare_devices(gen_dir, model, CPU, CPU)
