"""Files from strangers: writes that stay safe in a folder others can write (planted symlinks, shared run folders,
run-folder names that never collide), and what a checkpoint or a --config file may decide (never where files are
written: loading a run generates no dataset, a checkpoint that is not one of ours is one sentence)."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import Main
import Models
import api
import evaluate
from Params import parse_args
from Utils import run_folder
from Utils.errors import UsageError
from Utils.files import atomic_write_text

from conftest import tiny_args

VICTIM_TEXT = "precious\n"
OTHER_UID = os.getuid() + 1   # who this process claims to be when a test needs a folder of another user


def one_sentence(message: str) -> bool:
    """One line ending in a full stop, with no traceback in it."""
    return "\n" not in message and message.endswith(".") and "Traceback" not in message


@pytest.fixture
def diffmm_log(caplog):
    """The 'diffmm' logger's warnings (it may not propagate to the root logger after `setup_logging`, which also
    drops its other handlers: call `listen(caplog)` again after a `Main.main`)."""
    listen(caplog)
    yield caplog
    logging.getLogger("diffmm").removeHandler(caplog.handler)


def listen(caplog) -> None:
    caplog.handler.setLevel(logging.WARNING)
    logging.getLogger("diffmm").addHandler(caplog.handler)


# ------------------------------------------------------------------------------------------------
# planted symlinks and failed writes
# ------------------------------------------------------------------------------------------------

# every fixed temporary name an earlier version used, or that a guess at ours would try, for each file written
PLANTED = [f"{prefix}{name}{suffix}" for name in ("config.json", "last.pt", "summary.json", "per_user_paper.npz",
                                                     "notes.txt")
           for prefix, suffix in ((".", ".tmp"), ("", ".tmp"), (".", ".partial"), ("", ".part"))] + [".write_test"]


def test_a_symlink_planted_at_a_temporary_name_or_the_target_is_not_followed(tmp_path):
    run_dir, victim = tmp_path / "run", tmp_path / "victim.txt"
    run_dir.mkdir()
    victim.write_text(VICTIM_TEXT)
    for name in PLANTED:
        (run_dir / name).symlink_to(victim)
    (run_dir / "summary.json").symlink_to(victim)    # the target itself a link: replaced, not written through

    run_folder.write_config(run_dir, {"lr": 0.5, "out_dir": "x"})
    run_folder.save_last(run_dir, {"config": {"lr": 0.5}, "epoch": 3})
    run_folder.write_summary(run_dir, {"done": True})
    run_folder.write_per_user(run_dir, "paper", {"users": np.arange(3), "Recall@20": np.ones(3)}, epoch=2)
    atomic_write_text(run_dir / "notes.txt", "new\n")

    assert victim.read_text() == VICTIM_TEXT
    assert json.loads((run_dir / "config.json").read_text()) == {"lr": 0.5}
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 3
    assert not (run_dir / "summary.json").is_symlink() and run_folder.read_summary(run_dir) == {"done": True}
    assert run_folder.read_per_user(run_dir, "paper")["epoch"] == 2
    assert (run_dir / "notes.txt").read_text() == "new\n"
    # the planted links are left as they were, and no temporary file of ours is left beside them
    assert all((run_dir / name).is_symlink() for name in PLANTED)
    written = {"config.json", "last.pt", "summary.json", "per_user_paper.npz", "notes.txt"}
    assert {p.name for p in run_dir.iterdir()} == set(PLANTED) | written


def _fail_text(self, *args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("what", ["config", "last", "summary", "per_user", "text"])
def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_whole(tmp_path, monkeypatch, what):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = {"config": "config.json", "last": "last.pt", "summary": "summary.json", "per_user": "per_user_paper.npz",
              "text": "notes.txt"}[what]
    (run_dir / target).write_bytes(b"old")
    write = {
        "config": lambda: run_folder.write_config(run_dir, {"lr": 0.5}),
        "last": lambda: run_folder.save_last(run_dir, {"epoch": 3}),
        "summary": lambda: run_folder.write_summary(run_dir, {"done": True}),
        "per_user": lambda: run_folder.write_per_user(run_dir, "paper", {"users": np.arange(3)}, epoch=2),
        "text": lambda: atomic_write_text(run_dir / "notes.txt", "new"),
    }[what]
    if what == "last":
        monkeypatch.setattr(torch, "save", _fail_text)
    elif what == "per_user":
        monkeypatch.setattr(np, "savez", _fail_text)
    else:
        monkeypatch.setattr(type(run_dir), "write_text", _fail_text)
    with pytest.raises(UsageError) as error:
        write()
    monkeypatch.undo()
    assert one_sentence(str(error.value)) and f"cannot write {run_dir / target}" in str(error.value)
    assert (run_dir / target).read_bytes() == b"old"
    assert [p.name for p in run_dir.iterdir()] == [target]


# ------------------------------------------------------------------------------------------------
# run folders others can write; default run-folder names
# ------------------------------------------------------------------------------------------------

def test_a_world_writable_run_folder_is_refused_unless_allowed(tiny_dir, tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UsageError) as error:
        run_folder.make_run_dir(str(shared), "tiny", "mf")
    message = str(error.value)
    assert one_sentence(message) and f"will not write the run in {shared}" in message
    assert "every user can write it (mode 0777)" in message and "--allow_shared_dir" in message
    assert run_folder.make_run_dir(str(shared), "tiny", "mf", allow_shared_dir=True) == shared

    # the command line: exit code 2 and the sentence; with the flag the run goes on (and config.json leaves it out)
    assert Main.main(tiny_args(tiny_dir, shared, "--model", "mf")) == 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"error: {message}"
    assert list(shared.iterdir()) == []
    assert Main.main(tiny_args(tiny_dir, shared, "--model", "mf", "--allow_shared_dir")) == 0
    config = json.loads((shared / "config.json").read_text())
    assert "allow_shared_dir" not in config and "out_dir" not in config


def test_a_new_run_folder_that_turns_out_shared_is_removed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.os, "getuid", lambda: OTHER_UID)   # as if another user owned the folder
    new = tmp_path / "new"
    with pytest.raises(UsageError, match=r"it belongs to user \d+, not to you"):
        run_folder.make_run_dir(str(new), "tiny", "mf")
    assert not new.exists()


def test_a_run_folder_owned_by_another_user_is_refused_also_on_resume(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "mf")) == 0
    capsys.readouterr()
    monkeypatch.setattr(run_folder.os, "getuid", lambda: OTHER_UID)
    assert Main.main(["--resume", str(out), "--quiet"]) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"error: will not resume the run in {out}: other users can change files there (it "
                           f"belongs to user")
    # --allow_shared_dir is a flag --resume takes; with it the run folder is read (this run has finished)
    assert Main.main(["--resume", str(out), "--quiet", "--allow_shared_dir"]) == 2
    assert "has already finished" in capsys.readouterr().out


def test_two_default_run_folders_made_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20250101-120000")
    first = run_folder.make_run_dir(None, "tiny", "mf")
    second = run_folder.make_run_dir(None, "tiny", "mf")
    assert first != second and first.is_dir() and second.is_dir() and first.parent == second.parent == Path("runs")
    assert all(re.fullmatch(r"tiny-mf-20250101-120000-[0-9a-f]{6}", p.name) for p in (first, second))
    # the same suffix drawn twice: the second run draws again instead of sharing the first's folder
    drawn = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(run_folder.secrets, "token_hex", lambda n: next(drawn))
    assert run_folder.make_run_dir(None, "tiny", "mf").name.endswith("-aaaaaa")
    assert run_folder.make_run_dir(None, "tiny", "mf").name.endswith("-bbbbbb")
    assert list((tmp_path / "runs" / "tiny-mf-20250101-120000-aaaaaa").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# what a checkpoint may decide
# ------------------------------------------------------------------------------------------------

def crafted_best(run_dir, *flags, **state):
    """A best_model.pt whose configuration is a parse of `flags` (an MF run), with `state` beside it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = vars(parse_args(["--model", "mf", *flags]))
    torch.save({"epoch": 0, "model": "mf", "config": config, **state}, run_dir / "best_model.pt")
    return run_dir


def test_loading_a_run_never_generates_its_dataset(tmp_path, capsys):
    elsewhere = tmp_path / "not_yet" / "Datasets"
    run_dir = crafted_best(tmp_path / "run", "--data", "synthetic", "--data_dir", str(elsewhere), state_dict={})
    with pytest.raises(UsageError) as error:
        api.load(run_dir, device="cpu")
    message = str(error.value)
    assert one_sentence(message) and message.startswith(f"the run's dataset synthetic is not in {elsewhere}")
    assert "data_dir=" in message and "--data_dir" in message
    assert not (tmp_path / "not_yet").exists()
    # a data_dir given to load: the same, never generated there either
    with pytest.raises(UsageError, match="the run's dataset synthetic is not in"):
        api.load(run_dir, device="cpu", data_dir=tmp_path / "mine")
    assert not (tmp_path / "mine").exists()
    assert evaluate.main([str(run_dir), "--device", "cpu"]) == 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "not_yet").exists()


@pytest.mark.parametrize("content,expected", [
    ({"epoch": 0, "model": "mf", "state_dict": {}}, "is not a checkpoint of this package: it lacks 'config'"),
    ([1, 2, 3], "holds a list, not a checkpoint of this package"),
    (b"not a zip file at all", "cannot be read as a checkpoint"),
    ({"epoch": 0, "model": "mf", "config": {"model": "mf"}}, "holds a configuration that lacks data, data_dir"),
    ({"epoch": 0, "model": "x", "config": {"model": "evil:Thing", "data": "d", "data_dir": "D"}},
     "names the unknown model 'evil:Thing'"),
    ({"epoch": 0, "model": "mf", "config": {1: 2}}, "is not a mapping of flag names to values"),
])
def test_a_checkpoint_that_is_not_ours_is_one_sentence(tmp_path, content, expected):
    path = tmp_path / "best_model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UsageError) as error:   # RunFolderError, or the harness's check of the model name
        api.load(tmp_path, device="cpu")
    assert one_sentence(str(error.value)) and str(path) in str(error.value) and expected in str(error.value)


class Stranger:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def test_a_checkpoint_torch_refuses_to_unpickle_is_one_sentence(tmp_path):
    torch.save({"epoch": 0, "model": "mf", "config": Stranger()}, tmp_path / "best_model.pt")
    with pytest.raises(run_folder.RunFolderError) as error:
        api.load(tmp_path, device="cpu")
    assert one_sentence(str(error.value)) and "cannot be read as a checkpoint" in str(error.value)
    assert "holds Python objects besides tensors and plain values, which are not loaded" in str(error.value)
    assert "weights_only=False" not in str(error.value)


def test_a_checkpoint_without_the_models_tensors_is_one_sentence(tiny_dir, tmp_path):
    run_dir = crafted_best(tmp_path / "run", "--data", "tiny", "--data_dir", str(tiny_dir))   # no 'state_dict'
    with pytest.raises(run_folder.RunFolderError) as error:
        api.load(run_dir, device="cpu")
    message = str(error.value)
    assert one_sentence(message) and message.startswith(f"{run_dir / 'best_model.pt'} does not hold the mf model")
    assert "KeyError" in message


@pytest.fixture
def stopped_run(tiny_dir, tmp_path, monkeypatch):
    """A run stopped after 2 of 5 epochs (NaNModel: a non-finite loss in epoch 2): last.pt, resumable."""
    monkeypatch.setitem(Models.REGISTRY, "nan", "conftest:NaNModel")
    out = tmp_path / "run"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "nan", "--epoch", "5")) == 3
    return out


def rewrite_last(run_dir, **config):
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["config"].update(config)
    torch.save(state, run_dir / "last.pt")


def test_resume_keeps_its_run_folder_whatever_last_pt_names(stopped_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    rewrite_last(stopped_run, out_dir=str(elsewhere), allow_shared_dir=True)
    stopped_run.chmod(0o777)
    # last.pt cannot allow a shared folder: only the command line can
    with pytest.raises(UsageError, match="will not resume the run in"):
        Main.resume(stopped_run, epoch=2)
    stopped_run.chmod(0o755)
    summary = Main.resume(stopped_run, epoch=2)              # at or below the epochs run: it ends now
    assert summary["epochs_run"] == 2 and summary["config"]["out_dir"] == str(stopped_run)
    assert summary["config"]["allow_shared_dir"] is False
    assert run_folder.read_summary(stopped_run)["epochs_run"] == 2 and not elsewhere.exists()


def test_resume_never_generates_the_dataset_last_pt_names(stopped_run, tmp_path, capsys):
    elsewhere = tmp_path / "not_yet" / "Datasets"
    rewrite_last(stopped_run, data="synthetic", data_dir=str(elsewhere))
    assert Main.main(["--resume", str(stopped_run), "--quiet"]) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"error: the run's dataset synthetic is not in {elsewhere}") and "put it back" in line
    assert not (tmp_path / "not_yet").exists()


# ------------------------------------------------------------------------------------------------
# what a --config file may decide
# ------------------------------------------------------------------------------------------------

def test_a_config_file_cannot_choose_the_data_folder_the_run_folder_or_a_shared_folder(tiny_dir, tmp_path,
                                                                                      diffmm_log):
    elsewhere = tmp_path / "elsewhere"
    path = tmp_path / "sent.json"
    path.write_text(json.dumps({"model": "mf", "data": "tiny", "lr": 0.5, "data_dir": str(elsewhere / "data"),
                                "out_dir": str(elsewhere / "run"), "allow_shared_dir": True}))
    args = parse_args(["--config", str(path), "--data_dir", str(tiny_dir)])
    assert (args.lr, args.data_dir, args.out_dir, args.allow_shared_dir) == (0.5, str(tiny_dir), None, False)
    warnings = [r.getMessage() for r in diffmm_log.records]
    assert len(warnings) == 3 and all(w.startswith(f"warning: {path} sets ") for w in warnings)
    assert f"sets data_dir to '{elsewhere / 'data'}', which is ignored" in warnings[0]
    assert warnings[0].endswith(f"this run uses --data_dir {tiny_dir}")
    assert f"sets out_dir to '{elsewhere / 'run'}', which is ignored" in warnings[1]
    assert warnings[1].endswith(f"this run uses the default, {run_folder.DEFAULT_OUT_DIR}")
    assert "sets allow_shared_dir, which is ignored" in warnings[2]

    # the run reads the command line's data folder and writes the command line's run folder
    out = tmp_path / "run"
    assert Main.main(["--config", str(path), "--data_dir", str(tiny_dir), "--out_dir", str(out), "--epoch", "1",
                      "--quiet"]) == 0
    assert run_folder.read_summary(out)["data"]["name"] == "tiny" and not elsewhere.exists()


def test_a_run_folders_own_config_reruns_with_the_command_lines_data_dir(tiny_dir, tmp_path, diffmm_log):
    first = tmp_path / "first"
    assert Main.main(tiny_args(tiny_dir, first, "--model", "mf")) == 0
    assert json.loads((first / "config.json").read_text())["data_dir"] == str(tiny_dir)
    listen(diffmm_log)
    diffmm_log.clear()
    # the same data_dir on the command line: nothing is ignored that matters, so no warning
    assert parse_args(["--config", str(first), "--data_dir", str(tiny_dir)]).data_dir == str(tiny_dir)
    assert diffmm_log.records == []
    # none given: the default (Datasets), and a warning naming what config.json said
    assert parse_args(["--config", str(first)]).data_dir == "Datasets"
    assert [r.getMessage() for r in diffmm_log.records][-1].endswith("this run uses the default, Datasets")


@pytest.mark.parametrize("key", ["resume", "config"])
def test_a_config_file_naming_a_run_or_another_config_is_refused(tmp_path, capsys, key):
    path = tmp_path / "sent.json"
    path.write_text(json.dumps({key: str(tmp_path)}))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and f"{path} has the key '{key}'" in err[0]
