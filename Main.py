"""The DiffMM run: load the data, train (denoisers, graph rebuild, recommender), evaluate, report.

    python Main.py                                   # generated data, under 2 minutes on a laptop CPU
    python Main.py --data tiktok --reg 1e-4 --ssl_reg 1e-2 --epoch 50 --trans 1 --e_loss 0.1 --cl_method 1

One epoch (SPEC §6): 1. train every modality's denoiser, 2. regenerate every modality graph,
3. resample negatives and train the recommender, 4. evaluate on validation and test.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from DataHandler import (Data, DataError, dense_rows, load_data, normalized_graph, sample_negatives,
                         train_graph, train_pairs)
from Model import VGAE, Denoiser, GaussianDiffusion, Graph, Recommender, bpr_loss, contrastive_loss
from Params import parse_args
from Utils.helpers import (PhaseTimer, UsageError, cpu_has_bf16_units, device_name, make_run_dir, package_versions,
                           resolve_device, seed_everything, setup_logging)
from Utils.metrics import evaluate, group_metrics, per_user_metrics, popularity_scores
from Utils.synthetic import write_synthetic

log = logging.getLogger("diffmm")
PHASES = ("denoiser", "rebuild", "negatives", "recommender", "evaluation")


@dataclass
class Trainer:
    """Everything one run trains: the recommender, one denoiser per modality, their optimisers."""

    args: argparse.Namespace
    data: Data
    device: torch.device
    adj: Graph
    model: Recommender
    denoisers: torch.nn.ModuleDict
    diffusion: GaussianDiffusion
    optimizer: torch.optim.Optimizer
    denoiser_optimizers: Dict[str, torch.optim.Optimizer]
    rng: np.random.Generator
    # the last rebuild's top items per modality (U x rebuild_k), saved as generated_items.npz
    generated: Dict[str, np.ndarray] = field(default_factory=dict)

    def autocast(self):
        """bf16 autocast of the matrix products when asked for (CPU AMX or CUDA tensor cores)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

    def progress(self, iterable, desc: str):
        return tqdm(iterable, desc=desc, leave=False, disable=self.args.quiet, dynamic_ncols=True)


def build_trainer(args: argparse.Namespace, data: Data, device: torch.device) -> Trainer:
    seed_everything(args.seed)
    features = {m: torch.from_numpy(f) for m, f in data.features.items()}
    model = Recommender(data.n_users, data.n_items, features, args.latdim, args.gnn_layer, args.trans,
                        args.ris_lambda, args.ris_adj_lambda).to(device)
    if args.ablation == "no_dm":  # Table 3 "w/o DM": a VGAE per modality generates the graphs
        pos_weight = (data.n_users * data.n_items - data.train.nnz) / max(data.train.nnz, 1)
        denoisers = torch.nn.ModuleDict({
            m: VGAE(data.n_users, args.latdim, args.latdim, args.latdim, pos_weight) for m in data.modalities
        }).to(device)
    else:
        denoisers = torch.nn.ModuleDict({
            m: Denoiser(data.n_items, args.dims, args.d_emb_size, args.norm) for m in data.modalities
        }).to(device)
    return Trainer(
        args=args, data=data, device=device, adj=Graph(train_graph(data.train), device, symmetric=True), model=model,
        denoisers=denoisers,
        diffusion=GaussianDiffusion(args.noise_scale, args.noise_min, args.noise_max, args.steps, device),
        optimizer=torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=0),
        denoiser_optimizers={m: torch.optim.Adam(d.parameters(), lr=args.lr, weight_decay=0)
                             for m, d in denoisers.items()},
        rng=np.random.default_rng(args.seed),
    )


def user_batches(n: int, batch: int, shuffle: bool) -> List[np.ndarray]:
    """Index batches of size `batch` over range(n), shuffled with torch's seeded generator when asked."""
    order = torch.randperm(n).numpy() if shuffle else np.arange(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def generator_loss(tr: Trainer, generator: torch.nn.Module, x0: torch.Tensor, rows: np.ndarray,
                   modal_feat: torch.Tensor) -> torch.Tensor:
    """The loss of one modality's graph generator on a batch of user rows x0.

    Diffusion: mean ELBO + e_loss * mean MSI (SPEC §5); `--ablation no_msi`: the mean ELBO only.
    `--ablation no_dm`: the VGAE's reconstruction + KL loss on the same rows (Model.VGAE).
    Recommender tables and `modal_feat` are read detached.
    """
    if isinstance(generator, VGAE):
        return generator.loss(tr.adj, tr.model.user_emb.detach(), modal_feat,
                              torch.from_numpy(rows).to(tr.device), x0)
    elbo, msi = tr.diffusion.training_losses(generator, x0, tr.model.item_emb.detach(), modal_feat)
    if tr.args.ablation == "no_msi":
        return elbo.mean()
    return elbo.mean() + tr.args.e_loss * msi.mean()


def train_denoisers(tr: Trainer) -> Dict[str, float]:
    """SPEC §6.1: one pass of every denoiser (or VGAE with --ablation no_dm) over all users; mean loss per modality."""
    args = tr.args
    tr.denoisers.train()
    with torch.no_grad():  # the recommender's tables are read, not trained, here
        modal_feats = tr.model.modal_features()
    totals = {m: torch.zeros((), device=tr.device) for m in tr.data.modalities}
    batches = user_batches(tr.data.n_users, args.batch, True)
    for rows in tr.progress(batches, "denoisers"):
        x0 = dense_rows(tr.data.train, rows, tr.device)
        loss = 0.0
        for m, denoiser in tr.denoisers.items():
            tr.denoiser_optimizers[m].zero_grad(set_to_none=True)
            with tr.autocast():
                loss_m = generator_loss(tr, denoiser, x0, rows, modal_feats[m])
            totals[m] += loss_m.detach()
            loss = loss + loss_m
        loss.backward()
        for opt in tr.denoiser_optimizers.values():
            opt.step()
    return {m: float(v) / len(batches) for m, v in totals.items()}


def drop_edges(graph: sp.csr_matrix, keep_rate: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep each stored entry (self-loops included) with probability keep_rate, scaling kept ones by 1/keep_rate."""
    if keep_rate >= 1.0:
        return graph
    coo = graph.tocoo()
    keep = rng.random(coo.nnz) < keep_rate
    return sp.csr_matrix((coo.data[keep] / keep_rate, (coo.row[keep], coo.col[keep])), shape=graph.shape)


@torch.no_grad()
def generate_top_items(tr: Trainer, denoiser: torch.nn.Module, modality: Optional[str] = None) -> torch.Tensor:
    """SPEC §5 sampling: the top rebuild_k items of every user's denoised train row (U x k indices).

    With a VGAE (--ablation no_dm; `modality` names its features): every user's top rebuild_k items
    by the decoder score σ(z_u · z_i), z = μ of the encoder.
    """
    denoiser.eval()
    if isinstance(denoiser, VGAE):
        user_z, item_z = denoiser.embeddings(tr.adj, tr.model.user_emb.detach(), tr.model.modal_features()[modality])
    # one buffer for all users: per-batch results kept between the batch x items tensors fragment the heap
    top = torch.empty(tr.data.n_users, tr.args.rebuild_k, dtype=torch.long, device=tr.device)
    for rows in tr.progress(user_batches(tr.data.n_users, tr.args.batch, False), "rebuild"):
        idx = torch.from_numpy(rows).to(tr.device)
        if isinstance(denoiser, VGAE):
            scores = user_z[idx] @ item_z.T
        else:
            with tr.autocast():
                scores = tr.diffusion.p_sample(denoiser, dense_rows(tr.data.train, rows, tr.device),
                                               tr.args.sampling_steps, tr.args.sampling_noise)
        top[idx] = torch.topk(scores, tr.args.rebuild_k, dim=1).indices
    denoiser.train()
    return top


def fused_view_graph(train: sp.csr_matrix, top: np.ndarray, ratio: float, train_keep: float, keep_rate: float,
                     rng: np.random.Generator) -> sp.csr_matrix:
    """The graph of one modality's contrastive view for --fusion_ratio r > 0 (paper Figure 4).

    Every user independently, with probability r, takes its train edges, each kept with probability
    `train_keep` (random edge-drop augmentation); otherwise it takes its rebuild_k generated edges
    `top[u]`. The union is normalised (SPEC §2) and edge-dropped with keepRate like the generated graph.
    r = 1: a randomly dropped train graph only; r = 0 would be the generated graph (not called then).
    """
    n_users, n_items = train.shape
    random_users = rng.random(n_users) < ratio
    gen_users = np.repeat(np.arange(n_users), top.shape[1])
    keep_gen = ~random_users[gen_users]
    coo = train.tocoo()
    keep_train = random_users[coo.row] & (rng.random(coo.nnz) < train_keep)
    users = np.concatenate([gen_users[keep_gen], coo.row[keep_train]])
    items = np.concatenate([top.ravel()[keep_gen], coo.col[keep_train]])
    return drop_edges(normalized_graph(users, items, n_users, n_items), keep_rate, rng)


def rebuild_graphs(tr: Trainer) -> Dict[str, Dict[str, Graph]]:
    """SPEC §6.2: every modality graph Âm from its denoiser, normalised, then edge-dropped.

    Returns, per modality, the dropped graph (used in training), the full one (for --eval_graph full)
    and the contrastive views' graph ("view": the dropped graph itself unless --fusion_ratio > 0).
    The top items are kept in `tr.generated`.
    """
    n_users, n_items = tr.data.n_users, tr.data.n_items
    args = tr.args
    graphs = {}
    for m, denoiser in tr.denoisers.items():
        top = generate_top_items(tr, denoiser, m).cpu().numpy()
        tr.generated[m] = top
        users = np.repeat(np.arange(n_users), top.shape[1])
        full = normalized_graph(users, top.ravel(), n_users, n_items)
        graphs[m] = {"full": full, "dropped": drop_edges(full, args.keepRate, tr.rng)}
        if args.fusion_ratio > 0:
            graphs[m]["view"] = fused_view_graph(tr.data.train, top, args.fusion_ratio, args.fusion_keep,
                                                 args.keepRate, tr.rng)
    out = {m: {k: Graph(g, tr.device) for k, g in pair.items()} for m, pair in graphs.items()}
    for pair in out.values():
        pair.setdefault("view", pair["dropped"])  # r = 0: the views use Âm itself
    return out


def train_recommender(tr: Trainer, modal_graphs: Dict[str, Graph], pairs: tuple,
                      negatives: np.ndarray, view_graphs: Optional[Dict[str, Graph]] = None) -> Dict[str, float]:
    """SPEC §4 and §6.3: BPR + reg + contrastive loss over shuffled batches of (user, pos, neg).

    `view_graphs`: the contrastive views' graphs (--fusion_ratio); None = the modal graphs.
    `--ablation no_cl`: no contrastive term and the views are not computed.
    """
    args = tr.args
    users = torch.from_numpy(pairs[0]).to(tr.device)
    positives = torch.from_numpy(pairs[1]).to(tr.device)
    negatives = torch.from_numpy(negatives).to(tr.device)
    with_views = args.ssl_reg != 0 and args.ablation != "no_cl"
    tr.model.train()
    totals = torch.zeros(3, device=tr.device)
    batches = user_batches(len(users), args.batch, True)
    for rows in tr.progress(batches, "recommender"):
        idx = torch.from_numpy(rows).to(tr.device)
        u, p, n = users[idx], positives[idx], negatives[idx]
        tr.optimizer.zero_grad(set_to_none=True)
        with tr.autocast():
            user_vec, item_vec, views = tr.model(tr.adj, modal_graphs, with_views=with_views,
                                                 view_graphs=view_graphs)
        user_vec, item_vec = user_vec.float(), item_vec.float()
        bpr = bpr_loss(user_vec, item_vec, u, p, n, args.batch)
        reg = args.reg * tr.model.reg_loss()
        cl = (args.ssl_reg * contrastive_loss(user_vec, item_vec, [(a.float(), b.float()) for a, b in views],
                                              u, p, args.cl_method, args.temp)
              if with_views else torch.zeros((), device=tr.device))
        (bpr + reg + cl).backward()
        tr.optimizer.step()
        totals += torch.stack([bpr.detach(), reg.detach(), cl.detach()])
    bpr, reg, cl = (totals / len(batches)).tolist()
    return {"bpr": bpr, "reg": reg, "cl": cl, "loss": bpr + reg + cl}


@torch.no_grad()
def evaluate_epoch(tr: Trainer, modal_graphs: Dict[str, Graph]) -> Dict[str, dict]:
    """SPEC §7: all-rank metrics on validation and test from one forward pass.

    Per-user metrics are computed once per split and averaged overall ('val', 'test') and, for test,
    per user group by number of train interactions ('groups', paper Figure 2, edges --groups).
    """
    tr.model.eval()
    with tr.autocast():
        user_vec, item_vec, _ = tr.model(tr.adj, modal_graphs)
    out: Dict[str, dict] = {}
    for split, heldout in (("val", tr.data.val), ("test", tr.data.test)):
        users, values = per_user_metrics(user_vec, item_vec, tr.data.train, heldout, tr.args.topks, tr.args.tstBat)
        out[split] = {name: float(v.mean()) for name, v in values.items()}
        if split == "test":
            counts = np.diff(tr.data.train.indptr)
            out["groups"] = group_metrics(counts[users], values, tr.args.groups)
    return out


def load_run_data(args: argparse.Namespace) -> Data:
    data_dir = Path(args.data_dir)
    if args.data == "synthetic" and not (data_dir / "synthetic" / "trnMat.pkl").is_file():
        log.info(f"writing the generated dataset to {data_dir / 'synthetic'} (generated, not real data)")
        write_synthetic(data_dir / "synthetic")
    data = load_data(args.data, data_dir, args.modalities)
    if args.rebuild_k > data.n_items:
        raise UsageError(f"--rebuild_k {args.rebuild_k} exceeds the {data.n_items} items of {args.data}.")
    return data


def fmt(metrics: Dict[str, float], k: int) -> str:
    return " ".join(f"{name}@{k}={metrics[f'{name}@{k}']:.4f}" for name in ("Recall", "NDCG", "Precision"))


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate one configuration; write the run folder; return the summary."""
    device = resolve_device(args.device, args.gpu)
    data = load_run_data(args)
    run_dir = make_run_dir(args.out_dir, args.data)
    setup_logging(run_dir, args.quiet)
    log.info("configuration: " + json.dumps(vars(args), sort_keys=True))
    log.info(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.train.nnz} train / "
             f"{data.val.nnz} val / {data.test.nnz} test interactions; modalities "
             f"{', '.join(f'{m} ({f.shape[1]}-d)' for m, f in data.features.items())}; device {device_name(device)}")

    if args.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        log.warning("warning: this CPU has no bf16 matrix units (no AMX or AVX512-BF16), so --precision bf16 "
                    "runs much slower than fp32 here")
    tr = build_trainer(args, data, device)
    pairs = train_pairs(data.train)
    k = args.topk
    popularity = {split: evaluate(*popularity_scores(data.train, device), data.train, heldout, args.topks, args.tstBat)
                  for split, heldout in (("val", data.val), ("test", data.test))}
    log.info(f"popularity baseline, test: {fmt(popularity['test'], k)}")

    history, best = [], {"paper": None, "validation": None}
    stale = 0
    metrics_file = open(run_dir / "metrics.jsonl", "w")
    for epoch in range(args.epoch):
        timer = PhaseTimer(device)
        with timer.phase("denoiser"):
            denoiser_loss = train_denoisers(tr)
        with timer.phase("rebuild"):
            graphs = rebuild_graphs(tr)
        with timer.phase("negatives"):
            negatives = sample_negatives(data.train, pairs[0], tr.rng)
        with timer.phase("recommender"):
            losses = train_recommender(tr, {m: g["dropped"] for m, g in graphs.items()}, pairs, negatives,
                                       view_graphs={m: g["view"] for m, g in graphs.items()})
        record = {"epoch": epoch, "loss": losses, "denoiser_loss": denoiser_loss}
        if epoch % args.tstEpoch == 0 or epoch == args.epoch - 1:
            with timer.phase("evaluation"):
                record.update(evaluate_epoch(tr, {m: g[args.eval_graph] for m, g in graphs.items()}))
        record["seconds"] = dict(timer.seconds, epoch=sum(timer.seconds.values()))
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

        line = f"epoch {epoch}/{args.epoch}: loss {losses['loss']:.4f} (bpr {losses['bpr']:.4f}, cl {losses['cl']:.4f})"
        line += f", {record['seconds']['epoch']:.1f}s"
        if "test" in record:
            line += f" | val {fmt(record['val'], k)} | test {fmt(record['test'], k)}"
            if best["paper"] is None or record["test"][f"Recall@{k}"] > best["paper"]["test"][f"Recall@{k}"]:
                best["paper"] = record
            if best["validation"] is None or record["val"][f"Recall@{k}"] > best["validation"]["val"][f"Recall@{k}"]:
                best["validation"], stale = record, 0
                if args.save_model:
                    save_checkpoint(tr, run_dir / "best_model.pt", epoch)
            else:
                stale += 1
        log.info(line)
        if args.patience and stale >= args.patience:
            log.info(f"early stop: validation Recall@{k} did not improve for {args.patience} evaluations")
            break
    metrics_file.close()
    # the last epoch's generated top items per modality (U x rebuild_k), for the Figure 5 case study
    np.savez_compressed(run_dir / "generated_items.npz", **{m: t.astype(np.int32) for m, t in tr.generated.items()})

    summary = make_summary(args, data, device, history, best, popularity)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report(summary, run_dir)
    write_curves(run_dir)
    return summary


def write_curves(run_dir: Path) -> None:
    """Training curves (losses, val/test metrics per epoch) as run_dir/curves.png; a failure only warns."""
    try:
        from Utils.figures import training_curves
        training_curves(run_dir)
    except Exception as e:  # a figure must never fail a finished run
        log.warning(f"could not draw the training curves ({type(e).__name__}: {e})")


def save_checkpoint(tr: Trainer, path: Path, epoch: int) -> None:
    torch.save({"epoch": epoch, "config": vars(tr.args), "recommender": tr.model.state_dict(),
                "denoisers": tr.denoisers.state_dict()}, path)


def make_summary(args: argparse.Namespace, data: Data, device: torch.device, history: List[dict], best: dict,
                 popularity: dict) -> dict:
    phases = {p: [h["seconds"].get(p, 0.0) for h in history] for p in PHASES + ("epoch",)}
    evaluated = [h for h in history if "test" in h]
    return {
        "data": {"name": data.name, "users": data.n_users, "items": data.n_items, "train": int(data.train.nnz),
                 "val": int(data.val.nnz), "test": int(data.test.nnz), "modalities": data.modalities},
        "protocols": {
            "paper": {"description": "epoch with the best test Recall (the authors' protocol)",
                      "epoch": best["paper"]["epoch"], "test": best["paper"]["test"], "val": best["paper"]["val"]},
            "validation": {"description": "epoch with the best validation Recall; test reported at that epoch",
                           "epoch": best["validation"]["epoch"], "val": best["validation"]["val"],
                           "test": best["validation"]["test"]},
        },
        "groups": {"description": "test metrics per user group by number of train interactions ([low, high) "
                                  "each, the last open-ended) at the validation protocol's epoch (paper Figure 2)",
                   "epoch": (best["validation"] or {}).get("epoch"), "edges": list(args.groups),
                   "per_group": (best["validation"] or {}).get("groups")},
        "baselines": {"popularity": popularity},
        "epochs_run": len(history),
        "evaluations": len(evaluated),
        "config": vars(args),
        "timing": {"seconds_per_epoch_mean": float(np.mean(phases["epoch"])),
                   "seconds_per_phase_mean": {p: float(np.mean(v)) for p, v in phases.items() if p != "epoch"},
                   "per_epoch": [h["seconds"] for h in history],
                   "total": float(np.sum(phases["epoch"]))},
        "device": device_name(device),
        "versions": package_versions(),
    }


def report(summary: dict, run_dir: Path) -> None:
    k = summary["config"]["topk"]
    paper, val = summary["protocols"]["paper"], summary["protocols"]["validation"]
    pop = summary["baselines"]["popularity"]["test"]
    log.info(f"paper protocol      (best test epoch {paper['epoch']}): test {fmt(paper['test'], k)}")
    log.info(f"validation protocol (best val epoch {val['epoch']}): test {fmt(val['test'], k)}")
    log.info(f"popularity baseline: test {fmt(pop, k)}")
    log.info(f"DiffMM test Recall@{k} {val['test'][f'Recall@{k}']:.4f} vs popularity {pop[f'Recall@{k}']:.4f} "
             f"(validation protocol); {summary['timing']['seconds_per_epoch_mean']:.2f}s per epoch; "
             f"run folder {run_dir}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(None, args.quiet)
    try:
        run(args)
    except (DataError, UsageError) as e:
        log.error(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
