"""Experiments.same_numbers: what counts as the same numbers (the runs themselves start processes: not here)."""
from __future__ import annotations

import argparse
import json

import pytest

from Experiments.same_numbers import after_flags, first_difference, parse_after, without_seconds


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_seconds_are_ignored_and_everything_else_compared_exactly():
    before = without_seconds(jsonl({"epoch": 1, "loss": {"bpr": 0.5}, "seconds": {"epoch": 1.0}},
                                   {"epoch": 2, "loss": {"bpr": 0.25}, "seconds": {"epoch": 2.0}}))
    after = without_seconds(jsonl({"epoch": 1, "loss": {"bpr": 0.5}, "seconds": {"epoch": 9.0, "rebuild": 3.0}},
                                  {"epoch": 2, "loss": {"bpr": 0.25}, "seconds": {"epoch": 7.0}}))
    assert before == [{"epoch": 1, "loss": {"bpr": 0.5}}, {"epoch": 2, "loss": {"bpr": 0.25}}]
    assert first_difference(before, after) is None


@pytest.mark.parametrize("changed,where", [
    ({"epoch": 2, "loss": {"bpr": 0.25 + 2 ** -52}}, "epoch 2, 'loss'"),     # one ulp of a nested float
    ({"epoch": 2, "loss": {"bpr": 0.25}, "val": {"Recall@20": 0.1}}, "epoch 2, 'val'"),   # a new key
    ({"epoch": 2}, "epoch 2, 'loss'"),                                        # a key gone
])
def test_any_other_difference_is_found_and_located(changed, where):
    before = [{"epoch": 1, "loss": {"bpr": 0.5}}, {"epoch": 2, "loss": {"bpr": 0.25}}]
    after = [before[0], changed]
    assert first_difference(before, after).startswith(where)


def test_a_different_number_of_epochs_differs():
    assert first_difference([{"epoch": 1}], [{"epoch": 1}, {"epoch": 2}]) == "1 epochs before, 2 after"
    assert first_difference([], []) is None


def test_after_flags_only_where_the_after_tree_has_the_flag():
    assert after_flags("mmssl", "usage: ... [--gen_pairing {authors,own}] ...\n  --gen_pairing {authors,own}") == \
        ["--gen_pairing", "own"]
    assert after_flags("mmssl", "usage: ... [--gen_graph {authors,full}]") == []     # an older tree: no flag
    assert after_flags("diffmm", "  --gen_pairing {authors,own}") == []              # no extra flags for others


def test_parse_after():
    assert parse_after("mmssl=--gen_pairing own --T 2") == ("mmssl", ["--gen_pairing", "own", "--T", "2"])
    with pytest.raises(argparse.ArgumentTypeError):
        parse_after("mmssl")
