"""Each user's top-K unseen items with their scores, from a finished run's best model, as CSV.

    python recommend.py RUN_DIR --k 20 --out recs.csv [--users users.txt] [--data_dir DIR]

`--users`: a text file with one user id per line (default: every user). Items the user has in train
are never recommended. Columns: user, rank (1 = best), item, score; and user_raw, item_raw when the
dataset folder has the id maps `prepare.py raw` writes (user_ids.txt, item_ids.txt). An existing
--out file is refused, never overwritten.
"""
from __future__ import annotations

import Utils.openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

import Main
from DataHandler import DataError, dense_rows
from Utils.helpers import UsageError, setup_logging

log = logging.getLogger("diffmm")


def read_users(path: Path, n_users: int) -> np.ndarray:
    try:
        users = np.array([int(line) for line in path.read_text().split() if line.strip()], dtype=np.int64)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} as one integer user id per line ({e}).") from None
    bad = users[(users < 0) | (users >= n_users)]
    if len(bad):
        raise UsageError(f"{path} has user id {bad[0]}, outside 0..{n_users - 1}.")
    return users


@torch.no_grad()
def recommend(run_dir: Path, k: int, out: Path, users_file: Optional[Path] = None,
              data_dir: Optional[str] = None, device: str = "auto") -> int:
    """Write the CSV; returns the number of users written."""
    if out.exists():
        raise UsageError(f"{out} already exists; choose another --out (nothing is overwritten).")
    args, data, model = Main.load_trained(run_dir, data_dir, device)
    users = read_users(users_file, data.n_users) if users_file else np.arange(data.n_users)
    k = min(k, data.n_items)
    folder = Path(args.data_dir) / args.data
    maps = [folder / "user_ids.txt", folder / "item_ids.txt"]
    raw = [np.array(m.read_text().split("\n")[:-1]) for m in maps] if all(m.is_file() for m in maps) else None
    score = model.scorer()
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "rank", "item", "score"] + (["user_raw", "item_raw"] if raw else []))
        for start in range(0, len(users), args.tstBat):
            rows = users[start:start + args.tstBat]
            scores = score(torch.from_numpy(rows).to(model.device)).float()
            scores = scores.masked_fill(dense_rows(data.train, rows, model.device) > 0, float("-inf"))
            top = torch.topk(scores, k, dim=1)
            items, values = top.indices.cpu().numpy(), top.values.cpu().numpy()
            columns = [np.repeat(rows, k), np.tile(np.arange(1, k + 1), len(rows)), items.ravel(),
                       np.char.mod("%.6g", values.ravel())]
            if raw:
                columns += [raw[0][np.repeat(rows, k)], raw[1][items.ravel()]]
            writer.writerows(zip(*columns))
    return len(users)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run folder (holds best_model.pt)")
    p.add_argument("--k", default=20, type=int, help="items per user")
    p.add_argument("--out", required=True, type=Path, help="the CSV file to write (must not exist)")
    p.add_argument("--users", default=None, type=Path, help="one user id per line (default: every user)")
    p.add_argument("--data_dir", default=None, help="where the dataset folder is now, if it moved since the run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    setup_logging()
    if args.k < 1:
        log.error(f"error: --k must be at least 1, got {args.k}.")
        return 2
    try:
        n = recommend(args.run_dir, args.k, args.out, args.users, args.data_dir, args.device)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    log.info(f"wrote the top {args.k} items of {n} users to {args.out}")
    return 0


if __name__ == "__main__":
    from Utils.helpers import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
