"""Replacing a file atomically: write a temporary file beside it, then rename it over the target.

A crash or an error while writing leaves the old file (or none) and no stray temporary file, never
half of a new one. The rename is atomic because the temporary file is on the same filesystem.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on a clean exit it replaces `path`, on an error
    it is removed. The folder must exist.

        with atomic_path(out / "train.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a successful replace; the half-written file otherwise


__all__ = ["atomic_path"]
