"""Every command-line flag of DiffMM, grouped, with the paper symbol it stands for.

The authors' flags keep their names, types and defaults (SPEC §8). Two of their defects are fixed
here: booleans are parsed as booleans (their `type=bool` turned `--norm False` ON) and `--dims` is
parsed as a list literal instead of `eval`-ed.
"""
from __future__ import annotations

import argparse
import ast
from typing import List, Optional, Sequence


def str2bool(text: str) -> bool:
    """Parse a command-line boolean: true/false, yes/no, on/off, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("true", "t", "yes", "y", "on", "1"):
        return True
    if value in ("false", "f", "no", "n", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def int_list(text: str) -> List[int]:
    """Parse '[1000]', '[1000, 500]', '1000,500' or '1000' into a list of ints, without eval."""
    text = text.strip()
    try:
        value = ast.literal_eval(text) if text.startswith("[") else [int(v) for v in text.split(",") if v.strip()]
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected a list of integers such as [1000], got {text!r}")
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
        raise argparse.ArgumentTypeError(f"expected a list of positive integers such as [1000], got {text!r}")
    return value


def name_list(text: str) -> List[str]:
    """Parse 'image,audio' into ['image', 'audio']."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DiffMM: multi-modal graph diffusion for recommendation (ACM MM 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", type=str,
                   help="dataset folder name under --data_dir (tiktok, baby, sports, ...); 'synthetic' is "
                        "generated on first use")
    g.add_argument("--data_dir", default="Datasets", type=str, help="folder holding one sub-folder per dataset")
    g.add_argument("--modalities", default=None, type=name_list,
                   help="comma-separated modalities to use (default: every <name>_feat.npy[.zip] present)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", default=1e-3, type=float, help="learning rate of every Adam optimiser")
    g.add_argument("--batch", default=1024, type=int, help="training batch size (pairs and users)")
    g.add_argument("--tstBat", default=256, type=int, help="number of users per evaluation batch")
    g.add_argument("--reg", default=1e-5, type=float, help="λ2: weight decay on the ID embedding tables")
    g.add_argument("--epoch", default=50, type=int, help="number of epochs")
    g.add_argument("--seed", default=421, type=int, help="random seed")

    g = p.add_argument_group("recommender")
    g.add_argument("--latdim", default=64, type=int, help="d: embedding size")
    g.add_argument("--gnn_layer", default=1, type=int, help="L: propagation layers on the train graph")
    g.add_argument("--trans", default=0, type=int, choices=[0, 1, 2],
                   help="feature transform: 0 = LeakyReLU(F W), 1 = Linear(F), 2 = image as 0, others as 1")
    g.add_argument("--ris_lambda", default=0.5, type=float, help="ω (Eq. 23): weight of the normalised fused view")
    g.add_argument("--ris_adj_lambda", default=0.2, type=float, help="weight of the generated-graph term per modality")
    g.add_argument("--keepRate", default=0.5, type=float, help="edge keep rate of the generated graphs")

    g = p.add_argument_group("contrastive learning")
    g.add_argument("--ssl_reg", default=1e-2, type=float, help="λ1: weight of the contrastive loss")
    g.add_argument("--temp", default=0.5, type=float, help="τ: InfoNCE temperature")
    g.add_argument("--cl_method", default=0, type=int, choices=[0, 1],
                   help="0 = modality views contrasted pairwise; 1 = main view as anchor")

    g = p.add_argument_group("diffusion")
    g.add_argument("--dims", default="[1000]", type=int_list, help="hidden sizes of the denoiser MLP")
    g.add_argument("--d_emb_size", default=10, type=int, help="size of the diffusion-step embedding")
    g.add_argument("--norm", default=False, type=str2bool, help="L2-normalise the denoiser input")
    g.add_argument("--steps", default=5, type=int, help="T: diffusion steps")
    g.add_argument("--noise_scale", default=0.1, type=float, help="s: noise scale")
    g.add_argument("--noise_min", default=0.0001, type=float, help="γmin: lower noise bound")
    g.add_argument("--noise_max", default=0.02, type=float, help="γmax: upper noise bound")
    g.add_argument("--sampling_noise", default=False, type=str2bool, help="add noise in reverse sampling")
    g.add_argument("--sampling_steps", default=0, type=int, help="T': forward steps before reverse sampling")
    g.add_argument("--rebuild_k", default=1, type=int, help="k: items kept per user in a generated graph")
    g.add_argument("--e_loss", default=0.1, type=float, help="λ0: weight of the MSI loss (Eq. 14)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--topk", default=20, type=int, help="K of Recall/NDCG/Precision@K")
    g.add_argument("--topks", default=None, type=int_list, help="more cut-offs, e.g. 10,20,50 (topk is always included)")
    g.add_argument("--tstEpoch", default=1, type=int, help="evaluate every this many epochs")
    g.add_argument("--patience", default=0, type=int,
                   help="stop after this many evaluations without a better validation Recall@topk (0 = off)")
    g.add_argument("--eval_graph", default="dropped", choices=["dropped", "full"],
                   help="generated graphs used at evaluation: 'dropped' (authors: after the random edge drop) or "
                        "'full' (the same graphs before the drop, so evaluation is not random)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when present")
    g.add_argument("--gpu", default="0", type=str, help="CUDA device index used when the device is CUDA")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 = autocast matrix products to bfloat16 (losses, schedule and metrics stay fp32)")
    g.add_argument("--out_dir", default=None, type=str, help="run folder (default runs/<data>-<timestamp>)")
    g.add_argument("--quiet", default=False, type=str2bool, nargs="?", const=True, help="no progress bars")
    g.add_argument("--save_model", default=True, type=str2bool, help="save the best model's checkpoint")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (or `argv`) into the arguments object passed through the whole run."""
    args = build_parser().parse_args(argv)
    topks = sorted(set([args.topk] + (args.topks or [])))
    args.topks = topks
    return args
