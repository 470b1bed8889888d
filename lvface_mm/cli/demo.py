"""`lvface-mm demo`: start the Gradio demo (enrol, caption & ask, search a photo collection).

    lvface-mm demo                      # LVFace-B + SmolVLM-256M-Instruct + CLIP ViT-B-32, on 127.0.0.1:7860
    lvface-mm demo --tiny               # random tiny models: the whole UI offline, for development
    lvface-mm demo --vlm llava-hf/llava-1.5-7b-hf --adapter runs/adapter   # token grounding

The app lives in `demos/app.py` of the source tree (it is UI, not library); this command finds it
next to the installed package (an editable install or a checkout).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lvface_mm.gallery.workbench import DEFAULT_VLM

    parser.add_argument("--tiny", action="store_true", help="random tiny face encoder, CLIP and VLM (offline)")
    parser.add_argument("--model", default="lvface_b", help="LVFace variant: lvface_t/s/b/l (default lvface_b)")
    parser.add_argument("--checkpoint", help="local LVFace checkpoint instead of the official weights")
    parser.add_argument("--vlm", default=DEFAULT_VLM,
                        help=f"VLM hub id, local folder or adapter card (default {DEFAULT_VLM}); 'none' disables it")
    parser.add_argument("--adapter", help="trained identity-adapter folder: answers use identity tokens")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture for photo search")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b79k", help="open_clip weights tag or local file")
    parser.add_argument("--detector", default="dlib", help="face detector (default dlib, offline)")
    parser.add_argument("--db", default="lvface-demo.db", help="gallery + photo index file (default lvface-demo.db)")
    parser.add_argument("--photos", nargs="*", default=[], help="index these photos/folders before starting")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-file-size", default="20mb", help="largest accepted upload (default 20mb)")
    parser.add_argument("--max-pixels", type=int, default=25_000_000, help="largest accepted image in pixels")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit (tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights with --tiny")


def load_app() -> ModuleType:
    """`demos.app` from the source tree (importable when run from a checkout, else found beside the package)."""
    try:
        return importlib.import_module("demos.app")
    except ModuleNotFoundError as exc:
        if exc.name not in ("demos", "demos.app"):
            raise
    import lvface_mm

    path = Path(lvface_mm.__file__).resolve().parent.parent / "demos" / "app.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo app is not installed with the wheel: expected {path}. Run `lvface-mm demo` from a source "
            "checkout (git clone, then pip install -e '.[demo,vlm]')")
    spec = importlib.util.spec_from_file_location("demos.app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demos.app"] = module
    spec.loader.exec_module(module)
    return module


def build_from_args(args: argparse.Namespace) -> tuple[object, dict[str, object]]:
    """(gr.Blocks, launch keyword arguments) for parsed `demo` options; models load here, so missing
    weights are reported before anyone connects (the UI then shows the same message)."""
    from lvface_mm.gallery.workbench import PartUnavailable, Workbench, WorkbenchConfig

    config = WorkbenchConfig(
        db=args.db, face_model=args.model, face_checkpoint=args.checkpoint,
        vlm=None if str(args.vlm).lower() == "none" else args.vlm, adapter=args.adapter,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, tiny=args.tiny,
        detector=args.detector, max_image_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    app = load_app()
    workbench = Workbench(config)
    for part in ("embedder", "clip"):
        try:
            getattr(workbench, part)
        except PartUnavailable as exc:
            print(f"warning: {exc}", file=sys.stderr)
    if args.photos:
        try:
            report = workbench.index_photos(args.photos)
            print(f"indexed {report.indexed} photos ({report.faces} faces), skipped {report.skipped}, "
                  f"failed {len(report.failed)}", file=sys.stderr)
        except (PartUnavailable, FileNotFoundError, ValueError) as exc:
            print(f"warning: photos not indexed: {exc}", file=sys.stderr)
    for line in workbench.status():
        print(line, file=sys.stderr)
    demo = app.build_demo(workbench=workbench)
    # Nothing outside Gradio's upload cache is served (allowed_paths stays empty); the database and the
    # stored photos are blocked explicitly as well, in case they sit inside a served folder.
    db = Path(args.db).resolve()
    blocked = [str(db), f"{db}-wal", f"{db}-shm", str(db.parent / (db.stem + "-photos"))]
    launch = {"server_name": args.host, "server_port": args.port, "max_file_size": args.max_file_size,
              "allowed_paths": [], "blocked_paths": blocked, "show_error": False, "footer_links": []}
    return demo, launch


def run(args: argparse.Namespace) -> int:
    demo, launch = build_from_args(args)
    try:
        demo.launch(**launch)
    finally:
        demo.workbench_state.workbench.close()
    return 0
