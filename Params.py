"""Every command-line flag, grouped, with the paper symbol it stands for.

The harness's flags (data, optimisation, evaluation, run) are here; every model declares its own group and
checks next to its code (`add_args`, `check`: DiffMM's in `Model.py`, the others' in `Models/<name>.py`), and
`--model NAME --help` lists them. The value parsers they share are `Utils/flags.py`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from Utils import run_folder
from Utils.flags import float_list, group_edges, int_list, name_list, str2bool, unit_float  # noqa: F401 (re-exported)
from Utils.cli import ArgumentParser, flag_value, given_flags, has_flag
from Utils.device import parse_threads
from Utils.errors import UsageError


# ---------------------------------------------------------------------------------------------
# The published commands: `--preset NAME` = (model, data, flags); flags given explicitly still win
# ---------------------------------------------------------------------------------------------

def presets() -> Dict[str, Tuple[str, str, List[str]]]:
    """Every published command, `NAME-DATASET` -> (model, dataset, flags), from each model class's `presets`."""
    from Models import get_model, model_names

    return {f"{name}-{data}": (name, data, list(flags))
            for name in model_names() for data, flags in get_model(name).presets.items()}


def expand_preset(argv: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """`argv` with its preset's flags put in front (so explicit flags, parsed later, win), or a problem sentence."""
    name = flag_value(argv, "--preset")
    if name is None:
        return list(argv), None
    known = presets()
    if name not in known:
        return list(argv), f"unknown preset {name!r}; the presets are {', '.join(known)}"
    model, data, flags = known[name]
    given = flag_value(argv, "--model") if has_flag(argv, "--model") else model
    if given != model:
        return list(argv), f"--preset {name} is {model}'s published command, but --model {given} was given"
    return ["--model", model, "--data", data, *flags, *argv], None


def build_parser(model: str = "diffmm") -> argparse.ArgumentParser:
    """The harness's flags plus `model`'s own group (its class's `add_args`), with the model's defaults."""
    from Models import get_model, model_names

    p = ArgumentParser(
        description="Train and evaluate one recommender (default DiffMM: multi-modal graph diffusion for "
                    "recommendation, ACM MM 2024). `--model NAME --help` shows that model's own flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="diffmm", choices=model_names(), metavar="NAME",
                   help="the model to train: " + "; ".join(f"{n} = {get_model(n).paper}" for n in model_names()))

    g.add_argument("--preset", default=None, metavar="NAME",
                   help="a published command: " + ", ".join(presets()) + " (sets --model, --data and that command's "
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
    g.add_argument("--topks", default=None, type=int_list,
                   help="more cut-offs, e.g. 10,20,50 (topk is always included)")
    g.add_argument("--tstBat", default=256, type=int, help="number of users per evaluation batch")
    g.add_argument("--tstEpoch", default=1, type=int, help="evaluate every this many epochs")
    g.add_argument("--eval_users", default="all", choices=["all", "mmrec"],
                   help="users averaged over: all = every user with a held-out item (DiffMM's code); mmrec = only "
                        "those with a train item too (MMRec drops val/test users unseen in train; docs/siblings.md)")
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
                        "its share (docs/performance.md, Shared machines and several runs)")
    g.add_argument("--kernels", default="fast", choices=["fast", "plain"],
                   help="fast = the hand-written kernels of Utils/kernels.py (sparse products with a precomputed "
                        "transpose, fused InfoNCE); plain = torch's straightforward autograd, the reference that "
                        "`Experiments.benchmark --compare` measures them against (same math)")
    g.add_argument("--out_dir", default=None, type=str, help=f"run folder (default {run_folder.DEFAULT_OUT_DIR})")
    g.add_argument("--allow_shared_dir", default=False, type=str2bool, nargs="?", const=True,
                   help="write (or --resume) a run folder that other users can write too (world-writable, or owned "
                        "by someone else), which is otherwise refused: they could replace its files, such as the "
                        "checkpoint a later run loads; only the command line can give it, never a --config file")
    g.add_argument("--quiet", default=False, type=str2bool, nargs="?", const=True, help="no progress bars")
    g.add_argument("--save_model", default=True, type=str2bool, help="save the best model's checkpoint")
    g.add_argument("--keep_last", default=True, type=str2bool,
                   help="keep last.pt (the state --resume continues from) when the run finishes; false deletes it "
                        "then (an interrupted or stopped run keeps it), keeping best_model.pt; sweeps and reproduce "
                        "default to false")
    g.add_argument("--resume", default=None, type=str, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last completed epoch with its own configuration; "
                        f"beside it only {', '.join(RESUME_FLAGS[1:])} may be given (--epoch: a new total number of "
                        "epochs); another flag is refused")
    g.add_argument("--config", default=None, type=str, metavar="FILE|RUN_DIR",
                   help="run the configuration of a run folder (its config.json) or of a JSON file (YAML with "
                        "PyYAML installed) of flag names and values, in a new run folder; flags given beside it win")
    g.add_argument("--tensorboard", default=False, type=str2bool, nargs="?", const=True,
                   help="also write every epoch's losses and metrics as TensorBoard scalars into the run folder "
                        "(needs the tensorboard package; metrics.jsonl stays the record)")

    model_class = get_model(model)
    model_class.add_args(p)
    p.set_defaults(**model_class.defaults)
    return p


def baseline_args(model: str, preset: Optional[str] = None) -> argparse.Namespace:
    """The values `model`'s parser gives when no flag is given but `--preset` `preset` (a preset of another
    model, or an unknown one, is left out): what `Models.base.changed_flags` compares a run's values to."""
    known = presets()
    flags = known[preset][2] if preset in known and known[preset][0] == model else []
    return build_parser(model).parse_args(["--model", model, *flags])


def impossible_value(args: argparse.Namespace) -> Optional[str]:
    """The first harness flag whose value cannot give a meaningful run, as one sentence, or None. A model's own
    flags, shared ones included (`--embedding_size`, `--n_layers`), are checked by its `check_flags`
    (`Models.base.check_pairwise_flags` for the flags of `add_pairwise_args`)."""
    for name in ("epoch", "batch", "tstBat", "tstEpoch", "topk"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if args.patience < 0:
        return f"--patience must be 0 or more, got {args.patience}"
    if args.lr < 0.0:
        return f"--lr must not be negative, got {args.lr}"
    return None


# the flags a resumed run takes: how long it goes on and how it runs here, none that changes what it computes
RESUME_FLAGS = ("--resume", "--epoch", "--threads", "--quiet", "--allow_shared_dir")
# keys a --config file may hold but not decide: where the run reads its data and writes its folder, and whether a
# shared folder is allowed, come from the command line of whoever runs it, not from a file someone sent (and a
# run folder's own config.json holds data_dir); they are ignored, with a warning when the file's value differs
IGNORED_IN_CONFIG = ("data_dir", "out_dir", "allow_shared_dir")
# keys that are refused: a configuration cannot name another configuration or a run to continue
REFUSED_IN_CONFIG = ("config", "resume")


def read_config_file(spec: str) -> Tuple[dict, Path]:
    """The flags and values of `--config FILE|RUN_DIR` and the file they come from (a run folder's config.json,
    or the configuration a run from before config.json saved); UsageError with one sentence otherwise."""
    path = Path(spec)
    if path.is_dir() and not (path / run_folder.CONFIG).is_file():
        return run_folder.read_config(path), path
    path = path / run_folder.CONFIG if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--config {spec}: no such file or run folder; give a run folder, its config.json, or a "
                         f"JSON/YAML file of flags.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"reading {path} needs PyYAML (pip install pyyaml), or write it as JSON.") from None
        try:
            # anchors and aliases are refused before anything is built: each alias repeats a subtree, so a
            # 500-byte file of nested aliases expands to gigabytes (a "billion laughs"); a flag file needs none
            if any(isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None)
                   for event in yaml.parse(text, Loader=yaml.SafeLoader)):
                raise UsageError(f"{path} uses YAML anchors or aliases (& or *), which a file of flags does not "
                                 f"need and which can expand a small file to gigabytes; write each value out.")
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"{path} is not valid YAML ({str(e).splitlines()[0]}).") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} must hold one mapping of flag names to values, such as {{\"lr\": 0.001}}.")
    return config, path


def ignored_config_warning(name: str, value: object, path: Path, given: Sequence[str]) -> Optional[str]:
    """The warning for key `name` (of IGNORED_IN_CONFIG) of a --config file, or None when ignoring it changes
    nothing (no value, or the value the command line `given` also gives)."""
    if name == "allow_shared_dir":
        try:
            asked = value is not None and str2bool(str(value))
        except argparse.ArgumentTypeError:
            asked = True  # not a boolean: still ignored, and said so
        return (f"warning: {path} sets allow_shared_dir, which is ignored: only the command line can allow a run "
                f"folder that other users can write (--allow_shared_dir)") if asked else None
    used, default = flag_value(given, f"--{name}"), build_parser().get_default(name)
    if value is None or str(value) == str(used if used is not None else default):
        return None
    uses = f"--{name} {used}" if used is not None else \
        f"the default, {run_folder.DEFAULT_OUT_DIR if name == 'out_dir' else default}"
    return (f"warning: {path} sets {name} to {str(value)!r}, which is ignored: the data folder and the run folder come "
            f"from the command line, not from a configuration file; this run uses {uses}")


def config_argv(config: dict, path: Path, model: str, given: Sequence[str] = ()) -> List[str]:
    """The configuration as flags (`--name=value`, parsed by the same types as the command line), checked
    against model `model`'s flags; a value None keeps the flag's default. `given`: the command line beside
    --config, whose values the warnings about IGNORED_IN_CONFIG keys name."""
    known = {action.dest for action in build_parser(model)._actions if action.option_strings} - {"help"}
    argv = []
    for key, value in config.items():
        name = str(key).lstrip("-")
        if name not in known or name in REFUSED_IN_CONFIG:
            raise UsageError(f"{path} has the key {key!r}, which is not a flag of {model} that a configuration can "
                             f"set; remove it (python Main.py --model {model} --help lists the flags).")
        if name in IGNORED_IN_CONFIG:
            ignored = ignored_config_warning(name, value, path, given)
            if ignored:
                logging.getLogger("diffmm").warning(ignored)
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        argv.append(f"--{name}={text}")
    return argv


def with_config(argv: List[str]) -> List[str]:
    """`argv` with the flags of its `--config` put in front (so flags given beside it, parsed later, win)."""
    spec = flag_value(argv, "--config")
    if spec is None:
        return argv
    config, path = read_config_file(spec)
    from Models import model_names

    model = flag_value(argv, "--model") if has_flag(argv, "--model") else str(config.get("model") or "diffmm")
    if model not in model_names():
        raise UsageError(f"{path} names the unknown model {model!r}; the known models are {', '.join(model_names())}")
    return config_argv(config, path, model, argv) + argv


def refused_with_resume(argv: Sequence[str]) -> Optional[str]:
    """One sentence when a command line gives --resume with a flag a resumed run cannot change, else None."""
    if flag_value(argv, "--resume") is None:
        return None
    refused = list(dict.fromkeys(f for f in given_flags(argv) if f not in RESUME_FLAGS))
    if not refused:
        return None
    run = flag_value(argv, "--resume")
    return (f"--resume continues the run in {run} with the configuration it started with, so it cannot take "
            f"{', '.join(refused)} (it takes only {', '.join(RESUME_FLAGS[1:])}); to change that, start a new run "
            f"from its configuration: python Main.py --config {run} {refused[0]} ...")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (or `argv`) into the arguments object passed through the whole run.

    `--model` is read first, so that the parser knows the model's own flags and defaults.
    """
    from Models import get_model, model_names

    argv = sys.argv[1:] if argv is None else list(argv)
    problem = refused_with_resume(argv)
    if problem:
        build_parser().error(problem)
    try:
        argv = with_config(argv)
    except UsageError as e:
        build_parser().error(str(e))
    argv, problem = expand_preset(argv)
    if problem:
        build_parser().error(problem)
    model = flag_value(argv, "--model", "diffmm")
    if model not in model_names():
        build_parser().error(f"unknown model {model!r}; the known models are {', '.join(model_names())}")
    parser = build_parser(model)
    args = parser.parse_args(argv)
    problem = impossible_value(args) or get_model(model).check_flags(args)
    if problem:
        parser.error(problem)
    if not args.resume:  # a resumed run's flags are its own, warned about when it started
        for sentence in get_model(model).flag_warnings(args):
            logging.getLogger("diffmm").warning(f"warning: {sentence}")
    args.topks = sorted(set([args.topk] + (args.topks or [])))
    if args.resume and not has_flag(argv, "--epoch"):
        args.epoch = None  # resume keeps the run's own number of epochs
    return args
