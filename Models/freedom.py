"""FREEDOM (Zhou & Shen, ACM MM 2023) as MMRec computes it (models/freedom.py, configs/model/FREEDOM.yaml).

Frozen item graph (MMRec `src/models/freedom.py:64-100` at e775373), built once from the raw features: per modality the
binary kNN graph of cos(X_m) (the item itself included) with values 1/√(r_i r_j), r = row sums + 1e-7 = k,
so every kept entry is 1/k; S = Σ_m β_m S_m. Denoised user-item graph (`freedom.py:128-162`): at every epoch start
⌊|E|(1-ρ)⌋ train edges are drawn without replacement with probability ∝ ω_e = 1/√(d_u d_i) (degrees + 1e-7),
and the kept edges get 1/√(d'_u d'_i) from the kept subgraph's degrees (symmetric, no self-loops).
Forward on a user-item graph Â: h = S^L Ei (L = n_mm_layers = 1), [Ū; Ī'] = mean_{l=0..2} Â^l [Eu; Ei],
items Ī = Ī' + h (not normalised); training uses the pruned graph, evaluation MMRec's full Â_sym.
Loss (`freedom.py:180-210`): BPR(ū, ī⁺, ī⁻) + λ·Σ_m BPR(ū, f_m[pos], f_m[neg]) with f_m = Linear_m(X_m)
and the raw X_m trainable; no L2 term.

MMRec (byte-identical to the authors' repository) hard-codes two modalities: S = 0.1·S_image + 0.9·S_text.
Here any number: β_image = mm_image_weight and the rest split equally over the other modalities (no image:
all equal; one modality: β = 1), or an explicit `--mm_weights` list; image + text gives MMRec's S. The
pruning draws from its own torch generator seeded with --seed (MMRec: the global one), saved with the
training state so a resumed run draws the same graphs. Not carried over: the feature-graph cache file
named by k and the image weight only (stale when the features change); the graph is rebuilt at each start.
MMRec reads lambda_coeff, weight_size, cf_model and degree_ratio without using them: not flags here. No flag
changes MMRec's computation: nothing here fixes a defect of it that shaped its numbers.

Default grid point: dropout ρ = 0.8 and reg_weight λ = 1e-4 (no published per-dataset choice; ρ = 0.8 keeps
twice the edges of 0.9, the safer end on sparse data such as TikTok, λ the middle of the non-zero values).
MMRec runs the whole grid ρ x λ and keeps the best (`Experiments.sweep --grid freedom`).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import scipy.sparse as sp
import torch
import torch.nn.functional as F

from Models.base import (PairwiseModel, PhaseTimer, add_pairwise_args, changed_flags, check_layers,
                         trainable_features)
from Utils.flags import float_list
from Utils.graphs import (coalesce, cosine_topk, edge_inverse_sqrt_degrees, knn_coo, symmetric_edge_graph,
                          symmetric_graph, symnorm, to_scipy, weighted_sum)
from Utils.layers import Graph, bpr_loss, propagate, xavier_uniform

MULTINOMIAL_LIMIT = 1 << 24   # torch.multinomial draws from at most 2^24 categories


def modality_weights(modalities: Sequence[str], image_weight: float,
                     explicit: Optional[Sequence[float]] = None) -> List[float]:
    """β_m of S = Σ_m β_m S_m: `explicit` when given, else image = image_weight and the rest split equally over
    the other modalities (MMRec: 0.1 image, 0.9 text); without image all equal; one modality 1."""
    if explicit is not None:
        return [float(w) for w in explicit]
    if len(modalities) == 1:
        return [1.0]
    if "image" not in modalities:
        return [1.0 / len(modalities)] * len(modalities)
    rest = (1.0 - image_weight) / (len(modalities) - 1)
    return [image_weight if m == "image" else rest for m in modalities]


class FREEDOM(PairwiseModel):
    name = "freedom"
    paper = "FREEDOM: freezing and denoising graph structures for multimodal recommendation (Zhou & Shen, ACM MM 2023)"
    needs_features = True
    phases = ("pruning", "negatives", "recommender")
    grid = {"dropout": [0.8, 0.9], "reg_weight": [0.0, 1e-5, 1e-4, 1e-3]}   # MMRec FREEDOM.yaml
    published_in = "not in DiffMM's paper"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        d = args.embedding_size
        self.user_emb = xavier_uniform(data.n_users, d)
        self.item_emb = xavier_uniform(data.n_items, d)
        # trainable raw features and their projections (used only by the modal BPR terms)
        self.features, self.projections = trainable_features(data, args.feat_embed_dim)
        self.to(device)
        self.item_graph = self.as_graph(self.frozen_item_graph())
        self.full_graph = self.as_graph(symmetric_graph(data.train), symmetric=True)
        self.train_graph = self.full_graph   # replaced by the pruned graph at every epoch start
        # the train edges (row-major) and their sampling weights ω = 1/√(d_u d_i) (`freedom.py:156-162`)
        self.edge_users = torch.from_numpy(self.pair_users).to(device)
        self.edge_items = torch.from_numpy(self.pair_items).to(device)
        self.edge_weights = edge_inverse_sqrt_degrees(self.edge_users, self.edge_items, data.n_users, data.n_items)
        self.pruning_generator = torch.Generator(device=device)
        self.pruning_generator.manual_seed(args.seed)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("freedom (MMRec configs/model/FREEDOM.yaml)",
                                      "MMRec runs the whole grid dropout x reg_weight (`Experiments.sweep --grid "
                                      "freedom`) and keeps the best point; the defaults are one point of it, dropout "
                                      "0.8 and reg_weight 1e-4 (no published choice)")
        g.add_argument("--feat_embed_dim", default=64, type=int,
                       help="size of f_m = Linear_m(X_m) (must equal --embedding_size: scored against ū)")
        g.add_argument("--knn_k", default=10, type=int, help="k: neighbours kept per item (the item itself included)")
        g.add_argument("--n_ui_layers", default=2, type=int, help="propagation layers on the user-item graph")
        g.add_argument("--n_mm_layers", default=1, type=int, help="propagation layers on the item graph S")
        g.add_argument("--mm_image_weight", default=0.1, type=float,
                       help="β_image of S = Σ_m β_m S_m; the other modalities share 1 - β_image equally (given "
                            "beside --mm_weights, which overrides it, a warning says it does nothing)")
        g.add_argument("--mm_weights", default=None, type=float_list,
                       help="explicit β_m, one per modality in the dataset's order (image, text, audio, ...), "
                            "summing to 1; overrides --mm_image_weight (a warning when both are given)")
        g.add_argument("--dropout", default=0.8, type=float,
                       help="ρ: share of train edges pruned at every epoch start (degree-sensitive; 0 = none)")
        add_pairwise_args(g, reg_weight=1e-4)   # embedding_size, reg_weight (λ of the modal BPR terms), scheduler

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        problem = super().check_flags(args) or check_layers(args, "n_ui_layers", "n_mm_layers")
        if problem:
            return problem
        if args.knn_k < 1:
            return f"--knn_k must be at least 1, got {args.knn_k}."
        if args.feat_embed_dim != args.embedding_size:
            return (f"--feat_embed_dim ({args.feat_embed_dim}) must equal --embedding_size ({args.embedding_size}): "
                    f"the modal BPR terms score user vectors against Linear_m(X_m).")
        if not 0.0 <= args.mm_image_weight <= 1.0:
            return f"--mm_image_weight must be in [0, 1], got {args.mm_image_weight}."
        weights = args.mm_weights
        if weights is not None and (not weights or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6):
            return f"--mm_weights needs non-negative numbers summing to 1, one per modality, got {args.mm_weights}."
        if not 0.0 <= args.dropout < 1.0:
            return f"--dropout must be in [0, 1) (the share of train edges pruned), got {args.dropout}."
        return None

    @classmethod
    def flag_warnings(cls, args: argparse.Namespace) -> List[str]:
        """--mm_image_weight beside --mm_weights, which overrides it (warned, not refused: the weights given win)."""
        if args.mm_weights is not None and changed_flags(args, ["mm_image_weight"]):
            return [f"--mm_image_weight {args.mm_image_weight} does nothing: --mm_weights {args.mm_weights} gives "
                    f"every modality's weight (leave one of them out)."]
        return []

    @classmethod
    def check(cls, args: argparse.Namespace, data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        n_modalities = len(data.features)
        if args.knn_k >= data.n_items:
            return f"--knn_k must be between 1 and the number of items - 1 ({data.n_items - 1}), got {args.knn_k}."
        if args.mm_weights is not None and len(args.mm_weights) != n_modalities:
            return (f"--mm_weights needs {n_modalities} non-negative numbers summing to 1, one per modality "
                    f"({', '.join(data.features)}), got {args.mm_weights}.")
        if args.dropout > 0 and data.train.nnz >= MULTINOMIAL_LIMIT:
            return (f"the train matrix has {data.train.nnz} edges, more than torch.multinomial draws from "
                    f"({MULTINOMIAL_LIMIT}); run with --dropout 0.")
        return None

    def frozen_item_graph(self) -> sp.csr_matrix:
        """S = Σ_m β_m S_m, S_m the binary kNN graph of the raw features with entries 1/√(r_i r_j)
        (`freedom.py:79-100`), as a scipy matrix."""
        n = self.data.n_items
        graphs = []
        for x in self.features.values():
            columns = cosine_topk(x, self.args.knn_k)[1]
            graphs.append(symnorm(knn_coo(torch.ones(columns.shape, device=columns.device), columns), n, eps=1e-7))
        weights = modality_weights(list(self.features), self.args.mm_image_weight, self.args.mm_weights)
        return to_scipy(coalesce(weighted_sum(graphs, weights), n), n)

    def pruned_graph(self) -> Graph:
        """Degree-sensitive edge pruning (`freedom.py:128-143`): keep ⌊|E|(1-ρ)⌋ edges drawn without replacement
        ∝ ω, normalised on the kept subgraph, both directions, no self-loops."""
        n_keep = int(len(self.edge_weights) * (1.0 - self.args.dropout))
        kept = torch.multinomial(self.edge_weights, n_keep, replacement=False, generator=self.pruning_generator)
        return symmetric_edge_graph(self.edge_users[kept], self.edge_items[kept], self.data.n_users,
                                    self.data.n_items, self.plain)

    def pre_epoch(self, epoch: int, timer: PhaseTimer) -> None:
        with timer.phase("pruning"):
            self.train_graph = self.pruned_graph() if self.args.dropout > 0 else self.full_graph

    def propagate_all(self, ui_graph: Graph) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ū, Ī = Ī' + S^L Ei with [Ū; Ī'] the mean of Â^l [Eu; Ei], l = 0..n_ui_layers (`freedom.py:164-178`)."""
        h = self.item_emb
        for _ in range(self.args.n_mm_layers):
            h = self.item_graph @ h
        nodes = propagate(ui_graph, torch.cat([self.user_emb, self.item_emb]), self.args.n_ui_layers, "mean")
        return nodes[: self.data.n_users], nodes[self.data.n_users:] + h

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.propagate_all(self.full_graph)   # evaluation on the full graph (`full_sort_predict`)

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        user_vec, item_vec = self.propagate_all(self.train_graph)
        u = user_vec[users]
        modal = 0.0
        for m, x in self.features.items():   # f_m only on the batch's items: the same values and gradients
            project = self.projections[m]
            diff = (u * project(x[positives])).sum(-1) - (u * project(x[negatives])).sum(-1)
            modal = modal - F.logsigmoid(diff).mean()
        return {"bpr": bpr_loss(user_vec, item_vec, users, positives, negatives),
                "modal_bpr": self.args.reg_weight * modal}

