"""The run folder: the one module that names its files, writes them and reads them back.

Every file a run can leave in its folder (`python Main.py --out_dir DIR`; docs/using-a-run.md, "What a run
writes"), by its constant here:

| constant | file | written |
|---|---|---|
| CONFIG | config.json | before the first epoch: every flag but out_dir/resume/config (`Main.py --config` reruns it) |
| LOG | log.txt | all along: the configuration, then one line per epoch |
| LAST | last.pt | after every epoch: what `--resume` continues from (deleted at the end with `--keep_last false`) |
| METRICS | metrics.jsonl | after every epoch: one JSON object per epoch (losses, val/test metrics, seconds) |
| BEST | best_model.pt | at every new best validation epoch (`--save_model false`: never) |
| SUMMARY | summary.json | at the end, also of a stopped or interrupted run (then with `stopped`) |
| CURVES | curves.png | at the end (Utils/figures.py), also of a stopped run |
| GENERATED | generated_items.npz | at the end, by DiffMM and MDMNS (`save_artifacts`) |
| PER_USER | per_user_<protocol>.npz | at a protocol's new best epoch: each test user's metrics (Wilcoxon test) |
| GROUPS, CASE_STUDY | groups.png, case_study.png | by `python -m Utils.figures RUN_DIR` |
| TENSORBOARD | events.out.tfevents.* | after every epoch with `--tensorboard` (metrics.jsonl stays the truth) |

Writes are atomic (a temporary file renamed into place, `Utils.helpers.atomic_write`), so a kill leaves each
file whole. Reading a file that is not there is one sentence (`RunFolderError`), never a traceback.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from Utils.helpers import UsageError, atomic_torch_save, atomic_write, atomic_write_text

CONFIG = "config.json"
LOG = "log.txt"
LAST = "last.pt"
METRICS = "metrics.jsonl"
BEST = "best_model.pt"
SUMMARY = "summary.json"
CURVES = "curves.png"
GROUPS = "groups.png"
CASE_STUDY = "case_study.png"
GENERATED = "generated_items.npz"
PER_USER = {"paper": "per_user_paper.npz", "validation": "per_user_validation.npz"}  # by protocol
TENSORBOARD = "events.out.tfevents.*"

DEFAULT_OUT_DIR = "runs/<data>-<model>-<timestamp>"   # the --out_dir default, as every help text writes it
# keys of a run's arguments that say where it writes or what it continues, not what it computes
NOT_CONFIGURATION = ("out_dir", "resume", "config")


class RunFolderError(UsageError):
    """A run folder lacks the file asked for: one sentence naming the file and what to do."""


def default_run_dir(data: str, model: str) -> Path:
    """runs/<data>-<model>-<timestamp> (DEFAULT_OUT_DIR), relative to the working directory."""
    return Path("runs") / f"{data}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(out_dir: Optional[str], data: str, model: str) -> Path:
    """Create the run folder (`out_dir`, else the default); refuse one that already holds files, so nothing is
    overwritten."""
    path = Path(out_dir) if out_dir else default_run_dir(data, model)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"the output folder {path} already exists and is not empty; pass another --out_dir "
                         f"(nothing there is overwritten), or --resume {path} to continue its run.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {path} ({e.strerror or e}); pass an --out_dir you "
                         f"can write to.") from None
    return path


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`, quoted for a POSIX shell."""
    return f"python Main.py --resume {shlex.quote(str(run_dir))}"


def rerun_command(run_dir: Path) -> str:
    """The command that runs `run_dir`'s configuration again from scratch, in a new run folder."""
    return f"python Main.py --config {shlex.quote(str(Path(run_dir) / CONFIG))}"


def _missing(path: Path, what: str) -> RunFolderError:
    return RunFolderError(f"{path} does not exist: {what}")


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def configuration(args: dict) -> dict:
    """A run's arguments without those that are not configuration (NOT_CONFIGURATION)."""
    return {k: v for k, v in args.items() if k not in NOT_CONFIGURATION}


def write_config(run_dir: Path, args: dict) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(configuration(args), indent=2, sort_keys=True) + "\n")


def read_config(run_dir: Path) -> dict:
    """The configuration of a run: config.json, or for a run from before it, the config saved in summary.json,
    last.pt or best_model.pt (without NOT_CONFIGURATION)."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file():
        return read_json(run_dir / CONFIG)
    if (run_dir / SUMMARY).is_file():
        return configuration(read_summary(run_dir)["config"])
    for name in (LAST, BEST):
        if (run_dir / name).is_file():
            return configuration(torch.load(run_dir / name, map_location="cpu", weights_only=True)["config"])
    raise _missing(run_dir / CONFIG, f"{run_dir} holds no saved configuration (config.json, summary.json, last.pt "
                                     f"or best_model.pt); is it a run folder of this package?")


def title_config(run_dir: Path) -> dict:
    """The configuration as far as it is known, for titles: config.json, summary.json or log.txt's first lines;
    {} when none is there."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file() or (run_dir / SUMMARY).is_file():
        return read_config(run_dir)
    lines = (run_dir / LOG).read_text().splitlines()[:3] if (run_dir / LOG).is_file() else []
    for line in lines:
        if "configuration: " in line:
            return json.loads(line.split("configuration: ", 1)[1])
    return {}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); it was changed or cut short "
                             f"since the run wrote it.") from None


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and summary.json
# ---------------------------------------------------------------------------------------------

def write_metrics(run_dir: Path, history: Iterable[dict]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(h) + "\n" for h in history))


def read_metrics(run_dir: Path) -> List[dict]:
    """One record per completed epoch, in order."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise _missing(path, f"is {run_dir} a run folder, and has its first epoch finished?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise _missing(path, f"the run in {run_dir} has not finished (or {run_dir} is not a run folder).")
    return read_json(path)


def finished_summary(run_dir: Path) -> Optional[dict]:
    """The summary of a finished run (its epochs, early-stopped or pruned; not `stopped`), else None."""
    if not (Path(run_dir) / SUMMARY).is_file():
        return None
    summary = read_summary(run_dir)
    return None if "stopped" in summary else summary


def topk(run_dir: Path, records: Iterable[dict] = ()) -> int:
    """The run's headline K (--topk): from its configuration, else from the first evaluated record, else 20."""
    config = title_config(run_dir)
    if "topk" in config:
        return int(config["topk"])
    for r in records:
        if "test" in r:
            return int(next(k for k in r["test"] if k.startswith("Recall@")).split("@")[1])
    return 20


# ---------------------------------------------------------------------------------------------
# per_user_<protocol>.npz: the test metrics of every evaluated user at a protocol's epoch
# ---------------------------------------------------------------------------------------------

def write_per_user(run_dir: Path, protocol: str, per_user: Dict[str, np.ndarray], epoch: int) -> None:
    """PER_USER[protocol]: `epoch`, `users` (the evaluated test users) and one array per metric ('Recall@20', ...):
    what a paired test over users needs (Experiments.reproduce, Table 2's Wilcoxon test) and summary.json's means
    cannot give. `epoch` lets a reader check that the file belongs to summary.json's epoch of that protocol."""
    arrays = {name: np.asarray(v, dtype=np.int64 if name == "users" else np.float32) for name, v in per_user.items()}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, epoch=np.int64(epoch), **arrays)
    atomic_write(Path(run_dir) / PER_USER[protocol], write)


def read_per_user(run_dir: Path, protocol: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of PER_USER[protocol] ('epoch' an int), or None for a run from before the file existed."""
    path = Path(run_dir) / PER_USER[protocol]
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {name: (int(z[name]) if name == "epoch" else z[name]) for name in z.files}


# ---------------------------------------------------------------------------------------------
# last.pt and best_model.pt
# ---------------------------------------------------------------------------------------------

def has_last(run_dir: Path) -> bool:
    return (Path(run_dir) / LAST).is_file()


def save_last(run_dir: Path, state: dict) -> None:
    atomic_torch_save(state, Path(run_dir) / LAST)


def load_last(run_dir: Path) -> dict:
    """last.pt on the CPU (a run saved on a GPU resumes anywhere)."""
    path = Path(run_dir) / LAST
    if not path.is_file():
        raise RunFolderError(f"{run_dir} has no {LAST}, so there is no run to resume there (is it a run folder of "
                             f"this package?).")
    return torch.load(path, map_location="cpu", weights_only=True)


def drop_last(run_dir: Path) -> None:
    (Path(run_dir) / LAST).unlink(missing_ok=True)


def save_best(run_dir: Path, state: dict) -> None:
    atomic_torch_save(state, Path(run_dir) / BEST)


def load_best(run_dir: Path) -> dict:
    """best_model.pt on the CPU: 'epoch', 'model', 'config' and the model's checkpoint_state()."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: {run_dir} is not a finished run folder of this package, or it "
                             f"ran with --save_model false.")
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# TensorBoard (optional: the `tensorboard` package)
# ---------------------------------------------------------------------------------------------

def require_tensorboard() -> None:
    """Raise one sentence when torch.utils.tensorboard cannot be used (before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: install tensorboard (pip install "
                         "tensorboard), or run without --tensorboard.") from None


def scalars(record: dict, prefix: str = "") -> Dict[str, float]:
    """An epoch record's numbers as TensorBoard tags: {'loss/bpr': ..., 'val/Recall@20': ...,
    'groups/0-5/NDCG@20': ..., 'seconds/epoch': ...}; the epoch itself is the step, not a scalar; None (a user
    group without users) is left out."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, tag + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "epoch":
            out[tag] = float(value)
    return out


class EpochWriter:
    """Writes an epoch's files, in the order that keeps the folder resumable: last.pt first, then metrics.jsonl
    (which so never runs ahead of what --resume continues from), then the TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, history: Optional[List[dict]] = None):
        """`history`: the records a resumed run starts with; those metrics.jsonl lacks (a kill between the two
        writes) are also missing from the TensorBoard files and are written there now."""
        self.run_dir = Path(run_dir)
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            history = history or []
            on_disk = {r["epoch"] for r in read_metrics(self.run_dir)} if (self.run_dir / METRICS).is_file() else set()
            start = history[-1]["epoch"] + 1 if history else 0
            # purge_step: TensorBoard hides whatever an earlier writer logged at or after the resumed epoch
            self.tensorboard = SummaryWriter(str(self.run_dir), purge_step=start if history else None)
            for record in history:
                if record["epoch"] not in on_disk:
                    self._scalars(record)

    def _scalars(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.tensorboard.add_scalar(tag, value, record["epoch"])
        self.tensorboard.flush()

    def write(self, history: List[dict], last_state: dict) -> None:
        save_last(self.run_dir, last_state)
        write_metrics(self.run_dir, history)
        if self.tensorboard is not None and history:
            self._scalars(history[-1])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
