"""MMSSL: multi-modal self-supervised learning for recommendation (Wei et al., WWW 2023), as the authors' code
computes it (github HKUDS/MMSSL, folder MMSSL/; its parts are numbered §n in this docstring).

Recommender (§3): per modality m, item features f_m = Dropout(Linear_m(F_m)) are propagated once on the
train graph (x_u^m = N_u f_m, x_i^m = N_i x_u^m), and the ID tables once on the modality's *generated*
graph (y_u^m = G_u^m E_i, y_i^m = G_i^m E_u). The modality views are fused ("cross-modal attention"),
added to the ID tables, propagated L = len(weight_size) layers on the train graph (softmax over the
d dimensions at the last layer), layer-averaged, and the normalised feature views are added.
Graphs are one-sided: N_u = D_u^-1/2 R, N_i = D_i^-1/2 Rᵀ (§2).

Adversarial part (§4-§5), every batch: a discriminator D over rows of item scores (batch x I) learns to
tell the feature branch's scores ("fake") from Gumbel-smoothed train rows plus the ID scores ("real"),
with a WGAN-GP penalty; then the recommender takes one AdamW step on BPR + L2 + feature L2 +
contrastive (modality-ID view vs final user vector) + the generator term -mean D(fake). The top-k items
of the fake rows of the batches become the generated graphs G^m (§6).

What the authors' code does and the paper's text does not say (defaults = the code):
- the "attention" reduces exactly to mean_m(y^m)·W_Σ, W_Σ = Σ_h W_cat[h] (§3.4): `--mm_attn authors`;
- the real rows are softmax((R + λg)/τ_r) in the first upload; HEAD divides λg only: `--real_tau_scope`;
- LeakyReLU(True) is negative_slope 1, i.e. the identity: `--d_slope 1.0`;
- the generated graphs hold only the last ≤ T batches' users; with T = 1 they are empty from the third
  batch of every epoch on, at evaluation too, and with k = ⌊I·m_topk_rate⌋ = 0 always: `--gen_graph authors`;
- AdamW's default weight decay 0.01 applies to every recommender parameter: `--adamw_decay 0.01`;
- the stored pairs tile the batch users (`torch.tensor(users).repeat(1, k).view(-1)` against the row-major
  top-k indices, HKUDS/MMSSL MMSSL/main.py:401,404 at cffd83f): item r of batch user a goes to the row of
  user users[(a·k + r) mod B], another user of the batch when k > 1: `--gen_pairing authors`.

Flags that fix them: `--mm_attn paper` (real multi-head attention over modalities), `--real_tau_scope
noise` (HEAD's form), `--d_slope 0.01` (a real LeakyReLU), `--gen_graph full` (every T batches, the
top-k items of every user with a train item), `--adamw_decay 0` (plain Adam-style, no decay), `--gen_pairing
own` (each batch user's row gets its own top-k items).

Not carried over (§10): dense U x I copies of R, unused parameters (common_trans, trainable copies of
the raw features, BatchNorm, w_v, w_self_attention_user/item), exactly two modalities (any number here),
the gradient penalty's α sized 2·batch_size, per-user Python sampling, DGL, CUDA hard-coding. `--layers`
repeats identical work in their code and has no effect on the output, so it is accepted and not repeated.

Deviations from the authors' procedure around the model (not behind a flag):
- Evaluation is the package harness's, the same as DiffMM's (so that MMSSL is compared with
  DiffMM under one evaluation and both protocols): all-rank over the items not in the user's train list, users
  with a held-out item, and the
  standard NDCG whose IDCG runs over min(|held-out|, K) positions. MMSSL's batch_test.py takes the IDCG
  over min(hits in its top 50, K) positions (§7), which gives larger NDCG for users with several held-out
  items; Recall and Precision are computed alike in both.
- Selection: the harness's validation protocol is MMSSL HEAD's (val Recall@20 picks the epoch). Its "paper
  protocol" is the best test epoch within that same run, early-stopped on validation; MMSSL's first upload
  selected and early-stopped on test itself (§7), so its runs could last longer than the harness's.
- The authors' flag names that are harness flags here: batch_size → --batch, early_stopping_patience 7 →
  --patience 8 (the harness counts evaluations without improvement from 1, theirs from 0: both stop after
  8 epochs in a row without a better val Recall@20), Ks → --topks, data_path/dataset → --data_dir/--data;
  epoch, lr, seed keep their names. Defaults: lr 0.00055, batch 1024, epoch 1000, seed 2022, patience 8.
- A batch asks for more users than there are users with train items (tiny data, or a large --batch): the
  users are then drawn with replacement (the authors' rd.sample raises there).
- The batch is drawn on the device from the model's own torch generator (saved in last.pt): B distinct
  users, a positive uniform over each one's train items, a negative uniform over the items not in train
  (drawn directly as the r-th such item, no rejection loop): the authors' distributions, another stream.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from DataHandler import Data
from Models.base import PhaseTimer, RecModel
from Utils.batches import DeviceRows, train_pairs
from Utils.flags import float_list, int_list
from Utils.graphs import GraphPair, one_sided_graphs
from Utils.layers import xavier_uniform


# ---------------------------------------------------------------------------------------------
# The pieces of the forward and of the losses, each as the spec writes it
# ---------------------------------------------------------------------------------------------

def modal_attention(views: List[torch.Tensor], w_cat: torch.Tensor, heads: int,
                    w_q: Optional[torch.Tensor] = None, w_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused modality-ID view h (N x d) from the views y^m (N x d each) (§3.4).

    Authors (w_q None): their multi-head attention takes K from Q and broadcasts V over the query
    axis, so the softmax weights sum out and it is exactly mean_m(y^m) · W_Σ, W_Σ = Σ_h W_cat[h·d:(h+1)·d].
    Paper (w_q, w_k given): per head h, z_i^h = Σ_j softmax_j(q_i^h·k_j^h / √(d/H)) y^j with q = yW_q,
    k = yW_k split in H heads; the heads concatenated (H·d) times W_cat, averaged over modalities i.
    """
    d = views[0].shape[1]
    if w_q is None:
        return torch.stack(views).mean(0) @ w_cat.view(heads, d, d).sum(0)
    y = torch.stack(views)                                               # M x N x d
    n_modal, n = y.shape[:2]
    q = (y @ w_q).view(n_modal, n, heads, d // heads)
    k = (y @ w_k).view(n_modal, n, heads, d // heads)
    weights = torch.softmax(torch.einsum("inhc,jnhc->nhij", q, k) / math.sqrt(d / heads), dim=-1)
    z = torch.einsum("nhij,jnd->inhd", weights, y)                       # M x N x H x d
    return (z.reshape(n_modal, n, heads * d) @ w_cat).mean(0)


def masked_scores(user_vec: torch.Tensor, item_vec: torch.Tensor, train_rows: torch.Tensor) -> torch.Tensor:
    """s(P, Q) (§4): the batch users' scores over all items, zeroed on their train items, row-L2-normalised."""
    return F.normalize((user_vec @ item_vec.T).float() * (1.0 - train_rows), dim=1)


def real_rows(train_rows: torch.Tensor, id_scores: torch.Tensor, uniform: torch.Tensor, log_log_scale: float,
              real_data_tau: float, ui_pre_scale: float, scope: str = "all") -> torch.Tensor:
    """The discriminator's real rows (§4): r = l2n(softmax(·) + ui_pre_scale · ID scores), with the Gumbel
    noise g = -log(-log(U + 1e-8) + 1e-8) from the uniform draws U.

    scope 'all' (first upload): softmax((R_b + λg)/τ_r); 'noise' (HEAD's precedence): softmax(R_b + λg/τ_r).
    """
    gumbel = -torch.log(-torch.log(uniform + 1e-8) + 1e-8)
    if scope == "all":
        logits = (train_rows + log_log_scale * gumbel) / real_data_tau
    else:
        logits = train_rows + log_log_scale * gumbel / real_data_tau
    return F.normalize(torch.softmax(logits, dim=1) + ui_pre_scale * id_scores, dim=1)


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0.3 · mean_rows((‖∇_x̂ D(x̂)‖₂ - 1)²), x̂ = αr + (1-α)f with one α ~ U(0,1) per row (§4, WGAN-GP).

    Built with create_graph so that the penalty trains D (the 0.3 is the authors' hard-coded LAMBDA).
    """
    real, fake = real.detach(), fake.detach()
    if alpha is None:
        alpha = torch.rand(len(real), 1, device=real.device)
    mixed = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    out = critic(mixed)
    grad, = torch.autograd.grad(out, mixed, grad_outputs=torch.ones_like(out), create_graph=True)
    return 0.3 * ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


def contrastive_loss(anchor: torch.Tensor, other: torch.Tensor, tau: float) -> torch.Tensor:
    """ℓ(a, z) (§5.3): mean_i -log(e^{c(a_i,z_i)/τ} / (Σ_j e^{c(a_i,a_j)/τ} + Σ_j e^{c(a_i,z_j)/τ}
    - e^{c(a_i,a_i)/τ}) + 1e-8), c the cosine; a = modality-ID view (anchor), z = final user vector."""
    a, z = F.normalize(anchor, dim=1), F.normalize(other, dim=1)
    within = torch.exp(a @ a.T / tau)
    between = torch.exp(a @ z.T / tau)
    ratio = between.diagonal() / (within.sum(1) + between.sum(1) - within.diagonal())
    return -torch.log(ratio + 1e-8).mean()


# ---------------------------------------------------------------------------------------------
# The recommender (the authors' MMSSL module) and the discriminator
# ---------------------------------------------------------------------------------------------

class MMSSLNet(nn.Module):
    """§3: the feature branch on the train graph, the ID branch on the generated graphs, their fusion."""

    def __init__(self, n_users: int, n_items: int, features: Dict[str, torch.Tensor], embed_size: int,
                 n_layers: int, drop_rate: float, head_num: int, id_cat_rate: float, model_cat_rate: float,
                 paper_attention: bool):
        super().__init__()
        self.features = features                       # modality -> I x d_m (constant, on the device)
        self.encoders = nn.ModuleDict({m: nn.Linear(f.shape[1], embed_size) for m, f in features.items()})
        for encoder in self.encoders.values():         # Xavier weight, PyTorch's default bias U(±1/√d_m)
            nn.init.xavier_uniform_(encoder.weight)
        self.user_emb = xavier_uniform(n_users, embed_size)
        self.item_emb = xavier_uniform(n_items, embed_size)
        self.attn_cat = xavier_uniform(head_num * embed_size, embed_size)   # w_self_attention_cat
        self.attn_q = xavier_uniform(embed_size, embed_size) if paper_attention else None
        self.attn_k = xavier_uniform(embed_size, embed_size) if paper_attention else None
        self.dropout = nn.Dropout(drop_rate)
        self.n_layers, self.head_num = n_layers, head_num
        self.id_cat_rate, self.model_cat_rate = id_cat_rate, model_cat_rate

    def forward(self, train_graphs: GraphPair, modal_graphs: Dict[str, GraphPair]) -> Dict[str, object]:
        """user, item: the final vectors (§3.7); modal_user/modal_item: x^m (feature branch, §3.2);
        id_user: y_u^m (ID branch, §3.3), each per modality."""
        user_graph, item_graph = train_graphs
        modal_user, modal_item, id_user, id_item = {}, {}, {}, {}
        for m, encoder in self.encoders.items():
            feat = self.dropout(encoder(self.features[m]))
            modal_user[m] = user_graph @ feat
            modal_item[m] = item_graph @ modal_user[m]
            gen_user, gen_item = modal_graphs[m]
            id_user[m] = gen_user @ self.item_emb
            id_item[m] = gen_item @ self.user_emb
        fused_user = modal_attention(list(id_user.values()), self.attn_cat, self.head_num, self.attn_q, self.attn_k)
        fused_item = modal_attention(list(id_item.values()), self.attn_cat, self.head_num, self.attn_q, self.attn_k)
        users = [self.user_emb + self.id_cat_rate * F.normalize(fused_user, dim=1)]
        items = [self.item_emb + self.id_cat_rate * F.normalize(fused_item, dim=1)]
        for layer in range(self.n_layers):             # §3.6: i_l uses the new u_l; softmax at the last layer
            last = layer == self.n_layers - 1
            u = user_graph @ items[-1]
            u = torch.softmax(u, dim=-1) if last else u
            i = item_graph @ u
            i = torch.softmax(i, dim=-1) if last else i
            users.append(u)
            items.append(i)
        cat_rate = self.model_cat_rate
        user = torch.stack(users).mean(0) + cat_rate * sum(F.normalize(x, dim=1) for x in modal_user.values())
        item = torch.stack(items).mean(0) + cat_rate * sum(F.normalize(x, dim=1) for x in modal_item.values())
        return {"user": user, "item": item, "modal_user": modal_user, "modal_item": modal_item, "id_user": id_user}


class Discriminator(nn.Module):
    """§4: I → ⌊I/4⌋ → ⌊I/8⌋ → 1 with LeakyReLU, BatchNorm, Dropout; 100·sigmoid. Kaiming-normal weights,
    zero biases. The authors' LeakyReLU(True) has slope 1 (the identity; `--d_slope`)."""

    def __init__(self, n_items: int, drop1: float, drop2: float, slope: float):
        super().__init__()
        hidden1, hidden2 = n_items // 4, n_items // 8

        def act() -> nn.Module:                         # slope 1 is the identity: same values, less memory
            return nn.Identity() if slope == 1.0 else nn.LeakyReLU(slope)

        self.net = nn.Sequential(
            nn.Linear(n_items, hidden1), act(), nn.BatchNorm1d(hidden1), nn.Dropout(drop1),
            nn.Linear(hidden1, hidden2), act(), nn.BatchNorm1d(hidden2), nn.Dropout(drop2),
            nn.Linear(hidden2, 1), nn.Sigmoid())
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return 100.0 * self.net(rows).view(-1)


# ---------------------------------------------------------------------------------------------
# The model: flags, the batch (§5), the generated-graph schedule (§6)
# ---------------------------------------------------------------------------------------------

class MMSSL(RecModel):
    """The recommender (AdamW), the discriminator (Adam), the generated graphs and their store."""

    name = "mmssl"
    paper = "MMSSL: multi-modal self-supervised learning for recommendation (Wei et al., WWW 2023)"
    needs_features = True
    phases = ("sampling", "discriminator", "recommender", "graph")
    loss_phases = {"loss": "recommender", "d_loss": "discriminator"}
    # the authors' parser: lr 0.00055, batch_size 1024, epoch 1000, seed 2022; they stop after 8 epochs in a
    # row without a strictly better validation Recall@20 (early_stopping_patience 7 counts from 0)
    defaults = {"lr": 0.00055, "batch": 1024, "epoch": 1000, "seed": 2022, "patience": 8}
    # MMSSL's README gives only `python main.py --dataset NAME`: its defaults are the Baby block of the first
    # upload's parser; the TikTok and Sports blocks of that parser differ from them in these flags
    presets = {
        "tiktok": ["--lr", "5.4e-4", "--G_rate", "1.8e-3", "--real_data_tau", "0.002", "--m_topk_rate", "0.01"],
        "baby": [],
        "sports": ["--lr", "5e-4", "--real_data_tau", "0.002", "--T", "2", "--m_topk_rate", "0.02"],
    }
    published = {"tiktok": (0.0921, 0.0392, 0.0046), "baby": (0.0962, 0.0422, 0.0051),
                 "sports": (0.0998, 0.0470, 0.0052)}
    published_in = "MMSSL README"

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        features = {m: torch.from_numpy(f).to(device) for m, f in data.features.items()}
        self.net = MMSSLNet(data.n_users, data.n_items, features, args.embed_size, len(args.weight_size),
                            args.drop_rate, args.head_num, args.id_cat_rate, args.model_cat_rate,
                            args.mm_attn == "paper").to(device)
        self.discriminator = Discriminator(data.n_items, args.G_drop1, args.G_drop2, args.d_slope).to(device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=args.adamw_decay)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=args.D_lr, betas=(0.5, 0.9))
        # the batches' draws (§5.1), on the device; saved in last.pt by training_state
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(args.seed)
        self.top_k = int(data.n_items * args.m_topk_rate)
        # the train matrix on the device (column indices sorted within each row), to sample a batch and
        # densify its rows there (never U x I)
        train = data.train.tocsr(copy=True)
        train.eliminate_zeros()
        train.sum_duplicates()
        self.indptr = torch.from_numpy(train.indptr.astype(np.int64)).to(device)
        self.indices = torch.from_numpy(train.indices.astype(np.int64)).to(device)
        self.train_counts = self.indptr[1:] - self.indptr[:-1]
        self.user_rows = DeviceRows(sp.csr_matrix((np.ones(train.nnz, dtype=np.float32), train.indices, train.indptr),
                                                  shape=train.shape), device)   # R's rows, 1 at every train item
        # the authors' exist_users: only users with a train item are sampled (and get generated items)
        self.active_users = torch.nonzero(self.train_counts > 0).view(-1)
        # negatives: the j-th train item s_j (0-based, sorted) of user u has s_j - j non-train items below it;
        # u·I + s_j - j is sorted over the whole matrix (s_j - j <= I - count_u < I), see sample_negatives
        entry_rows = torch.repeat_interleave(torch.arange(data.n_users, device=device), self.train_counts)
        rank_in_row = torch.arange(len(self.indices), device=device) - self.indptr[entry_rows]
        self.gap_keys = entry_rows * data.n_items + self.indices - rank_in_row
        pair_users, pair_items = (torch.from_numpy(a).to(device) for a in train_pairs(train))
        self.train_graphs = one_sided_graphs(pair_users, pair_items, data.n_users, data.n_items, self.plain)
        # per modality: the (user, item) pairs its generated graphs G^m were built from (at first the train
        # pairs: G^m = N, §6), the graphs themselves, and the store of top-k pairs since the last rebuild
        self.generated = {m: (pair_users, pair_items) for m in data.modalities}
        self.modal_graphs = {m: self.train_graphs for m in data.modalities}
        self.store: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in data.modalities}

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("mmssl (the authors' utility/parser.py, HKUDS/MMSSL; "
                                      "fixes of their defects are off by default)")
        g.add_argument("--embed_size", default=64, type=int, help="d: size of the ID embeddings and modality views")
        g.add_argument("--regs", default="[1e-5,1e-5,1e-2]", type=float_list,
                       help="only regs[0] is read: weight of the L2 term ½(‖u‖²+‖p‖²+‖n‖²)/B on the batch's final "
                            "vectors (§5.3)")
        g.add_argument("--weight_size", default="[64, 64]", type=int_list,
                       help="its length is L, the layers of ID propagation on the train graph (softmax at the last, "
                            "§3.6); the sizes themselves are not read")
        g.add_argument("--layers", default=1, type=int,
                       help="the authors' feature-graph layers: their loop recomputes the same one-hop product, so "
                            "any value >= 1 gives the same output (accepted, not repeated)")
        g.add_argument("--drop_rate", default=0.2, type=float, help="dropout on the projected item features f_m (§3.1)")
        g.add_argument("--model_cat_rate", default=0.55, type=float,
                       help="weight of the normalised feature views x^m added to the final vectors (§3.7)")
        g.add_argument("--id_cat_rate", default=0.36, type=float,
                       help="weight of the normalised fused modality-ID view added to the ID tables (§3.5)")
        g.add_argument("--head_num", default=4, type=int, help="H: attention heads of the modality fusion (§3.4)")
        g.add_argument("--mm_attn", default="authors", choices=["authors", "paper"],
                       help="modality fusion: authors = what their attention computes, mean_m(y^m)·ΣW_cat; paper = "
                            "real multi-head attention over the modalities (q, k heads), needs head_num | embed_size")
        g.add_argument("--G_rate", default=1e-4, type=float, help="weight of the generator term -mean D(fake) (§5.3)")
        g.add_argument("--G_drop1", default=0.31, type=float, help="dropout after the discriminator's first layer")
        g.add_argument("--G_drop2", default=0.5, type=float, help="dropout after the discriminator's second layer")
        g.add_argument("--d_slope", default=1.0, type=float,
                       help="negative slope of the discriminator's LeakyReLUs: 1.0 = the authors' LeakyReLU(True), "
                            "which is the identity; 0.01 = PyTorch's default LeakyReLU")
        g.add_argument("--gp_rate", default=1.0, type=float,
                       help="weight of the gradient penalty 0.3·mean((‖∇D(x̂)‖-1)²) in D's loss (§4)")
        g.add_argument("--D_lr", default=3e-4, type=float, help="learning rate of D's Adam (betas 0.5, 0.9)")
        g.add_argument("--real_data_tau", default=0.005, type=float, help="τ_r: temperature of the real rows' softmax")
        g.add_argument("--real_tau_scope", default="all", choices=["all", "noise"],
                       help="real rows: all = softmax((R+λg)/τ_r) (first upload); noise = softmax(R+λg/τ_r) (HEAD's "
                            "operator precedence: nearly uniform rows)")
        g.add_argument("--log_log_scale", default=1e-5, type=float,
                       help="λ: scale of the Gumbel noise g in the real rows")
        g.add_argument("--ui_pre_scale", default=100, type=int,
                       help="weight of the ID scores s(u, i) added to the real rows before normalising (§4)")
        g.add_argument("--T", default=1, type=int, help="the generated graphs are rebuilt every T batches (§6)")
        g.add_argument("--m_topk_rate", default=1e-4, type=float,
                       help="k = ⌊I·m_topk_rate⌋ items per user in the generated graphs (0 when I < 1/rate)")
        g.add_argument("--gen_graph", default="authors", choices=["authors", "full"],
                       help="generated graphs: authors = from the top-k pairs stored since the last rebuild (only the "
                            "last ≤ T batches' users; the store lives across epochs); full = every T batches from "
                            "the top-k items of every user with a train item (k at least 1)")
        g.add_argument("--gen_pairing", default="authors", choices=["authors", "own"],
                       help="with --gen_graph authors, which user a batch user's top-k items are stored for: authors = "
                            "their torch.tensor(users).repeat(1, k).view(-1) against the row-major top-k indices "
                            "(HKUDS/MMSSL MMSSL/main.py:401,404 at cffd83f; :493,496 at 4f0c2fa, the first upload): "
                            "item r of batch user a goes to user users[(a·k+r) mod B]; own = to user a itself. The "
                            "same when k <= 1; differs with k >= 2 (e.g. the mmssl-tiktok and mmssl-sports presets)")
        g.add_argument("--tau", default=0.5, type=float, help="τ: temperature of the contrastive loss")
        g.add_argument("--cl_rate", default=0.03, type=float, help="weight of the contrastive loss (§5.3)")
        g.add_argument("--feat_reg_decay", default=1e-5, type=float,
                       help="weight of the feature views' L2 term ½Σ_m(‖x_u^m‖²+‖x_i^m‖²)/I")
        g.add_argument("--adamw_decay", default=0.01, type=float,
                       help="weight decay of the recommender's AdamW: 0.01 = PyTorch's default the authors' code gets "
                            "without asking; 0 = none")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        for name in ("embed_size", "head_num", "T", "layers"):
            if getattr(args, name) < 1:
                return f"--{name} must be at least 1, got {getattr(args, name)}."
        if not args.weight_size:
            return "--weight_size must list at least one layer (its length is the number of propagation layers)."
        if args.mm_attn == "paper" and args.embed_size % args.head_num:
            return (f"--mm_attn paper splits the {args.embed_size} dimensions into --head_num {args.head_num} heads, "
                    f"so head_num must divide embed_size.")
        for name in ("tau", "real_data_tau"):
            if not getattr(args, name) > 0:
                return f"--{name} must be positive (a temperature divides by it), got {getattr(args, name)}."
        for name in ("drop_rate", "G_drop1", "G_drop2"):
            if not 0.0 <= getattr(args, name) < 1.0:
                return f"--{name} is a dropout rate and must be in [0, 1), got {getattr(args, name)}."
        if not 0.0 <= args.m_topk_rate <= 1.0:
            return f"--m_topk_rate is a share of the items and must be in [0, 1], got {args.m_topk_rate}."
        return None

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        problem = super().check(args, data)
        if problem:
            return problem
        if data.n_items < 8:
            return (f"MMSSL's discriminator has ⌊I/4⌋ and ⌊I/8⌋ hidden units, so it needs at least 8 items; "
                    f"{data.name} has {data.n_items}.")
        if data.train.nnz == 0:
            return f"{data.name} has no train interactions, so MMSSL has no users to sample."
        if np.diff(data.train.indptr).max() >= data.n_items:
            return (f"a user of {data.name} has every item in train, so MMSSL cannot draw a negative item "
                    f"for that user.")
        return None

    # --- batches --------------------------------------------------------------------------------
    def n_batches(self) -> int:
        """⌊n_train/B⌋ + 1 batches per epoch (§7)."""
        return self.data.train.nnz // self.args.batch + 1

    def uniform_below(self, bounds: torch.Tensor) -> torch.Tensor:
        """One integer uniform in [0, bound) per entry of `bounds` (all > 0), from the model's generator."""
        draws = torch.rand(len(bounds), dtype=torch.float64, device=self.device, generator=self.rng)
        return torch.minimum((draws * bounds).long(), bounds - 1)   # float64: no rounding up to the bound

    def sample_negatives(self, users: torch.Tensor) -> torch.Tensor:
        """One item per user, uniform over the items not in its train list (§5.1), without rejection:
        draw the rank r uniform in [0, I - count_u); the r-th non-train item is r + #{j : s_j - j <= r}
        (its train items s_0 < s_1 < ... below it), a binary search in the sorted keys u·I + s_j - j."""
        n_items = self.data.n_items
        rank = self.uniform_below(n_items - self.train_counts[users])
        below = torch.searchsorted(self.gap_keys, users * n_items + rank, right=True) - self.indptr[users]
        return rank + below

    def sample_batch(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B distinct users with a train item (with replacement if there are fewer), one positive uniform
        over each one's train items, one negative uniform over the items not in train (§5.1); on the device."""
        batch, n_active = self.args.batch, len(self.active_users)
        if batch <= n_active:
            pick = torch.randperm(n_active, device=self.device, generator=self.rng)[:batch]
        else:   # the authors' rd.sample raises here (module docstring)
            pick = torch.randint(n_active, (batch,), device=self.device, generator=self.rng)
        users = self.active_users[pick]
        positives = self.indices[self.indptr[users] + self.uniform_below(self.train_counts[users])]
        return users, positives, self.sample_negatives(users)

    def train_rows(self, users: torch.Tensor) -> torch.Tensor:
        """R_b: the users' train rows, dense B x I, built on the device with no size read back from it (the
        users are drawn there, so their number of train items is not known on the host: DataHandler.DeviceRows)."""
        return self.user_rows.dense(users)

    def forward_all(self) -> Dict[str, object]:
        with self.autocast():
            return self.net(self.train_graphs, self.modal_graphs)

    def fake_rows(self, out: Dict[str, object], users: torch.Tensor, train_rows: torch.Tensor
                  ) -> Dict[str, torch.Tensor]:
        """Fake_m = s(x_u^m, x_i^m) for every modality (§4)."""
        return {m: masked_scores(out["modal_user"][m][users], out["modal_item"][m], train_rows)
                for m in self.data.modalities}

    # --- one batch (§5) ---------------------------------------------------------------------------
    def discriminator_step(self, users: torch.Tensor, train_rows: torch.Tensor, uniform: Optional[torch.Tensor] = None,
                           alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """§5.2: a forward without gradients (train mode), then one Adam step of D on
        -mean D(r) + mean D(f) + gp_rate·gp, r repeated once per modality. Returns the terms (real, fake,
        gp, loss). `uniform` (B x I, the Gumbel noise's draws) and `alpha` (|M|B x 1, the penalty's mixing
        weights) are drawn here unless given (tests)."""
        args = self.args
        with torch.no_grad():
            out = self.forward_all()
            fake = torch.cat(list(self.fake_rows(out, users, train_rows).values()))
            id_scores = masked_scores(out["user"][users], out["item"], train_rows)
        with self.autocast():
            loss_fake = self.discriminator(fake).float().mean()
            uniform = torch.rand_like(train_rows) if uniform is None else uniform
            real = real_rows(train_rows, id_scores, uniform, args.log_log_scale, args.real_data_tau,
                             args.ui_pre_scale, args.real_tau_scope).repeat(len(self.data.modalities), 1)
            loss_real = -self.discriminator(real).float().mean()
            gp = args.gp_rate * gradient_penalty(self.discriminator, real, fake, alpha)
        loss = loss_real + loss_fake + gp
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return torch.stack([loss_real, loss_fake, gp, loss]).detach()

    def recommender_step(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                         train_rows: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object], Dict[str, torch.Tensor]]:
        """§5.3: a new forward with gradients, one AdamW step on BPR + emb + feat + cl_rate·CL + G_rate·L_G.

        Returns the (weighted) terms, the forward's outputs and the fake rows, both detached (for §6).
        D's parameters are frozen during L_G: it trains only the recommender (its gradient reaches the
        feature encoders alone).
        """
        args = self.args
        out = self.forward_all()
        user, item = out["user"].float(), out["item"].float()
        u, p, n = user[users], item[positives], item[negatives]
        bpr = -F.logsigmoid((u * p).sum(-1) - (u * n).sum(-1)).mean()
        emb = args.regs[0] * 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(users)
        feat = args.feat_reg_decay * 0.5 * sum(out["modal_user"][m].float().pow(2).sum()
                                               + out["modal_item"][m].float().pow(2).sum()
                                               for m in self.data.modalities) / self.data.n_items
        cl = args.cl_rate * sum(contrastive_loss(out["id_user"][m][users].float(), u, args.tau)
                                for m in self.data.modalities)
        fakes = self.fake_rows(out, users, train_rows)
        self.discriminator.requires_grad_(False)
        with self.autocast():
            adv = -args.G_rate * self.discriminator(torch.cat(list(fakes.values()))).float().mean()
        self.discriminator.requires_grad_(True)
        loss = bpr + emb + feat + cl + adv
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        detached = {"modal_user": {m: x.detach() for m, x in out["modal_user"].items()},
                    "modal_item": {m: x.detach() for m, x in out["modal_item"].items()}}
        return (torch.stack([bpr, emb, feat, cl, adv, loss]).detach(), detached,
                {m: f.detach() for m, f in fakes.items()})

    # --- the generated graphs (§6) ------------------------------------------------------------------
    def set_generated(self, modality: str, users: torch.Tensor, items: torch.Tensor) -> None:
        self.generated[modality] = (users, items)
        self.modal_graphs[modality] = one_sided_graphs(users, items, self.data.n_users, self.data.n_items, self.plain)

    def refresh_graphs(self, idx: int, users: torch.Tensor, fakes: Dict[str, torch.Tensor],
                       out: Dict[str, object]) -> None:
        """After batch `idx` of an epoch. authors: if idx % T == 0 and idx != 0, rebuild G^m from the stored
        pairs and empty the store, else store the batch users' top-k items of Fake_m, paired with users as
        --gen_pairing says (the store survives epochs). full: after every T-th batch of an epoch, rebuild
        G^m from every user's top-k items."""
        if self.args.gen_graph == "authors":
            if idx % self.args.T == 0 and idx != 0:
                for m, pairs in self.store.items():
                    empty = torch.zeros(0, dtype=torch.long, device=self.device)
                    self.set_generated(m, torch.cat([p[0] for p in pairs] or [empty]),
                                       torch.cat([p[1] for p in pairs] or [empty]))
                    pairs.clear()
            elif self.top_k > 0:
                # entry a·k + r of the row-major top-k is item r of batch user a; `authors` tiles the users
                # against it (users[(a·k + r) mod B], their repeat(1, k)), `own` repeats each user k times;
                # a run saved before the flag existed paired `own` and resumes so (run_folder.upgrade_config)
                owners = (users.repeat(self.top_k) if self.args.gen_pairing == "authors"
                          else users.repeat_interleave(self.top_k))
                for m, fake in fakes.items():
                    top = torch.topk(fake, self.top_k, dim=1).indices
                    self.store[m].append((owners, top.reshape(-1)))
        elif (idx + 1) % self.args.T == 0:
            # every user with a train item (the users the authors sample): a user without one has an
            # all-zero feature view x_u^m, so its "top-k" would be an arbitrary pick among ties
            k = max(self.top_k, 1)
            users = self.active_users
            for m in self.data.modalities:
                tops = []
                for chunk in torch.split(users, self.args.batch):
                    # the top-k of s(x_u, x_i): the row normalisation does not change the order
                    scores = (out["modal_user"][m][chunk] @ out["modal_item"][m].T).float()
                    tops.append(torch.topk(scores * (1.0 - self.train_rows(chunk)), k, dim=1).indices)
                self.set_generated(m, users.repeat_interleave(k), torch.cat(tops).reshape(-1))

    # --- the epoch ---------------------------------------------------------------------------------
    def train_batch(self, idx: int, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                    timer: PhaseTimer) -> Tuple[torch.Tensor, torch.Tensor]:
        """D step, recommender step, graph refresh (§5); returns D's and the recommender's loss terms."""
        with timer.phase("discriminator"):
            train_rows = self.train_rows(users)
            d_terms = self.discriminator_step(users, train_rows)
        with timer.phase("recommender"):
            g_terms, out, fakes = self.recommender_step(users, positives, negatives, train_rows)
        with timer.phase("graph"):
            self.refresh_graphs(idx, users, fakes, out)
        return d_terms, g_terms

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Dict[str, Dict[str, float]]:
        self.train()
        d_total = torch.zeros(4, device=self.device)
        g_total = torch.zeros(6, device=self.device)
        n_batches = self.n_batches()
        for idx in self.progress(range(n_batches), self.name):
            with timer.phase("sampling"):
                users, positives, negatives = self.sample_batch()
            d_terms, g_terms = self.train_batch(idx, users, positives, negatives, timer)
            d_total += d_terms.float()
            g_total += g_terms.float()
        d_mean, g_mean = (d_total / n_batches).tolist(), (g_total / n_batches).tolist()
        return {"loss": dict(zip(("bpr", "emb", "feat", "cl", "adv", "loss"), g_mean)),
                "d_loss": dict(zip(("real", "fake", "gp", "loss"), d_mean))}

    # --- evaluation and checkpoints -------------------------------------------------------------------
    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The final vectors (§3.7) with the current generated graphs (eval mode: no dropout)."""
        out = self.forward_all()
        return out["user"], out["item"]

    def checkpoint_state(self) -> dict:
        """best_model.pt: the recommender and the pairs of the current generated graphs (and the store), so
        that a reloaded model scores exactly as it did. Not the discriminator (I²/32 + I²/4 weights, 84M on
        Sports, not needed to score): it is in `training_state` (last.pt) only."""
        state_dict = {name: value for name, value in self.state_dict().items()
                      if not name.startswith("discriminator.")}
        return {"state_dict": state_dict,
                "generated": {m: torch.stack(pair).cpu() for m, pair in self.generated.items()},
                "store": {m: torch.stack([torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])]).cpu()
                          if pairs else torch.zeros(2, 0, dtype=torch.long) for m, pairs in self.store.items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        # strict about the recommender; the discriminator comes from training_state (older checkpoints hold it too)
        missing, unexpected = self.load_state_dict(state["state_dict"], strict=False)
        missing = [name for name in missing if not name.startswith("discriminator.")]
        if missing or unexpected:
            raise RuntimeError(f"MMSSL checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        for m, pair in state["generated"].items():
            self.set_generated(m, pair[0].to(self.device), pair[1].to(self.device))
        self.store = {m: [(pair[0].to(self.device), pair[1].to(self.device))] if pair.shape[1] else []
                      for m, pair in state["store"].items()}

    # keys of a last.pt saved before the batches' random generator was named `rng` (in a GAN, "generator" is
    # another thing)
    OLD_KEYS = {"generator": "rng"}

    def training_state(self) -> dict:
        """last.pt: best_model.pt's state, the optimisers and random generators (the base's), plus the
        discriminator, which best_model.pt leaves out."""
        state = super().training_state()
        state["discriminator"] = self.discriminator.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        state = {self.OLD_KEYS.get(k, k): v for k, v in state.items()}
        stateful = {self.OLD_KEYS.get(k, k): v for k, v in state["stateful"].items()}
        super().load_training_state(dict(state, stateful=stateful))
        self.discriminator.load_state_dict(state["discriminator"])
