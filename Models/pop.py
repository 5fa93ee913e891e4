"""Popularity: every user gets the items with the most train interactions (no training).

The cheap reference every run reports beside its own numbers (`summary.json` → baselines.popularity).
"""
from __future__ import annotations

import argparse
from typing import Tuple

import numpy as np
import torch

from Models.base import RecModel


class Popularity(RecModel):
    name = "pop"
    paper = "popularity ranking: items by number of train interactions (no learning)"
    phases = ()
    defaults = {"epoch": 1}

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        counts = np.asarray(data.train.sum(axis=0), dtype=np.float32).reshape(-1, 1)
        self.register_buffer("item_counts", torch.from_numpy(counts).to(device))

    def train_epoch(self, epoch, timer) -> dict:
        return {"loss": {"loss": 0.0}}

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(self.data.n_users, 1, device=self.device), self.item_counts
