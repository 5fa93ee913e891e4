"""A generated multi-modal dataset in the released file layout (not real data).

Items have latent taste vectors; users prefer a few tastes; interactions are drawn from a softmax of
user-item affinity times item popularity. Each modality's features are a noisy random projection of
a different part of the item's taste vector, so each modality carries part of the signal of which
items a user likes, as real content features do, and none carries all of it.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import scipy.sparse as sp

from Utils.errors import DataError, UsageError
from Utils.files import atomic_write_text, staged_folder

log = logging.getLogger("diffmm")

SYNTHETIC_SEED = 2024
# written last into the generated folder: its files and their sizes, so that a folder cut short (by a kill, or
# written before the folder was staged) is told from a complete one and written again
MARKER = "complete.json"
MARKER_FORMAT = 1
# modality -> (feature size, latent dimensions it sees, storage dtype); image is float16 like TikTok's
MODALITIES: Dict[str, tuple] = {
    "image": (64, slice(0, 8), np.float16),
    "text": (48, slice(4, 12), np.float32),
    "audio": (32, slice(8, 16), np.float32),
}


def generate(n_users: int = 1200, n_items: int = 600, n_latent: int = 16, mean_interactions: int = 18,
             seed: int = SYNTHETIC_SEED) -> tuple:
    """Return (train, val, test, features) with train/val/test as U x I float64 COO matrices."""
    rng = np.random.default_rng(seed)
    item_taste = rng.normal(size=(n_items, n_latent))
    item_taste /= np.linalg.norm(item_taste, axis=1, keepdims=True)
    user_taste = rng.normal(size=(n_users, n_latent)) * (rng.random((n_users, n_latent)) < 0.3)
    user_taste += 0.1 * rng.normal(size=(n_users, n_latent))
    popularity = rng.pareto(2.0, n_items) + 1.0

    logits = 4.0 * user_taste @ item_taste.T + np.log(popularity)[None]
    gumbel = logits - np.log(-np.log(rng.random((n_users, n_items))))
    counts = np.clip(rng.poisson(mean_interactions, n_users), 4, n_items // 2)
    ranked = np.argsort(-gumbel, axis=1)

    take = np.arange(n_items)[None, :] < counts[:, None]
    users = np.repeat(np.arange(n_users), counts)
    items = ranked[take]  # row-major, so grouped by user like `users`
    # a random rank of each interaction within its user decides its split
    shuffled = np.lexsort((rng.random(len(users)), users))
    order_in_user = np.empty(len(users), dtype=np.int64)
    order_in_user[shuffled] = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
    n_test = np.maximum(1, counts // 10)[users]
    split_id = np.where(order_in_user < n_test, 2, np.where(order_in_user < 2 * n_test, 1, 0))

    def matrix(mask: np.ndarray) -> sp.coo_matrix:
        return sp.coo_matrix((np.ones(mask.sum()), (users[mask], items[mask])), shape=(n_users, n_items))

    train, val, test = (matrix(split_id == k) for k in range(3))
    features = {}
    for name, (dim, latent, dtype) in MODALITIES.items():
        projection = rng.normal(size=(latent.stop - latent.start, dim))
        values = item_taste[:, latent] @ projection + 0.3 * rng.normal(size=(n_items, dim))
        features[name] = values.astype(dtype)
    return train, val, test, features


SYNTHETIC_FILES = ("trnMat.pkl", "valMat.pkl", "tstMat.pkl", *(f"{name}_feat.npy" for name in MODALITIES))


def synthetic_files(seed: int = SYNTHETIC_SEED) -> Dict[str, bytes]:
    """The generated dataset's files as bytes: trnMat/valMat/tstMat.pkl and <modality>_feat.npy."""
    train, val, test, features = generate(seed=seed)
    files = {f"{name}.pkl": pickle.dumps(matrix) for name, matrix in (("trnMat", train), ("valMat", val),
                                                                        ("tstMat", test))}
    for name, values in features.items():
        buffer = io.BytesIO()
        np.save(buffer, values)
        files[f"{name}_feat.npy"] = buffer.getvalue()
    return files


def _marker(files: Dict[str, bytes], seed: int) -> str:
    return json.dumps({"format": MARKER_FORMAT, "seed": seed, "files": {n: len(b) for n, b in files.items()}}, indent=1)


def synthetic_problem(folder: Path, seed: int = SYNTHETIC_SEED) -> Optional[str]:
    """Why `folder` is not the complete generated dataset of `seed` (a few words), or None when it is: its
    marker names this seed and every file, and each file has the size the marker lists."""
    if not folder.exists():
        return "absent"
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        sizes = marker["files"]
        if marker.get("format") != MARKER_FORMAT or marker.get("seed") != seed or set(sizes) != set(SYNTHETIC_FILES):
            return f"its {MARKER} is of another version or seed"
    except FileNotFoundError:
        return f"no {MARKER}: written by an older version or cut short"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MARKER} cannot be read"
    for name in SYNTHETIC_FILES:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, not {sizes[name]}"
    return None


def ensure_synthetic(folder: Path, seed: int = SYNTHETIC_SEED) -> bool:
    """Make `folder` hold the complete generated dataset; True when it was written (now), False when it was whole.

    The folder is written whole or not at all: into a hidden staging folder beside it, renamed into place once
    every file and the marker (written last) are there. A folder that is not complete (`synthetic_problem`: a
    file missing or cut short, no marker) is written again when it holds nothing but the generated files; a file
    of any other name in it is someone's, so the folder is refused, never removed. A folder of an older version
    whose files are byte for byte the ones generated now only gets its marker.
    """
    folder = Path(folder)
    problem = synthetic_problem(folder, seed)
    if problem is None:
        return False
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not the generated dataset folder; move it away or choose another "
                         f"--data_dir, then run again.")
    files = synthetic_files(seed)
    if folder.is_dir():
        strangers = sorted(p.name for p in folder.iterdir() if p.name not in (*SYNTHETIC_FILES, MARKER))
        if strangers:
            raise UsageError(f"{folder} is not a complete generated dataset ({problem}) and holds files the generator "
                             f"never writes ({', '.join(strangers[:3])}); move them away or choose another "
                             f"--data_dir, then run again.")
        if all((folder / name).is_file() and (folder / name).read_bytes() == data for name, data in files.items()):
            atomic_write_text(folder / MARKER, _marker(files, seed), then="run the same command again")
            return False
        log.info(f"{folder} is not a complete generated dataset ({problem}); writing it again")
        _remove_generated(folder)
    else:
        log.info(f"writing the generated dataset to {folder} (generated, not real data)")
    try:
        with staged_folder(folder, then="run the same command again") as staging:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            (staging / MARKER).write_text(_marker(files, seed), encoding="utf-8")  # last: the folder is complete
    except UsageError:
        if synthetic_problem(folder, seed) is None:
            return False  # another process (a worker of the same sweep) wrote it at the same time
        raise
    return True


def _remove_generated(folder: Path) -> None:
    """Move a folder of generated files aside (one rename, so the name is free at once), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
    try:
        os.replace(folder, aside / folder.name)
    except FileNotFoundError:
        pass  # another process moved it first
    except OSError as e:
        shutil.rmtree(aside, ignore_errors=True)
        raise UsageError(f"cannot replace the incomplete generated dataset {folder} ({e.strerror or e}); remove the "
                         f"folder, then run again.") from None
    shutil.rmtree(aside, ignore_errors=True)


def write_synthetic(folder: Path, seed: int = SYNTHETIC_SEED) -> None:
    """Write the generated dataset to `folder` unless it is there complete (`ensure_synthetic`)."""
    ensure_synthetic(folder, seed)


def parse_dims(text: str) -> Dict[str, int]:
    """'image:4096,text:1024' -> {'image': 4096, 'text': 1024}."""
    return {name: int(dim) for name, dim in (part.split(":") for part in text.split(",") if part)}


def write_random_features(folder: Path, n_items: int, dims: Dict[str, int], seed: int) -> None:
    """Generated (random, float16) item features of the given sizes: for speed and memory runs only."""
    rng = np.random.default_rng(seed)
    for name, dim in dims.items():
        np.save(folder / f"{name}_feat.npy", rng.standard_normal((n_items, dim), dtype=np.float32).astype(np.float16))


def write_scale(folder: Path, n_users: int, n_items: int, n_interactions: int, dims: Dict[str, int],
                seed: int = SYNTHETIC_SEED) -> None:
    """A large generated dataset (popularity-skewed random interactions, 80/10/10 split) for scale runs, written
    whole or not at all (staged beside `folder`, which must be absent or empty, and renamed into place)."""
    rng = np.random.default_rng(seed)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    users = rng.integers(0, n_users, n_interactions)
    items = rng.permutation(n_items)[rng.choice(n_items, n_interactions, p=item_p / item_p.sum())]
    keys = np.unique(users.astype(np.int64) * n_items + items)
    users, items = keys // n_items, keys % n_items
    split = rng.choice(3, len(keys), p=[0.8, 0.1, 0.1])
    with staged_folder(folder, then="run the same command again") as staging:
        for k, name in enumerate(("trnMat", "valMat", "tstMat")):
            mask = split == k
            matrix = sp.coo_matrix((np.ones(mask.sum()), (users[mask], items[mask])), shape=(n_users, n_items))
            with open(staging / f"{name}.pkl", "wb") as f:
                pickle.dump(matrix, f)
        write_random_features(staging, n_items, dims, seed)


def split_files(folder: Path, name: str) -> Dict[str, Path]:
    """The split files of a dataset folder in any layout Main.py reads (`Utils.formats.detect_layout`), each
    under the name it takes in a folder `name` of that layout: DiffMM's trnMat/valMat/tstMat (.pkl or .npz),
    MMRec's <folder>.inter (named after its folder: `name`.inter), MMSSL's train/val/test.json."""
    from Utils.formats import DIFFMM_FILES, MMSSL_FILES, detect_layout

    layout = detect_layout(folder)
    if layout == "diffmm":
        paths = [folder / f"{stem}.npz" if (folder / f"{stem}.npz").is_file() else folder / f"{stem}.pkl"
                 for stem in DIFFMM_FILES]
        return {path.name: path for path in paths}
    if layout == "mmrec":
        return {f"{name}.inter": folder / f"{folder.name}.inter"}
    return {name: folder / name for name in MMSSL_FILES}


def write_like(folder: Path, like: Path, dims: Dict[str, int], seed: int = SYNTHETIC_SEED) -> None:
    """The split files of the dataset folder `like`, in any layout (linked), with generated features, written
    whole or not at all."""
    from DataHandler import load_data

    like = Path(like)
    n_items = load_data(like.name, like.parent, needs_features=False).n_items
    with staged_folder(folder, then="run the same command again") as staging:
        for name, path in split_files(like, Path(folder).name).items():
            (staging / name).symlink_to(path.resolve())
        write_random_features(staging, n_items, dims, seed)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a generated dataset (not real data) for tests and benchmarks.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--like", type=Path, default=None,
                        help="reuse the split files of this real dataset folder (linked) and add generated features")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--interactions", type=int, default=2_000_000)
    parser.add_argument("--features", type=parse_dims, default=parse_dims("image:128,text:128"),
                        help="generated feature sizes, e.g. image:4096,text:1024")
    parser.add_argument("--seed", type=int, default=SYNTHETIC_SEED)
    a = parser.parse_args()
    # a killed earlier run left no --out (the folder is staged), so this refuses only a real earlier output
    if a.out.exists() and any(a.out.iterdir()):
        raise SystemExit(f"error: {a.out} already exists and is not empty; choose another --out.")
    try:
        if a.like:
            write_like(a.out, a.like, a.features, a.seed)
        else:
            write_scale(a.out, a.users, a.items, a.interactions, a.features, a.seed)
    except (DataError, UsageError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote generated dataset {a.out}")


if __name__ == "__main__":
    main()
