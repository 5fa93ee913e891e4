"""`prepare.py features` (Utils/encoders.py): item texts and images to feature files, on generated items.

No download ever: the text model is a tiny BERT with a word-level tokenizer built here, the image models a
tiny transformers ResNet and (where torchvision loads) torchvision's resnet18 with random weights. The
reference rows are computed here, one item at a time, straight from the table row or the image file.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub loads: never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import prepare  # noqa: E402
from conftest import tiny_encoders  # noqa: E402
from Utils import encoders  # noqa: E402

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed "
                                                         "(pip install -r requirements-encoders.txt)")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

WORDS = "red blue green soft toy baby bottle chair small large warm wooden".split()
N_USERS, N_ITEMS = 40, 36


def _torchvision():
    """torchvision, or None where it is absent or does not load with this torch (a CUDA build beside a CPU one
    fails inside its own import with a RuntimeError, which importorskip does not catch)."""
    try:
        import torchvision
        return torchvision
    except Exception:
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset folder made by `prepare.py raw` (raw ids `sku<k>`, so that the item order differs from the
    table's), an item table and an image folder with gaps and bad rows, and the tiny models."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    raw_ids = [f"sku{k}" for k in rng.permutation(N_ITEMS)]
    rows = ["user,item"] + [f"u{u},{raw_ids[i]}" for u in range(N_USERS) for i in rng.choice(N_ITEMS, 8, replace=False)]
    (root / "inter.csv").write_text("\n".join(rows) + "\n")
    assert prepare.main(["raw", "--interactions", str(root / "inter.csv"), "--out", str(root / "data" / "base"),
                         "--min_user", "1", "--min_item", "1"]) == 0
    item_ids = (root / "data" / "base" / "item_ids.txt").read_text().split()
    assert len(item_ids) == N_ITEMS

    # the table: shuffled rows, 3 items without a row, 2 with empty text, 2 ids the dataset lacks, a price column
    no_row, empty = set(item_ids[:3]), set(item_ids[3:5])
    texts = {}
    lines = ["item_id,title,description,price"]
    for k in rng.permutation(N_ITEMS):
        item = raw_ids[k]
        if item in no_row:
            continue
        title, desc = ("", "  ") if item in empty else (" ".join(rng.choice(WORDS, 2)), " ".join(rng.choice(WORDS, 4)))
        texts[item] = " ".join(f"{title} {desc}".split())
        lines.append(f'{item},{title},"{desc}",{k}.5')
    lines += ["ghost1,red toy,soft,1", "ghost2,blue toy,warm,2"]
    (root / "items.csv").write_text("\n".join(lines) + "\n")

    # images: 4 items without one, one broken file, one item with two files, one file named after no item
    images = root / "images"
    images.mkdir()
    no_image, broken, twice = set(item_ids[5:9]), item_ids[9], item_ids[10]
    for k, item in enumerate(item_ids):
        if item in no_image:
            continue
        if item == broken:
            (images / f"{item}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            continue
        pixels = rng.integers(0, 255, size=(20 + k % 7, 24 + k % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{item}.{'png' if k % 2 else 'jpg'}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"{twice}.tif")  # not first by name
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "ghost.png")

    st_path, hf = tiny_encoders(root, WORDS)
    return {"root": root, "item_ids": item_ids, "texts": texts, "no_row": no_row, "empty": empty,
            "no_image": no_image, "broken": broken, "twice": twice, "st": st_path, "hf": hf, "images": images}


def fresh(world, name: str) -> Path:
    """A copy of the base dataset folder under data/<name>, without feature files."""
    folder = world["root"] / "data" / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(world["root"] / "data" / "base", folder)
    return folder


def text_args(world, name: str, *extra: str) -> list:
    return ["features", "--data", name, "--data_dir", str(world["root"] / "data"), "--items",
            str(world["root"] / "items.csv"), "--id_col", "item_id", "--text_cols", "title,description",
            "--text_model", str(world["st"]), "--device", "cpu", "--threads", "1", "--quiet", *extra]


def image_args(world, name: str, *extra: str) -> list:
    return ["features", "--data", name, "--data_dir", str(world["root"] / "data"), "--images", str(world["images"]),
            "--image_model", str(world["hf"]), "--device", "cpu", "--threads", "1", "--quiet", *extra]


def one_sentence_error(capsys) -> str:
    out = capsys.readouterr()
    text = (out.out + out.err).strip().splitlines()
    errors = [line for line in text if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.out + out.err, text
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------

def test_text_rows_follow_item_ids_and_equal_each_text_encoded_alone(world, capsys):
    folder = fresh(world, "text")
    assert prepare.main(text_args(world, "text", "--batch_size", "5", "--chunk_size", "7")) == 0
    feats = np.load(folder / "text_feat.npy")
    assert feats.shape == (N_ITEMS, 16) and feats.dtype == np.float32
    reference = st.SentenceTransformer(str(world["st"]), device="cpu")
    for row, item in enumerate(world["item_ids"]):
        if item in world["texts"] and world["texts"][item]:
            alone = reference.encode([world["texts"][item]], convert_to_numpy=True)[0]
            np.testing.assert_allclose(feats[row], alone, rtol=1e-5, atol=1e-5)
            assert np.abs(feats[row]).sum() > 0
        else:  # no row in the table, or an empty text: a zero row (--missing_features zero)
            assert not feats[row].any(), item
    out = capsys.readouterr().out
    assert "items without text (zero rows): 5 of 36" in out
    assert "3 with no row in items.csv" in out and "2 with an empty text" in out
    assert "2 rows name items that are not in the dataset" in out and "'ghost1' (line" in out
    assert not (folder / "text_feat.work").exists()  # the work folder goes once the file is complete
    assert prepare.main(["convert", "--data", "text", "--data_dir", str(world["root"] / "data"), "--to", "mmrec",
                         "--out", str(world["root"] / "text_mmrec")]) == 0  # a dataset folder that loads


def test_mean_fills_missing_rows_and_float16_halves_the_file(world):
    base = fresh(world, "t32")
    assert prepare.main(text_args(world, "t32")) == 0
    folder = fresh(world, "t16")
    assert prepare.main(text_args(world, "t16", "--dtype", "float16", "--missing_features", "mean")) == 0
    f32, f16 = np.load(base / "text_feat.npy"), np.load(folder / "text_feat.npy")
    assert f16.dtype == np.float16
    missing = ~f32.any(axis=1)
    assert missing.sum() == 5
    np.testing.assert_allclose(f16[~missing], f32[~missing], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(f16[missing], np.broadcast_to(f32[~missing].mean(axis=0), (5, 16)), rtol=2e-3,
                               atol=2e-3)


def test_an_interrupted_run_resumes_without_encoding_finished_chunks(world, monkeypatch, capsys):
    whole = fresh(world, "whole")
    assert prepare.main(text_args(world, "whole", "--batch_size", "8", "--chunk_size", "8")) == 0
    folder = fresh(world, "resume")
    real = encoders.TextEncoder.encode
    seen = []

    def crash_on_second_chunk(self, texts, error=RuntimeError):
        if len(seen) == 1:
            raise error("interrupted")
        seen.append(list(texts))
        return real(self, texts)

    monkeypatch.setattr(encoders.TextEncoder, "encode", lambda self, texts: crash_on_second_chunk(
        self, texts, KeyboardInterrupt))  # Ctrl-C: one line and exit code 130, the chunks kept
    assert prepare.main(text_args(world, "resume", "--batch_size", "8", "--chunk_size", "8")) == 130
    assert "run the same command again" in capsys.readouterr().out
    assert not (folder / "text_feat.npy").exists()  # nothing that looks complete
    assert "text" not in prepare.feature_files(folder)
    assert sorted(p.name for p in (folder / "text_feat.work").glob("chunk_*")) == ["chunk_000000.npz"]

    encoded = []

    def count(self, texts):
        encoded.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(encoders.TextEncoder, "encode", count)
    assert prepare.main(text_args(world, "resume", "--batch_size", "8", "--chunk_size", "8")) == 0
    n_inputs = N_ITEMS - 5
    assert len(encoded) == n_inputs - 8 and not set(encoded) & set(seen[0][:1])
    np.testing.assert_array_equal(np.load(folder / "text_feat.npy"), np.load(whole / "text_feat.npy"))

    # other inputs (another chunk size) do not reuse the chunks: the work folder is started over
    folder = fresh(world, "restart")
    monkeypatch.setattr(encoders.TextEncoder, "encode", crash_on_second_chunk)
    seen.clear()
    with pytest.raises(RuntimeError, match="interrupted"):  # any other failure propagates, the chunks kept too
        prepare.main(text_args(world, "restart", "--batch_size", "8", "--chunk_size", "8"))
    assert not (folder / "text_feat.npy").exists() and (folder / "text_feat.work" / "chunk_000000.npz").is_file()
    encoded.clear()
    monkeypatch.setattr(encoders.TextEncoder, "encode", count)
    assert prepare.main(text_args(world, "restart", "--batch_size", "8", "--chunk_size", "16")) == 0
    assert len(encoded) == n_inputs


def test_an_existing_feature_file_is_kept_unless_overwrite(world, capsys):
    folder = fresh(world, "keep")
    (folder / "text_feat.npy").write_bytes(b"mine")
    assert prepare.main(text_args(world, "keep")) == 2
    assert "exists already; pass --overwrite" in one_sentence_error(capsys)
    assert (folder / "text_feat.npy").read_bytes() == b"mine"
    assert prepare.main(text_args(world, "keep", "--overwrite")) == 0
    assert np.load(folder / "text_feat.npy").shape == (N_ITEMS, 16)


@pytest.mark.parametrize("table, flags, expected", [
    ("item,title\na,red\n", [], "has no column 'item_id' in its header (item, title); name the item id column"),
    ("item_id,name\nsku1,red\n", [], "has no text column 'title', 'description' in its header"),
    ("item_id,title,description\nsku1,red,toy\nsku2,blue,toy\nsku1,green,toy\n", [],
     "line 4: item 'sku1' has a row already (line 2); keep one row per item"),
    ("item_id,title,description\nnope,red,toy\n", [], "no item of"),
    (None, ["--text_model", "no-such-org/no-such-model-here"],
     "could not load or download the sentence-transformers model 'no-such-org/no-such-model-here'"),
])
def test_bad_text_input_is_one_sentence_and_writes_nothing(world, tmp_path, capsys, table, flags, expected):
    folder = fresh(world, "bad")
    args = text_args(world, "bad", *flags)
    if table is not None:
        (tmp_path / "t.csv").write_text(table)
        args[args.index("--items") + 1] = str(tmp_path / "t.csv")
    assert prepare.main(args) == 2
    message = one_sentence_error(capsys)
    assert expected in message
    assert not (folder / "text_feat.npy").exists() and not (folder / "text_feat.work").exists()
    if "could not load" in expected:
        assert "local folder" in message


def test_a_missing_encoder_package_is_named_and_nothing_is_written(world, monkeypatch, capsys):
    folder = fresh(world, "nodep")
    monkeypatch.setitem(__import__("sys").modules, "sentence_transformers", None)  # import now raises ImportError
    assert prepare.main(text_args(world, "nodep")) == 2
    assert "pip install sentence-transformers" in one_sentence_error(capsys)
    base = world["root"] / "data" / "base"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in base.iterdir())  # nothing written


def test_dataset_folder_without_item_ids_is_refused(world, capsys):
    folder = fresh(world, "noids")
    (folder / "item_ids.txt").unlink()
    assert prepare.main(text_args(world, "noids")) == 2
    assert "has no item_ids.txt" in one_sentence_error(capsys)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def hf_reference(world, path: Path) -> np.ndarray:
    """One image through the tiny transformers ResNet, alone: its processor, then the pooled output."""
    processor = transformers.AutoImageProcessor.from_pretrained(world["hf"])
    model = transformers.AutoModel.from_pretrained(world["hf"]).eval()
    with Image.open(path) as image, torch.no_grad():
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels).pooler_output.flatten(1)[0].numpy()


def test_image_rows_missing_and_broken_files(world, capsys):
    folder = fresh(world, "img")
    assert prepare.main(image_args(world, "img", "--batch_size", "4", "--chunk_size", "10")) == 0
    feats = np.load(folder / "image_feat.npy")
    assert feats.shape == (N_ITEMS, 12)
    ids = world["item_ids"]
    for row in (0, 11, 20, N_ITEMS - 1):
        path = next(p for p in sorted(world["images"].iterdir()) if p.stem == ids[row])
        np.testing.assert_allclose(feats[row], hf_reference(world, path), rtol=1e-4, atol=1e-5)
    twice = ids.index(world["twice"])
    first = sorted(p for p in world["images"].iterdir() if p.stem == world["twice"])[0]
    assert first.suffix != ".tif"
    np.testing.assert_allclose(feats[twice], hf_reference(world, first), rtol=1e-4, atol=1e-5)
    gone = [ids.index(i) for i in world["no_image"]] + [ids.index(world["broken"])]
    assert not feats[gone].any() and feats[np.setdiff1d(np.arange(N_ITEMS), gone)].any(axis=1).all()
    out = capsys.readouterr().out
    assert "items without image (zero rows): 5 of 36: 4 with no image file" in out
    assert "1 with an image that cannot be decoded" in out and f"{world['broken']}.jpg" in out
    assert "1 image files are named after no item" in out and "ghost.png" in out
    assert "1 items have more than one image file" in out and f"{world['twice']}.tif" in out


def test_drop_writes_a_new_dataset_without_the_items_that_lack_a_modality(world):
    from DataHandler import feature_files
    from Utils.formats import read_splits
    folder = fresh(world, "dropsrc")
    out = world["root"] / "data" / "dropped"
    shutil.rmtree(out, ignore_errors=True)
    args = text_args(world, "dropsrc", "--images", str(world["images"]), "--image_model", str(world["hf"]),
                     "--missing_features", "drop", "--out", str(out))
    assert prepare.main(args) == 0
    lacking = world["no_row"] | world["empty"] | world["no_image"] | {world["broken"]}
    kept = [i for i in world["item_ids"] if i not in lacking]
    assert (out / "item_ids.txt").read_text().split() == kept
    assert set(feature_files(out)) == {"image", "text"}
    assert np.load(out / "text_feat.npy").shape == (len(kept), 16)
    assert np.load(out / "image_feat.npy").shape == (len(kept), 12)
    assert np.load(out / "text_feat.npy").any(axis=1).all() and np.load(out / "image_feat.npy").any(axis=1).all()
    before, after = read_splits(folder, "diffmm"), read_splits(out, "diffmm")
    columns = [world["item_ids"].index(i) for i in kept]
    for a, b in zip(before, after):
        assert (a.tocsc()[:, columns] != b).nnz == 0
    assert not feature_files(folder)  # the source folder is unchanged
    assert not list(out.parent.glob("dropped.*work"))
    assert prepare.main(text_args(world, "dropsrc", "--missing_features", "drop")) == 2  # drop needs --out


def test_torchvision_penultimate_layer_with_random_weights(world):
    torchvision = _torchvision()
    if torchvision is None:
        pytest.skip("torchvision is absent or does not load with this torch (its build must match torch's)")
    folder = fresh(world, "tv")
    assert prepare.main(image_args(world, "tv", "--image_model", "resnet18", "--image_weights", "none",
                                   "--image_size", "32", "--dtype", "float16")) == 0
    feats = np.load(folder / "image_feat.npy")
    assert feats.shape == (N_ITEMS, 512) and feats.dtype == np.float16
    from torchvision import transforms
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    prep = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    row = 12
    path = next(p for p in sorted(world["images"].iterdir()) if p.stem == world["item_ids"][row])
    with Image.open(path) as image, torch.no_grad():
        alone = net(prep(image.convert("RGB"))[None])[0].numpy()
    np.testing.assert_allclose(feats[row].astype(np.float32), alone, rtol=1e-2, atol=1e-2)


def test_the_default_image_model_needs_no_torchvision(world, monkeypatch, capsys):
    """The default goes through transformers (installed by requirements-encoders.txt), never torchvision: with
    torchvision made unimportable it passes the dependency check and either encodes (a cached copy of the model) or,
    offline as here, says in one sentence that the Hugging Face model could not be loaded."""
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # import now raises ImportError
    assert encoders.is_hf_image_model(encoders.DEFAULT_IMAGE_MODEL)
    encoders.check_dependencies(True, encoders.DEFAULT_IMAGE_MODEL)
    folder = fresh(world, "default_image")
    args = image_args(world, "default_image")
    del args[args.index("--image_model"):args.index("--image_model") + 2]
    code = prepare.main(args)
    if code == 0:
        assert np.load(folder / "image_feat.npy").shape == (N_ITEMS, 2048)
    else:
        assert code == 2
        message = one_sentence_error(capsys)
        assert "could not load or download the Hugging Face image model 'microsoft/resnet-50'" in message
        assert "torchvision" not in message


def test_unknown_torchvision_architecture_or_no_torchvision_is_one_sentence(world, capsys):
    fresh(world, "tvbad")
    assert prepare.main(image_args(world, "tvbad", "--image_model", "resnet_imaginary")) == 2
    message = one_sentence_error(capsys)
    if _torchvision() is None:
        assert "torchvision" in message and "nothing was written" in message
    else:
        assert "'resnet_imaginary' is not a torchvision classification model" in message


# ---------------------------------------------------------------------------------------------
# The written dataset trains
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_dataset_with_encoded_features_trains_one_epoch(world, tmp_path):
    import Main
    fresh(world, "train")
    assert prepare.main(text_args(world, "train", "--images", str(world["images"]), "--image_model",
                                  str(world["hf"]), "--dtype", "float16")) == 0
    assert Main.main(["--data", "train", "--data_dir", str(world["root"] / "data"), "--epoch", "1", "--quiet",
                      "--threads", "1", "--out_dir", str(tmp_path / "run")]) == 0
