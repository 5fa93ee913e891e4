"""LATTICE (Zhang et al., ACM MM 2021) as MMRec computes it (models/lattice.py, configs/model/LATTICE.yaml).

Item-item graph (MMRec `src/models/lattice.py:63-87,132-157` at e775373): per modality m a frozen kNN graph of the
initial raw features, S_m = symnorm(knn_k(cos(X_m))), and a learned one of the projected features,
T_m = knn_k(cos(Linear_m(X_m))); with α = softmax(w),

    G = (1 - λc) · symnorm(Σ_m α_m T_m) + λc · Σ_m α_m S_m

(learned: combine then normalise; frozen: normalise then combine). h = G^L Ei (L = n_layers = 1);
[Ū; Ī'] = mean_{l=0..2} P^l [Eu; Ei] on P = D^-1 (A + I), the row-normalised user-item graph with
self-loops (not symmetric); users Ū, items Ī = Ī' + h / ‖h‖₂ (`lattice.py:161-195`).
Loss: BPR + λ·½(‖ū‖² + ‖ī⁺‖² + ‖ī⁻‖²) / 2048, the squared norms of the final batch rows over the
configured batch size (`lattice.py:199-211`).

MMRec's code, not the paper: the paper's LightGCN backbone implies a symmetric normalisation, the code
uses P (as LATTICE-official `codes/utility/load_data.py:145`). G is rebuilt only on the first batch of an
epoch and at every evaluation; the other batches reuse it detached, so Linear_m, the trainable raw
features X_m and w get gradient only on that first batch (`lattice.py:137-159`).

Here, not in MMRec:
- no dense I x I matrix: the kNN graphs are built in row blocks and kept sparse (`Utils/graphs.py`), with the
  same values to float rounding and the same kept entries up to near-ties (see there); the rebuild batch
  takes the top-k columns without gradient (in `pre_epoch`, parameters being those of the first batch) and
  recomputes the kept cosines differentiably, which gives the dense construction's gradient (only kept
  entries carry gradient there too);
- any number of modalities: w has one entry per modality (MMRec: exactly [image, text], w = [0.5, 0.5]);
  with one modality α ≡ 1, as MMRec's single-modality branch;
- the frozen graphs are recomputed from the features at every start (MMRec caches them in a file named by k
  only, stale when the features change); an all-zero feature row has cosine 0 (MMRec: NaN).
- under `--precision bf16` the item graph is still built in fp32 (its columns chosen and its kept cosines
  recomputed alike).
Only MMRec's default backbone `cf_model: lightgcn` is implemented (its `ngcf` and `mf` branches are not).
No flag changes MMRec's computation: nothing here fixes a defect of it that shaped its numbers.

Default grid point: lr 1e-3 (MMRec's overall learning rate, the value every MMRec model gets when its yaml
sets none) and reg_weight 1e-5 (LATTICE-official's `regs[0]`), both in MMRec's grid; MMRec itself runs the
whole grid (`--grid lattice`). LATTICE-official's own lr 5e-4 learns visibly slower here (TikTok, 12 epochs:
test Recall@20 .027 at 5e-4; .069 after 8 epochs at 5e-3).
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from Models.base import PairwiseModel, PhaseTimer, add_pairwise_args, check_layers, trainable_features
from Utils.flags import int_list
from Utils.graphs import (Coo, coalesce, coo_to_csr, cosine_topk, gathered_cosine, knn_coo, row_normalized_graph,
                          symnorm, weighted_sum)
from Utils.layers import Graph, bpr_loss, propagate, xavier_uniform


def sparse_product(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """matrix @ dense in fp32, differentiable in the sparse values and in `dense`."""
    with torch.autocast(dense.device.type, enabled=False):
        return torch.sparse.mm(matrix, dense.float())


class LATTICE(PairwiseModel):
    name = "lattice"
    paper = "LATTICE: mining latent structures for multimedia recommendation (Zhang et al., ACM MM 2021)"
    needs_features = True
    phases = ("item_graph", "negatives", "recommender")
    # MMRec LATTICE.yaml: learning_rate_scheduler [0.96, 50]; lr = MMRec's overall default (module docstring)
    defaults = {**PairwiseModel.defaults, "lr": 1e-3, "learning_rate_scheduler": [0.96, 50.0]}
    grid = {"reg_weight": [0.0, 1e-5, 1e-4, 1e-3], "lr": [1e-4, 5e-4, 1e-3, 5e-3]}   # MMRec LATTICE.yaml
    # its Table 2 row in DiffMM's paper equals MMSSL's paper digit for digit (copied, not re-run)
    published = {"tiktok": (0.0843, 0.0367, 0.0042), "baby": (0.0829, 0.0368, 0.0044),
                 "sports": (0.0915, 0.0424, 0.0048)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        d = args.embedding_size
        self.user_emb = xavier_uniform(data.n_users, d)
        self.item_emb = xavier_uniform(data.n_items, d)
        self.features, self.projections = trainable_features(data, args.feat_embed_dim)
        n_modalities = len(data.features)
        self.modal_weight = nn.Parameter(torch.full((n_modalities,), 1.0 / n_modalities))   # MMRec [0.5, 0.5]
        self.ui_graph = self.as_graph(row_normalized_graph(data.train))
        self.to(device)
        # S_m from the initial raw features, frozen (`lattice.py:63-87`)
        self.frozen_graphs: List[Coo] = [symnorm(knn_coo(*cosine_topk(x, args.knn_k)), data.n_items)
                                         for x in self.features.values()]
        self.rebuild = True                              # MMRec's build_item_graph flag
        self.learned_columns: Optional[List[torch.Tensor]] = None
        self.item_graph: Optional[Graph] = None          # G of the last rebuild, detached

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("lattice (MMRec configs/model/LATTICE.yaml)",
                                      "MMRec runs the whole grid reg_weight x lr (`Experiments.sweep --grid lattice`) "
                                      "and keeps the best point; the defaults are one point of it, lr 1e-3 (MMRec's "
                                      "overall) and reg_weight 1e-5 (LATTICE-official's)")
        g.add_argument("--feat_embed_dim", default=64, type=int,
                       help="size of Linear_m(X_m), the features of the learned graph")
        g.add_argument("--weight_size", default=[64, 64], type=int_list,
                       help="its length is the number of user-item propagation layers (lightgcn: sizes unused)")
        g.add_argument("--n_layers", default=1, type=int, help="L: propagation layers on the item graph G")
        g.add_argument("--knn_k", default=10, type=int, help="k: neighbours kept per item (the item itself included)")
        g.add_argument("--lambda_coeff", default=0.9, type=float, help="λc: weight of the frozen graph in G")
        add_pairwise_args(g, reg_weight=1e-5)   # embedding_size, reg_weight (λ), learning_rate_scheduler

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        problem = super().check_flags(args) or check_layers(args, "n_layers")
        if problem:
            return problem
        for name in ("knn_k", "feat_embed_dim"):
            if getattr(args, name) < 1:
                return f"--{name} must be at least 1, got {getattr(args, name)}."
        return None

    @classmethod
    def check(cls, args: argparse.Namespace, data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        if args.knn_k >= data.n_items:
            return f"--knn_k must be between 1 and the number of items - 1 ({data.n_items - 1}), got {args.knn_k}."
        return None

    def fp32(self):
        """Autocast off: the item graph is built in fp32 under --precision bf16 too, so that the kept cosines
        are recomputed with the precision their columns were chosen in."""
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def learned_topk(self) -> List[torch.Tensor]:
        """The kept columns of knn_k(cos(Linear_m(X_m))) per modality (I x k each), without gradient."""
        with self.fp32():
            return [cosine_topk(self.projections[m](x), self.args.knn_k)[1] for m, x in self.features.items()]

    def build_item_graph(self, columns: List[torch.Tensor]) -> Coo:
        """G = (1-λc)·symnorm(Σ_m α_m T_m) + λc·Σ_m α_m S_m on the kept entries, differentiable in Linear_m,
        X_m and w (`lattice.py:137-157`); coalesced (entries kept by several graphs summed)."""
        n = self.data.n_items
        with self.fp32():
            alpha = torch.softmax(self.modal_weight, dim=0)
            learned = [knn_coo(gathered_cosine(self.projections[m](x), cols), cols)
                       for (m, x), cols in zip(self.features.items(), columns)]
            learned = symnorm(weighted_sum(learned, alpha), n)
            frozen = weighted_sum(self.frozen_graphs, alpha)
            lam = self.args.lambda_coeff
            return coalesce(weighted_sum([learned, frozen], [1.0 - lam, lam]), n)

    def propagate_all(self, item_graph_product: Callable[[torch.Tensor], torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ū, Ī = Ī' + h/‖h‖ with h = G^L Ei and [Ū; Ī'] the mean of P^l [Eu; Ei], l = 0..len(weight_size)."""
        h = self.item_emb
        for _ in range(self.args.n_layers):
            h = item_graph_product(h)
        ui_layers = len(self.args.weight_size)
        nodes = propagate(self.ui_graph, torch.cat([self.user_emb, self.item_emb]), ui_layers, "mean")
        users, items = nodes[: self.data.n_users], nodes[self.data.n_users:]
        return users, items + F.normalize(h, p=2, dim=1)

    def pre_epoch(self, epoch: int, timer: PhaseTimer) -> None:
        """Set the rebuild flag (MMRec `pre_epoch_processing`) and take the top-k columns of the learned graphs
        now: nothing changes the parameters before the epoch's first batch, which rebuilds G from them."""
        with timer.phase("item_graph"):
            self.rebuild = True
            self.learned_columns = self.learned_topk()

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The evaluation forward: G rebuilt from the current parameters (`full_sort_predict`, `lattice.py:232`)."""
        n = self.data.n_items
        graph = coo_to_csr(self.build_item_graph(self.learned_topk()), (n, n), coalesced=True)
        return self.propagate_all(lambda h: sparse_product(graph, h))

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        if self.rebuild:   # the epoch's first batch: G with gradient; later batches reuse it detached
            graph = self.build_item_graph(self.learned_columns or self.learned_topk())
            n, (rows, cols, values) = self.data.n_items, graph
            values = values.detach()   # on the device: G and Gᵀ as CSR, no trip through scipy
            self.item_graph = Graph.from_tensors(coo_to_csr((rows, cols, values), (n, n), coalesced=True),
                                                 coo_to_csr(coalesce((cols, rows, values), n), (n, n), coalesced=True),
                                                 plain=self.plain)
            self.rebuild, self.learned_columns = False, None
            matrix = coo_to_csr(graph, (n, n), coalesced=True)
            user_vec, item_vec = self.propagate_all(lambda h: sparse_product(matrix, h))
        else:
            user_vec, item_vec = self.propagate_all(self.item_graph.__matmul__)
        u, pos, neg = user_vec[users], item_vec[positives], item_vec[negatives]
        squares = 0.5 * ((u ** 2).sum() + (pos ** 2).sum() + (neg ** 2).sum()) / self.args.batch
        return {"bpr": bpr_loss(user_vec, item_vec, users, positives, negatives),
                "reg": self.args.reg_weight * squares}
