"""A finished run as a Python object: scores, top-K recommendations, vectors and metrics of its best model.

    import api
    run = api.load("runs/tiktok-diffmm-20250101-120000-3f9a1c")   # best_model.pt, on CUDA when present
    run.scores([0, 1, 2])                                   # 3 x items tensor (the model's evaluation scores)
    top = run.recommend(["u17", "u42"], k=10)               # raw ids where the dataset has id maps
    top.items, top.scores                                   # 2 x 10 each, best first
    run.item_vectors()                                      # items x d (NoVectors for a model without them)
    run.evaluate(topks=[10, 20, 50])["test"]["Recall@50"]   # all-rank metrics at other cut-offs

Users are given as indices (ints: rows of the train matrix) or, where the dataset folder has the id maps
`prepare.py raw` writes (user_ids.txt, item_ids.txt: line i = the raw id of index i), as raw ids (strings).
`recommend.py` and `evaluate.py` are command lines over this module; docs/using-a-run.md shows both.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch

from DataHandler import Data
from inference import evaluate_model, load_trained
from Models.base import RecModel
from Utils import run_folder
from Utils.batches import dense_rows
from Utils.errors import UsageError
from Utils.formats import read_id_lines

USER_IDS = "user_ids.txt"   # the id maps of a dataset folder (prepare.py raw)
ITEM_IDS = "item_ids.txt"
EXCLUDE = ("train", "all", None)

Users = Union[None, int, str, Sequence[int], Sequence[str], np.ndarray, torch.Tensor]


class NoVectors(UsageError):
    """The model scores without user and item vectors (DiffRec: denoised interaction rows)."""


@dataclass
class Recommendations:
    """Top-K items of a batch of users, best first; raw ids where the dataset has id maps, else indices."""

    users: np.ndarray          # n: the users (raw ids where the dataset has id maps, else indices)
    items: np.ndarray          # n x k: the items (raw ids where the dataset has id maps, else indices)
    scores: np.ndarray         # n x k float32; -inf where fewer than k items were left after the exclusion
    user_index: np.ndarray     # n: the users' indices
    item_index: np.ndarray     # n x k: the items' indices


def read_id_map(path: Path, expected: int) -> Optional[np.ndarray]:
    """The raw ids of an id map (line i = the raw id of index i), None when the file is absent."""
    if not path.is_file():
        return None
    ids = np.array(read_id_lines(path), dtype=str)   # split on \n only: an id may hold any other separator
    if len(ids) != expected:
        raise UsageError(f"{path} has {len(ids)} ids but the dataset has {expected}; it belongs to another version "
                         f"of the dataset: write the folder again with prepare.py raw, or remove the map.")
    return ids


def lookup(ids: np.ndarray, wanted: np.ndarray, path: Path) -> np.ndarray:
    """The indices of raw ids `wanted` in the map `ids` (sorted search: no Python loop over the ids)."""
    order = np.argsort(ids, kind="stable")
    position = np.clip(np.searchsorted(ids, wanted, sorter=order), 0, len(ids) - 1)
    index = order[position]
    unknown = ids[index] != wanted
    if unknown.any():
        raise UsageError(f"id {str(wanted[unknown][0])!r} is not in {path} ({unknown.sum()} of {len(wanted)} ids are "
                         f"unknown); give raw ids from that file, or indices as integers.")
    return index.astype(np.int64)


class Run:
    """A finished run's best model, ready to score (`load` builds it)."""

    def __init__(self, run_dir: Path, args: argparse.Namespace, data: Data, model: RecModel, epoch: int):
        self.run_dir, self.args, self.data, self.model, self.epoch = Path(run_dir), args, data, model, epoch
        self.device: torch.device = model.device
        folder = Path(args.data_dir) / args.data
        self.user_ids = read_id_map(folder / USER_IDS, data.n_users)   # None without id maps
        self.item_ids = read_id_map(folder / ITEM_IDS, data.n_items)
        self._paths = {"user": folder / USER_IDS, "item": folder / ITEM_IDS}
        self._score = None
        self._vectors = None
        self._known: Optional[sp.csr_matrix] = None

    @property
    def config(self) -> dict:
        """Every flag of the run (best_model.pt's configuration)."""
        return dict(vars(self.args))

    @property
    def n_users(self) -> int:
        return self.data.n_users

    @property
    def n_items(self) -> int:
        return self.data.n_items

    def __repr__(self) -> str:
        return (f"Run({str(self.run_dir)!r}: {self.args.model} on {self.args.data}, epoch {self.epoch}, "
                f"{self.n_users} users x {self.n_items} items, {self.device})")

    # -- users --------------------------------------------------------------------------------------

    def user_index(self, users: Users = None) -> np.ndarray:
        """Indices of `users`: None = every user; ints (or an integer array/tensor) are indices; strings are raw
        ids, looked up in the dataset's user_ids.txt."""
        if users is None:
            return np.arange(self.n_users, dtype=np.int64)
        if isinstance(users, torch.Tensor):
            users = users.cpu().numpy()
        array = np.atleast_1d(np.asarray(users))
        if array.dtype.kind == "O":  # a list or pandas column of Python objects: integers, else raw ids
            try:
                array = array.astype(np.int64)
            except (TypeError, ValueError):
                array = array.astype(str)
        if array.dtype.kind in "US":  # raw ids
            if self.user_ids is None:
                raise UsageError(f"raw user ids were given but {self._paths['user']} does not exist (the dataset has "
                                 f"no id maps); give user indices as integers.")
            return lookup(self.user_ids, array.astype(str), self._paths["user"])
        if array.dtype.kind not in "iu":
            raise UsageError(f"users must be integer indices or raw id strings, got values of type {array.dtype}.")
        bad = array[(array < 0) | (array >= self.n_users)]
        if len(bad):
            raise UsageError(f"user index {bad[0]} is outside 0..{self.n_users - 1}.")
        return array.astype(np.int64)

    # -- scores and recommendations -----------------------------------------------------------------

    @torch.no_grad()
    def scores(self, users: Users = None) -> torch.Tensor:
        """users x items float32 scores on `self.device`: what evaluation ranks (the model's `scorer()`)."""
        if self._score is None:
            self._score = self.model.scorer()  # one forward over the graphs, reused for every batch
        index = torch.from_numpy(self.user_index(users)).to(self.device)
        return self._score(index).float()

    def known(self) -> sp.csr_matrix:
        """Every known interaction (train + validation + test), as one binary CSR matrix."""
        if self._known is None:
            self._known = ((self.data.train + self.data.val + self.data.test) > 0).astype(np.float32).tocsr()
        return self._known

    @torch.no_grad()
    def recommend(self, users: Users = None, k: int = 20, exclude: Optional[str] = "train",
                  batch: Optional[int] = None) -> Recommendations:
        """Each user's top-`k` items by score, best first, in batches of `batch` users (default --tstBat).

        `exclude`: 'train' never recommends an item of the user's train split (as evaluation ranks), 'all' none
        of the user's known items (train, validation and test), None any item.
        """
        if exclude not in EXCLUDE:
            raise UsageError(f"exclude must be 'train', 'all' or None, got {exclude!r}.")
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}.")
        index = self.user_index(users)
        k = min(k, self.n_items)
        mask = self.data.train if exclude == "train" else self.known() if exclude == "all" else None
        batch = batch or self.args.tstBat
        items = np.empty((len(index), k), dtype=np.int64)
        values = np.empty((len(index), k), dtype=np.float32)
        for start in range(0, len(index), batch):  # one batch of users at a time: batch x items scores
            rows = index[start:start + batch]
            scores = self.scores(rows)
            if mask is not None:
                scores = scores.masked_fill(dense_rows(mask, rows, self.device) > 0, float("-inf"))
            top = torch.topk(scores, k, dim=1)
            items[start:start + len(rows)] = top.indices.cpu().numpy()
            values[start:start + len(rows)] = top.values.cpu().numpy()
        raw = self.user_ids is not None and self.item_ids is not None
        return Recommendations(users=self.user_ids[index] if raw else index,
                               items=self.item_ids[items] if raw else items,
                               scores=values, user_index=index, item_index=items)

    # -- vectors ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _model_vectors(self) -> tuple:
        if self._vectors is None:
            vectors = self.model.vectors()
            if vectors is None:
                raise NoVectors(f"{self.args.model} scores users without user and item vectors (its scores come from "
                                f"its own scorer), so it has none to give; use scores() or recommend().")
            self._vectors = tuple(v.detach().float() for v in vectors)
        return self._vectors

    def user_vectors(self, users: Users = None) -> torch.Tensor:
        """users x d vectors whose dot product with `item_vectors()` is the score (NoVectors where the model has
        none: DiffRec)."""
        return self._model_vectors()[0][torch.from_numpy(self.user_index(users)).to(self.device)]

    def item_vectors(self) -> torch.Tensor:
        """items x d vectors (NoVectors where the model has none: DiffRec)."""
        return self._model_vectors()[1]

    @property
    def has_vectors(self) -> bool:
        try:
            self._model_vectors()
        except NoVectors:
            return False
        return True

    # -- metrics ------------------------------------------------------------------------------------

    def evaluate(self, topks: Optional[Iterable[int]] = None) -> Dict[str, dict]:
        """All-rank metrics at cut-offs `topks` (default the run's --topks), computed as the run computed them:
        {'val': {'Recall@10': ...}, 'test': {...}, 'groups': {...}} (groups: test metrics per user group by train
        interactions, the run's --groups)."""
        cutoffs = sorted(set(int(k) for k in topks)) if topks is not None else list(self.args.topks)
        if not cutoffs or min(cutoffs) < 1:
            raise UsageError(f"the cut-offs must be positive integers, got {cutoffs}.")
        args = argparse.Namespace(**dict(vars(self.args), topks=cutoffs))
        metrics = evaluate_model(self.model, self.data, args)
        return {key: metrics[key] for key in ("val", "test", "groups") if key in metrics}

    def summary(self) -> Optional[dict]:
        """The run's summary.json, None when it has none (a run still going on)."""
        if not (self.run_dir / run_folder.SUMMARY).is_file():
            return None
        return run_folder.read_summary(self.run_dir)


def load(run_dir: Union[str, Path], device: str = "auto", data_dir: Optional[Union[str, Path]] = None) -> Run:
    """The best model of the run in `run_dir` (its best_model.pt, with the configuration saved in it).

    `device`: 'auto' (CUDA when present), 'cpu' or 'cuda', chosen once here. `data_dir`: where the dataset's
    folder is now, when it moved since the run (the folder holding `<data>/`).
    Loading writes nothing: a dataset missing from the data folder (also the generated 'synthetic' one) is one
    sentence, never generated there, and a best_model.pt that is not one of this package's is one sentence
    (`run_folder.RunFolderError`), never unpickled as code (weights_only).
    """
    run_dir = Path(run_dir)
    state = run_folder.load_best(run_dir)
    args, data, model = load_trained(run_dir, None if data_dir is None else str(data_dir), device, state)
    return Run(run_dir, args, data, model, int(state["epoch"]))
