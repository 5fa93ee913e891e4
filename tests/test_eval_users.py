"""--eval_users all|mmrec: which users the evaluation averages over, against users counted here by hand."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import inference
from Params import parse_args
from Utils.metrics import dot_scorer, evaluate, evaluated_users, per_user_metrics

from conftest import hand_made, tiny_args, write_dataset

CPU = torch.device("cpu")


def counted(train: np.ndarray, heldout: np.ndarray, rule: str) -> list:
    """The users to average over, one by one: a held-out item, and for 'mmrec' a train item too."""
    return [u for u in range(train.shape[0])
            if heldout[u].sum() > 0 and (rule == "all" or train[u].sum() > 0)]


def recall_by_hand(scores: np.ndarray, train: np.ndarray, heldout: np.ndarray, users: list, k: int) -> float:
    """Mean Recall@k over `users`: train items masked, a stable sort, hits over |held-out|."""
    values = []
    for u in users:
        s = scores[u].astype(np.float64).copy()
        s[train[u] > 0] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        values.append(heldout[u, top].sum() / heldout[u].sum())
    return float(np.mean(values))


def case(seed: int = 0, n_users: int = 30, n_items: int = 25):
    """Random train/held-out rows where some users have held-out items but no train item (and vice versa)."""
    rng = np.random.default_rng(seed)
    train = (rng.random((n_users, n_items)) < 0.2).astype(np.float32)
    heldout = (rng.random((n_users, n_items)) < 0.1).astype(np.float32) * (1 - train)
    train[[1, 4, 7, 11]] = 0.0                 # no train item
    heldout[[4, 20]] = 0.0                     # no held-out item (user 4: neither)
    heldout[[1, 7, 11], 3] = 1.0               # held-out items for the users without train items
    return train, heldout


def test_evaluated_users_by_rule():
    train, heldout = case()
    all_users = evaluated_users(sp.csr_matrix(heldout), sp.csr_matrix(train), "all")
    mmrec_users = evaluated_users(sp.csr_matrix(heldout), sp.csr_matrix(train), "mmrec")
    assert all_users.tolist() == counted(train, heldout, "all")
    assert mmrec_users.tolist() == counted(train, heldout, "mmrec")
    assert {1, 7, 11} <= set(all_users.tolist()) and not {1, 4, 7, 11} & set(mmrec_users.tolist())
    assert evaluated_users(sp.csr_matrix(heldout)).tolist() == all_users.tolist()   # the default is 'all'
    with pytest.raises(ValueError, match="unknown evaluation user rule"):
        evaluated_users(sp.csr_matrix(heldout), sp.csr_matrix(train), "some")


@pytest.mark.parametrize("rule", ["all", "mmrec"])
def test_metrics_average_over_the_rules_users(rule):
    train, heldout = case(seed=1)
    rng = np.random.default_rng(2)
    user_vec = rng.normal(size=(train.shape[0], 4)).astype(np.float32)
    item_vec = rng.normal(size=(train.shape[1], 4)).astype(np.float32)
    score = dot_scorer(torch.from_numpy(user_vec), torch.from_numpy(item_vec))
    users, values = per_user_metrics(score, sp.csr_matrix(train), sp.csr_matrix(heldout), [5], 7, CPU, rule)
    want = counted(train, heldout, rule)
    assert users.tolist() == want and len(values["Recall@5"]) == len(want)
    got = evaluate(score, sp.csr_matrix(train), sp.csr_matrix(heldout), [5], 7, CPU, rule)["Recall@5"]
    assert got == pytest.approx(recall_by_hand(user_vec @ item_vec.T, train, heldout, want, 5), rel=1e-6)


def test_harness_flag_default_and_evaluation(tmp_path):
    train, val, test, _ = hand_made()
    train[[2, 5]] = 0.0                        # two users with val/test items and no train item
    data_dir = tmp_path / "data"
    write_dataset(data_dir / "tiny", train, val, test)
    assert parse_args([]).eval_users == "all"
    counts = {}
    for rule in ("all", "mmrec"):
        args = parse_args(tiny_args(data_dir, tmp_path / "runs", "--model", "pop", "--eval_users", rule))
        data = inference.load_run_data(args, needs_features=False)
        out = inference.evaluate_model(inference.build_model(args, data, CPU), data, args)
        assert out["test_per_user"]["users"].tolist() == counted(train, test, rule)
        assert sum(group["users"] for group in out["groups"].values()) == len(counted(train, test, rule))
        counts[rule] = len(out["test_per_user"]["users"])
    assert counts["all"] - counts["mmrec"] == 2


def test_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--eval_users", "some"])
    assert stop.value.code == 2 and "--eval_users" in capsys.readouterr().err
