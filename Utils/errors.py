"""The package's two kinds of refusal, each a message of one sentence: what is wrong, where, what to do.

Command-line entry points print the sentence and exit with 2; nothing else of the exception is shown.
"""
from __future__ import annotations


class UsageError(Exception):
    """A command-line or environment problem: the message is one sentence saying what to do."""


class DataError(Exception):
    """Bad input data: the message is one sentence saying what is wrong, where, and what to do."""
