"""Bad input: Main.main returns 2 and prints one line 'error: ...' (no traceback); odd but valid data runs."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import Main
from conftest import hand_made, tiny_args, write_dataset


def run_bad(argv, capsys):
    code = Main.main(argv)
    out, err = capsys.readouterr()
    lines = [l for l in (out + err).splitlines() if l.strip()]
    assert code == 2
    assert "Traceback" not in out + err
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def dataset(tmp_path, name="tiny", **changes):
    train, val, test, feats = hand_made()
    parts = dict(train=train, val=val, test=test, features=feats)
    parts.update(changes)
    write_dataset(tmp_path / "data" / name, parts["train"], parts["val"], parts["test"], parts["features"])
    return tmp_path / "data"


def test_unknown_dataset_lists_found(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    dataset(tmp_path, name="other")
    line = run_bad(tiny_args(data_dir, tmp_path / "out", data="nope"), capsys)
    assert "nope" in line and "tiny" in line and "other" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["trnMat", "valMat", "tstMat"])
def test_missing_split_named(tmp_path, capsys, split):
    data_dir = dataset(tmp_path)
    (data_dir / "tiny" / f"{split}.pkl").unlink()
    assert f"{split}.pkl" in run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)


def test_corrupt_pickle(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    (data_dir / "tiny" / "valMat.pkl").write_bytes(b"\x80\x04this is not a pickle at all")
    assert "valMat.pkl" in run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)


def test_pickle_of_wrong_object(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    with open(data_dir / "tiny" / "trnMat.pkl", "wb") as f:
        pickle.dump({"not": "a matrix"}, f)
    assert "trnMat.pkl" in run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)


def test_split_shapes_differ(tmp_path, capsys):
    train, _, test, _ = hand_made()
    data_dir = dataset(tmp_path, test=np.hstack([test, np.zeros((test.shape[0], 1))]))
    line = run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)
    assert "tstMat.pkl" in line and "shape" in line


def test_feature_not_2d(tmp_path, capsys):
    _, _, _, feats = hand_made()
    feats["image"] = feats["image"][:, 0]
    data_dir = dataset(tmp_path, features=feats)
    line = run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)
    assert "image_feat.npy" in line and "2-D" in line


def test_feature_rows_differ_from_items(tmp_path, capsys):
    _, _, _, feats = hand_made()
    feats["text"] = feats["text"][:-1]
    data_dir = dataset(tmp_path, features=feats)
    line = run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)
    assert "text_feat.npy" in line and "15" in line and "16" in line


def test_nan_in_features(tmp_path, capsys):
    _, _, _, feats = hand_made()
    feats["image"][3, 2] = np.nan
    data_dir = dataset(tmp_path, features=feats)
    line = run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)
    assert "image_feat.npy" in line and "NaN" in line


def test_no_feature_files(tmp_path, capsys):
    data_dir = dataset(tmp_path, features={})
    assert "feature" in run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)


def test_unreadable_feature_file(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    (data_dir / "tiny" / "text_feat.npy").write_bytes(b"garbage")
    assert "text_feat.npy" in run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)


def test_missing_requested_modality(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    assert "audio" in run_bad(tiny_args(data_dir, tmp_path / "out", "--modalities", "image,audio"), capsys)


def test_empty_test_split(tmp_path, capsys):
    train, _, test, _ = hand_made()
    data_dir = dataset(tmp_path, test=np.zeros_like(test))
    assert "tstMat.pkl" in run_bad(tiny_args(data_dir, tmp_path / "out"), capsys)


def test_rebuild_k_above_items(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    assert "rebuild_k" in run_bad(tiny_args(data_dir, tmp_path / "out", "--rebuild_k", "17"), capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    assert "cuda" in run_bad(tiny_args(data_dir, tmp_path / "out", "--device", "cuda"), capsys).lower()
    assert not (tmp_path / "out").exists()


def test_out_dir_not_empty_is_untouched(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("an earlier run\n")
    (out / "summary.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = run_bad(tiny_args(data_dir, out), capsys)
    assert str(out) in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_empty_existing_out_dir_is_fine(tmp_path, capsys):
    data_dir = dataset(tmp_path)
    (tmp_path / "out").mkdir()
    assert Main.main(tiny_args(data_dir, tmp_path / "out")) == 0
    assert (tmp_path / "out" / "summary.json").is_file()


def test_users_without_train_and_items_never_seen_are_valid(tmp_path, capsys):
    """A user with no train interaction (but a test item), a user with nothing at all, and items never
    interacted with anywhere: a 1-epoch run succeeds and reports finite metrics."""
    train, val, test, feats = hand_made(n_users=24, n_items=16)
    train[:, 15] = val[:, 15] = test[:, 15] = 0    # item 15: never interacted with
    train[:, 14] = 0                                 # item 14: only held out
    train[0] = 0                                     # user 0: no train interaction, keeps its test item
    train[1] = val[1] = test[1] = 0                  # user 1: nothing at all
    for u in range(2, 24):                           # keep every other user with >= 1 train and test item
        if train[u].sum() == 0:
            train[u, 0] = 1 if test[u, 0] == 0 and val[u, 0] == 0 else 0
        if test[u].sum() == 0:
            free = np.flatnonzero((train[u] == 0) & (val[u] == 0))[:1]
            test[u, free] = 1
    assert test[0].sum() == 1 and train[0].sum() == 0
    data_dir = dataset(tmp_path, train=train, val=val, test=test)
    out = tmp_path / "out"
    assert Main.main(tiny_args(data_dir, out, "--batch", "8", "--rebuild_k", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["users"] == 24 and summary["data"]["items"] == 16
    for proto in ("paper", "validation"):
        for value in summary["protocols"][proto]["test"].values():
            assert np.isfinite(value) and 0 <= value <= 1
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert all(np.isfinite(v) for v in record["loss"].values())


# ------------------------------------------------------------------------------------------------
# flag values that cannot work: rejected by the parser (SystemExit 2) or by main (2, one 'error:' line)
# ------------------------------------------------------------------------------------------------

def rejected_cleanly(argv, capsys):
    try:
        code = Main.main(argv)
    except SystemExit as e:                     # argparse: 'usage: ...' + 'error: ...' on stderr
        out, err = capsys.readouterr()
        assert e.code == 2 and "error:" in err
        return
    out, err = capsys.readouterr()
    lines = [l for l in (out + err).splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, lines[-3:])


@pytest.mark.parametrize("extra", [
    # no epoch / empty batches / no diffusion step / empty cut-off / no step embedding / no or bool hidden layer
    ["--epoch", "0"], ["--batch", "0"], ["--tstBat", "0"], ["--tstEpoch", "0"], ["--steps", "0"],
    ["--topk", "0"], ["--d_emb_size", "0"], ["--dims", "[]"], ["--dims", "[True]"],
    # every generated edge dropped (and kept ones divided by keepRate <= 0), no generated edge, τ = 0 (NaN loss)
    ["--keepRate", "0"], ["--keepRate", "-1"], ["--rebuild_k", "0"], ["--temp", "0"],
], ids=lambda extra: " ".join(extra))
def test_impossible_flag_values_rejected(tmp_path, capsys, extra):
    data_dir = dataset(tmp_path)
    rejected_cleanly(tiny_args(data_dir, tmp_path / "out", *extra), capsys)


def test_empty_validation_split(tmp_path, capsys):
    """valMat.pkl with no interaction (the authors never read it): either a clear error like the empty
    test split, or a run that completes; never an uncaught exception."""
    _, val, _, _ = hand_made()
    data_dir = dataset(tmp_path, val=np.zeros_like(val))
    code = Main.main(tiny_args(data_dir, tmp_path / "out"))
    out, err = capsys.readouterr()
    if code == 2:
        lines = [l for l in (out + err).splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "valMat.pkl" in lines[0]
    else:
        assert code == 0
        assert (tmp_path / "out" / "summary.json").is_file()
