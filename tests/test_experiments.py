"""The paper's experiments: ablations (Table 3), fusion ratio (Figure 4), sparsity groups (Figure 2),
sweeps (Table 4, Figure 3), figures (Figures 2-5) and Utils.reproduce. Tiny generated data only."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import scipy.sparse as sp

import inference
import Main
import Model
from DataHandler import load_data
from Experiments import reproduce, sweep
from Experiments.plan import GridPlan, Sweep, named_grid, parse_grid
from Experiments.runs import Options, run_plan
from Model import VGAE
from Models.diffusion import Denoiser
from Params import parse_args
from Utils import figures
from Utils.batches import dense_rows, sample_negatives, train_pairs
from Utils.layers import Graph
from Utils.metrics import evaluated_users
from conftest import hand_made, tiny_args, write_dataset

CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data_dir with 'tiny' (24 x 16, image + text) and 'tiktok' (the same splits, image + audio only)."""
    root = tmp_path_factory.mktemp("exp_data")
    train, val, test, feats = hand_made()
    write_dataset(root / "tiny", train, val, test, feats)
    write_dataset(root / "tiktok", train, val, test, {"image": feats["image"], "audio": feats["text"]})
    write_dataset(root / "baby", train, val, test)  # splits only, like shared/datasets/baby
    return root


def trainer(data_dir, *extra, data="tiny"):
    args = parse_args(["--data", data, "--data_dir", str(data_dir), "--dims", "[16]", "--latdim", "8",
                       "--batch", "7", *extra])
    return inference.build_model(args, load_data(data, data_dir), CPU)


def one_epoch_inputs(tr):
    graphs = tr.rebuild_graphs()
    pairs = train_pairs(tr.data.train)
    negatives = sample_negatives(tr.data.train, pairs[0], tr.rng)
    return graphs, pairs, negatives


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------------
# Table 3 ablations
# ------------------------------------------------------------------------------------------------

def test_no_cl_has_zero_contrastive_loss_and_computes_no_views(data_dir, monkeypatch):
    tr = trainer(data_dir, "--ablation", "no_cl", "--batch", "40")
    graphs, pairs, negatives = one_epoch_inputs(tr)
    calls = []
    forward = tr.recommender.forward

    def recording_forward(*args, **kwargs):
        calls.append(kwargs.get("with_views", False))
        return forward(*args, **kwargs)

    def no_contrastive(*args, **kwargs):
        raise AssertionError("the contrastive loss must not be computed with --ablation no_cl")

    monkeypatch.setattr(tr.recommender, "forward", recording_forward)
    monkeypatch.setattr(Model, "contrastive_loss", no_contrastive)
    losses = tr.train_recommender({m: g["dropped"] for m, g in graphs.items()}, negatives,
                                  view_graphs={m: g["view"] for m, g in graphs.items()})
    assert losses["cl"] == 0.0
    assert calls and not any(calls)                      # every forward pass without the views
    assert losses["loss"] == pytest.approx(losses["bpr"] + losses["reg"])


def test_no_msi_diffusion_loss_is_the_elbo_term_only(data_dir):
    for ablation, e_loss_factor in (("no_msi", 0.0), ("none", 0.1)):
        tr = trainer(data_dir, "--ablation", ablation)
        rows = np.arange(7)
        x0 = dense_rows(tr.data.train, rows, CPU)
        den = tr.generators["image"]
        with torch.no_grad():
            feat = tr.recommender.modal_features()["image"]
        torch.manual_seed(3)
        loss = tr.generator_terms("image", tr.generator_inputs(), x0, torch.from_numpy(rows))["image"]
        torch.manual_seed(3)
        elbo, msi = tr.diffusion.training_losses(den, x0, tr.recommender.item_emb.detach(), feat)
        assert msi.mean().item() > 0                     # the MSI term is there to drop
        torch.testing.assert_close(loss, elbo.mean() + e_loss_factor * msi.mean())
        if ablation == "no_msi":
            assert torch.equal(loss, elbo.mean())


def test_no_dm_graphs_come_from_one_vgae_per_modality(data_dir, tmp_path):
    tr = trainer(data_dir, "--ablation", "no_dm", "--rebuild_k", "2", "--keepRate", "1")
    assert set(tr.generators) == set(tr.data.modalities)
    assert all(isinstance(g, VGAE) for g in tr.generators.values())
    assert not any(isinstance(g, Denoiser) for g in tr.generators.modules())
    before = {m: g.w0.weight.detach().clone() for m, g in tr.generators.items()}
    losses = tr.train_generators()
    assert set(losses) == set(tr.data.modalities) and all(np.isfinite(v) for v in losses.values())
    assert all(not torch.equal(before[m], g.w0.weight) for m, g in tr.generators.items())   # trained

    graphs = tr.rebuild_graphs()
    U = tr.data.n_users
    assert set(graphs) == set(tr.data.modalities)
    feats = tr.recommender.modal_features()
    for m, pair in graphs.items():
        ui = pair["full"].to_dense().numpy()[:U, U:]
        assert ((ui != 0).sum(1) == 2).all()             # every user has rebuild_k generated edges
        vgae = tr.generators[m]
        vgae.eval()
        user_z, item_z = vgae.embeddings(tr.adj, tr.recommender.user_emb.detach(), feats[m].detach())
        expected = torch.topk(user_z @ item_z.T, 2, dim=1).indices.numpy()
        assert [set(r) for r in tr.generated[m].tolist()] == [set(r) for r in expected.tolist()]
        assert {(u, i) for u, i in zip(*np.nonzero(ui))} == {(u, int(i)) for u in range(U) for i in expected[u]}

    # the VGAE loss is finite and differentiable for a batch of user rows
    rows = torch.arange(5)
    x0 = dense_rows(tr.data.train, rows.numpy(), CPU)
    vgae = tr.generators["image"].train()
    loss = vgae.loss(tr.adj, tr.recommender.user_emb.detach(), feats["image"].detach(), rows, x0)
    loss.backward()
    assert torch.isfinite(loss) and vgae.w_mu.weight.grad is not None

    out = tmp_path / "run"
    assert Main.main(tiny_args(data_dir, out, "--ablation", "no_dm", "--rebuild_k", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ablation"] == "no_dm"
    generated = np.load(out / "generated_items.npz")
    assert set(generated.files) == {"image", "text"} and generated["image"].shape == (U, 2)


# ------------------------------------------------------------------------------------------------
# Figure 4 fusion ratio
# ------------------------------------------------------------------------------------------------

def test_fusion_ratio_zero_views_are_the_diffusion_graphs(data_dir):
    tr = trainer(data_dir)
    graphs = tr.rebuild_graphs()
    for pair in graphs.values():
        assert pair["view"] is pair["dropped"]
    # the separate view path with the same matrices gives exactly the fused path's result
    modal = {m: g["dropped"] for m, g in graphs.items()}
    copies = {m: Graph(sp.csr_matrix(g.to_dense().numpy()), CPU) for m, g in modal.items()}
    with torch.no_grad():
        u0, i0, v0 = tr.recommender(tr.adj, modal, with_views=True)
        u1, i1, v1 = tr.recommender(tr.adj, modal, with_views=True, view_graphs=copies)
    torch.testing.assert_close(u0, u1)
    torch.testing.assert_close(i0, i1)
    for (a, b), (c, d) in zip(v0, v1):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)


@pytest.mark.parametrize("keep", ["1", "0.5"])
def test_fusion_ratio_one_views_hold_only_train_edges(data_dir, keep):
    tr = trainer(data_dir, "--fusion_ratio", "1", "--fusion_keep", keep, "--keepRate", "1", "--rebuild_k", "3")
    graphs = tr.rebuild_graphs()
    U = tr.data.n_users
    train_edges = set(zip(*tr.data.train.nonzero()))
    for m, pair in graphs.items():
        view = pair["view"].to_dense().numpy()
        edges = set(zip(*np.nonzero(view[:U, U:])))
        assert edges <= train_edges
        if keep == "1":
            assert edges == train_edges
        else:
            assert 0.3 < len(edges) / len(train_edges) < 0.7
        # the main view's Âm is still the generated graph
        generated = {(u, int(i)) for u in range(U) for i in tr.generated[m][u]}
        assert set(zip(*np.nonzero(pair["dropped"].to_dense().numpy()[:U, U:]))) == generated


def test_fusion_ratio_half_mixes_per_user(data_dir):
    tr = trainer(data_dir, "--fusion_ratio", "0.5", "--fusion_keep", "1", "--keepRate", "1", "--rebuild_k", "1")
    graphs = tr.rebuild_graphs()
    U, train = tr.data.n_users, tr.data.train.toarray()
    kinds = set()
    for m, pair in graphs.items():
        view = pair["view"].to_dense().numpy()[:U, U:] != 0
        for u in range(U):
            items = set(np.flatnonzero(view[u]))
            if items == set(np.flatnonzero(train[u])):
                kinds.add("train")
            else:
                assert items == set(tr.generated[m][u].tolist())
                kinds.add("generated")
    assert kinds == {"train", "generated"}


# ------------------------------------------------------------------------------------------------
# Figure 2 sparsity groups
# ------------------------------------------------------------------------------------------------

def test_groups_partition_the_evaluated_users(data_dir):
    tr = trainer(data_dir, "--groups", "0,3,4")
    tr.graphs = tr.rebuild_graphs()
    result = inference.evaluate_model(tr, tr.data, tr.args)
    groups = result["groups"]
    assert list(groups) == ["0-3", "3-4", "4+"]
    n_eval = len(evaluated_users(tr.data.test))
    assert sum(g["users"] for g in groups.values()) == n_eval
    assert sum(1 for g in groups.values() if g["users"]) >= 2       # the tiny data spans 2-4 train items
    for metric in ("Recall@20", "NDCG@20", "Precision@20"):
        weighted = sum(g["users"] * g[metric] for g in groups.values() if g["users"]) / n_eval
        assert weighted == pytest.approx(result["test"][metric], rel=1e-5, abs=1e-7)
    # the counts are the users' train interactions
    counts = np.diff(tr.data.train.indptr)[evaluated_users(tr.data.test)]
    assert groups["0-3"]["users"] == int((counts < 3).sum()) and groups["4+"]["users"] == int((counts >= 4).sum())


# ------------------------------------------------------------------------------------------------
# Sweeps, figures, reproduce
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(data_dir, tmp_path_factory):
    """Two finished 2-epoch runs on 'tiny': DiffMM and --ablation no_cl."""
    root = tmp_path_factory.mktemp("exp_runs")
    outs = []
    for name, extra in (("full", ()), ("no_cl", ("--ablation", "no_cl"))):
        out = root / name
        assert Main.main(tiny_args(data_dir, out, "--epoch", "2", "--groups", "0,3", *extra)) == 0
        outs.append(out)
    return outs


def test_run_folder_has_groups_curves_and_generated_items(tiny_runs):
    out = tiny_runs[0]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    chosen = summary["protocols"]["validation"]["epoch"]
    assert summary["groups"]["epoch"] == chosen and summary["groups"]["edges"] == [0, 3]
    assert summary["groups"]["per_group"] == records[chosen]["groups"]
    assert is_png(out / "curves.png")
    generated = np.load(out / "generated_items.npz")
    assert generated["image"].shape == (24, 1) and generated["image"].dtype == np.int32


def test_sweep_two_cells_then_nothing_new(data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    base = ["--data", "tiny", "--data_dir", str(data_dir), "--epoch", "1", "--dims", "[16]", "--latdim", "8",
            "--quiet"]
    assert sweep.main(["--grid", "temp=0.1,0.5", "--seeds", "7", "--sweep_dir", str(sweep_dir), *base]) == 0
    for temp in ("0.1", "0.5"):
        assert (sweep_dir / f"temp={temp}" / "seed7" / "summary.json").is_file()
    md = (sweep_dir / "table.md").read_text().splitlines()
    assert len([line for line in md if line.startswith("| 0.")]) == 2
    with open(sweep_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["temp"] for r in rows] == ["0.1", "0.5"] and "test_Recall@20_mean" in rows[0]
    assert is_png(sweep_dir / "sweep.png")
    again = run_plan(GridPlan(sweep_dir, [Sweep.of(sweep_dir, parse_grid(["temp=0.1,0.5"]), [7], base)]))[0]
    assert again.ran == [] and len(again.skipped) == 2


@pytest.mark.slow
def test_model_grid_preset_runs_mmrecs_grid_and_selects_on_validation(data_dir, tmp_path):
    sweep_dir = tmp_path / "mfgrid"
    base = ["--data", "tiny", "--data_dir", str(data_dir), "--epoch", "2", "--quiet"]
    assert sweep.main(["--grid", "mf", "--sweep_dir", str(sweep_dir), *base]) == 0
    values = ["2.0", "1.0", "0.1", "0.01", "0.001", "0.0001", "1e-05"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(f"reg_weight={v}" for v in values)
    summary = json.loads((sweep_dir / "reg_weight=2.0" / "seed421" / "summary.json").read_text())
    assert summary["model"] == "mf" and summary["config"]["reg_weight"] == 2.0
    with open(sweep_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    best_val = max(rows, key=lambda r: float(r["val_Recall@20_mean"]))
    assert f"Selected (best mean validation Recall@20): reg_weight={best_val['reg_weight']}" in \
        (sweep_dir / "table.md").read_text()
    mmrec = run_plan(GridPlan(sweep_dir, [Sweep.of(sweep_dir, named_grid("mf"), [421], base + ["--model", "mf"])]),
                     Options(select="mmrec"))[0]
    assert mmrec.ran == [] and mmrec.selected == max(mmrec.rows, key=lambda r: r["test_Recall@20_mean"])
    assert named_grid("lightgcn") == {"n_layers": ["1", "2", "3", "4"],
                                      "reg_weight": ["0.01", "0.001", "0.0001", "1e-05", "1e-06"]}
    assert sweep.main(["--grid", "nomodel", "--sweep_dir", str(tmp_path / "x"), *base]) == 2


def test_sweep_rejects_bad_grids():
    for bad in (["nonsense=1,2"], ["temp"], ["seed=1,2"]):
        with pytest.raises(ValueError):
            parse_grid(bad)
    assert parse_grid(["temp=0.1,0.5 ssl_reg=1"]) == {"temp": ["0.1", "0.5"], "ssl_reg": ["1"]}


@pytest.mark.slow
def test_every_figure_function_writes_a_png(tiny_runs, tmp_path):
    full, no_cl = tiny_runs
    assert is_png(figures.training_curves(full, tmp_path / "curves.png"))
    assert is_png(figures.group_bars(full, tmp_path / "groups.png"))
    assert is_png(figures.ablation_bars([full, no_cl], tmp_path / "ablation.png"))
    assert is_png(figures.case_study(full, tmp_path / "case.png", modality="text", n_users=2))
    stats = {f"{k}_{stat}": 0.1 for k in ("val_Recall@20", "test_Recall@20", "test_NDCG@20") for stat in ("mean", "std")}
    rows = [{"temp": t, "ssl_reg": s, "seeds": 2, **stats} for t in ("0.1", "0.5") for s in ("1", "0.1")]
    assert is_png(figures.sweep_figure(rows, ["temp", "ssl_reg"], 20, tmp_path / "heat.png"))
    assert is_png(figures.sweep_figure(rows[:2], ["ssl_reg"], 20, tmp_path / "lines.png"))
    assert figures.main([str(full), str(no_cl), "--out", str(tmp_path / "cli_ablation.png")]) == 0
    assert is_png(tmp_path / "cli_ablation.png") and is_png(full / "case_study.png")


def test_reproduce_states_missing_modalities(data_dir, tmp_path, capsys):
    assert reproduce.main(["--table", "3", "--data", "baby", "--data_dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    err = (captured.out + captured.err).strip().splitlines()
    assert "none of the paper's baby feature files" in err[-1] and err[-1].startswith("error:")

    code = reproduce.main(["--table", "2", "--data", "tiktok", "--data_dir", str(data_dir), "--epoch", "1",
                           "--models", "diffmm", "--sweep_dir", str(tmp_path / "t2"), "--dims", "[16]",
                           "--latdim", "8", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "lacks text" in out and "0.1129" in out and "0.0456" in out and "DiffMM Table 2" in out
    assert (tmp_path / "t2" / "comparison.md").is_file()
    # DiffMM ran its published TikTok command (the preset), the explicit flags on top
    config = json.loads((tmp_path / "t2" / "diffmm" / "base" / "seed421" / "summary.json").read_text())["config"]
    assert (config["preset"], config["reg"], config["trans"], config["cl_method"], config["epoch"]) == \
        ("diffmm-tiktok", 1e-4, 1, 1, 1)


@pytest.mark.slow
def test_table2_runs_every_model_and_skips_those_needing_features(data_dir, tmp_path, capsys):
    """Baby here has no feature file: the models without features run, DiffMM and VBPR are skipped with a note."""
    sweep_dir = tmp_path / "t2baby"
    code = reproduce.main(["--table", "2", "--data", "baby", "--data_dir", str(data_dir), "--epoch", "2",
                           "--sweep_dir", str(sweep_dir), "--quiet"])
    assert code == 0
    text = (sweep_dir / "comparison.md").read_text()
    rows = {line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| ")}
    assert {"mf", "lightgcn", "pop"} <= rows and "diffmm" not in rows and "vbpr" not in rows
    assert "- diffmm: skipped" in text and "- vbpr: skipped" in text
    assert "0.0440" in text and "0.0698" in text              # the paper's MF-BPR and LightGCN Recall on Baby
    with open(sweep_dir / "comparison.csv") as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    summary = json.loads((sweep_dir / "mf" / "base" / "seed421" / "summary.json").read_text())
    assert float(table["mf"]["validation_protocol_Recall@20_mean"]) == pytest.approx(
        summary["protocols"]["validation"]["test"]["Recall@20"])
    assert is_png(sweep_dir / "groups.png")
    # finished runs are not rerun
    mtime = (sweep_dir / "mf" / "base" / "seed421" / "summary.json").stat().st_mtime_ns
    assert reproduce.main(["--table", "2", "--data", "baby", "--data_dir", str(data_dir), "--epoch", "2",
                           "--sweep_dir", str(sweep_dir), "--quiet"]) == 0
    assert (sweep_dir / "mf" / "base" / "seed421" / "summary.json").stat().st_mtime_ns == mtime
