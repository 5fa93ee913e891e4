"""Dataset layouts on disk: read any of them into three binary CSR splits, write any of them back.

| layout | split files | features |
|---|---|---|
| `diffmm` (the authors') | `trnMat.pkl`, `valMat.pkl`, `tstMat.pkl` (pickled scipy.sparse) or `trnMat.npz`, ... (`scipy.sparse.save_npz`) | `<modality>_feat.npy[.zip]` |
| `mmrec` | `<name>.inter`: tab-separated, a header naming `userID`, `itemID`, `x_label` (0 train, 1 validation, 2 test; other columns ignored) | the same |
| `mmssl` | `train.json`, `val.json`, `test.json`: {"user id": [item ids]} | the same |

Every reader checks what a later step would trip over and says it in one sentence (`DataError`):
ids out of range, counts that disagree between files, unknown split labels, an interaction both in
train and in a held-out split. Duplicate rows are harmless (each interaction counts once) and are
only reported with their count, as a warning. Pickles are unpickled through a whitelist: only
scipy.sparse and numpy classes (DataHandler.load_matrix).
"""
from __future__ import annotations

import csv
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from Utils.errors import DataError  # noqa: F401  (re-exported: the readers' refusal)
from Utils.files import staged_folder
from Utils.npy_files import BadArray, member_header, read_member
from Utils.safe_pickle import UnsafeMatrix, build_sparse, check_shape, loads_matrix

log = logging.getLogger("diffmm")

LAYOUTS = ("diffmm", "mmrec", "mmssl")
SPLIT_NAMES = ("train", "validation", "test")
RELEASED_DATA_HINT = ("the released TikTok/Baby/Sports files come from https://github.com/HKUDS/DiffMM (Datasets/, "
                      "Sports on the Google Drive link of its Datasets/README.md); see Datasets/README.md")
DIFFMM_FILES = ("trnMat", "valMat", "tstMat")
MMSSL_FILES = ("train.json", "val.json", "test.json")
Splits = Tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]




def load_matrix(path: Path) -> sp.csr_matrix:
    """Load one pickled split as a binary float32 CSR matrix (any stored non-zero = interacted).

    The pickle is read by `Utils.safe_pickle`, which builds numbers only: nothing the file names is executed
    or handed to numpy's or scipy's own unpickling, and its shape is bounded by the entries it stores.
    """
    if not path.is_file():
        raise DataError(f"missing file {path}: {RELEASED_DATA_HINT}.")
    try:
        matrix = loads_matrix(path.read_bytes())
    except UnsafeMatrix as e:
        raise DataError(f"refused to load {path} ({e}); nothing in it was executed. Re-create the file with "
                        f"scipy.sparse.save_npz, or get it from its source again ({RELEASED_DATA_HINT}).") from None
    except (OSError, MemoryError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); check the file and the free memory.") from None
    return binary(matrix)


def binary(matrix: sp.spmatrix) -> sp.csr_matrix:
    """A users x items matrix as binary float32 CSR: duplicates summed, any non-zero = interacted."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix = (matrix != 0).astype(np.float32)
    matrix.eliminate_zeros()
    return matrix.tocsr()


def detect_layout(folder: Path) -> str:
    """The layout of a dataset folder from the files present (the first that matches, in LAYOUTS order)."""
    if any((folder / f"trnMat{ext}").is_file() for ext in (".pkl", ".npz")):
        return "diffmm"
    if (folder / f"{folder.name}.inter").is_file():
        return "mmrec"
    if (folder / "train.json").is_file():
        return "mmssl"
    raise DataError(f"{folder} holds no dataset in a known layout: expected trnMat.pkl or trnMat.npz "
                      f"(DiffMM), {folder.name}.inter (MMRec) or train.json (MMSSL); see Datasets/README.md.")


def read_splits(folder: Path, layout: str, n_items_hint: Optional[int] = None) -> Splits:
    """The train, validation and test matrices of a dataset folder in `layout`.

    `n_items_hint`: the rows of the feature files, which fix the item count of the id-list layouts
    (an item id beyond it is an error; items without interactions are allowed).
    """
    if layout == "diffmm":
        paths = [folder / f"{stem}.npz" if (folder / f"{stem}.npz").is_file() else folder / f"{stem}.pkl"
                 for stem in DIFFMM_FILES]
        splits = tuple(_load_npz(p) if p.suffix == ".npz" else load_matrix(p) for p in paths)
        for path, matrix in zip(paths[1:], splits[1:]):
            if matrix.shape != splits[0].shape:
                raise DataError(f"{path} has shape {matrix.shape} but {paths[0].name} has {splits[0].shape}; "
                                f"all three splits must be users x items of the same size.")
        check_disjoint(splits, [str(p) for p in paths])
        return splits  # type: ignore[return-value]
    if layout == "mmrec":
        inter = folder / f"{folder.name}.inter"
        users, items, labels = _read_inter(inter)
        sources = [f"{inter} (x_label {k})" for k in range(3)]
    elif layout == "mmssl":
        parts = [_read_json_lists(folder / name) for name in MMSSL_FILES]
        users = np.concatenate([p[0] for p in parts])
        items = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([np.full(len(p[0]), k) for k, p in enumerate(parts)])
        sources = [str(folder / name) for name in MMSSL_FILES]
        return splits_from_triples(users, items, labels, sources, n_items_hint, n_users=max(p[2] for p in parts))
    else:
        raise DataError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)} or auto.")
    return splits_from_triples(users, items, labels, sources, n_items_hint)


def splits_from_triples(users: np.ndarray, items: np.ndarray, labels: np.ndarray, sources: Sequence[str],
                        n_items: Optional[int] = None, n_users: Optional[int] = None) -> Splits:
    """Three binary CSR matrices from (user, item, split label) rows, checked (see the module).

    `sources` names where the train, validation and test rows come from, for the messages.
    """
    where = sources[0] if len(set(sources)) == 1 else ", ".join(dict.fromkeys(s.split(" (")[0] for s in sources))
    if len(users) == 0:
        raise DataError(f"{where} holds no interaction.")
    if users.min() < 0 or items.min() < 0:
        raise DataError(f"{where} has negative ids (user {users.min()}, item {items.min()}); ids must be 0, 1, 2, ...")
    bad = ~np.isin(labels, (0, 1, 2))
    if bad.any():
        raise DataError(f"{where} has {int(bad.sum())} rows with a split label other than 0 (train), 1 "
                          f"(validation) or 2 (test), e.g. {labels[bad][0]}; relabel them.")
    n_users = max(int(users.max()) + 1, n_users or 0)
    try:  # before any users x items structure is allocated: ids the stored rows cannot justify are refused
        check_shape((n_users, n_items if n_items is not None else int(items.max()) + 1), len(users), "it")
    except UnsafeMatrix as e:
        raise DataError(f"{where}: {e}; ids must be 0, 1, 2, ... without large gaps (`python prepare.py raw` "
                        f"remaps raw ids).") from None
    if n_items is not None and items.max() >= n_items:
        raise DataError(f"{where} has item id {int(items.max())}, but the feature files have {n_items} rows "
                          f"(ids 0..{n_items - 1}); the item counts disagree: row i of a feature file must be item i.")
    n_items = n_items if n_items is not None else int(items.max()) + 1
    keys = users.astype(np.int64) * n_items + items
    unique_rows = np.unique(np.stack([keys, labels]), axis=1).shape[1]
    if unique_rows < len(keys):
        log.warning(f"warning: {where} has {len(keys) - unique_rows} duplicate rows; each interaction counts once")
    splits = tuple(_binary_csr(users[labels == k], items[labels == k], (n_users, n_items)) for k in range(3))
    check_disjoint(splits, sources)
    return splits  # type: ignore[return-value]


def check_disjoint(splits: Splits, sources: Sequence[str]) -> None:
    """Each held-out split is non-empty, and disjoint from train: an interaction in train and in a
    held-out split can never be recommended (train items are excluded from the ranking), so it
    silently lowers the metrics. `sources` names where each split comes from, for the messages."""
    train = splits[0]
    for _name, source, heldout in zip(SPLIT_NAMES[1:], sources[1:], splits[1:]):
        both = train.multiply(heldout).nnz
        if both:
            raise DataError(f"{source} has {both} interactions that are also in train ({sources[0]}); a held-out "
                            f"interaction must not be in train (remove them from one of the two).")
    if splits[2].nnz == 0:
        raise DataError(f"{sources[2]} holds no test interaction, so there is nothing to evaluate on.")
    if splits[1].nnz == 0:
        raise DataError(f"{sources[1]} holds no validation interaction, so the validation protocol cannot select "
                        f"an epoch; put held-out interactions in it.")


def _binary_csr(users: np.ndarray, items: np.ndarray, shape: Tuple[int, int]) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _load_npz(path: Path) -> sp.csr_matrix:
    """A `scipy.sparse.save_npz` file, read as `Utils.safe_pickle` reads a pickle: the shape and every array's
    header first (bounded by the entries stored and by what the zip's bytes can expand to), then the arrays,
    checked before scipy makes a matrix of them."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
            layout = read_member(archive, "format.npy", label=True).tobytes().decode("ascii", "replace").strip("\x00") \
                if "format" in names else ""
            if layout not in ("coo", "csr", "csc") or "shape" not in names or "data" not in names:
                raise BadArray(f"no coo/csr/csc matrix in it (format {layout or 'missing'})")
            shape_array = read_member(archive, "shape.npy") if member_header(archive, "shape.npy")[0] == (2,) \
                else np.zeros(0)
            if shape_array.shape != (2,) or shape_array.dtype.kind not in "iu":
                raise BadArray("its shape is not two integers")
            shape = (int(shape_array[0]), int(shape_array[1]))
            entries = member_header(archive, "data.npy")[0]
            if len(entries) != 1:
                raise BadArray("its data is not a 1-D array")
            check_shape(shape, entries[0])
            keys = ("row", "col") if layout == "coo" else ("indices", "indptr")
            state = {"_shape": shape, "data": None}
            for key in ("data", *keys):
                if key not in names:
                    raise BadArray(f"its {layout} matrix has no {key} array")
                header_shape = member_header(archive, f"{key}.npy")[0]
                expected = shape[0 if layout == "csr" else 1] + 1 if key == "indptr" else entries[0]
                if header_shape != (expected,):
                    raise BadArray(f"its {key} array has shape {header_shape}, where ({expected},) is needed")
                state[key] = read_member(archive, f"{key}.npy")
    except (BadArray, UnsafeMatrix) as e:
        raise DataError(f"refused to load {path} ({e}); write it with scipy.sparse.save_npz.") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, MemoryError) as e:
        raise DataError(f"cannot read {path} as a scipy.sparse .npz ({type(e).__name__}: {e}); write it with "
                        f"scipy.sparse.save_npz.") from None
    try:
        return binary(build_sparse(layout, state))
    except UnsafeMatrix as e:
        raise DataError(f"refused to load {path} ({e}); write it with scipy.sparse.save_npz.") from None


def _read_inter(path: Path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MMRec's `.inter`: tab-separated with a header; the columns userID, itemID and x_label are used."""
    with open(path, newline="") as f:
        header = next(csv.reader(f, delimiter="\t"), [])
    needed = ("userID", "itemID", "x_label")
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)} in its header ({', '.join(header) or 'empty'}); "
                          f"MMRec's .inter is tab-separated with a header naming userID, itemID and x_label.")
    try:
        table = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=[header.index(c) for c in needed],
                           dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path} has a userID, itemID or x_label that is not an integer ({e}); prepare raw ids "
                          f"with `python prepare.py raw`.") from None
    return table[:, 0], table[:, 1], table[:, 2]


def _read_json_lists(path: Path) -> Tuple[np.ndarray, np.ndarray, int]:
    """MMSSL's {"user id": [item ids]} as (users, items) arrays and the user count its keys imply."""
    if not path.is_file():
        raise DataError(f"missing file {path}: MMSSL's layout has train.json, val.json and test.json.")
    try:
        lists = json.loads(path.read_text())
        users = np.concatenate([np.full(len(v), int(k), dtype=np.int64) for k, v in lists.items()] or [[]])
        items = np.concatenate([np.asarray(v, dtype=np.int64) for v in lists.values()] or [[]])
        n_users = max((int(k) + 1 for k in lists), default=0)
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a JSON object of user id -> list of integer item ids ({e}).") from None
    return users.astype(np.int64), items.astype(np.int64), n_users


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

USER_IDS = "user_ids.txt"   # the id maps of a dataset folder (`prepare.py raw`): line i = the raw id of index i
ITEM_IDS = "item_ids.txt"


def write_dataset(folder: Path, splits: Splits, features: Dict[str, np.ndarray], layout: str,
                  extra: Optional[Callable[[Path], None]] = None,
                  then: str = "run the same command again") -> List[Path]:
    """Write the splits and `<modality>_feat.npy` files as a new folder in `layout`; returns the files.

    The folder must not exist or be empty (nothing a user wrote is overwritten). It is written whole beside
    its final name and renamed into place when complete (`Utils.files.staged_folder`), so that a kill leaves no
    half-written folder for the next run to refuse; `extra(staging)` writes further files (the id maps) into it
    before it appears. `then` ends the one-sentence error when the folder cannot be written.
    """
    folder = Path(folder)
    _refuse_existing(folder)
    names: List[str] = []
    with staged_folder(folder, then) as staging:
        if layout == "diffmm":
            for stem, matrix in zip(DIFFMM_FILES, splits):
                with open(staging / f"{stem}.pkl", "wb") as f:  # the authors' code reads pickled COO matrices
                    pickle.dump(sp.coo_matrix(matrix, dtype=np.float32), f)
                names.append(f"{stem}.pkl")
        elif layout == "mmrec":
            name = f"{folder.name}.inter"  # MMRec names the file after the final folder, not the staging one
            rows = [np.column_stack([*m.nonzero(), np.full(m.nnz, k)]) for k, m in enumerate(splits)]
            np.savetxt(staging / name, np.concatenate(rows), fmt="%d", delimiter="\t",
                       header="userID\titemID\tx_label", comments="")
            names.append(name)
        elif layout == "mmssl":
            for name, matrix in zip(MMSSL_FILES, splits):
                matrix = sp.csr_matrix(matrix)
                # every user is a key (an empty list too), so that the user count survives the round trip
                lists = {str(u): matrix.indices[matrix.indptr[u]:matrix.indptr[u + 1]].tolist()
                         for u in range(matrix.shape[0])}
                (staging / name).write_text(json.dumps(lists), encoding="utf-8")
                names.append(name)
        else:
            raise DataError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
        for modality, values in features.items():
            np.save(staging / f"{modality}_feat.npy", np.asarray(values, dtype=np.float32))
            names.append(f"{modality}_feat.npy")
        if extra is not None:
            extra(staging)
        # checked again at the end: a folder someone filled while this one was written is refused, not replaced
        _refuse_existing(folder)
    return [folder / name for name in names]


def _refuse_existing(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder} already exists and is not empty; choose a new folder (nothing is overwritten).")


def id_map_bytes(ids: Sequence[str], name: str) -> bytes:
    """The bytes of an id map: UTF-8, each id followed by "\\n", which no id may contain.

    Any other character, line separators such as "\\r", "\\x1c" or "\\u2028" included, reads back unchanged
    with `read_id_lines`; only a map whose every id ends with "\\r" cannot be told from a file saved with
    Windows line ends, so it is refused (`name` is the file, for the message).
    """
    ids = [str(i) for i in ids]
    bad = next((i for i in ids if "\n" in i), None)
    if bad is not None:
        raise DataError(f"the id {bad!r} contains a line break, which {name} (one id per line) cannot hold; remove "
                        f"line breaks from the raw ids.")
    if ids and all(i.endswith("\r") for i in ids):
        raise DataError(f"every id of {name} ends with a carriage return (e.g. {ids[0]!r}), which would read back as "
                        f"Windows line ends; remove the trailing \\r from the raw ids.")
    return "".join(f"{i}\n" for i in ids).encode("utf-8")


def write_id_map(path: Path, ids: Sequence[str]) -> None:
    """Write an id map (line i = the raw id of index i) into a folder being staged (`write_dataset`'s `extra`)."""
    Path(path).write_bytes(id_map_bytes(ids, Path(path).name))


def read_id_lines(path: Path) -> List[str]:
    """The lines of an id map or id list exactly as written by `write_id_map`: UTF-8, split at "\\n" only.

    Read as bytes and split at "\\n" alone because raw ids may hold any other character: text mode turns a
    "\\r" inside an id into a line end, and `str.splitlines` also splits at "\\x1c", "\\x85", "\\u2028" and the
    like. A file whose every line ends with "\\r" was saved with Windows line ends, which are removed.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, one id per "
                        f"line.") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the line end of the last id
    if lines and all(line.endswith("\r") for line in lines):
        lines = [line[:-1] for line in lines]
    return lines
