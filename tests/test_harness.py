"""The harness drives any model through the contract: a toy model written here, every registered model,
`--model` parsing. The layering of the modules is tests/test_layers.py."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

import inference
import Main
import Models
from Models.base import RecModel
from Params import parse_args
from Utils.metrics import evaluate

from conftest import tiny_args

CPU = torch.device("cpu")


class ToyModel(RecModel):
    """An MF trained by squared error on the train rows, in two timed phases, with its own flag and defaults."""

    name = "toy"
    paper = "a toy model of the tests"
    phases = ("alpha", "beta")
    defaults = {"batch": 5, "epoch": 4}
    calls: list = []

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        self.user_emb = torch.nn.Parameter(torch.randn(data.n_users, args.toy_dim) * 0.1)
        self.item_emb = torch.nn.Parameter(torch.randn(data.n_items, args.toy_dim) * 0.1)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.5)

    @staticmethod
    def add_args(parser):
        parser.add_argument_group("toy").add_argument("--toy_dim", default=3, type=int, help="toy size")

    def pre_epoch(self, epoch, timer):
        ToyModel.calls.append(("pre_epoch", epoch, self.training))

    def train_epoch(self, epoch, timer):
        with timer.phase("alpha"):
            target = torch.from_numpy(self.data.train.toarray())
        with timer.phase("beta"):
            self.optimizer.zero_grad()
            loss = ((self.user_emb @ self.item_emb.T - target) ** 2).mean()
            loss.backward()
            self.optimizer.step()
        ToyModel.calls.append(("train", epoch, self.training))
        return {"loss": {"mse": loss.item(), "loss": loss.item()}}

    def embeddings(self):
        ToyModel.calls.append(("embeddings", None, self.training))
        return self.user_emb, self.item_emb


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(Models.REGISTRY, "toy", f"{__name__}:ToyModel")
    ToyModel.calls = []
    return ToyModel


def test_a_toy_model_runs_through_the_contract(tiny_dir, tmp_path, toy_registered):
    out = tmp_path / "toy"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "toy", "--epoch", "3", "--toy_dim", "4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "toy" and summary["config"]["batch"] == 5     # the model's default batch
    # every epoch: pre_epoch and train in train mode, then the evaluation forward in eval mode
    assert [c[0] for c in ToyModel.calls] == ["pre_epoch", "train", "embeddings"] * 3
    assert all(c[2] for c in ToyModel.calls if c[0] != "embeddings")
    assert not any(c[2] for c in ToyModel.calls if c[0] == "embeddings")
    # the phases it timed, and the harness's evaluation
    per_epoch = summary["timing"]["per_epoch"]
    assert len(per_epoch) == 3 and all(set(e) == {"alpha", "beta", "evaluation", "epoch"} for e in per_epoch)
    assert set(summary["timing"]["seconds_per_phase_mean"]) == {"alpha", "beta", "evaluation"}
    # both protocols, and metrics.jsonl with the model's losses
    assert set(summary["protocols"]) == {"paper", "validation"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and all("mse" in r["loss"] for r in records)
    best = max(records, key=lambda r: r["test"]["Recall@20"])
    assert summary["protocols"]["paper"]["test"] == best["test"]
    # the checkpoint reloads into a fresh model that scores exactly as at the best validation epoch
    state = torch.load(out / "best_model.pt", weights_only=False)
    assert state["model"] == "toy" and state["epoch"] == summary["protocols"]["validation"]["epoch"]
    args = parse_args(tiny_args(tiny_dir, tmp_path / "unused", "--model", "toy", "--toy_dim", "4"))
    data = inference.load_run_data(args, needs_features=False)
    fresh = inference.build_model(args, data, CPU)
    fresh.load_checkpoint_state(state)
    fresh.eval()
    with torch.no_grad():
        reloaded = evaluate(fresh.scorer(), data.train, data.test, [20], 256, CPU)
    assert reloaded == pytest.approx(summary["protocols"]["validation"]["test"], rel=1e-6)
    # the curves figure is titled by the run, not by a path of this machine
    from Utils.figures import run_title
    assert run_title(out) == "toy on tiny, run toy" and str(tmp_path) not in run_title(out)


def test_run_does_not_reset_the_callers_logging(tiny_dir, tmp_path, toy_registered):
    import logging

    logger = logging.getLogger("diffmm")
    marker = logging.NullHandler()
    logger.addHandler(marker)
    try:
        Main.run(parse_args(tiny_args(tiny_dir, tmp_path / "r", "--model", "toy", "--epoch", "1")))
        assert marker in logger.handlers
        assert not any(isinstance(h, logging.FileHandler) for h in logger.handlers)   # the run's log.txt is closed
    finally:
        logger.removeHandler(marker)
    assert "epoch 0/1" in (tmp_path / "r" / "log.txt").read_text()


def test_model_flags_and_help(capsys, toy_registered):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("diffmm", "mf", "lightgcn", "vbpr", "pop")) and "--ssl_reg" in text
    with pytest.raises(SystemExit):
        parse_args(["--model", "lightgcn", "--help"])
    text = capsys.readouterr().out
    assert "--n_layers" in text and "--reg_weight" in text and "--ssl_reg" not in text
    args = parse_args(["--model", "mf"])
    assert (args.batch, args.epoch, args.patience) == (2048, 1000, 21)     # MMRec's training settings
    assert parse_args(["--model", "mf", "--batch", "64"]).batch == 64       # explicit flags win
    assert parse_args([]).batch == 1024 and parse_args([]).model == "diffmm"
    with pytest.raises(SystemExit):
        parse_args(["--model", "mf", "--ssl_reg", "0.1"])                    # a DiffMM flag is not an mf flag


def test_unknown_model_is_one_sentence_listing_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "bpr_mf"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    from Models import model_names

    assert "unknown model 'bpr_mf'" in err and f"the known models are {', '.join(model_names())}" in err


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """The default generated dataset of `python Main.py` (1,200 users x 600 items; generated, not real)."""
    from Utils.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "synthetic")
    return root


@pytest.mark.parametrize("model,extra", [
    ("diffmm", ("--epoch", "5", "--dims", "[64]", "--latdim", "16")),
    ("mf", ("--epoch", "20", "--batch", "256", "--lr", "0.01")),
    ("lightgcn", ("--epoch", "5", "--batch", "512", "--lr", "0.01", "--n_layers", "2")),
    ("vbpr", ("--epoch", "5", "--batch", "512", "--lr", "0.01")),
    ("pop", ()),
])
def test_every_registered_model_trains_and_beats_popularity(synthetic_dir, tmp_path, model, extra):
    out = tmp_path / model
    argv = ["--data_dir", str(synthetic_dir), "--model", model, "--quiet", "--out_dir", str(out), *extra]
    assert Main.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = summary["protocols"]["validation"]["test"]["Recall@20"]
    popularity = summary["baselines"]["popularity"]["test"]["Recall@20"]
    if model == "pop":
        assert ours == pytest.approx(popularity)
    else:
        assert ours > popularity + 0.01, (model, ours, popularity)


def beats_popularity_tests(names: Sequence[str]) -> Dict[str, List[str]]:
    """Per model of `names`, the tests (file::function) that train it and compare it with popularity: every test
    function of tests/test_*.py whose name holds `beats_popularity` and whose decorators or body name the model as a
    string ("mdmns"), as the one above does for the models it lists and tests/test_<model>.py's does for its own."""
    found: Dict[str, List[str]] = {name: [] for name in names}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and "beats_popularity" in node.name:
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                source = "\n".join(lines[start - 1:node.end_lineno])
                for name in names:
                    if f'"{name}"' in source or f"'{name}'" in source:
                        found[name].append(f"{path.name}::{node.name}")
    return found


def test_every_registered_model_is_tested():
    """A registered model that no *beats_popularity* test names fails here: a new model's own test file
    (tests/test_<model>.py) needs one, which runs it through Main.py and compares it with popularity."""
    found = beats_popularity_tests(list(Models.REGISTRY))
    untested = [name for name, tests in found.items() if not tests]
    assert not untested, f"no test_*beats_popularity* test names {untested} (write one in tests/test_<model>.py)"
    assert "test_harness.py::test_every_registered_model_trains_and_beats_popularity" in found["mf"]


def test_the_scan_for_popularity_tests_can_fail():
    found = beats_popularity_tests(["no_such_model", "diffmm"])
    assert found["no_such_model"] == []
    assert "test_harness.py::test_every_registered_model_trains_and_beats_popularity" in found["diffmm"]


def test_models_without_features_run_on_a_dataset_without_feature_files(tmp_path):
    from conftest import hand_made, write_dataset

    train, val, test, _ = hand_made()
    write_dataset(tmp_path / "data" / "nofeat", train, val, test)
    for model in ("mf", "lightgcn", "pop"):
        argv = tiny_args(tmp_path / "data", tmp_path / model, "--model", model, "--epoch", "2", data="nofeat")
        assert Main.main(argv) == 0
    assert Main.main(["--data", "nofeat", "--data_dir", str(tmp_path / "data"), "--model", "vbpr", "--quiet",
                      "--out_dir", str(tmp_path / "vbpr")]) == 2


def test_adding_a_model_lists_every_member_of_the_contract():
    """docs/models/adding-a-model.md names every member of RecModel that the harness calls (all but the helpers a
    model calls on itself), so a member added to the contract is documented where a new model's author reads."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "models" / "adding-a-model.md").read_text()
    helpers = {"as_graph", "autocast", "progress"}   # called by the model itself, not by the harness
    members = [name for name in vars(RecModel) if not name.startswith("_") and name not in helpers]
    missing = [name for name in members + ["__init__", "_stateful"] if not re.search(rf"[`.]{name}\b", text)]
    assert not missing, f"docs/models/adding-a-model.md does not name {missing}"
