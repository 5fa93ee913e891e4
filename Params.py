"""Every command-line flag, grouped, with the paper symbol it stands for.

The harness's flags (data, optimisation, evaluation, run) are here, then DiffMM's (`add_diffmm_args`);
every other model declares its own group next to its code (`Models/<name>.py`, `add_args`), and
`--model NAME --help` lists them. DiffMM's flags keep the authors' names, types and defaults. Two of
their defects are fixed here: booleans are parsed as booleans (their `type=bool` turned `--norm False` ON) and `--dims` is
parsed as a list literal instead of `eval`-ed.
"""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from Utils.helpers import parse_threads


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
    if not isinstance(value, list) or not value or not all(type(v) is int and v > 0 for v in value):
        raise argparse.ArgumentTypeError(f"expected a list of positive integers such as [1000], got {text!r}")
    return value


def float_list(text: str) -> List[float]:
    """Parse '0.1,0.9', '[0.1, 0.9]' or '0.1' into a list of finite floats, without eval."""
    text = text.strip()
    message = f"expected a list of numbers such as 0.1,0.9 or [0.1, 0.9], got {text!r}"
    try:
        value = ast.literal_eval(text) if text.startswith("[") else [float(v) for v in text.split(",") if v.strip()]
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(message)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not all(float("-inf") < v < float("inf") for v in value)):
        raise argparse.ArgumentTypeError(message)
    return [float(v) for v in value]


def name_list(text: str) -> List[str]:
    """Parse 'image,audio' into ['image', 'audio']."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def unit_float(text: str) -> float:
    """Parse a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def group_edges(text: str) -> List[int]:
    """Parse '0,5,10,20,50' into strictly increasing non-negative ints starting at 0 (0 is added if absent)."""
    try:
        edges = [int(v) for v in text.replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,5,10,20,50, got {text!r}")
    if not edges or any(e < 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise argparse.ArgumentTypeError(f"expected strictly increasing non-negative integers such as "
                                         f"0,5,10,20,50, got {text!r}")
    return edges if edges[0] == 0 else [0] + edges


# ---------------------------------------------------------------------------------------------
# The published commands: `--preset NAME` = (model, data, flags); flags given explicitly still win
# ---------------------------------------------------------------------------------------------

PRESETS: Dict[str, Tuple[str, str, List[str]]] = {
    # DiffMM's README
    "diffmm-tiktok": ("diffmm", "tiktok", ["--reg", "1e-4", "--ssl_reg", "1e-2", "--epoch", "50", "--trans", "1",
                                           "--e_loss", "0.1", "--cl_method", "1"]),
    "diffmm-baby": ("diffmm", "baby", ["--reg", "1e-5", "--ssl_reg", "1e-1", "--keepRate", "1", "--e_loss", "0.01"]),
    "diffmm-sports": ("diffmm", "sports", ["--reg", "1e-6", "--ssl_reg", "1e-2", "--temp", "0.1", "--ris_lambda", "0.1",
                                           "--e_loss", "0.5", "--keepRate", "1", "--trans", "1"]),
    # MDMNS's README (its Sports command gives --temp 0.1 twice)
    "mdmns-tiktok": ("mdmns", "tiktok", ["--reg", "1e-4", "--ssl_reg", "1e-2", "--epoch", "50", "--trans", "1",
                                         "--e_loss", "0.1", "--cl_method", "1", "--latdim", "512", "--gnn_layer", "1",
                                         "--temp", "0.5", "--steps", "5"]),
    "mdmns-baby": ("mdmns", "baby", ["--reg", "1e-5", "--ssl_reg", "1e-1", "--keepRate", "1", "--e_loss", "0.01",
                                     "--gnn_layer", "2", "--latdim", "256", "--temp", "0.5", "--steps", "20"]),
    "mdmns-sports": ("mdmns", "sports", ["--reg", "1e-6", "--ssl_reg", "1e-2", "--temp", "0.1", "--ris_lambda", "0.1",
                                         "--e_loss", "0.5", "--keepRate", "1", "--trans", "1", "--gnn_layer", "1",
                                         "--latdim", "256", "--steps", "5"]),
    # MMSSL's README gives only `--dataset NAME`: its defaults are the Baby block of the first upload's
    # parser; the TikTok and Sports blocks of that parser differ from them in these flags
    "mmssl-tiktok": ("mmssl", "tiktok", ["--lr", "5.4e-4", "--G_rate", "1.8e-3", "--real_data_tau", "0.002",
                                         "--m_topk_rate", "0.01"]),
    "mmssl-baby": ("mmssl", "baby", []),
    "mmssl-sports": ("mmssl", "sports", ["--lr", "5e-4", "--real_data_tau", "0.002", "--T", "2",
                                         "--m_topk_rate", "0.02"]),
}


def preset_of(argv: Sequence[str]) -> Optional[str]:
    """The value of --preset in a command line, without parsing the rest."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=None)
    return pre.parse_known_args(list(argv))[0].preset


def expand_preset(argv: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """`argv` with its preset's flags put in front (so explicit flags, parsed later, win), or a problem sentence."""
    name = preset_of(argv)
    if name is None:
        return list(argv), None
    if name not in PRESETS:
        return list(argv), f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}"
    model, data, flags = PRESETS[name]
    given = model_of(argv) if "--model" in argv or any(a.startswith("--model=") for a in argv) else model
    if given != model:
        return list(argv), f"--preset {name} is {model}'s published command, but --model {given} was given"
    return ["--model", model, "--data", data, *flags, *argv], None


def build_parser(model: str = "diffmm") -> argparse.ArgumentParser:
    """The harness's flags plus `model`'s own group (its class's `add_args`), with the model's defaults."""
    from Models import get_model, model_names

    p = argparse.ArgumentParser(
        description="Train and evaluate one recommender (default DiffMM: multi-modal graph diffusion for "
                    "recommendation, ACM MM 2024). `--model NAME --help` shows that model's own flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="diffmm", choices=model_names(), metavar="NAME",
                   help="the model to train: " + "; ".join(f"{n} = {get_model(n).paper}" for n in model_names()))

    g.add_argument("--preset", default=None, metavar="NAME",
                   help="a published command: " + ", ".join(PRESETS) + " (sets --model, --data and that command's "
                        "flags; flags given explicitly still win)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", type=str,
                   help="dataset folder name under --data_dir (tiktok, baby, sports, ...); 'synthetic' is "
                        "generated on first use")
    g.add_argument("--data_dir", default="Datasets", type=str, help="folder holding one sub-folder per dataset")
    g.add_argument("--modalities", default=None, type=name_list,
                   help="comma-separated modalities to use (default: every <name>_feat.npy[.zip] present)")
    g.add_argument("--format", default="auto", choices=["auto", "diffmm", "mmrec", "mmssl"],
                   help="layout of the dataset folder (Datasets/README.md); auto = detected from the files present")

    g = p.add_argument_group("optimisation (every model)")
    g.add_argument("--lr", default=1e-3, type=float, help="learning rate (of every Adam)")
    g.add_argument("--batch", default=1024, type=int, help="training batch size (pairs; users for DiffMM's denoisers)")
    g.add_argument("--epoch", default=50, type=int, help="number of epochs (at most, with --patience)")
    g.add_argument("--seed", default=421, type=int, help="random seed")

    g = p.add_argument_group("evaluation (every model)")
    g.add_argument("--topk", default=20, type=int, help="K of Recall/NDCG/Precision@K")
    g.add_argument("--topks", default=None, type=int_list, help="more cut-offs, e.g. 10,20,50 (topk is always included)")
    g.add_argument("--tstBat", default=256, type=int, help="number of users per evaluation batch")
    g.add_argument("--tstEpoch", default=1, type=int, help="evaluate every this many epochs")
    g.add_argument("--patience", default=0, type=int,
                   help="stop after this many evaluations without a better validation Recall@topk (0 = off)")
    g.add_argument("--groups", default="0,5,10,20,50", type=group_edges,
                   help="paper Figure 2: edges of the user groups by number of train interactions, [a, b) each "
                        "and the last open-ended (0,5,10,20,50 = 0-5, 5-10, 10-20, 20-50, 50+)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when present")
    g.add_argument("--gpu", default="0", type=str, help="CUDA device index used when the device is CUDA")
    g.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="bf16 = autocast matrix products to bfloat16 (losses, schedule and metrics stay fp32); "
                        "tf32 = fp32 tensors with TF32 tensor-core matrix products (CUDA only)")
    g.add_argument("--threads", default="auto", type=parse_threads, metavar="auto|N",
                   help="CPU threads of the run: auto = the CPUs this process may use (its affinity mask), never "
                        "more than torch's default; on a shared machine or with several runs at once give each run "
                        "its share (README, Shared machines and several runs)")
    g.add_argument("--kernels", default="fast", choices=["fast", "plain"],
                   help="fast = the hand-written kernels of Utils/kernels.py (sparse products with a precomputed "
                        "transpose, fused InfoNCE); plain = torch's straightforward autograd, the reference that "
                        "`Experiments.benchmark --compare` measures them against (same math)")
    g.add_argument("--out_dir", default=None, type=str, help="run folder (default runs/<data>-<model>-<timestamp>)")
    g.add_argument("--quiet", default=False, type=str2bool, nargs="?", const=True, help="no progress bars")
    g.add_argument("--save_model", default=True, type=str2bool, help="save the best model's checkpoint")
    g.add_argument("--keep_last", default=True, type=str2bool,
                   help="keep last.pt (the state --resume continues from) when the run finishes; false deletes it "
                        "then (an interrupted or stopped run keeps it), keeping best_model.pt; sweeps and reproduce "
                        "default to false")
    g.add_argument("--resume", default=None, type=str, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last completed epoch (its configuration is used; "
                        "every other flag is ignored but --epoch, a new total number of epochs)")

    model_class = get_model(model)
    model_class.add_args(p)
    p.set_defaults(**model_class.defaults)
    return p


def add_diffmm_args(p: argparse.ArgumentParser) -> None:
    """DiffMM's flags: the authors' names, types and defaults (their parser.py)."""
    g = p.add_argument_group("diffmm: recommender")
    g.add_argument("--reg", default=1e-5, type=float, help="λ2: weight decay on the ID embedding tables")
    g.add_argument("--latdim", default=64, type=int, help="d: embedding size")
    g.add_argument("--gnn_layer", default=1, type=int, help="L: propagation layers on the train graph")
    g.add_argument("--trans", default=0, type=int, choices=[0, 1, 2],
                   help="feature transform: 0 = LeakyReLU(F W), 1 = Linear(F), 2 = image as 0, others as 1")
    g.add_argument("--ris_lambda", default=0.5, type=float, help="ω (Eq. 23): weight of the normalised fused view")
    g.add_argument("--ris_adj_lambda", default=0.2, type=float, help="weight of the generated-graph term per modality")
    g.add_argument("--keepRate", default=0.5, type=float, help="edge keep rate of the generated graphs")
    g.add_argument("--eval_graph", default="dropped", choices=["dropped", "full"],
                   help="generated graphs used at evaluation: 'dropped' (authors: after the random edge drop) or "
                        "'full' (the same graphs before the drop, so evaluation is not random)")

    g = p.add_argument_group("diffmm: contrastive learning")
    g.add_argument("--ssl_reg", default=1e-2, type=float, help="λ1: weight of the contrastive loss")
    g.add_argument("--temp", default=0.5, type=float, help="τ: InfoNCE temperature")
    g.add_argument("--cl_method", default=0, type=int, choices=[0, 1],
                   help="0 = modality views contrasted pairwise; 1 = main view as anchor")

    g = p.add_argument_group("diffmm: diffusion")
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
    g.add_argument("--reverse", default="auto", choices=["auto", "direct", "hidden"],
                   help="reverse process of the graph rebuild: hidden = in the denoiser's hidden space (exact with "
                        "--norm false and --sampling_noise false: same rows to float rounding, two items-wide "
                        "products per batch instead of two per step); direct = step by step on the item rows, as "
                        "the authors; auto = hidden where it is exact and costs fewer multiply-adds for these "
                        "shapes (wide catalogues), else direct")
    g.add_argument("--e_loss", default=0.1, type=float, help="λ0: weight of the MSI loss (Eq. 14)")

    g = p.add_argument_group("diffmm: experiments", "the paper's ablations and fusion ratio "
                                                    "(README, section Paper experiments)")
    g.add_argument("--ablation", default="none", choices=["none", "no_cl", "no_msi", "no_dm"],
                   help="paper Table 3: no_cl = no contrastive term (views not computed); no_msi = the MSI term "
                        "of the diffusion loss dropped (as e_loss 0); no_dm = a VGAE per modality (Kipf & "
                        "Welling 2016) generates the modality graphs instead of the diffusion model")
    g.add_argument("--fusion_ratio", default=0.0, type=unit_float,
                   help="paper Figure 4: graphs of the contrastive views only (not the main view). Per epoch, "
                        "modality and user, with probability r the user's view edges are its train edges, each "
                        "kept with probability --fusion_keep (random edge drop), else its rebuild_k generated "
                        "edges; the union is normalised and edge-dropped (keepRate) like the generated graph. "
                        "0 = the generated graph itself (diffusion only), 1 = randomly dropped train graph only")
    g.add_argument("--fusion_keep", default=0.5, type=unit_float,
                   help="paper Figure 4: keep probability of each train edge in the random augmentation used by "
                        "--fusion_ratio > 0")


def impossible_value(args: argparse.Namespace) -> Optional[str]:
    """The first flag whose value cannot give a meaningful run, as one sentence, or None."""
    positive = ("epoch", "batch", "tstBat", "tstEpoch", "topk", "steps", "d_emb_size", "latdim", "rebuild_k",
                "embedding_size")
    for name in positive:
        if hasattr(args, name) and getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    for name in ("gnn_layer", "patience", "n_layers"):
        if hasattr(args, name) and getattr(args, name) < 0:
            return f"--{name} must be 0 or more, got {getattr(args, name)}"
    if args.lr < 0.0:
        return f"--lr must not be negative, got {args.lr}"
    if args.model != "diffmm":
        return None
    if not 0 <= args.sampling_steps <= args.steps:
        return f"--sampling_steps must be between 0 and --steps ({args.steps}), got {args.sampling_steps}"
    if not 0.0 < args.keepRate <= 1.0:
        return f"--keepRate must be in (0, 1] (the share of generated edges kept), got {args.keepRate}"
    if not args.temp > 0.0:
        return f"--temp must be positive (InfoNCE divides by it), got {args.temp}"
    noise = (args.noise_scale, args.noise_min, args.noise_max)
    if min(noise) < 0.0 or args.noise_scale * max(args.noise_min, args.noise_max) >= 1.0:
        return (f"--noise_scale, --noise_min and --noise_max must be non-negative with noise_scale x noise_max "
                f"below 1 (it is a variance), got {noise}")
    return None


def model_of(argv: Sequence[str]) -> str:
    """The value of --model in a command line (default diffmm), without parsing the rest."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default="diffmm")
    return pre.parse_known_args(list(argv))[0].model


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (or `argv`) into the arguments object passed through the whole run.

    `--model` is read first, so that the parser knows the model's own flags and defaults.
    """
    from Models import model_names

    argv = sys.argv[1:] if argv is None else list(argv)
    argv, problem = expand_preset(argv)
    if problem:
        build_parser().error(problem)
    model = model_of(argv)
    if model not in model_names():
        build_parser().error(f"unknown model {model!r}; the known models are {', '.join(model_names())}")
    parser = build_parser(model)
    args = parser.parse_args(argv)
    problem = impossible_value(args)
    if problem:
        parser.error(problem)
    args.topks = sorted(set([args.topk] + (args.topks or [])))
    if args.resume and not any(a == "--epoch" or a.startswith("--epoch=") for a in argv):
        args.epoch = None  # resume keeps the run's own number of epochs
    return args
