"""DiffMM diffusion (paper Eq. 2-14): noise schedule, DDPM posterior, q_sample, ELBO weights, training loss, sampling, denoiser.

Every reference is written here from the closed forms (explicit loops, float64 numpy)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from Models.diffusion import Denoiser, GaussianDiffusion, noise_schedule, step_embedding

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# closed-form references
# ------------------------------------------------------------------------------------------------

def ref_schedule(s, gmin, gmax, T):
    """betas by the authors' recipe (docs/defaults.md: diffusion schedule), element by element."""
    if T == 1:
        variance = [s * gmin]
    else:
        variance = [s * gmin + (s * gmax - s * gmin) * t / (T - 1) for t in range(T)]
    abar = [1.0 - v for v in variance]
    betas = [1.0 - abar[0]]
    for t in range(1, T):
        betas.append(min(1.0 - abar[t] / abar[t - 1], 0.999))
    betas[0] = 1e-4
    return np.array(variance), np.array(betas)


def ref_tables(betas):
    T = len(betas)
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    coef1 = [betas[t] * math.sqrt(abar_prev[t]) / (1 - abar[t]) for t in range(T)]
    coef2 = [(1 - abar_prev[t]) * math.sqrt(1 - betas[t]) / (1 - abar[t]) for t in range(T)]
    var = [betas[t] * (1 - abar_prev[t]) / (1 - abar[t]) for t in range(T)]
    snr = [a / (1 - a) for a in abar]
    weight = [1.0] + [snr[t - 1] - snr[t] for t in range(1, T)]
    return dict(abar=np.array(abar), abar_prev=np.array(abar_prev), coef1=np.array(coef1),
                coef2=np.array(coef2), var=np.array(var), weight=np.array(weight))


SCHEDULES = [(0.1, 1e-4, 0.02, 5), (1.0, 1e-3, 0.05, 20), (0.5, 0.01, 0.2, 2), (0.1, 1e-4, 0.02, 1)]


@pytest.mark.parametrize("s,gmin,gmax,T", SCHEDULES)
def test_noise_schedule_closed_form(s, gmin, gmax, T):
    variance, betas = ref_schedule(s, gmin, gmax, T)
    # the variance really is a linspace between s*gmin and s*gmax
    assert variance[0] == pytest.approx(s * gmin)
    if T > 1:
        assert variance[-1] == pytest.approx(s * gmax)
    got = noise_schedule(s, gmin, gmax, T)
    assert got.dtype == np.float64 and got.shape == (T,)
    np.testing.assert_allclose(got, betas, rtol=1e-12, atol=1e-15)
    assert got[0] == 1e-4  # β_0 is overwritten


def test_noise_schedule_default_values():
    # authors' defaults: variance = 0.1 * linspace(1e-4, 0.02, 5) = [1e-5, 5.075e-4, 1.005e-3, 1.5025e-3, 2e-3]
    got = noise_schedule(0.1, 1e-4, 0.02, 5)
    variance = [1e-5, 5.075e-4, 1.005e-3, 1.5025e-3, 2e-3]
    expected = [1e-4] + [1 - (1 - variance[t]) / (1 - variance[t - 1]) for t in range(1, 5)]
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_noise_schedule_caps_beta_at_0999():
    # variance = [0.5, 0.74995, 0.9999], ᾱ = [0.5, 0.25005, 1e-4]: 1 - 1e-4/0.25005 = 0.9996 is capped
    got = noise_schedule(1.0, 0.5, 0.9999, 3)
    np.testing.assert_allclose(got, [1e-4, 1 - 0.25005 / 0.5, 0.999], rtol=1e-10)


@pytest.mark.parametrize("s,gmin,gmax,T", SCHEDULES[:3])
def test_diffusion_tables_match_ddpm_closed_forms(s, gmin, gmax, T):
    _, betas = ref_schedule(s, gmin, gmax, T)
    ref = ref_tables(betas)
    diff = GaussianDiffusion(s, gmin, gmax, T, CPU)
    np.testing.assert_allclose(diff.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(diff.alphas_cumprod.numpy(), ref["abar"], rtol=1e-12)  # cumprod(1 - β)
    np.testing.assert_allclose(diff.alphas_cumprod_prev.numpy(), ref["abar_prev"], rtol=1e-12)
    np.testing.assert_allclose(diff.posterior_mean_coef1.numpy(), ref["coef1"], rtol=1e-10)
    np.testing.assert_allclose(diff.posterior_mean_coef2.numpy(), ref["coef2"], rtol=1e-10)
    np.testing.assert_allclose(diff.posterior_variance.numpy(), ref["var"], rtol=1e-10, atol=1e-300)
    # ELBO weights (Eq. 11): SNR(t-1) - SNR(t), w_0 = 1
    t = torch.arange(T)
    np.testing.assert_allclose(diff.elbo_weight(t).numpy(), ref["weight"], rtol=1e-10)
    assert diff.elbo_weight(torch.tensor([0])).item() == 1.0


def test_alpha_bar_is_cumprod_of_overwritten_betas_not_one_minus_variance():
    # ᾱ_0 must be 1 - 1e-4 (recomputed after the override), not 1 - s*γmin = 1 - 1e-5
    diff = GaussianDiffusion(0.1, 1e-4, 0.02, 5, CPU)
    assert diff.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)


def test_posterior_mean_and_q_sample_formulas():
    torch.manual_seed(0)
    T = 6
    diff = GaussianDiffusion(1.0, 1e-3, 0.05, T, CPU)
    ref = ref_tables(ref_schedule(1.0, 1e-3, 0.05, T)[1])
    x0 = torch.rand(T, 11)
    noise = torch.randn(T, 11)
    x0_hat = torch.rand(T, 11)
    t = torch.arange(T).flip(0)  # a different step per row
    got_q = diff.q_sample(x0, t, noise).numpy()
    got_mean = diff.posterior_mean(x0_hat, x0, t).numpy()
    for row in range(T):
        step = int(t[row])
        expected = (math.sqrt(ref["abar"][step]) * x0[row].double().numpy()
                    + math.sqrt(1 - ref["abar"][step]) * noise[row].double().numpy())
        np.testing.assert_allclose(got_q[row], expected, rtol=1e-5, atol=1e-6)
        expected = ref["coef1"][step] * x0_hat[row].double().numpy() + ref["coef2"][step] * x0[row].double().numpy()
        np.testing.assert_allclose(got_mean[row], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# denoiser
# ------------------------------------------------------------------------------------------------

def ref_step_embedding(t: int, size: int) -> np.ndarray:
    half = size // 2
    out = np.zeros(size)
    for k in range(half):
        freq = math.exp(-math.log(10000) * k / half)
        out[k] = math.cos(t * freq)
        out[half + k] = math.sin(t * freq)
    return out  # an odd size leaves the last entry 0 (authors' zero padding)


@pytest.mark.parametrize("size", [10, 8, 7])
def test_step_embedding_cos_then_sin(size):
    steps = torch.tensor([0, 1, 3, 17])
    got = step_embedding(steps, size).numpy()
    assert got.shape == (4, size)
    for row, t in enumerate(steps.tolist()):
        np.testing.assert_allclose(got[row], ref_step_embedding(t, size), atol=1e-5)


def linear_np(layer, h):
    return h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()


def ref_denoiser(den: Denoiser, x: np.ndarray, steps, norm: bool) -> np.ndarray:
    """Eq. 13 by hand: h = [x ; Linear(emb(t))], tanh after every input Linear, tanh between output ones."""
    emb = np.stack([ref_step_embedding(int(t), den.emb_size) for t in steps])
    emb = linear_np(den.emb_layer, emb)
    if norm:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    h = np.concatenate([x, emb], axis=1)
    for layer in den.in_layers:
        h = np.tanh(linear_np(layer, h))
    for i, layer in enumerate(den.out_layers):
        h = linear_np(layer, h)
        if i < len(den.out_layers) - 1:
            h = np.tanh(h)
    return h


@pytest.mark.parametrize("dims,in_shapes,out_shapes", [
    ([1000], [(50 + 10, 1000)], [(1000, 50)]),
    ([200, 100], [(50 + 10, 100), (100, 200)], [(200, 100), (100, 50)]),
])
def test_denoiser_layer_shapes(dims, in_shapes, out_shapes):
    den = Denoiser(50, dims, 10, norm=False)
    assert [(l.in_features, l.out_features) for l in den.in_layers] == in_shapes
    assert [(l.in_features, l.out_features) for l in den.out_layers] == out_shapes
    assert (den.emb_layer.in_features, den.emb_layer.out_features) == (10, 10)


def test_denoiser_init_scales():
    torch.manual_seed(0)
    den = Denoiser(300, [1000], 10, norm=False)
    layer = den.in_layers[0]  # 310 -> 1000
    std = math.sqrt(2.0 / (310 + 1000))
    assert layer.weight.std().item() == pytest.approx(std, rel=0.03)
    assert abs(layer.weight.mean().item()) < 0.05 * std
    assert layer.bias.std().item() == pytest.approx(0.001, rel=0.15)


@pytest.mark.parametrize("dims", [[32], [24, 12]])
@pytest.mark.parametrize("norm", [False, True])
def test_denoiser_forward_matches_hand_mlp(dims, norm):
    torch.manual_seed(1)
    den = Denoiser(20, dims, 10, norm=norm)
    x = (torch.rand(5, 20) < 0.3).float() + 0.1 * torch.rand(5, 20)
    steps = torch.tensor([0, 1, 2, 3, 4])
    expected = ref_denoiser(den, x.double().numpy(), steps, norm)
    den.eval()  # eval: message dropout is a no-op even with mess_dropout=True
    np.testing.assert_allclose(den(x, steps).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    den.train()
    np.testing.assert_allclose(den(x, steps, mess_dropout=False).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_items", [20, 64, 130])
def test_denoiser_gradients_match_plain_layers(n_items):
    """The first layer split in two products gives the values and gradients of one nn.Linear on [x ; emb]."""
    torch.manual_seed(2)
    den = Denoiser(n_items, [16], 6, norm=False)
    x = torch.rand(7, n_items)
    steps = torch.randint(0, 5, (7,))
    target = torch.rand(7, n_items)
    ((den(x, steps, mess_dropout=False) - target) ** 2).sum().backward()
    got = {n: p.grad.clone() for n, p in den.named_parameters()}
    den.zero_grad()
    emb = den.emb_layer(step_embedding(steps, 6))
    plain = den.out_layers[0](torch.tanh(den.in_layers[0](torch.cat([x, emb], dim=1))))
    ((plain - target) ** 2).sum().backward()
    for name, p in den.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-5)


def test_denoiser_dropout_only_in_training_and_only_on_x():
    torch.manual_seed(2)
    den = Denoiser(30, [16], 10, norm=False)
    x = torch.rand(8, 30) + 0.5
    steps = torch.zeros(8, dtype=torch.long)
    reference = ref_denoiser(den, x.double().numpy(), steps, False)
    den.train()
    a = den(x, steps).detach().numpy()
    b = den(x, steps).detach().numpy()
    assert not np.allclose(a, b)            # training: random message dropout
    assert not np.allclose(a, reference, atol=1e-3)
    # dropout p = 0.5 with 1/(1-p) rescaling on x only: with 6 items, find for every training-mode output
    # the one mask in {0, 2}^6 that reproduces it by hand
    small = Denoiser(6, [16], 10, norm=False).train()
    rows = 300
    xs = torch.rand(rows, 6) + 0.5
    ts = torch.randint(0, 5, (rows,))
    got = small(xs, ts).detach().double().numpy()
    masks = np.array([[2.0 * ((code >> j) & 1) for j in range(6)] for code in range(64)])
    candidates = ref_denoiser(small, (xs.double().numpy()[:, None, :] * masks[None]).reshape(-1, 6),
                              np.repeat(ts.numpy(), 64), False).reshape(rows, 64, 6)
    err = np.abs(candidates - got[:, None, :]).max(axis=2)
    best = err.argmin(axis=1)
    assert (err[np.arange(rows), best] < 1e-5).all()               # every output is x ⊙ mask through the MLP
    assert 0.45 < (masks[best] == 0).mean() < 0.55                  # p = 0.5
    # x = 0: dropout of zeros is zeros, so a training-mode output is deterministic (no dropout elsewhere)
    zeros = torch.zeros(3, 30)
    s3 = torch.tensor([0, 2, 4])
    np.testing.assert_allclose(den(zeros, s3).detach().numpy(), ref_denoiser(den, zeros.double().numpy(), s3, False),
                               rtol=1e-5, atol=1e-5)
    den.eval()
    np.testing.assert_allclose(den(x, steps).detach().numpy(), reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# training loss (Eq. 11-14)
# ------------------------------------------------------------------------------------------------

def _loss_inputs(n_items=25, n_rows=16, d=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(n_rows, n_items, generator=g) < 0.25).float()
    item_emb = torch.randn(n_items, d, generator=g)
    modal_feat = torch.randn(n_items, d, generator=g)
    return x0, item_emb, modal_feat


@pytest.mark.parametrize("train_mode", [False, True])
def test_training_losses_by_hand(train_mode):
    T = 5
    diff = GaussianDiffusion(1.0, 1e-3, 0.05, T, CPU)   # large noise so x_t really differs from x0
    ref = ref_tables(ref_schedule(1.0, 1e-3, 0.05, T)[1])
    torch.manual_seed(10)
    den = Denoiser(25, [16], 10, norm=False)
    den.train(train_mode)
    x0, item_emb, modal_feat = _loss_inputs()

    torch.manual_seed(123)
    elbo, msi = diff.training_losses(den, x0, item_emb, modal_feat)

    # the same draws, in the natural order: t, then ε, then the denoiser's own dropout
    torch.manual_seed(123)
    t = torch.randint(0, T, (x0.shape[0],))
    eps = torch.randn_like(x0)
    x_t = torch.empty_like(x0)
    for r in range(x0.shape[0]):
        step = int(t[r])
        x_t[r] = math.sqrt(ref["abar"][step]) * x0[r] + math.sqrt(1 - ref["abar"][step]) * eps[r]
    x0_hat = den(x_t, t).detach().double().numpy()

    X0, E, Fm = x0.double().numpy(), item_emb.double().numpy(), modal_feat.double().numpy()
    exp_elbo = np.array([ref["weight"][int(t[r])] * np.mean((X0[r] - x0_hat[r]) ** 2) for r in range(len(X0))])
    exp_msi = np.array([np.mean((x0_hat[r] @ Fm - X0[r] @ E) ** 2) for r in range(len(X0))])
    assert elbo.shape == msi.shape == (x0.shape[0],)
    np.testing.assert_allclose(elbo.detach().numpy(), exp_elbo, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(msi.detach().numpy(), exp_msi, rtol=1e-4, atol=1e-6)


def test_training_losses_draw_every_step_and_use_noisy_input():
    """Independent of RNG order: record what the denoiser receives."""
    T = 4
    diff = GaussianDiffusion(1.0, 1e-3, 0.05, T, CPU)
    den = Denoiser(25, [8], 10, norm=False).eval()
    seen = []
    den.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].clone(), inp[1].clone())))
    x0, item_emb, modal_feat = _loss_inputs(n_rows=400)
    torch.manual_seed(0)
    diff.training_losses(den, x0, item_emb, modal_feat)
    x_t, t = seen[0]
    assert sorted(set(t.tolist())) == list(range(T))            # t ~ Uniform{0..T-1}
    counts = np.bincount(t.numpy(), minlength=T)
    assert counts.min() > 400 / T * 0.6
    assert not torch.allclose(x_t, x0)                            # noised
    abar = ref_tables(ref_schedule(1.0, 1e-3, 0.05, T)[1])["abar"]
    # the implied ε has unit variance
    eps = (x_t.double() - torch.tensor(np.sqrt(abar))[t][:, None] * x0) / torch.tensor(np.sqrt(1 - abar))[t][:, None]
    assert eps.std().item() == pytest.approx(1.0, rel=0.05)


def test_training_losses_backpropagate_only_into_denoiser():
    diff = GaussianDiffusion(0.1, 1e-4, 0.02, 5, CPU)
    den = Denoiser(25, [8], 10, norm=False)
    x0, item_emb, modal_feat = _loss_inputs()
    item_emb.requires_grad_(False)
    elbo, msi = diff.training_losses(den, x0, item_emb, modal_feat)
    (elbo.mean() + 0.1 * msi.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in den.parameters())


def test_noise_scale_zero_does_not_crash_and_skips_noising():
    diff = GaussianDiffusion(0.0, 1e-4, 0.02, 5, CPU)
    assert np.isfinite(diff.posterior_mean_coef1.numpy()).all()
    assert np.isfinite(diff.posterior_mean_coef2.numpy()).all()
    den = Denoiser(25, [8], 10, norm=False).eval()
    seen = []
    den.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    x0, item_emb, modal_feat = _loss_inputs()
    elbo, msi = diff.training_losses(den, x0, item_emb, modal_feat)
    assert torch.equal(seen[0], x0)                               # no noising at all
    assert torch.isfinite(elbo).all() and torch.isfinite(msi).all()
    out = diff.p_sample(den, x0, 0, False)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

def _sampling_setup(T=5, s=0.1):
    torch.manual_seed(4)
    diff = GaussianDiffusion(s, 1e-4, 0.02, T, CPU)
    ref = ref_tables(ref_schedule(s, 1e-4, 0.02, T)[1])
    den = Denoiser(18, [16], 10, norm=False)
    x0 = (torch.rand(7, 18) < 0.3).float()
    return diff, ref, den, x0


def _ref_reverse(den, ref, x, T, noise_fn=None):
    for step in reversed(range(T)):
        t = torch.full((x.shape[0],), step, dtype=torch.long)
        x0_hat = torch.from_numpy(ref_denoiser(den, x.double().numpy(), t, False))
        x = ref["coef1"][step] * x0_hat + ref["coef2"][step] * x.double()
        if noise_fn is not None and step > 0:
            x = x + noise_fn(step, x)
    return x


@pytest.mark.parametrize("train_mode", [True, False])
def test_p_sample_no_steps_no_noise_is_posterior_mean_loop(train_mode):
    diff, ref, den, x0 = _sampling_setup()
    den.train(train_mode)  # no dropout during sampling, whatever the module mode
    expected = _ref_reverse(den, ref, x0.double(), 5)
    got = diff.p_sample(den, x0, 0, False)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert torch.equal(got, diff.p_sample(den, x0, 0, False))  # deterministic


def test_p_sample_with_sampling_steps_starts_from_q_sample():
    diff, ref, den, x0 = _sampling_setup(s=1.0)
    torch.manual_seed(9)
    got = diff.p_sample(den, x0, 3, False)
    torch.manual_seed(9)
    eps = torch.randn_like(x0).double()
    start = math.sqrt(ref["abar"][2]) * x0.double() + math.sqrt(1 - ref["abar"][2]) * eps  # x_{T'} = q(x0, T'-1)
    expected = _ref_reverse(den, ref, start, 5)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_p_sample_with_sampling_noise_adds_posterior_noise_for_t_above_0():
    diff, ref, den, x0 = _sampling_setup(s=1.0)
    torch.manual_seed(11)
    got = diff.p_sample(den, x0, 0, True)
    var = ref["var"].copy()
    log_var = np.log(np.concatenate([[var[1]], var[1:]]))  # authors' clipped log-variance
    torch.manual_seed(11)
    expected = _ref_reverse(den, ref, x0.double(), 5,
                            noise_fn=lambda step, x: math.exp(0.5 * log_var[step]) * torch.randn(x.shape).double())
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, diff.p_sample(den, x0, 0, False))


# ------------------------------------------------------------------------------------------------
# the reverse process in the denoiser's hidden space (GaussianDiffusion.p_sample_hidden)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,steps,noise,sampling_steps", [
    ([64], 5, (0.1, 1e-4, 0.02), 0),
    ([48, 24], 7, (0.5, 1e-3, 0.05), 0),
    ([32, 16, 8], 3, (1.0, 1e-2, 0.2), 0),
    ([40], 6, (0.1, 1e-4, 0.02), 3),
])
def test_hidden_space_reverse_process_gives_the_direct_rows_and_top_k(dims, steps, noise, sampling_steps):
    from Utils.layers import to_torch_csr
    import scipy.sparse as sp

    torch.manual_seed(len(dims) * 10 + steps)
    n_items, k = 90, 5
    den = Denoiser(n_items, dims, 6, norm=False).eval()
    for p in den.parameters():                    # a trained-looking denoiser, not the near-zero init
        p.data.normal_(0.0, 0.3)
    diff = GaussianDiffusion(*noise, steps, torch.device("cpu"))
    rows = sp.random(17, n_items, density=0.08, format="csr", random_state=steps)
    rows.data[:] = 1.0
    x0 = torch.from_numpy(rows.toarray().astype(np.float32))
    torch.manual_seed(1)
    direct = diff.p_sample(den, x0, sampling_steps, sampling_noise=False)
    torch.manual_seed(1)                          # the same forward noise when sampling_steps > 0
    hidden = diff.p_sample_hidden(den, x0, sampling_steps, to_torch_csr(rows, torch.device("cpu")))
    tolerance = 1e-5 * direct.abs().max().item()                              # float32 rounding of the rows
    torch.testing.assert_close(hidden, direct, rtol=0, atol=tolerance)
    torch.manual_seed(1)
    dense_start = diff.p_sample_hidden(den, x0, sampling_steps)               # without the sparse rows
    torch.testing.assert_close(dense_start, direct, rtol=0, atol=tolerance)
    ordered = torch.sort(direct, dim=1, descending=True).values
    assert (ordered[:, k - 1] - ordered[:, k]).min() > 1e-4                   # no near-tie at the cut
    assert torch.equal(torch.topk(hidden, k).indices.sort().values, torch.topk(direct, k).indices.sort().values)


def test_the_hidden_reverse_process_is_used_only_where_exact(tiny_dir):
    import inference
    from DataHandler import load_data
    from Params import parse_args

    data = load_data("tiny", tiny_dir)
    for extra, expected in (((), True), (("--norm", "true"), False), (("--sampling_noise", "true"), False),
                            (("--reverse", "direct"), False)):
        args = parse_args(["--data", "tiny", "--data_dir", str(tiny_dir), "--dims", "[16]", *extra])
        assert inference.build_model(args, data, torch.device("cpu")).hidden_reverse is expected, extra


# ------------------------------------------------------------------------------------------------
# what the three diffusion models share (Models/diffusion.py): the denoiser's input as a parameter, the reverse
# scorer, the one chooser of the reverse chain, the flags and their checks
# ------------------------------------------------------------------------------------------------

def test_p_sample_feeds_the_denoiser_the_given_input_at_every_step():
    diff, ref, den, x0 = _sampling_setup()
    den.eval()
    fed = []

    def double(x):
        fed.append(x)
        return 2.0 * x

    got = diff.p_sample(den, x0, 0, False, denoiser_input=double)
    expected = diff.p_sample(lambda x, t, mess_dropout=True: den(2.0 * x, t, mess_dropout), x0, 0, False)
    assert len(fed) == diff.steps and torch.equal(fed[0], x0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_reverse_scorer_runs_the_chosen_chain_on_the_users_rows():
    from contextlib import nullcontext

    import scipy.sparse as sp

    from Utils.batches import DeviceRows
    from Models.diffusion import reverse_scorer

    torch.manual_seed(3)
    den = Denoiser(40, [12], 6, norm=False).eval()
    diff = GaussianDiffusion(0.1, 1e-4, 0.02, 4, CPU)
    matrix = sp.random(9, 40, density=0.1, format="csr", random_state=2)
    matrix.data[:] = 1.0
    rows, users = DeviceRows(matrix, CPU), torch.tensor([4, 0, 7])
    x0 = torch.from_numpy(matrix[users.numpy()].toarray().astype(np.float32))
    direct = reverse_scorer(diff, den, rows, 0, False, False, nullcontext)(users)
    torch.testing.assert_close(direct, diff.p_sample(den, x0, 0, False), rtol=0, atol=0)
    hidden = reverse_scorer(diff, den, rows, 0, False, True, nullcontext)(users, users.numpy())
    torch.testing.assert_close(hidden, direct, rtol=0, atol=1e-5 * direct.abs().max().item())
    seen = []
    fed = reverse_scorer(diff, den, rows, 0, False, False, nullcontext,
                         lambda x_t, batch: seen.append(batch) or x_t)(users)
    torch.testing.assert_close(fed, direct, rtol=0, atol=0)
    assert all(b is users for b in seen) and len(seen) == diff.steps
    with pytest.raises(ValueError):
        reverse_scorer(diff, den, rows, 0, False, True, nullcontext, lambda x_t, batch: x_t)


def test_one_chooser_and_one_check_for_the_reverse_chain_of_every_model():
    import argparse

    from Models.diffusion import add_diffusion_args, check_diffusion_flags, use_hidden_reverse

    def parse(emb_flag, steps, *argv, extra=()):
        parser = argparse.ArgumentParser()
        group = parser.add_argument_group("diffusion")
        add_diffusion_args(group, emb_flag=emb_flag, steps=steps)
        for flag, default in extra:
            group.add_argument(flag, default=default)
        return parser.parse_args(list(argv))

    diffmm = parse("d_emb_size", 5)
    assert (diffmm.steps, diffmm.d_emb_size, diffmm.dims, diffmm.reverse) == (5, 10, [1000], "auto")
    diffrec = parse("emb_size", 100, "--mean_type", "eps", extra=[("--mean_type", "x0")])
    assert (diffrec.steps, diffrec.emb_size) == (100, 10) and not hasattr(diffrec, "d_emb_size")
    # wide catalogue, many steps: hidden where exact; never where the denoiser reads or predicts something else
    assert use_hidden_reverse(parse("d_emb_size", 40, "--dims", "[16]"), 600, 64)
    assert not use_hidden_reverse(parse("d_emb_size", 40, "--dims", "[16]"), 600, 64, reads_x_t=False)
    assert not use_hidden_reverse(parse("d_emb_size", 40, "--dims", "[16]", "--norm", "true"), 600, 64)
    assert not use_hidden_reverse(parse("d_emb_size", 40, "--dims", "[16]", "--reverse", "direct"), 600, 64)
    assert not use_hidden_reverse(diffrec, 600, 64)                                       # --mean_type eps
    assert check_diffusion_flags(diffmm) is None
    assert check_diffusion_flags(parse("emb_size", 100, "--emb_size", "0"), emb_flag="emb_size") == \
        "--emb_size must be at least 1, got 0."
    assert check_diffusion_flags(parse("d_emb_size", 5, "--reverse", "hidden", "--norm", "true")) == (
        "--reverse hidden is exact only with --norm false and --sampling_noise false; use --reverse auto or direct.")
    hidden_eps = parse("emb_size", 100, "--reverse", "hidden", "--mean_type", "eps", extra=[("--mean_type", "x0")])
    assert check_diffusion_flags(hidden_eps, emb_flag="emb_size") == (
        "--reverse hidden is exact only with --mean_type x0, --norm false and --sampling_noise false; use --reverse "
        "auto or direct.")
