"""Command-line value parsers shared by the harness's flags (`Params.py`) and every model's own (`add_args`).

Each turns one flag's text into a value or raises `argparse.ArgumentTypeError` with one sentence, which
argparse prints as `error: argument --flag: ...`. Nothing is `eval`-ed: the DiffMM authors' `--dims` was
`eval(args.dims)`, and their `type=bool` turned `--norm False` on; `int_list` and `str2bool` fix both.
"""
from __future__ import annotations

import argparse
import ast
from typing import List


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
        raise argparse.ArgumentTypeError(f"expected a list of integers such as [1000], got {text!r}") from None
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
        raise argparse.ArgumentTypeError(message) from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not all(float("-inf") < v < float("inf") for v in value)):
        raise argparse.ArgumentTypeError(message)
    return [float(v) for v in value]


def float_pair(text: str) -> List[float]:
    """Parse 'γ,s' (MMRec's learning_rate_scheduler, e.g. 1.0,50 or [0.96, 50]) into two floats with s > 0."""
    try:
        values = [float(v) for v in text.strip("[]() ").split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or values[1] <= 0:
        raise argparse.ArgumentTypeError(f"expected two numbers γ,s with s > 0, such as 1.0,50, got {text!r}")
    return values


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
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def group_edges(text: str) -> List[int]:
    """Parse '0,5,10,20,50' into strictly increasing non-negative ints starting at 0 (0 is added if absent)."""
    try:
        edges = [int(v) for v in text.replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,5,10,20,50, "
                                         f"got {text!r}") from None
    if not edges or any(e < 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise argparse.ArgumentTypeError(f"expected strictly increasing non-negative integers such as "
                                         f"0,5,10,20,50, got {text!r}")
    return edges if edges[0] == 0 else [0] + edges
