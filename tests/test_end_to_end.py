"""From a shop's raw files to recommendations: a raw interaction table (string ids, timestamps) and an item table
(titles) with a few images, all made here -> `prepare.py raw` -> `prepare.py features` -> 2 epochs of DiffMM ->
the Python API -> `recommend.py` and `evaluate.py`.

The features step encodes the titles with a tiny Sentence-BERT and the images with a tiny ResNet built here (no
download) where sentence-transformers, transformers and Pillow are installed; without them the feature files are
written with numpy instead, so that every other step still runs.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub loads: never reach the network

import csv  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import tiny_encoders  # noqa: E402

import Main  # noqa: E402
import api  # noqa: E402
import evaluate  # noqa: E402
import prepare  # noqa: E402
import recommend  # noqa: E402

WORDS = "red blue green soft toy baby bottle chair small large warm wooden".split()
N_USERS, N_ITEMS = 60, 30
ENCODERS = all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "transformers", "PIL"))


def write_shop(root):
    """interactions.csv (customer, product, ts; string ids, duplicates), items.csv (product, title) and a few
    images named after products; returns each customer's set of products in the raw table."""
    rng = np.random.default_rng(3)
    products = [f"P-{k:04d}x" for k in rng.permutation(1000)[:N_ITEMS]]
    rows, bought = [], {}
    for u in range(N_USERS):
        customer = f"cust_{u * 7 + 3}"
        taste = rng.choice(N_ITEMS, size=12, replace=False)      # a few favourites each, so there is a signal
        for j in rng.choice(taste, size=int(rng.integers(5, 10)), replace=False):
            rows.append(f"{customer},{products[j]},{int(rng.integers(1_600_000_000, 1_700_000_000))}")
            bought.setdefault(customer, set()).add(products[j])
    rows.append(rows[0])                                         # a duplicate row, kept once
    (root / "interactions.csv").write_text("customer,product,ts\n" + "\n".join(rows) + "\n")
    titles = ["product,title"] + [f"{p},{' '.join(rng.choice(WORDS, 3))}" for p in products]
    (root / "items.csv").write_text("\n".join(titles) + "\n")
    images = root / "images"
    images.mkdir()
    if ENCODERS:
        from PIL import Image
        for p in products[:8]:                                   # a few images; the other items get zero rows
            Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(images / f"{p}.png")
    return bought


def numpy_features(root, folder):
    """Without the encoders: text rows from a bag of the title's words, image rows random (item_ids.txt order)."""
    item_ids = (folder / "item_ids.txt").read_text().splitlines()
    with open(root / "items.csv") as f:
        titles = {row["product"]: row["title"].split() for row in csv.DictReader(f)}
    text = np.array([[titles[i].count(w) for w in WORDS] for i in item_ids], dtype=np.float32)
    np.save(folder / "text_feat.npy", text)
    np.save(folder / "image_feat.npy", np.random.default_rng(0).normal(size=(len(item_ids), 6)).astype(np.float32))


@pytest.mark.slow
def test_raw_files_to_recommendations(tmp_path, capsys):
    bought = write_shop(tmp_path)
    data_dir = tmp_path / "data"
    folder = data_dir / "shop"
    assert prepare.main(["raw", "--interactions", str(tmp_path / "interactions.csv"), "--user_col", "customer",
                         "--item_col", "product", "--time_col", "ts", "--split", "temporal", "--min_user", "3",
                         "--min_item", "2", "--out", str(folder)]) == 0
    assert (folder / "user_ids.txt").is_file() and (folder / "item_ids.txt").is_file()

    if ENCODERS:
        text_model, image_model = tiny_encoders(tmp_path, WORDS)
        assert prepare.main(["features", "--data", "shop", "--data_dir", str(data_dir), "--items",
                             str(tmp_path / "items.csv"), "--id_col", "product", "--text_cols", "title",
                             "--text_model", str(text_model), "--images", str(tmp_path / "images"), "--image_model",
                             str(image_model), "--device", "cpu", "--threads", "1", "--quiet"]) == 0
    else:
        numpy_features(tmp_path, folder)
    assert (folder / "text_feat.npy").is_file() and (folder / "image_feat.npy").is_file()

    run_dir = tmp_path / "run"
    assert Main.main(["--data", "shop", "--data_dir", str(data_dir), "--epoch", "2", "--dims", "[16]", "--latdim",
                      "8", "--batch", "64", "--threads", "1", "--quiet", "--out_dir", str(run_dir)]) == 0

    # the API: raw ids in, raw ids out; nothing the customer already bought (train, validation or test)
    run = api.load(run_dir, device="cpu")
    customers = run.user_ids[:5].tolist()
    top = run.recommend(customers, k=5, exclude="all")
    assert top.items.shape == (5, 5) and top.users.tolist() == customers
    item_ids = set(run.item_ids.tolist())
    for customer, items in zip(customers, top.items.tolist()):
        assert set(items) <= item_ids and not set(items) & bought[customer], customer
    assert run.scores(customers).shape == (5, run.n_items)
    assert run.item_vectors().shape[0] == run.n_items
    assert run.evaluate()["test"] == json.loads((run_dir / "summary.json").read_text())["protocols"]["validation"][
        "test"]

    # recommend.py over the same run: the same items for the same raw ids
    (tmp_path / "customers.txt").write_text("\n".join(customers) + "\n")
    out = tmp_path / "recs.csv"
    assert recommend.main([str(run_dir), "--users", str(tmp_path / "customers.txt"), "--k", "5", "--exclude", "all",
                           "--out", str(out), "--device", "cpu"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["item_raw"] for r in rows] == top.items.ravel().tolist()
    assert [r["user_raw"] for r in rows] == np.repeat(customers, 5).tolist()
    capsys.readouterr()
    assert evaluate.main([str(run_dir), "--topks", "5,20", "--device", "cpu"]) == 0
    assert "identical to those in summary.json" in capsys.readouterr().out
