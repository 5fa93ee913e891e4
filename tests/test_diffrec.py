"""DiffRec (Models/diffrec.py) against references written here: its schedule (β_0 = 1e-5), its step weights,
its importance sampling of steps and history, its batch loss, its scores (an explicit reverse loop), the
resume state, `check()`, and a short run through Main.main that beats popularity."""
from __future__ import annotations

import argparse
import io
import json
from collections import deque

import numpy as np
import pytest
import torch

import inference
import Main
import Models
from Params import parse_args

from conftest import hand_made, write_dataset

CPU = torch.device("cpu")
T = 4


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(Models.REGISTRY, "diffrec", "Models.diffrec:DiffRec")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffrec_data")
    train, val, test, _ = hand_made(n_users=24, n_items=16, seed=3)
    write_dataset(root / "tiny", train, val, test)     # no feature files: DiffRec reads interactions only
    return root


def build(data_dir, *extra):
    argv = ["--model", "diffrec", "--data", "tiny", "--data_dir", str(data_dir), "--dims", "[8]", "--steps", str(T),
            "--batch", "4", "--quiet", *extra]
    args = parse_args(argv)
    data = inference.load_run_data(args, needs_features=False)
    return args, data, inference.build_model(args, data, CPU)


def reference_schedule(scale: float, low: float, high: float, steps: int):
    """(β, ᾱ) of DiffRec's linear-var schedule, written out step by step, β_0 fixed to 1e-5."""
    variance = [scale * low + (scale * high - scale * low) * k / (steps - 1) for k in range(steps)]
    alpha_bar_var = [1.0 - v for v in variance]
    betas = [1e-5]
    for k in range(1, steps):
        betas.append(min(1.0 - alpha_bar_var[k] / alpha_bar_var[k - 1], 0.999))
    alpha_bar, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        alpha_bar.append(running)
    return np.array(betas), np.array(alpha_bar)


def reference_probabilities(history: list, steps: int) -> np.ndarray:
    """p_t from per-step deques of the last 10 values: sqrt(mean of squares), normalised, 0.999/0.001 mix."""
    root = np.array([np.sqrt(np.mean(np.square(list(history[t])))) for t in range(steps)])
    return 0.999 * root / root.sum() + 0.001 / steps


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, coefficients from float64 (1 - ᾱ_0 = 1e-5 is 0.3% off in float32)."""
    t = t.numpy()
    return (torch.from_numpy(np.sqrt(alpha_bar[t]))[:, None].float() * x0
            + torch.from_numpy(np.sqrt(1.0 - alpha_bar[t]))[:, None].float() * noise)


def test_defaults_are_diffrecs_main_py():
    args = parse_args(["--model", "diffrec"])
    assert (args.lr, args.batch, args.epoch, args.tstEpoch, args.patience) == (1e-4, 400, 1000, 5, 3)
    assert (args.steps, args.noise_scale, args.noise_min, args.noise_max) == (100, 0.1, 1e-4, 0.02)
    assert (args.dims, args.emb_size, args.norm, args.mean_type, args.reweight) == ([1000], 10, False, "x0", True)
    assert (args.sampling_steps, args.sampling_noise, args.weight_decay) == (0, False, 0.0)
    assert parse_args(["--model", "diffrec", "--norm", "False"]).norm is False   # not DiffRec's type=bool


def test_schedule_has_beta0_1e5_and_the_linear_variance_steps(data_dir):
    _, _, model = build(data_dir, "--noise_scale", "0.1", "--noise_min", "0.001", "--noise_max", "0.02")
    betas, alpha_bar = reference_schedule(0.1, 0.001, 0.02, T)
    assert model.diffusion.betas[0].item() == 1e-5
    np.testing.assert_allclose(model.diffusion.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(model.diffusion.alphas_cumprod.numpy(), alpha_bar, rtol=1e-12)


def test_step_weights_from_the_alphas(data_dir):
    betas, alpha_bar = reference_schedule(0.1, 1e-4, 0.02, T)
    snr = alpha_bar / (1.0 - alpha_bar)
    t = torch.arange(T)
    _, _, model = build(data_dir)
    expected = [1.0] + [snr[k - 1] - snr[k] for k in range(1, T)]          # w_t = SNR(t-1) - SNR(t), w_0 = 1
    np.testing.assert_allclose(model.step_weights(t).numpy(), expected, rtol=1e-9)
    _, _, eps = build(data_dir, "--mean_type", "eps")
    prev = np.concatenate([[1.0], alpha_bar[:-1]])
    expected = [1.0] + [(1 - alpha_bar[k]) / ((1 - prev[k]) ** 2 * (1 - betas[k])) for k in range(1, T)]
    np.testing.assert_allclose(eps.step_weights(t).numpy(), expected, rtol=1e-9)
    _, _, flat = build(data_dir, "--reweight", "false")
    assert flat.step_weights(t).tolist() == [1.0] * T


def test_importance_sampling_is_uniform_until_the_history_is_full_then_follows_it():
    from Models.diffrec import StepHistory

    steps, n = 5, 64
    history = StepHistory(steps, CPU)
    reference = [deque(maxlen=10) for _ in range(steps)]
    rng = np.random.default_rng(0)

    def feed(t):
        values = rng.random(len(t)) * (1 + np.asarray(t))
        history.update(torch.tensor(t), torch.tensor(values))
        for step, value in zip(t, values):       # the authors' loop: one row after the other
            reference[step].append(value)

    feed([0, 1, 2, 3, 4] * 9 + [2] * 25)         # step 2 gets 34 values in one batch (only its last 10 count)
    assert not history.full()
    torch.manual_seed(5)
    t, pt = history.sample(n, CPU)
    torch.manual_seed(5)
    assert torch.equal(t, torch.randint(0, steps, (n,))) and torch.equal(pt, torch.ones(n))

    feed(list(rng.permutation([0, 1, 3, 4] * 13)))   # every step past 10 values, with the ring wrapping
    assert history.full()
    expected = reference_probabilities(reference, steps)
    np.testing.assert_allclose(history.probabilities().numpy(), expected, rtol=1e-12)
    torch.manual_seed(6)
    t, pt = history.sample(n, CPU)
    torch.manual_seed(6)
    assert torch.equal(t, torch.multinomial(torch.tensor(expected), n, replacement=True))
    np.testing.assert_allclose(pt.numpy(), expected[t.numpy()] * steps, rtol=1e-6)   # the loss divides by p_t·T


def test_batch_loss_is_weighted_mse_over_pt_times_T_and_feeds_the_history(data_dir):
    _, data, model = build(data_dir)
    model.denoiser.eval()                        # no input dropout: the reference below draws no mask
    betas, alpha_bar = reference_schedule(0.1, 1e-4, 0.02, T)
    snr = alpha_bar / (1.0 - alpha_bar)
    weight = np.array([1.0] + [snr[k - 1] - snr[k] for k in range(1, T)])
    x0 = torch.from_numpy(data.train.toarray()[:12].astype(np.float32))
    reference = [deque(maxlen=10) for _ in range(T)]

    def expected_loss(seed, p=None):
        """The loss of the batch drawn after `seed`: t uniform (p None) or ~ p, then the noise."""
        torch.manual_seed(seed)
        t = torch.randint(0, T, (len(x0),)) if p is None else torch.multinomial(torch.tensor(p), len(x0), True)
        pt = np.ones(len(x0)) if p is None else p[t.numpy()] * T
        noise = torch.randn_like(x0)
        with torch.no_grad():
            out = model.denoiser(noised(x0, noise, alpha_bar, t), t)
        rows = weight[t.numpy()] * ((x0 - out) ** 2).mean(1).numpy()
        for step, value in zip(t.tolist(), rows):
            reference[step].append(value)
        return np.mean(rows / pt)

    for seed in range(8):                        # uniform phase (p_t·T = 1) until every step has 10 values
        if model.history.full():
            break
        expected = expected_loss(seed)
        torch.manual_seed(seed)
        assert model.batch_loss(x0).item() == pytest.approx(expected, rel=1e-5)
    assert model.history.full()
    p = reference_probabilities(reference, T)
    np.testing.assert_allclose(model.history.probabilities().numpy(), p, rtol=1e-5)
    expected = expected_loss(11, p)
    torch.manual_seed(11)
    assert model.batch_loss(x0).item() == pytest.approx(expected, rel=1e-5)


def test_eps_batch_loss_targets_the_noise_and_uses_the_likelihood_at_t0(data_dir):
    _, data, model = build(data_dir, "--mean_type", "eps")
    model.denoiser.eval()
    betas, alpha_bar = reference_schedule(0.1, 1e-4, 0.02, T)
    prev = np.concatenate([[1.0], alpha_bar[:-1]])
    x0 = torch.from_numpy(data.train.toarray()[:12].astype(np.float32))
    torch.manual_seed(0)
    t = torch.randint(0, T, (len(x0),))
    noise = torch.randn_like(x0)
    x_t = noised(x0, noise, alpha_bar, t)
    with torch.no_grad():
        eps = model.denoiser(x_t, t)
    expected = []
    for row, step in enumerate(t.tolist()):
        if step == 0:                            # weight 1, loss = mean (x0 - x̂0)² / 2 with x̂0 from the noise
            start = x_t[row] / np.sqrt(alpha_bar[0]) - np.sqrt(1 / alpha_bar[0] - 1) * eps[row]
            expected.append(((x0[row] - start) ** 2 / 2).mean().item())
        else:
            w = (1 - alpha_bar[step]) / ((1 - prev[step]) ** 2 * (1 - betas[step]))
            expected.append(w * ((noise[row] - eps[row]) ** 2).mean().item())
    assert 0 in t.tolist() and len(set(t.tolist())) > 1
    torch.manual_seed(0)
    assert model.batch_loss(x0).item() == pytest.approx(np.mean(expected), rel=1e-5)
    # each row's term, in the history of its step in row order (the t = 0 rows are tiny beside the others)
    for step in range(T):
        rows = [value for value, s in zip(expected, t.tolist()) if s == step]
        np.testing.assert_allclose(model.history.values[step, :len(rows)].numpy(), rows, rtol=1e-5)


@pytest.mark.parametrize("extra", [(), ("--reverse", "direct"), ("--mean_type", "eps"), ("--sampling_steps", "2"),
                                   ("--sampling_steps", "2", "--reverse", "direct")])
def test_scores_are_the_reverse_chain_from_the_train_rows(data_dir, extra):
    _, data, model = build(data_dir, *extra)
    with torch.no_grad():                        # a trained-looking denoiser: larger output weights
        model.denoiser.out_layers[-1].weight.mul_(5.0)
    model.eval()
    betas, alpha_bar = reference_schedule(0.1, 1e-4, 0.02, T)
    prev = np.concatenate([[1.0], alpha_bar[:-1]])
    users = np.array([3, 0, 17, 9, 22])
    x0 = torch.from_numpy(data.train.toarray()[users].astype(np.float32))
    torch.manual_seed(2)
    x = x0.clone()
    if "--sampling_steps" in extra:              # the chain starts at x_{T'} = q(x0, T'-1)
        a = float(alpha_bar[1])
        x = float(np.sqrt(a)) * x0 + float(np.sqrt(1 - a)) * torch.randn_like(x0)
    with torch.no_grad():
        for step in reversed(range(T)):
            t = torch.full((len(users),), step)
            out = model.denoiser(x, t).float()
            if "eps" in extra:                   # x̂0 from the predicted noise
                out = float(np.sqrt(1 / alpha_bar[step])) * x - float(np.sqrt(1 / alpha_bar[step] - 1)) * out
            c1 = float(betas[step] * np.sqrt(prev[step]) / (1 - alpha_bar[step]))
            c2 = float((1 - prev[step]) * np.sqrt(1 - betas[step]) / (1 - alpha_bar[step]))
            x = c1 * out + c2 * x                # posterior mean, no noise
        torch.manual_seed(2)
        scores = model.scorer()(torch.from_numpy(users))
    assert scores.shape == (len(users), data.n_items)
    np.testing.assert_allclose(scores.numpy(), x.numpy(), rtol=1e-4, atol=1e-5)


def test_resume_state_round_trips_the_history(data_dir):
    from Models.base import PhaseTimer

    _, _, model = build(data_dir)
    for epoch in range(3):
        model.train_epoch(epoch, PhaseTimer(CPU))
    assert model.history.full()
    buffer = io.BytesIO()
    torch.save(model.training_state(), buffer)
    buffer.seek(0)
    _, _, fresh = build(data_dir, "--seed", "7")
    assert not fresh.history.full()
    fresh.load_training_state(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.history.values, model.history.values)
    assert torch.equal(fresh.history.count, model.history.count)
    # the two continue identically: same steps drawn, same losses, same histories
    torch.manual_seed(1)
    a = model.train_epoch(3, PhaseTimer(CPU))
    torch.manual_seed(1)
    b = fresh.train_epoch(3, PhaseTimer(CPU))
    assert a == b and torch.equal(fresh.history.values, model.history.values)
    # and an earlier, not yet full, history brings back uniform sampling
    _, _, empty = build(data_dir)
    model.history.load(empty.history.state())
    assert not model.history.full()


def test_check_gives_one_sentence_for_impossible_configs(data_dir, tmp_path):
    from Models.diffrec import DiffRec

    args, data, _ = build(data_dir)
    assert DiffRec.check(args, data) is None
    bad = {"steps": 0, "sampling_steps": T + 1, "noise_scale": 0.0, "noise_min": 0.05, "emb_size": 0,
           "weight_decay": -1.0}
    for name, value in list(bad.items()) + [("noise_max", 20.0)]:
        problem = DiffRec.check(argparse.Namespace(**dict(vars(args), **{name: value})), data)
        assert isinstance(problem, str) and problem.endswith(".") and "\n" not in problem, (name, problem)
        assert ". " not in problem and f"--{name}" in problem, (name, problem)     # one sentence naming the flag
    argv = ["--model", "diffrec", "--data", "tiny", "--data_dir", str(data_dir), "--noise_min", "0.05", "--quiet",
            "--out_dir", str(tmp_path / "bad")]
    with pytest.raises(SystemExit) as refused:   # needs no data: refused when the command line is parsed
        Main.main(argv)
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()


def test_trains_through_main_and_beats_popularity(tmp_path):
    from Utils.synthetic import write_synthetic

    write_synthetic(tmp_path / "data" / "synthetic")
    out = tmp_path / "run"
    argv = ["--model", "diffrec", "--data_dir", str(tmp_path / "data"), "--epoch", "20", "--dims", "[64]",
            "--steps", "5", "--lr", "3e-3", "--quiet", "--out_dir", str(out)]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    assert ours > popularity + 0.01, (ours, popularity)
    assert summary["evaluations"] == 5                   # every 5 epochs (0, 5, 10, 15) and the last
