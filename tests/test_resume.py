"""Runs that survive faults: resume after `kill -9`, non-finite losses, Ctrl-C, unwritable folders,
the pace of a run; and the saved model used again (`evaluate.py`, `recommend.py`)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import inference
import Main
import Models
import evaluate
import recommend
from Utils.errors import UsageError
from Utils.files import atomic_write_text

from conftest import ROOT, SMALL_FLAGS, NaNModel, assert_resumes_exactly, small_flags, tiny_args
from Models import model_names

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")   # one thread: bit-for-bit repeatable runs


def command(gen_dir, out, *extra):
    return [sys.executable, str(ROOT / "Main.py"), "--data", "gen", "--data_dir", str(gen_dir), "--dims", "[32]",
            "--latdim", "8", "--batch", "64", "--quiet", "--out_dir", str(out), *extra]


def records(run_dir):
    """metrics.jsonl without the wall-clock seconds."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def wait_for_epochs(run_dir, n, process, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    raise AssertionError("the run did not reach the epoch in time")


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_uninterrupted_numbers(gen_dir, tmp_path):
    epochs = ["--epoch", "8"]
    whole = tmp_path / "whole"
    subprocess.run(command(gen_dir, whole, *epochs), env=ENV, check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(gen_dir, killed, *epochs), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_epochs(killed, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= len(records(killed)) < 8 and not (killed / "summary.json").exists()
    last = torch.load(killed / "last.pt", weights_only=True)["harness"]["history"][-1]["epoch"]
    assert last + 1 >= len(records(killed))             # metrics.jsonl never runs ahead of the checkpoint
    result = subprocess.run([sys.executable, str(ROOT / "Main.py"), "--resume", str(killed)], env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming {killed} after epoch {last}" in result.stdout
    assert records(killed) == records(whole)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert a["protocols"] == b["protocols"] and a["groups"] == b["groups"] and a["epochs_run"] == b["epochs_run"]
    # a finished run is not resumed again
    again = subprocess.run([sys.executable, str(ROOT / "Main.py"), "--resume", str(killed)], env=ENV,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already finished" in again.stdout


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_folder(gen_dir, tmp_path):
    out = tmp_path / "interrupted"
    # a shell that ran this suite in the background left SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default handling of an interactive Ctrl-C
    process = subprocess.Popen(command(gen_dir, out, "--epoch", "1000"), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_epochs(out, 2, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "interrupted (Ctrl-C)" in output.strip().splitlines()[-1] and "Traceback" not in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"]["resume"] == f"python Main.py --resume {out}"
    assert (out / "last.pt").is_file()


def test_a_non_finite_loss_stops_the_run_with_one_sentence(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(Models.REGISTRY, "nan", "conftest:NaNModel")
    out = tmp_path / "nan"
    code = Main.main(tiny_args(tiny_dir, out, "--model", "nan", "--epoch", "5"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 3
    assert line.startswith("error: epoch 2, phase recommender (bpr = nan): the loss is not finite; stopped.")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"]["epoch"] == 2 and "not finite" in summary["stopped"]["reason"]
    state = torch.load(out / "last.pt", weights_only=True)
    assert [h["epoch"] for h in state["harness"]["history"]] == [0, 1]     # the last good checkpoint: epoch 1
    assert [r["epoch"] for r in records(out)] == [0, 1]


class InterruptedModel(NaNModel):
    """Ctrl-C during epoch 2 of its first run; trains on when resumed."""

    name = "interrupted"
    interrupt = True

    def train_epoch(self, epoch, timer):
        if epoch == 2 and InterruptedModel.interrupt:
            InterruptedModel.interrupt = False
            raise KeyboardInterrupt
        with timer.phase("recommender"):
            return {"loss": {"bpr": 1.0, "loss": 1.0}}


@pytest.mark.parametrize("budget,epochs_run", [(2, 2), (4, 4)])
def test_resume_with_a_new_number_of_epochs(tiny_dir, tmp_path, monkeypatch, budget, epochs_run):
    monkeypatch.setitem(Models.REGISTRY, "interrupted", f"{__name__}:InterruptedModel")
    monkeypatch.setattr(InterruptedModel, "interrupt", True)
    out = tmp_path / "run"
    with pytest.raises(Main.RunInterrupted):  # a Ctrl-C stops the caller too
        Main.main(tiny_args(tiny_dir, out, "--model", "interrupted", "--epoch", "10"))
    assert Main.main(["--resume", str(out), "--epoch", str(budget), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "stopped" not in summary and summary["epochs_run"] == epochs_run
    assert [r["epoch"] for r in records(out)] == list(range(epochs_run))
    assert summary["config"]["epoch"] == budget


def test_an_unwritable_output_folder_is_one_sentence(tiny_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code = Main.main(tiny_args(tiny_dir, tmp_path / "a_file" / "run"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: cannot write to the output folder") and "Traceback" not in line


def test_a_failed_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def full_disk(self, *args, **kwargs):  # Path.write_text(text, encoding=...)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full_disk)
    with pytest.raises(UsageError, match=r"cannot write .*summary.json \(No space left on device\)"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_epoch_lines_show_the_time_left_and_no_bars_when_not_a_terminal(gen_dir, tmp_path):
    argv = [a for a in command(gen_dir, tmp_path / "pace", "--epoch", "3") if a != "--quiet"]
    result = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all(line.endswith(" left") for line in epoch_lines)
    assert epoch_lines[-1].endswith("| 0s left")
    assert "it/s" not in result.stderr and "\r" not in result.stderr


# ------------------------------------------------------------------------------------------------
# evaluate.py and recommend.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,extra", [("diffmm", ("--keepRate", "0.5")), ("lightgcn", ()), ("vbpr", ()),
                                         ("pop", ())])
def test_evaluate_recomputes_the_summary_exactly(tiny_dir, tmp_path, model, extra):
    out = tmp_path / model
    assert Main.main(tiny_args(tiny_dir, out, "--model", model, "--epoch", "3", *extra)) == 0
    result = evaluate.evaluate_run(out)
    assert result["identical"], result
    assert evaluate.main([str(out)]) == 0


def test_recommend_writes_each_users_top_k_unseen_items(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "mf", "--epoch", "2")) == 0
    (tmp_path / "users.txt").write_text("3\n0\n")
    csv_path = tmp_path / "recs.csv"
    assert recommend.main([str(out), "--k", "4", "--users", str(tmp_path / "users.txt"), "--out", str(csv_path)]) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["user"], r["rank"]) for r in rows] == [(u, str(k)) for u in ("3", "0") for k in range(1, 5)]
    # the reference: the reloaded model's scores, train items excluded, best first
    args, data, model = inference.load_trained(out)
    with torch.no_grad():
        scores = (model.user_emb @ model.item_emb.T).numpy()
    for user in (3, 0):
        s = scores[user].copy()
        s[data.train[user].indices] = -np.inf
        want = np.argsort(-s, kind="stable")[:4]
        got = [int(r["item"]) for r in rows if r["user"] == str(user)]
        assert got == want.tolist()
        assert all(float(r["score"]) == pytest.approx(s[int(r["item"])], rel=1e-5) for r in rows if r["user"] == str(user))
    assert recommend.main([str(out), "--k", "4", "--out", str(csv_path)]) == 2      # never overwritten


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_its_unfinished_run(gen_dir, tmp_path):
    from Experiments.plan import GridPlan, Sweep, run_dir_of
    from Experiments.runs import run_plan

    sweep_dir = tmp_path / "sweep"
    base = ["--data", "gen", "--data_dir", str(gen_dir), "--dims", "[32]", "--latdim", "8", "--batch", "64",
            "--quiet", "--epoch", "6"]
    run_dir = run_dir_of(sweep_dir, {"temp": "0.5"}, 421)
    process = subprocess.Popen([sys.executable, str(ROOT / "Main.py"), *base, "--temp", "0.5", "--seed", "421",
                                "--out_dir", str(run_dir)], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_epochs(run_dir, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = records(run_dir)[:2]
    result = run_plan(GridPlan(sweep_dir, [Sweep.of(sweep_dir, {"temp": ["0.5"]}, [421], base)]))[0]
    assert result.ran == [str(run_dir)]
    assert "resuming" in (run_dir / "log.txt").read_text()
    assert records(run_dir)[:2] == before and len(records(run_dir)) == 6


@pytest.mark.slow
@pytest.mark.parametrize("model", model_names())
def test_every_model_resumes_exactly(tiny_dir, tmp_path, monkeypatch, model):
    """Each registered model, stopped in epoch 2 and resumed, writes the uninterrupted run's numbers: a new model
    whose optimiser, scheduler or generator is not found by RecModel.training_state fails here."""
    assert_resumes_exactly(tiny_dir, tmp_path, monkeypatch, "--model", model, *small_flags(model), "--epoch", "3",
                           "--tstEpoch", "1", "--patience", "0")


def test_small_flags_name_registered_models_and_parse():
    """A model without a SMALL_FLAGS line runs at its defaults; a line left for a model no longer registered, or one
    its parser refuses, fails here."""
    from Params import parse_args

    assert set(SMALL_FLAGS) <= set(model_names())
    for model in model_names():
        assert parse_args(["--model", model, *small_flags(model)]).model == model
