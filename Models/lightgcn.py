"""LightGCN (He et al., SIGIR 2020) as MMRec computes it (models/lightgcn.py).

[Ū; Ī] = mean_{l=0..L} Â^l [Eu; Ei] on MMRec's symmetric graph without self-loops (paper Eq. 3-4,
α_k = 1/(K+1)); loss BPR(Ū, Ī) + λ·EmbLoss of the layer-0 rows (MMRec's unsquared norms, where
the paper squares them).
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

import torch

from Models.base import PairwiseModel, add_pairwise_args, check_layers
from Utils.graphs import symmetric_graph
from Utils.layers import bpr_loss, emb_loss, propagate, xavier_uniform


class LightGCN(PairwiseModel):
    name = "lightgcn"
    paper = "LightGCN: simplified graph convolution for recommendation (He et al., SIGIR 2020)"
    grid = {"n_layers": [1, 2, 3, 4], "reg_weight": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]}  # MMRec LightGCN.yaml
    # its Table 2 row in DiffMM's paper equals MMSSL's paper digit for digit (copied, not re-run)
    published = {"tiktok": (0.0653, 0.0282, 0.0033), "baby": (0.0698, 0.0319, 0.0037),
                 "sports": (0.0782, 0.0369, 0.0042)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        self.user_emb = xavier_uniform(data.n_users, args.embedding_size)
        self.item_emb = xavier_uniform(data.n_items, args.embedding_size)
        self.graph = self.as_graph(symmetric_graph(data.train), symmetric=True)
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("lightgcn (MMRec configs/model/LightGCN.yaml)")
        g.add_argument("--n_layers", default=3, type=int, help="K: propagation layers")
        add_pairwise_args(g)

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        return super().check_flags(args) or check_layers(args, "n_layers")

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        nodes = propagate(self.graph, torch.cat([self.user_emb, self.item_emb]), self.args.n_layers, "mean")
        return nodes[: self.data.n_users], nodes[self.data.n_users:]

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        user_vec, item_vec = self.embeddings()
        reg = emb_loss(self.user_emb[users], self.item_emb[positives], self.item_emb[negatives])
        return {"bpr": bpr_loss(user_vec, item_vec, users, positives, negatives), "reg": self.args.reg_weight * reg}
