"""DiffRec (Wang et al., SIGIR 2023): a diffusion model over each user's interaction row, as the authors'
code computes it (YiyanXu/DiffRec@d35a6c6, DiffRec/).

Training, one batch of user rows x0 (the dense 0/1 train rows, batch 400):
    t ~ importance sampling (below);  x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε            (paper Eq. 3)
    x̂0 = f(x_t, t), DiffMM's MLP denoiser (`Models.diffusion.Denoiser`: dims [1000], emb 10, input dropout 0.5)
    loss_row = w_t · mean_i (x0 - x̂0)² / (p_t · T),   loss = mean over the batch           (Eq. 11-13)
with w_t = SNR(t-1) - SNR(t), w_0 = 1 (`gaussian_diffusion.py:140-174`). The noise schedule is DiffMM's
(`Models.diffusion.noise_schedule`, DiffRec's "linear-var") with β_0 = 1e-5 instead of DiffMM's 1e-4 (`:31`).
Importance sampling of t (`:124,176-197`): every t keeps its last 10 values of w_t·mse_row; while some t has
fewer than 10, t is uniform (p_t·T = 1); then p_t ∝ sqrt(mean of those 10 squared values), p ← 0.999 p +
0.001/T. AdamW (lr 1e-4, weight decay 0), at most 1000 epochs, evaluation every 5 epochs, early stop as
`main.py:150-183` (see `defaults`). No MSI term, no recommender: interactions only. The harness evaluates
by DiffMM's rule (after 0-based epoch e when e % 5 == 0: after 1, 6, 11, ... trained epochs), DiffRec's loop
after 5, 10, 15, ...: the evaluated epochs are shifted by four, the stopping rule (three evaluations without
a better validation Recall) is the same.

Scores (`main.py:122-145`, `gaussian_diffusion.py:93-120`): start at the train row itself (sampling_steps 0),
run the T reverse steps with the posterior mean of q(x_{t-1} | x_t, x̂0), no noise, and rank the result; the
harness masks train items and evaluates (not DiffRec's train+val mask and all-user average).

Paper vs code: the paper's importance sampling and the reweighted ELBO are what the code does; the code's
defaults (steps 100, noise_scale 0.1, noise_min 1e-4, noise_max 0.02, `main.py:55-69`) are ours, since neither
DiffRec's tuned settings for these datasets nor DiffMM's settings for DiffRec are published.

Defects of the authors' code not carried over: `type=bool` flags (`--norm False` was ON:
parsed as booleans here); `--reweight False` crashed on an unbound `loss` (here: weight 1, the plain MSE);
`eval` of `--dims`; a Python loop per row to update the importance history (a tensor scatter here); the dense
U x I copy of the train matrix; DiffRec's all-user metric average. `--reverse auto` runs the scoring chain in
the denoiser's hidden space where that is exact and cheaper for the shapes (`Models.diffusion.use_hidden_reverse`).
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

import torch

from DataHandler import Data
from Models.base import Losses, PhaseTimer, RecModel
from Models.diffusion import (Denoiser, GaussianDiffusion, add_diffusion_args, check_diffusion_flags, reverse_scorer,
                              use_hidden_reverse)
from Utils.batches import DeviceRows, device_batches, user_batches
from Utils.flags import str2bool
from Utils.memory import linear_entries
from Utils.metrics import Scorer

BETA_FIXED = 1e-5   # DiffRec's β_0 (gaussian_diffusion.py:31); DiffMM's is 1e-4
HISTORY = 10        # values kept per step (history_num_per_term)
UNIFORM_PROB = 0.001
EMB_FLAG = "emb_size"  # DiffRec's name of the step embedding's size (DiffMM's --d_emb_size)


class StepHistory:
    """The importance-sampling state of DiffRec's diffusion: the last `size` values of w_t·loss_row of every
    step t (a T x size ring buffer) and how many values each t has received.

    The authors shift a row left and append; only the set of the last `size` values enters p_t (the mean of
    their squares), so a ring buffer written at slot (count mod size) gives the same probabilities.
    """

    def __init__(self, steps: int, device: torch.device, size: int = HISTORY):
        self.steps, self.size = steps, size
        self.values = torch.zeros(steps, size, dtype=torch.float64, device=device)
        self.count = torch.zeros(steps, dtype=torch.long, device=device)
        self._full = False   # counts only grow: once full, no more device syncs to ask

    def full(self) -> bool:
        """Whether every step has `size` values (the switch from uniform to importance sampling)."""
        if not self._full:
            self._full = bool((self.count >= self.size).all())
        return self._full

    def probabilities(self, uniform_prob: float = UNIFORM_PROB) -> torch.Tensor:
        """p_t ∝ sqrt(mean of the stored squared values), mixed with the uniform distribution (`:185-189`)."""
        root = self.values.square().mean(dim=1).sqrt()
        return (root / root.sum()) * (1.0 - uniform_prob) + uniform_prob / self.steps

    def sample(self, n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t, p_t·T) for n rows: uniform (p_t·T = 1) until every step has `size` values, then by importance."""
        if not self.full():
            return torch.randint(0, self.steps, (n,), device=device), torch.ones(n, device=device)
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True)
        return t, (p[t] * self.steps).float()

    def update(self, t: torch.Tensor, values: torch.Tensor) -> None:
        """Append the batch's values in row order, as the authors' per-row loop, with one scatter.

        Rows are grouped by step (a stable sort keeps their order); per step only its last `size` rows can
        survive, and the j-th value a step has ever received goes to slot j mod size.
        """
        order = torch.argsort(t, stable=True)
        t, values = t[order], values[order].to(self.values.dtype)
        # counted into a buffer of fixed size: bincount would read max(t) back from the device
        per_step = torch.zeros(self.steps, dtype=torch.long, device=t.device).index_add_(0, t, torch.ones_like(t))
        rank = torch.arange(len(t), device=t.device) - (torch.cumsum(per_step, 0) - per_step)[t]
        kept = rank >= per_step[t] - self.size
        slot = (self.count[t] + rank) % self.size
        # every row is written, the ones not kept into a spare cell past the end (distinct cells for the kept
        # ones): selecting the kept rows by a mask would read their number back from the device
        cells = torch.cat([self.values.view(-1), self.values.new_zeros(1)])
        cells[torch.where(kept, t * self.size + slot, len(cells) - 1)] = values
        self.values.copy_(cells[:-1].view(self.steps, self.size))
        self.count += per_step

    def state(self) -> dict:
        return {"values": self.values.cpu(), "count": self.count.cpu()}

    def load(self, state: dict) -> None:
        self.values.copy_(state["values"])
        self.count.copy_(state["count"])
        self._full = False


class DiffRec(RecModel):
    """One denoiser over the user rows, its AdamW, the diffusion schedule and the importance history."""

    name = "diffrec"
    paper = "DiffRec: diffusion recommender model (Wang et al., SIGIR 2023)"
    phases = ("denoiser",)
    loss_phases = {"loss": "denoiser"}
    # main.py:42-45: lr 1e-4, batch 400, <= 1000 epochs; :150-183 evaluates every 5 epochs and stops at the
    # start of the epoch 20 after the best one, so after the 3 evaluations (best+5, +10, +15) that did not improve
    defaults = {"lr": 1e-4, "batch": 400, "epoch": 1000, "tstEpoch": 5, "patience": 3}
    # ours (DiffMM does not publish its DiffRec settings); noise_min x noise_max is the
    # Cartesian product, a superset of the proposed pairs (5e-4, 5e-3) and (1e-3, 1e-2)
    grid = {"lr": [1e-5, 5e-5, 1e-4], "steps": [5, 10], "noise_scale": [1e-4, 1e-3, 1e-2, 0.1],
            "noise_min": [5e-4, 1e-3], "noise_max": [5e-3, 1e-2]}
    published = {"tiktok": (0.0708, 0.0317, 0.0035), "baby": (0.0717, 0.0334, 0.0038),
                 "sports": (0.0823, 0.0407, 0.0044)}
    published_in = "DiffMM Table 2"

    @classmethod
    def parameter_sizes(cls, args: argparse.Namespace, n_users: int, n_items: int, widths: Dict[str, int]
                        ) -> Dict[str, int]:
        """No embeddings: one denoiser I + emb -> dims -> I over the user rows."""
        sizes = [n_items + args.emb_size, *args.dims[::-1], *args.dims[1:], n_items]
        return {f"denoiser ({' -> '.join(f'{n:,}' for n in sizes)})": linear_entries(sizes)}

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        self.denoiser = Denoiser(data.n_items, args.dims, args.emb_size, args.norm).to(device)
        self.diffusion = GaussianDiffusion(args.noise_scale, args.noise_min, args.noise_max, args.steps, device,
                                           beta_fixed=BETA_FIXED)
        self.history = StepHistory(args.steps, device)
        self.user_rows = DeviceRows(data.train, device)  # every user's train row, gathered per batch on the device
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        # the scoring chain in the denoiser's hidden space where that is exact and cheaper for the evaluation's
        # batches of users
        self.hidden_reverse = use_hidden_reverse(args, data.n_items, args.tstBat)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("diffrec (DiffRec main.py: the authors' names and defaults)")
        add_diffusion_args(g, emb_flag=EMB_FLAG, steps=100, helps={
            "sampling_steps": "T': scoring starts from x_{T'} = q(x0, T'-1); 0 = from the train row itself",
            "sampling_noise": "add noise in the reverse steps",
            "reverse": "scoring chain: hidden = in the denoiser's hidden space (exact with mean_type x0, --norm "
                       "false, --sampling_noise false; same scores to float rounding); direct = step by step on "
                       "the item rows, as the authors; auto = hidden where it is exact and cheaper for these "
                       "shapes, else direct"})
        g.add_argument("--mean_type", default="x0", choices=["x0", "eps"],
                       help="what the denoiser predicts: x0 = the clean row (the paper), eps = the noise")
        g.add_argument("--reweight", default=True, type=str2bool,
                       help="weight step t's loss by w_t (x0: SNR(t-1) - SNR(t), w_0 = 1); false = weight 1 (the "
                            "authors' code crashes there)")
        g.add_argument("--weight_decay", default=0.0, type=float, help="AdamW weight decay")

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        """The diffusion's checks (`check_diffusion_flags`), then DiffRec's own, as one sentence (none needs the
        data: `check` is the default, these)."""
        problem = check_diffusion_flags(args, emb_flag=EMB_FLAG)
        if problem:
            return problem
        if args.noise_scale <= 0.0:
            return f"--noise_scale must be positive (DiffRec cannot train without noise), got {args.noise_scale}."
        if args.steps > 1 and args.noise_min >= args.noise_max:
            return (f"--noise_min ({args.noise_min}) must be below --noise_max ({args.noise_max}): the noise "
                    f"variance must grow with t.")
        if args.weight_decay < 0.0:
            return f"--weight_decay must not be negative, got {args.weight_decay}."
        return None

    # --- training ------------------------------------------------------------------------------
    def step_weights(self, t: torch.Tensor) -> torch.Tensor:
        """w_t of each row (float64): x0: SNR(t-1) - SNR(t) (Eq. 11); eps: (1-ᾱ_t) / ((1-ᾱ_{t-1})² (1-β_t));
        both 1 at t = 0, and 1 everywhere without --reweight (`gaussian_diffusion.py:142-155`)."""
        d = self.diffusion
        if not self.args.reweight:
            return torch.ones(len(t), dtype=torch.float64, device=t.device)
        if self.args.mean_type == "x0":
            return d.elbo_weight(t)
        weight = (1.0 - d.alphas_cumprod[t]) / ((1.0 - d.alphas_cumprod_prev[t]).square() * (1.0 - d.betas[t]))
        return torch.where(t == 0, torch.ones_like(weight), weight)

    def start_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂0 = sqrt(1/ᾱ_t) x_t - sqrt(1/ᾱ_t - 1) ε̂."""
        a = self.diffusion.alphas_cumprod[t][:, None]
        return (a.rsqrt() * x_t - (1.0 / a - 1.0).sqrt() * eps).float()

    def batch_loss(self, x0: torch.Tensor, draws: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                   ) -> torch.Tensor:
        """Mean over the rows of w_t·loss_row/(p_t·T); the history receives w_t·loss_row (`:124-174`).

        `draws`: (t, p_t·T, ε) to use instead of drawing them (tests feed the same draws to two devices).
        """
        if draws is None:
            t, pt = self.history.sample(x0.shape[0], x0.device)
            noise = torch.randn_like(x0)
        else:
            t, pt, noise = draws
        x_t = self.diffusion.q_sample(x0, t, noise)
        with self.autocast():
            output = self.denoiser(x_t, t).float()
        if self.args.mean_type == "x0":
            row_loss = (x0 - output).square().mean(dim=1)
        else:  # the noise is the target; at t = 0 the row's loss is the likelihood term of x̂0 instead
            mse = (noise - output).square().mean(dim=1)
            likelihood = ((x0 - self.start_from_eps(x_t, t, output)).square() / 2.0).mean(dim=1)
            row_loss = torch.where(t == 0, likelihood, mse)
        weighted = self.step_weights(t).float() * row_loss
        self.history.update(t, weighted.detach())
        return (weighted / pt).mean()

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Losses:
        with timer.phase("denoiser"):
            self.denoiser.train()
            total = torch.zeros((), device=self.device)
            batches = user_batches(self.data.n_users, self.args.batch, shuffle=True)
            for idx in self.progress(device_batches(batches, self.device), self.name):
                x0 = self.user_rows.dense(idx)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.batch_loss(x0)
                loss.backward()
                self.optimizer.step()
                total += loss.detach()
        return {"loss": {"loss": float(total) / len(batches)}}

    # --- scoring --------------------------------------------------------------------------------
    def scorer(self) -> Scorer:
        """The denoised rows of a batch of users: T reverse steps from their train rows (or from x_{T'})."""
        args = self.args

        def predict_start(x: torch.Tensor, t: torch.Tensor, mess_dropout: bool = True) -> torch.Tensor:
            return self.start_from_eps(x, t, self.denoiser(x, t, mess_dropout).float())

        # --mean_type eps: the reverse steps need x̂0, turned from the predicted noise (the hidden chain is then off)
        denoiser = self.denoiser if args.mean_type == "x0" else predict_start
        # called with the users only: the hidden chain reads their number of entries back (one scalar)
        return reverse_scorer(self.diffusion, denoiser, self.user_rows, args.sampling_steps, args.sampling_noise,
                              self.hidden_reverse, self.autocast)

    # --- state ----------------------------------------------------------------------------------
    def training_state(self) -> dict:
        """The base state (denoiser, AdamW) and the importance history, so a resumed run samples the same t."""
        return dict(super().training_state(), step_history=self.history.state())

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.history.load(state["step_history"])
