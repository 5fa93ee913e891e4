"""Files to arrays: the split matrices and the modality features of a dataset, and nothing else.

The layouts on disk are `Utils/formats.py`; the graphs built from these arrays are `Utils/graphs.py`; batches,
user rows on the device, training pairs and negatives are `Utils/batches.py`. The train matrix stays CSR: nothing
here builds a dense users x items matrix.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from Utils.errors import DataError
from Utils.formats import RELEASED_DATA_HINT, detect_layout, read_splits
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
