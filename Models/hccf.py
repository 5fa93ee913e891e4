"""HCCF: hypergraph contrastive collaborative filtering (Xia et al., SIGIR 2022), as the authors' TensorFlow code
computes it (akaxlh/HCCF at 44fd819, `labcode_efficient.py` with `Params.py`), with a flag for every place
where the same lab's PyTorch HCCF in SSLRec (HKUDS/SSLRec at 7597c31, `models/general_cf/hccf.py`) computes
otherwise. docs/models/hccf.md cites both at file:line.

Per layer l = 0..L-1, from E_l = [E^u_l; E^i_l] (E_0 = the ID tables, d = `--latdim`):
- local (paper Eq. 1): Z^u_l = σ(Ā_l E^i_l), Z^i_l = σ(Ā'_lᵀ E^u_l), Ā = D_u^-1/2 R D_i^-1/2; Ā_l and Ā'_l are two
  independent edge dropouts of Ā (keep rate κ = `--keepRate`, kept entries scaled by 1/κ), σ = max(a·x, x),
  a = `--leaky`;
- global (Eq. 2-4): H^u = E^u_0 W^u (U x h, h = `--hyperNum` hyperedges), dropped out per layer with κ;
  Λ = σ(H^uᵀ E^u_l) (h x d), c = 3 times Λ ← σ(V Λ) + Λ with an h x h V of its own per layer and side,
  Γ^u_l = σ(H^u Λ); the same for items. Only U x h, h x d and h x h products: no U x U matrix;
- E_{l+1} = Z_l + Γ_l + E_l (Eq. 5); E = Σ_{l=0..L} E_l; score(u, i) = e_uᵀ e_i (Eq. 6).
Loss (Eq. 8): Σ_pairs max(0, 1 - s(u, p) + s(u, n)) / B + ssl_reg · Σ_l [C_l(users) + C_l(items)]
+ reg · (‖E^u_0‖² + ‖E^i_0‖² + ‖W^u‖² + ‖W^i‖²), where C_l (Eq. 7) is an InfoNCE between the normalised local
rows z and the normalised global rows γ projected by a learned d x d matrix P_l:
Σ_n -log(exp(z_n·γ_n P_l/τ) / (Σ_m exp(z_n·γ_m P_l/τ) + 1e-8) + 1e-8), n and m over the batch's distinct
users (items: its positives and negatives).
Training: every epoch `--trnNum` random users in batches of B = 256 users, each with min(`--sampNum`, degree)
positives drawn with replacement and one uniform non-train negative per positive; Adam with the learning rate
multiplied by 0.96 every trnNum // B steps; evaluation without dropout.

SSLRec's HCCF differs in: no activation on the local product (`--local_act none`), LeakyReLU slope 1 in the
hypergraph (`--leaky 1`), no hierarchical mapping (`--hyper_layers 0`), no residual E_l (`--residual false`),
H scaled by `--mult`; its contrast has no projection (`--ssl_proj false`), detaches the local side
(`--ssl_detach true`), draws negatives from all users / items (`--ssl_negatives all`), anchors on the
positives only (`--ssl_items pos`), averages (`--ssl_reduce mean`) and puts its ε elsewhere (`--ssl_eps sslrec`:
l2n(x + 1e-8), no ε outside the ratio); BPR (`--loss bpr`) on shuffled train pairs with one negative each
(`--sampling pairs`), constant learning rate (`--decay 1`). The paper (Eq. 7) writes the contrast with the cosine,
which is `--ssl_proj false`; everything else the TF code computes is what the paper writes.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from DataHandler import Data
from Models.base import Losses, PhaseTimer, RecModel
from Utils.batches import sample_negatives, train_pairs
from Utils.flags import str2bool
from Utils.graphs import binary
from Utils.layers import Graph, xavier_uniform
from Utils.kernels import LogSumExpLogits

# per layer: the masks of the two edge dropouts (in the CSR order of Ā and of Āᵀ) and of the two hyperedge-matrix
# dropouts (U x h, I x h), float32, 1/κ where the entry is kept and 0 where it is dropped
Draws = List[Dict[str, torch.Tensor]]
LOG_1E8 = math.log(1e-8)


# ---------------------------------------------------------------------------------------------
# The pieces of the forward and of the contrast, each as the paper writes it
# ---------------------------------------------------------------------------------------------

def leaky(x: torch.Tensor, slope: float) -> torch.Tensor:
    """σ(x) = max(a·x, x): the authors' LeakyReLU (Utils/NNLayers.py:133-134); a = 1 is the identity. For 0 <= a < 1
    it is F.leaky_relu (the same values; one fused kernel and a cheaper backward than torch.maximum)."""
    if slope == 1.0:
        return x
    return F.leaky_relu(x, slope) if 0.0 <= slope < 1.0 else torch.maximum(slope * x, x)


def hyper_propagate(incidence: torch.Tensor, x: torch.Tensor, maps: Optional[torch.Tensor], slope: float
                    ) -> torch.Tensor:
    """Γ = σ(H Ψ^c(σ(Hᵀ X))) with Ψ(Λ) = σ(V Λ) + Λ, one V per step (Eq. 2 and 4).

    H is N x h and X is N x d: two thin products through the h hyperedges, never the N x N matrix H Hᵀ.
    """
    lam = leaky(incidence.T @ x, slope)                 # h x d: the hyperedges' embeddings Λ
    for v in (maps if maps is not None else []):
        lam = leaky(v @ lam, slope) + lam               # hierarchical mapping, residual
    return leaky(incidence @ lam, slope)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / √max(Σx², 1e-12) per row: tf.nn.l2_normalize, which the authors use (an all-zero row, such as a node whose
    edges were all dropped, stays 0)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True).clamp_min(1e-12))


def contrast(local: torch.Tensor, hyper: torch.Tensor, nodes: torch.Tensor, temp: float,
             proj: Optional[torch.Tensor] = None, negatives: str = "batch", eps: str = "tf",
             plain: bool = False) -> torch.Tensor:
    """Per anchor n (Eq. 7): -log(r_n + ε), r_n = exp(z_n·g_n/τ) / (Σ_m exp(z_n·g_m/τ) + 1e-8), g = n(hyper) P.

    m runs over `nodes` (negatives 'batch', labcode_efficient.py:116-130) or over every row of `hyper` ('all', SSLRec
    loss_utils.py:42-51). `eps` 'tf': z = l2n(local), g = l2n(hyper) P, ε = 1e-8 (tf.nn.l2_normalize: a zero row
    stays 0); 'sslrec': z = l2n(local + 1e-8) with F.normalize, ε = 0 (a zero row, a node whose edges were all
    dropped, becomes the unit vector (1, ..., 1)/√d). P = `proj`, or none. One value per anchor, computed in log
    space (log r = z·g/τ - log(e^lse + 1e-8)): the same value without overflow.
    """
    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return l2_normalize(x) if eps == "tf" else F.normalize(x + 1e-8)

    if nodes.numel() == 0:   # a batch with no anchor (its users have no train item): no term
        return local.new_zeros(0, dtype=torch.float32)
    with torch.autocast(local.device.type, enabled=False):   # a loss: float32 under --precision bf16 too
        z = unit(local[nodes])
        g = unit(hyper[nodes])
        candidates = g if negatives == "batch" else unit(hyper)
        if proj is not None:
            proj = proj.float()
            g = g @ proj
            candidates = g if negatives == "batch" else candidates @ proj
        positive = (z * g).sum(-1) / temp
        if plain:
            lse = torch.logsumexp(z @ candidates.T / temp, dim=1)
        else:
            lse = LogSumExpLogits.apply(z, candidates, temp)
        log_ratio = positive - torch.logaddexp(lse, lse.new_tensor(LOG_1E8))
        if eps == "tf":
            return -torch.logaddexp(log_ratio, log_ratio.new_tensor(LOG_1E8))
        return -log_ratio


def xavier_stack(count: Tuple[int, ...], rows: int, cols: int) -> nn.Parameter:
    """prod(count) matrices rows x cols, shaped count + (rows, cols), each Xavier-uniform on its own fans (the
    authors' separate variables)."""
    n = math.prod(count)
    return nn.Parameter(torch.stack([nn.init.xavier_uniform_(torch.empty(rows, cols)) for _ in range(n)])
                        .view(*count, rows, cols))


def batch_unique(values: np.ndarray, batch_of: np.ndarray, n: int, n_batches: int) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct values of every batch at once (one sort of batch·n + value): the values, batch after batch,
    and how many each batch has."""
    keys = np.unique(batch_of.astype(np.int64) * n + values)
    return keys % n, np.bincount(keys // n, minlength=n_batches)


@dataclass
class EpochBatches:
    """One epoch's batches on the device, cut by sizes known on the host (no read-back per batch)."""

    users: List[torch.Tensor]
    positives: List[torch.Tensor]
    negatives: List[torch.Tensor]
    user_nodes: List[torch.Tensor]      # the distinct users of each batch: the anchors of C(users)
    item_nodes: List[torch.Tensor]      # the distinct items of each batch: the anchors of C(items)

    def __len__(self) -> int:
        return len(self.users)


def _split(values: np.ndarray, sizes: np.ndarray, device: torch.device) -> List[torch.Tensor]:
    """`values` in one copy to the device, cut into consecutive pieces of `sizes`."""
    return list(torch.split(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device),
                            [int(s) for s in sizes]))


class HCCF(RecModel):
    """The authors' model and training loop (their batches, hinge loss and learning-rate decay)."""

    name = "hccf"
    paper = "HCCF: hypergraph contrastive collaborative filtering (Xia et al., SIGIR 2022)"
    phases = ("sampling", "augment", "recommender")
    uses_negatives = True   # batch_loss(users, positives, negatives), as MMRec's models (tests/test_cuda.py probes)
    # the authors' Params.py: lr 1e-3, batch 256 users, 100 epochs; they train all 100 (no early stopping) and
    # test every tstEpoch = 3 epochs and after the last (labcode_efficient.py:48-59)
    defaults = {"batch": 256, "lr": 1e-3, "epoch": 100, "patience": 0, "tstEpoch": 3}
    # the values of the README's three published commands (Yelp, MovieLens, Amazon); the paper prints no grid
    grid = {"temp": [1.0, 0.1], "ssl_reg": [1e-4, 1e-6, 1e-7], "reg": [1e-5, 1e-3, 1e-2], "keepRate": [0.5, 1.0]}
    published = {"tiktok": (0.0662, 0.0267, 0.0029), "baby": (0.0705, 0.0308, 0.0037),
                 "sports": (0.0779, 0.0361, 0.0041)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        d, h, n_layers, c = args.latdim, args.hyperNum, args.gnn_layer, args.hyper_layers
        self.user_emb = xavier_uniform(data.n_users, d)
        self.item_emb = xavier_uniform(data.n_items, d)
        self.user_hyper = xavier_uniform(d, h)           # W^u: the hyperedge matrix H^u = E^u W^u (Eq. 3)
        self.item_hyper = xavier_uniform(d, h)
        # V of the hierarchical mapping: L x c matrices h x h per side (their FC weights, NNLayers.py:96-113)
        mapped = c > 0 and n_layers > 0
        self.register_parameter("user_maps", xavier_stack((n_layers, c), h, h) if mapped else None)
        self.register_parameter("item_maps", xavier_stack((n_layers, c), h, h) if mapped else None)
        # P_l of the contrast, one d x d per layer shared by users and items (labcode_efficient.py:126)
        projected = args.ssl_proj and n_layers > 0
        self.register_parameter("ssl_proj", xavier_stack((n_layers,), d, d) if projected else None)
        self._build_graph(data.train)
        self.degree = np.diff(self.train_matrix.indptr)
        self.pair_users, self.pair_items = train_pairs(self.train_matrix)
        self.rng = np.random.default_rng(args.seed)                    # the epoch's batches (host)
        self.generator = torch.Generator(device=device)                 # the dropout masks (device)
        self.generator.manual_seed(args.seed)
        self.to(device)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=args.lr)
        # tf.train.exponential_decay(lr, step, trnNum // batch, decay, staircase=True), stepped every batch
        decay, every = args.decay, max(1, args.trnNum // args.batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: decay ** (step // every))

    def _build_graph(self, train: sp.spmatrix) -> None:
        """Ā = D_u^-1/2 R D_i^-1/2 with the authors' 1/(√(deg + 1e-8) + 1e-8) (DataHandler.py:22-44), as CSR on the
        device in both orientations, and where each Āᵀ entry sits in Ā (to move a mask from one order to the other)."""
        r = binary(train)
        r.sum_duplicates()
        r.sort_indices()
        self.train_matrix = r
        coo = r.tocoo()
        row_scale = 1.0 / (np.sqrt(np.asarray(r.sum(1), dtype=np.float64).ravel() + 1e-8) + 1e-8)
        col_scale = 1.0 / (np.sqrt(np.asarray(r.sum(0), dtype=np.float64).ravel() + 1e-8) + 1e-8)
        values = (row_scale[coo.row] * col_scale[coo.col]).astype(np.float32)
        # the transpose's CSR, carrying the position of each entry in R's CSR order
        position = sp.csr_matrix((np.arange(r.nnz, dtype=np.float64) + 1, r.indices, r.indptr), shape=r.shape)
        position_t = position.T.tocsr()
        position_t.sort_indices()
        perm = position_t.data.astype(np.int64) - 1            # Āᵀ's k-th entry is Ā's perm[k]-th
        dev = self.device

        def as_tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

        self.crow_u, self.col_u = as_tensor(r.indptr.astype(np.int64)), as_tensor(r.indices.astype(np.int64))
        self.crow_i = as_tensor(position_t.indptr.astype(np.int64))
        self.col_i = as_tensor(position_t.indices.astype(np.int64))
        self.values_u = as_tensor(values)
        self.perm = as_tensor(perm)
        self.inv_perm = as_tensor(np.argsort(perm))
        self.values_i = self.values_u[self.perm]
        self.user_graph, self.item_graph = self._graphs(self.values_u, self.values_i)

    def _csr(self, side: str, values: torch.Tensor) -> torch.Tensor:
        crow, col = (self.crow_u, self.col_u) if side == "u" else (self.crow_i, self.col_i)
        shape = (self.data.n_users, self.data.n_items) if side == "u" else (self.data.n_items, self.data.n_users)
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)

    def _graphs(self, user_values: torch.Tensor, item_values: torch.Tensor) -> Tuple[Graph, Graph]:
        """The U x I graph with `user_values` (Ā's CSR order) and the I x U one with `item_values` (Āᵀ's order),
        each with its exact transpose for the backward."""
        user_graph = Graph.from_tensors(self._csr("u", user_values), self._csr("i", user_values[self.perm]),
                                        self.plain)
        item_graph = Graph.from_tensors(self._csr("i", item_values), self._csr("u", item_values[self.inv_perm]),
                                        self.plain)
        return user_graph, item_graph

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("hccf (the authors' Params.py, akaxlh/HCCF; SSLRec's HCCF by the flags below)")
        g.add_argument("--latdim", default=32, type=int, help="d: embedding size")
        g.add_argument("--hyperNum", default=128, type=int, help="h: number of hyperedges (of users, and of items)")
        g.add_argument("--gnn_layer", default=2, type=int, help="L: propagation layers (local + hypergraph each)")
        g.add_argument("--leaky", default=0.5, type=float,
                       help="slope a of σ(x) = max(a·x, x) everywhere (SSLRec's yml: 1.0, the identity)")
        g.add_argument("--keepRate", default=0.5, type=float,
                       help="κ: keep rate of the edge dropout of Ā and of the dropout of H (1.0 = none)")
        g.add_argument("--temp", default=1.0, type=float, help="τ: temperature of the contrast (SSLRec's yml: 0.1)")
        g.add_argument("--ssl_reg", default=1e-4, type=float,
                       help="weight of the contrastive loss (SSLRec's cl_weight: 1.0)")
        g.add_argument("--reg", default=1e-5, type=float,
                       help="weight of the squared L2 norm of E^u, E^i, W^u, W^i (SSLRec's reg_weight: 1e-7)")
        g.add_argument("--mult", default=1.0, type=float,
                       help="H = E W · mult (SSLRec's mult; the TF code has no factor, its Params' 100 is unread)")
        g.add_argument("--sampNum", default=40, type=int,
                       help="--sampling users: at most this many positives per user and batch (drawn with replacement)")
        g.add_argument("--trnNum", default=10000, type=int,
                       help="--sampling users: users drawn per epoch; the lr decays every trnNum // batch steps")
        g.add_argument("--decay", default=0.96, type=float,
                       help="the lr is multiplied by this every trnNum // batch steps (staircase); 1.0 = constant "
                            "(SSLRec)")
        g.add_argument("--hyper_layers", default=3, type=int,
                       help="c: steps Λ ← σ(VΛ) + Λ of the hierarchical mapping (paper Eq. 4, TF code: 3; SSLRec: 0)")
        g.add_argument("--residual", default=True, type=str2bool,
                       help="E_{l+1} = Z_l + Γ_l + E_l (TF code, paper Eq. 5); false: Z_l + Γ_l (SSLRec)")
        g.add_argument("--local_act", default="leaky", choices=["leaky", "none"],
                       help="σ on the local product Ā E (TF code, paper Eq. 1) or none (SSLRec)")
        g.add_argument("--ssl_proj", default=True, type=str2bool,
                       help="a learned d x d matrix per layer on the normalised global side of the contrast (TF code); "
                            "false: cosine similarity (paper Eq. 7, SSLRec)")
        g.add_argument("--ssl_detach", default=False, type=str2bool,
                       help="no gradient through the local side of the contrast (SSLRec); TF code: both sides")
        g.add_argument("--ssl_negatives", default="batch", choices=["batch", "all"],
                       help="the contrast's denominator over the batch's distinct users / items (TF code) or over all "
                            "users / items (SSLRec)")
        g.add_argument("--ssl_items", default="pos_neg", choices=["pos_neg", "pos"],
                       help="item anchors of the contrast: the batch's positives and negatives (TF code) or its "
                            "positives only (SSLRec)")
        g.add_argument("--ssl_reduce", default="sum", choices=["sum", "mean"],
                       help="the contrast summed over the anchors (TF code) or averaged (SSLRec)")
        g.add_argument("--ssl_eps", default="tf", choices=["tf", "sslrec"],
                       help="the contrast's ε: tf = tf.nn.l2_normalize(x) and -log(ratio + 1e-8) (TF code); sslrec = "
                            "F.normalize(x + 1e-8), so a row with every edge dropped is (1..1)/√d, not 0, and "
                            "-log(ratio) (SSLRec)")
        g.add_argument("--loss", default="hinge", choices=["hinge", "bpr"],
                       help="hinge Σ max(0, 1 - s⁺ + s⁻) / batch (TF code, paper Eq. 8) or mean BPR (SSLRec)")
        g.add_argument("--sampling", default="users", choices=["users", "pairs"],
                       help="users: trnNum random users an epoch, batches of `batch` users with ≤ sampNum positives "
                            "each (TF code); pairs: every train pair an epoch, shuffled, batches of `batch` pairs "
                            "(SSLRec); one uniform non-train negative per positive in both")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        for name in ("latdim", "hyperNum", "sampNum", "trnNum"):
            if getattr(args, name) < 1:
                return f"--{name} must be at least 1, got {getattr(args, name)}."
        for name in ("gnn_layer", "hyper_layers"):
            if getattr(args, name) < 0:
                return f"--{name} must be 0 or more, got {getattr(args, name)}."
        if not 0.0 < args.keepRate <= 1.0:
            return f"--keepRate is a keep rate and must be in (0, 1], got {args.keepRate}."
        if not args.temp > 0:
            return f"--temp must be positive (the contrast divides by it), got {args.temp}."
        if not args.decay > 0:
            return f"--decay must be positive, got {args.decay}."
        return None

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        if data.train.nnz == 0:
            return f"{data.name} has no train interactions, so HCCF has no positives to sample."
        if np.diff(sp.csr_matrix(data.train).indptr).max() >= data.n_items:
            return f"a user of {data.name} has every item in train, so HCCF cannot draw a negative item for that user."
        return None

    # --- the forward --------------------------------------------------------------------------
    def draw_masks(self) -> Optional[Draws]:
        """Fresh dropout masks for every layer: each entry kept with probability κ and then worth 1/κ (tf.nn.dropout,
        x / κ · Bernoulli(κ)), from the model's generator; None when κ = 1 (no dropout, as at evaluation)."""
        keep = self.args.keepRate
        if keep >= 1.0:
            return None
        nnz, h = len(self.values_u), self.args.hyperNum
        sizes = {"user_edges": (nnz,), "item_edges": (nnz,), "user_hyper": (self.data.n_users, h),
                 "item_hyper": (self.data.n_items, h)}

        def mask(size: Tuple[int, ...]) -> torch.Tensor:
            uniform = torch.rand(size, device=self.device, generator=self.generator)   # faster than bernoulli_
            return uniform.lt_(keep).mul_(1.0 / keep)                                  # in place: 1.0 where kept

        return [{k: mask(s) for k, s in sizes.items()} for _ in range(self.args.gnn_layer)]

    def forward_layers(self, draws: Optional[Draws] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]],
                                  List[Tuple[torch.Tensor, torch.Tensor]]]:
        """E^u, E^i (Eq. 5-6) and per layer the local (Z^u_l, Z^i_l) and global (Γ^u_l, Γ^i_l) rows.

        `draws` None: no dropout (evaluation, κ = 1, and the probes of the tests).
        """
        a = self.args
        slope = a.leaky
        user_layer, item_layer = self.user_emb, self.item_emb
        user_total, item_total = user_layer, item_layer
        user_incidence = self.user_emb @ self.user_hyper               # H^u = E^u_0 W^u (Eq. 3), from layer 0
        item_incidence = self.item_emb @ self.item_hyper
        if a.mult != 1.0:                                             # SSLRec's factor (hccf.py:43-44)
            user_incidence, item_incidence = user_incidence * a.mult, item_incidence * a.mult
        local, hyper = [], []
        for layer in range(a.gnn_layer):
            if draws is None:
                user_graph, item_graph, hu, hi = self.user_graph, self.item_graph, user_incidence, item_incidence
            else:
                masks = draws[layer]   # kept entries scaled by 1/κ (labcode_efficient.py:74-82, :101-102)
                user_graph, item_graph = self._graphs(self.values_u * masks["user_edges"],
                                                      self.values_i * masks["item_edges"])
                hu = user_incidence * masks["user_hyper"]
                hi = item_incidence * masks["item_hyper"]
            zu, zi = user_graph @ item_layer, item_graph @ user_layer
            if a.local_act == "leaky":
                zu, zi = leaky(zu, slope), leaky(zi, slope)
            gu = hyper_propagate(hu, user_layer, None if self.user_maps is None else self.user_maps[layer], slope)
            gi = hyper_propagate(hi, item_layer, None if self.item_maps is None else self.item_maps[layer], slope)
            local.append((zu, zi))
            hyper.append((gu, gi))
            if a.residual:
                user_layer, item_layer = zu + gu + user_layer, zi + gi + item_layer
            else:
                user_layer, item_layer = zu + gu, zi + gi
            user_total, item_total = user_total + user_layer, item_total + item_layer
        return user_total, item_total, local, hyper

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            users, items, _, _ = self.forward_layers(None)
        return users.float(), items.float()

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                   user_nodes: Optional[torch.Tensor] = None, item_nodes: Optional[torch.Tensor] = None,
                   draws: Optional[Draws] = None) -> Dict[str, torch.Tensor]:
        """The terms of Eq. 8 for the pairs (users, positives, negatives): the hinge (or BPR) loss, ssl_reg · Σ_l of
        the contrasts and reg · the squared norms. `user_nodes`, `item_nodes`: the contrasts' anchors (default: the
        distinct users; the distinct positives and negatives, or positives, by --ssl_items); `draws`: the dropout
        masks (None: no dropout)."""
        a = self.args
        user_vec, item_vec, local, hyper = self.forward_layers(draws)
        u = user_vec[users].float()   # the scores of the loss in float32 under --precision bf16 too
        diff = (u * item_vec[positives].float()).sum(-1) - (u * item_vec[negatives].float()).sum(-1)
        if a.loss == "hinge":   # divided by the configured batch, the last smaller batch too (:163)
            rec = {"hinge": torch.clamp(1.0 - diff, min=0.0).sum() / a.batch}
        else:
            rec = {"bpr": -F.logsigmoid(diff).mean()}
        if user_nodes is None:
            user_nodes = torch.unique(users)
        if item_nodes is None:
            item_nodes = torch.unique(torch.cat([positives, negatives]) if a.ssl_items == "pos_neg" else positives)
        ssl = user_vec.new_zeros(())
        for layer, ((zu, zi), (gu, gi)) in enumerate(zip(local, hyper)):
            proj = None if self.ssl_proj is None else self.ssl_proj[layer]
            for z, g, nodes in ((zu, gu, user_nodes), (zi, gi, item_nodes)):
                terms = contrast(z.detach() if a.ssl_detach else z, g, nodes, a.temp, proj, a.ssl_negatives,
                                 a.ssl_eps, self.plain)
                ssl = ssl + (terms.sum() if a.ssl_reduce == "sum" else terms.mean())
        reg = sum(p.square().sum() for p in (self.user_emb, self.item_emb, self.user_hyper, self.item_hyper))
        return {**rec, "ssl": a.ssl_reg * ssl, "reg": a.reg * reg}

    # --- the epoch ----------------------------------------------------------------------------
    def sample_epoch(self) -> EpochBatches:
        """The epoch's batches, drawn on the host with the model's generator and copied over once."""
        a, rng, n_items = self.args, self.rng, self.data.n_items
        if a.sampling == "users":
            # trnNum random users, batches of `batch` users (labcode_efficient.py:198-208); per user min(sampNum,
            # degree) positives with replacement and as many uniform non-train negatives (:171-196); a user without
            # train items adds no pair (their loop runs min(sampNum, 0) = 0 times), so it is no anchor either
            chosen = rng.permutation(self.data.n_users)[:a.trnNum]
            n_batches = -(-len(chosen) // a.batch)
            user_batch = np.arange(len(chosen)) // a.batch
            degree = self.degree[chosen]
            count = np.minimum(a.sampNum, degree)
            users = np.repeat(chosen, count)
            pair_batch = np.repeat(user_batch, count)
            draw = (rng.random(len(users)) * np.repeat(degree, count)).astype(np.int64)   # uniform in [0, degree)
            positives = self.train_matrix.indices[self.train_matrix.indptr[users] + draw].astype(np.int64)
            negatives = sample_negatives(self.train_matrix, users, rng)
            active = degree > 0
            user_nodes, user_counts = chosen[active], np.bincount(user_batch[active], minlength=n_batches)
        else:
            # every train pair, one uniform non-train negative each, shuffled, batches of `batch` pairs (SSLRec)
            negatives = sample_negatives(self.train_matrix, self.pair_users, rng)
            order = rng.permutation(len(self.pair_users))
            users, positives, negatives = self.pair_users[order], self.pair_items[order], negatives[order]
            n_batches = -(-len(users) // a.batch)
            pair_batch = np.arange(len(users)) // a.batch
            user_nodes, user_counts = batch_unique(users, pair_batch, self.data.n_users, n_batches)
        pair_counts = np.bincount(pair_batch, minlength=n_batches)
        if a.ssl_items == "pos_neg":
            item_nodes, item_counts = batch_unique(np.concatenate([positives, negatives]),
                                                   np.concatenate([pair_batch, pair_batch]), n_items, n_batches)
        else:
            item_nodes, item_counts = batch_unique(positives, pair_batch, n_items, n_batches)
        dev = self.device
        return EpochBatches(_split(users, pair_counts, dev), _split(positives, pair_counts, dev),
                            _split(negatives, pair_counts, dev), _split(user_nodes, user_counts, dev),
                            _split(item_nodes, item_counts, dev))

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Losses:
        with timer.phase("sampling"):
            batches = self.sample_epoch()
        self.train()
        totals: Dict[str, torch.Tensor] = {}
        for b in self.progress(range(len(batches)), self.name):
            with timer.phase("augment"):
                draws = self.draw_masks()
            with timer.phase("recommender"):
                self.optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    terms = self.batch_loss(batches.users[b], batches.positives[b], batches.negatives[b],
                                            batches.user_nodes[b], batches.item_nodes[b], draws)
                sum(terms.values()).backward()
                self.optimizer.step()
                self.scheduler.step()
                for name, value in terms.items():   # summed on the device: no host sync per batch
                    totals[name] = totals.get(name, 0.0) + value.detach().float()
        means = {name: float(total) / len(batches) for name, total in totals.items()}
        return {"loss": dict(means, loss=sum(means.values()))}
