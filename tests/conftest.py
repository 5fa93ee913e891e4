"""Shared fixtures: tiny datasets written to tmp_path in the released file layout, the shared data path."""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads; pythonpath = . in pytest.ini)

import pickle
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from Models.base import RecModel as _RecModel  # noqa: E402  (after the path is set)

# the real released splits (and TikTok's image/audio features), when this checkout sits beside them
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def require_shared(name: str) -> Path:
    """The folder of a released dataset under SHARED, or skip the test when it is absent."""
    folder = SHARED / name
    if not (folder / "trnMat.pkl").is_file():
        pytest.skip(f"released dataset {name} not found under {SHARED}")
    return folder


def write_dataset(folder: Path, train, val, test, features: Optional[Dict[str, np.ndarray]] = None) -> Path:
    """Write splits (any scipy.sparse or dense array, pickled as float64 COO like the released files)
    and `<modality>_feat.npy` files to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, matrix in (("trnMat", train), ("valMat", val), ("tstMat", test)):
        if matrix is None:
            continue
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump(sp.coo_matrix(matrix, dtype=np.float64), f)
    for name, values in (features or {}).items():
        np.save(folder / f"{name}_feat.npy", values)
    return folder


def hand_made(n_users: int = 24, n_items: int = 16, seed: int = 0, modalities=("image", "text")):
    """A tiny random dataset as dense 0/1 arrays: every user has >= 2 train items and exactly one test
    item and (mostly) one val item, all three disjoint; features random per modality."""
    rng = np.random.default_rng(seed)
    train = np.zeros((n_users, n_items))
    val = np.zeros((n_users, n_items))
    test = np.zeros((n_users, n_items))
    for u in range(n_users):
        items = rng.permutation(n_items)
        k = int(rng.integers(2, max(3, n_items // 3)))
        train[u, items[:k]] = 1
        test[u, items[k]] = 1
        if u % 5:
            val[u, items[k + 1]] = 1
    dims = {"image": 12, "text": 8, "audio": 6}
    features = {m: rng.normal(size=(n_items, dims.get(m, 5))).astype(np.float32) for m in modalities}
    return train, val, test, features


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A data_dir holding one hand-made dataset 'tiny' (24 users x 16 items, image + text)."""
    data_dir = tmp_path / "data"
    write_dataset(data_dir / "tiny", *hand_made())
    return data_dir


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory) -> Path:
    """A data_dir holding 'gen': a small dataset from Utils.synthetic.generate (image/text/audio)."""
    from Utils.synthetic import generate

    data_dir = tmp_path_factory.mktemp("gen_data")
    train, val, test, features = generate(n_users=240, n_items=120, mean_interactions=12, seed=7)
    write_dataset(data_dir / "gen", train, val, test, features)
    return data_dir


def tiny_args(data_dir: Path, out_dir: Path, *extra: str, data: str = "tiny") -> list:
    """A fast command line for a tiny dataset (DiffMM's small sizes unless another --model is named)."""
    from Utils.cli import flag_value

    model = flag_value(extra, "--model", "diffmm")
    small = ["--dims", "[16]", "--latdim", "8"] if model == "diffmm" else []
    return ["--data", data, "--data_dir", str(data_dir), "--epoch", "1", *small, "--quiet", "--out_dir", str(out_dir),
            *extra]


class NaNModel(_RecModel):
    """Trains nothing; its loss turns NaN in epoch 2 (a run that stops with a reason; registered by the tests that
    need it as "conftest:NaNModel")."""

    name = "nan"
    phases = ("recommender",)

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        self.user_emb = torch.nn.Parameter(torch.randn(data.n_users, 4))
        self.item_emb = torch.nn.Parameter(torch.randn(data.n_items, 4))

    def train_epoch(self, epoch, timer):
        with timer.phase("recommender"):
            value = float("nan") if epoch == 2 else 1.0 / (epoch + 1)
        return {"loss": {"bpr": value, "loss": value}}

    def embeddings(self):
        return self.user_emb, self.item_emb


def tiny_encoders(root: Path, words) -> tuple:
    """A 1-layer BERT Sentence-BERT with a word-level tokenizer over `words`, and a tiny transformers ResNet with its
    image processor, saved under `root` (no download): the paths of the two (tests of prepare.py features)."""
    import sentence_transformers as st
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    bert = root / "bert"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                         sep_token="[SEP]", mask_token="[MASK]").save_pretrained(bert)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=64)).save_pretrained(bert)
    try:
        from sentence_transformers.sentence_transformer import modules as st_modules
    except ImportError:
        from sentence_transformers import models as st_modules
    st.SentenceTransformer(modules=[st_modules.Transformer(str(bert)), st_modules.Pooling(16, "mean")]).save(
        str(root / "st"))
    hf = root / "hf_resnet"
    torch.manual_seed(0)
    transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1],
                                                       layer_type="basic")).save_pretrained(hf)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(hf)
    return root / "st", hf


def assert_resumes_exactly(data_dir: Path, tmp_path: Path, monkeypatch, *extra: str, cut_at: int = 2) -> None:
    """A run stopped by Ctrl-C in epoch `cut_at` and resumed from last.pt writes the uninterrupted run's
    metrics.jsonl (without seconds): every optimiser, scheduler and generator a model keeps is found and restored
    (Models.base.RecModel.training_state)."""
    import json

    import Main

    assert Main.main(tiny_args(data_dir, tmp_path / "whole", *extra)) == 0
    original = Main.train_one_epoch

    def interrupted(model, data, args, epoch):
        if epoch == cut_at:
            raise KeyboardInterrupt
        return original(model, data, args, epoch)

    monkeypatch.setattr(Main, "train_one_epoch", interrupted)
    with pytest.raises(Main.RunInterrupted):  # a Ctrl-C stops the caller too
        Main.main(tiny_args(data_dir, tmp_path / "cut", *extra))
    monkeypatch.setattr(Main, "train_one_epoch", original)
    assert Main.main(["--resume", str(tmp_path / "cut"), "--quiet"]) == 0

    def records(name: str) -> list:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert records("cut") == records("whole")


# registered models at small sizes, for the tests that run each one (resume, the CPU/CUDA comparison): a model
# without a line runs at its defaults (`small_flags`), so a new model needs a line only where its defaults are too
# big for the tiny test data or cannot run on it (those tests then fail for it); a line for no registered model fails
# tests/test_resume.py::test_small_flags_name_registered_models_and_parse
SMALL_FLAGS: Dict[str, Tuple[str, ...]] = {
    "diffmm": ("--dims", "[32]", "--latdim", "16", "--batch", "128", "--eval_graph", "full"),
    "mf": ("--embedding_size", "16"),
    "lightgcn": ("--embedding_size", "16", "--n_layers", "2"),
    "vbpr": ("--embedding_size", "16"),
    "lattice": ("--embedding_size", "16", "--feat_embed_dim", "16", "--knn_k", "5"),
    "freedom": ("--embedding_size", "16", "--feat_embed_dim", "16", "--knn_k", "5"),
    "bm3": ("--embedding_size", "16", "--dropout", "0"),
    "lgmrec": ("--embedding_size", "16", "--deterministic_hyper", "true"),
    "diffrec": ("--dims", "[32]", "--steps", "10", "--batch", "64"),
    "mmssl": ("--embed_size", "16", "--batch", "64", "--D_lr", "0"),
    "mdmns": ("--dims", "[32]", "--latdim", "16", "--batch", "128", "--eval_graph", "full",
              "--guide_fresh_per_call", "false"),
    "ngcf": ("--embed_size", "16", "--layer_size", "[16,16]"),
    "sgl": ("--embed_size", "16"),
    "ncl": ("--embedding_size", "16", "--num_clusters", "8", "--warm_up_step", "0"),
    "hccf": ("--latdim", "16", "--hyperNum", "16"),
}


def small_flags(model: str) -> Tuple[str, ...]:
    """The flags that run `model` small in the tests: its SMALL_FLAGS line, else none (its defaults)."""
    return SMALL_FLAGS.get(model, ())
