"""Will a run fit? Its parameter and optimiser memory, estimated from the data's shapes before anything is built.

A feature file of 5 items x 20 million dimensions is 389 KB zipped; a model that projects it to d = 64 makes a
20-million x 64 layer, which with its gradient and Adam's two moments is 20.5 GB, and the machine's out-of-memory
killer ended the process (23.7 GB measured). So before the feature arrays are read (their .npy headers give the
shapes) the harness sums the model's largest tables (`RecModel.parameter_sizes`, entries from the shapes alone),
at 16 bytes an entry (fp32 value, gradient, Adam's first and second moments), plus the feature arrays themselves,
and refuses in one sentence a run that cannot fit the device's free memory, naming the largest part.
The estimate is a lower bound (activations, graphs and batches come on top): it catches the impossible, not
the tight.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from Utils.errors import UsageError

BYTES_PER_ENTRY = 16  # fp32 parameter, its gradient, Adam's exp_avg and exp_avg_sq


def available_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free memory, or the host's MemAvailable (Linux; elsewhere unbounded)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 ** 62


def gigabytes(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MB"


def linear_entries(sizes: Sequence[int]) -> int:
    """Weights and biases of a stack of linear layers sizes[0] -> sizes[1] -> ..."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def check_fits(parts: Dict[str, int], feature_bytes: int, device: torch.device, files: Dict[str, Path],
               model: str, available: Optional[int] = None) -> None:
    """Refuse (UsageError, one sentence) when the parameter tables `parts` (name -> entries) and the feature arrays
    cannot fit the device's free memory. `files`: modality -> feature file, named when a modality's part is the
    largest."""
    available = available_bytes(device) if available is None else available
    needed = BYTES_PER_ENTRY * sum(parts.values()) + feature_bytes
    if needed <= available:
        return
    largest = max(parts, key=parts.get)
    source = next((f" of {files[m]}" for m in files if largest.startswith(m)), "")
    raise UsageError(f"{model} on this data needs at least {gigabytes(needed)} for its parameters, their gradients "
                     f"and Adam's moments (the largest part: {largest}{source}, {parts[largest]:,} entries), more "
                     f"than the {gigabytes(available)} free on {device}; reduce that width (e.g. PCA of the "
                     f"features) or run on a device with more memory.")


def feature_array_bytes(n_items: int, widths: Dict[str, int]) -> int:
    return 4 * n_items * sum(widths.values())
