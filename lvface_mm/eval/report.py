"""Evaluation reports: JSON written atomically, with what produced them."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def run_info() -> dict[str, str]:
    """Versions and time, so a report says what produced it."""
    import numpy
    import torch

    from ..version import __version__

    return {
        "lvface_mm": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _clean(value: object) -> object:
    # JSON has no inf/NaN; write them as strings so the file stays valid for every reader.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, report: dict[str, object]) -> Path:
    """Write `report` as indented JSON through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(_clean(report), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
