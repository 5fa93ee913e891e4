"""A finished run used again: the Python API (`api.py`), recommend.py / evaluate.py over it, `--config` reruns,
`--tensorboard`, the run folder's owner (`Utils/run_folder.py`), early stopping, and the small command-line
behaviours (one-line argparse errors, --resume with a flag it cannot change, an interrupted run's files)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch

import Main
import Models
import api
import evaluate
import recommend
from Models.base import RecModel
from Params import parse_args
from Utils import run_folder
from Utils.cli import deferred_interrupt
from Utils.errors import UsageError

from conftest import NaNModel, hand_made, tiny_args, write_dataset


def records(run_dir):
    """metrics.jsonl without the wall-clock seconds."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in run_folder.read_metrics(run_dir)]


@pytest.fixture(scope="module")
def mf_run(tmp_path_factory):
    """A 3-epoch MF run on a hand-made dataset whose folder has id maps (raw ids 'user-<i>', 'item-<i>' in reverse
    order, so that a raw id is never its index)."""
    root = tmp_path_factory.mktemp("api")
    data_dir = root / "data"
    folder = write_dataset(data_dir / "tiny", *hand_made())
    n_users, n_items = 24, 16
    (folder / "user_ids.txt").write_text("".join(f"user-{n_users - 1 - i}\n" for i in range(n_users)))
    (folder / "item_ids.txt").write_text("".join(f"item-{n_items - 1 - i}\n" for i in range(n_items)))
    out = root / "run"
    assert Main.main(tiny_args(data_dir, out, "--model", "mf", "--epoch", "3", "--topks", "10")) == 0
    return out


def reference_scores(run_dir):
    """MF's scores recomputed from best_model.pt's tensors: user_emb @ item_emb.T."""
    state = torch.load(run_dir / "best_model.pt", weights_only=True)["state_dict"]
    return (state["user_emb"] @ state["item_emb"].T).numpy()


def reference_top(scores, masked, k):
    """Top-k items per row by score (stable order), masked items never chosen."""
    s = np.where(masked, -np.inf, scores)
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


# ------------------------------------------------------------------------------------------------
# api.py
# ------------------------------------------------------------------------------------------------

def test_scores_are_the_models_dot_products(mf_run):
    run = api.load(mf_run, device="cpu")
    assert run.device == torch.device("cpu") and run.epoch == run_folder.read_summary(mf_run)["protocols"][
        "validation"]["epoch"]
    want = reference_scores(mf_run)
    np.testing.assert_allclose(run.scores([3, 0, 7]).numpy(), want[[3, 0, 7]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.scores().numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.item_vectors().numpy() @ run.user_vectors([5]).numpy().T, want[[5]].T,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exclude", ["train", "all", None])
def test_recommend_excludes_what_it_is_asked_to(mf_run, exclude):
    run = api.load(mf_run, device="cpu")
    train, val, test, _ = hand_made()
    masked = {"train": train > 0, "all": (train + val + test) > 0, None: np.zeros_like(train, dtype=bool)}[exclude]
    users = np.array([3, 0, 11, 23])
    top = run.recommend(users, k=5, exclude=exclude, batch=3)      # two batches
    want, s = reference_top(reference_scores(mf_run)[users], masked[users], 5)
    assert (top.item_index == want).all()
    np.testing.assert_allclose(top.scores, np.take_along_axis(s, want, 1), rtol=1e-5)
    # raw ids where the dataset has id maps: index i is 'item-<15 - i>', user u is 'user-<23 - u>'
    assert top.items.tolist() == [[f"item-{15 - i}" for i in row] for row in want]
    assert top.users.tolist() == [f"user-{23 - u}" for u in users]


def test_recommend_takes_raw_user_ids_and_says_which_is_unknown(mf_run):
    run = api.load(mf_run, device="cpu")
    by_raw = run.recommend(["user-20", "user-23"], k=4)
    by_index = run.recommend([3, 0], k=4)
    assert (by_raw.item_index == by_index.item_index).all() and by_raw.user_index.tolist() == [3, 0]
    with pytest.raises(UsageError, match="'user-99' is not in .*user_ids.txt"):
        run.recommend(["user-20", "user-99"])
    with pytest.raises(UsageError, match="outside 0..23"):
        run.scores([24])
    with pytest.raises(UsageError, match="exclude must be"):
        run.recommend([0], exclude="val")


def test_a_user_with_every_item_known_gets_minus_infinity_beyond_them(tmp_path):
    train, val, test, features = hand_made(n_users=6, n_items=8)
    train[0] = 1                                                     # user 0 has every item in train
    val[0] = test[0] = 0
    data_dir = tmp_path / "data"
    write_dataset(data_dir / "full", train, val, test, features)
    assert Main.main(tiny_args(data_dir, tmp_path / "run", "--model", "pop", data="full")) == 0   # no negatives
    top = api.load(tmp_path / "run", device="cpu").recommend([0, 1], k=3)
    assert np.isneginf(top.scores[0]).all() and np.isfinite(top.scores[1]).all()


def test_evaluate_at_other_cut_offs_matches_a_reference(mf_run):
    run = api.load(mf_run, device="cpu")
    metrics = run.evaluate(topks=[3, 20])
    recorded = run_folder.read_summary(mf_run)["protocols"]["validation"]
    assert metrics["test"]["Recall@20"] == recorded["test"]["Recall@20"]
    assert metrics["val"]["NDCG@20"] == recorded["val"]["NDCG@20"]
    # Recall@3 and Precision@3 on test, recomputed here from the scores
    train, _, test, _ = hand_made()
    top, _ = reference_top(reference_scores(mf_run), train > 0, 3)
    users = np.flatnonzero(test.sum(1) > 0)
    hits = np.take_along_axis(test, top, 1)[users].sum(1)
    assert metrics["test"]["Recall@3"] == pytest.approx(np.mean(hits / test[users].sum(1)), rel=1e-6)
    assert metrics["test"]["Precision@3"] == pytest.approx(np.mean(hits / 3), rel=1e-6)
    assert "Recall@10" not in metrics["test"]


def test_vectors_where_the_model_has_them_and_a_clear_error_where_not(tiny_dir, tmp_path, mf_run):
    assert api.load(mf_run, device="cpu").has_vectors
    out = tmp_path / "diffrec"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "diffrec", "--epoch", "1")) == 0
    run = api.load(out, device="cpu")
    assert not run.has_vectors
    with pytest.raises(api.NoVectors, match="diffrec scores users without user and item vectors"):
        run.item_vectors()
    assert run.recommend([0, 1], k=3).item_index.shape == (2, 3)    # it still scores and recommends


def test_the_contract_gives_vectors_only_with_the_default_scorer():
    class Dot(RecModel):
        def embeddings(self):
            return torch.ones(2, 3), torch.zeros(4, 3)

    class OwnScorer(Dot):
        def scorer(self):
            return lambda users: torch.zeros(len(users), 4)

    args = parse_args(["--quiet"])
    assert Dot(args, None, torch.device("cpu")).vectors()[1].shape == (4, 3)
    assert OwnScorer(args, None, torch.device("cpu")).vectors() is None


def test_a_folder_that_is_not_a_finished_run_is_one_sentence(tmp_path):
    with pytest.raises(UsageError, match="best_model.pt does not exist"):
        api.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# recommend.py and evaluate.py
# ------------------------------------------------------------------------------------------------

def test_recommend_cli_reads_raw_ids_and_excludes_all_known_items(mf_run, tmp_path):
    (tmp_path / "users.txt").write_text("user-20\nuser-23\n")
    out = tmp_path / "recs.csv"
    assert recommend.main([str(mf_run), "--k", "4", "--users", str(tmp_path / "users.txt"), "--exclude", "all",
                           "--out", str(out), "--device", "cpu"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    train, val, test, _ = hand_made()
    want, _ = reference_top(reference_scores(mf_run)[[3, 0]], ((train + val + test) > 0)[[3, 0]], 4)
    assert [r["user"] for r in rows] == ["3"] * 4 + ["0"] * 4 and [r["user_raw"] for r in rows][:1] == ["user-20"]
    assert [int(r["item"]) for r in rows] == want.ravel().tolist()
    assert [r["item_raw"] for r in rows] == [f"item-{15 - i}" for i in want.ravel()]
    assert recommend.main([str(mf_run), "--out", str(out)]) == 2                    # never overwritten
    (tmp_path / "bad.txt").write_text("user-20\nnobody\n")
    assert recommend.main([str(mf_run), "--users", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "b.csv")]) == 2
    assert not (tmp_path / "b.csv").exists()


def test_recommend_cli_takes_indices_with_ids_index(mf_run, tmp_path):
    (tmp_path / "users.txt").write_text("3\n0\n")
    out = tmp_path / "recs.csv"
    assert recommend.main([str(mf_run), "--k", "2", "--users", str(tmp_path / "users.txt"), "--ids", "index",
                           "--out", str(out)]) == 0
    with open(out) as f:
        assert [r["user_raw"] for r in csv.DictReader(f)] == ["user-20"] * 2 + ["user-23"] * 2


def test_evaluate_cli_at_other_cut_offs(mf_run, capsys):
    assert evaluate.main([str(mf_run), "--topks", "5,20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[:out.rindex("}") + 1])
    assert set(result["recomputed"]["test"]) == {f"{m}@{k}" for m in ("Recall", "NDCG", "Precision") for k in (5, 20)}
    assert result["identical"] is True and "identical to those in summary.json" in out
    assert evaluate.evaluate_run(mf_run, topks=[7])["identical"] is None            # nothing in common


@pytest.mark.parametrize("entry,argv", [(Main.main, ["--lr", "fast"]), (evaluate.main, []),
                                        (recommend.main, ["RUN", "--k", "many", "--out", "x.csv"])])
def test_an_argparse_error_is_one_line_with_see_help(entry, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].endswith("--help)") and "error:" in err[0]


# ------------------------------------------------------------------------------------------------
# --config, --resume's flags
# ------------------------------------------------------------------------------------------------

def test_a_rerun_from_a_finished_runs_folder_repeats_its_metrics_exactly(gen_dir, tmp_path):
    first = tmp_path / "first"
    assert Main.main(["--data", "gen", "--data_dir", str(gen_dir), "--dims", "[16]", "--latdim", "8", "--batch",
                      "128", "--epoch", "2", "--seed", "7", "--topks", "5", "--quiet", "--out_dir", str(first)]) == 0
    config = json.loads((first / "config.json").read_text())
    assert config["seed"] == 7 and config["dims"] == [16] and "out_dir" not in config
    again = tmp_path / "again"
    # config.json's data_dir is not followed (the data folder comes from the command line, default Datasets):
    # the rerun names it again
    assert Main.main(["--config", str(first), "--data_dir", str(gen_dir), "--out_dir", str(again)]) == 0
    assert records(again) == records(first) and len(records(first)) == 2
    rerun = json.loads((again / "config.json").read_text())
    assert rerun == config


def test_flags_beside_config_win_and_a_yaml_file_works(tmp_path):
    (tmp_path / "c.yaml").write_text("model: lightgcn\nlr: 0.01\nn_layers: 3\ntopks: [5, 10]\nquiet: true\n")
    args = parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.5"])
    assert (args.model, args.lr, args.n_layers, args.topks, args.quiet) == ("lightgcn", 0.5, 3, [5, 10, 20], True)
    assert args.config == str(tmp_path / "c.yaml")


def test_config_of_an_old_run_without_config_json(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"model": "mf", "epoch": 4, "out_dir": "x",
                                                                  "resume": None}}))
    args = parse_args(["--config", str(tmp_path)])
    assert (args.model, args.epoch, args.out_dir) == ("mf", 4, None)


@pytest.mark.parametrize("text,expected", [
    ('{"lr": 0.1, "learning_rat": 3}', "has the key 'learning_rat', which is not a flag of diffmm"),
    ('{"model": "mf", "reg": 1}', "has the key 'reg', which is not a flag of mf"),
    ('[1, 2]', "must hold one mapping of flag names to values"),
    ('{"lr": ', "is not valid JSON"),
    ('{"lr": "fast"}', "argument --lr: invalid float value: 'fast'"),
])
def test_a_bad_configuration_is_one_sentence_naming_the_file(tmp_path, capsys, text, expected):
    path = tmp_path / "conf.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        Main.main(["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and expected in err[0]
    assert "argument" in expected or str(path) in err[0]


def test_yaml_without_pyyaml_is_one_sentence(tmp_path, capsys, monkeypatch):
    (tmp_path / "c.yml").write_text("lr: 0.1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)                  # as if PyYAML were not installed
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "c.yml")])
    assert "needs PyYAML (pip install pyyaml), or write it as JSON" in capsys.readouterr().err


@pytest.mark.parametrize("argv,refused", [(["--lr", "0.1"], "--lr"), (["--model", "mf"], "--model"),
                                          (["--config", "x.json"], "--config")])
def test_resume_refuses_a_flag_it_cannot_change(tmp_path, capsys, argv, refused):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--resume", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert f"so it cannot take {refused}" in err[0] and f"python Main.py --config {tmp_path}" in err[0]
    assert parse_args(["--resume", str(tmp_path), "--epoch", "3", "--threads", "1", "--quiet"]).epoch == 3


# ------------------------------------------------------------------------------------------------
# interrupted runs, early stopping, the run folder
# ------------------------------------------------------------------------------------------------

class InterruptedModel(NaNModel):
    """Ctrl-C during epoch `at`."""

    name = "interrupted"
    at = 2

    def train_epoch(self, epoch, timer):
        if epoch == InterruptedModel.at:
            raise KeyboardInterrupt
        with timer.phase("recommender"):
            return {"loss": {"bpr": 1.0 / (epoch + 1), "loss": 1.0 / (epoch + 1)}}


@pytest.mark.parametrize("at", [2, 0])
def test_an_interrupted_run_says_how_to_go_on_and_draws_its_curves(tiny_dir, tmp_path, monkeypatch, capsys, at):
    monkeypatch.setitem(Models.REGISTRY, "interrupted", f"{__name__}:InterruptedModel")
    monkeypatch.setattr(InterruptedModel, "at", at)
    out = tmp_path / "my run"                                        # a space: the command is quoted
    with pytest.raises(Main.RunInterrupted):
        Main.main(tiny_args(tiny_dir, out, "--model", "interrupted", "--epoch", "5"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    stopped = run_folder.read_summary(out)["stopped"]
    if at == 2:
        assert line.endswith(f"Resume with: python Main.py --resume '{out}'")
        assert stopped["resume"] == f"python Main.py --resume '{out}'" and (out / "curves.png").is_file()
    else:  # no epoch completed: no last.pt, so the way on is the same configuration again
        assert line.endswith(f"run it again with: python Main.py --config '{out}/config.json'")
        assert stopped["rerun"] == f"python Main.py --config '{out}/config.json'" and not (out / "last.pt").exists()


def test_early_stopping_against_a_reference():
    val = [0.1, 0.3, 0.2, 0.3, 0.25, 0.4]
    test = [0.2, 0.1, 0.5, 0.1, 0.1, 0.1]
    tracker = Main.EarlyStopping(k=20, patience=2)
    stops, improved = [], []
    for epoch, (v, t) in enumerate(zip(val, test)):
        improved.append(tracker.update({"epoch": epoch, "val": {"Recall@20": v}, "test": {"Recall@20": t}}))
        stops.append(tracker.should_stop)
    assert improved == [["paper", "validation"], ["validation"], ["paper"], [], [], ["validation"]]
    # strictly better validation only: epoch 3's tie is stale; two stale evaluations (2, 3) stop after epoch 3
    assert stops == [False, False, False, True, True, False]
    assert tracker.best["validation"]["epoch"] == 5 and tracker.best["paper"]["epoch"] == 2
    assert tracker.update({"epoch": 6, "loss": {}}) == [] and tracker.stale == 0     # not evaluated: no change
    assert not Main.EarlyStopping(k=20, patience=0, state={"best": tracker.best, "stale": 9}).should_stop


def test_deferred_interrupt_lets_the_block_finish_first():
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is ignored in this process (a background job)")
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("written")
    assert done == ["written"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_configuration_from_before_a_flag_gets_the_value_the_run_had():
    old = {"model": "mmssl", "data": "tiny", "data_dir": "D", "lr": 0.01}
    upgraded = run_folder.upgrade_config(old)
    assert list(upgraded)[:4] == list(old) and old == {"model": "mmssl", "data": "tiny", "data_dir": "D", "lr": 0.01}
    assert upgraded["eval_users"] == "all" and upgraded["threads"] == "auto" and upgraded["gen_pairing"] == "own"
    assert "gen_pairing" not in run_folder.upgrade_config({**old, "model": "mf"})
    current = {**old, **run_folder.ADDED_FLAGS, "gen_pairing": "authors", "threads": "2"}
    assert run_folder.upgrade_config(current) == current and list(run_folder.upgrade_config(current)) == list(current)


def test_a_run_saved_before_the_newer_flags_loads_and_scores_as_it_ran(mf_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(mf_run, old)
    state = torch.load(old / "best_model.pt", weights_only=True)
    state["config"] = {k: v for k, v in state["config"].items() if k not in run_folder.ADDED_FLAGS}
    torch.save(state, old / "best_model.pt")
    run = api.load(old, device="cpu")
    assert run.args.eval_users == "all" and run.args.threads == "auto"
    assert run.evaluate() == api.load(mf_run, device="cpu").evaluate()


def test_summary_accessors_read_what_main_writes(mf_run):
    summary = run_folder.read_summary(mf_run)
    validation = run_folder.protocol_result(summary, "validation")
    assert validation["epoch"] == run_folder.best_epoch(summary, "validation")
    assert run_folder.protocol_metrics(summary, "validation", "val") == validation["val"]
    assert run_folder.protocol_metrics(summary, "paper") == run_folder.protocol_result(summary, "paper")["test"]
    assert run_folder.run_config(summary)["model"] == "mf" and run_folder.run_data(summary)["name"] == "tiny"
    assert run_folder.epochs_run(summary) == len(run_folder.epoch_seconds(summary)) == 3
    assert run_folder.pruned_reason(summary) is None and run_folder.run_machine(summary)["threads"] >= 1


def test_reading_a_missing_file_of_a_run_folder_is_one_sentence(tmp_path):
    with pytest.raises(run_folder.RunFolderError, match="has not finished"):
        run_folder.read_summary(tmp_path)
    with pytest.raises(run_folder.RunFolderError, match="no saved configuration"):
        run_folder.read_config(tmp_path)
    assert run_folder.finished_summary(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# --tensorboard
# ------------------------------------------------------------------------------------------------

def flatten(record, prefix=""):
    """Every number of a metrics.jsonl record under its path of keys, the epoch aside (the reference)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif value is not None and f"{prefix}{key}" != "epoch":
            out[f"{prefix}{key}"] = float(value)
    return out


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "mf", "--epoch", "3", "--tstEpoch", "2",
                               "--tensorboard")) == 0
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = {(tag, r["epoch"]): v for r in run_folder.read_metrics(out) for tag, v in flatten(r).items()}
    assert set(got) == set(want) and ("val/Recall@20", 2) in got and ("val/Recall@20", 1) not in got
    assert all(got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12) for key in want)   # float32 events


def test_tensorboard_missing_is_one_sentence_before_training(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    out = tmp_path / "tb"
    assert Main.main(tiny_args(tiny_dir, out, "--model", "mf", "--tensorboard")) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("error: --tensorboard needs the tensorboard package: install tensorboard")
    assert not out.exists()
