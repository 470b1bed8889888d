"""The `lvface-mm` command. Each subcommand lives in its own module with two functions:
`add_arguments(parser)` and `run(args) -> int`. Modules import heavy libraries inside `run`, so
`lvface-mm --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Nested groups (eval) dispatch the same way one level down.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("lvface_mm.cli.embed", "detect, align and embed faces in images or folders"),
    "verify": ("lvface_mm.cli.verify", "compare the main face of two images"),
    "models": ("lvface_mm.cli.models", "list model variants, parameters, FLOPs and weights status"),
    "export-onnx": ("lvface_mm.cli.export_onnx", "export a model to ONNX"),
    "pack": ("lvface_mm.cli.pack", "pack a folder-per-identity tree into RecordIO .rec/.idx"),
    "eval": ("lvface_mm.cli.eval", "face verification, IJB and identity-VQA evaluations"),
    "build-vqa": ("lvface_mm.cli.build_vqa", "build identity-grounded VQA training/eval sets"),
    "gallery": ("lvface_mm.cli.gallery", "enrol, list, rename, delete and search identities"),
    "index": ("lvface_mm.cli.index", "index a photo collection (faces + CLIP) into a database"),
    "search": ("lvface_mm.cli.search", "search an indexed photo collection"),
    "demo": ("lvface_mm.cli.demo", "start the Gradio demo"),
}


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS, prog: str = "lvface-mm") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in commands.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the module
                raise
            continue  # command not built yet in this checkout
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
