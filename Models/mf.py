"""MF-BPR (Rendle et al., UAI 2009) as MMRec computes it (models/bpr.py): s(u, i) = Eu[u] · Ei[i].

MMRec, not the paper: Adam on epoch-wise shuffled pairs (the paper: SGD on bootstrap-sampled
triples) and the unsquared EmbLoss (the paper: squared L2 per parameter group).
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

import torch

from Models.base import PairwiseModel, add_pairwise_args
from Utils.layers import bpr_loss, emb_loss, xavier_normal


class MF(PairwiseModel):
    name = "mf"
    paper = "MF-BPR: matrix factorisation with the BPR loss (Rendle et al., UAI 2009)"
    grid = {"reg_weight": [2.0, 1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-5]}  # MMRec BPR.yaml
    # its Table 2 row in DiffMM's paper equals MMSSL's paper digit for digit (copied, not re-run)
    published = {"tiktok": (0.0346, 0.013, 0.0017), "baby": (0.044, 0.02, 0.0024), "sports": (0.043, 0.0202, 0.0023)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        self.user_emb = xavier_normal(data.n_users, args.embedding_size)
        self.item_emb = xavier_normal(data.n_items, args.embedding_size)
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        add_pairwise_args(parser.add_argument_group("mf (MMRec configs/model/BPR.yaml)"))  # embedding_size, reg_weight

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb, self.item_emb

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        """BPR + λ·EmbLoss(Eu[u], Ei[pos], Ei[neg])."""
        reg = emb_loss(self.user_emb[users], self.item_emb[positives], self.item_emb[negatives])
        return {"bpr": bpr_loss(self.user_emb, self.item_emb, users, positives, negatives),
                "reg": self.args.reg_weight * reg}
