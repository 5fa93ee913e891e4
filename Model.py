"""DiffMM (Jiang et al., ACM MM 2024): the multi-modal recommender, the denoiser, the Gaussian diffusion,
and `DiffMM`, the model the harness trains (one epoch: denoisers, graph rebuild, negatives, recommender).

Equation numbers are the paper's. Where the default follows the authors' code rather than an equation,
the README's table "Where the default follows the authors' code" says how and why.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from DataHandler import (Data, DeviceRows, device_batches, normalized_graph, sample_negatives, train_graph, train_pairs,
                         user_batches)
from Models.base import RecModel
from Utils.helpers import PhaseTimer
from Utils.layers import Graph, bpr_loss, info_nce, propagate

Views = List[Tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Recommender (Eq. 15-23)
# ---------------------------------------------------------------------------------------------

class FeatureTransform(nn.Module):
    """Item features F_m (I x d_m) to d dimensions: LeakyReLU_0.2(F W) (`linear=False`) or Linear(F)."""

    def __init__(self, in_dim: int, out_dim: int, linear: bool):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim) if linear else None
        self.weight = None if linear else nn.Parameter(nn.init.xavier_uniform_(torch.empty(in_dim, out_dim)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            return self.linear(features)
        return F.leaky_relu(features @ self.weight, negative_slope=0.2)


def uses_linear(trans: int, modality: str) -> bool:
    """`trans` 0: matrix + LeakyReLU for all; 1: Linear for all; 2: image as 0, every other modality as 1."""
    return trans == 1 or (trans == 2 and modality != "image")


class Recommender(nn.Module):
    """The main view (Eq. 23 fused multi-modal graph encoder) and the per-modality contrastive views."""

    def __init__(self, n_users: int, n_items: int, features: Dict[str, torch.Tensor], latdim: int,
                 gnn_layer: int, trans: int, ris_lambda: float, ris_adj_lambda: float):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.gnn_layer, self.ris_lambda, self.ris_adj_lambda = gnn_layer, ris_lambda, ris_adj_lambda
        self.modalities = list(features)
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, latdim)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, latdim)))
        self.transforms = nn.ModuleDict({
            m: FeatureTransform(f.shape[1], latdim, uses_linear(trans, m)) for m, f in features.items()
        })
        # κ: one weight per modality, softmax-ed at use.
        self.modal_weight = nn.Parameter(torch.full((len(features),), 1.0 / len(features)))
        for m, f in features.items():  # fixed inputs: moved with .to(device), not saved in checkpoints
            self.register_buffer(f"features_{m}", f, persistent=False)

    def modal_features(self) -> Dict[str, torch.Tensor]:
        """f_m = transform_m(F_m) for every modality (I x d)."""
        return {m: self.transforms[m](getattr(self, f"features_{m}")) for m in self.modalities}

    def reg_loss(self) -> torch.Tensor:
        return self.user_emb.square().sum() + self.item_emb.square().sum()

    def modal_embeddings(self, adj: Graph, modal_graphs: Dict[str, Graph], with_views: bool = False,
                         view_graphs: Optional[Dict[str, Graph]] = None
                         ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """z_m of every modality (U+I rows), and with `with_views` the first layer of each contrastive view.

        Per modality m, with n_m the row-normalised transformed features and Âm the generated graph:
            z_m = adj [Eu; n_m] + adj [ (adj [Eu; n_m])[:U] ; Ei ] + ris_adj_lambda Âm [Eu; Ei]
            view_m^0 = Âm [Eu; n_m]   (`view_graphs[m]` instead of Âm when given, --fusion_ratio > 0)
        """
        d = self.user_emb.shape[1]
        id_nodes = torch.cat([self.user_emb, self.item_emb])
        features = self.modal_features()
        modal, view_inputs = [], []
        for m in self.modalities:
            modal_nodes = torch.cat([self.user_emb, F.normalize(features[m])])
            z = adj @ modal_nodes
            z = z + adj @ torch.cat([z[: self.n_users], self.item_emb])
            if with_views and view_graphs is not None and view_graphs[m] is not modal_graphs[m]:
                z = z + self.ris_adj_lambda * (modal_graphs[m] @ id_nodes)
                view_inputs.append(view_graphs[m] @ modal_nodes)
            elif with_views:  # one product of Âm with both the ID tables and the modality nodes
                generated = modal_graphs[m] @ torch.cat([id_nodes, modal_nodes], dim=1)
                z = z + self.ris_adj_lambda * generated[:, :d]
                view_inputs.append(generated[:, d:])
            else:
                z = z + self.ris_adj_lambda * (modal_graphs[m] @ id_nodes)
            modal.append(z)
        return modal, view_inputs

    def forward(self, adj: Graph, modal_graphs: Dict[str, Graph], with_views: bool = False,
                view_graphs: Optional[Dict[str, Graph]] = None) -> Tuple[torch.Tensor, torch.Tensor, Views]:
        """Main-view user and item vectors (`forward_MM`), plus the contrastive views (`forward_cl_MM`).

        With z_m and view_m^0 of `modal_embeddings`:
            H0  = Σ_m softmax(κ)_m z_m;   H = Σ_l adj^l H0 + ω normalise(H0)     (Eq. 23, ω = ris_lambda)
            view_m = Σ_l adj^l view_m^0
        The main view and the views share the feature transforms and one propagation (stacked columns).
        `view_graphs` (--fusion_ratio > 0) replaces Âm in the views only; by default the views use Âm.
        """
        d = self.user_emb.shape[1]
        modal, view_inputs = self.modal_embeddings(adj, modal_graphs, with_views, view_graphs)
        weights = torch.softmax(self.modal_weight, dim=0)
        fused = 0.0
        for k, z in enumerate(modal):
            fused = fused + weights[k] * z

        pooled = propagate(adj, torch.cat([fused] + view_inputs, dim=1), self.gnn_layer, "sum")
        main = pooled[:, :d] + self.ris_lambda * F.normalize(fused)
        views = [(v[: self.n_users], v[self.n_users:]) for v in pooled[:, d:].split(d, dim=1)] if with_views else []
        return main[: self.n_users], main[self.n_users:], views


def contrastive_loss(user_vec: torch.Tensor, item_vec: torch.Tensor, views: Views, users: torch.Tensor,
                     positives: torch.Tensor, cl_method: int, temp: float, plain: bool = False) -> torch.Tensor:
    """Cross-modal contrastive loss before the λ1 (ssl_reg) factor (Eq. 18-19).

    cl_method 0: every unordered pair of modality views; cl_method 1: the main view against each view.
    """
    if cl_method == 0:
        pairs = [(views[a], views[b]) for a in range(len(views)) for b in range(a + 1, len(views))]
    else:
        pairs = [((user_vec, item_vec), view) for view in views]
    loss = user_vec.new_zeros(())
    for (user_a, item_a), (user_b, item_b) in pairs:
        loss = loss + info_nce(user_a, user_b, users, temp, plain) + info_nce(item_a, item_b, positives, temp, plain)
    return loss


# ---------------------------------------------------------------------------------------------
# VGAE graph generator of the "w/o DM" ablation (paper Table 3, Kipf & Welling 2016)
# ---------------------------------------------------------------------------------------------

class VGAE(nn.Module):
    """Variational graph auto-encoder over the U+I nodes of the train graph, one per modality.

    Encoder (two GCN layers on the normalised train graph Â, the second split in mean and log-variance):
        X = [Eu ; f_m] (detached user ID table and transformed modality features, both d wide)
        H = ReLU(Â X W0);  μ = Â H Wμ;  log σ² = Â H Wσ;  z = μ + σ ε (ε ~ N(0, I) in training, 0 otherwise)
    Decoder: p(u, i) = σ(z_u · z_i). Loss for a batch of user rows x0 (dense 0/1 rows of the train
    matrix): the mean of the positive-weighted binary cross-entropy of the logits z_u · z_i against x0
    (positives weighted by `pos_weight`, #non-edges / #edges of the train matrix, as Kipf & Welling's
    code), plus KL(q(z) || N(0, I)) averaged over nodes and divided by the number of nodes.
    """

    def __init__(self, n_users: int, in_dim: int, hidden: int, out_dim: int, pos_weight: float):
        super().__init__()
        self.n_users, self.pos_weight = n_users, pos_weight
        self.w0 = nn.Linear(in_dim, hidden, bias=False)
        self.w_mu = nn.Linear(hidden, out_dim, bias=False)
        self.w_logvar = nn.Linear(hidden, out_dim, bias=False)
        for layer in (self.w0, self.w_mu, self.w_logvar):
            nn.init.xavier_uniform_(layer.weight)

    def encode(self, adj: Graph, user_emb: torch.Tensor, item_feat: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of every node, (U+I) x out_dim."""
        h = torch.relu(adj @ self.w0(torch.cat([user_emb, item_feat])))
        h = adj @ h
        return self.w_mu(h), self.w_logvar(h)

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Reparameterised z in training, the mean otherwise."""
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def loss(self, adj: Graph, user_emb: torch.Tensor, item_feat: torch.Tensor, rows: torch.Tensor,
             x0: torch.Tensor) -> torch.Tensor:
        """Weighted BCE reconstruction of the batch's user rows (batch x I, never U x I) + KL / nodes."""
        mu, logvar = self.encode(adj, user_emb, item_feat)
        z = self.sample(mu, logvar)
        logits = (z[rows] @ z[self.n_users:].T).float()
        recon = F.binary_cross_entropy_with_logits(
            logits, x0, pos_weight=torch.tensor(self.pos_weight, device=x0.device, dtype=logits.dtype))
        n_nodes = mu.shape[0]
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1).mean() / n_nodes
        return recon + kl

    @torch.no_grad()
    def embeddings(self, adj: Graph, user_emb: torch.Tensor, item_feat: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(user z, item z) with z = μ: the decoder score of (u, i) is σ(z_u · z_i), ranked by z_u · z_i."""
        mu, _ = self.encode(adj, user_emb, item_feat)
        return mu[: self.n_users], mu[self.n_users:]


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
    """Forward noising, the ELBO + MSI training loss, and reverse sampling with one shared schedule."""

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

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (Eq. 3)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._at(self.sqrt_alphas_cumprod, t) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def posterior_mean(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x̂0) (Eq. 8)."""
        return self._at(self.posterior_mean_coef1, t) * x0_hat + self._at(self.posterior_mean_coef2, t) * x_t

    def training_losses(self, denoiser: Denoiser, x0: torch.Tensor, item_emb: torch.Tensor, modal_feat: torch.Tensor,
                        t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row ELBO term w_t · mean_i (x0 - x̂0)² (Eq. 11-13) and MSI term mean_d (x̂0 f_m - x0 Ei)² (Eq. 14).

        `item_emb` and `modal_feat` must be detached: the diffusion loss does not train the recommender.
        The steps `t` and the noise ε are drawn here unless given (tests feed the same draws to two devices).
        """
        if t is None:
            t = torch.randint(0, self.steps, (x0.shape[0],), device=x0.device)
        x_t = self.q_sample(x0, t, noise) if self.noise_scale != 0 else x0
        x0_hat = denoiser(x_t, t).float()
        elbo = self.elbo_weight(t).float() * (x0 - x0_hat).square().mean(dim=1)
        msi = (x0_hat @ modal_feat - x0 @ item_emb).square().mean(dim=1)
        return elbo, msi

    @torch.no_grad()
    def p_sample(self, denoiser: Denoiser, x0: torch.Tensor, sampling_steps: int, sampling_noise: bool) -> torch.Tensor:
        """Reverse process from x0 (sampling_steps = 0) or from x_{T'} = q(x0, T'-1), down to step 0."""
        n = x0.shape[0]
        x = x0 if sampling_steps == 0 else self.q_sample(x0, torch.full((n,), sampling_steps - 1, device=x0.device))
        for step in reversed(range(self.steps)):
            t = torch.full((n,), step, device=x0.device, dtype=torch.long)
            mean = self.posterior_mean(denoiser(x, t, mess_dropout=False).float(), x, t)
            if sampling_noise and step > 0:
                mean = mean + torch.exp(0.5 * self._at(self.posterior_log_variance_clipped, t)) * torch.randn_like(x)
            x = mean
        return x

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


def hidden_reverse_is_cheaper(n_items: int, hidden: int, steps: int, batch: int) -> bool:
    """Whether `p_sample_hidden` costs fewer multiply-adds than `p_sample` for a batch of `batch` rows.

    With h = the denoiser's last hidden size (that of W_x and W_out), the direct chain runs the I-wide first and
    last layers at every step, 2·T·B·I·h; the hidden one forms M = W_x W_out once per batch (h·I·h), runs
    M z at every step (T·B·h²) and one I-wide product at each end (2·B·I·h, the start counted dense). The
    rest (the step embedding, the inner layers) is the same on both. The hidden chain pays on wide
    catalogues (TikTok: I = 6,710 against h = 1,000, a third of the work); on a few hundred items with
    few steps the direct one is cheaper. Measured on the CPU, the ratio of seconds follows this count
    (README, Performance).
    """
    direct = 2 * steps * batch * n_items * hidden
    in_hidden = hidden * n_items * hidden + steps * batch * hidden * hidden + 2 * batch * n_items * hidden
    return in_hidden < direct


def use_hidden_reverse(mode: str, exact: bool, n_items: int, hidden: int, steps: int, batch: int) -> bool:
    """--reverse: 'direct' never, 'hidden' always (where exact: `check` refuses it elsewhere), 'auto' where it is
    exact and cheaper (`hidden_reverse_is_cheaper`). Both paths give the same rows to float rounding."""
    if mode == "direct" or not exact:
        return False
    return mode == "hidden" or hidden_reverse_is_cheaper(n_items, hidden, steps, batch)


# ---------------------------------------------------------------------------------------------
# DiffMM: one epoch = 1. every modality's denoiser, 2. every modality graph, 3. negatives and the
# recommender (paper Algorithm 1)
# ---------------------------------------------------------------------------------------------

def drop_edges(graph: sp.csr_matrix, keep_rate: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep each stored entry (self-loops included) with probability keep_rate, scaling kept ones by 1/keep_rate."""
    if keep_rate >= 1.0:
        return graph
    coo = graph.tocoo()
    keep = rng.random(coo.nnz) < keep_rate
    return sp.csr_matrix((coo.data[keep] / keep_rate, (coo.row[keep], coo.col[keep])), shape=graph.shape)


def fused_view_graph(train: sp.csr_matrix, top: np.ndarray, ratio: float, train_keep: float, keep_rate: float,
                     rng: np.random.Generator) -> sp.csr_matrix:
    """The graph of one modality's contrastive view for --fusion_ratio r > 0 (paper Figure 4).

    Every user independently, with probability r, takes its train edges, each kept with probability
    `train_keep` (random edge-drop augmentation); otherwise it takes its rebuild_k generated edges
    `top[u]`. The union is normalised like `adj` and edge-dropped with keepRate like the generated graph.
    r = 1: a randomly dropped train graph only; r = 0 would be the generated graph (not called then).
    """
    n_users, n_items = train.shape
    random_users = rng.random(n_users) < ratio
    gen_users = np.repeat(np.arange(n_users), top.shape[1])
    keep_gen = ~random_users[gen_users]
    coo = train.tocoo()
    keep_train = random_users[coo.row] & (rng.random(coo.nnz) < train_keep)
    users = np.concatenate([gen_users[keep_gen], coo.row[keep_train]])
    items = np.concatenate([top.ravel()[keep_gen], coo.col[keep_train]])
    return drop_edges(normalized_graph(users, items, n_users, n_items), keep_rate, rng)


class DiffMM(RecModel):
    """The recommender, one graph generator per modality (a denoiser, or a VGAE with --ablation no_dm),
    their Adam optimisers, and the epoch of the authors' code."""

    name = "diffmm"
    paper = "DiffMM: multi-modal diffusion model for recommendation (Jiang et al., ACM MM 2024)"
    needs_features = True
    phases = ("denoiser", "rebuild", "negatives", "recommender")
    loss_phases = {"loss": "recommender", "denoiser_loss": "denoiser"}
    recommender_class = Recommender  # a subclass's recommender (MDMNS: its views), built with the same arguments

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        features = {m: torch.from_numpy(f) for m, f in data.features.items()}
        self.recommender = self.recommender_class(data.n_users, data.n_items, features, args.latdim, args.gnn_layer,
                                                  args.trans, args.ris_lambda, args.ris_adj_lambda).to(device)
        if args.ablation == "no_dm":  # Table 3 "w/o DM": a VGAE per modality generates the graphs
            pos_weight = (data.n_users * data.n_items - data.train.nnz) / max(data.train.nnz, 1)
            self.denoisers = nn.ModuleDict({
                m: VGAE(data.n_users, args.latdim, args.latdim, args.latdim, pos_weight) for m in data.modalities
            }).to(device)
        else:
            self.denoisers = nn.ModuleDict({
                m: Denoiser(data.n_items, args.dims, args.d_emb_size, args.norm) for m in data.modalities
            }).to(device)
        self.plain = args.kernels == "plain"  # the reference path of `Experiments.benchmark --compare`
        self.adj = Graph(train_graph(data.train), device, symmetric=True, plain=self.plain)
        self.diffusion = GaussianDiffusion(args.noise_scale, args.noise_min, args.noise_max, args.steps, device)
        self.optimizer = torch.optim.Adam(self.recommender.parameters(), lr=args.lr, weight_decay=0)
        self.denoiser_optimizers = {m: torch.optim.Adam(d.parameters(), lr=args.lr, weight_decay=0)
                                    for m, d in self.denoisers.items()}
        self.rng = np.random.default_rng(args.seed)
        self.pairs = train_pairs(data.train)
        self.user_rows = DeviceRows(data.train, device)  # every user's train row, gathered per batch on the device
        # the reverse process in the denoiser's hidden space where that is exact and cheaper (p_sample_hidden)
        self.hidden_reverse = use_hidden_reverse(args.reverse, not args.norm and not args.sampling_noise,
                                                 data.n_items, args.dims[-1], args.steps, args.batch)
        # the last rebuild: per modality its graphs ("full", "dropped", "view") and top items (U x rebuild_k)
        self.graphs: Dict[str, Dict[str, Graph]] = {}
        self.generated: Dict[str, np.ndarray] = {}

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        from Params import add_diffmm_args
        add_diffmm_args(parser)

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        if args.rebuild_k > data.n_items:
            return f"--rebuild_k {args.rebuild_k} exceeds the {data.n_items} items of {data.name}."
        if args.reverse == "hidden" and (args.norm or args.sampling_noise):
            return ("--reverse hidden is exact only with --norm false and --sampling_noise false; use --reverse auto "
                    "or direct.")
        return None

    # --- the epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Dict[str, Dict[str, float]]:
        with timer.phase("denoiser"):
            denoiser_loss = self.train_denoisers()
        with timer.phase("rebuild"):
            self.graphs = self.rebuild_graphs()
        with timer.phase("negatives"):
            negatives = sample_negatives(self.data.train, self.pairs[0], self.rng)
        with timer.phase("recommender"):
            losses = self.train_recommender({m: g["dropped"] for m, g in self.graphs.items()}, negatives,
                                            view_graphs={m: g["view"] for m, g in self.graphs.items()})
        return {"loss": losses, "denoiser_loss": denoiser_loss}

    def generator_loss(self, generator: nn.Module, x0: torch.Tensor, rows: Union[np.ndarray, torch.Tensor],
                       modal_feat: torch.Tensor) -> torch.Tensor:
        """The loss of one modality's graph generator on a batch of user rows x0.

        Diffusion: mean ELBO + e_loss * mean MSI (Eq. 24); `--ablation no_msi`: the mean ELBO only.
        `--ablation no_dm`: the VGAE's reconstruction + KL loss on the same rows (VGAE).
        Recommender tables and `modal_feat` are read detached.
        """
        if isinstance(generator, VGAE):
            return generator.loss(self.adj, self.recommender.user_emb.detach(), modal_feat,
                                  torch.as_tensor(rows, device=self.device), x0)
        elbo, msi = self.diffusion.training_losses(generator, x0, self.recommender.item_emb.detach(), modal_feat)
        if self.args.ablation == "no_msi":
            return elbo.mean()
        return elbo.mean() + self.args.e_loss * msi.mean()

    def train_denoisers(self) -> Dict[str, float]:
        """One pass of every denoiser (or VGAE with --ablation no_dm) over all users; mean loss per modality."""
        self.denoisers.train()
        with torch.no_grad():  # the recommender's tables are read, not trained, here
            modal_feats = self.recommender.modal_features()
        totals = {m: torch.zeros((), device=self.device) for m in self.data.modalities}
        batches = user_batches(self.data.n_users, self.args.batch, True)
        for idx in self.progress(device_batches(batches, self.device), "denoisers"):
            x0 = self.user_rows.dense(idx)
            loss = 0.0
            for m, denoiser in self.denoisers.items():
                self.denoiser_optimizers[m].zero_grad(set_to_none=True)
                with self.autocast():
                    loss_m = self.generator_loss(denoiser, x0, idx, modal_feats[m])
                totals[m] += loss_m.detach()
                loss = loss + loss_m
            loss.backward()
            for opt in self.denoiser_optimizers.values():
                opt.step()
        return {m: float(v) / len(batches) for m, v in totals.items()}

    @torch.no_grad()
    def generate_top_items(self, denoiser: nn.Module, modality: Optional[str] = None) -> torch.Tensor:
        """The top rebuild_k items of every user's denoised train row (U x k indices; Eq. 12, §2.2.3).

        With a VGAE (--ablation no_dm; `modality` names its features): every user's top rebuild_k items
        by the decoder score σ(z_u · z_i), z = μ of the encoder.
        """
        denoiser.eval()
        if isinstance(denoiser, VGAE):
            user_z, item_z = denoiser.embeddings(self.adj, self.recommender.user_emb.detach(),
                                                 self.recommender.modal_features()[modality])
        # one buffer for all users: per-batch results kept between the batch x items tensors fragment the heap
        top = torch.empty(self.data.n_users, self.args.rebuild_k, dtype=torch.long, device=self.device)
        batches = user_batches(self.data.n_users, self.args.batch, False)
        for rows, idx in zip(self.progress(batches, "rebuild"), device_batches(batches, self.device)):
            if isinstance(denoiser, VGAE):
                scores = user_z[idx] @ item_z.T
            elif self.hidden_reverse:
                with self.autocast():
                    scores = self.diffusion.p_sample_hidden(denoiser, self.user_rows.dense(idx),
                                                            self.args.sampling_steps, self.user_rows.csr(idx, rows))
            else:
                with self.autocast():
                    scores = self.diffusion.p_sample(denoiser, self.user_rows.dense(idx), self.args.sampling_steps,
                                                     self.args.sampling_noise)
            top[idx] = torch.topk(scores, self.args.rebuild_k, dim=1).indices
        denoiser.train()
        return top

    def rebuild_graphs(self) -> Dict[str, Dict[str, Graph]]:
        """Every modality graph Âm from its generator, normalised like `adj`, then edge-dropped (keepRate).

        Returns, per modality, the dropped graph (used in training), the full one (for --eval_graph full)
        and the contrastive views' graph ("view": the dropped graph itself unless --fusion_ratio > 0).
        The top items are kept in `self.generated`.
        """
        n_users, n_items = self.data.n_users, self.data.n_items
        args = self.args
        graphs = {}
        for m, denoiser in self.denoisers.items():
            top = self.generate_top_items(denoiser, m).cpu().numpy()
            self.generated[m] = top
            users = np.repeat(np.arange(n_users), top.shape[1])
            full = normalized_graph(users, top.ravel(), n_users, n_items)
            graphs[m] = {"full": full, "dropped": drop_edges(full, args.keepRate, self.rng)}
            if args.fusion_ratio > 0:
                graphs[m]["view"] = fused_view_graph(self.data.train, top, args.fusion_ratio, args.fusion_keep,
                                                     args.keepRate, self.rng)
        out = {m: {k: Graph(g, self.device, plain=self.plain) for k, g in pair.items()} for m, pair in graphs.items()}
        for pair in out.values():
            pair.setdefault("view", pair["dropped"])  # r = 0: the views use Âm itself
        return out

    def train_recommender(self, modal_graphs: Dict[str, Graph], negatives: np.ndarray,
                          view_graphs: Optional[Dict[str, Graph]] = None) -> Dict[str, float]:
        """BPR + λ2 reg + λ1 contrastive loss (Eq. 26) over shuffled batches of (user, pos, neg).

        `view_graphs`: the contrastive views' graphs (--fusion_ratio); None = the modal graphs.
        `--ablation no_cl`: no contrastive term and the views are not computed.
        """
        args = self.args
        users = torch.from_numpy(self.pairs[0]).to(self.device)
        positives = torch.from_numpy(self.pairs[1]).to(self.device)
        negatives = torch.from_numpy(negatives).to(self.device)
        with_views = args.ssl_reg != 0 and args.ablation != "no_cl"
        self.recommender.train()
        totals = torch.zeros(3, device=self.device)
        batches = user_batches(len(users), args.batch, True)
        for idx in self.progress(device_batches(batches, self.device), "recommender"):
            u, p, n = users[idx], positives[idx], negatives[idx]
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                user_vec, item_vec, views = self.recommender(self.adj, modal_graphs, with_views=with_views,
                                                             view_graphs=view_graphs)
            user_vec, item_vec = user_vec.float(), item_vec.float()
            bpr = bpr_loss(user_vec, item_vec, u, p, n, divisor=args.batch)
            reg = args.reg * self.recommender.reg_loss()
            cl = (args.ssl_reg * contrastive_loss(user_vec, item_vec, [(a.float(), b.float()) for a, b in views],
                                                  u, p, args.cl_method, args.temp, self.plain)
                  if with_views else torch.zeros((), device=self.device))
            (bpr + reg + cl).backward()
            self.optimizer.step()
            totals += torch.stack([bpr.detach(), reg.detach(), cl.detach()])
        bpr, reg, cl = (totals / len(batches)).tolist()
        return {"bpr": bpr, "reg": reg, "cl": cl, "loss": bpr + reg + cl}

    # --- evaluation and outputs -----------------------------------------------------------------
    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The main view with this epoch's generated graphs (dropped, as the authors; --eval_graph full)."""
        with self.autocast():
            user_vec, item_vec, _ = self.recommender(
                self.adj, {m: g[self.args.eval_graph] for m, g in self.graphs.items()})
        return user_vec, item_vec

    def checkpoint_state(self) -> dict:
        """The recommender, the denoisers, and what its scores need besides: the epoch's generated graphs
        used at evaluation (--eval_graph), so a reloaded model scores exactly as it did."""
        graphs = {m: g[self.args.eval_graph].state() for m, g in self.graphs.items()}
        return {"recommender": self.recommender.state_dict(), "denoisers": self.denoisers.state_dict(),
                "eval_graphs": graphs, "generated": {m: torch.from_numpy(t) for m, t in self.generated.items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.recommender.load_state_dict(state["recommender"])
        self.denoisers.load_state_dict(state["denoisers"])
        self.graphs = {m: {self.args.eval_graph: Graph.from_state(g, self.device)}
                       for m, g in state["eval_graphs"].items()}
        self.generated = {m: t.numpy() for m, t in state["generated"].items()}

    def save_artifacts(self, run_dir: Path) -> None:
        """generated_items.npz: the last epoch's top items per modality (U x rebuild_k), for Figure 5."""
        np.savez_compressed(run_dir / "generated_items.npz",
                            **{m: t.astype(np.int32) for m, t in self.generated.items()})
