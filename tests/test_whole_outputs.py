"""Every output appears whole or not at all, and raw ids come back exactly as given (issue "Files from strangers",
items 6 and 7).

A kill is simulated at each write of a command in turn (the writing functions it uses raise KeyboardInterrupt, or
SystemExit, at their k-th call): afterwards the output is absent (or the old one), no hidden staging folder or
temporary file is left, and the same command run again succeeds with the output an uninterrupted run writes. The
generated dataset's folder is also checked when cut short by an older version or by hand (a file missing or
truncated): it is written again, and a folder holding someone else's file is refused, never removed.
"""
from __future__ import annotations

import csv
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import scipy.sparse as sp

import inference
import Main
import prepare
import recommend
from DataHandler import load_data
from Utils import encoders, synthetic
from Utils.errors import DataError, UsageError
from Utils.formats import ITEM_IDS, USER_IDS, read_id_lines, write_dataset

from conftest import hand_made

# every character that str.splitlines() takes for a line end, but "\n" itself
SEPARATORS = ["\r", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x0b", "\x0c"]
N_USERS, N_ITEMS = 24, 10


class Killer:
    """Wraps the functions that write files: the `at`-th call of any of them raises `error` instead of writing
    (a kill at that moment); with `at` None it only counts the calls."""

    WRITERS = [(pickle, "dump"), (np, "save"), (np, "savetxt"), (Path, "write_bytes"), (Path, "write_text"),
               (os, "replace")]

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: Optional[int] = None,
                 error: type = KeyboardInterrupt) -> None:
        self.at, self.error, self.calls = at, error, 0
        for owner, name in self.WRITERS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        def write(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise self.error("killed")
            return real(*args, **kwargs)
        return write


def contents(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path, name: str) -> List[str]:
    """Hidden staging folders and temporary files of `name` left in `parent`."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def one_sentence_error(capsys) -> str:
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.out + out.err, out
    return errors[0]


def weird(prefix: str, n: int) -> List[str]:
    """n raw ids with every line separator but "\\n" inside, at the start and at the end, and a few plain ones."""
    ids = []
    for k in range(n):
        sep = SEPARATORS[k % len(SEPARATORS)]
        ids.append([f"{prefix}{k}{sep}x", f"{sep}{prefix}{k}", f"{prefix}{k}{sep}", f" {prefix} {k} "][k % 4]
                   if k < 2 * len(SEPARATORS) else f"{prefix}{k}")
    return ids


def write_raw(root: Path, users: List[str], items: List[str], seed: int = 0) -> Path:
    """interactions.csv (user, item, ts; quoted by the csv module where needed), each user with 5 of the items,
    image features for every item (img.npy + img_ids.txt, one id per line as the id maps are written)."""
    rng = np.random.default_rng(seed)
    path = root / "interactions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "ts"])
        for u in users:
            for i in rng.choice(len(items), 5, replace=False):
                writer.writerow([u, items[i], int(rng.integers(0, 10_000))])
    np.save(root / "img.npy", rng.normal(size=(len(items), 3)).astype(np.float32))
    (root / "img_ids.txt").write_bytes("".join(f"{i}\n" for i in items).encode("utf-8"))
    return path


def raw_args(root: Path, out: Path, layout: str = "diffmm", features: bool = True) -> List[str]:
    return ["raw", "--interactions", str(root / "interactions.csv"), "--min_user", "1", "--min_item", "1",
            *(["--features", f"image={root / 'img.npy'}:{root / 'img_ids.txt'}"] if features else []),
            "--layout", layout, "--out", str(out)]


@pytest.fixture
def raw_input(tmp_path):
    users, items = weird("u", N_USERS), weird("i", N_ITEMS)
    write_raw(tmp_path, users, items)
    return tmp_path, users, items


def killed_at_each_write(run, output: Path, reference: Dict[str, bytes], error: type = KeyboardInterrupt,
                         expected_exit: Optional[int] = None) -> int:
    """Run the command once per write it makes, killed at that write: the output is absent afterwards, nothing
    is left beside it, and the same command then writes what an uninterrupted run writes. Returns the writes."""
    with pytest.MonkeyPatch.context() as mp:
        counter = Killer(mp)
        assert run() == 0
    shutil.rmtree(output)
    assert counter.calls >= 3
    for at in range(1, counter.calls + 1):
        with pytest.MonkeyPatch.context() as mp:
            Killer(mp, at, error)
            if expected_exit is None:
                with pytest.raises(error):
                    run()
            else:
                assert run() == expected_exit
        assert not output.exists(), at
        assert leftovers(output.parent, output.name) == [], at
        assert run() == 0, at
        assert contents(output) == reference, at
        shutil.rmtree(output)
    return counter.calls


# ---------------------------------------------------------------------------------------------
# prepare.py raw and convert
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["diffmm", "mmrec", "mmssl"])
def test_prepare_raw_killed_at_any_write_leaves_nothing_and_reruns(raw_input, layout):
    root, _, _ = raw_input
    reference = root / "ref" / "mine"
    assert prepare.main(raw_args(root, reference, layout)) == 0
    out = root / "data" / "mine"
    writes = killed_at_each_write(lambda: prepare.main(raw_args(root, out, layout)), out, contents(reference))
    assert writes >= 5  # the splits, the features, both id maps and the rename


def test_prepare_raw_stopped_by_system_exit_leaves_nothing(raw_input):
    root, _, _ = raw_input
    out = root / "data" / "mine"
    with pytest.MonkeyPatch.context() as mp:
        Killer(mp, at=2, error=SystemExit)
        with pytest.raises(SystemExit):
            prepare.main(raw_args(root, out))
    assert not out.exists() and leftovers(out.parent, out.name) == []
    assert prepare.main(raw_args(root, out)) == 0


def test_a_real_earlier_output_is_still_refused(raw_input, capsys):
    root, _, _ = raw_input
    out = root / "data" / "mine"
    assert prepare.main(raw_args(root, out)) == 0
    before = contents(out)
    capsys.readouterr()
    assert prepare.main(raw_args(root, out)) == 2
    assert "already exists and is not empty" in one_sentence_error(capsys)
    assert contents(out) == before


@pytest.mark.parametrize("layout", ["mmrec", "mmssl", "diffmm"])
def test_prepare_convert_killed_at_any_write_leaves_nothing_and_reruns(raw_input, layout):
    root, _, _ = raw_input
    assert prepare.main(raw_args(root, root / "data" / "src")) == 0

    def convert(out: Path):
        return prepare.main(["convert", "--data", "src", "--data_dir", str(root / "data"), "--to", layout,
                             "--out", str(out)])

    reference = root / "ref" / "conv"
    assert convert(reference) == 0
    for name in (USER_IDS, ITEM_IDS):  # byte for byte
        assert (reference / name).read_bytes() == (root / "data" / "src" / name).read_bytes()
    out = root / "data" / "conv"
    killed_at_each_write(lambda: convert(out), out, contents(reference))


def test_write_dataset_refuses_a_folder_filled_while_it_wrote(tmp_path):
    train, val, test, features = hand_made()
    splits = tuple(sp.csr_matrix(m) for m in (train, val, test))
    out = tmp_path / "d"

    def someone_writes(staging: Path) -> None:
        out.mkdir()
        (out / "mine.txt").write_text("keep me")

    with pytest.raises(DataError, match="already exists and is not empty"):
        write_dataset(out, splits, features, "diffmm", extra=someone_writes)
    assert contents(out) == {"mine.txt": b"keep me"} and leftovers(tmp_path, "d") == []


# ---------------------------------------------------------------------------------------------
# prepare.py features (the encoders replaced by small deterministic ones: no model is needed)
# ---------------------------------------------------------------------------------------------

class FakeText:
    def __init__(self, model, device) -> None:
        pass

    def encode(self, texts):
        values = np.array([[len(t), sum(map(ord, t)) % 97, t.count(" ")] for t in texts], dtype=np.float32)
        return values, np.ones(len(texts), dtype=bool), []


class FakeImage:
    def __init__(self, model, weights, image_size, device, workers) -> None:
        pass

    def encode(self, paths):
        values = np.array([[Path(p).stat().st_size, len(Path(p).stem)] for p in paths], dtype=np.float32)
        return values, np.ones(len(paths), dtype=bool), []


@pytest.fixture
def features_input(raw_input, monkeypatch):
    """A folder written by `raw` (weird ids), an item table missing two items, images of all but three items."""
    root, _, items = raw_input
    monkeypatch.setattr(encoders, "TextEncoder", FakeText)
    monkeypatch.setattr(encoders, "ImageEncoder", FakeImage)
    monkeypatch.setattr(encoders, "check_dependencies", lambda text, image_model: None)
    with open(root / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "title"])
        for k, item in enumerate(items[2:]):
            writer.writerow([item, f"title {'x' * k}"])
    images = root / "images"
    images.mkdir()
    for k in range(3, N_ITEMS):
        (images / f"{items[k]}.png").write_bytes(b"p" * k)  # a file name holds any character but "/" and NUL
    return root, items


def features_args(root: Path, data: str, *extra: str) -> List[str]:
    return ["features", "--data", data, "--data_dir", str(root / "data"), "--items", str(root / "items.csv"),
            "--images", str(root / "images"), "--device", "cpu", "--threads", "1", "--quiet", "--chunk_size", "4",
            *extra]


def test_prepare_features_killed_at_any_write_writes_whole_files_and_reruns(features_input):
    root, items = features_input
    base = root / "data" / "base"
    assert prepare.main(raw_args(root, base, features=False)) == 0
    ref = root / "data" / "ref"
    assert prepare.main(raw_args(root, ref, features=False)) == 0
    assert prepare.main(features_args(root, "ref")) == 0
    reference = contents(ref)
    assert {"text_feat.npy", "image_feat.npy"} <= set(reference)

    def fresh() -> None:
        shutil.rmtree(base)
        assert prepare.main(raw_args(root, base, features=False)) == 0

    with pytest.MonkeyPatch.context() as mp:
        counter = Killer(mp)
        assert prepare.main(features_args(root, "base")) == 0
    for at in range(1, counter.calls + 1):
        fresh()
        with pytest.MonkeyPatch.context() as mp:
            Killer(mp, at)
            assert prepare.main(features_args(root, "base")) == 130  # features: one line, exit code 130
        for name in ("text_feat.npy", "image_feat.npy"):  # each file absent or whole, never half of one
            assert not (base / name).exists() or (base / name).read_bytes() == reference[name], (at, name)
        assert prepare.main(features_args(root, "base")) == 0, at  # never refused as "exists already"
        assert contents(base) == reference, at
        assert not any(p.name.endswith(".work") for p in base.iterdir())


def test_features_kill_between_two_renames_reruns_and_still_refuses_a_users_file(features_input, capsys):
    root, items = features_input
    base = root / "data" / "base"
    assert prepare.main(raw_args(root, base, features=False)) == 0
    real = encoders._write_into
    calls = []

    def killed_after_first(work, path, matrix):
        if calls:
            raise KeyboardInterrupt
        calls.append(path.name)
        real(work, path, matrix)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoders, "_write_into", killed_after_first)
        assert prepare.main(features_args(root, "base")) == 130
    assert (base / calls[0]).is_file() and (base / encoders.PENDING).is_file()
    assert prepare.main(features_args(root, "base")) == 0
    assert not (base / encoders.PENDING).exists()

    # a file that no interrupted run of the command was writing is still refused
    other = root / "data" / "other"
    assert prepare.main(raw_args(root, other, features=False)) == 0
    (other / "image_feat.npy").write_bytes(b"mine")
    capsys.readouterr()
    assert prepare.main(features_args(root, "other")) == 2
    assert "exists already; pass --overwrite" in one_sentence_error(capsys)
    assert (other / "image_feat.npy").read_bytes() == b"mine"


def test_features_drop_killed_at_any_write_leaves_no_folder_and_reruns(features_input):
    root, items = features_input
    assert prepare.main(raw_args(root, root / "data" / "base", features=False)) == 0
    ref = root / "ref" / "dropped"
    assert prepare.main(features_args(root, "base", "--missing_features", "drop", "--out", str(ref))) == 0
    reference = contents(ref)
    assert read_id_lines(ref / ITEM_IDS) == sorted(items[3:])  # the items with a text and an image
    out = root / "data" / "dropped"
    killed_at_each_write(lambda: prepare.main(features_args(root, "base", "--missing_features", "drop", "--out",
                                                            str(out))),
                         out, reference, expected_exit=130)


# ---------------------------------------------------------------------------------------------
# raw ids: any id prepare.py accepts reads back identically
# ---------------------------------------------------------------------------------------------

def test_ids_with_every_line_separator_round_trip(raw_input):
    root, users, items = raw_input
    out = root / "data" / "mine"
    assert prepare.main(raw_args(root, out)) == 0
    assert read_id_lines(out / USER_IDS) == sorted(users)   # ids are numbered in the order of the raw ids
    assert read_id_lines(out / ITEM_IDS) == sorted(items)
    assert encoders.read_item_ids(out).tolist() == sorted(items)
    # each interaction of the raw table is in the folder under its ids
    data = load_data("mine", root / "data", needs_features=False)
    every = (data.train + data.val + data.test).tocoo()
    user_ids, item_ids = sorted(users), sorted(items)
    with open(root / "interactions.csv", newline="", encoding="utf-8") as f:
        raw = {(r["user"], r["item"]) for r in csv.DictReader(f)}
    assert {(user_ids[u], item_ids[i]) for u, i in zip(every.row, every.col)} == raw


def test_recommend_takes_and_writes_ids_with_every_separator(raw_input):
    root, users, items = raw_input
    assert prepare.main(raw_args(root, root / "data" / "mine")) == 0
    run_dir = root / "run"
    assert Main.main(["--data", "mine", "--data_dir", str(root / "data"), "--model", "mf", "--epoch", "1",
                      "--threads", "1", "--quiet", "--out_dir", str(run_dir)]) == 0
    wanted = [u for u in users if u != u.strip() or any(s in u for s in SEPARATORS)][:6]
    (root / "users.txt").write_bytes("".join(f"{u}\n" for u in wanted).encode("utf-8"))
    out = root / "recs.csv"
    assert recommend.main([str(run_dir), "--k", "3", "--users", str(root / "users.txt"), "--out", str(out),
                           "--device", "cpu"]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["user_raw"] for r in rows] == [u for u in wanted for _ in range(3)]
    assert {r["item_raw"] for r in rows} <= set(items)


@pytest.mark.parametrize("cell, column, expected", [
    ("", "user", "the 'user' id on data row 3 ('') is empty"),
    ("a\nb", "item", "the 'item' id on data row 3 ('a\\nb') contains a line break"),
    ("a\r\nb", "user", "contains a line break"),
    ("a\x00", "item", "the 'item' id on data row 3 ('a\\x00') contains a NUL character"),
])
def test_ids_the_id_maps_cannot_hold_are_refused_in_one_sentence(tmp_path, capsys, cell, column, expected):
    rows = [["u1", "i1"], ["u2", "i2"], ["u3" if column == "item" else cell, cell if column == "item" else "i3"]]
    with open(tmp_path / "inter.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["user", "item"], *rows])
    out = tmp_path / "out"
    assert prepare.main(["raw", "--interactions", str(tmp_path / "inter.csv"), "--min_user", "1", "--min_item", "1",
                         "--out", str(out)]) == 2
    message = one_sentence_error(capsys)
    assert expected in message and str(tmp_path / "inter.csv") in message and ". " not in message
    assert not out.exists()


def test_ids_that_all_end_with_a_carriage_return_are_refused(tmp_path, capsys):
    with open(tmp_path / "inter.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["user", "item"], ["u1", "i1\r"], ["u2", "i2\r"]])
    assert prepare.main(["raw", "--interactions", str(tmp_path / "inter.csv"), "--min_user", "1", "--min_item", "1",
                         "--out", str(tmp_path / "out")]) == 2
    assert "every 'item' id ends with a carriage return" in one_sentence_error(capsys)


def test_read_id_lines_splits_at_newline_only_and_takes_windows_line_ends(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes("a\rb\n\x85c\n\u2028\n".encode())
    assert read_id_lines(path) == ["a\rb", "\x85c", "\u2028"]
    path.write_bytes(b"a\r\nb\r\n")                  # saved with Windows line ends
    assert read_id_lines(path) == ["a", "b"]
    path.write_bytes(b"a\r\nb\n")                    # not every line: the \r is part of the id
    assert read_id_lines(path) == ["a\r", "b"]
    path.write_bytes(b"a\nb")                        # no final line end
    assert read_id_lines(path) == ["a", "b"]
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_id_lines(path)


# ---------------------------------------------------------------------------------------------
# recommend.py --out
# ---------------------------------------------------------------------------------------------

def test_recommend_killed_while_writing_leaves_no_out_and_reruns(tmp_path):
    write_raw(tmp_path, [f"u{k}" for k in range(N_USERS)], [f"i{k}" for k in range(N_ITEMS)])
    assert prepare.main(raw_args(tmp_path, tmp_path / "data" / "plain")) == 0
    run_dir = tmp_path / "run"
    assert Main.main(["--data", "plain", "--data_dir", str(tmp_path / "data"), "--model", "mf", "--epoch", "1",
                      "--threads", "1", "--quiet", "--out_dir", str(run_dir)]) == 0
    out = tmp_path / "recs.csv"
    real_writer = csv.writer

    class Killed:
        def __init__(self, f) -> None:
            self.writer = real_writer(f)

        def writerow(self, row) -> None:
            self.writer.writerow(row)

        def writerows(self, rows) -> None:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recommend.csv, "writer", Killed)
        with pytest.raises(KeyboardInterrupt):
            recommend.main([str(run_dir), "--k", "3", "--out", str(out), "--device", "cpu"])
    assert not out.exists() and leftovers(tmp_path, out.name) == []
    assert recommend.main([str(run_dir), "--k", "3", "--out", str(out), "--device", "cpu"]) == 0
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 3 * N_USERS
    assert recommend.main([str(run_dir), "--k", "3", "--out", str(out), "--device", "cpu"]) == 2  # never overwritten


# ---------------------------------------------------------------------------------------------
# the generated dataset
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory) -> Dict[str, bytes]:
    folder = tmp_path_factory.mktemp("synthetic_ref") / "synthetic"
    assert synthetic.ensure_synthetic(folder) is True
    return contents(folder)


def test_the_generated_dataset_killed_at_any_write_leaves_no_folder(tmp_path, synthetic_reference):
    folder = tmp_path / "synthetic"
    killed_at_each_write(lambda: 0 if synthetic.ensure_synthetic(folder) else 1, folder, synthetic_reference)


@pytest.mark.parametrize("damage", ["truncated", "missing", "truncated_no_marker", "empty"])
def test_a_partial_generated_folder_is_written_again(tmp_path, synthetic_reference, damage):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    if damage != "empty":
        for name, data in synthetic_reference.items():
            (folder / name).write_bytes(data)
    if damage.startswith("truncated"):
        (folder / "trnMat.pkl").write_bytes(synthetic_reference["trnMat.pkl"][:1000])
    if damage == "missing":
        (folder / "audio_feat.npy").unlink()
    if damage in ("missing", "truncated_no_marker"):
        (folder / synthetic.MARKER).unlink()   # as an older version, or a kill, left it
    assert synthetic.synthetic_problem(folder) is not None
    synthetic.write_synthetic(folder)
    assert contents(folder) == synthetic_reference and synthetic.synthetic_problem(folder) is None
    assert leftovers(tmp_path, "synthetic") == []


def test_an_older_complete_generated_folder_only_gets_its_marker(tmp_path, synthetic_reference):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    for name, data in synthetic_reference.items():
        if name != synthetic.MARKER:
            (folder / name).write_bytes(data)
    inode = (folder / "trnMat.pkl").stat().st_ino
    assert synthetic.ensure_synthetic(folder) is False
    assert contents(folder) == synthetic_reference and (folder / "trnMat.pkl").stat().st_ino == inode


def test_a_generated_folder_holding_someone_elses_file_is_refused(tmp_path, synthetic_reference):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    (folder / "trnMat.pkl").write_bytes(synthetic_reference["trnMat.pkl"][:10])
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds files the generator never writes \(notes.txt\)"):
        synthetic.ensure_synthetic(folder)
    assert (folder / "notes.txt").read_text() == "mine"


def test_main_writes_the_generated_dataset_whole(tmp_path, synthetic_reference):
    """inference.load_run_data on a folder cut short without trnMat.pkl (what it checks today) gets it whole."""
    folder = tmp_path / "synthetic"
    folder.mkdir()
    (folder / "text_feat.npy").write_bytes(synthetic_reference["text_feat.npy"][:50])
    args = Main.parse_args(["--model", "mf", "--data_dir", str(tmp_path)])
    inference.load_run_data(args, needs_features=False, generate=True)
    assert contents(folder) == synthetic_reference


def test_the_scale_generator_killed_at_any_write_leaves_no_folder(tmp_path, monkeypatch):
    def run(out: Path) -> int:
        monkeypatch.setattr(sys, "argv", ["synthetic", "--out", str(out), "--users", "40", "--items", "20",
                                          "--interactions", "300", "--features", "image:4,text:3"])
        synthetic.main()
        return 0

    reference = tmp_path / "ref" / "scale"
    run(reference)
    out = tmp_path / "gen" / "scale"
    killed_at_each_write(lambda: run(out), out, contents(reference))
