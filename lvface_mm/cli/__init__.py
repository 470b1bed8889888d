"""The `lvface-mm` command. Each subcommand lives in its own module with two functions:
`add_arguments(parser)` and `run(args) -> int`. Modules import heavy libraries inside `run`, so
`lvface-mm --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
import textwrap

# name -> (module, one-line help). Nested groups (eval) dispatch the same way one level down.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("lvface_mm.cli.embed", "detect, align and embed faces in images or folders"),
    "verify": ("lvface_mm.cli.verify", "compare the main face of two images"),
    "models": ("lvface_mm.cli.models", "list model variants, parameters, FLOPs and weights status"),
    "export-onnx": ("lvface_mm.cli.export_onnx", "export a model to ONNX"),
    "pack": ("lvface_mm.cli.pack", "pack a folder-per-identity tree into RecordIO .rec/.idx"),
    "eval": ("lvface_mm.cli.eval", "face verification, IJB and identity-VQA evaluations"),
    "build-vqa": ("lvface_mm.cli.build_vqa", "build identity-grounded VQA training/eval sets"),
    "gallery": ("lvface_mm.cli.gallery", "enrol people from photos, name the faces in photos, manage the gallery"),
    "index": ("lvface_mm.cli.index", "index a photo collection (faces + CLIP) into a database"),
    "search": ("lvface_mm.cli.search", "search an indexed photo collection"),
    "demo": ("lvface_mm.cli.demo", "start the Gradio demo"),
}


DESCRIPTION = """Face embeddings with LVFace: compare faces, keep a gallery of people, search photo collections,
evaluate encoders, and build identity-aware vision-language datasets."""

EXIT_STATUS = """exit status:
  0    done
  1    some inputs failed (each is named on stderr); the others were done and saved
  2    usage error, or nothing could be done; no output was written
  130  interrupted (Ctrl-C)"""


def _epilog(module: object) -> str:
    """Examples and exit status from a command module's docstring (its other notes are for developers);
    the general exit-status table when the module documents none of its own."""
    doc = getattr(module, "__doc__", None) or ""
    lines = [line.strip() for line in doc.splitlines()]
    examples = [line for line in lines if line.startswith("lvface-mm ")]
    parts = ["examples:\n" + "\n".join(f"  {line}" for line in examples)] if examples else []
    own = next((p for p in doc.split("\n\n") if p.strip().startswith("Exit status:")), None)
    if own is not None:
        text = " ".join(own.split()).removeprefix("Exit status:").strip()
        parts.append("exit status:\n" + textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="  "))
    else:
        parts.append(EXIT_STATUS)
    return "\n\n".join(parts)


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS, prog: str = "lvface-mm") -> argparse.ArgumentParser:
    from lvface_mm.version import __version__

    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Run `{prog} COMMAND --help` for a command's options and examples.\n\n{EXIT_STATUS}")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in commands.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the module
                raise
            continue  # command not built yet in this checkout
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_epilog(module),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _user_error(exc: BaseException) -> bool:
    """Errors caused by the input (a bad file, a missing model, a wrong option) rather than by a bug."""
    if isinstance(exc, (ValueError, OSError, ImportError, sqlite3.DatabaseError)):
        return True
    pretrained = sys.modules.get("lvface_mm.models.pretrained")  # loaded by then if it can be the cause
    return pretrained is not None and isinstance(exc, pretrained.WeightsNotAvailableError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # One line the user can act on instead of a traceback; LVFACE_MM_DEBUG=1 shows the traceback.
        if os.environ.get("LVFACE_MM_DEBUG") or not _user_error(exc):
            raise
        from ._common import cli_terms

        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {cli_terms(str(message))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
