"""Progress of many runs at once: each study of a storage, its trials by state and the runs being trained now.

    python -m Experiments.workers --storage sqlite:///runs/t4/optuna.db   # a sweep's default storage
    DIFFMM_STORAGE=postgresql://u@host/db python -m Experiments.workers   # the URL off the command line

The workers themselves are started by the drivers: `python -m Experiments.sweep ... --workers N` (or
`--devices 0,1`, `--storage URL`, `$DIFFMM_STORAGE`) and `python -m Experiments.reproduce ...` run their plan as
the trials of one Optuna study (`Experiments/study.py`, its storage `Experiments/storage.py`; docs/many-runs.md).
This file is the command line only.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from Experiments.storage import STORAGE_ENV
from Experiments.study import progress_lines
from Utils.errors import UsageError

log = logging.getLogger("diffmm")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print each study of a storage: its trials by state and the runs being trained now."""
    from Utils.cli import setup_logging

    p = argparse.ArgumentParser(description="Progress of the studies of many runs at once (docs/many-runs.md): "
                                            "trials by state, runs in progress.", allow_abbrev=False)
    p.add_argument("--storage", default=None, help=f"the sweep's storage (a sweep's default: sqlite:///DIR/optuna.db); "
                                                  f"default ${STORAGE_ENV}")
    p.add_argument("--study", default=None, help="only this study")
    args = p.parse_args(argv)
    setup_logging()
    try:
        lines = progress_lines(args.storage, args.study)
    except UsageError as e:
        log.error(f"error: {e}")
        return 2
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
