"""The OpenMP wait policy of torch's CPU thread pool: import this module before torch.

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp). At the end of each region a thread
that has finished its share waits for the others, and by default it spins (busy-waits) before it
sleeps. On a machine whose cores other processes share, the thread it waits for is often descheduled
for a whole time slice, and the spinning one burns its own slice waiting: a small product that takes
25 ms with one thread took 950 ms with two beside one busy process. `OMP_WAIT_POLICY=PASSIVE` makes a
waiting thread sleep at once, so it gives its core back (docs/performance.md, "Shared machines and several runs").

libgomp reads the variable once, when torch loads it, so the entry points (Main.py, the drivers,
evaluate.py, recommend.py, the test suite's conftest.py) import this module before anything imports
torch. A value the user has set in the environment is kept.
"""
from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"

os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
