"""Files from strangers: every crafted file here is made in the test, byte by byte where pickle would refuse to
write it, and each must end in one sentence (DataError / UsageError, exit 2 on the command line) with memory
bounded by a small multiple of the file's size, never a crash, a traceback or an allocation of what it declares.
"""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import ROOT, SHARED, write_dataset
from DataHandler import load_data, load_features
from Params import read_config_file
from Utils.errors import DataError, UsageError
from Utils.formats import load_matrix, read_splits
from Utils.memory import check_fits
from Utils.safe_pickle import UnsafeMatrix, loads_matrix

MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# A tiny pickle assembler (protocol 2/3 opcodes), for what pickle.dumps would never write
# ---------------------------------------------------------------------------------------------

def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def integer(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def raw(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


MARK, TUPLE, REDUCE, BUILD, NONE, FALSE, TRUE, STOP = b"(", b"t", b"R", b"b", b"N", b"\x89", b"\x88", b"."
EMPTY_DICT, SETITEM, PROTO = b"}", b"s", b"\x80\x03"


def dtype(code: str, state: bytes) -> bytes:
    """numpy.dtype(code, False, True) with BUILD state `state` (the opcodes of a tuple)."""
    return glob("numpy", "dtype") + MARK + text(code) + FALSE + TRUE + TUPLE + REDUCE + state + BUILD


def plain_state(order: str = "|", elsize: int = -1, flags: int = 0) -> bytes:
    return MARK + integer(3) + text(order) + NONE + NONE + NONE + integer(elsize) + integer(-1) + integer(flags) \
        + TUPLE


def array(shape: tuple, dtype_ops: bytes, data: bytes) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') with BUILD (1, shape, dtype, False, data)."""
    shape_ops = MARK + b"".join(integer(n) for n in shape) + TUPLE
    return (glob("numpy.core.multiarray", "_reconstruct") + MARK + glob("numpy", "ndarray") + MARK + integer(0)
            + TUPLE + raw(b"b") + TUPLE + REDUCE + MARK + integer(1) + shape_ops + dtype_ops + FALSE + raw(data)
            + TUPLE + BUILD)


def forged_object_dtype() -> bytes:
    """A void dtype with one object field whose BUILD flags say 'no objects' (0): numpy then reads the field's 8
    bytes of the file as a pointer to a Python object."""
    field = dtype("O8", plain_state(flags=63))
    fields = EMPTY_DICT + text("a") + MARK + field + integer(0) + TUPLE + SETITEM
    return dtype("V8", MARK + integer(3) + text("|") + NONE + MARK + text("a") + TUPLE + fields + integer(8)
                 + integer(1) + integer(0) + TUPLE)


def field_past_itemsize() -> bytes:
    field = dtype("f8", plain_state("<"))
    fields = EMPTY_DICT + text("a") + MARK + field + integer(100) + TUPLE + SETITEM
    return dtype("V8", MARK + integer(3) + text("|") + NONE + MARK + text("a") + TUPLE + fields + integer(8)
                 + integer(1) + integer(16) + TUPLE)


def peak_of(call) -> int:
    """Peak traced bytes (Python and numpy allocations) while `call()` runs; it must raise DataError/UsageError."""
    tracemalloc.start()
    try:
        with pytest.raises((DataError, UsageError)) as caught:
            call()
        return tracemalloc.get_traced_memory()[1], str(caught.value)
    finally:
        tracemalloc.stop()


def one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and message.rstrip().endswith(".")


def tiny_splits():
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=np.float32))
    val = sp.csr_matrix(np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=np.float32))
    return train, val, test


# ---------------------------------------------------------------------------------------------
# Pickles
# ---------------------------------------------------------------------------------------------

def test_forged_dtype_pickle_is_one_sentence_and_exit_2_not_a_crash(tmp_path):
    """The 201-byte class of file: run in a child, so that a segmentation fault fails the test instead of ending
    the suite."""
    folder = tmp_path / "data" / "evil"
    write_dataset(folder, *tiny_splits())
    (folder / "trnMat.pkl").write_bytes(PROTO + array((1, 1), forged_object_dtype(), b"\x41" * 8) + STOP)
    child = subprocess.run([sys.executable, "Main.py", "--model", "pop", "--data", "evil", "--data_dir",
                            str(tmp_path / "data"), "--out_dir", str(tmp_path / "run")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 2, (child.returncode, child.stdout[-2000:], child.stderr[-2000:])
    message = (child.stdout + child.stderr).strip().splitlines()[-1]
    assert "trnMat.pkl" in message and "nothing in it was executed" in message and "Traceback" not in child.stderr


@pytest.mark.parametrize("forged", [forged_object_dtype, field_past_itemsize], ids=["object-field", "field-past-end"])
def test_dtypes_with_fields_are_refused(tmp_path, forged):
    path = tmp_path / "trnMat.pkl"
    path.write_bytes(PROTO + array((1, 1), forged(), b"\x00" * 8) + STOP)
    with pytest.raises(DataError) as caught:
        load_matrix(path)
    assert "array type" in str(caught.value) and str(path) in str(caught.value)
    one_sentence(str(caught.value))


def test_object_array_of_fifty_million_entries_is_refused_before_allocation(tmp_path):
    path = tmp_path / "trnMat.pkl"
    path.write_bytes(PROTO + array((50_000_000,), dtype("O8", plain_state(flags=63)), b"") + STOP)
    peak, message = peak_of(lambda: load_matrix(path))
    assert peak < 2 * MiB and "plain number type" in message


def test_declared_shape_bomb_pickle_is_refused_within_a_small_bound(tmp_path):
    path = tmp_path / "trnMat.pkl"
    path.write_bytes(pickle.dumps(sp.coo_matrix(([1.0], ([0], [0])), shape=(50_000_000, 10))))
    assert path.stat().st_size < 1024
    peak, message = peak_of(lambda: load_matrix(path))
    assert peak < 4 * MiB, peak       # before: +574 MiB
    assert "50,000,000 users" in message and "1 entry" in message
    one_sentence(message)


def test_declared_length_past_the_end_of_the_file_is_refused(tmp_path):
    path = tmp_path / "trnMat.pkl"
    path.write_bytes(PROTO + b"B" + struct.pack("<I", 2 ** 31) + b"\x00" * 10 + STOP)  # 2 GiB declared, 10 there
    peak, message = peak_of(lambda: load_matrix(path))
    assert peak < MiB and "cut-short" in message


def test_a_command_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trnMat.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DataError, match="os.system"):
        load_matrix(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["coo", "csr", "csc"])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_matrices_of_every_protocol_read_exactly(kind, protocol):
    """Reference: the dense 0/1 pattern of the matrix written, compared cell by cell."""
    rng = np.random.default_rng(protocol)
    dense = (rng.random((7, 5)) < 0.4) * rng.integers(1, 4, (7, 5))
    matrix = sp.coo_matrix(dense.astype(np.float64)).asformat(kind)
    out = loads_matrix(pickle.dumps(matrix, protocol=protocol))
    np.testing.assert_array_equal(out.toarray() != 0, dense != 0)


@pytest.mark.parametrize("name", ["tiktok", "baby", "sports"])
def test_released_splits_read_as_pickle_reads_them(name):
    folder = SHARED / name
    if not (folder / "trnMat.pkl").is_file():
        pytest.skip(f"released dataset {name} not found under {SHARED}")
    for split in ("trnMat", "valMat", "tstMat"):
        data = (folder / f"{split}.pkl").read_bytes()
        with warnings.catch_warnings():   # their pickles name scipy.sparse.coo, which scipy now warns about
            warnings.simplefilter("ignore", DeprecationWarning)
            reference = pickle.loads(data).tocsr()  # the released files, trusted here only as the reference
        ours = loads_matrix(data)
        assert ours.shape == reference.shape and (ours != reference).nnz == 0


@pytest.mark.parametrize("state, why", [
    ({"_shape": (3, 3), "data": np.ones(2), "indices": np.array([0, 5]), "indptr": np.array([0, 1, 2, 2])},
     "indices lie outside"),
    ({"_shape": (3, 3), "data": np.ones(2), "indices": np.array([0, 1]), "indptr": np.array([0, 2, 1, 2])},
     "indptr does not rise"),
    ({"_shape": (3, 3), "data": np.ones(2), "indices": np.array([0.0, 1.0]), "indptr": np.array([0, 1, 2, 2])},
     "integer array"),
])
def test_sparse_arrays_are_checked_before_scipy_sees_them(state, why):
    from Utils.safe_pickle import build_sparse

    with pytest.raises(UnsafeMatrix, match=why):
        build_sparse("csr", state)


# ---------------------------------------------------------------------------------------------
# .npz, JSON, .inter and features: sizes against the bytes on disk
# ---------------------------------------------------------------------------------------------

def test_npz_shape_bomb_is_refused_within_a_small_bound(tmp_path):
    path = tmp_path / "trnMat.npz"
    sp.save_npz(path, sp.coo_matrix(([1.0], ([0], [0])), shape=(50_000_000, 10)))
    assert path.stat().st_size < 2048
    peak, message = peak_of(lambda: load_matrix(path) if False else read_splits_npz(path))
    assert peak < 4 * MiB and "50,000,000 users" in message
    one_sentence(message)


def read_splits_npz(path: Path):
    from Utils.formats import _load_npz

    return _load_npz(path)


@pytest.mark.parametrize("kind", ["coo", "csr", "csc"])
def test_npz_round_trip(tmp_path, kind):
    dense = np.array([[1, 0, 2], [0, 0, 1], [3, 0, 0], [0, 1, 0]], dtype=np.float32)
    sp.save_npz(tmp_path / "m.npz", sp.coo_matrix(dense).asformat(kind))
    np.testing.assert_array_equal(read_splits_npz(tmp_path / "m.npz").toarray(), (dense != 0).astype(np.float32))


def test_json_with_a_huge_user_id_is_refused_within_a_small_bound(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "train.json").write_text('{"20000000":[0]}')
    (folder / "val.json").write_text('{"0":[1]}')
    (folder / "test.json").write_text('{"0":[2]}')
    peak, message = peak_of(lambda: read_splits(folder, "mmssl"))
    assert peak < 4 * MiB, peak       # before: 350 MiB
    assert "20,000,001 users" in message
    one_sentence(message)


def test_an_id_of_ten_to_the_fifteen_is_one_sentence(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "shop.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n1000000000000000\t1\t1\n0\t2\t2\n")
    peak, message = peak_of(lambda: read_splits(folder, "mmrec"))
    assert "32-bit" in message and peak < 4 * MiB
    one_sentence(message)


def zipped_zero_features(path: Path, rows: int, width: int) -> None:
    """A zipped .npy of rows x width float32 zeros, streamed (the test never holds the array)."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    header["shape"] = (rows, width)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        chunk = bytes(4 * MiB)
        left = rows * width * 4
        while left:
            f.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))


def test_zipped_features_are_checked_before_they_are_decompressed(tmp_path):
    path = tmp_path / "image_feat.npy.zip"
    zipped_zero_features(path, rows=10, width=5_000_000)          # 200 MB of zeros, ~200 KB on disk
    assert path.stat().st_size < MiB
    peak, message = peak_of(lambda: load_features(path, n_items=4))
    assert peak < 4 * MiB and "10 rows" in message               # before: decompressed (held twice), then refused


def test_zip_declaring_more_than_deflate_can_expand_is_refused(tmp_path):
    path = tmp_path / "image_feat.npy.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", b"\x00" * 64)
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # the uncompressed size, both headers
        at = data.index(signature) + offset
        data[at:at + 4] = struct.pack("<I", 2 ** 32 - 1)
    path.write_bytes(bytes(data))
    peak, message = peak_of(lambda: load_features(path, n_items=4))
    assert "zip bomb" in message and peak < MiB


def test_feature_width_is_checked_against_memory_before_the_features_are_read(tmp_path):
    """Each modality's width reaches the check before its array is read; a refusal names the file and width."""
    train, val, test = tiny_splits()
    write_dataset(tmp_path / "shop", train, val, test)
    zipped_zero_features(tmp_path / "shop" / "image_feat.npy.zip", rows=4, width=20_000_000)  # 320 MB unzipped
    from Model import DiffMM
    from Params import parse_args

    args = parse_args(["--data", "shop", "--data_dir", str(tmp_path)])

    def fits(widths, files, n_users, n_items):
        parts = DiffMM.parameter_sizes(args, n_users, n_items, widths)
        check_fits(parts, 4 * n_items * sum(widths.values()), __import__("torch").device("cpu"), files, "diffmm",
                   available=8 * 2 ** 30)
    peak, message = peak_of(lambda: load_data("shop", tmp_path, check_widths=fits))
    assert peak < 8 * MiB
    assert "image_feat.npy.zip" in message and "20,000,000 x 64" in message and "19.4 GB" in message


def test_model_parameter_sizes_from_shapes():
    """Reference: the entries of the parameters a DiffMM and a LightGCN built on these shapes hold."""
    import torch

    from DataHandler import Data
    from Models import get_model
    from Params import parse_args

    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((30, 20)) < 0.2).astype(np.float32))
    data = Data("g", train, train, train, {"image": rng.random((20, 7), dtype=np.float32),
                                           "text": rng.random((20, 5), dtype=np.float32)})
    for model in ("diffmm", "lightgcn", "diffrec"):
        args = parse_args(["--model", model])
        built = get_model(model)(args, data, torch.device("cpu"))
        estimate = sum(get_model(model).parameter_sizes(args, 30, 20, {"image": 7, "text": 5}).values())
        actual = sum(p.numel() for p in built.parameters())
        assert 0.9 * actual <= estimate <= actual, (model, estimate, actual)


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------

def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    pytest.importorskip("yaml")
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "flags.yaml"
    path.write_text("\n".join(rows) + "\n")
    peak, message = peak_of(lambda: read_config_file(str(path)))
    assert "anchors or aliases" in message and peak < 4 * MiB
    one_sentence(message)
    path.write_text(json.dumps({"lr": 0.01}).replace("{", "{ ").replace("}", " }"))  # JSON is YAML too
    assert read_config_file(str(path))[0] == {"lr": 0.01}


def test_a_run_that_cannot_fit_is_refused_before_its_features_are_read(tmp_path, monkeypatch, capsys):
    """Main end to end: the refusal is exit 2 and one sentence naming the feature file; no run folder is made."""
    import Main
    import Utils.memory

    train, val, test = tiny_splits()
    write_dataset(tmp_path / "shop", train, val, test, {"image": np.zeros((4, 3000), np.float32)})
    monkeypatch.setattr(Utils.memory, "available_bytes", lambda device: 1_000_000)   # a 1 MB device
    code = Main.main(["--data", "shop", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr()
    message = (out.out + out.err).strip().splitlines()[-1]
    assert code == 2 and "image_feat.npy" in message and "3,000 x 64" in message and "1 MB free" in message
    assert not (tmp_path / "run").exists()
