"""Does a change keep every number? Every model's metrics.jsonl from an older commit and from this tree.

    python -m Experiments.same_numbers --before 9339a86 [--models diffmm,mdmns] [--data_dir /tmp/synth]

It makes a `git worktree add --detach` of REF in a temporary folder (removed afterwards), then runs every
registered model (or `--models`) for `--epoch` epochs (default 3) on the generated dataset `synthetic`
with OMP_NUM_THREADS=1, once in that worktree and once in this tree (uncommitted changes included), and
prints per model `identical` or `DIFFERENT` (with the first field that differs): the metrics.jsonl lines
compared as JSON, without their "seconds". Exit 1 if any model differs or fails on either side.

Flags whose default changed on purpose since REF are given to the after side only (`AFTER_FLAGS`), and only
where the after tree has the flag (its `--model NAME --help` lists it); `--after MODEL='FLAGS'` adds more.
`--both MODEL='FLAGS'` runs a model with other flags on both sides (a path the defaults do not take, e.g.
diffmm='--ablation no_dm').
The generated data is written once (by the first run) into `--data_dir`, so both sides read the same files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("same_numbers")

# model -> flags that restore REF's behaviour on the after side, each applied only where the flag exists there
AFTER_FLAGS: Dict[str, List[List[str]]] = {
    # the authors' pairing of the generated graphs became MMSSL's default; `own` is the pairing before it
    "mmssl": [["--gen_pairing", "own"]],
}


def without_seconds(text: str) -> List[dict]:
    """The records of a metrics.jsonl text, each without its "seconds" (wall-clock times differ run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines() if line.strip()]


def first_difference(before: Sequence[dict], after: Sequence[dict]) -> Optional[str]:
    """None when the records are equal value for value (floats compared exactly), else where they first differ."""
    if len(before) != len(after):
        return f"{len(before)} epochs before, {len(after)} after"
    for n, (old, new) in enumerate(zip(before, after), 1):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return f"epoch {n}, {key!r}: {old.get(key)!r} before, {new.get(key)!r} after"
    return None


def after_flags(model: str, help_text: str) -> List[str]:
    """The `AFTER_FLAGS` of `model` that the after tree's --help lists."""
    flags: List[str] = []
    for option in AFTER_FLAGS.get(model, []):
        if option[0] in help_text.split():
            flags += option
    return flags


def run_model(root: Path, model: str, data_dir: Path, out: Path, epochs: int, extra: Sequence[str]) -> List[dict]:
    """One run of `model` in the checkout `root`, one thread; its metrics.jsonl without the seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "Main.py", "--model", model, "--data", "synthetic", "--data_dir", str(data_dir),
               "--epoch", str(epochs), "--quiet", "--out_dir", str(out), *extra]
    done = subprocess.run(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"{shlex.join(command)} in {root} exited {done.returncode}: {tail[0]}")
    return without_seconds((out / "metrics.jsonl").read_text())


def model_names(root: Path) -> List[str]:
    """The models registered in the checkout `root`."""
    code = "from Models import model_names; print(','.join(model_names()))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip().split(",")


def help_text(root: Path, model: str) -> str:
    return subprocess.run([sys.executable, "Main.py", "--model", model, "--help"], cwd=root, capture_output=True,
                          text=True).stdout


def parse_after(text: str) -> tuple:
    model, _, flags = text.partition("=")
    if not model or not flags:
        raise argparse.ArgumentTypeError(f"expected MODEL='FLAGS', such as mmssl='--gen_pairing own', got {text!r}")
    return model, shlex.split(flags)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--before", required=True, metavar="REF", help="the commit to compare against (e.g. 9339a86)")
    p.add_argument("--models", default=None, help="comma-separated models (default: every model registered here)")
    p.add_argument("--data_dir", default=None,
                   help="folder of the generated dataset `synthetic` (made by the first run when absent; "
                        "default: a temporary folder)")
    p.add_argument("--epoch", default=3, type=int, help="epochs per run")
    p.add_argument("--after", default=[], action="append", type=parse_after, metavar="MODEL='FLAGS'",
                   help="more flags for the after side of one model (repeatable)")
    p.add_argument("--both", default=[], action="append", type=parse_after, metavar="MODEL='FLAGS'",
                   help="flags for both sides of one model's runs (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra_after, extra_both = {}, {}
    for model, flags in args.after:
        extra_after.setdefault(model, []).extend(flags)
    for model, flags in args.both:
        extra_both.setdefault(model, []).extend(flags)

    ref = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.before}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    if not ref:
        log.error(f"--before {args.before!r} is not a commit of the repository in {ROOT}; give a hash or a branch.")
        return 2
    models = args.models.split(",") if args.models else model_names(ROOT)
    unknown = sorted(set(models) - set(model_names(ROOT)))
    if unknown:
        log.error(f"unknown model(s) {', '.join(unknown)}; the registered models are {', '.join(model_names(ROOT))}.")
        return 2

    differs = 0
    with tempfile.TemporaryDirectory(prefix="same_numbers-") as tmp:
        tmp = Path(tmp)
        before_root = tmp / "before"
        data_dir = Path(args.data_dir).resolve() if args.data_dir else tmp / "data"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_root), ref], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            log.info(f"before = {ref[:10]} (a temporary worktree), after = this tree; {args.epoch} epochs, one "
                     f"thread each, the generated dataset `synthetic`")
            for model in models:
                both = extra_both.get(model, [])
                flags = after_flags(model, help_text(ROOT, model)) + extra_after.get(model, [])
                try:
                    old = run_model(before_root, model, data_dir, tmp / f"before-{model}", args.epoch, both)
                    new = run_model(ROOT, model, data_dir, tmp / f"after-{model}", args.epoch, both + flags)
                except RuntimeError as e:
                    differs += 1
                    log.info(f"{model:10s} FAILED: {e}")
                    continue
                difference = first_difference(old, new)
                differs += difference is not None
                shown = (f" [both: {shlex.join(both)}]" if both else "") + (f" [after: {shlex.join(flags)}]"
                                                                           if flags else "")
                verdict = "identical" if difference is None else f"DIFFERENT ({difference})"
                log.info(f"{model:10s} {verdict} ({len(new)} epochs){shown}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_root)], cwd=ROOT, capture_output=True)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
