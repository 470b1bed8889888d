"""Pieces every command shares: progress bars that keep quiet when they should, and library
messages rewritten in command-line terms (flags instead of Python calls)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# (library wording, command-line wording). The library names keyword arguments and Python calls;
# someone at a shell needs the flag to change.
_CLI_TERMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"use create_model\('([\w.-]+)', checkpoint_path=\.\.\.\)"), r"pass --model \1"),
    (re.compile(r"create_model\(name, checkpoint_path='([^']*)'\) / --checkpoint on the command line"),
     r"--checkpoint \1"),
    (re.compile(r"\braise max_pixels\b"), "raise --max-pixels"),
    (re.compile(r"\blower max_pixels\b"), "lower --max-pixels"),
    (re.compile(r"on_conflict='skip', 'merge' or 'replace'"), "--on-conflict skip, merge or replace"),
)


def cli_terms(message: str) -> str:
    """``message`` with library hints replaced by the flags that do the same thing."""
    for pattern, replacement in _CLI_TERMS:
        message = pattern.sub(replacement, message)
    return message


def progress(items: Iterable[T], *, total: int | None, desc: str, quiet: bool = False) -> Iterator[T]:
    """A tqdm bar on stderr, shown only on a terminal and never with --quiet (logs and pipes stay clean)."""
    from tqdm import tqdm

    disable = True if quiet else None  # None: tqdm hides itself when stderr is not a TTY
    yield from tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, disable=disable, leave=False)


def note(message: str) -> None:
    """A line for the user on stderr that does not break a progress bar in the middle."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
