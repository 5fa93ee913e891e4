"""The committed Table 2 (results/<dataset>/comparison.md and .csv) is what the committed run records produce,
written by `Experiments.reproduce` from the records alone (no weights, no dataset)."""
from __future__ import annotations

import re
import shutil

import pytest

from conftest import ROOT
from Experiments import reproduce

RESULTS = ROOT / "results"


def datasets_with_a_table():
    return sorted(p.name for p in RESULTS.glob("*") if (p / "comparison.md").is_file()) if RESULTS.is_dir() else []


@pytest.mark.parametrize("data", datasets_with_a_table() or [pytest.param("none", marks=pytest.mark.skip(
    reason="no committed table under results/"))])
def test_the_committed_table_is_what_the_records_give(tmp_path, data):
    records = tmp_path / data
    shutil.copytree(RESULTS / data, records)
    for name in ("comparison.md", "comparison.csv", "comparison.tex", "groups.png"):
        (records / name).unlink(missing_ok=True)
    seeds_of = {}   # model -> the seeds of its finished runs
    for path in records.rglob("summary.json"):
        match = re.fullmatch(r"seed(\d+)", path.parent.name)
        if match:
            seeds_of.setdefault(path.relative_to(records).parts[0], set()).add(int(match.group(1)))
    seeds = sorted(set.union(*seeds_of.values()))   # the models that have every seed (a model still running waits)
    models = sorted(m for m, have in seeds_of.items() if have == set(seeds))
    code = reproduce.main(["--table", "2", "--data", data, "--data_dir", str(tmp_path / "no-data"),
                           "--models", ",".join(models), "--seeds", ",".join(map(str, seeds)),
                           "--sweep_dir", str(records)])
    assert code == 0
    for name in ("comparison.md", "comparison.csv"):
        assert (records / name).read_text() == (RESULTS / data / name).read_text(), name
