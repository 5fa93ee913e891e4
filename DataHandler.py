"""Files to arrays: the split matrices, the modality features, user rows, batches and negatives.

The graphs built from these arrays are in `Utils/graphs.py`. Nothing here ever builds a dense users x items
matrix: the train matrix stays CSR and user rows are densified one batch at a time (`dense_rows` on the host,
`DeviceRows` on the device).
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from Utils.formats import RELEASED_DATA_HINT, DataError, detect_layout, read_splits
from Utils.formats import load_matrix  # noqa: F401  (re-exported: files to arrays)
from Utils.npy_files import BadArray, header, member_header, nbytes, read_array, read_member

log = logging.getLogger("diffmm")

MODALITY_ORDER = ("image", "text", "audio")


@dataclass
class Data:
    """One dataset in memory: binary CSR splits (float32) and float32 item features per modality."""

    name: str
    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix
    features: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def modalities(self) -> List[str]:
        return list(self.features)


def feature_files(folder: Path) -> Dict[str, Path]:
    """Map modality name -> feature file for every `<name>_feat.npy` or `<name>_feat.npy.zip` present."""
    found: Dict[str, Path] = {}
    for path in sorted(folder.glob("*_feat.npy*")):
        if path.name.endswith("_feat.npy"):
            name = path.name[: -len("_feat.npy")]
        elif path.name.endswith("_feat.npy.zip"):
            name = path.name[: -len("_feat.npy.zip")]
        else:
            continue
        if name not in found or path.suffix == ".npy":  # prefer the unzipped copy
            found[name] = path
    return dict(sorted(found.items(), key=lambda kv: modality_rank(kv[0])))


def modality_rank(name: str) -> tuple:
    """Fixed order: image, text, audio, then any other modality alphabetically."""
    return (MODALITY_ORDER.index(name), "") if name in MODALITY_ORDER else (len(MODALITY_ORDER), name)


def _feature_member(archive: zipfile.ZipFile) -> str:
    members = [m for m in archive.namelist() if m.endswith(".npy") and not m.startswith("__MACOSX")]
    if not members:
        raise BadArray("the archive holds no .npy file")
    return members[0]


def feature_shape(path: Path) -> Tuple[int, ...]:
    """The shape of a feature file (plain or zipped .npy) from its header alone: nothing is decompressed, and
    the data the header declares must be what the file holds (`Utils/npy_files.py`)."""
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                return member_header(archive, _feature_member(archive))[0]
        with open(path, "rb") as f:
            shape, _, dtype = header(f)
            if f.tell() + nbytes(shape, dtype) != path.stat().st_size:
                raise BadArray(f"its header declares {nbytes(shape, dtype):,} bytes of data but the file holds "
                               f"{path.stat().st_size - f.tell():,}")
            return shape
    except (BadArray, OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path} as a .npy array of numbers ({e}); re-download or re-export it.") from None


def checked_feature_shape(path: Path, n_items: Optional[int]) -> Tuple[int, int]:
    """(rows, width) of a feature file from its header: 2-D, one row per item of the train matrix."""
    shape = feature_shape(path)
    if len(shape) != 2:
        raise DataError(f"{path} has shape {shape}, but a feature file must be 2-D (items x dimensions).")
    if n_items is not None and shape[0] != n_items:
        raise DataError(f"{path} has {shape[0]} rows, but the train matrix has {n_items} items; "
                        f"row i must hold the features of item i.")
    return int(shape[0]), int(shape[1])


def load_features(path: Path, n_items: Optional[int]) -> np.ndarray:
    """Load an I x d_m feature array (plain or zipped .npy) as float32, its shape checked before it is read."""
    checked_feature_shape(path, n_items)
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                array = read_member(archive, _feature_member(archive))
        else:
            with open(path, "rb") as f:
                array = read_array(f, *header(f))
    except (BadArray, OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as e:
        raise DataError(f"cannot read {path} as a .npy array ({type(e).__name__}: {e}); "
                        f"re-download or re-export it.") from None
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise DataError(f"{path} holds non-finite values (NaN or inf) in {bad} rows; clean or impute them.")
    return array


def available_datasets(data_dir: Path) -> List[str]:
    found = []
    # hidden folders are left out: a `.NAME.partial-*` folder is a dataset being written (Utils.files.staged_folder)
    for folder in sorted(p for p in data_dir.glob("*") if p.is_dir() and not p.name.startswith(".")):
        try:
            detect_layout(folder)
            found.append(folder.name)
        except DataError:
            pass
    return found


# called with the feature widths (modality -> d_m) and files before any feature array is read (Main: will it fit?)
WidthCheck = Callable[[Dict[str, int], Dict[str, Path], int, int], None]


def load_data(name: str, data_dir: Path, modalities: Optional[Sequence[str]] = None,
              needs_features: bool = True, layout: str = "auto", check_widths: Optional[WidthCheck] = None) -> Data:
    """Read `<data_dir>/<name>/` in any layout (Utils/formats.py): the three splits and the feature file
    of every chosen modality.

    `needs_features=False` (a model that uses no item features): no feature file is read or required
    (their row count still fixes the number of items of the id-list layouts). `check_widths(widths, files,
    n_users, n_items)` is called once the shapes are known, before any feature array is read.
    """
    folder = data_dir / name
    if not folder.is_dir():
        found = ", ".join(available_datasets(data_dir)) or "none"
        raise DataError(f"unknown dataset {name!r}: there is no folder {folder} (datasets found in {data_dir}: "
                        f"{found}); {RELEASED_DATA_HINT}.")
    layout = detect_layout(folder) if layout == "auto" else layout
    files = feature_files(folder)
    n_items_hint = feature_shape(next(iter(files.values())))[0] if files and layout != "diffmm" else None
    train, val, test = read_splits(folder, layout, n_items_hint)

    if not needs_features:
        if check_widths is not None:
            check_widths({}, {}, train.shape[0], train.shape[1])
        return Data(name=name, train=train, val=val, test=test)
    if modalities:
        missing = [m for m in modalities if m not in files]
        if missing:
            raise DataError(f"no feature file for modality {', '.join(missing)} in {folder} (found: "
                            f"{', '.join(files) or 'none'}); expected <modality>_feat.npy or .npy.zip.")
        files = {m: files[m] for m in sorted(modalities, key=modality_rank)}
    if not files:
        raise DataError(f"no feature file in {folder}: this model needs at least one <modality>_feat.npy "
                        f"(image_feat.npy, text_feat.npy, audio_feat.npy); {RELEASED_DATA_HINT}.")
    if check_widths is not None:
        widths = {m: checked_feature_shape(path, train.shape[1])[1] for m, path in files.items()}
        check_widths(widths, files, train.shape[0], train.shape[1])
    features = {m: load_features(path, train.shape[1]) for m, path in files.items()}
    return Data(name=name, train=train, val=val, test=test, features=features)


# ---------------------------------------------------------------------------------------------
# User rows on the device
# ---------------------------------------------------------------------------------------------

def dense_rows(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a CSR matrix as a dense float32 tensor, sliced on the host (`DeviceRows`: gathered on the device)."""
    return torch.from_numpy(matrix[rows].toarray().astype(np.float32, copy=False)).to(device)


class DeviceRows:
    """A CSR matrix copied to the device once, whose batches of rows are then built there, dense or as CSR.

    Why: `dense_rows` slices the scipy matrix on the host and copies the dense rows over, and on CUDA every
    such (blocking) host-to-device copy waits for the device to finish its queue, once per batch of every
    loop over user rows. Here only the matrix crosses, once; a batch is gathered on the device without any
    host round trip. `dense(rows)` pads every row to the longest row of the matrix, a shape known on the
    host, so no size comes back from the device; `csr(rows, host_rows)` takes the batch's number of
    entries from its indices on the host. They give exactly `dense_rows(matrix, rows)` and
    `to_torch_csr(matrix[rows])` (tests/test_data.py).
    """

    def __init__(self, matrix: sp.spmatrix, device: torch.device):
        matrix = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
        matrix.sum_duplicates()  # one entry per (row, column), in column order: what toarray() sums duplicates to
        self.shape, self.device = matrix.shape, device
        self.host_indptr = matrix.indptr.astype(np.int64)
        counts = np.diff(self.host_indptr)
        self.width = int(counts.max()) if len(counts) else 0  # the longest row
        self.indptr = torch.from_numpy(self.host_indptr).to(device)
        self.indices = torch.from_numpy(matrix.indices.astype(np.int64)).to(device)
        self.values = torch.from_numpy(matrix.data).to(device)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows (indices on the device, repeats allowed) as a dense float32 len(rows) x columns tensor.

        Each row's entries are read at the fixed width of the longest row: the slots past a row's end add
        0.0 to whatever column they point at, which changes no value (each true entry is added once).
        """
        out = torch.zeros(len(rows), self.shape[1], dtype=torch.float32, device=self.device)
        if self.width == 0 or len(rows) == 0:
            return out
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        slot = torch.arange(self.width, device=self.device)
        inside = slot[None, :] < counts[:, None]
        position = (starts[:, None] + slot[None, :]).clamp_(max=len(self.indices) - 1)
        values = torch.where(inside, self.values[position], torch.zeros((), device=self.device))
        return out.scatter_add_(1, self.indices[position], values)

    def csr(self, rows: torch.Tensor, host_rows: Optional[np.ndarray] = None) -> torch.Tensor:
        """The rows as a len(rows) x columns sparse CSR tensor (float32 values, int64 indices), as `to_torch_csr`.

        `host_rows`: the same indices on the host, which give the number of entries without a device sync
        (without them one scalar comes back from the device).
        """
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        if host_rows is not None:
            total = int((self.host_indptr[host_rows + 1] - self.host_indptr[host_rows]).sum())
        else:
            total = int(counts.sum())
        crow = torch.zeros(len(rows) + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(counts, 0)
        entry_row = torch.repeat_interleave(torch.arange(len(rows), device=self.device), counts, output_size=total)
        position = torch.arange(total, device=self.device) - crow[entry_row] + starts[entry_row]
        return torch.sparse_csr_tensor(crow, self.indices[position], self.values[position],
                                       size=(len(rows), self.shape[1]), check_invariants=False)


def device_batches(batches: Sequence[np.ndarray], device: torch.device) -> List[torch.Tensor]:
    """The index batches of `user_batches` as tensors on the device, moved in one copy (one host-device
    synchronisation per epoch instead of one per batch); on the CPU views of one array, the same values."""
    if not batches:
        return []
    order = torch.from_numpy(np.concatenate(batches)).to(device)
    return list(torch.split(order, [len(b) for b in batches]))


# ---------------------------------------------------------------------------------------------
# Batches, training pairs and negatives
# ---------------------------------------------------------------------------------------------

def user_batches(n: int, batch: int, shuffle: bool) -> List[np.ndarray]:
    """Index batches of size `batch` over range(n), shuffled with torch's seeded generator when asked."""
    order = torch.randperm(n).numpy() if shuffle else np.arange(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def train_pairs(train: sp.csr_matrix) -> tuple:
    """(users, items) of every train interaction, in row-major order."""
    coo = train.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


def sample_negatives(train: sp.csr_matrix, users: np.ndarray, rng: np.random.Generator,
                     max_rounds: int = 1000, candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """One negative per pair, uniform over the items the user has not interacted with in train.

    `candidates`: draw only among these items (MMRec draws among the items that occur in train);
    None: among all items (DiffMM). Rejection sampling done for all pairs at once: draw, find the
    draws that hit a train item (a binary search in the sorted user*I+item keys), redraw only those.
    """
    n_items = train.shape[1]
    coo = train.tocoo()
    keys = np.sort(coo.row.astype(np.int64) * n_items + coo.col)

    def draw(size: int) -> np.ndarray:
        if candidates is None:
            return rng.integers(0, n_items, size=size)
        return candidates[rng.integers(0, len(candidates), size=size)]

    negatives = draw(len(users))
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        query = users[todo] * n_items + negatives[todo]
        pos = np.searchsorted(keys, query)
        hit = keys[np.minimum(pos, len(keys) - 1)] == query
        todo = todo[hit]
        if len(todo) == 0:
            return negatives
        negatives[todo] = draw(len(todo))
    full = np.unique(users[todo])
    raise DataError(f"cannot sample a negative item for users {full[:5].tolist()}: they interacted with "
                    f"(nearly) every item in the train matrix.")
