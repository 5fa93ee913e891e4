"""Each user's top-K items with their scores, from a finished run's best model, as CSV.

    python recommend.py RUN_DIR --k 20 --out recs.csv [--users users.txt] [--exclude train|all|none]

`--users`: a text file with one user per line (default: every user): raw ids where the dataset folder
has the id maps `prepare.py raw` writes (user_ids.txt, item_ids.txt), else indices (`--ids` to say
which). `--exclude train` (default) never recommends an item the user has in train; `all` none of the
user's known items (train, validation and test); `none` any item. Columns: user, rank (1 = best),
item, score (indices); and user_raw, item_raw where the id maps exist. A user with fewer than K items
left gets fewer rows. An existing --out file is refused, never overwritten; the file is written under a
temporary name beside it and renamed into place when complete, so a kill leaves no half-written --out and
the same command runs again. A command line over `api.Run.recommend` (docs/using-a-run.md).
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

import api
from DataHandler import DataError
from Utils.files import atomic_write
from Utils.formats import read_id_lines
from Utils.cli import ArgumentParser, setup_logging
from Utils.errors import UsageError

log = logging.getLogger("diffmm")


def read_users(path: Path, run: api.Run, ids: str = "auto") -> np.ndarray:
    """The user indices of a file of one user per line: raw ids (`ids` 'raw', or 'auto' where the dataset has
    id maps) or indices ('index', or 'auto' without maps).

    Lines are split at "\\n" only, as the id maps are read, and raw ids are taken exactly as written (spaces and
    characters such as "\\r" inside an id included); only empty lines are skipped.
    """
    try:
        lines = [line for line in read_id_lines(path) if line]
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror or e}).") from None
    raw = ids == "raw" or (ids == "auto" and run.user_ids is not None)
    if raw:
        if run.user_ids is None:
            raise UsageError(f"--ids raw was given but the dataset of this run has no {api.USER_IDS}; give indices.")
        return run.user_index(np.array(lines, dtype=str))
    lines = [line.strip() for line in lines if line.strip()]
    try:
        users = np.array([int(line) for line in lines], dtype=np.int64)
    except ValueError as e:
        raise UsageError(f"cannot read {path} as one integer user index per line ({e}); the dataset has no id "
                         f"maps, so users are indices.") from None
    return run.user_index(users)


def recommend(run_dir: Path, k: int, out: Path, users_file: Optional[Path] = None, data_dir: Optional[str] = None,
              device: str = "auto", exclude: Optional[str] = "train", ids: str = "auto") -> int:
    """Write the CSV; returns the number of users written."""
    if out.exists():
        raise UsageError(f"{out} already exists; choose another --out (nothing is overwritten).")
    run = api.load(run_dir, device, data_dir)
    users = read_users(users_file, run, ids) if users_file else np.arange(run.n_users)
    raw = run.user_ids is not None and run.item_ids is not None
    batch = run.args.tstBat

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["user", "rank", "item", "score"] + (["user_raw", "item_raw"] if raw else []))
            for start in range(0, len(users), batch):  # batches of users: the CSV grows without holding every row
                top = run.recommend(users[start:start + batch], k, exclude, batch)
                n, width = top.item_index.shape
                keep = np.isfinite(top.scores.ravel())   # -inf: no item left for that rank
                columns = [np.repeat(top.user_index, width), np.tile(np.arange(1, width + 1), n),
                           top.item_index.ravel(), np.char.mod("%.6g", top.scores.ravel())]
                if raw:
                    columns += [np.repeat(top.users, width), top.items.ravel()]
                writer.writerows(zip(*(c[keep] for c in columns)))
        if out.exists():  # made by someone else while this ran: refused, as at the start, rather than replaced
            raise UsageError(f"{out} appeared while the recommendations were written; choose another --out "
                             f"(nothing is overwritten).")

    atomic_write(out, write, then="run the same command again")
    return len(users)


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run folder (holds best_model.pt)")
    p.add_argument("--k", default=20, type=int, help="items per user")
    p.add_argument("--out", required=True, type=Path, help="the CSV file to write (must not exist)")
    p.add_argument("--users", default=None, type=Path, help="one user per line (default: every user)")
    p.add_argument("--ids", default="auto", choices=["auto", "raw", "index"],
                   help="what --users holds: raw ids (auto: where the dataset has id maps) or indices")
    p.add_argument("--exclude", default="train", choices=["train", "all", "none"],
                   help="items never recommended to a user: their train items, all their known items, or none")
    p.add_argument("--data_dir", default=None, help="where the dataset folder is now, if it moved since the run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    setup_logging()
    if args.k < 1:
        log.error(f"error: --k must be at least 1, got {args.k}.")
        return 2
    exclude = None if args.exclude == "none" else args.exclude
    try:
        n = recommend(args.run_dir, args.k, args.out, args.users, args.data_dir, args.device, exclude, args.ids)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    log.info(f"wrote the top {args.k} items of {n} users to {args.out}")
    return 0


if __name__ == "__main__":
    from Utils.cli import exit_on_interrupt
    sys.exit(exit_on_interrupt(main))
