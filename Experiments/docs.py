"""The documentation that is data: the README's model and preset tables and docs/flags.md, generated from the
model classes (`paper`, `presets`, `published`, `published_in`, `grid`) and from argparse.

    python -m Experiments.docs            # rewrite them
    python -m Experiments.docs --check    # exit 1 when a file differs from what the code says (a test runs this)

A generated block sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->` lines; the text around it is
written by hand and left alone.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from Models import get_model, model_names
from Params import build_parser, presets
from Utils.cli import exit_on_interrupt

log = logging.getLogger("diffmm")
ROOT = Path(__file__).resolve().parents[1]


def _fmt(value: float) -> str:
    return f"{value:.4f}".lstrip("0")


def published_text(name: str, data: str) -> str:
    """'.1129 / .0456 / .0056 (DiffMM Table 2)', or the class's reason for having no number."""
    cls = get_model(name)
    numbers = cls.published.get(data)
    return f"{' / '.join(_fmt(v) for v in numbers)} ({cls.published_in})" if numbers else cls.published_in


def model_table() -> str:
    """One row per registered model: its flag value, paper, what it reads, its presets and its page."""
    rows = ["| `--model` | method | reads | published commands (`--preset`) | page |", "|---|---|---|---|---|"]
    for name in model_names():
        cls = get_model(name)
        reads = "interactions + item features" if cls.needs_features else "interactions"
        named = ", ".join(f"`{name}-{data}`" for data in cls.presets) or "—"
        rows.append(f"| `{name}` | {cls.paper} | {reads} | {named} | [docs/models/{name}.md](docs/models/{name}.md) |")
    return "\n".join(rows)


def preset_table() -> str:
    """One row per published command: its flags and the numbers published for it."""
    rows = ["| `--preset` | the flags it sets (beside `--model` and `--data`) | published R@20 / N@20 / P@20 |",
            "|---|---|---|"]
    for preset, (name, data, flags) in presets().items():
        rows.append(f"| `{preset}` | `{' '.join(flags)}` |  {published_text(name, data)} |"
                    if flags else f"| `{preset}` | (its defaults) | {published_text(name, data)} |")
    return "\n".join(rows)


def _group_rows(group: argparse._ArgumentGroup) -> List[str]:
    rows = []
    for action in group._group_actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
        text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
        text = re.sub(r"\s+", " ", text)
        rows.append(f"| {flags} | {default} | {text} |")
    return rows


def _groups(parser: argparse.ArgumentParser) -> Dict[str, argparse._ArgumentGroup]:
    return {g.title: g for g in parser._action_groups if g._group_actions}


def flag_reference() -> str:
    """docs/flags.md: the harness's flags (every model), then each model's own groups, defaults and grid."""
    # popularity has no flags of its own, so its groups are the harness's; DiffMM changes none of their defaults
    harness_titles = set(_groups(build_parser("pop")))
    harness = {t: g for t, g in _groups(build_parser("diffmm")).items() if t in harness_titles}
    lines = ["# Flags", "",
             "Generated from argparse by `python -m Experiments.docs` (do not edit by hand; a test fails when it "
             "drifts). `python Main.py --model NAME --help` prints the same for one model.", "",
             "## Harness (every model)", ""]
    for title, group in harness.items():
        if title in ("options",):
            continue
        lines += [f"### {title}", "", "| flag | default | what it sets |", "|---|---|---|", *_group_rows(group), ""]
    printed: Dict[str, List[str]] = {}
    owner: Dict[str, str] = {}
    for name in model_names():
        cls = get_model(name)
        lines += [f"## {name}", "", f"{cls.paper}. Page: [models/{name}.md](models/{name}.md).", ""]
        if cls.defaults:
            lines += ["Harness defaults for this model: "
                      + ", ".join(f"`--{k} {v}`" for k, v in cls.defaults.items()) + ".", ""]
        own = {t: g for t, g in _groups(build_parser(name)).items() if t not in harness}
        for title, group in own.items():
            rows = _group_rows(group)
            if printed.get(title) == rows:   # a group inherited unchanged (MDMNS has DiffMM's flags, same defaults)
                lines += [f"### {title}", "", f"As in [{owner[title]}](#{owner[title]}), with the same defaults.", ""]
                continue
            printed[title], owner[title] = rows, name
            lines += [f"### {title}", "", "| flag | default | what it sets |", "|---|---|---|", *rows, ""]
        if cls.grid:
            grid = " × ".join(f"`{k}` ∈ {{{', '.join(str(v) for v in vs)}}}" for k, vs in cls.grid.items())
            lines += [f"Grid (`python -m Experiments.sweep --grid {name}`): {grid}.", ""]
    return "\n".join(lines).rstrip() + "\n"


BLOCKS = {"models": model_table, "presets": preset_table}


def fill_blocks(text: str, path: Path) -> str:
    """`text` with every generated block replaced by what the code says now."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(\n<!-- end: {name} -->)", re.S)
        if pattern.search(text):
            table = make()
            text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)  # noqa: B023 (used at once)
    return text


def expected_files(root: Path = ROOT) -> Dict[Path, str]:
    """Every generated file with the text it should have."""
    readme = root / "README.md"
    return {readme: fill_blocks(readme.read_text(encoding="utf-8"), readme),
            root / "docs" / "flags.md": flag_reference()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a generated part drifted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale = []
    for path, text in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            log.info(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        log.error(f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} differ from what the code says: "
                  f"run `python -m Experiments.docs`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_interrupt(main))
