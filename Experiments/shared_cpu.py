"""How a run fares on a CPU that other processes share: the same command alone and beside busy processes.

    python -m Experiments.shared_cpu --busy 0,1 --variant "before|/tmp/old-checkout||" --variant "after|.||" \
        --variant "after, spinning|.|OMP_WAIT_POLICY=ACTIVE|" --variant "after, 1 thread|.||--threads 1" \
        -- --epoch 10 --quiet

Each variant is `label|code folder|VAR=value,...|extra Main.py flags`: the command runs as
`python Main.py FLAGS EXTRA` from that folder (another checkout, e.g. a `git worktree` of an older
commit, gives a before/after on one machine in one sitting), in a fresh process with that environment
(OMP_WAIT_POLICY removed unless the variant sets it, so each checkout applies its own default). For each
number of busy neighbours (`--busy`: processes that each keep one core busy with a Python loop, started
before the run and killed after it) it prints the wall-clock seconds of the whole command and the
median epoch seconds from the run's summary.json. `--timeout S` ends a run that takes longer (reported
as '> S'). Run it on an otherwise quiet machine: the whole point is to control what runs beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from Utils import run_folder

BUSY_LOOP = "while True: pass"


def parse_variant(text: str) -> dict:
    parts = text.split("|")
    if len(parts) != 4 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"a variant is 'label|code folder|VAR=value,...|extra flags', got {text!r}")
    env = dict(item.split("=", 1) for item in parts[2].split(",") if item)
    return {"label": parts[0], "root": Path(parts[1]).resolve(), "env": env, "flags": parts[3].split()}


def timed_run(variant: dict, flags: Sequence[str], busy: int, timeout: float) -> Dict[str, Optional[float]]:
    """Wall seconds and median epoch seconds of one run of `variant` beside `busy` busy processes."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(variant["env"])
    neighbours = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            command = [sys.executable, "Main.py", *flags, *variant["flags"], "--out_dir", str(out)]
            start = time.perf_counter()
            try:
                subprocess.run(command, cwd=variant["root"], env=env, check=True, timeout=timeout,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except subprocess.TimeoutExpired:
                return {"wall": None, "epoch": None}
            wall = time.perf_counter() - start
            summary = run_folder.read_summary(out)
            epochs = [e["epoch"] for e in run_folder.epoch_seconds(summary)]
            threads = run_folder.run_machine(summary)["threads"]
            return {"wall": wall, "epoch": statistics.median(epochs), "threads": threads}
    finally:
        for process in neighbours:
            process.kill()
            process.wait()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--busy", default="0,1", help="numbers of busy neighbour processes, e.g. 0,1")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds after which a run is ended")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the Main.py flags shared by every variant")
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    busy_counts = [int(b) for b in args.busy.split(",")]
    results = []
    for variant in args.variant:
        for busy in busy_counts:
            result = timed_run(variant, flags, busy, args.timeout)
            results.append({"variant": variant["label"], "busy": busy, **result})
            wall = f"{result['wall']:.1f}" if result["wall"] is not None else f"> {args.timeout:.0f}"
            epoch = f"{result['epoch']:.2f}" if result["epoch"] is not None else "—"
            print(f"| {variant['label']} | {busy} | {wall} | {epoch} | {result.get('threads', '—')} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"flags": flags, "cpu": cpu_model(), "results": results}, indent=2))
    return 0


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
