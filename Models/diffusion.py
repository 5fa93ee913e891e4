"""The Gaussian diffusion over user rows that DiffMM (`Model.py`), MDMNS (`Models/mdmns.py`) and DiffRec
(`Models/diffrec.py`) share: the denoiser, the noise schedule, the training loss, the reverse process that scores
items, and the flags that configure them.

Equation numbers are DiffMM's (Jiang et al., ACM MM 2024); DiffRec (Wang et al., SIGIR 2023) is the same model on
interactions alone. A user's row x0 is its 0/1 train row over the I items:
    forward    x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε                                  (Eq. 3, `q_sample`)
    denoiser   x̂0 = f([x_t ; emb(t)]), an MLP over the items                          (Eq. 13, `Denoiser`)
    loss       w_t · mean_i (x0 - x̂0)², w_t = SNR(t-1) - SNR(t)                      (Eq. 11-13, `training_losses`)
               and DiffMM's MSI term mean_d (x̂0 f_m - x0 Ei)²                           (Eq. 14)
    reverse    x_{t-1} = mean of q(x_{t-1} | x_t, x̂0) from t = T-1 down to 0           (Eq. 8, 12, `p_sample`)

The plain computation comes first. The fast path, the same reverse chain run in the denoiser's hidden space
(`GaussianDiffusion.p_sample_hidden`), and the rule that picks it (`use_hidden_reverse`) follow in a section of
their own: both paths give the same rows to float rounding (tests/test_diffusion.py).
"""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from Utils.flags import int_list, str2bool

if TYPE_CHECKING:  # typing only: the diffusion itself does not depend on how rows are stored
    from Utils.batches import DeviceRows

# a denoiser, called as denoiser(x, steps, mess_dropout=True) -> x̂0: a `Denoiser`, or a function around one (DiffRec's
# ε-predicting denoiser turned into an x̂0 predictor)
DenoiserFn = Callable[..., torch.Tensor]
# x_t -> what the denoiser reads instead of x_t (MDMNS's guided scores S); None everywhere else: x_t itself
InputFn = Callable[[torch.Tensor], torch.Tensor]
# a batch of users (indices on the device, optionally the same on the host) -> their denoised rows (batch x I)
RowScores = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Denoiser (Eq. 13)
# ---------------------------------------------------------------------------------------------

def step_embedding(steps: torch.Tensor, size: int) -> torch.Tensor:
    """Sinusoidal embedding of the diffusion step: [cos(t ω_k), sin(t ω_k)], ω_k = 10000^(-k/(size/2))."""
    half = size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=steps.device) / half)
    angles = steps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if size % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def message_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of the input row (as nn.Dropout), with the mask built in place: ~2x faster on CPU."""
    keep = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))
    return keep.mul_(x)


class Denoiser(nn.Module):
    """MLP x̂0 = f([x_t ; emb(t)]) over the I items of a user row (Eq. 13).

    `dims` are the hidden sizes as the authors give them: output side dims + [I], input side its
    reverse, so `[1000]` means I+emb -> 1000 -> I.
    """

    def __init__(self, n_items: int, dims: Sequence[int], emb_size: int, norm: bool, dropout: float = 0.5):
        super().__init__()
        out_dims = list(dims) + [n_items]
        in_dims = [n_items + emb_size] + out_dims[::-1][1:]
        self.emb_size, self.norm = emb_size, norm
        self.emb_layer = nn.Linear(emb_size, emb_size)
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(in_dims[:-1], in_dims[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        self.dropout = dropout
        for layer in [self.emb_layer, *self.in_layers, *self.out_layers]:
            std = math.sqrt(2.0 / (layer.in_features + layer.out_features))
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.normal_(layer.bias, 0.0, 0.001)

    def forward(self, x: torch.Tensor, steps: torch.Tensor, mess_dropout: bool = True) -> torch.Tensor:
        emb = self.emb_layer(step_embedding(steps, self.emb_size))
        if self.norm:
            x = F.normalize(x)
        if mess_dropout and self.training:
            x = message_dropout(x, self.dropout)
        # The first layer on [x ; emb] as two products: same result, but autograd then needs no
        # gradient for the I-wide input x (only for the small step embedding).
        return self.out_layers[-1](self.hidden(F.linear(x, self.input_weight()), emb))

    def input_weight(self) -> torch.Tensor:
        """W_x: the first layer's weights on the I item inputs (hidden x I); the rest act on emb(t)."""
        return self.in_layers[0].weight[:, : self.out_layers[-1].out_features]

    def hidden(self, first_input: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The input of the last (I-wide) layer, from W_x x and the step embedding emb(t)."""
        first = self.in_layers[0]
        h = torch.tanh(first_input + F.linear(emb, first.weight[:, self.input_weight().shape[1]:], first.bias))
        for layer in self.in_layers[1:]:
            h = torch.tanh(layer(h))
        for layer in self.out_layers[:-1]:
            h = torch.tanh(layer(h))
        return h


# ---------------------------------------------------------------------------------------------
# Gaussian diffusion (Eq. 2-14)
# ---------------------------------------------------------------------------------------------

def noise_schedule(noise_scale: float, noise_min: float, noise_max: float, steps: int,
                   beta_fixed: float = 1e-4) -> np.ndarray:
    """β_t (float64): variance_t linear in [s γmin, s γmax], β_t = 1 - ᾱ_t/ᾱ_{t-1} capped at 0.999, β_0 = `beta_fixed`
    (the authors' 1e-4; DiffRec's 1e-5)."""
    variance = np.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=np.float64)
    alpha_bar = 1.0 - variance
    betas = np.empty(steps, dtype=np.float64)
    betas[0] = 1.0 - alpha_bar[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    betas[0] = beta_fixed
    return betas


class GaussianDiffusion:
    """Forward noising, the ELBO + MSI training loss, and reverse sampling with one shared schedule.

    What the denoiser reads is a parameter (`denoiser_input`): x_t itself by default, MDMNS's guided scores S of
    x_t otherwise; everything else is the same computation.
    """

    def __init__(self, noise_scale: float, noise_min: float, noise_max: float, steps: int, device: torch.device,
                 beta_fixed: float = 1e-4):
        self.noise_scale, self.steps, self.device = noise_scale, steps, device
        betas = torch.tensor(noise_schedule(noise_scale, noise_min, noise_max, steps, beta_fixed), dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        table = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # log of the posterior variance with step 0 replaced by step 1 (variance 0 at t=0)
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in table.items():
            setattr(self, name, value.to(device))
        # the reverse chain's coefficients as Python floats (their float32 values), which `p_sample_hidden` reads
        # at every step: from the device tables, each read would be a device synchronisation
        self.host_coef1 = table["posterior_mean_coef1"].float().tolist()
        self.host_coef2 = table["posterior_mean_coef2"].float().tolist()

    @staticmethod
    def _at(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """coef[t] as a float32 column, broadcastable against (batch, items)."""
        return coef[t].float()[:, None]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t)."""
        return self.alphas_cumprod[t] / (1.0 - self.alphas_cumprod[t])

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w_t = SNR(t-1) - SNR(t) for t > 0 and 1 for t = 0 (Eq. 11)."""
        weight = self.snr((t - 1).clamp(min=0)) - self.snr(t)
        return torch.where(t == 0, torch.ones_like(weight), weight)

    def sample_steps(self, x0: torch.Tensor) -> torch.Tensor:
        """t ~ U{0..T-1}, one per row of x0."""
        return torch.randint(0, self.steps, (x0.shape[0],), device=x0.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (Eq. 3)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._at(self.sqrt_alphas_cumprod, t) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def posterior_mean(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x̂0) (Eq. 8)."""
        return self._at(self.posterior_mean_coef1, t) * x0_hat + self._at(self.posterior_mean_coef2, t) * x_t

    def training_losses(self, denoiser: DenoiserFn, x0: torch.Tensor, item_emb: torch.Tensor,
                        modal_feat: torch.Tensor, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None, denoiser_input: Optional[InputFn] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row ELBO term w_t · mean_i (x0 - x̂0)² (Eq. 11-13) and MSI term mean_d (x̂0 f_m - x0 Ei)² (Eq. 14).

        x̂0 = denoiser(x_t, t), or denoiser(denoiser_input(x_t), t) when the denoiser reads something else
        (MDMNS's guided scores). `item_emb` and `modal_feat` must be detached: the diffusion loss does not train the
        recommender. The steps `t` and the noise ε are drawn here unless given (tests feed the same draws to two
        devices).
        """
        if t is None:
            t = self.sample_steps(x0)
        x_t = self.q_sample(x0, t, noise) if self.noise_scale != 0 else x0
        x0_hat = denoiser(x_t if denoiser_input is None else denoiser_input(x_t), t).float()
        elbo = self.elbo_weight(t).float() * (x0 - x0_hat).square().mean(dim=1)
        msi = (x0_hat @ modal_feat - x0 @ item_emb).square().mean(dim=1)
        return elbo, msi

    @torch.no_grad()
    def p_sample(self, denoiser: DenoiserFn, x0: torch.Tensor, sampling_steps: int, sampling_noise: bool,
                 denoiser_input: Optional[InputFn] = None) -> torch.Tensor:
        """Reverse process from x0 (sampling_steps = 0) or from x_{T'} = q(x0, T'-1), down to step 0 (Eq. 8, 12).

        Each step feeds the denoiser x_t, or `denoiser_input(x_t)` (as `training_losses`).
        """
        n = x0.shape[0]
        x = x0 if sampling_steps == 0 else self.q_sample(x0, torch.full((n,), sampling_steps - 1, device=x0.device))
        for step in reversed(range(self.steps)):
            t = torch.full((n,), step, device=x0.device, dtype=torch.long)
            x0_hat = denoiser(x if denoiser_input is None else denoiser_input(x), t, mess_dropout=False).float()
            mean = self.posterior_mean(x0_hat, x, t)
            if sampling_noise and step > 0:
                mean = mean + torch.exp(0.5 * self._at(self.posterior_log_variance_clipped, t)) * torch.randn_like(x)
            x = mean
        return x

    # --- the fast path: the reverse chain in the denoiser's hidden space (same rows, fewer I-wide products) ---
    @torch.no_grad()
    def p_sample_hidden(self, denoiser: Denoiser, x0: torch.Tensor, sampling_steps: int,
                        x0_sparse: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`p_sample` without sampling noise, run in the denoiser's first hidden space (same rows).

        Exact when the denoiser does not normalise its input (`norm` false) and no noise is added
        (`sampling_noise` false): x enters the network only through a = W_x x, and each reverse step
        x ← c1_t (W_out z_t + b_out) + c2_t x (Eq. 8, z_t the input of the last layer) maps to
        a ← c1_t (M z_t + W_x b_out) + c2_t a with M = W_x W_out (hidden x hidden). The rows themselves
        stay x = W_out S + s b_out + g x_start, with S ← c1 z + c2 S, s ← c1 + c2 s, g ← c2 g, so the
        whole chain costs one I-wide product at the start (a sparse one when `x0_sparse`, the rows as a
        sparse CSR tensor, is given and sampling starts at x0) and one at the end, instead of two per step.
        """
        n = x0.shape[0]
        x_start = x0 if sampling_steps == 0 else self.q_sample(x0, torch.full((n,), sampling_steps - 1,
                                                                              device=x0.device))
        w_in = denoiser.input_weight()
        last = denoiser.out_layers[-1]
        if sampling_steps == 0 and x0_sparse is not None:
            with torch.autocast(x0.device.type, enabled=False):
                a = torch.sparse.mm(x0_sparse, w_in.T.float())
        else:
            a = F.linear(x_start, w_in)
        m, v = w_in @ last.weight, w_in @ last.bias
        total = a.new_zeros(n, last.in_features)
        bias_scale = 0.0
        start_scale = 1.0
        for step in reversed(range(self.steps)):
            t = torch.full((n,), step, device=x0.device, dtype=torch.long)
            z = denoiser.hidden(a, denoiser.emb_layer(step_embedding(t, denoiser.emb_size)))
            c1, c2 = self.host_coef1[step], self.host_coef2[step]
            a = c1 * (F.linear(z, m) + v) + c2 * a
            total = c1 * z + c2 * total
            bias_scale, start_scale = c1 + c2 * bias_scale, c2 * start_scale
        return (F.linear(total, last.weight) + bias_scale * last.bias).float() + start_scale * x_start


# ---------------------------------------------------------------------------------------------
# Which reverse chain scores: the hidden-space one where it is exact and cheaper, else the direct one
# ---------------------------------------------------------------------------------------------

def hidden_reverse_exact(args: argparse.Namespace, reads_x_t: bool = True) -> bool:
    """Whether `p_sample_hidden` gives `p_sample`'s rows for these flags: the denoiser reads x_t itself (`reads_x_t`;
    not MDMNS's guided scores) without normalising it (--norm false), predicts x0 (DiffRec's --mean_type x0;
    DiffMM's always does) and no noise is drawn (--sampling_noise false)."""
    return reads_x_t and not args.norm and not args.sampling_noise and getattr(args, "mean_type", "x0") == "x0"


def hidden_reverse_is_cheaper(n_items: int, hidden: int, steps: int, batch: int) -> bool:
    """Whether `p_sample_hidden` costs fewer multiply-adds than `p_sample` for a batch of `batch` rows.

    With h = the denoiser's last hidden size (that of W_x and W_out), the direct chain runs the I-wide first and
    last layers at every step, 2·T·B·I·h; the hidden one forms M = W_x W_out once per batch (h·I·h), runs
    M z at every step (T·B·h²) and one I-wide product at each end (2·B·I·h, the start counted dense). The
    rest (the step embedding, the inner layers) is the same on both. The hidden chain pays on wide
    catalogues (TikTok: I = 6,710 against h = 1,000, a third of the work); on a few hundred items with
    few steps the direct one is cheaper. Measured on the CPU, the ratio of seconds follows this count
    (docs/performance.md).
    """
    direct = 2 * steps * batch * n_items * hidden
    in_hidden = hidden * n_items * hidden + steps * batch * hidden * hidden + 2 * batch * n_items * hidden
    return in_hidden < direct


def use_hidden_reverse(args: argparse.Namespace, n_items: int, batch: int, reads_x_t: bool = True) -> bool:
    """--reverse: 'direct' never, 'hidden' where exact (`check_diffusion_flags` refuses it where the flags make it
    inexact), 'auto' where exact and cheaper for batches of `batch` rows (`hidden_reverse_is_cheaper`). The one
    place DiffMM, MDMNS and DiffRec decide it; both chains give the same rows to float rounding."""
    if args.reverse == "direct" or not hidden_reverse_exact(args, reads_x_t):
        return False
    return args.reverse == "hidden" or hidden_reverse_is_cheaper(n_items, args.dims[-1], args.steps, batch)


# ---------------------------------------------------------------------------------------------
# Scores: the reverse process from every user's train row (DiffMM §2.2.3 graph rebuild; DiffRec's ranking)
# ---------------------------------------------------------------------------------------------

def reverse_scorer(diffusion: GaussianDiffusion, denoiser: DenoiserFn, rows: DeviceRows, sampling_steps: int,
                   sampling_noise: bool, hidden: bool, autocast: Callable[[], ContextManager],
                   denoiser_input: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                   ) -> RowScores:
    """scores(users, host_rows=None): the denoised rows of a batch of users, the reverse process from their train rows
    (`rows`, gathered on the device) or from x_{T'} (sampling_steps T' > 0), under the model's `autocast`.

    `hidden` (`use_hidden_reverse`): the chain in the denoiser's hidden space, which then must be a `Denoiser`;
    starting at x0 it reads the rows as CSR (`host_rows`, the users on the host, spare a device sync). Otherwise step
    by step, the denoiser fed `denoiser_input(x_t, users)` where given (MDMNS's guided sampling).
    """
    if hidden and denoiser_input is not None:
        raise ValueError("the hidden-space reverse process needs x_t itself as the denoiser's input")

    def scores(users: torch.Tensor, host_rows: Optional[np.ndarray] = None) -> torch.Tensor:
        x0 = rows.dense(users)  # built on the device: the users never travel to the host
        with autocast():
            if hidden:
                sparse = rows.csr(users, host_rows) if sampling_steps == 0 else None
                return diffusion.p_sample_hidden(denoiser, x0, sampling_steps, sparse)
            fed = None if denoiser_input is None else (lambda x_t: denoiser_input(x_t, users))
            return diffusion.p_sample(denoiser, x0, sampling_steps, sampling_noise, fed)
    return scores


# ---------------------------------------------------------------------------------------------
# Flags: the authors' names and defaults (DiffMM's Params.py; DiffRec's main.py) and their checks
# ---------------------------------------------------------------------------------------------

# DiffMM's help texts; a model that says it otherwise passes its own (`add_diffusion_args(helps=...)`)
DIFFUSION_HELP = {
    "sampling_noise": "add noise in reverse sampling",
    "sampling_steps": "T': forward steps before reverse sampling",
    "reverse": "reverse process of the graph rebuild: hidden = in the denoiser's hidden space (exact with --norm "
               "false and --sampling_noise false: same rows to float rounding, two items-wide products per batch "
               "instead of two per step); direct = step by step on the item rows, as the authors; auto = hidden "
               "where it is exact and costs fewer multiply-adds for these shapes (wide catalogues), else direct",
}


def add_diffusion_args(group: argparse._ArgumentGroup, emb_flag: str = "d_emb_size", steps: int = 5,
                       helps: Optional[Dict[str, str]] = None) -> None:
    """The denoiser's and the diffusion's flags. What differs between the models: the step embedding's flag name
    (DiffMM's `--d_emb_size`, DiffRec's `--emb_size`), the default number of steps (DiffMM 5, DiffRec 100) and
    a few help texts (`helps`: flag -> text, over `DIFFUSION_HELP`)."""
    text = dict(DIFFUSION_HELP, **(helps or {}))
    group.add_argument("--dims", default="[1000]", type=int_list, help="hidden sizes of the denoiser MLP")
    group.add_argument(f"--{emb_flag}", default=10, type=int, help="size of the diffusion-step embedding")
    group.add_argument("--norm", default=False, type=str2bool, help="L2-normalise the denoiser input")
    group.add_argument("--steps", default=steps, type=int, help="T: diffusion steps")
    group.add_argument("--noise_scale", default=0.1, type=float, help="s: noise scale")
    group.add_argument("--noise_min", default=0.0001, type=float, help="γmin: lower noise bound")
    group.add_argument("--noise_max", default=0.02, type=float, help="γmax: upper noise bound")
    group.add_argument("--sampling_noise", default=False, type=str2bool, help=text["sampling_noise"])
    group.add_argument("--sampling_steps", default=0, type=int, help=text["sampling_steps"])
    group.add_argument("--reverse", default="auto", choices=["auto", "direct", "hidden"], help=text["reverse"])


def check_diffusion_flags(args: argparse.Namespace, emb_flag: str = "d_emb_size") -> Optional[str]:
    """The first of `add_diffusion_args`' flags whose value cannot give a meaningful run on any data, as one
    sentence (`emb_flag` as given there)."""
    for name in ("steps", emb_flag):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}."
    if not 0 <= args.sampling_steps <= args.steps:
        return f"--sampling_steps must be between 0 and --steps ({args.steps}), got {args.sampling_steps}."
    noise = (args.noise_scale, args.noise_min, args.noise_max)
    if min(noise) < 0.0 or args.noise_scale * max(args.noise_min, args.noise_max) >= 1.0:
        return (f"--noise_scale, --noise_min and --noise_max must be non-negative with noise_scale x noise_max "
                f"below 1 (it is a variance), got {noise}.")
    if args.reverse == "hidden" and not hidden_reverse_exact(args):
        needs = ["--mean_type x0"] if hasattr(args, "mean_type") else []
        needs += ["--norm false", "--sampling_noise false"]
        return (f"--reverse hidden is exact only with {', '.join(needs[:-1])} and {needs[-1]}; use --reverse auto "
                f"or direct.")
    return None
