"""Dataset layouts (DiffMM, MMRec, MMSSL), `prepare.py raw` and `convert`, safe unpickling, bad inputs."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import Main
import prepare
from DataHandler import DataError, load_data, load_matrix
from Utils.formats import detect_layout, write_dataset

from conftest import ROOT, hand_made, tiny_args, write_dataset as write_diffmm


@pytest.fixture
def tiny_splits():
    train, val, test, features = hand_made()
    return tuple(sp.csr_matrix(m, dtype=np.float32) for m in (train, val, test)), features


def same(a, b) -> bool:
    return a.shape == b.shape and (a != b).nnz == 0


@pytest.mark.parametrize("layout", ["diffmm", "mmrec", "mmssl"])
def test_each_layout_is_detected_read_and_trains_one_epoch(tmp_path, tiny_splits, layout):
    splits, features = tiny_splits
    write_dataset(tmp_path / "data" / "tiny", splits, features, layout)
    assert detect_layout(tmp_path / "data" / "tiny") == layout
    data = load_data("tiny", tmp_path / "data")
    assert all(same(a, b) for a, b in zip((data.train, data.val, data.test), splits))
    assert list(data.features) == ["image", "text"]
    assert Main.main(tiny_args(tmp_path / "data", tmp_path / "out", "--format", layout)) == 0


def test_npz_splits_are_read(tmp_path, tiny_splits):
    splits, features = tiny_splits
    folder = tmp_path / "data" / "tiny"
    folder.mkdir(parents=True)
    for stem, matrix in zip(("trnMat", "valMat", "tstMat"), splits):
        sp.save_npz(folder / f"{stem}.npz", matrix)
    data = load_data("tiny", tmp_path / "data", needs_features=False)
    assert all(same(a, b) for a, b in zip((data.train, data.val, data.test), splits))


def test_round_trip_through_every_layout_gives_identical_matrices(tmp_path, tiny_splits):
    splits, features = tiny_splits
    write_dataset(tmp_path / "a", splits, features, "diffmm")
    chain = [("a", "mmrec", "b"), ("b", "mmssl", "c"), ("c", "diffmm", "d"), ("d", "mmssl", "e"), ("e", "mmrec", "f")]
    for source, layout, target in chain:
        assert prepare.main(["convert", "--data", source, "--data_dir", str(tmp_path), "--to", layout,
                             "--out", str(tmp_path / target)]) == 0
    for name in "bcdef":
        data = load_data(name, tmp_path)
        assert all(same(a, b) for a, b in zip((data.train, data.val, data.test), splits)), name
        assert all(np.array_equal(data.features[m], features[m]) for m in features), name


def test_convert_refuses_a_folder_that_holds_files(tmp_path, tiny_splits, capsys):
    splits, features = tiny_splits
    write_dataset(tmp_path / "a", splits, features, "diffmm")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep me")
    assert prepare.main(["convert", "--data", "a", "--data_dir", str(tmp_path), "--to", "mmrec",
                         "--out", str(tmp_path / "b")]) == 2
    assert "not empty" in capsys.readouterr().out and (tmp_path / "b" / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# bad inputs: one sentence each
# ------------------------------------------------------------------------------------------------

def write_inter(folder, rows, header="userID\titemID\tx_label"):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header] + ["\t".join(map(str, r)) for r in rows]
    (folder / f"{folder.name}.inter").write_text("\n".join(lines) + "\n")


GOOD = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 1, 0), (1, 2, 0), (1, 0, 1), (1, 3, 2)]


@pytest.mark.parametrize("rows,features,expected", [
    (GOOD[:-1] + [(1, 3, 5)], None, "split label other than 0"),
    (GOOD + [(1, 1, 2)], None, "also in train"),
    (GOOD + [(0, 9, 0)], {"image": 4}, "item id 9, but the feature files have 4 rows"),
    (GOOD + [(-1, 0, 0)], None, "negative ids"),
    ([r for r in GOOD if r[2] != 1], None, "no validation interaction"),
])
def test_bad_mmrec_files_are_one_sentence(tmp_path, capsys, rows, features, expected):
    folder = tmp_path / "data" / "bad"
    write_inter(folder, rows)
    for name, n in (features or {}).items():
        np.save(folder / f"{name}_feat.npy", np.ones((n, 3), dtype=np.float32))
    code = Main.main(["--data", "bad", "--data_dir", str(tmp_path / "data"), "--model", "mf", "--quiet",
                      "--out_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error:") and expected in lines[-1], lines[-1]


def test_mmrec_header_without_x_label_is_one_sentence(tmp_path):
    write_inter(tmp_path / "bad", GOOD, header="userID\titemID\tlabel")
    with pytest.raises(DataError, match="no column x_label"):
        load_data("bad", tmp_path, needs_features=False)


def test_duplicate_rows_are_a_warning_with_their_count(tmp_path, caplog):
    write_inter(tmp_path / "dup", GOOD + [(0, 0, 0), (0, 0, 0)])
    with caplog.at_level("WARNING", logger="diffmm"):
        data = load_data("dup", tmp_path, needs_features=False)
    assert data.train[0, 0] == 1.0 and data.train.nnz == 4
    assert "2 duplicate rows" in caplog.text


def test_mmssl_json_that_is_not_lists_is_one_sentence(tmp_path, tiny_splits):
    splits, features = tiny_splits
    write_dataset(tmp_path / "j", splits, features, "mmssl")
    (tmp_path / "j" / "val.json").write_text(json.dumps({"0": "not a list of ids"}))
    with pytest.raises(DataError, match="val.json is not a JSON object of user id"):
        load_data("j", tmp_path)


def test_a_pickle_naming_a_function_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    train, val, test, features = hand_made()
    data_dir = tmp_path / "data"
    write_diffmm(data_dir / "tiny", train, val, test, features)
    with open(data_dir / "tiny" / "trnMat.pkl", "wb") as f:
        pickle.dump(Exploit(), f)
    code = Main.main(tiny_args(data_dir, tmp_path / "out"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 2 and not marker.exists()
    assert line.startswith("error: refused to load") and "posix.system" in line and "nothing in it was executed" in line


def test_released_style_pickles_still_load(tmp_path):
    matrix = sp.random(5, 7, density=0.4, format="coo", random_state=0)
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump(matrix, f)
    assert same(load_matrix(tmp_path / "m.pkl"), (sp.csr_matrix(matrix) != 0).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# prepare.py raw
# ------------------------------------------------------------------------------------------------

def raw_table(tmp_path, n_users=30, n_items=12, seed=0):
    """A raw CSV with string ids, timestamps, duplicates, and a few users/items below the 5-core."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        k = 12 if u < n_users - 3 else 2                       # the last 3 users fall to the k-core
        for i in rng.choice(n_items, size=k, replace=False):
            rows.append((f"user-{u}", f"item-{i}", int(rng.integers(0, 10_000))))
    rows.append(rows[0])                                        # a duplicate
    rows.append(("user-0", "rare-item", 5))                     # an item with one interaction
    path = tmp_path / "ratings.csv"
    path.write_text("user,item,timestamp\n" + "\n".join(f"{u},{i},{t}" for u, i, t in rows) + "\n")
    return path, rows


def test_prepare_raw_filters_remaps_splits_and_writes_id_maps(tmp_path):
    path, rows = raw_table(tmp_path)
    ids = [f"item-{i}" for i in range(12)]
    np.save(tmp_path / "img.npy", np.arange(12 * 3, dtype=np.float32).reshape(12, 3))
    (tmp_path / "img_ids.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "data" / "mine"
    assert prepare.main(["raw", "--interactions", str(path), "--time_col", "timestamp", "--out", str(out),
                         "--features", f"image={tmp_path / 'img.npy'}:{tmp_path / 'img_ids.txt'}"]) == 0
    data = load_data("mine", tmp_path / "data")
    users = (out / "user_ids.txt").read_text().split()
    items = (out / "item_ids.txt").read_text().split()
    assert len(users) == data.n_users == 27 and "user-29" not in users   # the k-core removed the light users
    assert "rare-item" not in items                                    # no features: its rows were dropped
    # every kept interaction is one of the raw rows, under the remapped ids, exactly once
    raw_pairs = {(u, i) for u, i, _ in rows}
    everything = (data.train + data.val + data.test).tocoo()
    assert everything.max() == 1.0
    assert {(users[u], items[i]) for u, i in zip(everything.row, everything.col)} <= raw_pairs
    # MMRec's per-user split: 12 interactions -> 10 train, 1 validation, 1 test
    assert set(np.diff(data.train.indptr)) == {10} and set(np.diff(data.val.indptr)) == {1}
    # the feature row of item id j is the raw item's row
    j = items.index("item-7")
    np.testing.assert_array_equal(data.features["image"][j], np.arange(21, 24, dtype=np.float32))


def test_temporal_split_holds_out_each_users_latest_interactions(tmp_path):
    path, rows = raw_table(tmp_path, seed=1)
    out = tmp_path / "data" / "t"
    assert prepare.main(["raw", "--interactions", str(path), "--time_col", "timestamp", "--split", "temporal",
                         "--out", str(out), "--layout", "mmrec"]) == 0
    data = load_data("t", tmp_path / "data", needs_features=False)
    users = (out / "user_ids.txt").read_text().split()
    items = (out / "item_ids.txt").read_text().split()
    stamp = {}
    for u, i, t in rows:
        stamp[(u, i)] = min(t, stamp.get((u, i), t))
    for u in range(data.n_users):
        times = {name: [stamp[(users[u], items[i])] for i in m[u].indices] for name, m in
                 (("train", data.train), ("val", data.val), ("test", data.test))}
        assert max(times["train"]) <= min(times["val"]) <= min(times["test"])


def test_prepare_reports_a_missing_column_in_one_sentence(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("uid,iid\n1,2\n")
    assert prepare.main(["raw", "--interactions", str(tmp_path / "r.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "has no column 'user'" in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_runs_as_a_command(tmp_path):
    path, _ = raw_table(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "raw", "--interactions", str(path),
                             "--out", str(tmp_path / "cmd"), "--layout", "mmssl"], capture_output=True, text=True)
    assert result.returncode == 0 and "users: 27" in result.stdout
    assert detect_layout(tmp_path / "cmd") == "mmssl"
