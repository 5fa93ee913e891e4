"""A generated multi-modal dataset in the released file layout (not real data).

Items have latent taste vectors; users prefer a few tastes; interactions are drawn from a softmax of
user-item affinity times item popularity. Each modality's features are a noisy random projection of
a different part of the item's taste vector, so each modality carries part of the signal of which
items a user likes, as real content features do, and none carries all of it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict

import numpy as np
import scipy.sparse as sp

SYNTHETIC_SEED = 2024
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


def write_synthetic(folder: Path, seed: int = SYNTHETIC_SEED) -> None:
    """Write the generated dataset to `folder` as trnMat/valMat/tstMat.pkl and <modality>_feat.npy."""
    train, val, test, features = generate(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, matrix in (("trnMat", train), ("valMat", val), ("tstMat", test)):
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump(matrix, f)
    for name, values in features.items():
        np.save(folder / f"{name}_feat.npy", values)


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
    """A large generated dataset (popularity-skewed random interactions, 80/10/10 split) for scale runs."""
    rng = np.random.default_rng(seed)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    users = rng.integers(0, n_users, n_interactions)
    items = rng.permutation(n_items)[rng.choice(n_items, n_interactions, p=item_p / item_p.sum())]
    keys = np.unique(users.astype(np.int64) * n_items + items)
    users, items = keys // n_items, keys % n_items
    split = rng.choice(3, len(keys), p=[0.8, 0.1, 0.1])
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(("trnMat", "valMat", "tstMat")):
        mask = split == k
        matrix = sp.coo_matrix((np.ones(mask.sum()), (users[mask], items[mask])), shape=(n_users, n_items))
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump(matrix, f)
    write_random_features(folder, n_items, dims, seed)


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
    if a.out.exists() and any(a.out.iterdir()):
        raise SystemExit(f"error: {a.out} already exists and is not empty; choose another --out.")
    if a.like:
        a.out.mkdir(parents=True, exist_ok=True)
        for name in ("trnMat.pkl", "valMat.pkl", "tstMat.pkl"):
            (a.out / name).symlink_to((a.like / name).resolve())
        from DataHandler import load_matrix
        write_random_features(a.out, load_matrix(a.out / "trnMat.pkl").shape[1], a.features, a.seed)
    else:
        write_scale(a.out, a.users, a.items, a.interactions, a.features, a.seed)
    print(f"wrote generated dataset {a.out}")


if __name__ == "__main__":
    main()
