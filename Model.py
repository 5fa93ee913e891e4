"""DiffMM's three parts: the multi-modal recommender, the denoiser, the Gaussian diffusion (SPEC §3-§5).

Graphs are `Graph` objects: a torch sparse CSR matrix and its transpose, so that products with them
are differentiable in the dense argument at the cost of one more sparse product.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Views = List[Tuple[torch.Tensor, torch.Tensor]]


class _SparseMatmul(torch.autograd.Function):
    """A @ X with the gradient Aᵀ @ G from a precomputed Aᵀ (torch's own CSR backward re-sorts A each call)."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, matrix_t: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        ctx.matrix_t = matrix_t
        with torch.autocast(dense.device.type, enabled=False):  # sparse products stay fp32
            return torch.sparse.mm(matrix, dense.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return None, None, torch.sparse.mm(ctx.matrix_t, grad.float())


class Graph:
    """A sparse square graph on the U+I nodes; `graph @ dense` is differentiable in `dense`."""

    def __init__(self, matrix: sp.csr_matrix, device: torch.device, symmetric: bool = False):
        self.shape = matrix.shape
        self.nnz = matrix.nnz
        self.matrix = _torch_csr(matrix, device)
        self.matrix_t = self.matrix if symmetric else _torch_csr(matrix.T.tocsr(), device)

    def __matmul__(self, dense: torch.Tensor) -> torch.Tensor:
        return _SparseMatmul.apply(self.matrix, self.matrix_t, dense)

    def to_dense(self) -> torch.Tensor:
        return self.matrix.to_dense()


def _torch_csr(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    matrix = matrix.tocsr()
    return torch.sparse_csr_tensor(
        torch.from_numpy(matrix.indptr.astype(np.int64)), torch.from_numpy(matrix.indices.astype(np.int64)),
        torch.from_numpy(matrix.data.astype(np.float32)), size=matrix.shape, device=device,
        check_invariants=False)


# ---------------------------------------------------------------------------------------------
# Recommender (SPEC §3)
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

    def _propagate(self, adj: Graph, x: torch.Tensor) -> torch.Tensor:
        """Σ_{l=0..L} adj^l x: sum-pooled LightGCN propagation on the train graph."""
        layers = [x]
        for _ in range(self.gnn_layer):
            layers.append(adj @ layers[-1])
        return torch.stack(layers).sum(0)

    def forward(self, adj: Graph, modal_graphs: Dict[str, Graph], with_views: bool = False,
                view_graphs: Optional[Dict[str, Graph]] = None) -> Tuple[torch.Tensor, torch.Tensor, Views]:
        """Main-view user and item vectors (`forward_MM`), plus the contrastive views (`forward_cl_MM`).

        Per modality m, with n_m the row-normalised transformed features and Âm the generated graph:
            z_m = adj [Eu; n_m] + adj [ (adj [Eu; n_m])[:U] ; Ei ] + ris_adj_lambda Âm [Eu; Ei]
            H0  = Σ_m softmax(κ)_m z_m;   H = Σ_l adj^l H0 + ω normalise(H0)     (Eq. 23, ω = ris_lambda)
            view_m = Σ_l adj^l (Âm [Eu; n_m])
        The main view and the views share the feature transforms and one propagation (stacked columns).
        `view_graphs` (--fusion_ratio > 0) replaces Âm in the views only; by default the views use Âm.
        """
        d = self.user_emb.shape[1]
        id_nodes = torch.cat([self.user_emb, self.item_emb])
        weights = torch.softmax(self.modal_weight, dim=0)
        features = self.modal_features()

        fused = 0.0
        view_inputs = []
        for k, m in enumerate(self.modalities):
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
            fused = fused + weights[k] * z

        pooled = self._propagate(adj, torch.cat([fused] + view_inputs, dim=1))
        main = pooled[:, :d] + self.ris_lambda * F.normalize(fused)
        views = [(v[: self.n_users], v[self.n_users:]) for v in pooled[:, d:].split(d, dim=1)] if with_views else []
        return main[: self.n_users], main[self.n_users:], views


def bpr_loss(user_vec: torch.Tensor, item_vec: torch.Tensor, users: torch.Tensor, positives: torch.Tensor,
             negatives: torch.Tensor, batch_size: int) -> torch.Tensor:
    """-Σ log σ(s(u, pos) - s(u, neg)) / batch_size (the configured size, as the authors divide)."""
    u = user_vec[users]
    diff = (u * item_vec[positives]).sum(-1) - (u * item_vec[negatives]).sum(-1)
    return -F.logsigmoid(diff).sum() / batch_size


def info_nce(anchor: torch.Tensor, other: torch.Tensor, nodes: torch.Tensor, temp: float) -> torch.Tensor:
    """InfoNCE (Eq. 21): for each batch node n, -log(exp(x_n·y_n/τ) / Σ_v exp(x_n·y_v/τ)), averaged.

    Rows are L2-normalised; the denominator runs over every row v of `other` (all users or all
    items), not only the batch; duplicate nodes in the batch count each time.
    """
    # A node's term depends only on the node: compute it once per distinct node, count it per occurrence.
    unique, occurrence = torch.unique(nodes, return_inverse=True)
    x = F.normalize(anchor[unique])
    y = F.normalize(other)
    positive = (x * y[unique]).sum(-1) / temp
    return (_LogSumExpLogits.apply(x, y, temp) - positive)[occurrence].mean()


class _LogSumExpLogits(torch.autograd.Function):
    """logsumexp_v(x_n · y_v / τ) for every row n, with one batch x N buffer and no pass over it in backward.

    Same value and gradient as `torch.logsumexp(x @ y.T / temp, 1)` in a third fewer passes over the
    batch x N logits, which dominate the recommender's step (N = all users or all items): the softmax
    is one fused kernel, the logsumexp is read off it at the row maximum (max - log p_max), and the
    backward scales the small factors (rows of x and of the result) instead of the big matrix.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, temp: float) -> torch.Tensor:
        logits = (x / temp) @ y.T
        row_max, argmax = logits.max(dim=1, keepdim=True)
        probs = torch.softmax(logits, dim=1)
        ctx.save_for_backward(x, y, probs)
        ctx.temp = temp
        return (row_max - probs.gather(1, argmax).log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, probs = ctx.saved_tensors
        scale = (grad / ctx.temp)[:, None]
        return (probs @ y) * scale, probs.T @ (x * scale), None


def contrastive_loss(user_vec: torch.Tensor, item_vec: torch.Tensor, views: Views, users: torch.Tensor,
                     positives: torch.Tensor, cl_method: int, temp: float) -> torch.Tensor:
    """Cross-modal contrastive loss before the λ1 (ssl_reg) factor (SPEC §4).

    cl_method 0: every unordered pair of modality views; cl_method 1: the main view against each view.
    """
    if cl_method == 0:
        pairs = [(views[a], views[b]) for a in range(len(views)) for b in range(a + 1, len(views))]
    else:
        pairs = [((user_vec, item_vec), view) for view in views]
    loss = user_vec.new_zeros(())
    for (user_a, item_a), (user_b, item_b) in pairs:
        loss = loss + info_nce(user_a, user_b, users, temp) + info_nce(item_a, item_b, positives, temp)
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
# Denoiser (SPEC §5, paper Eq. 13)
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
        first = self.in_layers[0]
        n_items = x.shape[1]
        h = torch.tanh(F.linear(x, first.weight[:, :n_items]) + F.linear(emb, first.weight[:, n_items:], first.bias))
        for layer in self.in_layers[1:]:
            h = torch.tanh(layer(h))
        for layer in self.out_layers[:-1]:
            h = torch.tanh(layer(h))
        return self.out_layers[-1](h)


# ---------------------------------------------------------------------------------------------
# Gaussian diffusion (SPEC §5, paper Eq. 2-14)
# ---------------------------------------------------------------------------------------------

def noise_schedule(noise_scale: float, noise_min: float, noise_max: float, steps: int) -> np.ndarray:
    """β_t (float64): variance_t linear in [s γmin, s γmax], β_t = 1 - ᾱ_t/ᾱ_{t-1} capped at 0.999, β_0 = 1e-4."""
    variance = np.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=np.float64)
    alpha_bar = 1.0 - variance
    betas = np.empty(steps, dtype=np.float64)
    betas[0] = 1.0 - alpha_bar[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    betas[0] = 0.0001  # the authors' beta_fixed
    return betas


class GaussianDiffusion:
    """Forward noising, the ELBO + MSI training loss, and reverse sampling with one shared schedule."""

    def __init__(self, noise_scale: float, noise_min: float, noise_max: float, steps: int, device: torch.device):
        self.noise_scale, self.steps, self.device = noise_scale, steps, device
        betas = torch.tensor(noise_schedule(noise_scale, noise_min, noise_max, steps), dtype=torch.float64)
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

    def training_losses(self, denoiser: Denoiser, x0: torch.Tensor, item_emb: torch.Tensor,
                        modal_feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row ELBO term w_t · mean_i (x0 - x̂0)² (Eq. 11-13) and MSI term mean_d (x̂0 f_m - x0 Ei)² (Eq. 14).

        `item_emb` and `modal_feat` must be detached: the diffusion loss does not train the recommender.
        """
        t = torch.randint(0, self.steps, (x0.shape[0],), device=x0.device)
        x_t = self.q_sample(x0, t) if self.noise_scale != 0 else x0
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
