"""Start the lvface-mm demo from a checkout: `python demos/app.py --tiny` (same options as
`lvface-mm demo`). The app itself is `lvface_mm.demo` inside the package, so an installed wheel
runs the same code with `lvface-mm demo`."""

from __future__ import annotations

import sys

from lvface_mm.demo import build_demo  # noqa: F401  (re-exported: `from demos.app import build_demo`)


def main(argv: list[str] | None = None) -> int:
    from lvface_mm.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
