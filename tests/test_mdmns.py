"""MDMNS (Models/mdmns.py): its views and summed score, per-view BPR, the all-row NCE and the multi-level noisy contrast,
the guidance graph and guided diffusion loss, the harness run and the checkpoint.

Every reference is written here: dense float64 transcriptions of the authors' code (full N x N cross-entropy,
dense (B+I)² guidance adjacency, the forward one modality at a time) or explicit loops."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import inference
import Main
import Models
from Models.mdmns import (MDMNS, GuidanceGCN, anchored_contrast, noise_fracs, full_nce, guide_features,
                          guidance_propagate, guided_losses, modal_bpr, noise_levels, noisy_contrast)
from Params import parse_args
from Utils.metrics import evaluate

from conftest import SHARED, require_shared, tiny_args

CPU = torch.device("cpu")


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(Models.REGISTRY, "mdmns", "Models.mdmns:MDMNS")


def tiny_model(tiny_dir, tmp_path, *extra: str) -> MDMNS:
    args = parse_args(tiny_args(tiny_dir, tmp_path / "run", "--model", "mdmns", "--dims", "[16]", "--latdim", "8",
                                *extra))
    return inference.build_model(args, inference.load_run_data(args, True), CPU)


def dense_nce(a: torch.Tensor, b: torch.Tensor, temp: float) -> torch.Tensor:
    """The authors' info_nce_loss (Main.py:338-348): cross-entropy over the full N x N logits."""
    logits = F.normalize(a) @ F.normalize(b).T / temp
    return F.cross_entropy(logits, torch.arange(len(a)))


# --- noise levels and contrastive terms (§2) ---------------------------------------------------

def test_noise_levels_from_steps():
    fracs = [0.1, 0.125, 0.25, 0.5]
    assert noise_levels(5, fracs) == [0, 0, 1, 2]
    assert noise_levels(20, fracs) == [2, 2, 5, 10]
    for steps in range(1, 300):  # the authors' int(steps / 10), int(steps / 8), int(steps / 4), int(steps / 2)
        assert noise_levels(steps, fracs) == [int(steps / 10), int(steps / 8), int(steps / 4), int(steps / 2)]
    assert noise_fracs("0.1,0.125, 0.25,0.5") == fracs and noise_fracs("") == []


@pytest.mark.parametrize("n,chunk", [(37, 8), (24, 6), (5, 64)])
@pytest.mark.parametrize("temp", [0.5, 0.1])
def test_chunked_nce_matches_dense_value_and_gradient(n, chunk, temp):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ours = full_nce(a, b, temp, chunk=chunk)
    ga, gb = torch.autograd.grad(3.0 * ours, (a, b))  # a non-unit upstream gradient
    ref = dense_nce(a, b, temp)
    ra, rb = torch.autograd.grad(3.0 * ref, (a, b))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    np.testing.assert_allclose(ga.numpy(), ra.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gb.numpy(), rb.numpy(), rtol=1e-8, atol=1e-12)
    # a detached target: the anchor's gradient alone; without gradients: the value alone
    (ga_only,) = torch.autograd.grad(full_nce(a, b.detach(), temp, chunk=chunk), (a,))
    np.testing.assert_allclose(ga_only.numpy(), (ra / 3.0).numpy(), rtol=1e-8, atol=1e-12)
    with torch.no_grad():
        assert float(full_nce(a, b, temp, chunk=chunk)) == pytest.approx(float(ref), rel=1e-10)


def test_noisy_contrast_matches_explicit_loop_with_fixed_noise():
    g = torch.Generator().manual_seed(3)
    items = torch.randn(19, 5, generator=g, dtype=torch.float64, requires_grad=True)
    levels = [0, 0, 1, 2]
    noises = [torch.randn(19, 5, generator=g, dtype=torch.float64) for _ in levels]
    ours = noisy_contrast(items, levels, 0.5, noises=noises, chunk=4)
    (grad,) = torch.autograd.grad(ours, (items,))

    ref = 0.0
    for level, noise in zip(levels, noises):  # Main.py:357-367 and 388-393: one detached noisy copy per level
        with torch.no_grad():
            noisy = items + noise * level
        ref = ref + dense_nce(items, noisy, 0.5)
    (ref_grad,) = torch.autograd.grad(ref, (items,))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-8, atol=1e-12)
    # ε is drawn fresh on every call when not given
    with torch.no_grad():
        assert float(noisy_contrast(items, [1], 0.5)) != float(noisy_contrast(items, [1], 0.5))


@pytest.mark.parametrize("n_mod", [2, 3])
def test_anchored_contrast_is_anchor_terms_plus_noisy_terms(n_mod):
    g = torch.Generator().manual_seed(n_mod)
    views = [(torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)) for _ in range(n_mod + 1)]
    ours = anchored_contrast(views, [0, 0], 0.5)  # levels 0: the noisy copies are the detached tables
    ref = 0.0
    for user_m, item_m in views[1:]:  # Main.py:374-406, cl_method 1
        ref = ref + dense_nce(views[0][0], user_m, 0.5) + dense_nce(views[0][1], item_m, 0.5)
        ref = ref + 2 * dense_nce(item_m, item_m.detach(), 0.5)
    params = [t for v in views for t in v]
    for got, want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-12)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)


def test_modal_bpr_sums_one_bpr_per_view_divided_by_batch():
    g = torch.Generator().manual_seed(0)
    views = [(torch.randn(6, 3, generator=g), torch.randn(5, 3, generator=g)) for _ in range(3)]
    users, pos, neg = torch.tensor([0, 2, 2, 5]), torch.tensor([1, 0, 4, 3]), torch.tensor([2, 3, 1, 0])
    ref = 0.0
    for user_vec, item_vec in views:
        U, I = user_vec.double().numpy(), item_vec.double().numpy()
        for u, p, n in zip(users.tolist(), pos.tolist(), neg.tolist()):
            ref += -np.log(1.0 / (1.0 + np.exp(-(U[u] @ I[p] - U[u] @ I[n])))) / 16
    assert float(modal_bpr(views, users, pos, neg, divisor=16)) == pytest.approx(ref, rel=1e-5)


# --- recommender views and the summed score (§1, §4) ---------------------------------------------

def l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def dense_norm(R: np.ndarray) -> torch.Tensor:
    """D^-½ (A + I) D^-½ of A = [[0, R], [Rᵀ, 0]] (MDMNS's guidance graph, Models/mdmns.py), dense."""
    U, I = R.shape
    A = np.zeros((U + I, U + I))
    A[:U, U:], A[U:, :U] = R != 0, (R != 0).T
    A += np.eye(U + I)
    d = A.sum(1)
    return torch.from_numpy(A / np.sqrt(np.outer(d, d)))


def reference_views(rec, adj, graphs, trans, gnn_layer, ris_lambda, ris_adj_lambda):
    """The authors' forward_MM (Model.py:87-200) and forward_cl_MM, dense float64, one modality at a time."""
    P = {name: p.detach().double() for name, p in rec.named_parameters()}
    Eu, Ei = P["user_emb"], P["item_emb"]
    U = len(Eu)
    w = torch.exp(P["modal_weight"]) / torch.exp(P["modal_weight"]).sum()

    def prop(X):
        layers = [X]
        for _ in range(gnn_layer):
            layers.append(adj @ layers[-1])
        return sum(layers)

    z, cl = [], []
    for m in rec.modalities:
        feats = getattr(rec, f"features_{m}").double()
        if trans == 1:
            f = feats @ P[f"transforms.{m}.linear.weight"].T + P[f"transforms.{m}.linear.bias"]
        else:
            f = F.leaky_relu(feats @ P[f"transforms.{m}.weight"], 0.2)
        e = adj @ torch.cat([Eu, l2(f)])
        e = e + adj @ torch.cat([e[:U], Ei])
        e = e + ris_adj_lambda * graphs[m] @ torch.cat([Eu, Ei])
        z.append(e)
        cl.append(prop(graphs[m] @ torch.cat([Eu, l2(f)])))
    H0 = sum(w[k] * z[k] for k in range(len(z)))
    G = adj @ torch.cat([Eu, l2(H0[U:])])
    G = G + adj @ torch.cat([G[:U], Ei])
    G = G + ris_adj_lambda * adj @ torch.cat([Eu, Ei])
    views = [prop(X) + ris_lambda * l2(X) for X in [G] + z]
    return [(v[:U], v[U:]) for v in views], [(v[:U], v[U:]) for v in cl]


@pytest.mark.parametrize("extra", [("--trans", "0", "--gnn_layer", "1"),
                                   ("--trans", "1", "--gnn_layer", "2", "--modalities", "image,text,audio")])
def test_views_and_summed_score_match_dense_reference(registered, tmp_path, extra):
    from conftest import hand_made, write_dataset

    data_dir = tmp_path / "data"
    write_dataset(data_dir / "tiny", *hand_made(modalities=("image", "text", "audio")))
    model = tiny_model(data_dir, tmp_path, "--ris_lambda", "0.3", "--ris_adj_lambda", "0.7", *extra)
    with torch.no_grad():
        model.recommender.modal_weight.copy_(torch.tensor([0.2, -0.4, 0.1])[: len(model.data.modalities)])
    model.graphs = model.rebuild_graphs()
    args, rec = model.args, model.recommender
    adj = dense_norm(model.data.train.toarray())
    graphs = {m: g["dropped"].to_dense().double() for m, g in model.graphs.items()}
    ref_views, ref_cl = reference_views(rec, adj, graphs, args.trans, args.gnn_layer, 0.3, 0.7)

    with torch.no_grad():
        views, cl_views = rec(model.adj, {m: g["dropped"] for m, g in model.graphs.items()}, with_views=True)
    assert len(views) == len(model.data.modalities) + 1 and len(cl_views) == len(model.data.modalities)
    for (u, i), (ru, ri) in zip(views + cl_views, ref_views + ref_cl):
        np.testing.assert_allclose(u.double().numpy(), ru.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(i.double().numpy(), ri.numpy(), rtol=1e-4, atol=1e-5)

    # the score sums the dot products of every view (Main.py:456-460)
    model.eval()
    users = torch.arange(model.data.n_users)
    with torch.no_grad():
        scores = model.scorer()(users).double().numpy()
    ref = sum(ru.numpy() @ ri.numpy().T for ru, ri in ref_views)
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4)


def test_cl_method_1_builds_no_contrastive_views(registered, tiny_dir, tmp_path, monkeypatch):
    from Models.mdmns import MDMNSRecommender

    calls = []
    forward = MDMNSRecommender.forward

    def spy(self, *a, **k):
        calls.append(k.get("with_views"))
        return forward(self, *a, **k)

    monkeypatch.setattr(MDMNSRecommender, "forward", spy)
    for cl_method, expected in (("1", False), ("0", True)):
        calls.clear()
        model = tiny_model(tiny_dir, tmp_path, "--cl_method", cl_method)
        losses = model.train_epoch(0, Main.PhaseTimer(CPU))
        assert calls and set(calls) == {expected} and losses["loss"]["cl"] > 0


# --- guided diffusion (§3) ------------------------------------------------------------------------

@pytest.mark.parametrize("degree", ["clamp", "abs", "one"])
def test_guidance_graph_block_form_matches_dense_adjacency(degree):
    g = torch.Generator().manual_seed(5)
    B, I, h = 4, 6, 3
    x_t = torch.randn(B, I, generator=g, dtype=torch.float64)
    x_t[1] = -0.5                                                                   # user row: degree < 0
    x_t[2] = torch.tensor([-1.25, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x_t[:, 4] = torch.tensor([-2.0, 0.25, 0.25, -0.5], dtype=torch.float64)         # item column: degree < 0
    assert float(1 + x_t[2].sum()) == 0.0                                           # user row: degree exactly 0
    X = torch.randn(B + I, h, generator=g, dtype=torch.float64)

    A = torch.zeros(B + I, B + I, dtype=torch.float64)  # the authors' dense (B+I)² form, Model.py:509-529
    A[:B, B:], A[B:, :B] = x_t, x_t.T
    A = A + torch.eye(B + I, dtype=torch.float64)
    deg = A.sum(1)
    assert (deg < 0).any() and (deg == 0).any()
    deg = {"clamp": torch.clamp(deg, min=1e-8), "abs": torch.clamp(deg.abs(), min=1e-8),
           "one": torch.clamp(deg, min=1.0)}[degree]
    D = torch.diag(deg ** -0.5)
    ref = D @ A @ D @ X
    np.testing.assert_allclose(guidance_propagate(x_t, X, degree).numpy(), ref.numpy(), rtol=1e-10, atol=1e-10)


def test_guidance_gcn_scores_match_dense_reference():
    g = torch.Generator().manual_seed(2)
    B, I, d, h, n_users = 3, 5, 4, 6, 9
    module = GuidanceGCN(n_users, d, h, "clamp").double()
    x_t, guide = torch.rand(B, I, generator=g, dtype=torch.float64), torch.randn(I, d, generator=g, dtype=torch.float64)
    users = torch.tensor([7, 0, 4])
    E = module.user_emb.weight.detach()[users]
    X = torch.cat([E, guide @ module.feature_transform.weight.detach().T + module.feature_transform.bias.detach()])
    A = torch.zeros(B + I, B + I, dtype=torch.float64)
    A[:B, B:], A[B:, :B] = x_t, x_t.T
    A = A + torch.eye(B + I, dtype=torch.float64)
    D = torch.diag(A.sum(1).clamp(min=1e-8) ** -0.5)
    Y = (D @ A @ D @ X) @ module.gcn.weight.detach().T + module.gcn.bias.detach()
    with torch.no_grad():
        S = module(x_t, guide, users)
    np.testing.assert_allclose(S.numpy(), (Y[:B] @ Y[B:].T).numpy(), rtol=1e-10, atol=1e-10)


def test_guide_is_the_mean_of_the_other_modalities():
    g = torch.Generator().manual_seed(0)
    f = {m: torch.randn(4, 3, generator=g) for m in ("image", "text", "audio")}
    guides = guide_features(f)  # Main.py:161-163: 0.5 each with three modalities
    torch.testing.assert_close(guides["image"], 0.5 * f["text"] + 0.5 * f["audio"])
    torch.testing.assert_close(guides["text"], 0.5 * f["image"] + 0.5 * f["audio"])
    torch.testing.assert_close(guides["audio"], 0.5 * f["image"] + 0.5 * f["text"])
    two = guide_features({"image": f["image"], "text": f["text"]})  # Main.py:166-167: the other one
    torch.testing.assert_close(two["image"], f["text"])
    torch.testing.assert_close(two["text"], f["image"])
    assert guide_features({"image": f["image"]}) == {}


def test_guided_losses_feed_the_guided_scores_and_restore_the_mse(registered, tiny_dir, tmp_path):
    model = tiny_model(tiny_dir, tmp_path, "--steps", "4")
    diffusion = model.diffusion
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(5, 16, generator=g) < 0.3).float()
    item_emb, feat = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    seen = {}

    def guidance(x_t):
        seen["x_t"], seen["S"] = x_t, 2.0 * x_t + 1.0
        return seen["S"]

    def denoiser(x, t):
        seen["input"], seen["t"] = x, t
        return 0.5 * x

    elbo, msi, weight = guided_losses(diffusion, denoiser, x0, item_emb, feat, guidance)
    assert seen["input"] is seen["S"]
    # DiffMM's diffusion schedule written out: ᾱ, SNR, w_t = SNR(t-1) - SNR(t), w_0 = 1
    variance = np.linspace(0.1 * 1e-4, 0.1 * 0.02, 4)
    betas = [1e-4] + [min(1 - (1 - variance[k]) / (1 - variance[k - 1]), 0.999) for k in range(1, 4)]
    alpha_bar = np.cumprod(1 - np.array(betas))
    snr = alpha_bar / (1 - alpha_bar)
    t = seen["t"].numpy()
    w = np.where(t == 0, 1.0, snr[np.maximum(t - 1, 0)] - snr[t])
    x0_hat = 0.5 * seen["S"]
    np.testing.assert_allclose(weight.numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(elbo.numpy(), w * ((x0 - x0_hat) ** 2).mean(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(msi.numpy(), ((x0_hat @ feat - x0 @ item_emb) ** 2).mean(1).numpy(), rtol=1e-5)


def test_fresh_guidance_per_call_by_default_and_a_trained_one_as_the_fix(registered, tiny_dir, tmp_path):
    model = tiny_model(tiny_dir, tmp_path)
    x_t, guide, users = torch.rand(4, 16), torch.randn(16, 8), torch.arange(4)
    first, second = model.guided_input("image", x_t, guide, users), model.guided_input("image", x_t, guide, users)
    assert not torch.allclose(first, second) and not first.requires_grad and len(list(model.guides.parameters())) == 0

    model = tiny_model(tiny_dir, tmp_path, "--guide_fresh_per_call", "false")
    torch.testing.assert_close(model.guided_input("text", x_t, guide, users),
                               model.guided_input("text", x_t, guide, users))
    before = {k: v.clone() for k, v in model.guides.state_dict().items()}
    losses = model.train_generators()
    assert set(losses) == {"image", "text", "image_extra", "text_extra"}
    changed = [k for k, v in model.guides.state_dict().items() if not torch.equal(v, before[k])]
    assert {k.split(".")[0] for k in changed} == {"image", "text"}


@pytest.mark.parametrize("fresh", ["true", "false"])
def test_guide_at_sampling_feeds_the_guided_scores_to_the_reverse_steps(registered, tiny_dir, tmp_path, fresh):
    for at_sampling in ("false", "true"):
        model = tiny_model(tiny_dir, tmp_path, "--guide_at_sampling", at_sampling, "--guide_fresh_per_call", fresh)
        calls = []
        guided_input = model.guided_input
        model.guided_input = (lambda m, x_t, guide, users, calls=calls, guided_input=guided_input:
                              calls.append(m) or guided_input(m, x_t, guide, users))
        model.rebuild_graphs()
        # one call per reverse step, batch and modality with the flag, none without (the authors' sampling)
        assert len(calls) == (2 * model.args.steps if at_sampling == "true" else 0)


def test_guidance_is_off_with_one_modality(registered, tiny_dir, tmp_path):
    model = tiny_model(tiny_dir, tmp_path, "--modalities", "image", "--guide_at_sampling", "true")
    assert not model.guided and set(model.train_generators()) == {"image"}


@pytest.mark.slow
def test_clamped_guidance_saturates_the_denoisers_input_layer_on_tiktok_rows(registered, tmp_path):
    """The authors' `--guide_degree clamp` on real TikTok rows (1024 users x 6,710 items, the mdmns-tiktok preset):
    ~11-15% of the noisy rows have a negative degree, their scale 1e4 reaches every item node, so S is >= 1e6 on
    those rows and every pre-activation of the denoiser's tanh input layer saturates: that layer (and the step
    embedding) gets an exactly zero gradient while the output layer's is not. abs and one give it a gradient.
    The same draws (rows, t, noise, guidance module, dropout) for the three settings."""
    require_shared("tiktok")
    args = parse_args(["--preset", "mdmns-tiktok", "--data_dir", str(SHARED), "--quiet",
                       "--out_dir", str(tmp_path / "run")])
    model = inference.build_model(args, inference.load_run_data(args, True), CPU)
    model.generators.train()
    with torch.no_grad():
        feats = model.recommender.modal_features()
    guides = guide_features(feats)
    item_emb = model.recommender.item_emb.detach()
    g = torch.Generator().manual_seed(0)
    users = torch.randperm(model.data.n_users, generator=g)[:args.batch]
    x0 = model.user_rows.dense(users)
    t = torch.randint(0, args.steps, (len(users),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    input_grads = {}
    for degree in ("clamp", "abs", "one"):
        model.args.guide_degree = degree
        for m, denoiser in model.generators.items():
            seen = {}

            def guidance(x_t, m=m, seen=seen):
                torch.manual_seed(1)                              # the same fresh guidance module every setting
                seen["x_t"], seen["S"] = x_t, model.guided_input(m, x_t, guides[m], users)
                return seen["S"]

            denoiser.zero_grad(set_to_none=True)
            elbo, msi, _ = guided_losses(model.diffusion, denoiser, x0, item_emb, feats[m], guidance, t, noise)
            (elbo.mean() + args.e_loss * msi.mean()).backward()
            negative = (1.0 + seen["x_t"].sum(1)) < 0                # the noisy user degrees, counted here
            input_grads[degree, m] = torch.count_nonzero(denoiser.in_layers[0].weight.grad)
            row_max = seen["S"].abs().amax(1)
            saturated = (F.linear(seen["S"], denoiser.input_weight()).abs() >= 9).float().mean()
            print(f"{degree} {m}: negative rows {int(negative.sum())}/{len(negative)}, item columns "
                  f"{int(((1.0 + seen['x_t'].sum(0)) < 0).sum())}; max|S| per row {float(row_max[negative].min()):.1e}"
                  f"..{float(row_max[negative].max()):.1e} (negative rows), median "
                  f"{float(row_max[~negative].median()):.1e} (others); |W_x S| >= 9: {float(saturated):.1%}; "
                  f"input-layer gradient entries != 0: "
                  f"{int(input_grads[degree, m])}, output layer: "
                  f"{int(torch.count_nonzero(denoiser.out_layers[-1].weight.grad))}")   # docs/siblings.md (-s)
            assert torch.count_nonzero(denoiser.out_layers[-1].weight.grad) > 0
            if degree == "clamp":
                assert 0.05 < float(negative.float().mean()) < 0.30, float(negative.float().mean())
                assert float(seen["S"][negative].abs().amax(1).min()) > 1e6
                assert input_grads[degree, m] == 0                    # the tanh layer is saturated everywhere
                assert torch.count_nonzero(denoiser.emb_layer.weight.grad) == 0
            else:
                assert input_grads[degree, m] > 0


# --- harness ------------------------------------------------------------------------------------

def test_trains_beats_popularity_and_reloads_to_identical_scores(registered, tmp_path):
    from Utils.synthetic import write_synthetic

    write_synthetic(tmp_path / "data" / "synthetic")
    out = tmp_path / "run"
    argv = ["--data_dir", str(tmp_path / "data"), "--model", "mdmns", "--quiet", "--out_dir", str(out), "--epoch", "3",
            "--dims", "[64]", "--latdim", "16", "--cl_method", "1", "--modalities", "image,text"]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (ours, popularity)
    # the checkpoint (recommender + the epoch's evaluation graphs) scores exactly as at the best validation epoch
    args, data, model = inference.load_trained(out)
    with torch.no_grad():
        reloaded = evaluate(model.scorer(), data.train, data.test, [20], 256, CPU)
    assert reloaded == pytest.approx(summary["protocols"]["validation"]["test"], rel=1e-6)


def test_check_gives_one_sentence_for_impossible_configurations(registered, tiny_dir, tmp_path):
    args = parse_args(tiny_args(tiny_dir, tmp_path, "--model", "mdmns"))
    data = inference.load_run_data(args, True)
    assert MDMNS.check(args, data) is None
    for flag, value in (("guide_fused_hidden_dim", 0), ("keepRate", 0.0), ("temp", 0.0), ("sampling_steps", 9),
                        ("rebuild_k", 99)):
        sentence = MDMNS.check(argparse.Namespace(**{**vars(args), flag: value}), data)
        assert sentence and sentence.endswith(".") and sentence.count(". ") == 0, (flag, sentence)
        if flag != "rebuild_k":   # needs no data: the command line is refused when parsed (check_flags)
            with pytest.raises(SystemExit):
                parse_args(tiny_args(tiny_dir, tmp_path, "--model", "mdmns", f"--{flag}", str(value)))
