"""LGMRec (Guo et al., AAAI 2024) as MMRec computes it (models/lgmrec.py, byte-identical to georgeguo-cn/LGMRec).

Local and global graph learning, with R the binary U x I train matrix and Â_sym
MMRec's symmetric graph without self-loops:
- CGE (lgmrec.py:89-100): C = LGN_{n_ui}([Eu; Ei]) on Â_sym (mean of the layers).
- MGE per modality m (:103-113): F_i = X_m W_m (raw features frozen), F_u = diag(1/deg_u) R F_i (the mean
  of the user's items), G_m = Â_sym^{n_mm} [F_u; F_i] (last layer only). Local Lc = C + Σ_m rownorm(G_m).
- GHE (:117-151, 202-214): hyperedge memberships every forward, inference included:
  Hi_m = gumbel_softmax(X_m V_m, τ) and Hu_m = gumbel_softmax(R X_m V_m, τ) (soft, τ = 0.2, over the H
  hyperedges), each with dropout
  1 - keep_rate in training; n_hyper layers Λ = Hiᵀ Z, Z ← Hi Λ, Zu = Hu Λ from Z = C's item rows;
  Gl = Σ_m [Zu_m; Z_m]; E = Lc + α·rownorm(Gl).
- Loss (:159-194): mean BPR + cl_weight·HCL + reg_weight·EmbLoss(ū, ī⁺, ī⁻) with
  NCE(a, b, Y) = -Σ_batch log(exp(â·b̂/τ) / Σ_{every row y of Y} exp(â·ŷ/τ)) (rows L2-normalised, summed, not
  averaged), HCL = NCE(Zu_m1[u], Zu_m2[u], Zu_m2) + NCE(Z_m1[i⁺], Z_m2[i⁺], Z_m2).
- Scores E_u · E_i.

MMRec's code (the authors' own) is the default: the NCE summed (not averaged) over the batch, the
unsquared EmbLoss of the batch rows. MMRec's `cf_model: mf` is `--n_ui_layers 0`
here. W_m maps to `--embedding_size` (MMRec's feat_embed_dim must equal it for the sum Lc).
Generalisation (MMRec needs exactly image and text and crashes on one modality): MGE and GHE sum over
the dataset's modalities; HCL sums over the pairs m1 < m2 in the dataset's modality order (m1 anchor,
m2 positive and contrast set), which is MMRec's computation for M = (image, text); |M| = 1 has no HCL.
Evaluation runs one forward per evaluation (MMRec: one per 4,096-user batch): every user's scores are
still one draw of the Gumbel noise, so the expected metrics are the same.

Flags that fix defects (default = MMRec):
- `--deterministic_hyper`: plain softmax(logits/τ) at evaluation instead of fresh Gumbel noise, so the
  same weights always rank the same way.
"""
from __future__ import annotations

import argparse
from itertools import combinations
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from Models.base import PairwiseModel, add_pairwise_args, check_layers
from Utils.flags import str2bool
from Utils.graphs import binary, row_normalized, symmetric_graph
from Utils.layers import bpr_loss, emb_loss, info_nce, propagate, xavier_uniform


class LGMRec(PairwiseModel):
    name = "lgmrec"
    paper = "LGMRec: local and global graph learning for multimodal recommendation (Guo et al., AAAI 2024)"
    needs_features = True
    tau = 0.2   # Gumbel-softmax and HCL temperature, fixed in MMRec (lgmrec.py:33)
    # A subset of the official ranges (LGMRec-official configs/model/LGMREC.yaml:5-12) holding the
    # published Baby point (1, 4, 0.5, 0.3), the Sports one (keep 0.4, α 0.6; the official log used
    # n_hyper 4) and Clothing's n_hyper 2 / H 64; the other flags stay at MMRec's yaml values.
    grid = {"n_hyper_layer": [1, 2, 4], "hyper_num": [4, 64], "keep_rate": [0.4, 0.5], "alpha": [0.3, 0.6]}
    published_in = "not in DiffMM's paper"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        d = args.embedding_size
        self.user_emb = xavier_uniform(data.n_users, d)
        self.item_emb = xavier_uniform(data.n_items, d)
        # raw features are constants (MMRec from_pretrained(freeze=True)); W_m: d_m -> d, V_m: d_m -> H
        self.features = {m: torch.from_numpy(values).to(device) for m, values in data.features.items()}
        self.feature_proj = nn.ParameterDict()
        self.hyper_proj = nn.ParameterDict()
        for modality, values in data.features.items():
            self.feature_proj[modality] = xavier_uniform(values.shape[1], d)
            self.hyper_proj[modality] = xavier_uniform(values.shape[1], args.hyper_num)
        self.drop = nn.Dropout(p=1.0 - args.keep_rate)
        self.graph = self.as_graph(symmetric_graph(data.train), symmetric=True)
        interactions = binary(data.train)
        self.interactions = self.as_graph(interactions)          # R: sums of item rows
        # diag(1/(deg_u + 1e-7)) R: means of the user's item rows (MMRec num_inters, lgmrec.py:37,107)
        self.user_mean = self.as_graph(row_normalized(interactions, eps=1e-7))
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("lgmrec (MMRec configs/model/LGMRec.yaml, its Baby point)")
        g.add_argument("--n_ui_layers", default=2, type=int, help="LightGCN layers of the collaborative graph (CGE)")
        g.add_argument("--n_mm_layers", default=2, type=int,
                       help="propagation layers of the modality graphs (MGE; the last layer is kept)")
        g.add_argument("--n_hyper_layer", default=1, type=int, help="hypergraph layers (GHE)")
        g.add_argument("--hyper_num", default=4, type=int, help="H: number of hyperedges per modality")
        g.add_argument("--keep_rate", default=0.5, type=float,
                       help="1 - dropout rate of the hyperedge memberships in training")
        g.add_argument("--alpha", default=0.3, type=float, help="α: weight of the global (hypergraph) embeddings")
        g.add_argument("--cl_weight", default=1e-4, type=float, help="weight of the hypergraph contrastive loss HCL")
        g.add_argument("--deterministic_hyper", default=False, type=str2bool, nargs="?", const=True,
                       help="fix: plain softmax of the hyperedge logits at evaluation (MMRec: fresh Gumbel "
                            "noise at every evaluation forward)")
        add_pairwise_args(g, reg_weight=1e-6)   # embedding_size, reg_weight

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        problem = super().check_flags(args) or check_layers(args, "n_ui_layers", "n_mm_layers")
        if problem:
            return problem
        if args.n_hyper_layer < 1:
            return f"--n_hyper_layer must be 1 or more (the user hypergraph embeddings come from a layer), " \
                   f"got {args.n_hyper_layer}."
        if args.hyper_num < 1:
            return f"--hyper_num must be 1 or more, got {args.hyper_num}."
        if not 0.0 < args.keep_rate <= 1.0:
            return f"--keep_rate must be in (0, 1], got {args.keep_rate}."
        return None

    @classmethod
    def check(cls, args: argparse.Namespace, data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        if not data.features:
            return "lgmrec needs at least one modality's feature file (<modality>_feat.npy)."
        return None

    # ------------------------------------------------------------------ pieces of the forward
    def gumbel_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """Standard Gumbel noise shaped like `logits` (torch's gumbel_softmax draws it this way)."""
        return -torch.empty_like(logits).exponential_().log()

    def hyperedges(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft memberships over the H hyperedges (MMRec :117-126): gumbel_softmax(logits, τ, hard=False);
        with --deterministic_hyper, at evaluation softmax(logits/τ)."""
        if self.training or not self.args.deterministic_hyper:
            logits = logits + self.gumbel_noise(logits)
        return torch.softmax(logits / self.tau, dim=1)

    def modal_graph(self, modality: str) -> torch.Tensor:
        """G_m = Â_sym^{n_mm} [F_u; F_i], F_i = X_m W_m, F_u = the mean of the user's F_i (MMRec :103-113)."""
        item_feat = self.features[modality] @ self.feature_proj[modality]
        nodes = torch.cat([self.user_mean @ item_feat, item_feat])
        for _ in range(self.args.n_mm_layers):
            nodes = self.graph @ nodes
        return nodes

    def hypergraph(self, item_hyper: torch.Tensor, user_hyper: torch.Tensor, items: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """HGNN (MMRec HGNNLayer, :202-214): Λ = Hiᵀ Z, Z ← Hi Λ, Zu = Hu Λ, n_hyper layers."""
        for _ in range(self.args.n_hyper_layer):
            latent = item_hyper.T @ items
            items = item_hyper @ latent
            users = user_hyper @ latent
        return users, items

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """E_u, E_i and, per modality, the hypergraph embeddings (Zu_m, Z_m) the HCL contrasts."""
        n_users = self.data.n_users
        collab = propagate(self.graph, torch.cat([self.user_emb, self.item_emb]), self.args.n_ui_layers, "mean")
        local, global_, hyper = collab, 0.0, {}
        for modality, features in self.features.items():
            local = local + F.normalize(self.modal_graph(modality))
            item_logits = features @ self.hyper_proj[modality]
            user_logits = self.interactions @ item_logits        # sums of the user's item logits
            item_hyper, user_hyper = self.hyperedges(item_logits), self.hyperedges(user_logits)
            user_z, item_z = self.hypergraph(self.drop(item_hyper), self.drop(user_hyper), collab[n_users:])
            hyper[modality] = (user_z, item_z)
            global_ = global_ + torch.cat([user_z, item_z])
        nodes = local + self.args.alpha * F.normalize(global_)
        return nodes[:n_users], nodes[n_users:], hyper

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        user_vec, item_vec, _ = self.forward()
        return user_vec, item_vec

    def nce(self, anchor: torch.Tensor, other: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """MMRec ssl_triple_loss: InfoNCE *summed* over the batch nodes, denominator over every row of `other`."""
        return info_nce(anchor, other, nodes, self.tau, plain=self.plain) * len(nodes)

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        user_vec, item_vec, hyper = self.forward()
        hcl = user_vec.new_zeros(())
        for first, second in combinations(hyper, 2):   # pairs m1 < m2 in the dataset's modality order
            (user_a, item_a), (user_b, item_b) = hyper[first], hyper[second]
            hcl = hcl + self.nce(user_a, user_b, users) + self.nce(item_a, item_b, positives)
        reg = emb_loss(user_vec[users], item_vec[positives], item_vec[negatives])
        return {"bpr": bpr_loss(user_vec, item_vec, users, positives, negatives),
                "hcl": self.args.cl_weight * hcl, "reg": self.args.reg_weight * reg}
