"""DiffMM (Jiang et al., ACM MM 2024): the multi-modal recommender, the graph generators (the denoiser with the
Gaussian diffusion, both in `Models/diffusion.py`, which MDMNS and DiffRec share; the VGAE of an ablation), and
`DiffMM`, the model the harness trains (one epoch: graph generators, graph rebuild, negatives, recommender), with
its flags and their checks.

Equation numbers are the paper's. Where the default follows the authors' code rather than an equation,
docs/defaults.md says how and why.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from DataHandler import Data
from Models.base import PhaseTimer, RecModel, changed_flags, flag_list
from Models.diffusion import (Denoiser, GaussianDiffusion, add_diffusion_args, check_diffusion_flags, reverse_scorer,
                              use_hidden_reverse)
from Utils.batches import DeviceRows, device_batches, sample_negatives, train_pairs, user_batches
from Utils.flags import unit_float
from Utils.graphs import drop_edges, normalized_graph
from Utils.layers import Graph, bpr_loss, info_nce, propagate
from Utils.memory import linear_entries

Views = List[Tuple[torch.Tensor, torch.Tensor]]

# the flags of the diffusion and its denoiser (`add_diffusion_args`) and the MSI weight: --ablation no_dm reads none
NO_DM_UNUSED = ("dims", "d_emb_size", "norm", "steps", "noise_scale", "noise_min", "noise_max", "sampling_noise",
                "sampling_steps", "reverse", "e_loss")
# what each ablation that leaves flags unread skips, for the warning that names them
ABLATION_SKIPS = {"no_dm": "generates the modality graphs with a VGAE instead of the diffusion model",
                  "no_msi": "drops the MSI term that --e_loss weighs"}


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

    def fuse(self, modal: Sequence[torch.Tensor]) -> torch.Tensor:
        """H0 = Σ_m softmax(κ)_m z_m, the modality views weighted by the softmax of `modal_weight` κ (Eq. 21)."""
        weights = torch.softmax(self.modal_weight, dim=0)
        fused = 0.0
        for k, z in enumerate(modal):
            fused = fused + weights[k] * z
        return fused

    def forward(self, adj: Graph, modal_graphs: Dict[str, Graph], with_views: bool = False,
                view_graphs: Optional[Dict[str, Graph]] = None) -> Tuple[torch.Tensor, torch.Tensor, Views]:
        """Main-view user and item vectors (`forward_MM`), plus the contrastive views (`forward_cl_MM`).

        With z_m and view_m^0 of `modal_embeddings`:
            H0  = Σ_m softmax(κ)_m z_m (`fuse`);   H = Σ_l adj^l H0 + ω normalise(H0)     (Eq. 23, ω = ris_lambda)
            view_m = Σ_l adj^l view_m^0
        The main view and the views share the feature transforms and one propagation (stacked columns).
        `view_graphs` (--fusion_ratio > 0) replaces Âm in the views only; by default the views use Âm.
        """
        d = self.user_emb.shape[1]
        modal, view_inputs = self.modal_embeddings(adj, modal_graphs, with_views, view_graphs)
        fused = self.fuse(modal)
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
# Graph generators: what DiffMM trains and asks for every user's generated items, one per modality
# ---------------------------------------------------------------------------------------------

@dataclass
class GeneratorInputs:
    """What a modality's graph generator reads besides its batch of users, fixed for one pass over them: the train
    graph and rows, the recommender's ID tables and transformed features f_m (detached: the generators do not train
    the recommender) and the model's autocast (--precision)."""

    adj: Graph
    user_rows: DeviceRows
    user_emb: torch.Tensor
    item_emb: torch.Tensor
    modal_feats: Dict[str, torch.Tensor]
    autocast: Callable[[], ContextManager]


# a batch of users (indices on the device, the same on the host) -> their scores over all items (batch x I)
Scores = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


class GraphGenerator(nn.Module):
    """A modality's graph generator (paper §2.2-2.3): a loss on a batch of user rows x0 of the train matrix, and a
    scorer whose top rebuild_k items per user become that modality's generated graph. DiffMM's is the diffusion
    model's denoiser (`DiffusionGenerator`); the w/o-DM ablation's a VGAE (`VGAE`)."""

    def generator_loss(self, inputs: GeneratorInputs, modality: str, x0: torch.Tensor, rows: torch.Tensor
                       ) -> torch.Tensor:
        """The loss trained on the batch of user rows `x0` (users `rows`), a scalar."""
        raise NotImplementedError

    def scorer(self, inputs: GeneratorInputs, modality: str) -> Scores:
        """Called once per graph rebuild, in eval mode and without gradients: the users' scores of every item."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# VGAE graph generator of the "w/o DM" ablation (paper Table 3, Kipf & Welling 2016)
# ---------------------------------------------------------------------------------------------

class VGAE(GraphGenerator):
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

    def generator_loss(self, inputs: GeneratorInputs, modality: str, x0: torch.Tensor, rows: torch.Tensor
                       ) -> torch.Tensor:
        """`loss` on the detached user ID table and the modality's transformed features."""
        return self.loss(inputs.adj, inputs.user_emb, inputs.modal_feats[modality], rows, x0)

    def scorer(self, inputs: GeneratorInputs, modality: str) -> Scores:
        """Every user's decoder logits z_u · z_i (z = μ, encoded once per rebuild): σ keeps their order."""
        user_z, item_z = self.embeddings(inputs.adj, inputs.user_emb, inputs.modal_feats[modality])
        return lambda users, host_rows: user_z[users] @ item_z.T


# ---------------------------------------------------------------------------------------------
# DiffMM's graph generator: the denoiser of the shared diffusion (Models/diffusion.py, Eq. 2-14)
# ---------------------------------------------------------------------------------------------

def msi_weight(args: argparse.Namespace) -> Optional[float]:
    """λ0 of the MSI term (Eq. 24): --e_loss, or None with --ablation no_msi (Table 3 "w/o MSI": the term dropped)."""
    return None if args.ablation == "no_msi" else args.e_loss


def generator_objective(elbo: torch.Tensor, msi: torch.Tensor, weight: Optional[float]) -> torch.Tensor:
    """A modality's diffusion loss from the per-row terms: mean ELBO + λ0 · mean MSI (Eq. 24), the ELBO alone where
    `weight` (`msi_weight`) is None."""
    if weight is None:
        return elbo.mean()
    return elbo.mean() + weight * msi.mean()


class DiffusionGenerator(Denoiser, GraphGenerator):
    """DiffMM's graph generator of one modality: the denoiser (Eq. 13) with the Gaussian diffusion every modality
    shares (Eq. 2-14). Loss: `generator_objective` (Eq. 24; `msi_weight` None: the ELBO only, --ablation no_msi).
    Scores: the reverse process from the user's train row (§2.2.3, sampling_steps T' > 0: from x_{T'}), in the
    denoiser's hidden space where that is exact and cheaper (`use_hidden_reverse`). Its parameters, and so its
    checkpoint keys, are the denoiser's."""

    def __init__(self, n_items: int, dims: Sequence[int], emb_size: int, norm: bool, diffusion: GaussianDiffusion,
                 msi_weight: Optional[float], sampling_steps: int, sampling_noise: bool, hidden_reverse: bool):
        super().__init__(n_items, dims, emb_size, norm)
        self.diffusion, self.msi_weight = diffusion, msi_weight
        self.sampling_steps, self.sampling_noise, self.hidden_reverse = sampling_steps, sampling_noise, hidden_reverse

    def generator_loss(self, inputs: GeneratorInputs, modality: str, x0: torch.Tensor, rows: torch.Tensor
                       ) -> torch.Tensor:
        elbo, msi = self.diffusion.training_losses(self, x0, inputs.item_emb, inputs.modal_feats[modality])
        return generator_objective(elbo, msi, self.msi_weight)

    def scorer(self, inputs: GeneratorInputs, modality: str) -> Scores:
        return reverse_scorer(self.diffusion, self, inputs.user_rows, self.sampling_steps, self.sampling_noise,
                              self.hidden_reverse, inputs.autocast)


# ---------------------------------------------------------------------------------------------
# DiffMM: one epoch = 1. every modality's graph generator, 2. every modality graph, 3. negatives and the
# recommender (paper Algorithm 1); the phase and loss names keep "denoiser" (metrics.jsonl, figures)
# ---------------------------------------------------------------------------------------------

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
    their Adam optimisers, and the epoch of the authors' code. A variant (MDMNS) overrides the hooks
    (`generator_inputs`, `generator_terms`, `generator_scorer`, `recommender_terms`, `reverse_reads_x_t`), not the
    loops."""

    name = "diffmm"
    paper = "DiffMM: multi-modal diffusion model for recommendation (Jiang et al., ACM MM 2024)"
    needs_features = True
    phases = ("denoiser", "rebuild", "negatives", "recommender")
    loss_phases = {"loss": "recommender", "denoiser_loss": "denoiser"}
    recommender_class = Recommender  # a subclass's recommender (MDMNS: its views), built with the same arguments
    # the authors' README: one command per dataset
    presets = {
        "tiktok": ["--reg", "1e-4", "--ssl_reg", "1e-2", "--epoch", "50", "--trans", "1", "--e_loss", "0.1",
                   "--cl_method", "1"],
        "baby": ["--reg", "1e-5", "--ssl_reg", "1e-1", "--keepRate", "1", "--e_loss", "0.01"],
        "sports": ["--reg", "1e-6", "--ssl_reg", "1e-2", "--temp", "0.1", "--ris_lambda", "0.1", "--e_loss", "0.5",
                   "--keepRate", "1", "--trans", "1"],
    }
    published = {"tiktok": (0.1129, 0.0456, 0.0056), "baby": (0.0975, 0.0411, 0.0051),
                 "sports": (0.1017, 0.0458, 0.0054)}
    published_in = "DiffMM Table 2"
    # the paper's Table 3 (Recall@20, NDCG@20 per ablation) and Table 4 (per τ = --temp, λ1 = --ssl_reg)
    published_ablations = {
        "tiktok": {"no_cl": (0.1026, 0.0420), "no_dm": (0.1075, 0.0433), "no_msi": (0.1086, 0.0426),
                   "none": (0.1129, 0.0456)},
        "baby": {"no_cl": (0.0929, 0.0388), "no_dm": (0.0935, 0.0402), "no_msi": (0.0970, 0.0408),
                 "none": (0.0975, 0.0411)},
        "sports": {"no_cl": (0.0942, 0.0418), "no_dm": (0.0980, 0.0440), "no_msi": (0.0996, 0.0445),
                   "none": (0.1017, 0.0458)},
    }
    _T4 = [(t, l) for t in (0.1, 0.5, 1.0) for l in (1.0, 0.1, 0.01)]
    published_temp_ssl = {
        "tiktok": dict(zip(_T4, [(0.0474, 0.0198), (0.0411, 0.0186), (0.0987, 0.0417), (0.0722, 0.0313),
                                 (0.0849, 0.0373), (0.1129, 0.0456), (0.0740, 0.0323), (0.0983, 0.0410),
                                 (0.1064, 0.0432)])),
        "baby": dict(zip(_T4, [(0.0722, 0.0309), (0.0871, 0.0372), (0.0933, 0.0393), (0.0924, 0.0399),
                               (0.0975, 0.0411), (0.0944, 0.0393), (0.0959, 0.0400), (0.0956, 0.0401),
                               (0.0940, 0.0389)])),
        "sports": dict(zip(_T4, [(0.0828, 0.0364), (0.0945, 0.0421), (0.1017, 0.0458), (0.0955, 0.0425),
                                 (0.0996, 0.0441), (0.0956, 0.0427), (0.0971, 0.0431), (0.0961, 0.0426),
                                 (0.0943, 0.0422)])),
    }

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        features = {m: torch.from_numpy(f) for m, f in data.features.items()}
        self.recommender = self.recommender_class(data.n_users, data.n_items, features, args.latdim, args.gnn_layer,
                                                  args.trans, args.ris_lambda, args.ris_adj_lambda).to(device)
        self.pairs = train_pairs(data.train)
        self.adj = self.as_graph(normalized_graph(*self.pairs, data.n_users, data.n_items), symmetric=True)
        self.diffusion = GaussianDiffusion(args.noise_scale, args.noise_min, args.noise_max, args.steps, device)
        self.user_rows = DeviceRows(data.train, device)  # every user's train row, gathered per batch on the device
        # the reverse process in the denoiser's hidden space where that is exact and cheaper (p_sample_hidden)
        self.hidden_reverse = use_hidden_reverse(args, data.n_items, args.batch, self.reverse_reads_x_t(args, data))
        self.generators = nn.ModuleDict({m: self.build_generator() for m in data.modalities}).to(device)
        self.optimizer = torch.optim.Adam(self.recommender.parameters(), lr=args.lr, weight_decay=0)
        self.generator_optimizers = {m: torch.optim.Adam(g.parameters(), lr=args.lr, weight_decay=0)
                                     for m, g in self.generators.items()}
        self.rng = np.random.default_rng(args.seed)
        # the last rebuild: per modality its graphs ("full", "dropped", "view") and top items (U x rebuild_k)
        self.graphs: Dict[str, Dict[str, Graph]] = {}
        self.generated: Dict[str, np.ndarray] = {}

    def build_generator(self) -> GraphGenerator:
        """One modality's graph generator: the denoiser of the diffusion model, or with --ablation no_dm (Table 3
        "w/o DM") a VGAE."""
        args, data = self.args, self.data
        if args.ablation == "no_dm":
            pos_weight = (data.n_users * data.n_items - data.train.nnz) / max(data.train.nnz, 1)
            return VGAE(data.n_users, args.latdim, args.latdim, args.latdim, pos_weight)
        return DiffusionGenerator(data.n_items, args.dims, args.d_emb_size, args.norm, self.diffusion,
                                  msi_weight(args), args.sampling_steps, args.sampling_noise, self.hidden_reverse)

    @classmethod
    def reverse_reads_x_t(cls, args: argparse.Namespace, data: Data) -> bool:
        """Hook: whether the graph rebuild's reverse steps feed the denoiser x_t itself, which the hidden-space chain
        needs (`use_hidden_reverse`). DiffMM's do; MDMNS's with --guide_at_sampling feed it guided scores."""
        return True

    @classmethod
    def parameter_sizes(cls, args: argparse.Namespace, n_users: int, n_items: int, widths: Dict[str, int]
                        ) -> Dict[str, int]:
        """RecModel's tables plus one denoiser per modality, I + emb -> dims -> I (Eq. 13): I x dims[0] twice."""
        parts = super().parameter_sizes(args, n_users, n_items, widths)
        if getattr(args, "ablation", "none") != "no_dm":
            sizes = [n_items + args.d_emb_size, *args.dims[::-1], *args.dims[1:], n_items]
            parts.update({f"{m} denoiser ({' -> '.join(f'{n:,}' for n in sizes)})": linear_entries(sizes)
                          for m in widths})
        return parts

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        """DiffMM's flags: the authors' names, types and defaults (HKUDS/DiffMM at fae20e6, Params.py), two of their
        parsing defects fixed (`Utils/flags.py`: `--norm False` was on, `--dims` was eval-ed), and ours after them."""
        g = parser.add_argument_group("diffmm: recommender")
        g.add_argument("--reg", default=1e-5, type=float, help="λ2: weight decay on the ID embedding tables")
        g.add_argument("--latdim", default=64, type=int, help="d: embedding size")
        g.add_argument("--gnn_layer", default=1, type=int, help="L: propagation layers on the train graph")
        g.add_argument("--trans", default=0, type=int, choices=[0, 1, 2],
                       help="feature transform: 0 = LeakyReLU(F W), 1 = Linear(F), 2 = image as 0, others as 1")
        g.add_argument("--ris_lambda", default=0.5, type=float, help="ω (Eq. 23): weight of the normalised fused view")
        g.add_argument("--ris_adj_lambda", default=0.2, type=float,
                       help="weight of the generated-graph term per modality")
        g.add_argument("--keepRate", default=0.5, type=float, help="edge keep rate of the generated graphs")
        g.add_argument("--eval_graph", default="dropped", choices=["dropped", "full"],
                       help="generated graphs used at evaluation: 'dropped' (authors: after the random edge drop) or "
                            "'full' (the same graphs before the drop, so evaluation is not random)")

        g = parser.add_argument_group("diffmm: contrastive learning")
        g.add_argument("--ssl_reg", default=1e-2, type=float, help="λ1: weight of the contrastive loss")
        g.add_argument("--temp", default=0.5, type=float, help="τ: InfoNCE temperature")
        g.add_argument("--cl_method", default=0, type=int, choices=[0, 1],
                       help="0 = modality views contrasted pairwise; 1 = main view as anchor")

        g = parser.add_argument_group("diffmm: diffusion")
        add_diffusion_args(g)   # --dims, --d_emb_size, --norm, --steps, --noise_*, --sampling_*, --reverse
        g.add_argument("--rebuild_k", default=1, type=int, help="k: items kept per user in a generated graph")
        g.add_argument("--e_loss", default=0.1, type=float,
                       help="λ0: weight of the MSI loss (Eq. 14; given with --ablation no_msi or no_dm, a warning says "
                            "it does nothing)")

        g = parser.add_argument_group("diffmm: experiments", "the paper's ablations and fusion ratio "
                                                             "(docs/experiments.md)")
        g.add_argument("--ablation", default="none", choices=["none", "no_cl", "no_msi", "no_dm"],
                       help="paper Table 3: no_cl = no contrastive term (views not computed); no_msi = the MSI term "
                            "of the diffusion loss dropped (as e_loss 0); no_dm = a VGAE per modality (Kipf & "
                            "Welling 2016) generates the modality graphs instead of the diffusion model. The "
                            "diffusion's flags given with no_dm, or --e_loss with no_msi, do nothing: a warning "
                            "names them (a value other than the default's or --preset's counts as given)")
        g.add_argument("--fusion_ratio", default=0.0, type=unit_float,
                       help="paper Figure 4: graphs of the contrastive views only (not the main view). Per epoch, "
                            "modality and user, with probability r the user's view edges are its train edges, each "
                            "kept with probability --fusion_keep (random edge drop), else its rebuild_k generated "
                            "edges; the union is normalised and edge-dropped (keepRate) like the generated graph. "
                            "0 = the generated graph itself (diffusion only), 1 = randomly dropped train graph only")
        g.add_argument("--fusion_keep", default=0.5, type=unit_float,
                       help="paper Figure 4: keep probability of each train edge in the random augmentation used by "
                            "--fusion_ratio > 0 (given with --fusion_ratio 0, a warning says it does nothing)")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        """The first of DiffMM's flags whose value cannot give a meaningful run on any data, as one sentence: the
        diffusion's (`check_diffusion_flags`), then the recommender's and the graphs'."""
        problem = check_diffusion_flags(args)
        if problem:
            return problem
        for name in ("latdim", "rebuild_k"):
            if getattr(args, name) < 1:
                return f"--{name} must be at least 1, got {getattr(args, name)}."
        if args.gnn_layer < 0:
            return f"--gnn_layer must be 0 or more, got {args.gnn_layer}."
        if not 0.0 < args.keepRate <= 1.0:
            return f"--keepRate must be in (0, 1] (the share of generated edges kept), got {args.keepRate}."
        if not args.temp > 0.0:
            return f"--temp must be positive (InfoNCE divides by it), got {args.temp}."
        return None

    @classmethod
    def unused_with_ablation(cls, args: argparse.Namespace) -> Tuple[str, ...]:
        """The flags that --ablation makes do nothing: with no_dm every flag of the diffusion and its denoiser (a
        VGAE generates the modality graphs), with no_msi --e_loss (the MSI term is dropped)."""
        return {"no_dm": NO_DM_UNUSED, "no_msi": ("e_loss",)}.get(args.ablation, ())

    @classmethod
    def flag_warnings(cls, args: argparse.Namespace) -> List[str]:
        """Flags given that do nothing, one sentence each (warned, not refused: the ablation's or the default's
        run is what was asked; `changed_flags` says what "given" means): those of `unused_with_ablation`, and
        --fusion_keep with --fusion_ratio 0."""
        warnings = []
        unused = changed_flags(args, cls.unused_with_ablation(args))
        if unused:
            does = "does" if len(unused) == 1 else "do"
            warnings.append(f"{flag_list(unused)} {does} nothing with --ablation {args.ablation}, which "
                            f"{ABLATION_SKIPS[args.ablation]} (leave {'it' if len(unused) == 1 else 'them'} out, or "
                            f"run another --ablation).")
        if args.fusion_ratio == 0 and changed_flags(args, ["fusion_keep"]):
            warnings.append(f"--fusion_keep {args.fusion_keep} does nothing with --fusion_ratio 0: it is the keep "
                            f"probability of the train edges that --fusion_ratio > 0 mixes into the views.")
        return warnings

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        """`check_flags`, then what depends on `data`, as one sentence."""
        problem = super().check(args, data)
        if problem:
            return problem
        if args.rebuild_k > data.n_items:
            return f"--rebuild_k {args.rebuild_k} exceeds the {data.n_items} items of {data.name}."
        return None

    # --- the epoch (paper Algorithm 1) ----------------------------------------------------------
    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Dict[str, Dict[str, float]]:
        with timer.phase("denoiser"):
            generator_loss = self.train_generators()
        with timer.phase("rebuild"):
            self.graphs = self.rebuild_graphs()
        with timer.phase("negatives"):
            negatives = sample_negatives(self.data.train, self.pairs[0], self.rng)
        with timer.phase("recommender"):
            losses = self.train_recommender({m: g["dropped"] for m, g in self.graphs.items()}, negatives,
                                            view_graphs={m: g["view"] for m, g in self.graphs.items()})
        return {"loss": losses, "denoiser_loss": generator_loss}

    # the hooks a variant overrides (MDMNS): the generators' inputs, loss terms and scores, and the recommender's
    # loss terms of one batch; the loops that call them are the ones below
    @torch.no_grad()
    def generator_inputs(self) -> GeneratorInputs:
        """What every generator reads in one pass (training or rebuild): the recommender's tables, detached."""
        return GeneratorInputs(self.adj, self.user_rows, self.recommender.user_emb.detach(),
                               self.recommender.item_emb.detach(), self.recommender.modal_features(), self.autocast)

    def generator_terms(self, modality: str, inputs: GeneratorInputs, x0: torch.Tensor, users: torch.Tensor
                        ) -> Dict[str, torch.Tensor]:
        """Hook: one modality's loss on a batch of user rows, {modality: the loss trained}, plus any terms logged
        only (MDMNS's `<modality>_extra`). Diffusion (Eq. 24) or, with --ablation no_dm, the VGAE's."""
        return {modality: self.generators[modality].generator_loss(inputs, modality, x0, users)}

    def generator_scorer(self, modality: str, inputs: GeneratorInputs) -> Scores:
        """Hook: the function that scores a batch of users' items at the graph rebuild (in eval mode)."""
        return self.generators[modality].scorer(inputs, modality)

    def recommender_terms(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                          modal_graphs: Dict[str, Graph], view_graphs: Optional[Dict[str, Graph]]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook: (BPR, λ2 reg, λ1 contrastive) of one batch of (user, pos, neg) (Eq. 25-26, 18-19).

        `--ablation no_cl` or ssl_reg 0: no contrastive term and the views are not computed.
        """
        args = self.args
        with_views = args.ssl_reg != 0 and args.ablation != "no_cl"
        with self.autocast():
            user_vec, item_vec, views = self.recommender(self.adj, modal_graphs, with_views=with_views,
                                                         view_graphs=view_graphs)
        user_vec, item_vec = user_vec.float(), item_vec.float()
        bpr = bpr_loss(user_vec, item_vec, users, positives, negatives, divisor=args.batch)
        reg = args.reg * self.recommender.reg_loss()
        cl = (args.ssl_reg * contrastive_loss(user_vec, item_vec, [(a.float(), b.float()) for a, b in views],
                                              users, positives, args.cl_method, args.temp, self.plain)
              if with_views else torch.zeros((), device=self.device))
        return bpr, reg, cl

    def train_generators(self) -> Dict[str, float]:
        """One pass of every modality's graph generator over all users, in shuffled batches of user rows: per batch
        the sum of the modalities' losses, one step of each generator's Adam. Returns the mean of each term."""
        self.generators.train()
        inputs = self.generator_inputs()
        totals: Dict[str, torch.Tensor] = {}
        batches = user_batches(self.data.n_users, self.args.batch, True)
        for users in self.progress(device_batches(batches, self.device), "denoisers"):
            x0 = self.user_rows.dense(users)
            loss = 0.0
            for m in self.generators:
                self.generator_optimizers[m].zero_grad(set_to_none=True)
                with self.autocast():
                    terms = self.generator_terms(m, inputs, x0, users)
                for key, value in terms.items():
                    totals.setdefault(key, torch.zeros((), device=self.device)).add_(value.detach())
                loss = loss + terms[m]
            loss.backward()
            for opt in self.generator_optimizers.values():
                opt.step()
        return {key: float(v) / len(batches) for key, v in totals.items()}

    @torch.no_grad()
    def generate_top_items(self, modality: str, inputs: Optional[GeneratorInputs] = None) -> torch.Tensor:
        """The top rebuild_k items of every user by its modality generator's scores (U x k indices; Eq. 12,
        §2.2.3): the denoised train row, or with --ablation no_dm the VGAE's decoder score σ(z_u · z_i)."""
        generator = self.generators[modality]
        generator.eval()
        score = self.generator_scorer(modality, inputs or self.generator_inputs())
        # one buffer for all users: per-batch results kept between the batch x items tensors fragment the heap
        top = torch.empty(self.data.n_users, self.args.rebuild_k, dtype=torch.long, device=self.device)
        batches = user_batches(self.data.n_users, self.args.batch, False)
        for rows, users in zip(self.progress(batches, "rebuild"), device_batches(batches, self.device)):
            top[users] = torch.topk(score(users, rows), self.args.rebuild_k, dim=1).indices
        generator.train()
        return top

    def rebuild_graphs(self) -> Dict[str, Dict[str, Graph]]:
        """Every modality graph Âm from its generator, normalised like `adj`, then edge-dropped (keepRate).

        Returns, per modality, the dropped graph (used in training), the full one (for --eval_graph full)
        and the contrastive views' graph ("view": the dropped graph itself unless --fusion_ratio > 0).
        The top items are kept in `self.generated`.
        """
        n_users, n_items = self.data.n_users, self.data.n_items
        args = self.args
        inputs = self.generator_inputs()
        graphs = {}
        for m in self.generators:
            top = self.generate_top_items(m, inputs).cpu().numpy()
            self.generated[m] = top
            users = np.repeat(np.arange(n_users), top.shape[1])
            full = normalized_graph(users, top.ravel(), n_users, n_items)
            graphs[m] = {"full": full, "dropped": drop_edges(full, args.keepRate, self.rng)}
            if args.fusion_ratio > 0:
                graphs[m]["view"] = fused_view_graph(self.data.train, top, args.fusion_ratio, args.fusion_keep,
                                                     args.keepRate, self.rng)
        out = {m: {k: self.as_graph(g) for k, g in pair.items()} for m, pair in graphs.items()}
        for pair in out.values():
            pair.setdefault("view", pair["dropped"])  # r = 0: the views use Âm itself
        return out

    def train_recommender(self, modal_graphs: Dict[str, Graph], negatives: np.ndarray,
                          view_graphs: Optional[Dict[str, Graph]] = None) -> Dict[str, float]:
        """The recommender's loss (`recommender_terms`) over shuffled batches of (user, pos, neg), one Adam step each;
        the mean of each term. `view_graphs`: the contrastive views' graphs (--fusion_ratio); None = the modal
        graphs."""
        users = torch.from_numpy(self.pairs[0]).to(self.device)
        positives = torch.from_numpy(self.pairs[1]).to(self.device)
        negatives = torch.from_numpy(negatives).to(self.device)
        self.recommender.train()
        totals = torch.zeros(3, device=self.device)
        batches = user_batches(len(users), self.args.batch, True)
        for idx in self.progress(device_batches(batches, self.device), "recommender"):
            self.optimizer.zero_grad(set_to_none=True)
            bpr, reg, cl = self.recommender_terms(users[idx], positives[idx], negatives[idx], modal_graphs,
                                                  view_graphs)
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

    # keys of checkpoints saved before the graph generators were named so (a VGAE is no denoiser)
    OLD_KEYS = {"denoisers": "generators", "denoiser_optimizers": "generator_optimizers"}

    def checkpoint_state(self) -> dict:
        """The recommender, the graph generators, and what its scores need besides: the epoch's generated graphs
        used at evaluation (--eval_graph), so a reloaded model scores exactly as it did."""
        graphs = {m: g[self.args.eval_graph].state() for m, g in self.graphs.items()}
        return {"recommender": self.recommender.state_dict(), "generators": self.generators.state_dict(),
                "eval_graphs": graphs, "generated": {m: torch.from_numpy(t) for m, t in self.generated.items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        state = {self.OLD_KEYS.get(k, k): v for k, v in state.items()}
        self.recommender.load_state_dict(state["recommender"])
        self.generators.load_state_dict(state["generators"])
        self.graphs = {m: {self.args.eval_graph: Graph.from_state(g, self.device, self.plain)}
                       for m, g in state["eval_graphs"].items()}
        self.generated = {m: t.numpy() for m, t in state["generated"].items()}

    def load_training_state(self, state: dict) -> None:
        stateful = {self.OLD_KEYS.get(k, k): v for k, v in state["stateful"].items()}
        super().load_training_state(dict(state, stateful=stateful))

    def save_artifacts(self, run_dir: Path) -> None:
        """generated_items.npz: the last epoch's top items per modality (U x rebuild_k), for Figure 5."""
        np.savez_compressed(run_dir / "generated_items.npz",
                            **{m: t.astype(np.int32) for m, t in self.generated.items()})
