"""A pickled sparse matrix of numbers, read without letting the file build anything else.

The authors' datasets are pickled scipy.sparse matrices (`trnMat.pkl`), so the package reads pickles; a pickle
is a program, and even a whitelist of real numpy/scipy classes runs that program's instructions against them:
pickle's BUILD step can set a `numpy.dtype`'s internal flags to any value (a dtype that claims to hold objects
makes numpy read bytes of the file as a pointer: memory corruption), `_reconstruct` allocates whatever shape the
file declares, and a scipy matrix is made before its arrays are checked. So nothing here hands the file to numpy
or scipy. The unpickler's whitelist maps every allowed name to a *stand-in* of this module that only records
what the file says; after loading, `build_sparse` checks the records and makes the matrix from plain values:

- a dtype from a plain numeric type code only (`NUMERIC_CODES`); of its BUILD state only the byte order is read;
- an array from raw bytes whose length equals shape x item size (so its size is what the file holds);
- a scipy.sparse matrix (coo, csr, csc) from index/data arrays checked for dtype, length, bounds and a monotone
  `indptr`, and a shape bounded by the entries the file stores (`check_shape`), before scipy sees any of it.

Before unpickling, `pickletools.genops` walks the whole file: every length the file declares is checked against
the bytes that follow it (so no instruction allocates more than the file holds), and an instruction outside the
plain-data subset (persistent ids, extension codes, out-of-band buffers) is refused. Every refusal is one
`UnsafeMatrix` sentence; nothing the file names is executed.
"""
from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, Dict, Optional, Tuple

import numpy as np
import scipy.sparse as sp

# numpy type codes a matrix of numbers may use: booleans, integers and floats (no objects, strings, voids,
# records, datetimes or subarrays)
NUMERIC_CODES = {"b1", "?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "b", "B", "h", "H",
                 "i", "I", "l", "L", "q", "Q", "e", "f", "d", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                 "int64", "uint64", "float16", "float32", "float64", "bool"}
MAX_IDS = 2 ** 31 - 1           # users or items: int32 indices (scipy's and torch's sparse kernels) hold no more
# A declared shape may exceed what the file's entries reach (users without a held-out interaction) by this much:
# at most FREE_IDS ids plus SLACK_PER_ENTRY per stored entry. A split of real data stays far below it (TikTok's
# validation split: 3,051 entries for 9,308 + 6,710 ids); a 370-byte file declaring 5e7 users is refused before
# the 8 bytes per user that a CSR row pointer costs are allocated.
FREE_IDS = 2 ** 20
SLACK_PER_ENTRY = 16
# opcodes that never appear in a pickled matrix of numbers and reach machinery we do not want
_REFUSED_OPCODES = {"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER", "INST", "OBJ"}
_SPARSE_CLASSES = {"coo_matrix": "coo", "coo_array": "coo", "csr_matrix": "csr", "csr_array": "csr",
                   "csc_matrix": "csc", "csc_array": "csc"}


class UnsafeMatrix(Exception):
    """The file is not a plain pickled matrix of numbers; the message says what it holds instead."""


def check_shape(shape: Tuple[int, int], entries: int, what: str = "the matrix") -> None:
    """Refuse a users x items shape that the stored entries cannot justify (module constants say why)."""
    rows, cols = shape
    if rows < 0 or cols < 0:
        raise UnsafeMatrix(f"{what} declares a negative shape {shape}")
    if max(rows, cols) > MAX_IDS:
        raise UnsafeMatrix(f"{what} declares {max(rows, cols):,} ids, more than the {MAX_IDS:,} that 32-bit "
                           f"indices hold")
    limit = FREE_IDS + SLACK_PER_ENTRY * entries
    if rows + cols > limit:
        raise UnsafeMatrix(f"{what} declares {rows:,} users x {cols:,} items but stores only {entries:,} "
                           f"{'entry' if entries == 1 else 'entries'} (at most {limit:,} ids are accepted for that "
                           f"many: {FREE_IDS:,} plus {SLACK_PER_ENTRY} per entry): most of it would be empty")


# ---------------------------------------------------------------------------------------------
# Stand-ins: what the whitelisted names become while unpickling (records, never numpy or scipy objects)
# ---------------------------------------------------------------------------------------------

class _Dtype:
    """`numpy.dtype(code, align, copy)` + its BUILD state: only a numeric code and a byte order are kept."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or code.lstrip("<>|=") not in NUMERIC_CODES:
            raise UnsafeMatrix(f"an array type {code!r} that is not a plain number type")
        self.code, self.order = code.lstrip("<>|="), "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): a plain numeric dtype has no
        # subarray, names or fields; its sizes and flags are numpy's business and are not taken from the file
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "=") \
                or any(part is not None for part in state[2:5]):
            raise UnsafeMatrix("an array type with fields, names or a subarray")
        self.order = state[1]

    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in "<>" and dtype.itemsize > 1 else dtype


class _Array:
    """`_reconstruct(ndarray, shape, typecode)` + BUILD (version, shape, dtype, fortran, raw bytes). The checked
    array stays inside this holder until `build_sparse`, so no instruction of the file ever reaches a numpy object."""

    def __init__(self, value: Optional[np.ndarray] = None) -> None:
        self.value = value

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafeMatrix("an array whose state is not (version, shape, type, order, bytes)")
        _, shape, dtype, fortran, raw = state
        self.value = _array_from_bytes(raw, dtype, shape, "F" if fortran else "C")


def _array_from_bytes(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """A copy of `raw` as an array; its size must be exactly what the bytes hold (no object arrays: a list of
    Python objects in place of the bytes is refused)."""
    if not isinstance(dtype, _Dtype):
        raise UnsafeMatrix("an array without a plain number type")
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafeMatrix(f"an array whose data is a {type(raw).__name__}, not raw bytes of numbers")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape) or len(shape) > 2:
        raise UnsafeMatrix(f"an array of shape {shape!r}")
    dt = dtype.dtype()
    count = 1
    for n in shape:
        count *= n
    if count * dt.itemsize != len(raw):
        raise UnsafeMatrix(f"an array that declares shape {shape} of {dt} ({count * dt.itemsize:,} bytes) but holds "
                           f"{len(raw):,} bytes")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order=order).copy()


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:
        raise UnsafeMatrix("an array of a class other than numpy.ndarray")
    return _Array()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    """numpy's pickle protocol 5 form of an array."""
    return _Array(_array_from_bytes(buffer, dtype, shape, "F" if order == "F" else "C"))


def _scalar(dtype: Any, raw: Any = b"") -> Any:
    """A numpy scalar as the plain Python number it holds."""
    return _array_from_bytes(raw, dtype, (), "C").item()


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """`_codecs.encode(str, 'latin1')`: how pickle protocol 2 writes bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeMatrix("an encoded string other than latin-1 bytes")
    return text.encode("latin1")


class _Sparse:
    """A scipy.sparse matrix as recorded: its format and the state (attribute dict) the file gives it."""

    kind = ""
    state: Optional[Dict[str, Any]] = None  # set by BUILD (NEWOBJ makes the object without __init__)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:  # (dict, slots) of protocol 0/1
            state = state[0]
        if not isinstance(state, dict):
            raise UnsafeMatrix("a sparse matrix whose state is not a dict of arrays")
        self.state = state


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg's protocol 0/1 object constructor: only for the sparse stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, _Sparse)) or base is not object or state is not None:
        raise UnsafeMatrix("an object other than a sparse matrix")
    return cls()


_NDARRAY = object()  # numpy.ndarray, only ever an argument of _reconstruct
_SPARSE_STANDINS = {name: type(name, (_Sparse,), {"kind": kind}) for name, kind in _SPARSE_CLASSES.items()}
_NUMPY = {"dtype": _Dtype, "ndarray": _NDARRAY, "_reconstruct": _reconstruct, "scalar": _scalar,
          "_frombuffer": _frombuffer}
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("scipy.sparse") and name in _SPARSE_STANDINS:
            return _SPARSE_STANDINS[name]
        if module in _NUMPY_MODULES and name in _NUMPY:
            return _NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return _encode
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return _reconstructor
        if (module, name) in (("builtins", "object"), ("__builtin__", "object")):
            return object
        raise UnsafeMatrix(f"it names {module}.{name}, which is not part of a scipy.sparse matrix of numbers "
                           f"(it may run code)")


def _check_opcodes(data: bytes) -> None:
    """Walk every instruction: each declared length must fit in the bytes that follow (pickletools raises
    otherwise), and none may be one a matrix of numbers never needs."""
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name in _REFUSED_OPCODES:
                raise UnsafeMatrix(f"the pickle instruction {opcode.name}, which a matrix of numbers never uses")
    except UnsafeMatrix:
        raise
    except Exception as e:  # a truncated file, a declared length past its end, an unknown opcode
        raise UnsafeMatrix(f"a damaged or cut-short pickle ({e})") from None


def loads_matrix(data: bytes) -> sp.csr_matrix:
    """The CSR matrix a pickle holds (a scipy.sparse coo/csr/csc matrix, or a 2-D numpy array of numbers).

    Raises UnsafeMatrix (one sentence fragment: what the file holds instead) for anything else.
    """
    _check_opcodes(data)
    try:
        record = _Unpickler(io.BytesIO(data)).load()
    except UnsafeMatrix:
        raise
    except RecursionError:
        raise UnsafeMatrix("a pickle nested too deeply") from None
    except Exception as e:  # wrong argument counts to a stand-in, a stack underflow, ...
        raise UnsafeMatrix(f"a pickle that does not build a matrix ({type(e).__name__}: {e})") from None
    if isinstance(record, _Sparse):
        if record.state is None:
            raise UnsafeMatrix("a sparse matrix without its arrays")
        return build_sparse(record.kind, record.state)
    if isinstance(record, _Array) and record.value is not None and record.value.ndim == 2:
        check_shape(record.value.shape, record.value.size)
        return sp.csr_matrix(record.value)
    raise UnsafeMatrix(f"a {type(record).__name__.lstrip('_')}, not a users x items matrix")


def _array(value: Any) -> Any:
    return value.value if isinstance(value, _Array) else value


def _index_array(state: Dict[str, Any], key: str, length: Optional[int] = None) -> np.ndarray:
    value = _array(state.get(key))
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise UnsafeMatrix(f"a sparse matrix whose {key} is not a 1-D integer array")
    if length is not None and len(value) != length:
        raise UnsafeMatrix(f"a sparse matrix whose {key} has {len(value):,} entries where {length:,} are needed")
    return value.astype(np.int64, copy=False)


def _in_range(values: np.ndarray, bound: int, what: str) -> None:
    if len(values) and (values.min() < 0 or values.max() >= bound):
        raise UnsafeMatrix(f"a sparse matrix whose {what} lie outside 0..{bound - 1}")


def build_sparse(kind: str, state: Dict[str, Any]) -> sp.csr_matrix:
    """A CSR matrix from the arrays of a 'coo', 'csr' or 'csc' matrix (`_shape`, `data` and `row`/`col`,
    `coords` or `indices`/`indptr`), each checked before scipy sees it (nothing of scipy ran before this)."""
    shape = state.get("_shape", state.get("shape"))
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(n, int) for n in shape)):
        raise UnsafeMatrix("a sparse matrix without a 2-D integer shape")
    data = _array(state.get("data"))
    if not isinstance(data, np.ndarray) or data.ndim != 1 or data.dtype.kind not in "biuf":
        raise UnsafeMatrix("a sparse matrix whose data is not a 1-D array of numbers")
    check_shape(shape, len(data))
    rows, cols = shape
    if kind == "coo":
        coords = state.get("coords")
        if coords is not None:  # scipy >= 1.13 keeps (row, col) as `coords`
            if not (isinstance(coords, tuple) and len(coords) == 2):
                raise UnsafeMatrix("a 2-D COO matrix whose coords are not (rows, columns)")
            state = {"row": _array(coords[0]), "col": _array(coords[1])}
        row = _index_array(state, "row", len(data))
        col = _index_array(state, "col", len(data))
        _in_range(row, rows, "row indices")
        _in_range(col, cols, "column indices")
        return sp.csr_matrix((data, (row, col)), shape=shape)
    major, minor = (rows, cols) if kind == "csr" else (cols, rows)
    indptr = _index_array(state, "indptr", major + 1)
    indices = _index_array(state, "indices", len(data))
    if indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr) < 0).any():
        raise UnsafeMatrix("a sparse matrix whose indptr does not rise from 0 to its number of entries")
    _in_range(indices, minor, "indices")
    cls = sp.csr_matrix if kind == "csr" else sp.csc_matrix
    return sp.csr_matrix(cls((data, indices, indptr), shape=shape))
