"""SGL: self-supervised graph learning (Wu et al., SIGIR 2021) as its authors' PyTorch code computes it.

Upstream: wujcan/SGL-Torch at c56328817daa6ebd7669cb9c0429a1f0f3dad5b9 (model/general_recommender/SGL.py,
conf/SGL.ini), and the TensorFlow original wujcan/SGL-TensorFlow at 58fe93149ca6fb733639f556343c41f12206ba55
(model/general_recommender/SGL.py) where the two differ (docs/models/sgl.md has every file:line).

LightGCN on Â = D^-1/2 A D^-1/2 (A = [[0, R], [Rᵀ, 0]], no self-loops, no epsilon): [Ū; Ī] = mean_{l=0..L}
Â^l [Eu; Ei] (paper Eq. 1-3). Once per epoch two augmented graphs s1(G), s2(G) are drawn (Eq. 5): node dropout
(Eq. 6: int(n·ρ) users and int(n·ρ) items lose all their edges), edge dropout (Eq. 7: int(|E|·(1-ρ)) train
edges are kept) or random walk (Eq. 8: a fresh edge-dropout graph per layer and view), each renormalised
as Â. Per batch (u, i, j): the sum over the batch of BPR on [Ū; Ī] (Eq. 4), ssl_reg times the InfoNCE of
the two views (Eq. 9-10: the batch's users and positive items, duplicates included, as anchors; every user
or every item of the other view in the denominator; rows L2-normalised, temperature τ), and reg · ½ Σ of
the squared layer-0 rows of u, i and j (Eq. 11's L2 term, batch rows only). The batches are the authors'
sampler: |train| draws of a user uniform over the users with a train item, a positive uniform over its
train items and a negative uniform over the items it has not.

Departures of the code from the paper, each a flag whose default is the code: `--drop_draw` (exact counts
vs Bernoulli masks), `--reg_scope` (batch rows vs every parameter), `--sampler` (user-first draws vs each
train pair once). Where the two codes differ: `--ssl_mode` (the TensorFlow code's variants; the PyTorch code
only has both_side).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from DataHandler import Data
from Models.base import Losses, PhaseTimer, RecModel
from Utils.batches import device_batches, sample_negatives, train_pairs, user_batches
from Utils.graphs import binary, coo_to_csr
from Utils.kernels import LogSumExpLogits
from Utils.layers import Graph, bpr_loss, xavier_uniform

AUG_TYPES = ("nd", "ed", "rw")      # 0, 1, 2 in the TensorFlow code
SSL_MODES = ("both_side", "user_side", "item_side", "merge")
View = List[Graph]                  # one graph per layer (the same graph L times for nd and ed)


def aug_type(text: str) -> str:
    """--aug_type: nd|ed|rw in any case (SGL-Torch), or the TensorFlow code's numbers 0|1|2."""
    value = text.strip().lower()
    return AUG_TYPES[int(value)] if value in ("0", "1", "2") else value


# ---------------------------------------------------------------------------------------------
# Augmentation: which train edges a view keeps (host, vectorised), and its normalised graph
# ---------------------------------------------------------------------------------------------

def edge_dropout(n_edges: int, ratio: float, rng: np.random.Generator, draw: str = "count") -> np.ndarray:
    """The kept edges of s(G) = (V, M ⊙ E) (paper Eq. 7) as a boolean mask over the train edges.

    count (the code, create_adj_mat): exactly int(|E|·(1-ρ)) edges, drawn without replacement;
    bernoulli (the paper's text): each edge kept with probability 1-ρ."""
    if draw == "bernoulli":
        return rng.random(n_edges) >= ratio
    keep = np.zeros(n_edges, dtype=bool)
    keep[rng.choice(n_edges, size=int(n_edges * (1 - ratio)), replace=False)] = True
    return keep


def node_dropout(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, ratio: float,
                 rng: np.random.Generator, draw: str = "count") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s(G) = (M' ⊙ V, E) (paper Eq. 6): (kept-edge mask, dropped users, dropped items); a dropped node loses
    every edge and keeps its embedding (its propagated layers are 0).

    count (the code): int(U·ρ) users then int(I·ρ) items, each drawn without replacement; bernoulli (the
    paper's text): each node dropped with probability ρ."""
    if draw == "bernoulli":
        dropped_users = np.flatnonzero(rng.random(n_users) < ratio)
        dropped_items = np.flatnonzero(rng.random(n_items) < ratio)
    else:
        dropped_users = rng.choice(n_users, size=int(n_users * ratio), replace=False)
        dropped_items = rng.choice(n_items, size=int(n_items * ratio), replace=False)
    user_kept = np.ones(n_users, dtype=bool)
    item_kept = np.ones(n_items, dtype=bool)
    user_kept[dropped_users] = False
    item_kept[dropped_items] = False
    return user_kept[users] & item_kept[items], dropped_users, dropped_items


def normalized_graph(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                     plain: bool = False) -> Graph:
    """Â = D^-1/2 A D^-1/2 of the given (user, item) edges, A = [[0, R], [Rᵀ, 0]] binary, D the degrees over
    these edges, no self-loops and no epsilon (the authors' create_adj_mat, 'pre' normalisation; a node
    without an edge has an empty row). Built with tensor ops on the edges' device; symmetric."""
    d_user = torch.bincount(users, minlength=n_users).float()
    d_item = torch.bincount(items, minlength=n_items).float()
    values = d_user[users].pow(-0.5) * d_item[items].pow(-0.5)
    shifted = items + n_users
    coo = (torch.cat([users, shifted]), torch.cat([shifted, users]), torch.cat([values, values]))
    n = n_users + n_items
    return Graph.from_tensors(coo_to_csr(coo, (n, n)), plain=plain)


def propagate_views(graphs: Sequence[Graph], x: torch.Tensor) -> torch.Tensor:
    """LightGCN's readout mean_{l=0..L} E_l with E_l = G_l E_{l-1} (paper Eq. 1-2; a graph per layer: Eq. 8)."""
    outputs = [x]
    for graph in graphs:
        outputs.append(graph @ outputs[-1])
    return torch.stack(outputs).mean(0)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

Distinct = Tuple[torch.Tensor, torch.Tensor]     # (distinct nodes, position of each batch node among them)


def distinct(nodes: torch.Tensor) -> Distinct:
    """torch.unique(nodes, return_inverse=True); on CUDA a host synchronisation (the train loop computes these
    on the host per epoch instead)."""
    return torch.unique(nodes, return_inverse=True)


def info_nce_sum(anchor: torch.Tensor, other: torch.Tensor, nodes: torch.Tensor, temp: float, plain: bool = False,
                 unique: Optional[Distinct] = None) -> torch.Tensor:
    """Σ over the batch nodes n (duplicates counted) of -log(exp(x_n·y_n/τ) / Σ_v exp(x_n·y_v/τ)), x, y the
    L2-normalised rows of `anchor` and `other`, v over every row of `other` (paper Eq. 9, as the code sums it).

    Fast: each distinct node once through the fused LogSumExpLogits kernel, counted per occurrence; `plain`:
    torch's logsumexp over every batch node (the reference)."""
    if plain:
        x, y = F.normalize(anchor[nodes]), F.normalize(other)
        return (torch.logsumexp(x @ y.T / temp, dim=1) - (x * y[nodes]).sum(-1) / temp).sum()
    nodes_once, occurrence = unique if unique is not None else distinct(nodes)
    x, y = F.normalize(anchor[nodes_once]), F.normalize(other)
    positive = (x * y[nodes_once]).sum(-1) / temp
    return (LogSumExpLogits.apply(x, y, temp) - positive)[occurrence].sum()


def ssl_loss(view1: Tuple[torch.Tensor, torch.Tensor], view2: Tuple[torch.Tensor, torch.Tensor],
             users: torch.Tensor, items: torch.Tensor, temp: float, mode: str = "both_side",
             plain: bool = False, unique: Optional[Tuple[Distinct, Distinct]] = None) -> torch.Tensor:
    """L_ssl (paper Eq. 9-10), summed over the batch's anchors (not averaged), without ssl_reg.

    both_side / user_side / item_side (SGL-Torch: both_side only; SGL-TensorFlow calc_ssl_loss_v2): every
    batch user (and positive item), duplicates included, against every user (item) of view 2:
    -log(exp(z'_u·z''_u/τ) / Σ_v exp(z'_u·z''_v/τ)) on L2-normalised rows.
    merge (SGL-TensorFlow calc_ssl_loss_v3): the distinct batch users and positive items as one set of
    anchors, each against the others of that set only (users and items together).
    `unique`: (distinct(users), distinct(items)) when the caller has them (no device synchronisation)."""
    (u1, i1), (u2, i2) = view1, view2
    user_once, item_once = unique if unique is not None else (distinct(users), distinct(items))
    if mode == "merge":
        z1 = F.normalize(torch.cat([u1[user_once[0]], i1[item_once[0]]]))
        z2 = F.normalize(torch.cat([u2[user_once[0]], i2[item_once[0]]]))
        logits = z1 @ z2.T / temp
        return (torch.logsumexp(logits, dim=1) - logits.diagonal()).sum()
    total = torch.zeros((), device=u1.device)
    if mode in ("both_side", "user_side"):
        total = total + info_nce_sum(u1, u2, users, temp, plain, user_once)
    if mode in ("both_side", "item_side"):
        total = total + info_nce_sum(i1, i2, items, temp, plain, item_once)
    return total


def l2_rows(*tables: torch.Tensor) -> torch.Tensor:
    """½ Σ_k ‖X_k‖²_F (the authors' util.pytorch.l2_loss: squared, halved, summed)."""
    return 0.5 * sum(t.pow(2).sum() for t in tables)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def user_first_sample(train: sp.csr_matrix, n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The authors' PairwiseSamplerV2 (data/sampler.py): n users uniform over those with a train item (with
    replacement), each with a positive uniform over its train items. Vectorised; the same distribution."""
    degree = np.diff(train.indptr)
    active = np.flatnonzero(degree)
    users = active[rng.integers(0, len(active), size=n)]
    positives = train.indices[train.indptr[users] + rng.integers(0, degree[users])]
    return users.astype(np.int64), positives.astype(np.int64)


def host_distinct(batches: Sequence[np.ndarray], device: torch.device) -> List[Distinct]:
    """`distinct` of each batch's nodes, computed with numpy and moved to the device in two copies in all."""
    if not batches:
        return []
    pairs = [np.unique(nodes, return_inverse=True) for nodes in batches]     # a loop over batches, not nodes
    once = torch.from_numpy(np.concatenate([p[0] for p in pairs]).astype(np.int64)).to(device)
    where = torch.from_numpy(np.concatenate([p[1].ravel() for p in pairs]).astype(np.int64)).to(device)
    return list(zip(torch.split(once, [len(p[0]) for p in pairs]), torch.split(where, [len(p[1]) for p in pairs])))


class SGL(RecModel):
    """SGL-ED/ND/RW on LightGCN, the authors' losses (sums over the batch) and sampler."""

    name = "sgl"
    paper = "SGL: self-supervised graph learning for recommendation (Wu et al., SIGIR 2021)"
    phases = ("augment", "sampling", "recommender")
    # SGL-Torch conf/SGL.ini: batch 2048, Adam lr 1e-3, 1000 epochs, stop_cnt 10 (stop once Recall@20 has not
    # improved for 10 evaluations in a row, one evaluation per epoch); NeuRec.ini seed 2021
    defaults = {"batch": 2048, "lr": 1e-3, "epoch": 1000, "patience": 10, "seed": 2021}
    # the paper's search (Section 4.1.3): λ1 (ssl_reg), τ (ssl_temp), ρ (ssl_ratio)
    grid = {"ssl_reg": [0.005, 0.01, 0.05, 0.1, 0.5, 1.0], "ssl_temp": [0.1, 0.2, 0.5, 1.0],
            "ssl_ratio": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}
    # DiffMM's Table 2 row (equal to MMSSL's table digit for digit)
    published = {"tiktok": (0.0603, 0.0238, 0.0030), "baby": (0.0678, 0.0296, 0.0036),
                 "sports": (0.0779, 0.0361, 0.0041)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        self.train_csr = binary(data.train).tocsr()
        self.train_csr.sort_indices()
        users, items = train_pairs(self.train_csr)
        self.edge_users, self.edge_items = users, items                         # host, for the masks
        self.edge_users_t = torch.from_numpy(users).to(device)                 # device, for the graphs
        self.edge_items_t = torch.from_numpy(items).to(device)
        self.graph = normalized_graph(self.edge_users_t, self.edge_items_t, data.n_users, data.n_items,
                                      self.plain)
        self.user_emb = xavier_uniform(data.n_users, args.embed_size)           # reset_parameters(xavier_uniform)
        self.item_emb = xavier_uniform(data.n_items, args.embed_size)
        self.rng = np.random.default_rng(args.seed)                             # masks, batches, negatives
        self.views: Tuple[View, View] = ([], [])
        self.to(device)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=args.lr)        # the authors' learner: Adam, no decay

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("sgl (SGL-Torch conf/SGL.ini; the authors' flag names)")
        g.add_argument("--embed_size", default=64, type=int, help="d: embedding size")
        g.add_argument("--n_layers", default=3, type=int, help="L: LightGCN layers")
        g.add_argument("--reg", default=1e-4, type=float, help="λ2: weight of the L2 term (Eq. 11)")
        g.add_argument("--ssl_reg", default=0.1, type=float, help="λ1: weight of the InfoNCE term (Eq. 11)")
        g.add_argument("--ssl_ratio", default=0.1, type=float, help="ρ: dropout ratio of the augmentations (0 = "
                                                                    "both views are the train graph, as the code)")
        g.add_argument("--ssl_temp", default=0.2, type=float, help="τ: InfoNCE temperature (Eq. 9)")
        g.add_argument("--aug_type", default="ed", type=aug_type, choices=AUG_TYPES,
                       help="augmentation: nd = node dropout (Eq. 6), ed = edge dropout (Eq. 7), rw = random walk, "
                            "a fresh edge dropout per layer (Eq. 8); 0/1/2 = the TensorFlow code's numbers")
        g.add_argument("--ssl_mode", default="both_side", choices=SSL_MODES,
                       help="InfoNCE anchors: both_side = batch users and items vs all users/items (SGL-Torch, "
                            "which has no other; SGL-TensorFlow's default); user_side / item_side = one of the two; "
                            "merge = the distinct batch users and items vs each other only (SGL-TensorFlow "
                            "calc_ssl_loss_v3)")
        g.add_argument("--drop_draw", default="count", choices=["count", "bernoulli"],
                       help="count = drop exactly int(n·ρ) nodes / keep int(|E|·(1-ρ)) edges, without replacement "
                            "(the authors' code); bernoulli = drop each node or edge with probability ρ (the "
                            "paper's text)")
        g.add_argument("--reg_scope", default="batch", choices=["batch", "all"],
                       help="the L2 term: batch = reg·½Σ‖·‖² of the batch's layer-0 rows of u, i, j (the code); "
                            "all = reg·‖Θ‖² of every embedding, each batch (paper Eq. 11)")
        g.add_argument("--sampler", default="user", choices=["user", "pair"],
                       help="user = |train| draws of a user uniform over users, then a positive of theirs (the "
                            "authors' PairwiseSamplerV2); pair = every train pair once, shuffled (the paper's "
                            "sum over (u, i, j), Eq. 4); one negative per positive either way")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        if args.embed_size < 1:
            return f"--embed_size must be at least 1, got {args.embed_size}"
        if args.n_layers < 0:
            return f"--n_layers must be 0 or more, got {args.n_layers}"
        if not 0.0 <= args.ssl_ratio < 1.0:
            return f"--ssl_ratio is a dropout ratio in [0, 1), got {args.ssl_ratio}"
        if not args.ssl_temp > 0.0:
            return f"--ssl_temp must be positive, got {args.ssl_temp}"
        if args.reg < 0.0 or args.ssl_reg < 0.0:
            return f"--reg and --ssl_reg must not be negative, got {args.reg} and {args.ssl_reg}"
        return None

    # --- augmentation -------------------------------------------------------------------------------
    def subgraph(self, rng: np.random.Generator) -> Graph:
        """One augmented graph s(G), normalised as Â (create_adj_mat(is_subgraph=True)); ρ = 0: the train graph."""
        args, n_users, n_items = self.args, self.data.n_users, self.data.n_items
        if args.ssl_ratio <= 0.0:
            return self.graph
        if args.aug_type == "nd":
            keep = node_dropout(self.edge_users, self.edge_items, n_users, n_items, args.ssl_ratio, rng,
                                args.drop_draw)[0]
        else:
            keep = edge_dropout(len(self.edge_users), args.ssl_ratio, rng, args.drop_draw)
        keep_t = torch.from_numpy(np.flatnonzero(keep)).to(self.device)   # indices: a boolean mask would sync
        return normalized_graph(self.edge_users_t[keep_t], self.edge_items_t[keep_t], n_users, n_items, self.plain)

    def augment(self, rng: np.random.Generator) -> Tuple[View, View]:
        """The epoch's two views, drawn in the authors' order: view 1 then view 2 (nd, ed); for rw, per layer
        view 1's graph then view 2's."""
        layers = self.args.n_layers
        if self.args.aug_type == "rw":
            pairs = [(self.subgraph(rng), self.subgraph(rng)) for _ in range(layers)]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        first, second = self.subgraph(rng), self.subgraph(rng)
        return [first] * layers, [second] * layers

    # --- forward and loss -----------------------------------------------------------------------------
    def split(self, nodes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return nodes[: self.data.n_users], nodes[self.data.n_users:]

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.split(propagate_views([self.graph] * self.args.n_layers,
                                          torch.cat([self.user_emb, self.item_emb])))

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                   unique: Optional[Tuple[Distinct, Distinct]] = None) -> Dict[str, torch.Tensor]:
        """The authors' per-batch loss, each term summed over the batch (Eq. 11):
        BPR(Ū, Ī) + ssl_reg · L_ssl(view 1, view 2) + reg · ½Σ‖layer-0 rows‖². `unique`: the batch's distinct
        users and positives (`distinct`), else computed here."""
        args = self.args
        ego = torch.cat([self.user_emb, self.item_emb])
        user_vec, item_vec = self.embeddings()
        view1 = self.split(propagate_views(self.views[0], ego))
        view2 = self.split(propagate_views(self.views[1], ego))
        bpr = bpr_loss(user_vec, item_vec, users, positives, negatives, divisor=1.0)
        if args.reg_scope == "all":
            reg = self.user_emb.pow(2).sum() + self.item_emb.pow(2).sum()
        else:
            reg = l2_rows(self.user_emb[users], self.item_emb[positives], self.item_emb[negatives])
        ssl = ssl_loss(view1, view2, users, positives, args.ssl_temp, args.ssl_mode, self.plain, unique)
        return {"bpr": bpr, "ssl": args.ssl_reg * ssl, "reg": args.reg * reg}

    # --- one epoch ------------------------------------------------------------------------------------
    def sample(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[np.ndarray]]:
        """The epoch's (users, positives, negatives) and its index batches."""
        n = self.train_csr.nnz
        if self.args.sampler == "user":
            users, positives = user_first_sample(self.train_csr, n, self.rng)
            # the draws are already in random order: the authors' shuffle would change nothing in distribution
            batches = user_batches(n, self.args.batch, shuffle=False)
        else:
            users, positives = self.edge_users, self.edge_items
            batches = user_batches(n, self.args.batch, shuffle=True)
        negatives = sample_negatives(self.train_csr, users, self.rng)   # over all items, as the authors
        return users, positives, negatives, batches

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Losses:
        with timer.phase("augment"):
            self.views = self.augment(self.rng)
        with timer.phase("sampling"):
            users, positives, negatives, batches = self.sample()
            users_t, positives_t, negatives_t = (torch.from_numpy(a).to(self.device)
                                                 for a in (users, positives, negatives))
            batches_t = device_batches(batches, self.device)                # one copy, not one a batch
            # the InfoNCE's distinct anchors per batch, found here on the host: torch.unique on the device would
            # synchronise once a batch
            unique = list(zip(host_distinct([users[b] for b in batches], self.device),
                              host_distinct([positives[b] for b in batches], self.device)))
        with timer.phase("recommender"):
            self.train()
            totals: Dict[str, torch.Tensor] = {}
            for idx, once in self.progress(list(zip(batches_t, unique)), self.name):
                self.optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    terms = self.batch_loss(users_t[idx], positives_t[idx], negatives_t[idx], once)
                sum(terms.values()).backward()
                self.optimizer.step()
                for name, value in terms.items():  # summed on the device: no host sync per batch
                    totals[name] = totals.get(name, 0.0) + value.detach().float()
        # per training sample, as the authors log them (total / num_ratings)
        means = {name: float(total) / len(users) for name, total in totals.items()}
        return {"loss": dict(means, loss=sum(means.values()))}
