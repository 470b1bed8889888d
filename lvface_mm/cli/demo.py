"""`lvface-mm demo`: start the Gradio demo (enrol, caption & ask, search a photo collection).

    lvface-mm demo                      # LVFace-B + SmolVLM-256M-Instruct + CLIP ViT-B-32, on 127.0.0.1:7860
    lvface-mm demo --tiny               # random tiny models: the whole UI offline, for development
    lvface-mm demo --vlm llava-hf/llava-1.5-7b-hf --adapter runs/adapter   # token grounding

The app is `lvface_mm.demo` (installed with the package; `demos/app.py` in a checkout launches the
same code). Before anything loads, the command checks which weights are missing; offline it says
so in one message within seconds and starts with those features off.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any


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
    parser.add_argument("--read-concurrency", type=int, default=4,
                        help="searches and face look-ups served at once (default 4); writes and answers: one at a time")
    parser.add_argument("--max-queue", type=int, default=512, help="requests that may wait (default 512)")
    parser.add_argument("--keep-minutes", type=float, default=30,
                        help="uploads and result images are deleted after this many minutes (default 30)")
    parser.add_argument("--keep-uploads", action="store_true",
                        help="tick 'keep copies of indexed photos' by default (off: only embeddings are kept)")


def _settings(args: argparse.Namespace) -> Any:
    from lvface_mm.demo.state import DemoSettings

    age = max(1, round(args.keep_minutes * 60))
    return DemoSettings(read_concurrency=args.read_concurrency, max_queue=args.max_queue, cache_age_s=age,
                        cache_every_s=max(1, min(300, age // 6)), keep_uploads=args.keep_uploads)


def _offline_parts(config: Any) -> dict[str, str]:
    """Parts whose weights are missing while the Hub cannot be reached, after one message saying so;
    also makes the Hub libraries fail fast for the rest of the run."""
    from lvface_mm.demo.startup import go_offline, hub_offline, missing_files, network_reachable, offline_message

    missing = missing_files(config)
    if not missing:
        return {}
    if hub_offline():
        reason = "HF_HUB_OFFLINE=1"
    elif not network_reachable():
        go_offline()
        reason = "the Hugging Face Hub cannot be reached; running with HF_HUB_OFFLINE=1"
    else:
        return {}  # online: the loaders download what is missing
    print(offline_message(missing, reason), file=sys.stderr)
    parts: dict[str, str] = {}
    for m in missing:
        parts.setdefault(m.part, f"{m.part} unavailable: {m.what} is not on this machine (fetch: {m.fetch})")
    return parts


def _probe(state: Any, offline: dict[str, str]) -> None:
    """Load the face encoder and CLIP now, so problems show before anyone connects (the VLM loads on
    first use: it is the largest). Each failure is one warning line; the page says the same."""
    from lvface_mm.gallery.workbench import PartUnavailable

    if state.fatal:
        print(f"warning: {state.fatal}", file=sys.stderr)
        return
    wb = state.workbench
    for part, attr in (("face encoder", "embedder"), ("CLIP", "clip")):
        if part in offline:
            continue
        try:
            getattr(wb, attr)
        except PartUnavailable as exc:
            print(f"warning: {str(exc).splitlines()[0]}", file=sys.stderr)
    try:
        _ = wb.photos
    except PartUnavailable:
        pass  # reported above
    except ValueError as exc:  # an index made with another CLIP or encoder
        print(f"warning: photo search off: {exc}", file=sys.stderr)


def _index_with_progress(wb: Any, photos: list[str]) -> None:
    from tqdm.auto import tqdm

    from lvface_mm.gallery.workbench import PartUnavailable

    bar = tqdm(total=0, unit="photo", desc="indexing", file=sys.stderr)

    def tick(p: Any) -> None:
        bar.total = p.total
        bar.set_postfix_str(p.status, refresh=False)
        bar.update(p.done - bar.n)

    try:
        report = wb.index_photos(photos, progress=tick)
        bar.close()
        print(f"indexed {report.indexed} photos ({report.faces} faces), skipped {report.skipped}, "
              f"failed {len(report.failed)}", file=sys.stderr)
    except (PartUnavailable, FileNotFoundError, ValueError) as exc:
        bar.close()
        print(f"warning: photos not indexed: {str(exc).splitlines()[0]}", file=sys.stderr)


def build_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(gr.Blocks, launch keyword arguments) for parsed `demo` options. Checks and loads happen here,
    so missing weights are reported before anyone connects (the page then says the same).
    `demo.workbench_state.close()` undoes everything this set up (cache folder, environment)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from lvface_mm.demo.cache import CacheSweeper, private_cache_dir
    from lvface_mm.demo.state import DemoState
    from lvface_mm.gallery.workbench import WorkbenchConfig

    config = WorkbenchConfig(
        db=args.db, face_model=args.model, face_checkpoint=args.checkpoint,
        vlm=None if str(args.vlm).lower() == "none" else args.vlm, adapter=args.adapter,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, tiny=args.tiny,
        detector=args.detector, max_image_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    settings = _settings(args)
    offline = _offline_parts(config)

    # A cache folder of our own (unless the user chose one): swept, and removed at shutdown.
    previous_tmp = os.environ.get("GRADIO_TEMP_DIR")
    cache = Path(previous_tmp) if previous_tmp else private_cache_dir()
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    sweeper = CacheSweeper(cache, settings.cache_age_s, settings.cache_every_s).start()

    state = DemoState(config, settings=settings, unavailable=offline, cache_dir=cache)

    def undo() -> None:
        sweeper.stop(remove=previous_tmp is None)
        if previous_tmp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)

    state.add_cleanup(undo)
    _probe(state, offline)
    if args.photos and state.workbench is not None:
        _index_with_progress(state.workbench, args.photos)
    for line in state.status_lines():
        if "is not on this machine" not in line:  # said once already, in the offline message
            print(line, file=sys.stderr)

    from lvface_mm.demo.app import build_demo

    demo = build_demo(state=state)
    # Nothing outside Gradio's cache is served (allowed_paths stays empty); the database and the
    # stored photos are blocked explicitly as well, in case they sit inside a served folder.
    db = Path(args.db).resolve()
    blocked = [str(db), f"{db}-wal", f"{db}-shm", str(db.parent / (db.stem + "-photos"))]
    launch = {"server_name": args.host, "server_port": args.port, "max_file_size": args.max_file_size,
              "allowed_paths": [], "blocked_paths": blocked, "show_error": False, "footer_links": [],
              "quiet": True}  # quiet: no share-link hint; run() prints the address
    return demo, launch


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("lvface-mm demo needs Gradio: pip install 'lvface-mm[demo,vlm]'", file=sys.stderr)
        return 2
    demo, launch = build_from_args(args)
    print(f"demo on http://{args.host}:{args.port}/ (Ctrl+C stops it)", file=sys.stderr)
    # A service manager stops us with SIGTERM: exit through `finally`, so the upload cache goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        demo.launch(**launch)
    finally:
        demo.workbench_state.close()
    return 0
