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
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

log = logging.getLogger("diffmm")

LAYOUTS = ("diffmm", "mmrec", "mmssl")
SPLIT_NAMES = ("train", "validation", "test")
RELEASED_DATA_HINT = ("the released TikTok/Baby/Sports files come from https://github.com/HKUDS/DiffMM (Datasets/, "
                      "Sports on the Google Drive link of its Datasets/README.md); see Datasets/README.md")
DIFFMM_FILES = ("trnMat", "valMat", "tstMat")
MMSSL_FILES = ("train.json", "val.json", "test.json")
Splits = Tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]


class DataError(Exception):
    """Bad input data: the message is one sentence saying what is wrong, where, and what to do."""


# What a pickled users x items matrix may name: scipy.sparse matrix classes and what numpy needs to
# rebuild their arrays. Anything else (a function that runs a command, say) is refused, unexecuted.
_SAFE_SPARSE = {"coo_matrix", "csr_matrix", "csc_matrix", "lil_matrix", "dok_matrix", "dia_matrix", "bsr_matrix",
                "coo_array", "csr_array", "csc_array", "lil_array", "dok_array", "dia_array", "bsr_array"}
_SAFE_NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy", "float32"), ("numpy", "float64"), ("numpy", "int32"),
               ("numpy", "int64")}


class UnsafePickle(Exception):
    """A pickle names a class outside the matrix whitelist."""


class _MatrixUnpickler(pickle.Unpickler):
    """Unpickle a scipy.sparse matrix only: every class a pickle names must be on the whitelist above.

    The released matrices name module paths that newer scipy/numpy moved (scipy.sparse.coo,
    numpy.core): they are mapped to the current ones.
    """

    def find_class(self, module: str, name: str):
        if module.startswith("scipy.sparse") and name in _SAFE_SPARSE:
            return getattr(sp, name)
        if (module, name) in _SAFE_NUMPY:
            if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
                module = module.replace("numpy.core", "numpy._core", 1)
            return super().find_class(module, name)
        raise UnsafePickle(f"{module}.{name}")


def load_matrix(path: Path) -> sp.csr_matrix:
    """Load one pickled split as a binary float32 CSR matrix (any stored non-zero = interacted)."""
    if not path.is_file():
        raise DataError(f"missing file {path}: {RELEASED_DATA_HINT}.")
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matrix = _MatrixUnpickler(f).load()
    except UnsafePickle as e:
        raise DataError(f"refused to load {path}: the pickle names {e}, which is not a scipy.sparse or numpy "
                        f"class, so it may run code; nothing in it was executed. Re-create the file with "
                        f"scipy.sparse.save_npz or get it from its source again.") from None
    except Exception as e:  # any unpickling failure means the file is not what we expect
        raise DataError(f"cannot read {path} as a pickled scipy.sparse matrix ({type(e).__name__}: {e}); "
                        f"re-download it ({RELEASED_DATA_HINT}).") from None
    if not (sp.issparse(matrix) or isinstance(matrix, np.ndarray)) or np.ndim(matrix) != 2:
        raise DataError(f"{path} holds a {type(matrix).__name__}, not a 2-D users x items matrix; "
                        f"it should be a pickled scipy.sparse matrix.")
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
    try:
        matrix = sp.load_npz(path)  # np.load without allow_pickle
    except Exception as e:
        raise DataError(f"cannot read {path} as a scipy.sparse .npz ({type(e).__name__}: {e}); write it with "
                          f"scipy.sparse.save_npz.") from None
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix = (matrix != 0).astype(np.float32)
    matrix.eliminate_zeros()
    return matrix.tocsr()


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

def write_dataset(folder: Path, splits: Splits, features: Dict[str, np.ndarray], layout: str) -> List[Path]:
    """Write the splits and `<modality>_feat.npy` files into a new folder in `layout`; returns the files.

    The folder must not hold files already (nothing a user wrote is overwritten).
    """
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} already exists and is not empty; choose a new folder (nothing is overwritten).")
    folder.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if layout == "diffmm":
        for stem, matrix in zip(DIFFMM_FILES, splits):
            path = folder / f"{stem}.pkl"
            with open(path, "wb") as f:  # the authors' code reads pickled COO matrices
                pickle.dump(sp.coo_matrix(matrix, dtype=np.float32), f)
            written.append(path)
    elif layout == "mmrec":
        path = folder / f"{folder.name}.inter"
        rows = [np.column_stack([*m.nonzero(), np.full(m.nnz, k)]) for k, m in enumerate(splits)]
        np.savetxt(path, np.concatenate(rows), fmt="%d", delimiter="\t", header="userID\titemID\tx_label",
                   comments="")
        written.append(path)
    elif layout == "mmssl":
        for name, matrix in zip(MMSSL_FILES, splits):
            path = folder / name
            matrix = sp.csr_matrix(matrix)
            # every user is a key (an empty list too), so that the user count survives the round trip
            lists = {str(u): matrix.indices[matrix.indptr[u]:matrix.indptr[u + 1]].tolist()
                     for u in range(matrix.shape[0])}
            path.write_text(json.dumps(lists))
            written.append(path)
    else:
        raise DataError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
    for modality, values in features.items():
        path = folder / f"{modality}_feat.npy"
        np.save(path, np.asarray(values, dtype=np.float32))
        written.append(path)
    return written
