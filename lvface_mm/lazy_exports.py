"""PEP 562 lazy attributes for a package's ``__init__``: names resolved on first use, so importing the
package does not import what they live in (torch, timm, gradio, ...)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for `package` that imports ``table[name]`` on first access and caches it."""

    def __getattr__(name: str) -> object:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            vars(sys.modules[package])[name] = value  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
