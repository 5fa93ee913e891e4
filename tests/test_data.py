"""Loading, graph normalisation, negatives, generated graphs."""
from __future__ import annotations

import math
import pickle
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import inference
from conftest import SHARED, hand_made, require_shared, write_dataset
from DataHandler import DataError, feature_files, load_data, load_matrix
from Params import parse_args
from Utils.batches import sample_negatives, train_pairs
from Utils.graphs import drop_edges, normalized_graph

CPU = torch.device("cpu")


def ref_norm_graph(edges, U, I):
    """Â = D^-1/2 (A+I) D^-1/2 by explicit loops; an edge listed twice counts once."""
    n = U + I
    A = np.zeros((n, n))
    for u, i in edges:
        A[u, U + i] = 1.0
        A[U + i, u] = 1.0
    for k in range(n):
        A[k, k] = 1.0
    deg = [sum(A[r]) for r in range(n)]
    out = np.zeros((n, n))
    for r in range(n):
        for c in range(n):
            if A[r, c]:
                out[r, c] = 1.0 / math.sqrt(deg[r] * deg[c])
    return out


# ------------------------------------------------------------------------------------------------
# §2 normalisation
# ------------------------------------------------------------------------------------------------

def test_normalized_graph_by_hand():
    U, I = 5, 7
    users = np.array([0, 0, 1, 3, 3, 3, 0, 4])
    items = np.array([1, 2, 2, 0, 6, 1, 1, 6])   # (0, 1) twice
    got = normalized_graph(users, items, U, I)
    assert got.shape == (U + I, U + I) and got.dtype == np.float32
    dense = got.toarray()
    expected = ref_norm_graph(list(zip(users, items)), U, I)
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    np.testing.assert_allclose(dense, dense.T)                     # symmetric
    assert (np.diag(dense) > 0).all()                              # self-loops, even for user 2 and items 3-5
    assert dense[2, 2] == pytest.approx(1.0)                      # an isolated node: degree 1 (its loop)
    assert got.nnz == 2 * 7 + (U + I)                              # 7 distinct edges, stored once each way
    assert (dense[:U, :U] == np.diag(np.diag(dense[:U, :U]))).all()  # no user-user edges


def test_train_graph_from_loaded_matrix(tmp_path):
    rng = np.random.default_rng(3)
    R = (rng.random((8, 6)) < 0.35) * rng.integers(1, 4, (8, 6)).astype(float)  # values > 1 count as 1
    R[2] = 0                                                                       # a user without edges
    edges = [(u, i) for u in range(8) for i in range(6) if R[u, i]]
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump(sp.coo_matrix(R), f)
    train = load_matrix(tmp_path / "t.pkl")
    got = normalized_graph(*train_pairs(train), *train.shape)
    np.testing.assert_allclose(got.toarray(), ref_norm_graph(edges, 8, 6), rtol=1e-6)


def test_load_matrix_binarises_and_sums_duplicates(tmp_path):
    # duplicate (0, 1) entries, a value 3.0, a stored explicit zero
    m = sp.coo_matrix((np.array([1.0, 1.0, 3.0, 0.0]), (np.array([0, 0, 2, 1]), np.array([1, 1, 3, 0]))),
                      shape=(3, 4))
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump(m, f)
    got = load_matrix(tmp_path / "m.pkl")
    assert got.dtype == np.float32 and got.shape == (3, 4)
    expected = np.zeros((3, 4))
    expected[0, 1] = expected[2, 3] = 1
    np.testing.assert_array_equal(got.toarray(), expected)
    assert got.nnz == 2


# ------------------------------------------------------------------------------------------------
# §1 the released files
# ------------------------------------------------------------------------------------------------

def test_released_tiktok_facts():
    folder = require_shared("tiktok")
    raw = (folder / "trnMat.pkl").read_bytes()[:64]
    assert b"scipy.sparse.coo" in raw  # the old module path is really exercised
    data = load_data("tiktok", SHARED)
    assert data.train.shape == data.val.shape == data.test.shape == (9308, 6710)
    assert (data.train.nnz, data.val.nnz, data.test.nnz) == (59541, 3051, 6130)
    for m in (data.train, data.val, data.test):
        assert m.dtype == np.float32 and set(np.unique(m.data)) == {1.0}
    train_deg = np.diff(data.train.indptr)
    assert (train_deg == 0).sum() == 10
    held = np.diff(data.val.indptr) + np.diff(data.test.indptr)
    assert (held == 0).sum() == 127
    assert np.diff(data.val.indptr).max() == 1 and np.diff(data.test.indptr).max() == 1
    # splits are disjoint
    assert data.train.multiply(data.test).nnz == 0 and data.train.multiply(data.val).nnz == 0
    assert data.val.multiply(data.test).nnz == 0
    # features: image then audio (no text released), float16 on disk, float32 in memory
    assert data.modalities == ["image", "audio"]
    for m in data.modalities:
        on_disk = np.load(folder / f"{m}_feat.npy")
        assert on_disk.dtype == np.float16
        assert data.features[m].dtype == np.float32 and data.features[m].shape == (6710, 128)
        np.testing.assert_array_equal(data.features[m], on_disk.astype(np.float32))


@pytest.mark.parametrize("name,shape,nnz", [("baby", (19445, 7050), (118551, 21682, 20559)),
                                            ("sports", (35598, 18357), (218409, 40029, 37899))])
def test_released_split_only_datasets(name, shape, nnz):
    folder = require_shared(name)
    mats = [load_matrix(folder / f"{s}.pkl") for s in ("trnMat", "valMat", "tstMat")]
    assert all(m.shape == shape for m in mats)
    assert tuple(m.nnz for m in mats) == nnz
    with pytest.raises(DataError, match="no feature file"):
        load_data(name, SHARED)


# ------------------------------------------------------------------------------------------------
# §1 features and modalities
# ------------------------------------------------------------------------------------------------

def test_float16_features_cast_to_float32(tmp_path):
    train, val, test, feats = hand_made()
    feats["image"] = (feats["image"] * 3).astype(np.float16)
    write_dataset(tmp_path / "d", train, val, test, feats)
    data = load_data("d", tmp_path)
    assert data.features["image"].dtype == np.float32
    np.testing.assert_array_equal(data.features["image"], feats["image"].astype(np.float32))
    assert data.features["text"].dtype == np.float32


def _zip_npy(path, array):
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("image_feat.npy", buf.getvalue())


def test_modality_discovery_order_and_zip(tmp_path):
    train, val, test, _ = hand_made(n_items=16)
    rng = np.random.default_rng(0)
    feats = {m: rng.normal(size=(16, 3)).astype(np.float32) for m in ("zeta", "audio", "beta", "text")}
    folder = write_dataset(tmp_path / "d", train, val, test, feats)
    image = rng.normal(size=(16, 4)).astype(np.float32)
    _zip_npy(folder / "image_feat.npy.zip", image)
    (folder / "notes_feat.txt").write_text("not a feature file")
    data = load_data("d", tmp_path)
    assert data.modalities == ["image", "text", "audio", "beta", "zeta"]
    np.testing.assert_array_equal(data.features["image"], image)
    for m in ("zeta", "audio", "beta", "text"):
        np.testing.assert_array_equal(data.features[m], feats[m])
    assert list(feature_files(folder)) == ["image", "text", "audio", "beta", "zeta"]


def test_modalities_subset(tmp_path):
    train, val, test, feats = hand_made(modalities=("image", "text", "audio"))
    write_dataset(tmp_path / "d", train, val, test, feats)
    args = parse_args(["--modalities", "audio,image"])
    assert args.modalities == ["audio", "image"]
    data = load_data("d", tmp_path, args.modalities)
    assert data.modalities == ["image", "audio"]          # the fixed order, not the order given
    assert load_data("d", tmp_path, ["text"]).modalities == ["text"]
    with pytest.raises(DataError, match="video"):
        load_data("d", tmp_path, ["image", "video"])


# ------------------------------------------------------------------------------------------------
# §6.3 negatives
# ------------------------------------------------------------------------------------------------

def test_sample_negatives_never_a_train_positive():
    rng = np.random.default_rng(0)
    R = (rng.random((50, 30)) < 0.4).astype(np.float32)
    R[7, :29] = 1  # a user with a single non-interacted item (29)
    train = sp.csr_matrix(R)
    users = np.repeat(np.arange(50), 40)
    neg = sample_negatives(train, users, np.random.default_rng(1))
    assert neg.shape == users.shape
    assert all(R[u, i] == 0 for u, i in zip(users, neg))
    assert (neg[users == 7] == 29).all()
    assert neg.min() >= 0 and neg.max() < 30


def test_sample_negatives_uniform_over_non_interacted():
    R = np.zeros((2, 20), dtype=np.float32)
    R[0, [0, 3, 4, 10, 19]] = 1
    train = sp.csr_matrix(R)
    users = np.zeros(30000, dtype=np.int64)
    neg = sample_negatives(train, users, np.random.default_rng(2))
    counts = np.bincount(neg, minlength=20)
    allowed = [i for i in range(20) if not R[0, i]]
    assert counts[[0, 3, 4, 10, 19]].sum() == 0
    expected = 30000 / len(allowed)
    assert np.abs(counts[allowed] - expected).max() < 0.1 * expected   # ~5 sigma
    # deterministic for a given generator seed
    assert np.array_equal(neg, sample_negatives(train, users, np.random.default_rng(2)))


# ------------------------------------------------------------------------------------------------
# graph rebuild (DiffMM.generate_top_items / rebuild_graphs)
# ------------------------------------------------------------------------------------------------

def _trainer(tiny_dir, *extra):
    args = parse_args(["--data", "tiny", "--data_dir", str(tiny_dir), "--dims", "[16]", "--latdim", "8",
                       "--batch", "7", *extra])
    data = load_data("tiny", tiny_dir)
    return inference.build_model(args, data, CPU), data


def ref_denoise(den, x, T=5, s=0.1, gmin=1e-4, gmax=0.02):
    """Reverse sampling (Eq. 12) with sampling_steps 0 and no noise: x ← posterior mean, t = T-1 .. 0 (float64)."""
    var = [s * gmin + (s * gmax - s * gmin) * t / (T - 1) for t in range(T)]
    abar0 = [1 - v for v in var]
    betas = [1e-4] + [min(1 - abar0[t] / abar0[t - 1], 0.999) for t in range(1, T)]
    abar, p = [], 1.0
    for b in betas:
        p *= 1 - b
        abar.append(p)
    prev = [1.0] + abar[:-1]
    x = torch.tensor(x, dtype=torch.float32)
    out = x.double()
    for t in reversed(range(T)):
        with torch.no_grad():
            x0_hat = den(out.float(), torch.full((x.shape[0],), t), mess_dropout=False).double()
        c1 = betas[t] * math.sqrt(prev[t]) / (1 - abar[t])
        c2 = (1 - prev[t]) * math.sqrt(1 - betas[t]) / (1 - abar[t])
        out = c1 * x0_hat + c2 * out
    return out.numpy()


@pytest.mark.parametrize("k", [1, 3])
def test_generate_top_items_and_full_graph(tiny_dir, k):
    tr, data = _trainer(tiny_dir, "--rebuild_k", str(k), "--keepRate", "1")
    U, I = data.n_users, data.n_items
    dense_train = data.train.toarray()
    tops = {}
    for m, den in tr.generators.items():
        denoised = ref_denoise(den, dense_train)
        top = np.argsort(-denoised, axis=1, kind="stable")[:, :k]
        tops[m] = top
        got = tr.generate_top_items(m).numpy()
        assert got.shape == (U, k)
        assert [set(r) for r in got.tolist()] == [set(r) for r in top.tolist()]
    graphs = tr.rebuild_graphs()
    assert set(graphs) == set(data.modalities)
    for m, pair in graphs.items():
        full = pair["full"].to_dense().numpy()
        ui = full[:U, U:]
        expected_edges = {(u, int(i)) for u in range(U) for i in tops[m][u]}
        assert {(int(u), int(i)) for u, i in zip(*np.nonzero(ui))} == expected_edges
        np.testing.assert_allclose(full, ref_norm_graph(sorted(expected_edges), U, I), rtol=1e-6)
        # keepRate 1: the dropped graph is the full graph
        np.testing.assert_array_equal(pair["dropped"].to_dense().numpy(), full)


def test_rebuild_gives_every_user_exactly_k_items(tiny_dir):
    tr, data = _trainer(tiny_dir, "--rebuild_k", "2", "--keepRate", "1")
    graphs = tr.rebuild_graphs()
    for pair in graphs.values():
        ui = pair["full"].to_dense().numpy()[: data.n_users, data.n_users:]
        assert ((ui != 0).sum(1) == 2).all()                # exactly k items for every user


def test_edge_drop_keep_half_scales_by_two(tiny_dir):
    tr, data = _trainer(tiny_dir, "--rebuild_k", "4", "--keepRate", "0.5")
    graphs = tr.rebuild_graphs()
    for pair in graphs.values():
        full = pair["full"].to_dense().numpy()
        dropped = pair["dropped"].to_dense().numpy()
        kept = dropped != 0
        assert (full[kept] != 0).all()                       # nothing new appears
        np.testing.assert_allclose(dropped[kept], 2.0 * full[kept], rtol=1e-6)
        frac = kept.sum() / (full != 0).sum()
        assert 0.38 < frac < 0.62                            # ~0.5 of ~ 2*96 + 40 entries
        # self-loops are dropped too
        diag = np.diag(dropped)
        assert (diag == 0).any() and (diag != 0).any()


def test_drop_edges_direct():
    rng = np.random.default_rng(0)
    g = sp.random(200, 200, density=0.1, format="csr", random_state=1, dtype=np.float32)
    same = drop_edges(g, 1.0, rng)
    assert (same != g).nnz == 0
    dropped = drop_edges(g, 0.25, rng)
    d, f = dropped.toarray(), g.toarray()
    kept = d != 0
    np.testing.assert_allclose(d[kept], 4.0 * f[kept], rtol=1e-6)
    assert abs(kept.sum() / g.nnz - 0.25) < 0.03


# ------------------------------------------------------------------------------------------------
# rows of a matrix gathered on the device (DataHandler.DeviceRows), batches moved in one copy
# ------------------------------------------------------------------------------------------------

def device_rows_cases():
    """Matrices with empty rows, one long row, non-binary values, explicit duplicates, and one with no entry."""
    rng = np.random.default_rng(11)
    binary = sp.random(30, 17, density=0.2, format="lil", random_state=3, dtype=np.float32)
    binary[binary.nonzero()] = 1.0
    binary[4, :] = 1.0                                  # a row with every column: the padding width
    binary[7, :] = 0.0                                  # an empty row
    binary = binary.tocsr()
    binary.eliminate_zeros()
    weighted = sp.random(12, 9, density=0.3, format="csr", random_state=5, dtype=np.float32)
    weighted.data = rng.normal(size=weighted.nnz).astype(np.float32)
    doubled = sp.csr_matrix((np.array([1.0, 2.0, 0.5], np.float32), (np.array([0, 0, 2]), np.array([3, 3, 1]))),
                            shape=(3, 5))               # (0, 3) stored twice: toarray() sums it
    return [binary, weighted, doubled, sp.csr_matrix((4, 6), dtype=np.float32)]


@pytest.mark.parametrize("case", range(4))
def test_device_rows_are_the_scipy_rows_dense_and_csr(case):
    from Utils.batches import DeviceRows, dense_rows
    from Utils.layers import to_torch_csr

    matrix = device_rows_cases()[case]
    gather = DeviceRows(matrix, CPU)
    n = matrix.shape[0]
    batches = [np.arange(n), np.array([n - 1, 0, 0, n // 2]), np.array([], dtype=np.int64),
               np.random.default_rng(case).permutation(n)[: max(1, n // 3)]]
    for rows in batches:
        idx = torch.from_numpy(rows)
        assert torch.equal(gather.dense(idx), dense_rows(matrix, rows, CPU)), rows
        want = to_torch_csr(matrix[rows], CPU)
        for got in (gather.csr(idx, rows), gather.csr(idx)):
            assert got.layout == torch.sparse_csr and got.shape == want.shape
            assert torch.equal(got.to_dense(), want.to_dense())
            if case != 2:                               # the same entries in the same order as the scipy slice
                assert torch.equal(got.crow_indices(), want.crow_indices())
                assert torch.equal(got.col_indices(), want.col_indices())
                assert torch.equal(got.values(), want.values())
                assert got.col_indices().dtype == torch.int64 and got.values().dtype == torch.float32


def test_device_batches_are_the_batches_in_one_copy():
    from Utils.batches import device_batches, user_batches

    torch.manual_seed(0)
    batches = user_batches(23, 5, True)
    moved = device_batches(batches, CPU)
    assert [t.tolist() for t in moved] == [b.tolist() for b in batches]
    assert all(t.dtype == torch.int64 for t in moved) and device_batches([], CPU) == []
