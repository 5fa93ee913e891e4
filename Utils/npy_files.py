""".npy arrays, plain or inside a zip (`.npz`, `<modality>_feat.npy.zip`), read with their size checked first.

`np.load` allocates whatever shape an .npy header declares and decompresses a zip member whole before anyone
looks at it: a 190 KiB zipped feature file became 382 MiB (held twice) before its shape was checked. Here the
header is read on its own (`header`), the caller checks the shape against what it expects (the items of the
train matrix, the memory of the machine), and only then are the bytes read, straight into the array
(`read_array`). A zip member's declared size must be one deflate can produce from its compressed bytes (at most
`MAX_DEFLATE_RATIO` to 1) and must equal what its .npy header declares, so no reader trusts a size the bytes on
disk cannot back.
"""
from __future__ import annotations

import zipfile
from typing import IO, Tuple

import numpy as np
from numpy.lib import format as npy_format

from Utils.safe_pickle import NUMERIC_CODES

MAX_DEFLATE_RATIO = 1032  # deflate's largest possible expansion (258-byte matches at about 2 bits each)


class BadArray(Exception):
    """The file is not a plain .npy of numbers of a size its bytes can back; the message says why."""


def header(f: IO[bytes], label: bool = False) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, positioned at its data afterwards.

    `label`: a short byte string is also accepted (the `format` member of a scipy .npz)."""
    try:
        version = npy_format.read_magic(f)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=10_000)
    except Exception as e:
        raise BadArray(f"not a .npy array ({e})") from None
    if label and dtype.kind == "S" and dtype.itemsize <= 16 and shape == ():
        return shape, fortran, dtype
    if dtype.hasobject or dtype.fields is not None or dtype.str.lstrip("<>|=") not in NUMERIC_CODES:
        raise BadArray(f"an array of {dtype}, not of plain numbers")
    return shape, fortran, dtype


def nbytes(shape: Tuple[int, ...], dtype: np.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * dtype.itemsize


def read_array(f: IO[bytes], shape: Tuple[int, ...], fortran: bool, dtype: np.dtype) -> np.ndarray:
    """The data after `header(f)`, read into one array of that shape (never held twice); refuses a short file."""
    array = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    view = memoryview(array.reshape(-1, order="A").view(np.uint8))
    done = 0
    while done < len(view):
        got = f.readinto(view[done:]) if hasattr(f, "readinto") else _read_into(f, view[done:])
        if not got:
            raise BadArray(f"the array is cut short: its header declares {len(view):,} bytes, the file holds {done:,}")
        done += got
    return array


def _read_into(f: IO[bytes], view: memoryview) -> int:
    chunk = f.read(min(len(view), 1 << 24))
    view[:len(chunk)] = chunk
    return len(chunk)


def member_info(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """A zip member whose declared size its compressed bytes can back (module docstring)."""
    info = archive.getinfo(name)
    if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 1024:
        raise BadArray(f"its member {name} declares {info.file_size:,} bytes from {info.compress_size:,} compressed "
                       f"ones, more than any zip can expand to (a zip bomb)")
    return info


def member_header(archive: zipfile.ZipFile, name: str, label: bool = False
                  ) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """The .npy header of a zip member, its data size checked against the zip's declared size."""
    info = member_info(archive, name)
    with archive.open(info) as f:
        shape, fortran, dtype = header(f, label)
        expected = f.tell() + nbytes(shape, dtype)
    if expected != info.file_size:
        raise BadArray(f"its member {name} declares an array of {expected:,} bytes but {info.file_size:,} bytes in "
                       f"the zip")
    return shape, fortran, dtype


def read_member(archive: zipfile.ZipFile, name: str, label: bool = False) -> np.ndarray:
    """A zip member's array, once `member_header` has been checked by the caller."""
    member_header(archive, name, label)
    with archive.open(member_info(archive, name)) as f:
        shape, fortran, dtype = header(f, label)
        return read_array(f, shape, fortran, dtype)
