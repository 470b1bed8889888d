"""The Gradio demo as part of the package, so `pip install lvface-mm[demo]` ships it.

    state.py    DemoState: the shared workbench, what failed at start, which tabs work
    startup.py  checks before any model loads: network, missing files, database, checkpoint
    cache.py    a private upload/result cache that is swept, and result files with unique names
    app.py      the Blocks (UI only; every action calls `lvface_mm.gallery.workbench.Workbench`)

`lvface-mm demo` (lvface_mm/cli/demo.py) and `demos/app.py` (a thin launcher) both start it.
Only `app.py` imports gradio, so the checks are importable without the `demo` extra.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_LAZY = {
    "build_demo": "lvface_mm.demo.app",
    "DemoState": "lvface_mm.demo.state",
    "DemoSettings": "lvface_mm.demo.state",
}

__all__ = ["DemoSettings", "DemoState", "build_demo"]


__getattr__ = lazy_getattr(__name__, _LAZY)
