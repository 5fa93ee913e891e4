"""NGCF: neural graph collaborative filtering (Wang et al., SIGIR 2019), as the authors' TensorFlow code computes it
(github xiangwang1223/neural_graph_collaborative_filtering at a718a4f, NGCF/NGCF.py), checked against the PyTorch
port the field uses (github huangtinglin/NGCF-PyTorch at f4e7f69, NGCF/NGCF.py).

With E⁰ = [Eu; Ei] (Xavier-uniform) and Â the graph of `--adj_type` (default `norm`: Â = D⁻¹(A + I), row-normalised
with self-loops, NGCF/utility/load_data.py:130), layer k = 0..L-1 of the embedding propagation (paper Eq. 3-7) is

    S = Â Eᵏ                                              (sum of the neighbours' messages, self-loop included)
    Eᵏ⁺¹ = LeakyReLU(S W_gc + b_gc) + LeakyReLU((Eᵏ ⊙ S) W_bi + b_bi)      (slope 0.2; NGCF.py:198-213)
    Eᵏ⁺¹ ← message dropout(Eᵏ⁺¹)                                            (NGCF.py:216)

and the representation is [E⁰ ‖ norm(E¹) ‖ ... ‖ norm(Eᴸ)], each layer's output L2-normalised per row before the
concatenation (NGCF.py:219-223; paper Eq. 9 without the normalisation); score = inner product (Eq. 10).
Loss per batch (NGCF.py:274-296): mean -log σ(s⁺ - s⁻) + λ·½(‖u‖² + ‖i⁺‖² + ‖i⁻‖²)/B on the batch's final vectors.
Batches (NGCF/utility/load_data.py:144-182): ⌊n_train/B⌋ + 1 per epoch, each B distinct users with a train item,
one positive uniform over the user's train items, one negative uniform over the items not in them.

Where the authors' code, the paper and the PyTorch port differ, a flag (default = the authors' TF code):
- `--activation split|joint`: TF applies LeakyReLU to each branch and adds them; the port (and the paper's
  Eq. 4-7) apply one LeakyReLU to the sum.
- `--adj_type norm|plain|gcmc|mean|laplacian`: TF's four choices (NGCF.py:337-351); `laplacian` is the paper's
  L + I with L = D^-1/2 A D^-1/2 (Eq. 7-8). The port always uses `norm`.
- `--bi_messages all|neighbours`: the code's product Eᵏ ⊙ (Â Eᵏ) includes the self-loop term Â_uu e_u ⊙ e_u; the
  paper's m_u←u = W1 e_u has no product term (Eq. 4, and Eq. 7's L E ⊙ E).
- `--use_bias`: both codes add b_gc, b_bi; the paper's Eq. 3-7 have none.
- `--norm_layers`: both codes L2-normalise each layer's output in the concatenation; the paper does not.
- `--node_dropout_flag`: TF's default 0 (off, the README's command) vs the port's 1 (on). Both drop *entries*
  of Â (each kept with 1 - p, scaled by 1/(1-p), one mask per batch for every layer); `--node_dropout_type
  nodes` drops whole nodes as the paper's §2.4.2 describes (a node's outgoing messages, a new draw per layer).
- `--reg_target outputs|parameters`: both codes regularise the batch's final vectors; the paper's Eq. 11 is
  λ‖Θ‖² over the parameters (embeddings and weight matrices).
- `--eval_mess_dropout`: the port creates nn.Dropout inside forward, so its message dropout stays on at
  evaluation (NGCF-PyTorch NGCF/NGCF.py:132); TF feeds 0 at test time (batch_test.py:150-167).

Not carried over: the 100 row folds of Â (the same product in one), log(σ(x)) (here logsigmoid: equal but where
TF's overflows), per-user Python sampling (drawn on the device, the same distributions, another random stream),
TF's evaluation (the harness's, on validation and test), `--pretrain`, `--alg_type gcn|gcmc` (other models).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from DataHandler import Data
from Models.base import PhaseTimer, RecModel, changed_flags, flag_list
from Utils.flags import float_list, int_list, str2bool
from Utils.graphs import binary, bipartite
from Utils.layers import Graph

LEAKY_SLOPE = 0.2   # tf.nn.leaky_relu's default alpha (NGCF.py:203); the port sets negative_slope=0.2 to match it
ADJ_TYPES = ("norm", "plain", "gcmc", "mean", "laplacian")


# ---------------------------------------------------------------------------------------------
# The graph (host, scipy, float64 then float32 once: the authors' arithmetic)
# ---------------------------------------------------------------------------------------------

def _inverse(degree: np.ndarray, power: float) -> np.ndarray:
    """degree^power with 0 where the degree is 0 (the authors' d_inv[np.isinf(d_inv)] = 0)."""
    out = np.zeros_like(degree)
    np.power(degree, power, out=out, where=degree > 0)
    return out


def ngcf_adjacency(train: sp.spmatrix, adj_type: str = "norm") -> sp.csr_matrix:
    """Â of `--adj_type` on A = [[0, R], [Rᵀ, 0]] (R binary), as float32 CSR with sorted indices.

    norm: D⁻¹(A + I), D the row sums of A + I (TF load_data.py:130, the port's load_data.py:144); plain: A;
    gcmc: D⁻¹A; mean: D⁻¹A + I (TF NGCF.py:337-351); laplacian: D^-1/2 A D^-1/2 + I (the paper's L + I, Eq. 8).
    """
    a = bipartite(binary(train)).astype(np.float64)
    eye = sp.identity(a.shape[0], np.float64, "csr")
    if adj_type == "plain":
        out = a
    elif adj_type == "norm":
        a_i = a + eye
        out = sp.diags(_inverse(np.asarray(a_i.sum(axis=1)).ravel(), -1.0)) @ a_i
    elif adj_type in ("gcmc", "mean"):
        out = sp.diags(_inverse(np.asarray(a.sum(axis=1)).ravel(), -1.0)) @ a
        if adj_type == "mean":
            out = out + eye
    elif adj_type == "laplacian":
        d = sp.diags(_inverse(np.asarray(a.sum(axis=1)).ravel(), -0.5))
        out = d @ a @ d + eye
    else:
        raise ValueError(f"unknown adj_type {adj_type!r}; one of {', '.join(ADJ_TYPES)}")
    out = sp.csr_matrix(out).astype(np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


class DropGraph:
    """Â on the device with what a per-batch entry dropout needs: the CSR of Â and of Âᵀ, the position of each
    entry of Âᵀ among Â's entries, and where each node's self-loop entry is.

    A dropped graph keeps Â's pattern with the dropped values set to 0 (the product is that of the authors'
    `sparse_retain` result; no re-indexing per batch), kept values scaled by 1/keep."""

    def __init__(self, adj: sp.csr_matrix, device: torch.device, plain: bool):
        self.plain = plain
        n = adj.shape[0]
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(adj.indptr))
        cols = adj.indices.astype(np.int64)
        order_t = np.lexsort((rows, cols))       # Âᵀ's CSR order: by column of Â, then row
        crow_t = np.zeros(n + 1, dtype=np.int64)
        crow_t[1:] = np.cumsum(np.bincount(cols, minlength=n))
        diag = np.full(n, -1, dtype=np.int64)
        on_diag = np.flatnonzero(rows == cols)
        diag[rows[on_diag]] = on_diag
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.crow, self.col, self.values = t(adj.indptr.astype(np.int64)), t(cols), t(adj.data.astype(np.float32))
        self.crow_t, self.col_t, self.order_t = t(crow_t), t(rows[order_t]), t(order_t)
        self.has_diag = t(diag >= 0)
        self.diag_pos = t(np.maximum(diag, 0))
        self.nnz, self.n = len(cols), n

    def graph(self, values: torch.Tensor) -> Graph:
        """Â's pattern with these values (in Â's CSR order), and its transpose, as a Graph."""
        shape = (self.n, self.n)
        matrix = torch.sparse_csr_tensor(self.crow, self.col, values, size=shape, check_invariants=False)
        matrix_t = torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.order_t], size=shape,
                                           check_invariants=False)
        return Graph.from_tensors(matrix, matrix_t, self.plain)

    def diagonal(self, values: torch.Tensor) -> torch.Tensor:
        """Each node's self-loop value under these entry values (0 without a self-loop)."""
        return torch.where(self.has_diag, values[self.diag_pos], torch.zeros((), device=values.device))


@dataclass
class Draws:
    """One batch's random draws: per layer the graph (entry-dropped or Â), its self-loop values, and the message
    dropout's mask, 0 or 1/(1-p) (None: no dropout)."""

    graphs: List[Graph]
    diagonals: List[torch.Tensor]
    keeps: List[Optional[torch.Tensor]]


class NGCF(RecModel):
    """E⁰ = [Eu; Ei], L propagation layers (W_gc, b_gc, W_bi, b_bi each), Adam, the authors' batches."""

    name = "ngcf"
    paper = "NGCF: neural graph collaborative filtering (Wang et al., SIGIR 2019)"
    phases = ("sampling", "augment", "recommender")
    uses_negatives = True   # batch_loss(users, positives, negatives), as the MMRec models' (tests/test_cuda.py probes)
    # The README's Gowalla command (TF and port): lr 1e-4, batch 1024, 400 epochs; NGCF.py:480-514 evaluates every
    # 10 epochs and stops after 5 evaluations in a row without a better Recall@20 (helper.py:35-50, flag_step=5)
    defaults = {"lr": 1e-4, "batch": 1024, "epoch": 400, "tstEpoch": 10, "patience": 5}
    # the paper's §4.2.3 search: lr x the L2 coefficient (dropout ratios, also searched there, stay at 0.1)
    grid = {"lr": [1e-4, 5e-4, 1e-3, 5e-3], "regs": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]}
    # its Table 2 row in DiffMM's paper equals MMSSL's paper digit for digit
    published = {"tiktok": (0.0604, 0.0238, 0.0030), "baby": (0.0591, 0.0261, 0.0032),
                 "sports": (0.0695, 0.0318, 0.0037)}
    published_in = "DiffMM Table 2"

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        sizes = [args.embed_size, *args.layer_size]
        self.n_layers = len(args.layer_size)
        # the authors read mess_dropout[k] for layer k (the rest unread); one rate here serves every layer
        self.mess_dropout = (args.mess_dropout * self.n_layers if len(args.mess_dropout) == 1
                             else list(args.mess_dropout[: self.n_layers]))
        # parameters in the authors' order and names (NGCF.py:114-148), Xavier-uniform, biases included
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(data.n_users, args.embed_size)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(data.n_items, args.embed_size)))
        weights = {}
        for k in range(self.n_layers):
            for kind in ("gc", "bi"):
                weights[f"W_{kind}_{k}"] = nn.init.xavier_uniform_(torch.empty(sizes[k], sizes[k + 1]))
                bias = nn.init.xavier_uniform_(torch.empty(1, sizes[k + 1]))
                weights[f"b_{kind}_{k}"] = bias if args.use_bias else torch.zeros_like(bias)
        self.weights = nn.ParameterDict({k: nn.Parameter(v, requires_grad=args.use_bias or k.startswith("W"))
                                         for k, v in weights.items()})
        adj = ngcf_adjacency(data.train, args.adj_type)
        self.adj = DropGraph(adj, device, self.plain)
        self.graph = self.adj.graph(self.adj.values)
        self.self_loops = self.adj.diagonal(self.adj.values)
        # the batches' draws (users, items, node and message dropout), on the device; saved in last.pt
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(args.seed)
        train = data.train.tocsr(copy=True)
        train.eliminate_zeros()
        train.sum_duplicates()
        train.sort_indices()
        self.n_train = int(train.nnz)
        self.indptr = torch.from_numpy(train.indptr.astype(np.int64)).to(device)
        self.indices = torch.from_numpy(train.indices.astype(np.int64)).to(device)
        self.counts = self.indptr[1:] - self.indptr[:-1]
        self.active_users = torch.from_numpy(np.flatnonzero(np.diff(train.indptr) > 0)).to(device)
        # the j-th (sorted) train item s_j of user u has s_j - j non-train items below it; u·I + s_j - j is sorted
        # over the whole matrix, so the r-th non-train item of u is r + #{j: s_j - j <= r} (a binary search)
        rows = np.repeat(np.arange(data.n_users, dtype=np.int64), np.diff(train.indptr))
        rank = np.arange(train.nnz, dtype=np.int64) - train.indptr[rows]
        self.gap_keys = torch.from_numpy(rows * data.n_items + train.indices - rank).to(device)
        self.to(device)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=args.lr)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group(
            "ngcf (the authors' NGCF/utility/parser.py names; defaults = their README command and TF code)")
        g.add_argument("--embed_size", default=64, type=int, help="d: size of the ID embeddings E⁰")
        g.add_argument("--layer_size", default="[64,64,64]", type=int_list,
                       help="output size of each propagation layer; its length is L")
        g.add_argument("--regs", default="[1e-5]", type=float_list,
                       help="only regs[0] is read: λ of the L2 term (see --reg_target)")
        g.add_argument("--adj_type", default="norm", choices=ADJ_TYPES,
                       help="Â: norm = D⁻¹(A+I) (TF's default, the port's only graph); plain = A; gcmc = D⁻¹A; "
                            "mean = D⁻¹A + I (TF NGCF.py:337-351); laplacian = D^-1/2 A D^-1/2 + I (the paper's "
                            "L + I, Eq. 8)")
        g.add_argument("--activation", default="split", choices=["split", "joint"],
                       help="split = LeakyReLU(S W_gc + b_gc) + LeakyReLU((E⊙S) W_bi + b_bi) (TF NGCF.py:203-213); "
                            "joint = LeakyReLU of the sum (the PyTorch port NGCF.py:118-129, the paper's Eq. 4-7)")
        g.add_argument("--bi_messages", default="all", choices=["all", "neighbours"],
                       help="the product term E ⊙ (Â E): all = the self-loop's message too (both codes); "
                            "neighbours = the neighbours' only (the paper's Eq. 4 and 7: E ⊙ L E)")
        g.add_argument("--use_bias", default=True, type=str2bool,
                       help="add b_gc and b_bi (both codes); false = none (the paper's Eq. 3-7)")
        g.add_argument("--norm_layers", default=True, type=str2bool,
                       help="L2-normalise each layer's output in the concatenation (both codes, NGCF.py:219); "
                            "false = concatenate the raw outputs (the paper's Eq. 9)")
        g.add_argument("--node_dropout_flag", default=0, type=int, choices=[0, 1],
                       help="1: node dropout in training (the port's default); 0: none (TF's default and README "
                            "command)")
        g.add_argument("--node_dropout", default="[0.1]", type=float_list,
                       help="only node_dropout[0] is read: the rate p of node dropout (with --node_dropout_flag 1; "
                            "given without it, a warning says it does nothing)")
        g.add_argument("--node_dropout_type", default="entries", choices=["entries", "nodes"],
                       help="entries = each stored entry of Â dropped with p, one mask per batch for all layers "
                            "(both codes); nodes = each node's outgoing messages (its column of Â) dropped with p, "
                            "a new draw per layer (the paper's §2.4.2); kept values scaled by 1/(1-p); with "
                            "--node_dropout_flag 1 only (given without it, a warning says it does nothing)")
        g.add_argument("--mess_dropout", default="[0.1,0.1,0.1]", type=float_list,
                       help="message dropout rate of each layer's output in training: the first L are read (one value: "
                            "every layer)")
        g.add_argument("--reg_target", default="outputs", choices=["outputs", "parameters"],
                       help="outputs = λ·½(‖u‖²+‖i⁺‖²+‖i⁻‖²)/B on the batch's final vectors (both codes); "
                            "parameters = λ·‖Θ‖² over Eu, Ei and the W matrices (the paper's Eq. 11)")
        g.add_argument("--eval_mess_dropout", default=False, type=str2bool,
                       help="true: message dropout stays on at evaluation, as in the PyTorch port (nn.Dropout made "
                            "inside forward, NGCF.py:132), drawn from --seed at every evaluation; false: off (TF)")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        if args.embed_size < 1:
            return f"--embed_size must be at least 1, got {args.embed_size}."
        if 1 < len(args.mess_dropout) < len(args.layer_size):
            return (f"--mess_dropout needs one rate or one per layer ({len(args.layer_size)}), got "
                    f"{len(args.mess_dropout)}.")
        for name, rates in (("mess_dropout", args.mess_dropout), ("node_dropout", args.node_dropout[:1])):
            if not all(0.0 <= p < 1.0 for p in rates):
                return f"--{name} rates must be in [0, 1), got {rates}."
        if args.regs[0] < 0:
            return f"--regs[0] must not be negative, got {args.regs[0]}."
        return None

    @classmethod
    def flag_warnings(cls, args: argparse.Namespace) -> List[str]:
        """--node_dropout and --node_dropout_type without --node_dropout_flag 1, which turns node dropout on
        (warned, not refused: the run without node dropout is the TF code's default)."""
        unused = changed_flags(args, ["node_dropout", "node_dropout_type"]) if not args.node_dropout_flag else []
        if unused:
            return [f"{flag_list(unused)} {'does' if len(unused) == 1 else 'do'} nothing without "
                    f"--node_dropout_flag 1, which turns node dropout on (give it, or leave {flag_list(unused)} out)."]
        return []

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        if data.train.nnz == 0:
            return f"{data.name} has no train interactions, so NGCF has no users to sample."
        if np.diff(data.train.tocsr().indptr).max() >= data.n_items:
            return f"a user of {data.name} has every item in train, so NGCF cannot draw a negative item for that user."
        return None

    # --- batches (NGCF/utility/load_data.py:144-182) ------------------------------------------------
    def n_batches(self) -> int:
        """⌊n_train/B⌋ + 1 batches per epoch (NGCF.py:462)."""
        return self.n_train // self.args.batch + 1

    def uniform_below(self, bounds: torch.Tensor) -> torch.Tensor:
        """One integer uniform in [0, bound) per entry of `bounds` (all > 0), from the model's generator."""
        draws = torch.rand(len(bounds), dtype=torch.float64, device=self.device, generator=self.rng)
        return torch.minimum((draws * bounds).long(), bounds - 1)   # float64: no rounding up to the bound

    def sample_batch(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B distinct users with a train item (with replacement when there are fewer: the authors' rd.choice), one
        positive uniform over each one's train items, one negative uniform over the items not in them."""
        batch, n_active = self.args.batch, len(self.active_users)
        if batch <= n_active:
            pick = torch.randperm(n_active, device=self.device, generator=self.rng)[:batch]
        else:
            pick = torch.randint(n_active, (batch,), device=self.device, generator=self.rng)
        users = self.active_users[pick]
        positives = self.indices[self.indptr[users] + self.uniform_below(self.counts[users])]
        rank = self.uniform_below(self.data.n_items - self.counts[users])
        key = users * self.data.n_items + rank
        negatives = rank + torch.searchsorted(self.gap_keys, key, right=True) - self.indptr[users]
        return users, positives, negatives

    # --- the draws of a batch and the propagation (paper Eq. 3-9) --------------------------------------
    def draw(self, generator: Optional[torch.Generator] = None, nodes: bool = True) -> Draws:
        """The batch's dropout draws, in this order from `generator` (default: the model's): node dropout (with
        --node_dropout_flag 1 and `nodes`), then each layer's message-dropout mask (p > 0)."""
        generator = generator or self.rng
        n, L = self.adj.n, self.n_layers
        graphs, diagonals = [self.graph] * L, [self.self_loops] * L
        if nodes and self.args.node_dropout_flag:
            p = self.args.node_dropout[0]
            keep_prob = 1.0 - p
            if self.args.node_dropout_type == "entries":   # one mask over Â's entries for every layer
                keep = (keep_prob + torch.rand(self.adj.nnz, device=self.device, generator=generator)).floor()
                values = self.adj.values * keep / keep_prob
                graphs, diagonals = [self.adj.graph(values)] * L, [self.adj.diagonal(values)] * L
            else:                                           # per layer, a mask over the nodes (Â's columns)
                graphs, diagonals = [], []
                for _ in range(L):
                    keep = (keep_prob + torch.rand(n, device=self.device, generator=generator)).floor()
                    values = self.adj.values * keep[self.adj.col] / keep_prob
                    graphs.append(self.adj.graph(values))
                    diagonals.append(self.adj.diagonal(values))
        keeps: List[Optional[torch.Tensor]] = []
        for k, size in enumerate(self.args.layer_size):
            p = self.mess_dropout[k]
            if p == 0.0:
                keeps.append(None)
                continue
            # the authors' floor(keep + U), already scaled by 1/keep (inverted dropout: one product per layer)
            keep = (1.0 - p + torch.rand(n, size, device=self.device, generator=generator)).floor()
            keeps.append(keep * (1.0 / (1.0 - p)))
        return Draws(graphs, diagonals, keeps)

    def no_draws(self) -> Draws:
        return Draws([self.graph] * self.n_layers, [self.self_loops] * self.n_layers, [None] * self.n_layers)

    def layer(self, k: int, ego: torch.Tensor, graph: Graph, self_loops: torch.Tensor,
              keep: Optional[torch.Tensor]) -> torch.Tensor:
        """One propagation layer (paper Eq. 3-7 as NGCF.py:198-216 computes it): S = Â Eᵏ; the sum branch S W_gc +
        b_gc and the bi-interaction branch (Eᵏ ⊙ S) W_bi + b_bi; LeakyReLU per branch (split) or of their sum
        (joint); then message dropout (inverted: kept rows scaled by 1/(1-p))."""
        w = self.weights
        side = graph @ ego
        # the paper's m_u←u has no product term: drop the self-loop's share Â_uu e_u from the product's side
        bi_side = side - self_loops[:, None] * ego if self.args.bi_messages == "neighbours" else side
        sum_part = side @ w[f"W_gc_{k}"] + w[f"b_gc_{k}"]
        bi_part = (ego * bi_side) @ w[f"W_bi_{k}"] + w[f"b_bi_{k}"]
        if self.args.activation == "split":
            out = F.leaky_relu(sum_part, LEAKY_SLOPE) + F.leaky_relu(bi_part, LEAKY_SLOPE)
        else:
            out = F.leaky_relu(sum_part + bi_part, LEAKY_SLOPE)
        return out if keep is None else out * keep

    def propagate(self, draws: Draws, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[E⁰ ‖ norm(E¹) ‖ ... ‖ norm(Eᴸ)] (paper Eq. 9; NGCF.py:190-225) of the nodes `rows` (None: every user and
        item). Each layer propagates the whole graph, unnormalised; the row-wise normalisation and the
        concatenation run on the rows asked for only (a training batch's): the same values and gradients."""
        ego = torch.cat([self.user_emb, self.item_emb])
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731
        outputs = [pick(ego)]
        for k in range(self.n_layers):
            ego = self.layer(k, ego, draws.graphs[k], draws.diagonals[k], draws.keeps[k])
            outputs.append(F.normalize(pick(ego), p=2, dim=1) if self.args.norm_layers else pick(ego))
        return torch.cat(outputs, dim=1)

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: no node dropout; message dropout only with --eval_mess_dropout (drawn from --seed)."""
        if self.args.eval_mess_dropout:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.args.seed)
            draws = self.draw(generator, nodes=False)
        else:
            draws = self.no_draws()
        nodes = self.propagate(draws)
        return nodes[: self.data.n_users], nodes[self.data.n_users:]

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                   draws: Optional[Draws] = None) -> Dict[str, torch.Tensor]:
        """BPR + the L2 term (paper Eq. 10-11 as NGCF.py:274-296): mean -log σ(s⁺ - s⁻) and
        λ·½(‖u‖²+‖i⁺‖²+‖i⁻‖²)/B on the final vectors (B = --batch, every batch's size); `draws` None: drawn here in
        training, none in eval."""
        if draws is None:
            draws = self.draw() if self.training else self.no_draws()
        n_users, b = self.data.n_users, len(users)
        vectors = self.propagate(draws, torch.cat([users, n_users + positives, n_users + negatives]))
        u, p, n = vectors[:b], vectors[b:2 * b], vectors[2 * b:]
        bpr = -F.logsigmoid((u * p).sum(-1) - (u * n).sum(-1)).mean()
        decay = self.args.regs[0]
        if self.args.reg_target == "outputs":
            reg = decay * ((u ** 2).sum() + (p ** 2).sum() + (n ** 2).sum()) / 2 / self.args.batch
        else:
            theta = [self.user_emb, self.item_emb, *(w for k, w in self.weights.items() if k.startswith("W"))]
            reg = decay * sum((t ** 2).sum() for t in theta)
        return {"bpr": bpr, "emb": reg}

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Dict[str, Dict[str, float]]:
        self.train()
        totals = torch.zeros(2, device=self.device)
        n_batches = self.n_batches()
        for _ in self.progress(range(n_batches), self.name):
            with timer.phase("sampling"):
                users, positives, negatives = self.sample_batch()
            with timer.phase("augment"):   # the batch's node- and message-dropout masks (the dropped graph)
                draws = self.draw()
            with timer.phase("recommender"):
                self.optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    terms = self.batch_loss(users, positives, negatives, draws)
                loss = terms["bpr"] + terms["emb"]
                loss.backward()
                self.optimizer.step()
                totals += torch.stack([terms["bpr"].detach().float(), terms["emb"].detach().float()])  # no sync
        bpr, emb = (totals / n_batches).tolist()
        return {"loss": {"bpr": bpr, "emb": emb, "loss": bpr + emb}}
