"""The run folder: the one module that names its files, writes them and reads them back.

Every file a run can leave in its folder (`python Main.py --out_dir DIR`; docs/using-a-run.md, "What a run
writes"), by its constant here:

| constant | file | written |
|---|---|---|
| CONFIG | config.json | before the first epoch: every flag but NOT_CONFIGURATION (`Main.py --config` reruns it) |
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

Writes are atomic (a temporary file renamed into place, `Utils.files.atomic_write`), so a kill leaves each
file whole. Reading a file that is not there, or a checkpoint that is not one of this package's, is one sentence
(`RunFolderError`), never a traceback. A run folder that other users can write is refused unless
`--allow_shared_dir` is given (`refuse_shared`): they could replace its files between two epochs.

Other modules read summary.json through the accessors here (`protocol_result`, `protocol_metrics`, `best_epoch`,
`run_config`, `run_data`, `epoch_seconds`, `epochs_run`, `pruned_reason`, `run_machine`), never by its keys, and
a configuration saved before a flag existed gets that flag's value for such a run in one place (`upgrade_config`:
resume, reloading a run, the readers).
"""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shlex
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from Utils.errors import UsageError
from Utils.files import atomic_torch_save, atomic_write, atomic_write_text

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

# the --out_dir default, as every help text writes it; <random>: 6 hex digits, so that two runs started in the
# same second (a sweep's workers, two people sharing runs/) never pick the same folder
DEFAULT_OUT_DIR = "runs/<data>-<model>-<YYYYmmdd-HHMMSS>-<random>"
RUNS = Path("runs")  # the folder of the default run folders, relative to the working directory
# keys of a run's arguments that say where it writes, what it continues or what it may write into, not what it
# computes: config.json leaves them out, so a rerun from it (or from a file someone sent) cannot decide them
NOT_CONFIGURATION = ("out_dir", "resume", "config", "allow_shared_dir")
# flags added after runs had been saved without them, each with the value such a run had (not always today's
# default: MMSSL paired its generated graphs `own` before --gen_pairing existed, and `authors` is its default now);
# `upgrade_config` fills them in, so that no other module asks whether a configuration is older than a flag
ADDED_FLAGS: Dict[str, Any] = {"eval_users": "all", "threads": "auto", "tensorboard": False, "keep_last": True,
                               "quiet": False, "allow_shared_dir": False}
ADDED_MODEL_FLAGS: Dict[str, Dict[str, Any]] = {"mmssl": {"gen_pairing": "own"}}


class RunFolderError(UsageError):
    """A run folder lacks the file asked for, or holds one this package cannot use: one sentence naming the file
    and what to do."""


def default_run_dir(data: str, model: str) -> Path:
    """runs/<data>-<model>-<YYYYmmdd-HHMMSS>-<random> (DEFAULT_OUT_DIR), relative to the working directory."""
    return RUNS / f"{data}-{model}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def shared_by_others(path: Path) -> Optional[str]:
    """Why users other than this one can write the folder `path` ('every user can write it (mode 0777)', 'it
    belongs to user 1001, ...'), or None when only this user (and root) can. Kept simple on purpose: the folder's
    owner and its world-write bit, not its group (a group of one's own is the common default and safe). None also
    when `path` does not exist (reading it then says so)."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    uid = os.getuid() if hasattr(os, "getuid") else None  # no owners to compare on Windows
    if uid is not None and st.st_uid != uid:
        return f"it belongs to user {st.st_uid}, not to you (user {uid})"
    if st.st_mode & stat.S_IWOTH:
        return f"every user can write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def refuse_shared(path: Path, allow: bool, action: str = "write the run") -> None:
    """UsageError, one sentence, when others can write the run folder `path` and `allow` (--allow_shared_dir) is
    not given: whoever can write there can replace config.json or last.pt between two epochs, or a checkpoint
    that is loaded later. `action`: what was refused ('write the run', 'resume the run')."""
    reason = None if allow else shared_by_others(path)
    if reason:
        raise UsageError(f"will not {action} in {path}: other users can change files there ({reason}); use a "
                         f"folder of your own, or pass --allow_shared_dir if you trust everyone who can write to it.")


def make_run_dir(out_dir: Optional[str], data: str, model: str, allow_shared_dir: bool = False) -> Path:
    """Create the run folder (`out_dir`, else a new default one); refuse one that already holds files, so nothing
    is overwritten, and one that other users can write (`refuse_shared`) unless `allow_shared_dir`."""
    if not out_dir:
        return _new_default_run_dir(data, model, allow_shared_dir)
    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"the output folder {path} already exists and is not empty; pass another --out_dir "
                         f"(nothing there is overwritten), or --resume {path} to continue its run.")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {path} ({e.strerror or e}); pass an --out_dir you "
                         f"can write to.") from None
    _check_new_run_dir(path, allow_shared_dir, created)
    return path


def _new_default_run_dir(data: str, model: str, allow_shared_dir: bool) -> Path:
    try:
        RUNS.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder {RUNS} for the run ({e.strerror or e}); pass an --out_dir you "
                         f"can write to.") from None
    # mkdir without exist_ok: the folder is this run's own, never one that another run (or someone else) made
    # under the same name first; then a new suffix is drawn
    for _ in range(10):
        path = default_run_dir(data, model)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"cannot create the output folder {path} ({e.strerror or e}); pass an --out_dir you "
                             f"can write to.") from None
        _check_new_run_dir(path, allow_shared_dir, created=True)
        return path
    raise UsageError(f"could not create a new folder in {RUNS} (every name drawn was taken); pass an --out_dir.")


def _check_new_run_dir(path: Path, allow_shared_dir: bool, created: bool) -> None:
    """Refuse a shared folder (removing it again when this run created it: it is empty), then check that files
    can be written there, so that the error comes before the run, not after its first epoch."""
    try:
        refuse_shared(path, allow_shared_dir)
    except UsageError:
        if created:
            path.rmdir()
        raise
    try:
        with tempfile.TemporaryFile(dir=path):  # a fresh name (no fixed .write_test that someone could plant)
            pass
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {path} ({e.strerror or e}); pass an --out_dir you "
                         f"can write to.") from None


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


def upgrade_config(config: dict) -> dict:
    """A saved configuration (a checkpoint's, summary.json's, a run's arguments) with every flag added since it was
    saved set to the value the run had (ADDED_FLAGS, ADDED_MODEL_FLAGS of its model); a copy, in the same order, the
    added flags after the others. A configuration that has them all comes back equal."""
    upgraded = dict(config)
    for name, value in {**ADDED_FLAGS, **ADDED_MODEL_FLAGS.get(str(config.get("model")), {})}.items():
        upgraded.setdefault(name, value)
    return upgraded


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
            return configuration(read_checkpoint(run_dir / name, ("config",))["config"])
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


# summary.json's readers: every other module reads a summary through these (its layout is `Main.make_summary`'s)

def protocol_result(summary: dict, protocol: str) -> Optional[dict]:
    """The block of a protocol ('paper': the epoch of the best test Recall; 'validation': of the best validation
    Recall): {'description', 'epoch', 'val', 'test'}; None for a run that stopped before its first evaluation."""
    return summary["protocols"][protocol]


def protocol_metrics(summary: dict, protocol: str, split: str = "test") -> Dict[str, float]:
    """The metrics of `split` ('val', 'test') at a protocol's epoch: {'Recall@20': ..., 'NDCG@20': ..., ...}."""
    return summary["protocols"][protocol][split]


def best_epoch(summary: dict, protocol: str) -> Optional[int]:
    """A protocol's epoch; None for a run that stopped before its first evaluation."""
    return (summary["protocols"][protocol] or {}).get("epoch")


def run_config(summary: dict) -> dict:
    """The run's flags (`upgrade_config`: a run saved before a flag existed gets the value it had)."""
    return upgrade_config(summary["config"])


def user_groups(summary: dict) -> dict:
    """The per-user-group test metrics (paper Figure 2): {'epoch', 'edges', 'per_group': {'0-5': {...}, ...}};
    {} for a run from before --groups."""
    return summary.get("groups") or {}


def run_data(summary: dict) -> dict:
    """What the run read: {'name', 'users', 'items', 'train', 'val', 'test', 'modalities'}."""
    return summary.get("data", {})


def epoch_seconds(summary: dict) -> List[Dict[str, float]]:
    """Each epoch's seconds, in order: one entry per phase and 'epoch' (the whole epoch)."""
    return summary["timing"]["per_epoch"]


def epochs_run(summary: dict) -> int:
    return summary["epochs_run"]


def pruned_reason(summary: dict) -> Optional[str]:
    """Why a sweep's pruner (--prune) ended the run early; None for a run that was not pruned."""
    return summary["pruned"]["reason"] if "pruned" in summary else None


def run_machine(summary: dict) -> Dict[str, Any]:
    """Where the run ran: {'device', 'threads', 'versions'}, each None for a run from before it was recorded."""
    return {"device": summary.get("device"), "threads": summary.get("threads"), "versions": summary.get("versions")}


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
    state = read_checkpoint(path, LAST_KEYS)
    harness = state["harness"]
    if not (isinstance(harness, dict) and {"history", "finished", "best", "stale"} <= set(harness)
            and isinstance(harness["history"], list) and harness["history"]):
        raise RunFolderError(f"{path} is not a checkpoint of this package: its 'harness' lacks the epochs run; use "
                             f"the file the run wrote, or start the run again.")
    return state


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
    return read_checkpoint(path, BEST_KEYS)


# what the harness reads of each checkpoint (Main.save_checkpoint, EpochWriter.write); the model's own part
# ('state_dict', DiffMM's 'recommender', ...) is checked where the model loads it (inference.restore_checkpoint)
BEST_KEYS = ("epoch", "config")
LAST_KEYS = ("config", "model", "harness", "rng")


def read_checkpoint(path: Path, required: Iterable[str]) -> dict:
    """A checkpoint file on the CPU, checked to be a dict holding `required` keys and a configuration
    ('config': a dict of flag names with a model, data and data_dir); one sentence (RunFolderError) otherwise.

    weights_only=True: unpickling runs no code of the file's, so a checkpoint someone sent can hold tensors and
    plain values only; what it refuses is reported here instead of torch's page-long message."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text suggests weights_only=False: exactly what must not be done here
        raise RunFolderError(f"{path} cannot be read as a checkpoint: it is damaged, or holds Python objects besides "
                             f"tensors and plain values, which are not loaded (they could run code); use the file the "
                             f"run wrote, or train the run again.") from None
    except Exception as e:  # RuntimeError (not a zip archive), EOFError (cut short), ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunFolderError(f"{path} cannot be read as a checkpoint ({reason[:200]}); it is damaged or was not "
                             f"written by this package: train the run again, or use the file the run wrote.") from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{path} holds a {type(state).__name__}, not a checkpoint of this package (a dict); "
                             f"use the file the run wrote, or train the run again.")
    missing = [key for key in required if key not in state]
    if missing:
        raise RunFolderError(f"{path} is not a checkpoint of this package: it lacks {', '.join(map(repr, missing))}; "
                             f"use the file the run wrote, or train the run again.")
    if "config" in state:
        problem = _config_problem(state["config"])
        if problem:
            raise RunFolderError(f"{path} holds a configuration that {problem}; use the file the run wrote, or "
                                 f"train the run again.")
    return state


def _config_problem(config: object) -> Optional[str]:
    # whether the model is registered is the check of inference.checkpoint_args: this module is below it
    if not isinstance(config, dict) or not all(isinstance(k, str) and k.isidentifier() for k in config):
        return "is not a mapping of flag names to values"
    missing = [key for key in ("model", "data", "data_dir") if key not in config]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not all(isinstance(config[key], str) for key in ("model", "data", "data_dir")):
        return "gives model, data or data_dir as something other than text"
    return None


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
