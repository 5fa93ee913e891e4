"""BM3 (Zhou et al., WWW 2023) as MMRec computes it (models/bm3.py, byte-identical to the authors' enoche/BM3).

Self-supervised, no negatives: batches are the (u, i) train pairs.

- Online: [Ū; Ī'] = LGN_L([Eu; Ei]) on Â_sym (mean of the layers, no self-loops); Ī = Ī' + Ei; per modality
  f_m = Linear_m(X_m) with X_m the raw features, trainable (MMRec's `Embedding.from_pretrained(freeze=False)`).
- Targets, no gradient, inverted dropout p always on in training
  (MMRec bm3.py:106-119): U_t = drop_p(Ū), I_t = drop_p(Ī), T_m = drop_p(f_m).
- With C(a, b) = 1 - mean_batch cos(a, b) and the predictor P (one Linear d -> d, MMRec bm3.py:121-147):
  L = C(P(Ū)[u], I_t[i]) + C(P(Ī)[i], U_t[u]) + λ·EmbLoss(Ū, Ī)
      + cl_weight·Σ_m [C(P(f_m)[i], I_t[i]) + C(P(f_m)[i], T_m[i])]
  where EmbLoss is MMRec's unsquared norm (the papers write squared L2) over the full U x d and I x d
  tables divided by I, and cl_weight = 2.0 is fixed by BM3.yaml.
- Scores P(Ū) P(Ī)ᵀ (MMRec full_sort_predict, bm3.py:149-154).

MMRec's code (the authors' own) is the default throughout: one Linear per modality, the unsquared
full-table EmbLoss, the 2.0 weight. Row-wise steps (predictor, target dropout, f_m) run on the distinct
batch rows only: the same values and gradients as MMRec's full tables, one dropout mask per row as there.
Generalisation: MMRec hard-codes {image, text} with independent per-modality terms; here the sum runs
over the dataset's modalities (any |M| >= 1), which is MMRec's computation for M = (image, text).
No defect of MMRec's BM3 shapes the numbers, so there is no fix flag. Default point: the authors' Baby
best (n_layers 1, reg_weight 0.1, dropout 0.5; BM3-official README).
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from Models.base import PairwiseModel, add_pairwise_args, check_layers
from Utils.graphs import symmetric_graph
from Utils.layers import emb_loss, propagate, xavier_uniform


def dropout_target(x: torch.Tensor, p: float) -> torch.Tensor:
    """A target view: inverted dropout with rate p (kept entries scaled by 1/(1-p)), always on, no gradient
    (MMRec `F.dropout(x.clone(), p)` inside `torch.no_grad()`, whatever the module's mode)."""
    with torch.no_grad():
        return F.dropout(x.detach(), p, training=True)


def cosine_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """C(a, b) = 1 - mean over the batch of cos(a_n, b_n) (MMRec bm3.py:121-147)."""
    return 1 - F.cosine_similarity(online, target, dim=-1).mean()


class BM3(PairwiseModel):
    name = "bm3"
    paper = "BM3: bootstrap latent representations for multi-modal recommendation (Zhou et al., WWW 2023)"
    needs_features = True
    uses_negatives = False
    grid = {"n_layers": [1, 2], "reg_weight": [0.1, 0.01], "dropout": [0.3, 0.5]}  # MMRec BM3.yaml
    published = {"tiktok": (0.0957, 0.0404, 0.0048), "baby": (0.0839, 0.0361, 0.0044),
                 "sports": (0.0975, 0.0442, 0.0051)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        d = args.embedding_size
        self.user_emb = xavier_uniform(data.n_users, d)
        self.item_emb = xavier_uniform(data.n_items, d)
        self.predictor = nn.Linear(d, d)
        nn.init.xavier_normal_(self.predictor.weight)
        # raw features are trainable copies (MMRec from_pretrained(freeze=False)); Linear_m: d_m -> d
        self.features = nn.ParameterDict()
        self.feature_linear = nn.ModuleDict()
        for modality, values in data.features.items():
            self.features[modality] = nn.Parameter(torch.from_numpy(values.copy()))
            self.feature_linear[modality] = nn.Linear(values.shape[1], d)
            nn.init.xavier_normal_(self.feature_linear[modality].weight)
        self.graph = self.as_graph(symmetric_graph(data.train), symmetric=True)
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("bm3 (MMRec configs/model/BM3.yaml; default = the authors' Baby best point)")
        g.add_argument("--n_layers", default=1, type=int, help="L: LightGCN layers of the online encoder")
        g.add_argument("--dropout", default=0.5, type=float,
                       help="p: dropout rate that makes the target views (inverted dropout, no gradient)")
        g.add_argument("--cl_weight", default=2.0, type=float,
                       help="weight of the multi-modal terms (MMRec BM3.yaml fixes 2.0)")
        add_pairwise_args(g, reg_weight=0.1)   # embedding_size, reg_weight (λ of the full-table EmbLoss)

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        problem = super().check_flags(args) or check_layers(args, "n_layers")
        if problem:
            return problem
        if not 0.0 <= args.dropout < 1.0:
            return f"--dropout must be in [0, 1) (1 would zero every target), got {args.dropout}."
        return None

    @classmethod
    def check(cls, args: argparse.Namespace, data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        if not data.features:
            return "bm3 needs at least one modality's feature file (<modality>_feat.npy)."
        return None

    def online(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ū and Ī = Ī' + Ei with [Ū; Ī'] = LGN_L([Eu; Ei]) on Â_sym (MMRec bm3.py:84-95)."""
        nodes = propagate(self.graph, torch.cat([self.user_emb, self.item_emb]), self.args.n_layers, "mean")
        return nodes[: self.data.n_users], nodes[self.data.n_users:] + self.item_emb

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """P(Ū) and P(Ī): the predictor outputs score the items (MMRec bm3.py:149-154)."""
        user_vec, item_vec = self.online()
        return self.predictor(user_vec), self.predictor(item_vec)

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        p = self.args.dropout
        user_vec, item_vec = self.online()
        # Every row-wise step runs on the distinct batch rows only: the predictor (P(Ū)[u] = P(Ū[u])), the
        # dropout of the targets and f_m. Same values and gradients as MMRec's full tables, and one dropout
        # mask per row as there (a row twice in the batch gets the same target twice).
        batch_users, user_occurrence = torch.unique(users, return_inverse=True)
        batch_items, item_occurrence = torch.unique(positives, return_inverse=True)
        user_target = dropout_target(user_vec[batch_users], p)[user_occurrence]
        item_target = dropout_target(item_vec[batch_items], p)[item_occurrence]
        user_online, item_online = self.predictor(user_vec[users]), self.predictor(item_vec[positives])
        terms = {"ui": cosine_loss(user_online, item_target), "iu": cosine_loss(item_online, user_target),
                 "reg": self.args.reg_weight * emb_loss(user_vec, item_vec)}   # full tables, ÷ I
        modal = user_vec.new_zeros(())
        for modality, features in self.features.items():
            feature_vec = self.feature_linear[modality](features[batch_items])
            feature_target = dropout_target(feature_vec, p)[item_occurrence]
            feature_online = self.predictor(feature_vec)[item_occurrence]
            modal = modal + cosine_loss(feature_online, item_target) + cosine_loss(feature_online, feature_target)
        terms["cl"] = self.args.cl_weight * modal
        return terms
