"""MDMNS: Modal-aware Diffusion-enhanced recommendation with Multi-level Negative Sampling (Knowledge-Based
Systems; authors' code HuXianshengNXU/MDMNS-main at 8851194), built on DiffMM (`Model.DiffMM`).

The paper could not be obtained, so the method is what the authors' code at that commit computes; its parts are
numbered §n below. Everything that code leaves as DiffMM had it is DiffMM's code here,
reused: data, graphs, feature transforms, the denoiser and its schedule, sampling, the graph rebuild and edge drop,
the epoch and its loops, DiffMM's cl_method 0 loss, checkpointing and every DiffMM flag with its default. What
changes is in DiffMM's hooks (`generator_inputs`, `generator_terms`, `generator_scorer`, `recommender_terms`):
- §1 recommender (`MDMNSRecommender`): the fused embedding H0 = Σ_m softmax(κ)_m z_m is re-propagated on the train
  graph into a view svt = P(G); each modality gets its own view s_m = P(z_m), with
  P(X) = Σ_{l<=L} adj^l X + ris_lambda·rownorm(X). DiffMM's main view P(H0) no longer exists.
- §2 loss: BPR on every s_m (none on svt), each divided by `batch`; `--cl_method 0` is DiffMM's pairwise loss on
  the forward_cl_MM views; `--cl_method 1` anchors every s_m to svt and contrasts every item table with noisy
  detached copies of itself at the levels int(frac·steps), with NCEs over ALL rows (`full_nce`).
- §3 diffusion: the denoiser is trained on S = guidance GCN scores of x_t, guided by the mean of the other
  modalities' features (`GuidanceGCN`, `guided_losses`: the shared `Models.diffusion` loss with S as the denoiser's
  input); sampling still feeds x_t itself.
- §4 evaluation: the sum of the dot products of every view (`embeddings` concatenates the views).

Defects of the authors' code kept by default because they shaped the published numbers, each with a fix flag:
- `--guide_fresh_per_call true`: the guidance GCN is a new random module on every call, never trained
  (false = one persistent module per modality, users embedded by id, trained with that modality's denoiser).
- `--guide_degree clamp`: negative noisy degrees are clamped to 1e-8, scaling those rows by 1e4
  (abs = |degree|, one = clamped at 1).
- `--guide_at_sampling false`: guidance in training only (true = the reverse steps feed S to the denoiser too).
- `--nce_noise_fracs 0.1,0.125,0.25,0.5`: the noise levels int(frac·steps) with absolute N(0, 1) noise.
Defects not carried over (they do not change the numbers): the missing `mse` line of Model.py:447 is restored;
the gradient-free `extra` term of §3 step 5 is computed for the log only (`<modality>_extra`); the NCE never holds
N x N logits (chunks of anchor rows); the guidance adjacency is never a dense (B+I)² matrix; the cl_method-1 terms
and the forward_cl_MM views are only computed when the loss uses them.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from DataHandler import Data
from Model import (DiffMM, GeneratorInputs, Recommender, Scores, Views, contrastive_loss, generator_objective,
                   msi_weight)
from Models.base import changed_flags, flag_list
from Models.diffusion import DenoiserFn, GaussianDiffusion, InputFn, reverse_scorer
from Utils.flags import float_list, str2bool
from Utils.layers import Graph, bpr_loss, propagate

# the NCE logits are computed in blocks of at most this many entries (64 MB in fp32)
NCE_BLOCK = 1 << 24
# the flags of the guided diffusion (§3): unread without guidance (one modality, --ablation no_dm)
GUIDE_FLAGS = ("guide_fused_hidden_dim", "guide_fresh_per_call", "guide_degree", "guide_at_sampling")


def noise_fracs(text: str) -> List[float]:
    """`--nce_noise_fracs`: non-negative numbers as `Utils.flags.float_list` parses them, or '' for none."""
    if not text.strip("[]() "):
        return []
    values = float_list(text)
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------
# Recommender (§1)
# ---------------------------------------------------------------------------------------------

class MDMNSRecommender(Recommender):
    """DiffMM's recommender with MDMNS's views: svt from the re-propagated fused embedding and one s_m per modality."""

    def forward(self, adj: Graph, modal_graphs: Dict[str, Graph], with_views: bool = False,
                view_graphs: Optional[Dict[str, Graph]] = None) -> Tuple[Views, Views]:
        """[(U, I) of svt, then of s_m for every modality], and DiffMM's contrastive views when `with_views` (§1).

        With z_m of DiffMM (`modal_embeddings`) and H0 = Σ_m softmax(κ)_m z_m (DiffMM's `fuse`):
            G  = adj [Eu; rownorm(H0[U:])];  G += adj [G[:U]; Ei];  G += ris_adj_lambda · adj [Eu; Ei]
            svt = P(G), s_m = P(z_m), P(X) = Σ_{l<=L} adj^l X + ris_lambda · rownorm(X)
        All views and the contrastive views share one propagation (stacked columns).
        """
        d, n_users = self.user_emb.shape[1], self.n_users
        modal, view_inputs = self.modal_embeddings(adj, modal_graphs, with_views, view_graphs)
        fused = self.fuse(modal)
        # the fused item rows replace the modality features of DiffMM's two-hop propagation
        g = adj @ torch.cat([self.user_emb, F.normalize(fused[n_users:])])
        g = g + adj @ torch.cat([g[:n_users], self.item_emb])
        g = g + self.ris_adj_lambda * (adj @ torch.cat([self.user_emb, self.item_emb]))
        tables = [g, *modal]
        pooled = propagate(adj, torch.cat(tables + view_inputs, dim=1), self.gnn_layer, "sum").split(d, dim=1)
        views = [pooled[k] + self.ris_lambda * F.normalize(x) for k, x in enumerate(tables)]
        return ([(v[:n_users], v[n_users:]) for v in views],
                [(v[:n_users], v[n_users:]) for v in pooled[len(tables):]])


def modal_bpr(modal_views: Views, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
              divisor: float) -> torch.Tensor:
    """Σ_m BPR on the view s_m, each divided by the configured batch size (§2; none on svt)."""
    return sum(bpr_loss(user_vec, item_vec, users, positives, negatives, divisor=divisor)
               for user_vec, item_vec in modal_views)


# ---------------------------------------------------------------------------------------------
# Contrastive terms of cl_method 1 (§2)
# ---------------------------------------------------------------------------------------------

class MeanRowLogSumExp(torch.autograd.Function):
    """mean_n logsumexp_v(x_n · y_v / τ) over every row n of x, one block of `chunk` rows x N at a time.

    Plain form: `torch.logsumexp(x @ y.T / temp, 1).mean()`. The result is a mean, so its gradient is fixed up to
    the scalar upstream gradient: it is accumulated block by block in the forward pass (softmax·y / (τN) for x,
    softmaxᵀ·x / (τN) for y, only where `with_grad` and the input requires it) and the backward scales it. Three
    products per block, as `Utils.kernels.LogSumExpLogits`, but never more than chunk x N logits alive.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, temp: float, chunk: int, with_grad: bool) -> torch.Tensor:
        n = x.shape[0]
        need_x, need_y = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        total = x.new_zeros((), dtype=torch.float64)
        for start in range(0, n, chunk):
            rows = x[start:start + chunk] / temp
            logits = rows @ y.T
            lse = torch.logsumexp(logits, dim=1)
            total += lse.sum(dtype=torch.float64)
            if need_x or need_y:
                probs = logits.sub_(lse[:, None]).exp_()
                if need_x:
                    grad_x[start:start + chunk] = probs @ y / (temp * n)
                if need_y:
                    grad_y.addmm_(probs.T, rows, alpha=1.0 / n)
        ctx.grads = (grad_x, grad_y)
        return (total / n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_y = ctx.grads
        return (None if grad_x is None else grad * grad_x, None if grad_y is None else grad * grad_y,
                None, None, None)


def full_nce(anchor: torch.Tensor, other: torch.Tensor, temp: float, chunk: Optional[int] = None) -> torch.Tensor:
    """NCE(A, B) = mean over ALL N rows n of −log softmax_j(â_n · b̂_j / τ)[n], rows L2-normalised (§2).

    The authors' cross-entropy over the full N x N logits (Main.py:338-348), computed in blocks of `chunk` anchor
    rows (default: NCE_BLOCK entries per block): same value and gradient, never N x N in memory.
    """
    x, y = F.normalize(anchor), F.normalize(other)
    chunk = chunk or max(1, NCE_BLOCK // len(y))
    lse = MeanRowLogSumExp.apply(x, y, temp, chunk, torch.is_grad_enabled())
    return lse - (x * y).sum(-1).mean() / temp


def noise_levels(steps: int, fracs: Sequence[float]) -> List[int]:
    """c = int(frac · steps) for every fraction (Main.py:359; T=5 → 0,0,1,2 and T=20 → 2,2,5,10 by default)."""
    return [int(steps * frac) for frac in fracs]


def noisy_contrast(item_view: torch.Tensor, levels: Sequence[int], temp: float,
                   noises: Optional[Sequence[torch.Tensor]] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """Σ_c NCE(I_m, stopgrad(I_m) + c·ε_c): the multi-level noisy contrast of one item table (§2).

    ε_c ~ N(0, 1) is drawn here for every level, fresh on every call (or taken from `noises`, one per level). Each
    item's own noisy copy is its positive, every other item's copy a negative; gradients reach the clean anchor
    only. Every level c = 0 is the same exact term (no noise), so it is computed once and counted.
    """
    target = item_view.detach()
    zeros = Counter(levels)[0]
    loss = zeros * full_nce(item_view, target, temp, chunk) if zeros else item_view.new_zeros(())
    for k, level in enumerate(levels):
        if level != 0:
            noise = torch.randn_like(target) if noises is None else noises[k]
            loss = loss + full_nce(item_view, target + level * noise, temp, chunk)
    return loss


def anchored_contrast(views: Views, levels: Sequence[int], temp: float) -> torch.Tensor:
    """cl_method 1 before ssl_reg (§2): Σ_m [NCE(U_svt, U_m) + NCE(I_svt, I_m) + noisy_contrast(I_m)]."""
    (user_svt, item_svt), modal_views = views[0], views[1:]
    loss = user_svt.new_zeros(())
    for user_vec, item_vec in modal_views:
        loss = loss + full_nce(user_svt, user_vec, temp) + full_nce(item_svt, item_vec, temp)
        loss = loss + noisy_contrast(item_vec, levels, temp)
    return loss


# ---------------------------------------------------------------------------------------------
# Guided diffusion training (§3)
# ---------------------------------------------------------------------------------------------

def is_guided(args: argparse.Namespace, data: Data) -> bool:
    """Whether the denoisers are guided (§3): guidance needs another modality, and a diffusion model (not the VGAE
    of --ablation no_dm)."""
    return len(data.modalities) > 1 and args.ablation != "no_dm"


def guide_features(modal_feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """g_m = the unweighted mean of the OTHER modalities' transformed features (§3, §7); none with one modality."""
    if len(modal_feats) < 2:
        return {}
    total = sum(modal_feats.values())
    return {m: (total - f) / (len(modal_feats) - 1) for m, f in modal_feats.items()}


def guidance_propagate(x_t: torch.Tensor, nodes: torch.Tensor, degree: str = "clamp") -> torch.Tensor:
    """Â X for A = [[0, x_t], [x_tᵀ, 0]] + I, Â = D A D, D = diag(deg^-½), without the (B+I)² matrix (§3 step 2).

    x_t is B x I (noisy rows, so degrees can be negative), `nodes` X is (B+I) x h. deg = rowsum(A) fixed by
    `degree`: clamp = max(deg, 1e-8) (authors), abs = max(|deg|, 1e-8), one = max(deg, 1).
    """
    n_users = x_t.shape[0]
    deg = torch.cat([1.0 + x_t.sum(1), 1.0 + x_t.sum(0)])
    if degree == "abs":
        deg = deg.abs()
    deg = deg.clamp(min=1.0 if degree == "one" else 1e-8)
    scale = deg.pow(-0.5)[:, None]
    scaled = scale * nodes
    users, items = scaled[:n_users], scaled[n_users:]
    return scale * torch.cat([x_t @ items + users, x_t.T @ users + items])


class GuidanceGCN(nn.Module):
    """The authors' `GCNRecommender` (Model.py:480-529): S = Y_u Y_iᵀ with Y = Lin_g(Â [E; Lin_f(g_m)]) (§3 step 2).

    E: `n_users` x h user vectors ~ N(0, 1) (nn.Embedding's init); the authors' module embeds batch positions
    (n_users = B, a new module per call), the persistent one embeds user ids. Its unused item table is left out.
    """

    def __init__(self, n_users: int, latdim: int, hidden: int, degree: str, device: Optional[torch.device] = None):
        super().__init__()
        self.degree = degree
        self.user_emb = nn.Embedding(n_users, hidden, device=device)
        self.feature_transform = nn.Linear(latdim, hidden, device=device)
        self.gcn = nn.Linear(hidden, hidden, device=device)

    def forward(self, x_t: torch.Tensor, guide: torch.Tensor, users: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x I scores of the guidance graph built on x_t; `users` picks the user rows (None: all, in order)."""
        user_nodes = self.user_emb.weight if users is None else self.user_emb(users)
        nodes = torch.cat([user_nodes, self.feature_transform(guide)])
        y = self.gcn(guidance_propagate(x_t, nodes, self.degree))
        return y[: len(x_t)] @ y[len(x_t):].T


def guided_losses(diffusion: GaussianDiffusion, denoiser: DenoiserFn, x0: torch.Tensor, item_emb: torch.Tensor,
                  modal_feat: torch.Tensor, guidance: Optional[InputFn] = None, t: Optional[torch.Tensor] = None,
                  noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the ELBO term w_t · mean_i (x0 − x̂0)², the MSI term and w_t, with x̂0 = denoiser(S, t) (§3).

    DiffMM's `GaussianDiffusion.training_losses` with the denoiser fed S = guidance(x_t) instead of x_t (steps 1-4
    and 6; step 4's `mse`, missing at the authors' HEAD, restored); w_t as well, for the logged `extra` term. The
    steps are drawn here (as that loss would draw them) so that w_t is known; `t` and the noise as given there.
    """
    if t is None:
        t = diffusion.sample_steps(x0)
    elbo, msi = diffusion.training_losses(denoiser, x0, item_emb, modal_feat, t, noise, denoiser_input=guidance)
    return elbo, msi, diffusion.elbo_weight(t).float()


@torch.no_grad()
def guide_extra(x0: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """mean_i (x0 − Pᵀ)² per row with P = Lin(g_m), a new nn.Linear(d, B) (§3 step 5). It has no gradient on any
    trained parameter, so it is logged, not trained (the authors add w_t times it to their logged diffusion loss)."""
    mlp = nn.Linear(guide.shape[1], x0.shape[0], device=x0.device)
    return (x0 - mlp(guide).T).square().mean(dim=1)


@dataclass
class GuidedInputs(GeneratorInputs):
    """DiffMM's generator inputs plus g_m, the guide of every modality (`guide_features`; empty when unguided)."""

    guides: Dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The model: DiffMM's epoch, its hooks overridden with MDMNS's recommender, loss, guided denoisers and score
# ---------------------------------------------------------------------------------------------

class MDMNS(DiffMM):
    """DiffMM + MDMNS's changes (module docstring, §1-§n); every DiffMM flag keeps its default."""

    name = "mdmns"
    paper = ("MDMNS: modal-aware diffusion-enhanced recommendation with multi-level negative sampling "
             "(Knowledge-Based Systems)")
    recommender_class = MDMNSRecommender
    # MDMNS's README (its Sports command gives --temp 0.1 twice)
    presets = {
        "tiktok": ["--reg", "1e-4", "--ssl_reg", "1e-2", "--epoch", "50", "--trans", "1", "--e_loss", "0.1",
                   "--cl_method", "1", "--latdim", "512", "--gnn_layer", "1", "--temp", "0.5", "--steps", "5"],
        "baby": ["--reg", "1e-5", "--ssl_reg", "1e-1", "--keepRate", "1", "--e_loss", "0.01", "--gnn_layer", "2",
                 "--latdim", "256", "--temp", "0.5", "--steps", "20"],
        "sports": ["--reg", "1e-6", "--ssl_reg", "1e-2", "--temp", "0.1", "--ris_lambda", "0.1", "--e_loss", "0.5",
                   "--keepRate", "1", "--trans", "1", "--gnn_layer", "1", "--latdim", "256", "--steps", "5"],
    }
    published = {"tiktok": (0.1193, 0.0525, 0.0060), "baby": (0.1009, 0.0433, 0.0053),
                 "sports": (0.1093, 0.0496, 0.0058)}
    published_in = "MDMNS Table II (read off the image in its repository)"
    published_ablations: dict = {}   # DiffMM's Tables 3 and 4 are not MDMNS's
    published_temp_ssl: dict = {}

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        self.levels = noise_levels(args.steps, args.nce_noise_fracs)
        self.guided = is_guided(args, data)
        self.guides = nn.ModuleDict()
        if self.guided and not args.guide_fresh_per_call:  # a fix: persistent modules trained with the denoisers
            self.guides = nn.ModuleDict({
                m: GuidanceGCN(data.n_users, args.latdim, args.guide_fused_hidden_dim, args.guide_degree)
                for m in data.modalities}).to(device)
            self.generator_optimizers = {
                m: torch.optim.Adam(list(g.parameters()) + list(self.guides[m].parameters()), lr=args.lr,
                                    weight_decay=0)
                for m, g in self.generators.items()}

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        """DiffMM's flags with their defaults, then MDMNS's own."""
        DiffMM.add_args(parser)
        g = parser.add_argument_group("mdmns (its authors' code, HuXianshengNXU/MDMNS-main; "
                                      "fixes of the authors' defects are off by default)")
        unguided = " (given where nothing is guided, one modality or --ablation no_dm, a warning says it does nothing)"
        g.add_argument("--guide_fused_hidden_dim", default=64, type=int,
                       help="h: width of the guidance GCN of the diffusion training" + unguided)
        g.add_argument("--guide_fresh_per_call", default=True, type=str2bool,
                       help="true (authors) = a new random, untrained guidance GCN on every denoiser call; false = "
                            "one per modality (users embedded by id), trained with that modality's denoiser" + unguided)
        g.add_argument("--guide_degree", default="clamp", choices=["clamp", "abs", "one"],
                       help="degrees of the noisy guidance graph: clamp (authors) = max(deg, 1e-8), which scales "
                            "rows of negative degree by 1e4; abs = max(|deg|, 1e-8); one = max(deg, 1). On TikTok "
                            "with clamp, 11 to 15 in 100 noisy rows have a negative degree, the guided scores reach "
                            "1e11-1e18 and the denoiser's tanh input layer saturates: its gradient is exactly zero, "
                            "only its output layer trains; abs and one keep it trained (docs/siblings.md)" + unguided)
        g.add_argument("--guide_at_sampling", default=False, type=str2bool,
                       help="false (authors) = guidance in training only; true = the reverse steps of the graph "
                            "rebuild feed the guided scores to the denoiser as well (step by step: refused with "
                            "--reverse hidden)" + unguided)
        g.add_argument("--nce_noise_fracs", default=[0.1, 0.125, 0.25, 0.5], type=noise_fracs,
                       help="cl_method 1: noise levels c = int(frac x steps) of the noisy item copies (N(0,1) noise "
                            "times c); '' = no noisy terms")

    @classmethod
    def reverse_reads_x_t(cls, args: argparse.Namespace, data: Data) -> bool:
        """--guide_at_sampling true feeds the reverse steps the guided scores S, so the graph rebuild runs step by step
        on the item rows (the hidden-space chain needs x_t itself as the denoiser's input)."""
        return not (args.guide_at_sampling and is_guided(args, data))

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        """MDMNS's flags, then every check of DiffMM's (its flags are DiffMM's). --guide_at_sampling true with
        --reverse hidden is refused: guided reverse steps feed the denoiser S, the hidden-space chain needs x_t."""
        if args.guide_fused_hidden_dim < 1:
            return f"--guide_fused_hidden_dim must be at least 1, got {args.guide_fused_hidden_dim}."
        if args.guide_at_sampling and args.reverse == "hidden":
            return ("--guide_at_sampling true feeds the guided scores to the reverse steps, which the hidden-space "
                    "chain of --reverse hidden cannot take (it needs x_t itself); use --reverse auto or direct, or "
                    "--guide_at_sampling false.")
        return super().check_flags(args)

    @classmethod
    def unused_with_ablation(cls, args: argparse.Namespace) -> Tuple[str, ...]:
        """DiffMM's, and with no_dm the guidance flags too (guidance needs the diffusion); --steps stays read where
        cl_method 1's noise levels int(frac x steps) use it."""
        unused = super().unused_with_ablation(args)
        if args.ablation == "no_dm":
            reads_steps = args.cl_method == 1 and args.nce_noise_fracs and args.ssl_reg != 0
            unused = tuple(n for n in unused if not (n == "steps" and reads_steps)) + GUIDE_FLAGS
        return unused

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        """DiffMM's checks; a warning naming the guidance flags given for a dataset of one modality, where
        nothing is guided (guidance is the mean of the other modalities' features)."""
        problem = super().check(args, data)
        if problem:
            return problem
        unused = changed_flags(args, GUIDE_FLAGS) if args.ablation != "no_dm" and len(data.modalities) < 2 else []
        if unused:   # with no_dm they were named when the command line was parsed (flag_warnings)
            logging.getLogger("diffmm").warning(
                f"warning: {flag_list(unused)} {'does' if len(unused) == 1 else 'do'} nothing on {data.name} with "
                f"the one modality {', '.join(data.modalities)}: the denoiser is guided by the other modalities' "
                f"features, so with one it is not guided.")
        return None

    # --- diffusion (§3) ------------------------------------------------------------------------
    def guided_input(self, modality: str, x_t: torch.Tensor, guide: torch.Tensor, users: torch.Tensor
                     ) -> torch.Tensor:
        """S for the denoiser: a new untrained GuidanceGCN per call (authors; nothing trained depends on its
        parameters, so it runs without gradients) or the modality's persistent one (--guide_fresh_per_call false)."""
        args = self.args
        if args.guide_fresh_per_call:
            module = GuidanceGCN(len(x_t), guide.shape[1], args.guide_fused_hidden_dim, args.guide_degree,
                                 device=self.device)
            with torch.no_grad():
                return module(x_t, guide)
        return self.guides[modality](x_t, guide, users)

    @torch.no_grad()
    def generator_inputs(self) -> GeneratorInputs:
        """DiffMM's, plus the guides g_m of every modality where guidance applies (§3)."""
        inputs = super().generator_inputs()
        guides = guide_features(inputs.modal_feats) if self.guided else {}
        return GuidedInputs(**{f.name: getattr(inputs, f.name) for f in fields(inputs)}, guides=guides)

    def generator_terms(self, modality: str, inputs: GeneratorInputs, x0: torch.Tensor, users: torch.Tensor
                        ) -> Dict[str, torch.Tensor]:
        """Guided training (§3): loss_m = mean ELBO + e_loss · mean MSI on x̂0 = denoiser(S, t), and logged only,
        `<m>_extra` = mean w_t · extra, the gradient-free term the authors add to it. One modality or
        --ablation no_dm: DiffMM's loss."""
        if not self.guided:
            return super().generator_terms(modality, inputs, x0, users)
        guide = inputs.guides[modality]
        elbo, msi, weight = guided_losses(self.diffusion, self.generators[modality], x0, inputs.item_emb,
                                          inputs.modal_feats[modality],
                                          lambda x_t: self.guided_input(modality, x_t, guide, users))
        loss = generator_objective(elbo, msi, msi_weight(self.args))
        return {modality: loss, f"{modality}_extra": (weight * guide_extra(x0, guide).float()).mean()}

    def generator_scorer(self, modality: str, inputs: GeneratorInputs) -> Scores:
        """DiffMM's; with --guide_at_sampling true the reverse steps feed S = guidance(x_t) to the denoiser (step by
        step on the item rows: `reverse_reads_x_t` turned the hidden-space chain off)."""
        if not (self.args.guide_at_sampling and self.guided):
            return super().generator_scorer(modality, inputs)
        guide, args = inputs.guides[modality], self.args
        return reverse_scorer(self.diffusion, self.generators[modality], inputs.user_rows, args.sampling_steps,
                              args.sampling_noise, self.hidden_reverse, inputs.autocast,
                              lambda x_t, users: self.guided_input(modality, x_t, guide, users))

    # --- recommender (§2) -------------------------------------------------------------------------
    def recommender_terms(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                          modal_graphs: Dict[str, Graph], view_graphs: Optional[Dict[str, Graph]]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ_m BPR(s_m), λ2 reg, λ1 cl) of one batch (§2).

        cl: `--cl_method 0` DiffMM's pairwise loss on the forward_cl_MM views (built only then); `--cl_method 1`
        `anchored_contrast` (svt anchors and the multi-level noisy item contrast). `--ablation no_cl` or ssl_reg 0:
        no contrastive term, nothing of it computed.
        """
        args = self.args
        with_cl = args.ssl_reg != 0 and args.ablation != "no_cl"
        with self.autocast():
            views, cl_views = self.recommender(self.adj, modal_graphs, with_views=with_cl and args.cl_method == 0,
                                               view_graphs=view_graphs)
        views = [(a.float(), b.float()) for a, b in views]
        bpr = modal_bpr(views[1:], users, positives, negatives, divisor=args.batch)
        reg = args.reg * self.recommender.reg_loss()
        if not with_cl:
            cl = torch.zeros((), device=self.device)
        elif args.cl_method == 0:
            cl = args.ssl_reg * contrastive_loss(*views[0], [(a.float(), b.float()) for a, b in cl_views],
                                                 users, positives, 0, args.temp, self.plain)
        else:
            cl = args.ssl_reg * anchored_contrast(views, self.levels, args.temp)
        return bpr, reg, cl

    # --- evaluation and checkpoints (§4) --------------------------------------------------------
    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every view side by side, [svt, s_m...], so that a dot product is Σ_v U_v[u] · I_v[i] (§4)."""
        with self.autocast():
            views, _ = self.recommender(self.adj, {m: g[self.args.eval_graph] for m, g in self.graphs.items()})
        return torch.cat([u for u, _ in views], dim=1), torch.cat([i for _, i in views], dim=1)

    def checkpoint_state(self) -> dict:
        """DiffMM's (recommender, generators, evaluation graphs) plus the persistent guidance modules, if any."""
        return dict(super().checkpoint_state(), guides=self.guides.state_dict())

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.guides.load_state_dict(state["guides"])
