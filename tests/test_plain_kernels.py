"""`--kernels plain` reaches every model through the base class: with it, no model calls a fast kernel of
Utils/kernels.py in an epoch or at evaluation (the reference path `Experiments.benchmark --compare` needs)."""
from __future__ import annotations

import pytest
import torch

import inference
from Models import get_model, model_names
from Params import parse_args
from Utils import kernels
from Models.base import PhaseTimer
from conftest import tiny_args


@pytest.mark.parametrize("name", model_names())
def test_plain_kernels_reach_every_model(name, tiny_dir, tmp_path, monkeypatch):
    args = parse_args(tiny_args(tiny_dir, tmp_path, "--model", name, "--kernels", "plain", "--batch", "32"))
    data = inference.load_run_data(args, get_model(name).needs_features)
    model = inference.build_model(args, data, torch.device("cpu"))
    calls = []

    def refuse(kernel):
        def apply(*tensors):
            calls.append(kernel)
            raise AssertionError(f"{name} called the fast kernel {kernel} under --kernels plain")
        return apply

    for kernel in ("SparseMatmul", "LogSumExpLogits"):
        monkeypatch.setattr(getattr(kernels, kernel), "apply", refuse(kernel))
    timer = PhaseTimer(torch.device("cpu"))
    model.train()
    model.pre_epoch(0, timer)
    model.train_epoch(0, timer)
    model.eval()
    with torch.no_grad():
        scores = model.scorer()(torch.arange(4))
    assert scores.shape == (4, data.n_items) and not calls


def test_the_fast_kernels_are_the_default(tiny_dir, tmp_path, monkeypatch):
    """The check above can fail: by default LightGCN's propagation goes through SparseMatmul."""
    args = parse_args(tiny_args(tiny_dir, tmp_path, "--model", "lightgcn", "--batch", "32"))
    model = inference.build_model(args, inference.load_run_data(args, False), torch.device("cpu"))
    calls = []
    original = kernels.SparseMatmul.apply
    monkeypatch.setattr(kernels.SparseMatmul, "apply", lambda *t: calls.append(1) or original(*t))
    model.train_epoch(0, PhaseTimer(torch.device("cpu")))
    assert calls
