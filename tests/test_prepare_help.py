"""`prepare.py raw --help` shows each default, and its example runs as written."""
from __future__ import annotations

import shlex

import numpy as np

import prepare


def test_raw_help_shows_the_defaults(capsys):
    try:
        prepare.main(["raw", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: user)", "(default: drop)", "(default: 5)", "(default: random)", "(default: 999)",
                  "(default: diffmm)"):
        assert shown in text


def test_the_raw_example_runs_as_written(tmp_path, monkeypatch):
    """The example's files, made here (generated, not real data), and its command line taken from the help text."""
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 12
    rows = [f"u{u},i{i},{t}" for t, (u, i) in enumerate((u, i) for u in range(n_users) for i in range(n_items)
                                                      if rng.random() < 0.6)]
    (tmp_path / "ratings.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    ids = [f"i{i}" for i in range(n_items)]
    np.save(tmp_path / "img.npy", rng.normal(size=(n_items, 4)).astype(np.float32))
    (tmp_path / "img_ids.txt").write_text("\n".join(ids) + "\n")
    (tmp_path / "text.csv").write_text("".join(f"{i},{','.join(str(v) for v in rng.normal(size=3))}\n" for i in ids))
    monkeypatch.chdir(tmp_path)

    command = prepare.RAW_EXAMPLE.split("\n", 2)[2].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:2] == ["python", "prepare.py"]
    assert prepare.main(words[2:]) == 0
    out = tmp_path / "Datasets" / "mydata"
    for name in ("trnMat.pkl", "valMat.pkl", "tstMat.pkl", "image_feat.npy", "text_feat.npy", "item_ids.txt"):
        assert (out / name).is_file(), name
    assert np.load(out / "image_feat.npy").shape[1] == 4 and np.load(out / "text_feat.npy").shape[1] == 3
