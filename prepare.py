"""Turn your own data into a dataset folder, or convert a dataset folder from one layout to another.

    # a raw interaction table (CSV/TSV with a header; any id strings) and per-modality features
    python prepare.py raw --interactions ratings.csv --features image=img.npy:img_ids.txt text=text.csv \
        --out Datasets/mydata --min_user 5 --min_item 5 --split random --seed 999 --layout diffmm

    # any supported layout to any other (diffmm, mmrec, mmssl; Utils/formats.py)
    python prepare.py convert --data tiktok --data_dir ../shared/datasets --to mmrec --out Datasets/tiktok_mmrec

    # your item texts and images to text_feat.npy / image_feat.npy of a folder written by `raw` (docs/features.md)
    python prepare.py features --data mydata --items items.csv --text_cols title,description --images images/

`raw`: duplicates (user, item) are kept once (the earliest when there is a timestamp); interactions
of items without features in every given modality are dropped (`--missing_features zero` keeps them
with zero features instead); then the k-core filter keeps users with at least `--min_user` and items
with at least `--min_item` interactions, repeated until both hold; ids are remapped to 0, 1, ... in
the order of the raw ids (the maps are written as `user_ids.txt` and `item_ids.txt`, line i = the raw
id of id i); then each user's interactions are split. `--split random` is MMRec's per-user split
(its preprocessing notebook): a user with n interactions gives 2 of them (n < 10) or ⌊0.2 n⌋ to
validation and test, validation taking half of them rounded down, in a random order seeded by
`--seed`; a user with 2 interactions gives 1 to test, with 1 keeps it in train. `--split temporal`
keeps the same counts but holds out each user's latest interactions (validation before test).

Raw ids may be any string but an empty one or one holding a line break or NUL (refused, naming the column
and row); the id maps are UTF-8, one id per line, read back by splitting at "\\n" only, so every other
character (separators such as "\\r", "\\x1c" or "\\u2028" included) comes back unchanged. Every output folder
(`raw`, `convert`, `features --missing_features drop`) is written in a hidden folder beside `--out` and renamed
into place when complete: after a kill there is no `--out`, and the same command runs again.

Feature files: `NAME=FILE.npy:IDS` (rows of FILE.npy, IDS a text file with one raw item id per line
or a numeric .npy), or `NAME=FILE.csv` (first column the raw item id, then the values; a header row is
skipped when its values are not numbers). Nothing read is ever executed: .npy files are read without
pickle support.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import Utils.openmp  # noqa: F401  (before torch loads: the OpenMP wait policy, for the features encoders)
from DataHandler import feature_files, load_features
from Utils.formats import (ITEM_IDS, LAYOUTS, USER_IDS, DataError, detect_layout, read_id_lines, read_splits,
                           splits_from_triples, write_dataset, write_id_map)
from Utils import encoders
from Utils.cli import setup_logging
from Utils.device import parse_threads
from Utils.errors import UsageError

log = logging.getLogger("diffmm")


# ---------------------------------------------------------------------------------------------
# Reading raw files
# ---------------------------------------------------------------------------------------------

def read_interactions(path: Path, user_col: str, item_col: str, time_col: Optional[str]
                      ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(raw user ids, raw item ids, timestamps or None) of a CSV/TSV table with a header row."""
    if not path.is_file():
        raise DataError(f"missing file {path}: pass the interaction table with --interactions.")
    with open(path, newline="") as f:
        sample = f.read(65536)
        f.seek(0)
        delimiter = "\t" if path.suffix in (".tsv", ".inter") or sample.count("\t") > sample.count(",") else ","
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, [])
        for column in (user_col, item_col) + ((time_col,) if time_col else ()):
            if column not in header:
                raise DataError(f"{path} has no column {column!r} in its header ({', '.join(header) or 'empty'}); "
                                f"name the columns with --user_col, --item_col and --time_col.")
        cols = [header.index(user_col), header.index(item_col)] + ([header.index(time_col)] if time_col else [])
        try:
            rows = [[row[c] for c in cols] for row in reader if row]
        except IndexError:
            raise DataError(f"{path}: line {reader.line_num} has fewer cells than the header ({len(header)}); give "
                            f"every row a cell for each column.") from None
    if not rows:
        raise DataError(f"{path} holds no interaction below its header.")
    for j, column in enumerate((user_col, item_col)):
        _check_ids([row[j] for row in rows], column, path)
    table = np.array(rows, dtype=str)
    times = None
    if time_col:
        try:
            times = table[:, 2].astype(np.float64)
        except ValueError:
            raise DataError(f"{path}: the column {time_col!r} holds values that are not numbers (e.g. "
                            f"{table[0, 2]!r}); give timestamps as numbers (seconds).") from None
    return table[:, 0], table[:, 1], times


def _check_ids(ids: List[str], column: str, path: Path) -> None:
    """Refuse the raw ids the id maps could not give back unchanged (one id per line, read by
    `Utils.formats.read_id_lines`): an empty id, one holding a line break, or one holding a NUL character
    (numpy's strings drop trailing NULs, so 'a' and 'a\\0' would merge into one user or item)."""
    joined = "".join(ids)  # found at C speed; the row is looked for only when there is one
    for problem, found, test in (("is empty", "" in ids, lambda i: i == ""),
                                 ("contains a line break", "\n" in joined, lambda i: "\n" in i),
                                 ("contains a NUL character", "\0" in joined, lambda i: "\0" in i)):
        if found:
            row = next(k for k, i in enumerate(ids, 1) if test(i))
            raise DataError(f"{path}: the {column!r} id on data row {row} ({ids[row - 1]!r}) {problem}, which the id "
                            f"maps (one id per line) cannot hold; fix or remove the rows with such ids.")
    if all(i.endswith("\r") for i in ids):
        raise DataError(f"{path}: every {column!r} id ends with a carriage return (e.g. {ids[0]!r} on data row 1), "
                        f"which would read back as Windows line ends of the id maps; remove the trailing \\r.")


def read_feature_spec(spec: str) -> Tuple[str, np.ndarray, np.ndarray]:
    """'image=img.npy:ids.txt' or 'text=text.csv' -> (modality, raw item ids, features)."""
    name, sep, files = spec.partition("=")
    if not sep or not name or not files:
        raise DataError(f"--features {spec!r} is not NAME=FILE.npy:IDS or NAME=FILE.csv.")
    if files.endswith(".csv") or files.endswith(".tsv"):
        path = Path(files)
        if not path.is_file():
            raise DataError(f"missing feature file {path} (from --features {spec}).")
        delimiter = "\t" if path.suffix == ".tsv" else ","
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f, delimiter=delimiter) if row]
        if rows and not _numbers(rows[0][1:]):
            rows = rows[1:]  # a header
        try:
            values = np.array([row[1:] for row in rows], dtype=np.float32)
        except ValueError:
            raise DataError(f"{path} must hold one row per item: its raw id, then numbers (rows of different "
                            f"lengths or non-numbers found).") from None
        return name, np.array([row[0] for row in rows], dtype=str), values
    array_file, sep, id_file = files.partition(":")
    if not sep:
        raise DataError(f"--features {spec!r}: an .npy file needs its item ids, as {name}={array_file}:IDS "
                        f"(a text file with one raw item id per line).")
    values = load_features(Path(array_file), None)
    ids_path = Path(id_file)
    if not ids_path.is_file():
        raise DataError(f"missing item id file {ids_path} (from --features {spec}).")
    # a text file is read as the id maps are (split at "\n" only), so that the ids of item_ids.txt match exactly
    ids = (np.load(ids_path, allow_pickle=False).astype(str) if ids_path.suffix == ".npy"
           else np.array(read_id_lines(ids_path), dtype=str))
    ids = ids[ids != ""] if ids_path.suffix != ".npy" else ids
    if len(ids) != len(values):
        raise DataError(f"{ids_path} lists {len(ids)} item ids but {array_file} has {len(values)} rows; "
                        f"line i must be the raw id of row i.")
    return name, ids, values


def _numbers(cells: Sequence[str]) -> bool:
    try:
        [float(c) for c in cells]
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Filtering, remapping, splitting (all vectorised)
# ---------------------------------------------------------------------------------------------

def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Mask of the rows kept by the iterated k-core filter (user degree >= min_user, item >= min_item)."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_deg = np.bincount(users[keep], minlength=users.max() + 1)
        item_deg = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (user_deg[users] >= min_user) & (item_deg[items] >= min_item)
        if new.sum() == keep.sum():
            return new
        keep = new


def split_labels(users: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """0/1/2 (train/validation/test) per row: per user, the rows ordered by `order_key`, the last ones
    held out (MMRec's counts, see the module), validation before test."""
    order = np.lexsort((order_key, users))
    sorted_users = users[order]
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(users)) - starts[sorted_users]
    n = counts[sorted_users]
    heldout = np.where(n < 10, 2, np.floor(0.2 * n).astype(np.int64))
    heldout = np.where(n <= 2, n - 1, heldout)
    n_val = heldout // 2
    n_train = n - heldout
    labels_sorted = np.where(rank < n_train, 0, np.where(rank < n_train + n_val, 1, 2))
    labels = np.empty(len(users), dtype=np.int64)
    labels[order] = labels_sorted
    return labels


def prepare_raw(args: argparse.Namespace) -> Dict[str, object]:
    """The `raw` command: read, drop items without features, dedupe, k-core, remap, split, write."""
    raw_users, raw_items, times = read_interactions(Path(args.interactions), args.user_col, args.item_col,
                                                    args.time_col)
    n_rows = len(raw_users)
    features = [read_feature_spec(spec) for spec in args.features]
    report: Dict[str, object] = {"rows": n_rows}

    keep = np.ones(n_rows, dtype=bool)
    if features and args.missing_features == "drop":
        for name, ids, _ in features:
            has = np.isin(raw_items, ids)
            report[f"rows of items without {name} features (dropped)"] = int((keep & ~has).sum())
            keep &= has
    item_codes, item_index = np.unique(raw_items[keep], return_inverse=True)
    user_codes, user_index = np.unique(raw_users[keep], return_inverse=True)
    stamp = times[keep] if times is not None else np.arange(keep.sum(), dtype=np.float64)

    # one row per (user, item): the earliest
    order = np.lexsort((stamp, item_index, user_index))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (np.diff(user_index[order]) != 0) | (np.diff(item_index[order]) != 0)
    rows = order[first]
    report["duplicate rows (kept once)"] = int(len(order) - len(rows))
    users, items, stamp = user_index[rows], item_index[rows], stamp[rows]

    core = k_core(users, items, args.min_user, args.min_item)
    report["rows removed by the k-core filter"] = int((~core).sum())
    users, items, stamp = users[core], items[core], stamp[core]
    if len(users) == 0:
        raise DataError(f"no interaction is left after the {args.min_user}/{args.min_item}-core filter; lower "
                        f"--min_user / --min_item.")
    user_ids, users = np.unique(users, return_inverse=True)
    item_ids, items = np.unique(items, return_inverse=True)
    raw_user_ids, raw_item_ids = user_codes[user_ids], item_codes[item_ids]

    key = stamp if args.split == "temporal" else np.random.default_rng(args.seed).random(len(users))
    labels = split_labels(users, key)
    splits = splits_from_triples(users, items, labels, [str(args.interactions)] * 3,
                                 n_items=len(item_ids), n_users=len(user_ids))
    modal = {}
    for name, ids, values in features:
        sorter = np.argsort(ids)
        row = sorter[np.clip(np.searchsorted(ids, raw_item_ids, sorter=sorter), 0, len(ids) - 1)]
        has = ids[row] == raw_item_ids
        matrix = np.zeros((len(item_ids), values.shape[1]), dtype=np.float32)
        matrix[has] = values[row[has]]
        report[f"items without {name} features (zero rows)"] = int((~has).sum())
        modal[name] = matrix
    out = Path(args.out)

    def id_maps(staging: Path) -> None:
        write_id_map(staging / USER_IDS, raw_user_ids.tolist())
        write_id_map(staging / ITEM_IDS, raw_item_ids.tolist())

    write_dataset(out, splits, modal, args.layout, extra=id_maps)  # the folder appears whole, id maps included
    report.update({"users": len(user_ids), "items": len(item_ids), "train": splits[0].nnz, "validation":
                   splits[1].nnz, "test": splits[2].nnz, "layout": args.layout, "folder": str(out)})
    return report


def convert(args: argparse.Namespace) -> Dict[str, object]:
    """The `convert` command: a dataset folder in any layout to a new folder in `--to`."""
    folder = Path(args.data_dir) / args.data
    if not folder.is_dir():
        raise DataError(f"there is no dataset folder {folder}; pass --data and --data_dir.")
    layout = detect_layout(folder) if args.format == "auto" else args.format
    files = feature_files(folder)
    features = {m: load_features(path, None) for m, path in files.items()}
    n_items = next(iter(features.values())).shape[0] if features and layout != "diffmm" else None
    splits = read_splits(folder, layout, n_items)
    if args.to == "mmrec":
        rows = np.diff(sum(s for s in splits).tocsr().indptr)
        if (rows == 0).any():
            log.warning(f"warning: {int((rows == 0).sum())} users have no interaction in any split; MMRec's .inter "
                        f"cannot hold them, so the converted dataset has fewer users when they are the last ids")
    out = Path(args.out)
    id_maps = {name: (folder / name).read_bytes() for name in (USER_IDS, ITEM_IDS) if (folder / name).is_file()}

    def copy_id_maps(staging: Path) -> None:
        for name, data in id_maps.items():
            (staging / name).write_bytes(data)  # byte for byte: the ids may hold any character but "\n"

    write_dataset(out, splits, features, args.to, extra=copy_id_maps)
    return {"from": f"{folder} ({layout})", "to": f"{out} ({args.to})", "users": splits[0].shape[0],
            "items": splits[0].shape[1], "train": splits[0].nnz, "validation": splits[1].nnz, "test": splits[2].nnz,
            "modalities": list(features)}


# `prepare.py raw --help`'s example, run as written by tests/test_formats.py (in a folder holding these files)
RAW_EXAMPLE = ("example (ratings.csv: user,item,timestamp; img.npy: one row per line of img_ids.txt;\n"
               "text.csv: the item id, then the values):\n"
               "  python prepare.py raw --interactions ratings.csv --features image=img.npy:img_ids.txt "
               "text=text.csv \\\n"
               "      --out Datasets/mydata --min_user 5 --min_item 5 --split random --seed 999 --layout diffmm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    raw = commands.add_parser(
        "raw", formatter_class=_HelpFormatter, help="a raw interaction table and feature files to a dataset folder",
        description="A raw interaction table (CSV/TSV with a header; any id strings) and per-modality feature\n"
                    "files keyed by raw item id to a new dataset folder: duplicates kept once, items without\n"
                    "features dropped (or zero rows), a k-core filter, ids remapped (user_ids.txt, item_ids.txt),\n"
                    "a per-user split. `python prepare.py --help` says each step in full.",
        epilog=RAW_EXAMPLE)
    raw.add_argument("--interactions", required=True, help="CSV/TSV with a header: user, item[, timestamp]")
    raw.add_argument("--user_col", default="user", help="the user column of the header")
    raw.add_argument("--item_col", default="item", help="the item column of the header")
    raw.add_argument("--time_col", default=None, help="the timestamp column (needed by --split temporal)")
    raw.add_argument("--features", nargs="*", default=[], help="NAME=FILE.npy:IDS or NAME=FILE.csv, per modality")
    raw.add_argument("--missing_features", default="drop", choices=["drop", "zero"],
                     help="interactions of items without features: drop them, or keep the items with zero rows")
    raw.add_argument("--min_user", default=5, type=int, help="k-core: fewest interactions of a kept user")
    raw.add_argument("--min_item", default=5, type=int, help="k-core: fewest interactions of a kept item")
    raw.add_argument("--split", default="random", choices=["random", "temporal"], help="per-user 8:1:1 split")
    raw.add_argument("--seed", default=999, type=int, help="seed of the random split (MMRec's is 999)")
    raw.add_argument("--layout", default="diffmm", choices=LAYOUTS, help="layout of the written folder")
    raw.add_argument("--out", required=True, help="the new dataset folder (must not hold files)")
    conv = commands.add_parser(
        "convert", formatter_class=_HelpFormatter, help="a dataset folder in one layout to a new folder in another",
        epilog="example:\n  python prepare.py convert --data tiktok --data_dir Datasets --to mmrec "
               "--out Datasets/tiktok_mmrec")
    conv.add_argument("--data", required=True, help="dataset folder name under --data_dir")
    conv.add_argument("--data_dir", default="Datasets", help="folder holding the dataset folder")
    conv.add_argument("--format", default="auto", choices=("auto",) + LAYOUTS, help="layout of the input")
    conv.add_argument("--to", required=True, choices=LAYOUTS, help="layout of the output")
    conv.add_argument("--out", required=True, help="the new dataset folder (must not hold files)")
    add_features_parser(commands)
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default (left out where it is None or False) and the description/epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def add_features_parser(commands: argparse._SubParsersAction) -> None:
    """`features`: item texts and/or images to <modality>_feat.npy files (Utils/encoders.py, docs/features.md)."""
    f = commands.add_parser(
        "features", formatter_class=_HelpFormatter,
        help="encode item texts (Sentence-BERT) and/or images (a CNN) into feature files of a dataset folder",
        description="Encode your item texts and/or images into text_feat.npy / image_feat.npy of a dataset folder "
                    "written by `prepare.py raw` (rows in the order of its item_ids.txt). Chunks are kept in a work "
                    "folder beside the output, so a rerun after an interruption encodes only what is left; the "
                    "feature file appears only when complete. See docs/features.md.",
        epilog="example:\n  python prepare.py features --data mydata --items items.csv --id_col item_id \\\n"
               "      --text_cols title,description --images images/ --device auto --dtype float16\n"
               "  python prepare.py features --data mydata --images images/ --image_model resnet50 \\\n"
               "      --missing_features drop --out Datasets/mydata_with_images")
    f.add_argument("--data", required=True, help="dataset folder name under --data_dir (it must hold item_ids.txt)")
    f.add_argument("--data_dir", default="Datasets", help="folder holding the dataset folder")
    f.add_argument("--items", default=None, help="item table, CSV/TSV with a header: an id column and text columns "
                                                   "-> text_feat.npy")
    f.add_argument("--id_col", default="item", help="the item id column of --items (raw ids, as in item_ids.txt)")
    f.add_argument("--text_cols", default=None, type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="comma-separated text columns of --items, joined with spaces (default: every column but "
                        "--id_col)")
    f.add_argument("--images", default=None, help="folder of item images named <raw item id>.jpg|.png|... "
                                                    "-> image_feat.npy")
    f.add_argument("--text_model", default=encoders.DEFAULT_TEXT_MODEL,
                   help="sentence-transformers model name or local folder (the released Baby/Sports text: "
                        "stsb-roberta-large, 1024-d)")
    f.add_argument("--image_model", default=encoders.DEFAULT_IMAGE_MODEL,
                   help="hf:<id> or a local folder: a Hugging Face transformers model, its pooled output (the "
                        "default: an ImageNet ResNet-50, 2048-d; needs only requirements-encoders.txt); or a "
                        "torchvision architecture, its penultimate layer (alexnet: fc7, 4096-d, as the Amazon image "
                        "features; resnet50: 2048-d; needs torchvision built for your torch, docs/features.md)")
    f.add_argument("--image_weights", default="default",
                   help="torchvision models only: default, a name (IMAGENET1K_V1), a state_dict file, or none "
                        "(random, for tests)")
    f.add_argument("--image_size", default=None, type=int,
                   help="torchvision models only: crop size of the images (default: the weights' own "
                        "preprocessing, 224); a transformers model uses its image processor's")
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the encoders run")
    f.add_argument("--batch_size", default=64, type=int, help="items per forward pass")
    f.add_argument("--chunk_size", default=2048, type=int, help="items per saved chunk (the unit of resuming)")
    f.add_argument("--threads", default="auto", type=parse_threads, metavar="auto|N", help="CPU threads of torch")
    f.add_argument("--workers", default=4, type=int, help="threads decoding images")
    f.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype of the written files")
    f.add_argument("--missing_features", default="zero", choices=list(encoders.MISSING_CHOICES),
                   help="items without text/image: zero rows (as `raw --missing_features zero`), the mean row "
                        "(LATTICE's choice for images), or drop them into a new dataset folder --out (as `raw`'s "
                        "drop)")
    f.add_argument("--out", default=None, help="the new dataset folder of --missing_features drop")
    f.add_argument("--overwrite", action="store_true", help="replace existing <modality>_feat.npy files")
    f.add_argument("--quiet", action="store_true", help="no progress bar")


def features(args: argparse.Namespace) -> Dict[str, object]:
    """The `features` command: the flags as a FeatureRequest for Utils/encoders.py."""
    return encoders.build_features(encoders.FeatureRequest(
        folder=Path(args.data_dir) / args.data, items=Path(args.items) if args.items else None, id_col=args.id_col,
        text_cols=args.text_cols, images=Path(args.images) if args.images else None, text_model=args.text_model,
        image_model=args.image_model, image_weights=args.image_weights, image_size=args.image_size,
        device=args.device, batch_size=args.batch_size, chunk_size=args.chunk_size, threads=args.threads,
        workers=args.workers, dtype=args.dtype, missing_features=args.missing_features,
        out=Path(args.out) if args.out else None, overwrite=args.overwrite, progress=not args.quiet))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "raw" and args.split == "temporal" and not args.time_col:
        log.error("error: --split temporal needs the timestamp column (--time_col NAME).")
        return 2
    try:
        report = {"raw": prepare_raw, "convert": convert, "features": features}[args.command](args)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        if args.command != "features":
            raise
        log.error("interrupted: the finished chunks are kept; run the same command again to encode the rest.")
        return 130
    for key, value in report.items():
        log.info(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
