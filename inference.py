"""A run's data and model, built as a run builds them: what training (`Main.py`) and using a finished run (`api.py`,
`evaluate.py`, `recommend.py`) share, so that neither needs the other.

    args, data, model = load_trained(run_dir)        # best_model.pt's configuration and state, ready to score
    evaluate_model(model, data, args)                # all-rank metrics on validation and test

`build_model` seeds every generator with --seed and builds --model (the order of a run, so runs repeat);
`load_run_data` reads the run's dataset, refusing one that cannot fit the device before its features are read;
`checkpoint_args` turns a checkpoint's configuration into the run's arguments (a run saved before a flag existed
gets the value it ran with: `Utils.run_folder.upgrade_config`); `restore_checkpoint` loads a checkpoint into the
model, one sentence when it does not fit.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from DataHandler import Data, load_data
from Models import get_model, model_names
from Models.base import RecModel
from Utils import run_folder
from Utils.device import resolve_device
from Utils.errors import UsageError
from Utils.memory import check_fits, feature_array_bytes
from Utils.metrics import group_metrics, per_user_metrics
from Utils.seeding import seed_everything
from Utils.synthetic import ensure_synthetic


def load_run_data(args: argparse.Namespace, needs_features: bool, generate: bool = False) -> Data:
    """The dataset of the run. `generate`: write the default 'synthetic' one on first use; only a new training
    run (`run`) asks for it, where --data_dir is the command line's: a reloaded or resumed run takes its data_dir
    from a checkpoint, and a checkpoint must not decide where files are written."""
    data_dir = Path(args.data_dir)
    if generate and args.data == "synthetic":
        ensure_synthetic(data_dir / "synthetic")  # written whole, or again when a kill left it partial
    return load_data(args.data, data_dir, args.modalities, needs_features=needs_features, layout=args.format,
                     check_widths=lambda widths, files, n_users, n_items: check_memory(args, widths, files, n_users,
                                                                                       n_items))


def check_memory(args: argparse.Namespace, widths: Dict[str, int], files: Dict[str, Path], n_users: int,
                 n_items: int) -> None:
    """Refuse a run whose parameters and optimiser cannot fit the device's free memory (`Utils/memory.py`), from
    the data's shapes, before the feature arrays are read."""
    parts = get_model(args.model).parameter_sizes(args, n_users, n_items, widths)
    check_fits(parts, feature_array_bytes(n_items, widths), resolve_device(args.device, args.gpu), files, args.model)


def checkpoint_args(state: dict, path: Path) -> argparse.Namespace:
    """A checkpoint's configuration as the run's arguments (a flag added since the run was saved: the value the run
    had, `run_folder.upgrade_config`); one sentence when it names no registered model."""
    args = argparse.Namespace(**run_folder.upgrade_config(state["config"]))
    if args.model not in model_names():
        raise UsageError(f"{path} names the unknown model {args.model!r} (the known models are "
                         f"{', '.join(model_names())}); use the file the run wrote, or train the run again.")
    return args


def require_dataset(args: argparse.Namespace, then: str) -> None:
    """UsageError, one sentence, when the run's dataset folder is not in its data_dir; `then` says what to do."""
    folder = Path(args.data_dir) / args.data
    if not folder.is_dir():
        raise UsageError(f"the run's dataset {args.data} is not in {args.data_dir} (there is no folder {folder}); "
                         f"{then}.")


@torch.no_grad()
def evaluate_model(model: RecModel, data: Data, args: argparse.Namespace) -> Dict[str, dict]:
    """All-rank metrics on validation and test from one scorer (the model's evaluation forward).

    Per-user metrics are computed once per split and averaged overall ('val', 'test') and, for test,
    per user group by number of train interactions ('groups', paper Figure 2, edges --groups); the test
    values per user are kept as 'test_per_user' (the evaluated users and one array per metric), which the
    epoch loop saves for the protocols' epochs (`run_folder.write_per_user`) and never writes to metrics.jsonl.
    """
    model.eval()
    score = model.scorer()
    out: Dict[str, dict] = {}
    for split, heldout in (("val", data.val), ("test", data.test)):
        users, values = per_user_metrics(score, data.train, heldout, args.topks, args.tstBat, model.device,
                                         args.eval_users)
        out[split] = {name: float(v.mean()) for name, v in values.items()}
        if split == "test":
            counts = np.diff(data.train.indptr)
            out["groups"] = group_metrics(counts[users], values, args.groups)
            out["test_per_user"] = {"users": users, **values}
    return out


def build_model(args: argparse.Namespace, data: Data, device: torch.device) -> RecModel:
    """Seed every generator with --seed, then build --model (the order of a run, so runs repeat)."""
    seed_everything(args.seed)
    return get_model(args.model)(args, data, device)


def load_trained(run_dir: Path, data_dir: Optional[str] = None, device: str = "auto",
                 state: Optional[dict] = None) -> tuple:
    """(args, data, model) of a finished run: best_model.pt's configuration and state, ready to score.

    `data_dir` points to the dataset's folder when it has moved since the run; the model is in eval mode.
    `state`: best_model.pt when the caller has read it already (`api.load`).
    Nothing is written: the dataset is read from `data_dir` (else the run's own), never generated there.
    """
    state = state if state is not None else run_folder.load_best(run_dir)
    args = checkpoint_args(state, Path(run_dir) / run_folder.BEST)
    if data_dir is not None:
        args.data_dir = data_dir
    require_dataset(args, "pass the folder that holds it: data_dir=... to api.load, --data_dir to evaluate.py and "
                          "recommend.py")
    data = load_run_data(args, get_model(args.model).needs_features)
    model = build_model(args, data, resolve_device(device, args.gpu))
    restore_checkpoint(model, state, Path(run_dir) / run_folder.BEST, model.load_checkpoint_state)
    model.eval()
    return args, data, model


def restore_checkpoint(model: RecModel, state: dict, path: Path, load: Callable[[dict], None]) -> None:
    """`load(state)` (the model's load_checkpoint_state or load_training_state); a checkpoint whose model part
    does not fit the model its configuration builds (a key missing, a tensor of another shape) is one sentence."""
    try:
        load(state)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise run_folder.RunFolderError(f"{path} does not hold the {model.name} model its configuration describes "
                                        f"({type(e).__name__}: {reason[:200]}); use the file the run wrote, or train "
                                        f"the run again.") from None
