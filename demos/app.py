"""The lvface-mm Gradio demo: enrol people, caption and ask about a photo, search a collection.

UI only: every action calls `lvface_mm.gallery.workbench.Workbench`. Start it with
`lvface-mm demo` (or `lvface-mm demo --tiny` for random tiny models, fully offline).

Safety: uploads arrive as files (size capped by the launcher's `max_file_size`) and are decoded
by the library with a pixel limit; result thumbnails are rendered in memory, so the server needs
no `allowed_paths` and serves nothing from disk but its own upload cache.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from lvface_mm.gallery.workbench import DEFAULT_VLM, PartUnavailable, Workbench, WorkbenchConfig

log = logging.getLogger("lvface_mm.demo")

FACE_VARIANTS = ("lvface_t", "lvface_s", "lvface_b", "lvface_l")
VLM_CHOICES = (DEFAULT_VLM, "HuggingFaceTB/SmolVLM-500M-Instruct", "llava-hf/llava-1.5-7b-hf",
               "Qwen/Qwen2.5-VL-3B-Instruct")
EXPECTED = (ValueError, KeyError, PartUnavailable, FileNotFoundError)


class DemoState:
    """The one workbench all users share, swapped atomically when someone picks other models."""

    def __init__(self, config: WorkbenchConfig | None = None, workbench: Workbench | None = None) -> None:
        self._lock = threading.Lock()
        self.workbench = workbench if workbench is not None else Workbench(config or WorkbenchConfig())
        self.base_db = Path(self.workbench.config.db)
        self._first_model = self.workbench.config.face_model

    def switch(self, face_model: str, vlm: str) -> Workbench:
        with self._lock:
            old = self.workbench
            cfg = old.config
            if cfg.tiny or (face_model == cfg.face_model and vlm == cfg.vlm):
                return old
            # Embeddings of different encoders do not compare: each variant gets its own gallery file.
            db = self.base_db if face_model == self._first_model else self.base_db.with_suffix(f".{face_model}.db")
            chosen = None if not vlm or vlm.strip().lower() == "none" else vlm.strip()
            self.workbench = Workbench(replace(cfg, face_model=face_model, vlm=chosen, db=str(db)))
            old.close()
            return self.workbench


def _message(exc: BaseException) -> str:
    return f"**Could not do that:** {exc}"


def _guard(fn: Callable[..., Any], fallback: Callable[[str], Any]) -> Callable[..., Any]:
    """Turn expected errors (bad file, missing weights, unknown name) into a message in the UI."""

    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except EXPECTED as exc:
            return fallback(_message(exc))
        except Exception as exc:  # the UI boundary: log it, tell the user, keep serving
            log.exception("demo request failed")
            return fallback(_message(f"internal error ({type(exc).__name__}: {exc})"))

    wrapped.__name__ = fn.__name__
    return wrapped


def _people_rows(wb: Workbench) -> list[list[Any]]:
    return [[p.identity_id, p.name, p.num_samples] for p in wb.gallery.list_identities()]


def _paths(files: Any) -> list[str]:
    if not files:
        return []
    items = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in items]


def _annotated(wb: Workbench, path: str) -> tuple[Any, str]:
    image, faces, _ = wb.label_faces(path)
    boxes = [(f.box, f.label) for f in faces]
    summary = ", ".join(f.label for f in faces) if faces else "no face found"
    return (image, boxes), f"{len(faces)} face(s): {summary}"


def _build_enrol_tab(state: DemoState) -> gr.Dataframe:
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(label="Name", placeholder="e.g. Alice", elem_id="enrol-name")
            files = gr.File(label="Photos of this person (the largest face of each is used)", file_count="multiple",
                            file_types=["image"], elem_id="enrol-files")
            button = gr.Button("Enrol", variant="primary", elem_id="enrol-btn")
            out = gr.Markdown(elem_id="enrol-out")
        with gr.Column():
            people = gr.Dataframe(headers=["id", "name", "photos"], value=_people_rows(state.workbench),
                                  interactive=False, label="Enrolled people", elem_id="people")
            with gr.Accordion("Rename or delete", open=False):
                who = gr.Textbox(label="Current name", elem_id="manage-name")
                new = gr.Textbox(label="New name (for rename)", elem_id="manage-new")
                with gr.Row():
                    rename = gr.Button("Rename", elem_id="rename-btn")
                    delete = gr.Button("Delete (embeddings are erased)", variant="stop", elem_id="delete-btn")
                manage_out = gr.Markdown(elem_id="manage-out")

    def do_enrol(person: str, uploads: Any) -> tuple[str, Any]:
        wb = state.workbench
        outcome = wb.enrol(person, _paths(uploads))
        lines = [f"Enrolled **{outcome.name}** from {len(outcome.used)} photo(s)." if outcome.identity_id
                 else f"Nothing enrolled for **{outcome.name}**."]
        lines += [f"- skipped {src}: {why}" for src, why in outcome.skipped]
        return "\n".join(lines), _people_rows(wb)

    def do_rename(old: str, new_name: str) -> tuple[str, Any]:
        state.workbench.gallery.rename(old, new_name)
        return f"Renamed **{old}** to **{new_name}**.", _people_rows(state.workbench)

    def do_delete(person: str) -> tuple[str, Any]:
        state.workbench.gallery.delete(person)
        return f"Deleted **{person}** and all their embeddings.", _people_rows(state.workbench)

    def keep_table(msg: str) -> tuple[str, Any]:
        return msg, gr.update()

    button.click(_guard(do_enrol, keep_table), [name, files], [out, people], concurrency_id="compute")
    rename.click(_guard(do_rename, keep_table), [who, new], [manage_out, people])
    delete.click(_guard(do_delete, keep_table), [who], [manage_out, people])
    return people


def _build_ask_tab(state: DemoState) -> None:
    with gr.Row():
        with gr.Column():
            photo = gr.File(label="Photo", file_types=["image"], elem_id="ask-file")
            question = gr.Textbox(label="Question (leave empty for a caption)", placeholder="Who is on the left?",
                                  elem_id="ask-question")
            with gr.Row():
                caption = gr.Button("Caption", variant="primary", elem_id="caption-btn")
                ask = gr.Button("Ask", elem_id="ask-btn")
            answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="ask-answer")
            info = gr.Markdown(elem_id="ask-info")
        with gr.Column():
            faces = gr.AnnotatedImage(label="Faces (named from the gallery)", elem_id="ask-faces")

    def show_faces(path: Any) -> tuple[Any, str]:
        if not path:
            return None, ""
        return _annotated(state.workbench, _paths(path)[0])

    def run(path: Any, text: str | None) -> Iterator[tuple[Any, str, str]]:
        if not path:
            yield gr.update(), "", "Upload a photo first."
            return
        wb = state.workbench
        annotated, summary = _annotated(wb, _paths(path)[0])
        yield annotated, "", summary + " — generating..."
        for partial, final in wb.ask_stream(_paths(path)[0], text):
            if final is None:
                yield gr.update(), partial, summary + " — generating..."
            else:
                yield gr.update(), final.text, f"{summary} — {final.mode}"

    def guarded_run(path: Any, text: str | None) -> Iterator[tuple[Any, str, str]]:
        try:
            yield from run(path, text)
        except EXPECTED as exc:
            yield gr.update(), "", _message(exc)
        except Exception as exc:  # the UI boundary
            log.exception("demo request failed")
            yield gr.update(), "", _message(f"internal error ({type(exc).__name__}: {exc})")

    photo.change(_guard(show_faces, lambda m: (None, m)), [photo], [faces, info], concurrency_id="compute")
    def caption_run(path: Any) -> Iterator[tuple[Any, str, str]]:  # a generator function, so Gradio streams it
        yield from guarded_run(path, None)

    caption.click(caption_run, [photo], [faces, answer, info], concurrency_id="compute")
    ask.click(guarded_run, [photo, question], [faces, answer, info], concurrency_id="compute")
    question.submit(guarded_run, [photo, question], [faces, answer, info], concurrency_id="compute")


def _store_uploads(state: DemoState, uploads: list[str]) -> dict[str, str]:
    """Copy uploaded photos into a folder the demo owns (Gradio's cache is cleaned up), named by
    content hash so re-uploads dedupe. Returns stored path -> the name the user uploaded."""
    folder = state.base_db.parent / (state.base_db.stem + "-photos")
    folder.mkdir(parents=True, exist_ok=True)
    kept = {}
    for path in uploads:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]
        target = folder / (digest + Path(path).suffix.lower())
        if not target.exists():
            shutil.copyfile(path, target)
        kept[str(target)] = Path(path).name
    return kept


def _build_search_tab(state: DemoState) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            uploads = gr.File(label="Add photos to the collection", file_count="multiple", file_types=["image"],
                              elem_id="index-files")
            index = gr.Button("Index photos", elem_id="index-btn")
            index_out = gr.Markdown(elem_id="index-out")
            query = gr.Textbox(label="Search", placeholder="Alice at the beach", elem_id="search-query")
            face = gr.File(label="...or find this face", file_types=["image"], elem_id="search-face")
            search = gr.Button("Search", variant="primary", elem_id="search-btn")
            out = gr.Markdown(elem_id="search-out")
        with gr.Column(scale=2):
            grid = gr.Gallery(label="Results", columns=4, height=520, object_fit="contain", preview=False,
                              elem_id="search-grid")

    def do_index(files: Any) -> str:
        paths = _paths(files)
        if not paths:
            return "Choose photos to add first."
        stored = _store_uploads(state, paths)
        report = state.workbench.index_photos(list(stored))
        lines = [f"Indexed {report.indexed} photo(s) ({report.faces} faces), skipped {report.skipped} already indexed, "
                 f"{len(report.failed)} failed; collection: {len(state.workbench.photos)} photos."]
        lines += [f"- {stored.get(p, Path(p).name)}: {why}" for p, why in report.failed]
        return "\n".join(lines)

    def do_search(text: str, face_file: Any) -> tuple[Any, str]:
        wb = state.workbench
        hits = wb.search(text or "", _paths(face_file)[0] if face_file else None)
        items = []
        for hit in hits:
            names = sorted({f.name for f in hit.faces if f.name})
            items.append((wb.thumbnail(hit), f"{hit.score:.2f} " + (", ".join(names) if names else "")))
        return items, f"{len(hits)} photo(s) found." if hits else "No matching photo."

    index.click(_guard(do_index, lambda m: m), [uploads], [index_out], concurrency_id="compute")
    search.click(_guard(do_search, lambda m: ([], m)), [query, face], [grid, out], concurrency_id="compute")
    query.submit(_guard(do_search, lambda m: ([], m)), [query, face], [grid, out], concurrency_id="compute")


def _build_models_box(state: DemoState, people: gr.Dataframe) -> None:
    cfg = state.workbench.config
    with gr.Accordion("Models", open=False):
        status = gr.Markdown("\n".join(f"- {line}" for line in state.workbench.status()), elem_id="status")
        if cfg.tiny:
            gr.Markdown("Running with `--tiny`: random tiny models, so names come only from near-identical photos "
                        "and answers are gibberish. Start without `--tiny` for real models.")
            return
        with gr.Row():
            face_model = gr.Dropdown(list(FACE_VARIANTS), value=cfg.face_model, label="LVFace variant")
            vlm = gr.Dropdown(list(dict.fromkeys((cfg.vlm or DEFAULT_VLM, *VLM_CHOICES))), value=cfg.vlm,
                              allow_custom_value=True, label="VLM (hub id or local folder)")
            apply = gr.Button("Use these models")

    def do_switch(model: str, vlm_id: str) -> tuple[str, Any]:
        wb = state.switch(model, vlm_id)
        return "\n".join(f"- {line}" for line in wb.status()), _people_rows(wb)

    apply.click(_guard(do_switch, lambda m: (m, gr.update())), [face_model, vlm], [status, people],
                concurrency_id="compute")


def build_demo(config: WorkbenchConfig | None = None, *, workbench: Workbench | None = None) -> gr.Blocks:
    """The demo's Blocks (not launched). Pass a config, or a ready workbench (tests)."""
    state = DemoState(config, workbench)
    title = "LVFace-MM: who is in the picture?"
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nEnrol people from a photo or two, then caption and ask about pictures with their "
                    "names, and find them in a photo collection. Faces are stored as embeddings only.")
        with gr.Tabs():
            with gr.Tab("Enrol", id="enrol"):
                people = _build_enrol_tab(state)
            with gr.Tab("Caption & ask", id="ask"):
                _build_ask_tab(state)
            with gr.Tab("Search photos", id="search"):
                _build_search_tab(state)
        _build_models_box(state, people)
    # One heavy job at a time (models share the CPU); everyone else waits in a bounded queue.
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.workbench_state = state  # for the launcher's clean shutdown
    return demo
