"""NCL (Lin et al., WWW 2022) as its authors' code computes it (RUCAIBox/NCL at 0aaf7c8, ncl.py and
trainer.py on RecBole 1.0; RecBole's own general_recommender/ncl.py at 7b02be5 computes the same).

LightGCN plus two contrastive terms, with Â MMRec's / RecBole's D^-1/2 A D^-1/2 (no self-loops, degrees + 1e-7):
- Layers E_0 = [Eu; Ei], E_{l+1} = Â E_l for l < max(L, 2h) (ncl.py:135-146); scores from the mean of E_0..E_L
  (L = `--n_layers`, h = `--hyper_layers`).
- Loss per batch of (u, i⁺, i⁻) (ncl.py:208-241): mean BPR + λ·EmbLoss(Eu[u], Ei[i⁺], Ei[i⁻]) (unsquared norms)
  + ssl_reg·(S(E_2h, E_0; users u) + α·S(E_2h, E_0; items i⁺))
  + proto_reg·(P(E_0, C_user; u) + P(E_0, C_item; i⁺)), the last only from epoch `--warm_up_step` on
  (trainer.py:135-136), with, summed over the batch rows (duplicates count each time):
  S(Z, Y; n) = -log exp(ẑ_n·ŷ_n/τ) / Σ_{v of that side} exp(ẑ_n·ŷ_v/τ)   (structure, ncl.py:177-206)
  P(Y, C; n) = -log exp(ŷ_n·c_{a(n)}/τ) / Σ_{j<k} exp(ŷ_n·c_j/τ)        (prototypes, ncl.py:148-175)
  where x̂ is x / ‖x‖, c_j the L2-normalised k-means centroids and a(n) the node's cluster.
- E-step (trainer.py:42-44, ncl.py:66-86): every `--m_step` epochs k-means (k = `--num_clusters`) of the layer-0
  user rows and of the layer-0 item rows. The authors call faiss.Kmeans(d, k); here `kmeans` is Lloyd's
  algorithm as faiss 1.7.1 runs it (Clustering.cpp: niter 25, initial centroids a random sample of the points,
  empty clusters split off a large one with a 1/1024 perturbation, at most 256 points per centroid), in torch
  on the run's device: the same algorithm, not faiss's random streams (so the clusters are compared with faiss's
  given the same initial centroids). Iterations stop at a fixed point (the same centroids as running on); E-steps
  whose prototypes no epoch would use (inside the warm-up) are skipped.

The paper weights the item prototype term by α as well (L_P = L_P^U + αL_P^I); the authors' code does not,
`--proto_alpha true` does.
"""
from __future__ import annotations

import argparse
from typing import ClassVar, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from Models.base import PairwiseModel, PhaseTimer, add_pairwise_args, check_layers
from Utils.flags import str2bool
from Utils.graphs import BLOCK_ELEMENTS, symmetric_graph
from Utils.kernels import LogSumExpLogits
from Utils.layers import bpr_loss, emb_loss, info_nce, xavier_uniform

# faiss 1.7.1 ClusteringParameters (faiss/Clustering.cpp:29-40) and split_clusters (:210-266)
KMEANS_NITER = 25
KMEANS_SEED = 1234             # faiss's fixed default seed: the same initial sample every E-step
MAX_POINTS_PER_CENTROID = 256  # beyond k·256 points faiss trains on a random subset of that size
SPLIT_EPS = 1.0 / 1024


# ---------------------------------------------------------------------------------------------
# k-means (the E-step), faiss's Lloyd iterations in torch
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """The index of each point's nearest centroid in squared L2 (faiss IndexFlatL2 search, k = 1); ties go to the
    lower index. Row blocks of points x centroids distances: no larger matrix is formed."""
    chunk = chunk or max(1, BLOCK_ELEMENTS // max(len(centroids), 1))
    # ‖x‖² is the same for every centroid of a row, so argmin ‖c‖² - 2x·c picks the same centroid (one fused addmm)
    c_norm = (centroids * centroids).sum(1)
    c_t = centroids.T.contiguous()
    return torch.cat([torch.argmin(torch.addmm(c_norm, points[s:s + chunk], c_t, alpha=-2.0), dim=1)
                      for s in range(0, len(points), chunk)])


def _pick_cluster_to_split(counts: np.ndarray, n: int, rng: np.random.Generator) -> int:
    """faiss's choice of the cluster an empty one splits: a scan over j = 0, 1, ... (cycling), stopping at j with
    probability (n_j - 1)/(n - k), one uniform per step. A whole cycle's uniforms are drawn at once: the same
    distribution as the step-by-step scan (the probabilities sum to 1, so it stops)."""
    p = (counts - 1.0) / float(n - len(counts))
    for _ in range(10_000):
        hit = np.flatnonzero(rng.random(len(counts)) < p)
        if hit.size:
            return int(hit[0])
    return int(np.argmax(counts))   # unreachable in practice: a guard against an endless scan


def _split_empty_clusters(centroids: torch.Tensor, counts: np.ndarray, n: int) -> int:
    """faiss split_clusters: each empty cluster ci (in index order) copies a cluster cj picked by
    `_pick_cluster_to_split`; both move apart by ±1/1024 per coordinate (even coordinates: ci up, cj down;
    odd: the reverse) and share cj's count. A fresh generator with faiss's fixed seed each call, as faiss."""
    empty = np.flatnonzero(counts == 0)
    if not empty.size:
        return 0
    rng = np.random.default_rng(KMEANS_SEED)
    sign = torch.ones(centroids.shape[1], device=centroids.device, dtype=centroids.dtype)
    sign[1::2] = -1.0
    for ci in empty:   # a loop over empty clusters only (sequential in faiss: counts change as they split)
        cj = _pick_cluster_to_split(counts, n, rng)
        source = centroids[cj].clone()
        centroids[ci] = source * (1.0 + SPLIT_EPS * sign)
        centroids[cj] = source * (1.0 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] / 2.0
        counts[cj] -= counts[ci]
    return int(empty.size)


@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, niter: int = KMEANS_NITER, seed: int = KMEANS_SEED,
           init: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """faiss.Kmeans(d, k).train(x) then index.search(x, 1) (faiss 1.7.1 Clustering::train_encoded): the centroids
    (k x d, not normalised) and every point's nearest centroid among them.

    More than k·256 points: train on a random subset of k·256 (faiss subsample_training_set, seed). Initial
    centroids: the first k of a random permutation of the training points (seed + 1, faiss's first redo). Then
    `niter` times: assign each point to its nearest centroid, centroid = mean of its points (an empty one 0),
    split empty clusters off others. The final assignment is of all points to the final centroids. `init`: given
    initial centroids instead of the sample (faiss's `train(x, init_centroids=...)`), to compare with faiss.
    """
    points = points.detach().float()
    n = len(points)
    if n < k:
        raise ValueError(f"k-means of {n} points into {k} clusters: faiss needs at least as many points as clusters "
                         "(lower --num_clusters)")
    train = points
    if n > k * MAX_POINTS_PER_CENTROID:
        subset = np.random.default_rng(seed).permutation(n)[: k * MAX_POINTS_PER_CENTROID]
        train = points[torch.from_numpy(subset).to(points.device)]
    m = len(train)
    if m == k:   # faiss: the points are the centroids
        centroids = train.clone()
    else:
        if init is not None:
            centroids = init.detach().float().to(points.device).clone()
        else:
            first = np.random.default_rng(seed + 1).permutation(m)[:k]
            centroids = train[torch.from_numpy(first).to(points.device)].clone()
        previous, split = None, True
        for _ in range(niter):
            assign = nearest_centroid(train, centroids)
            if not split and previous is not None and torch.equal(assign, previous):
                # a fixed point: the centroids are already the means of these very sets, so every remaining
                # iteration would recompute them unchanged (faiss 1.7.1 runs them anyway; faiss >= 1.8 stops too)
                break
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, assign, train)
            # faiss multiplies by 1/count; an empty cluster stays 0 until it is split
            centroids = sums * torch.where(counts > 0, 1.0 / counts.clamp_min(1).float(), 0.0)[:, None]
            # one host sync an iteration: the split loop needs the counts
            split = _split_empty_clusters(centroids, counts.cpu().numpy().astype(np.float32), m) > 0
            previous = assign
    return centroids, nearest_centroid(points, centroids)


# ---------------------------------------------------------------------------------------------
# The two contrastive terms
# ---------------------------------------------------------------------------------------------

def structure_loss(context: torch.Tensor, center: torch.Tensor, nodes: torch.Tensor, temp: float,
                   plain: bool = False) -> torch.Tensor:
    """Σ over the batch rows n of -log exp(ẑ_n·ŷ_n/τ) / Σ_v exp(ẑ_n·ŷ_v/τ), z = `context` (the layer-2h output),
    y = `center` (layer 0), v over every node of that side (the paper's L_S^U and L_S^I; ncl.py:177-206). The
    package's InfoNCE averages over the batch; NCL sums."""
    return info_nce(context, center, nodes, temp, plain=plain) * len(nodes)


def prototype_loss(embeddings: torch.Tensor, nodes: torch.Tensor, centroids: torch.Tensor,
                   assignment: torch.Tensor, temp: float, plain: bool = False) -> torch.Tensor:
    """Σ over the batch rows n of -log exp(ŷ_n·c_{a(n)}/τ) / Σ_j exp(ŷ_n·c_j/τ), y = `embeddings` (layer 0),
    c the normalised centroids (constants), a(n) the node's cluster (the paper's L_P^U and L_P^I; ncl.py:148-175).
    `plain`: the batch x k logits in plain autograd; else each distinct node once through the package's fused
    log-sum-exp (one batch x k buffer), counted per occurrence."""
    if plain:
        x = F.normalize(embeddings[nodes])
        logits = x @ centroids.T / temp
        positive = logits.gather(1, assignment[nodes][:, None]).squeeze(1)
        return (torch.logsumexp(logits, dim=1) - positive).sum()
    unique, occurrence = torch.unique(nodes, return_inverse=True)
    x = F.normalize(embeddings[unique])
    positive = (x * centroids[assignment[unique]]).sum(-1) / temp
    return (LogSumExpLogits.apply(x, centroids, temp) - positive)[occurrence].sum()


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class NCL(PairwiseModel):
    name = "ncl"
    paper = "NCL: neighborhood-enriched contrastive learning for graph collaborative filtering (Lin et al., WWW 2022)"
    phases = ("e_step", "negatives", "recommender")
    # RecBole 1.0's trainer as the authors ran it: Adam lr 1e-3, at most 300 epochs, stop when the validation
    # metric has not improved for more than 10 evaluations (stopping_step 10: after 11); batch 4096 is the
    # authors' properties/overall.yaml (RecBole's own default is 2048)
    defaults = {"batch": 4096, "epoch": 300, "patience": 11, "lr": 1e-3}
    # the values the authors' dataset configs use for ssl_temp and ssl_reg (properties/*.yaml) and the L2 range
    # the maintainers gave for reg_weight (RUCAIBox/NCL issue #27); the paper's §4.1.4 ranges are wider
    grid: ClassVar[Dict[str, list]] = {"reg_weight": [1e-3, 1e-4, 1e-5, 1e-6], "ssl_temp": [0.05, 0.1],
                                       "ssl_reg": [1e-6, 1e-7]}
    published = {"tiktok": (0.0658, 0.0269, 0.0034), "baby": (0.0703, 0.0311, 0.0038),
                 "sports": (0.0765, 0.0349, 0.0040)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        self.user_emb = xavier_uniform(data.n_users, args.embedding_size)
        self.item_emb = xavier_uniform(data.n_items, args.embedding_size)
        self.graph = self.as_graph(symmetric_graph(data.train), symmetric=True)
        # E-step results: side -> normalised centroids (k x d) and every node's cluster; not parameters
        self.centroids: Dict[str, torch.Tensor] = {}
        self.assignment: Dict[str, torch.Tensor] = {}
        self.proto_on = False
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ncl (RUCAIBox/NCL properties/NCL.yaml; the authors' names)")
        g.add_argument("--n_layers", default=3, type=int, help="L: propagation layers of the LightGCN backbone")
        add_pairwise_args(g)
        g.add_argument("--ssl_temp", default=0.1, type=float, help="τ: temperature of both contrastive terms")
        g.add_argument("--ssl_reg", default=1e-7, type=float, help="λ1: weight of the structure-contrastive term")
        g.add_argument("--hyper_layers", default=1, type=int,
                       help="h: the structure term contrasts layer 2h with layer 0 (the even layer: same-type nodes)")
        g.add_argument("--alpha", default=1.0, type=float,
                       help="α: weight of the item side of the structure term (and of the prototype term with "
                            "--proto_alpha)")
        g.add_argument("--proto_reg", default=8e-8, type=float, help="λ2: weight of the prototype-contrastive term")
        g.add_argument("--num_clusters", default=1000, type=int,
                       help="k: prototypes (k-means clusters) per side; at most the number of users and of items")
        g.add_argument("--m_step", default=1, type=int,
                       help="run the E-step (k-means) every this many epochs (trainer.py:42)")
        g.add_argument("--warm_up_step", default=20, type=int,
                       help="epochs before the prototype term joins the loss (the authors' trainer.py:135-136; the "
                            "paper has no warm-up: 0)")
        g.add_argument("--proto_alpha", default=False, type=str2bool,
                       help="false = the authors' code: λ2·(L_P^U + L_P^I) (ncl.py:174); true = the paper's "
                            "L_P = L_P^U + α·L_P^I")
        g.add_argument("--kmeans_niter", default=KMEANS_NITER, type=int,
                       help="Lloyd iterations of each k-means (faiss.Kmeans's default niter, 25)")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        problem = super().check_flags(args) or check_layers(args, "n_layers")
        if problem:
            return problem
        for flag in ("hyper_layers", "warm_up_step", "kmeans_niter"):
            if getattr(args, flag) < 0:
                return f"--{flag} must be 0 or more, got {getattr(args, flag)}"
        for flag in ("num_clusters", "m_step"):
            if getattr(args, flag) < 1:
                return f"--{flag} must be at least 1, got {getattr(args, flag)}"
        if not args.ssl_temp > 0:
            return f"--ssl_temp must be positive, got {args.ssl_temp}"
        return None

    @classmethod
    def check(cls, args: argparse.Namespace, data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        # k-means needs k <= points (faiss throws); only when the prototype term is reached within --epoch
        if args.warm_up_step < args.epoch and args.num_clusters > min(data.n_users, data.n_items):
            return (f"--num_clusters {args.num_clusters} exceeds the {min(data.n_users, data.n_items)} "
                    f"{'users' if data.n_users <= data.n_items else 'items'} of the data: k-means needs at least "
                    f"as many points as clusters")
        return None

    # --- the E-step ---------------------------------------------------------------------------
    def needs_e_step(self, epoch: int) -> bool:
        """The authors' trainer runs it when epoch % m_step == 0 (trainer.py:42); its prototypes are used until the
        next one. Skipped when every epoch they serve is still in the warm-up (their result would be unused)."""
        return epoch % self.args.m_step == 0 and epoch + self.args.m_step - 1 >= self.args.warm_up_step

    @torch.no_grad()
    def e_step(self) -> None:
        """k-means of the layer-0 user rows and of the layer-0 item rows; centroids kept L2-normalised, the
        assignment made against the raw ones (ncl.py:66-86)."""
        with torch.autocast(self.device.type, enabled=False):
            for side, table in (("user", self.user_emb), ("item", self.item_emb)):
                centroids, assignment = kmeans(table.detach(), self.args.num_clusters, self.args.kmeans_niter)
                self.centroids[side] = F.normalize(centroids, dim=1)
                self.assignment[side] = assignment

    def pre_epoch(self, epoch: int, timer: PhaseTimer) -> None:
        with timer.phase("e_step"):
            if self.needs_e_step(epoch):
                self.e_step()

    def train_epoch(self, epoch: int, timer: PhaseTimer):
        self.proto_on = epoch >= self.args.warm_up_step   # trainer.py:135-136 drops the last loss term before
        return super().train_epoch(epoch, timer)

    # --- forward and loss ----------------------------------------------------------------------
    def layer_outputs(self) -> list:
        """E_0 = [Eu; Ei] and E_{l+1} = Â E_l for l < max(L, 2h) (ncl.py:135-146)."""
        outputs = [torch.cat([self.user_emb, self.item_emb])]
        for _ in range(max(self.args.n_layers, 2 * self.args.hyper_layers)):
            outputs.append(self.graph @ outputs[-1])
        return outputs

    def _split(self, nodes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return nodes[: self.data.n_users], nodes[self.data.n_users:]

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mean of E_0..E_L (LightGCN's readout, ncl.py:142-145)."""
        outputs = self.layer_outputs()[: self.args.n_layers + 1]
        return self._split(torch.stack(outputs).mean(0))

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        a = self.args
        outputs = self.layer_outputs()
        user_vec, item_vec = self._split(torch.stack(outputs[: a.n_layers + 1]).mean(0))
        center_u, center_i = self._split(outputs[0])
        context_u, context_i = self._split(outputs[2 * a.hyper_layers])
        reg = emb_loss(self.user_emb[users], self.item_emb[positives], self.item_emb[negatives])
        ssl = (structure_loss(context_u, center_u, users, a.ssl_temp, self.plain)
               + a.alpha * structure_loss(context_i, center_i, positives, a.ssl_temp, self.plain))
        if self.proto_on:
            proto = (prototype_loss(center_u, users, self.centroids["user"], self.assignment["user"], a.ssl_temp,
                                    self.plain)
                     + (a.alpha if a.proto_alpha else 1.0)
                     * prototype_loss(center_i, positives, self.centroids["item"], self.assignment["item"],
                                      a.ssl_temp, self.plain))
        else:   # the warm-up: not in the loss (a zero keeps the reported terms the same every epoch)
            proto = torch.zeros((), device=self.device)
        return {"bpr": bpr_loss(user_vec, item_vec, users, positives, negatives), "reg": a.reg_weight * reg,
                "ssl": a.ssl_reg * ssl, "proto": a.proto_reg * proto}

    # --- resume: the prototypes of the last E-step ---------------------------------------------
    def training_state(self) -> dict:
        state = super().training_state()
        state["clusters"] = {f"{side}_{kind}": table[side].cpu() for side in self.centroids
                             for kind, table in (("centroids", self.centroids), ("assignment", self.assignment))}
        return state

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        clusters = state.get("clusters", {})
        for side in ("user", "item"):
            if f"{side}_centroids" in clusters:
                self.centroids[side] = clusters[f"{side}_centroids"].to(self.device)
                self.assignment[side] = clusters[f"{side}_assignment"].to(self.device)
