"""The model contract: everything the harness (`Main.py`) calls on a model, and nothing else.

A model is an `nn.Module` built from `(args, data, device)`. Per epoch the harness calls
`pre_epoch(epoch, timer)`, then `train_epoch(epoch, timer)`, which trains in the named phases it times and
returns its mean losses; then, in eval mode and without gradients, `scorer()`, which ranks items for
a batch of users. `checkpoint_state()` is what `best_model.pt` holds. Everything else (optimisers,
schedulers, negatives, graphs, several optimisers stepped in the order the model chooses) is the
model's own business. `PairwiseModel` is the shared BPR training loop of MMRec's models: a model
built on it only says how to score and what its batch loss is. `PhaseTimer` is the `timer` the harness passes:
`with timer.phase(name):` times one of the model's `phases`.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm import tqdm

from DataHandler import Data
from Utils.batches import device_batches, sample_negatives, train_pairs, user_batches
from Utils.flags import float_pair
from Utils.layers import Graph
from Utils.metrics import Scorer, dot_scorer

Losses = Dict[str, Dict[str, float]]


class PhaseTimer:
    """Seconds per named phase, summed over the phase's entries (MMSSL enters its phases once per batch).

    On the CPU: wall-clock time. On CUDA, kernels are queued asynchronously, so the host clock would charge a
    phase for the work queued before it and end before its own work did; a synchronisation at every phase
    boundary would stall the GPU once per batch instead. So each phase records a CUDA event at its start and
    at its end, in stream order, and `seconds` synchronises once, when it is read (once per epoch): an event
    pair spans exactly the device timeline between the phase's start and the end of its work, host work
    inside the phase included.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._seconds: Dict[str, float] = {}
        self._events: Dict[str, list] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            yield
            end.record(stream)
            self._events.setdefault(name, []).append((begin, end))
            return
        start = time.perf_counter()
        yield
        self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def seconds(self) -> Dict[str, float]:
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                self._seconds[name] = self._seconds.get(name, 0.0) + sum(b.elapsed_time(e) for b, e in pairs) / 1000
            self._events = {}
        return dict(self._seconds)


class RecModel(nn.Module):
    """Base of every model: the contract with its defaults."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""                   # one line: the method and where it was published
    needs_features: ClassVar[bool] = False      # True: at least one modality's feature file must be present
    phases: ClassVar[Tuple[str, ...]] = ("recommender",)   # the phases train_epoch times, in order
    # which phase each loss group of train_epoch's result belongs to (a non-finite loss names it)
    loss_phases: ClassVar[Dict[str, str]] = {"loss": "recommender"}
    defaults: ClassVar[Dict[str, object]] = {}  # harness flags whose default differs for this model
    grid: ClassVar[Dict[str, list]] = {}        # its hyper-parameter grid: `Experiments.sweep --grid NAME`
    # its authors' published commands: dataset -> flags, run as `--preset NAME-DATASET` (Params.presets)
    presets: ClassVar[Dict[str, List[str]]] = {}
    # published test Recall@20, NDCG@20, Precision@20 per dataset (Table 2 of `Experiments.reproduce`), and
    # where they were printed (or, without numbers, why there are none)
    published: ClassVar[Dict[str, Tuple[float, float, float]]] = {}
    published_in: ClassVar[str] = "no published number"

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__()
        self.args, self.data, self.device = args, data, device
        # --kernels plain: torch's own sparse products and InfoNCE instead of Utils/kernels.py, for every model
        # (the reference that `Experiments.benchmark --compare` measures the fast kernels against)
        self.plain = args.kernels == "plain"

    def as_graph(self, matrix: sp.spmatrix, symmetric: bool = False) -> Graph:
        """`matrix` as a Graph on the run's device, multiplied with the run's kernels (`--kernels`)."""
        return Graph(matrix, self.device, symmetric=symmetric, plain=self.plain)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        """Add the model's own flags (one argument group); shown by `python Main.py --model NAME --help`."""

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        """One sentence when one of its flags has a value no data could make meaningful, or two flags contradict
        each other, else None. Checked when the command line is parsed (`Params.parse_args`), so a sweep refuses a
        bad grid value before any run. Every check that reads `args` only belongs here, not in `check`."""
        return None

    @classmethod
    def flag_warnings(cls, args: argparse.Namespace) -> List[str]:
        """One sentence per flag that was given (`changed_flags`) but does nothing with the other flags (an
        ablation that skips what it sets, an option of a switch that is off), each naming the flag. Logged as
        warnings when the command line is parsed (`Params.parse_args`); the run goes on. A contradiction the user
        must resolve is refused by `check_flags` instead."""
        return []

    @classmethod
    def check(cls, args: argparse.Namespace, data: Data) -> Optional[str]:
        """One sentence when this configuration cannot run on this data, else None (checked before training, by
        `Main.run`). The default is `check_flags` (so arguments that never went through `Params.parse_args` are
        checked too); a model with checks that need the data overrides it and starts with `super().check`. A flag
        that this data makes do nothing (MDMNS's guidance with one modality) is a warning logged here."""
        return cls.check_flags(args)

    @classmethod
    def parameter_sizes(cls, args: argparse.Namespace, n_users: int, n_items: int, widths: Dict[str, int]
                        ) -> Dict[str, int]:
        """The model's largest parameter tables, name -> entries, from the data's shapes alone (`widths`: modality
        -> feature width), summed by `Utils.memory.check_fits` before the feature arrays are read. The default:
        user and item embeddings of width d and, for a model of item features, a d_m x d projection per modality
        (every model here has those); a model with a larger part (a denoiser over all items) adds it. A name that
        starts with a modality lets the refusal name its feature file."""
        d = next((getattr(args, f) for f in ("latdim", "embedding_size", "embed_size") if hasattr(args, f)), 64)
        parts = {f"user and item embeddings ({n_users:,} + {n_items:,} x {d})": (n_users + n_items) * d}
        if cls.needs_features:
            parts.update({f"{m} features' projection ({w:,} x {d})": w * d for m, w in widths.items()})
        return parts

    def pre_epoch(self, epoch: int, timer: PhaseTimer) -> None:
        """Called before each epoch's training (LATTICE's graph rebuild, FREEDOM's edge pruning); time it
        inside `timer.phase(name)` like the training phases."""

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Losses:
        """Train one epoch, each phase inside `timer.phase(name)`; return {'loss': {term: mean}, ...}."""
        raise NotImplementedError

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """User and item vectors for evaluation (called in eval mode, without gradients)."""
        raise NotImplementedError

    def scorer(self) -> Scorer:
        """A function from a batch of user indices to their scores over all items (batch x I).

        The default ranks by the dot product of `embeddings()`; a model that scores otherwise (from
        denoised rows, say) overrides this instead.
        """
        return dot_scorer(*self.embeddings())

    def vectors(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """User and item vectors whose dot product is the model's score (`api.Run.user_vectors`), or None for a
        model that scores otherwise. The default: `embeddings()` when the model keeps the default `scorer`, which
        ranks by exactly that product; None when it overrides `scorer` (DiffRec's denoised rows have no vectors).
        Called in eval mode, without gradients; a model whose vectors differ from `embeddings()` overrides this."""
        if type(self).scorer is not RecModel.scorer:
            return None
        return self.embeddings()

    def checkpoint_state(self) -> dict:
        """What `best_model.pt` holds besides the epoch, the model's name and the configuration."""
        return {"state_dict": self.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["state_dict"])

    def training_state(self) -> dict:
        """What resuming needs: `checkpoint_state()` plus the state of every optimiser, LR scheduler, numpy and
        torch random Generator the model holds as an attribute (or as the values of a dict attribute)."""
        return {"checkpoint": self.checkpoint_state(),
                "stateful": {name: _state_of(value) for name, value in self._stateful()}}

    def load_training_state(self, state: dict) -> None:
        self.load_checkpoint_state(state["checkpoint"])
        for name, value in self._stateful():
            # a last.pt written before torch Generators were saved here kept them beside, under the same name
            _load_state(value, state["stateful"][name] if name in state["stateful"] else state[name])

    def _stateful(self) -> List[Tuple[str, object]]:
        found = []
        for name, value in sorted(vars(self).items()):
            if isinstance(value, dict) and value and all(_is_stateful(v) for v in value.values()):
                found.append((name, value))
            elif _is_stateful(value):
                found.append((name, value))
        return found

    def save_artifacts(self, run_dir: Path) -> None:
        """Write model-specific files into the run folder at the end of the run (DiffMM: generated items)."""

    # helpers for subclasses
    def autocast(self):
        """bf16 autocast of the matrix products when --precision bf16 (CPU AMX or CUDA tensor cores)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

    def progress(self, iterable: Iterable, desc: str) -> Iterable:
        """A progress bar, only on a terminal (a log file of `nohup` would fill with bar fragments)."""
        quiet = self.args.quiet or not sys.stderr.isatty()
        return tqdm(iterable, desc=desc, leave=False, disable=quiet, dynamic_ncols=True)


def _is_stateful(value: object) -> bool:
    return isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, np.random.Generator,
                              torch.Generator))


def _state_of(value):
    if isinstance(value, dict):
        return {k: _state_of(v) for k, v in value.items()}
    if isinstance(value, np.random.Generator):
        return value.bit_generator.state
    if isinstance(value, torch.Generator):
        return value.get_state()
    return value.state_dict()


def _load_state(value, state) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _load_state(v, state[k])
    elif isinstance(value, np.random.Generator):
        value.bit_generator.state = state
    elif isinstance(value, torch.Generator):
        value.set_state(state)
    else:
        value.load_state_dict(state)


def trainable_features(data: Data, out_dim: int) -> Tuple[nn.ParameterDict, nn.ModuleDict]:
    """Per modality the raw I x d_m table as a parameter (MMRec's `Embedding.from_pretrained(freeze=False)`) and
    a Linear(d_m, out_dim) with PyTorch's default init, in the dataset's modality order (a ParameterDict built
    from a dict would sort the names)."""
    features = nn.ParameterDict([(m, nn.Parameter(torch.from_numpy(x.copy()))) for m, x in data.features.items()])
    projections = nn.ModuleDict([(m, nn.Linear(x.shape[1], out_dim)) for m, x in data.features.items()])
    return features, projections


def add_pairwise_args(group: argparse._ArgumentGroup, reg_weight: float = 1e-4) -> None:
    """The flags every MMRec model shares (configs/overall.yaml and the model's yaml), MMRec's names."""
    group.add_argument("--embedding_size", default=64, type=int, help="d: embedding size")
    group.add_argument("--reg_weight", default=reg_weight, type=float,
                       help="λ: weight of the regulariser (a point of MMRec's grid: `Experiments.sweep --grid MODEL`)")
    group.add_argument("--learning_rate_scheduler", default=[1.0, 50.0], type=float_pair,
                       help="γ,s: the learning rate is multiplied by γ^(epoch/s), stepped once per epoch "
                            "(MMRec; 1.0,50 = constant)")


def check_pairwise_flags(args: argparse.Namespace) -> Optional[str]:
    """The check of `add_pairwise_args`' flags (`PairwiseModel.check_flags`), as one sentence, or None."""
    if args.embedding_size < 1:
        return f"--embedding_size must be at least 1, got {args.embedding_size}."
    return None


def check_layers(args: argparse.Namespace, *names: str) -> Optional[str]:
    """'--NAME must be 0 or more' for the first of the layer-count flags `names` below 0, or None."""
    for name in names:
        if getattr(args, name) < 0:
            return f"--{name} must be 0 or more, got {getattr(args, name)}."
    return None


def changed_flags(args: argparse.Namespace, names: Sequence[str]) -> List[str]:
    """Those of the flags `names` (without --) that were given: whose value differs from the one the parser of
    `args.model` gives without them (its default, or with --preset the preset's value, so that a published command
    plus an ablation does not count the command's own flags). A check sees values only, not the command line, so
    this is what "given" means to `flag_warnings`: set on the command line, in a --config file or by a sweep's
    grid, to a value that would change the run; a flag given at its default value changes nothing either way."""
    from Params import baseline_args

    if not names:
        return []
    base = baseline_args(args.model, getattr(args, "preset", None))
    return [name for name in names if hasattr(args, name) and getattr(args, name) != getattr(base, name, None)]


def flag_list(names: Sequence[str]) -> str:
    """'--a', '--a and --b', '--a, --b and --c'."""
    flags = [f"--{name}" for name in names]
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


class PairwiseModel(RecModel):
    """MMRec's training loop (its common/trainer.py): shuffled batches of train pairs, Adam, LambdaLR.

    Every epoch draws one negative per train pair, uniformly over the items that occur in train and
    not in the user's train items (`uses_negatives = False`: no negatives, as BM3). A subclass
    defines `batch_loss(users, positives, negatives) -> {term: tensor}` (the terms are summed and
    back-propagated) and `embeddings()`.
    """

    phases = ("negatives", "recommender")
    uses_negatives: ClassVar[bool] = True
    # MMRec configs/overall.yaml: batch 2048, at most 1000 epochs, stop when validation Recall@20 has not
    # improved for more than 20 evaluations (that is, after 21), lr 1e-3
    defaults = {"batch": 2048, "epoch": 1000, "patience": 21, "lr": 1e-3}

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> Optional[str]:
        """`add_pairwise_args`' flags (a subclass's own checks come after `super().check_flags`)."""
        return check_pairwise_flags(args)

    def __init__(self, args: argparse.Namespace, data: Data, device: torch.device):
        super().__init__(args, data, device)
        users, items = train_pairs(data.train)
        self.pair_users, self.pair_items = users, items
        self.candidates = np.flatnonzero(np.diff(data.train.tocsc().indptr) > 0)  # items that occur in train
        self.rng = np.random.default_rng(args.seed)
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._scheduler = None
        if not self.uses_negatives:
            self.phases = ("recommender",)

    def batch_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def configure_optimizer(self) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam over every parameter, no weight decay; LambdaLR γ^(epoch/s) (MMRec common/trainer.py)."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.args.lr, weight_decay=0.0)
        gamma, step = self.args.learning_rate_scheduler
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: gamma ** (epoch / step))

    def _ensure_optimizer(self) -> None:
        if self._optimizer is None:  # built on first use, after the subclass made its parameters
            self._optimizer, self._scheduler = self.configure_optimizer()

    def load_training_state(self, state: dict) -> None:
        self._ensure_optimizer()
        super().load_training_state(state)

    def train_epoch(self, epoch: int, timer: PhaseTimer) -> Losses:
        self._ensure_optimizer()
        negatives = None
        if self.uses_negatives:
            with timer.phase("negatives"):
                negatives = torch.from_numpy(sample_negatives(self.data.train, self.pair_users, self.rng,
                                                              candidates=self.candidates)).to(self.device)
        with timer.phase("recommender"):
            users = torch.from_numpy(self.pair_users).to(self.device)
            items = torch.from_numpy(self.pair_items).to(self.device)
            self.train()
            totals: Dict[str, torch.Tensor] = {}
            batches = user_batches(len(users), self.args.batch, shuffle=True)
            for idx in self.progress(device_batches(batches, self.device), self.name):  # one copy, not one a batch
                self._optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    terms = self.batch_loss(users[idx], items[idx], None if negatives is None else negatives[idx])
                sum(terms.values()).backward()
                self._optimizer.step()
                for name, value in terms.items():  # summed on the device: no host sync per batch
                    totals[name] = totals.get(name, 0.0) + value.detach().float()
            self._scheduler.step()
        means = {name: float(total) / len(batches) for name, total in totals.items()}
        return {"loss": dict(means, loss=sum(means.values()))}
