"""The documentation that is data (README tables, docs/flags.md) matches the code; adding a model is one file and
one registry line; the docs link only to files that exist and never outside the repository."""
from __future__ import annotations

import re
import textwrap

import pytest

import Models
from conftest import ROOT, tiny_args
from Experiments import docs

TOY = '''
import argparse
from typing import Dict, Tuple

import torch

from Models.base import PairwiseModel, add_pairwise_args
from Utils.layers import bpr_loss, xavier_normal


class Toy(PairwiseModel):
    name = "toy"
    paper = "Toy: a model added by a test"
    presets = {"tiny": ["--toy_size", "6"]}
    published = {"tiny": (0.5, 0.25, 0.125)}
    published_in = "the toy paper"
    grid = {"toy_size": [4, 6]}

    def __init__(self, args: argparse.Namespace, data, device: torch.device):
        super().__init__(args, data, device)
        self.user_emb = xavier_normal(data.n_users, args.toy_size)
        self.item_emb = xavier_normal(data.n_items, args.toy_size)
        self.to(device)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("toy")
        add_pairwise_args(group)   # MMRec's BPR loop: embedding size, reg_weight, learning-rate schedule
        group.add_argument("--toy_size", type=int, default=4, help="embedding size")

    def embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb, self.item_emb

    def batch_loss(self, users, positives, negatives) -> Dict[str, torch.Tensor]:
        return {"bpr": bpr_loss(self.user_emb, self.item_emb, users, positives, negatives)}
'''


def test_generated_docs_match_the_code():
    """`python -m Experiments.docs --check`: README's model and preset tables and docs/flags.md are current."""
    for path, text in docs.expected_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} drifted: run `python -m Experiments.docs`"


def test_a_changed_class_attribute_shows_as_drift(monkeypatch):
    """The check can fail: a new published number on a class changes the README's preset table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cls = Models.get_model("mmssl")
    monkeypatch.setattr(cls, "published", {**cls.published, "tiktok": (0.9999, 0.0392, 0.0046)})
    assert "<!-- generated: presets -->" in readme
    assert docs.fill_blocks(readme, ROOT / "README.md") != readme
    assert ".9999 / .0392 / .0046 (MMSSL README)" in docs.preset_table()


def test_adding_a_model_is_one_file_and_one_registry_line(tmp_path, tiny_dir, monkeypatch):
    """A toy model written here, registered by one line, trains through the harness, runs its own preset, and
    appears in the model, preset and flag tables with its published numbers and grid."""
    (tmp_path / "toy_model.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(Models.REGISTRY, "toy", "toy_model:Toy")       # the one registry line

    from Main import run
    from Params import parse_args

    args = parse_args(tiny_args(tiny_dir, tmp_path / "run", "--model", "toy", "--preset", "toy-tiny"))
    assert (args.model, args.data, args.toy_size) == ("toy", "tiny", 6)
    summary = run(args)
    assert summary["model"] == "toy"
    assert 0.0 <= summary["protocols"]["validation"]["test"]["Recall@20"] <= 1.0

    row = next(line for line in docs.model_table().splitlines() if line.startswith("| `toy` |"))
    assert "Toy: a model added by a test" in row and "`toy-tiny`" in row and "docs/models/toy.md" in row
    assert "| `toy-tiny` | `--toy_size 6` |  .5000 / .2500 / .1250 (the toy paper) |" in docs.preset_table()
    flags = docs.flag_reference()
    assert "## toy" in flags and "| `--toy_size` | `4` | embedding size |" in flags
    assert "`toy_size` ∈ {4, 6}" in flags


def _links(text: str):
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)


def _anchors(path) -> set:
    """GitHub's heading anchors of a Markdown page: lower case, punctuation but - and _ dropped, spaces to -."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.M)}


PAGES = ["README.md", "figures/README.md", "Datasets/README.md",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_docs_link_to_files_that_exist_and_nothing_outside(page):
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    for link in _links(text):
        if re.match(r"[a-z]+://", link):
            continue
        assert (path.parent / link).resolve().exists(), f"{page} links to {link}, which does not exist"
        assert ROOT in (path.parent / link).resolve().parents, f"{page} links outside the repository: {link}"
    for link, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        target = (path.parent / link).resolve() if link else path
        if target.suffix == ".md":
            assert anchor in _anchors(target), f"{page} links to {link}#{anchor}, a heading that does not exist"
    assert "/work/" not in text and "SPEC" not in text and "shared/SPEC" not in text, f"{page} points outside"


def _bounds(lines) -> dict:
    """{package: version bounds} of requirement lines (comments and blank lines skipped)."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
            out[name] = line[len(name):].replace(" ", "")
    return out


def test_requirement_files_give_pyproject_bounds():
    """requirements.txt, requirements-dev.txt and requirements-encoders.txt state exactly pyproject.toml's
    dependencies, `test` extra and `encoders` extra."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for file, wanted in (("requirements.txt", project["dependencies"]), ("requirements-dev.txt", extras["test"]),
                         ("requirements-encoders.txt", extras["encoders"])):
        assert _bounds((ROOT / file).read_text(encoding="utf-8").splitlines()) == _bounds(wanted), file
