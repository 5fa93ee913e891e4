"""VBPR (He & McAuley, AAAI 2016) as MMRec computes it (models/vbpr.py).

User p_u = Θ_u (2d), item q_i = [Γ_i ; W f_i + b] with f_i the concatenation of every modality's
features (constant), s(u, i) = p_u · q_i. MMRec drops the paper's bias terms (α, β_u, β_i, β'ᵀf_i),
gives the projection E a bias, uses every modality (the paper: visual only) and the unsquared EmbLoss.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from Models.base import PairwiseModel, add_pairwise_args
from Utils.layers import bpr_loss, emb_loss, xavier_uniform


class VBPR(PairwiseModel):
    name = "vbpr"
    paper = "VBPR: visual Bayesian personalised ranking (He & McAuley, AAAI 2016)"
    grid = {"reg_weight": [2.0, 1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-5]}  # MMRec VBPR.yaml
    published = {"tiktok": (0.0380, 0.0134, 0.0018), "baby": (0.0486, 0.0213, 0.0026),
                 "sports": (0.0582, 0.0265, 0.0031)}
    published_in = "DiffMM Table 2"
    needs_features = True

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        d = args.embedding_size
        self.user_emb = xavier_uniform(data.n_users, 2 * d)
        self.item_emb = xavier_uniform(data.n_items, d)
        # the modalities in the dataset's order (MMRec: [text; image], a permutation of the input columns)
        self.register_buffer("features", torch.from_numpy(np.concatenate(list(data.features.values()), axis=1)),
                             persistent=False)
        self.item_linear = nn.Linear(self.features.shape[1], d)
        nn.init.xavier_normal_(self.item_linear.weight)
        nn.init.zeros_(self.item_linear.bias)
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        # embedding_size, reg_weight
        add_pairwise_args(parser.add_argument_group("vbpr (MMRec configs/model/VBPR.yaml)"))

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb, torch.cat([self.item_emb, self.item_linear(self.features)], dim=1)

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        user_vec, item_vec = self.embeddings()
        reg = emb_loss(user_vec[users], item_vec[positives], item_vec[negatives])
        return {"bpr": bpr_loss(user_vec, item_vec, users, positives, negatives), "reg": self.args.reg_weight * reg}
