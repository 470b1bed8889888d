"""The lvface-mm Gradio demo: enrol people, caption and ask about a photo, search a collection.

UI only: every action calls `lvface_mm.gallery.workbench.Workbench` through `DemoState`. Start it
with `lvface-mm demo` (or `lvface-mm demo --tiny` for random tiny models, fully offline).

Serving: reads (naming the faces of an upload, searching) run `read_concurrency` at a time; enrol,
index, rename, delete and model switches share one writer slot; VLM answers get their own single
slot. Result thumbnails are written under fresh names into the demo's cache folder, which is
swept (see `lvface_mm.demo.cache`), so no file is rewritten while it is served.

Safety: uploads arrive as files (size capped by the launcher's `max_file_size`) and are decoded by
the library with a pixel limit; nothing outside the cache folder is served.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from ..gallery.workbench import DEFAULT_VLM, PartUnavailable, Workbench, WorkbenchConfig
from .cache import write_result_image
from .state import DemoSettings, DemoState, clean_message

__all__ = ["build_demo"]

log = logging.getLogger("lvface_mm.demo")

FACE_VARIANTS = ("lvface_t", "lvface_s", "lvface_b", "lvface_l")
VLM_CHOICES = (DEFAULT_VLM, "HuggingFaceTB/SmolVLM-500M-Instruct", "llava-hf/llava-1.5-7b-hf",
               "Qwen/Qwen2.5-VL-3B-Instruct")
EXPECTED = (ValueError, KeyError, PartUnavailable, FileNotFoundError)
READ, WRITE, VLM = "read", "write", "vlm"  # concurrency groups


class _Ui:
    """What every handler needs: the shared state and where this app's cache folders are."""

    def __init__(self, state: DemoState, cache_dir: str) -> None:
        self.state = state
        self.cache_dir = cache_dir  # Gradio's cache of this Blocks: uploads and result images
        roots = [cache_dir] + ([str(state.cache_dir)] if state.cache_dir is not None else [])
        self.roots = tuple(dict.fromkeys(roots))

    @property
    def settings(self) -> DemoSettings:
        return self.state.settings

    def wb(self) -> Workbench:
        return self.state.current()

    def message(self, exc: BaseException | str) -> str:
        return f"**Could not do that:** {clean_message(str(exc), cache_dirs=self.roots)}"

    def guard(self, fn: Callable[..., Any], fallback: Callable[[str], Any]) -> Callable[..., Any]:
        """Turn expected errors (bad file, missing weights, unknown name) into a message in the UI."""

        def wrapped(*args: Any) -> Any:
            try:
                return fn(*args)
            except EXPECTED as exc:
                return fallback(self.message(exc))
            except Exception as exc:  # the UI boundary: log it, tell the user, keep serving
                log.exception("demo request failed")
                return fallback(self.message(f"internal error ({type(exc).__name__}: {exc})"))

        wrapped.__name__ = fn.__name__
        return wrapped

    def forget_uploads(self, paths: list[str]) -> None:
        """Delete uploaded files once used (only files inside this demo's cache: never a server file)."""
        for path in paths:
            resolved = Path(path).resolve()
            if any(resolved.is_relative_to(Path(root).resolve()) for root in self.roots):
                resolved.unlink(missing_ok=True)


def _people_rows(wb: Workbench) -> list[list[Any]]:
    return [[p.identity_id, p.name, p.num_samples] for p in wb.gallery.list_identities()]


def _paths(files: Any) -> list[str]:
    if not files:
        return []
    items = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in items]


def _annotated(ui: _Ui, path: str) -> tuple[Any, str]:
    image, faces, _ = ui.wb().label_faces(path)
    boxes = [(f.box, f.label) for f in faces]
    summary = ", ".join(f.label for f in faces) if faces else "no face found"
    # The photo goes to a file of its own: Gradio would name an array by its pixels, and two users
    # looking at the same photo would then share (and rewrite) one file.
    return (write_result_image(image, ui.cache_dir, "photo"), boxes), f"{len(faces)} face(s): {summary}"


def _build_enrol_tab(ui: _Ui) -> tuple[gr.Dataframe, list[Any]]:
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(label="Name", placeholder="e.g. Alice", elem_id="enrol-name")
            files = gr.File(label="Photos of this person (the largest face of each is used; the photos are "
                            "deleted once read)", file_count="multiple", file_types=["image"], elem_id="enrol-files")
            button = gr.Button("Enrol", variant="primary", elem_id="enrol-btn")
            out = gr.Markdown(elem_id="enrol-out")
        with gr.Column():
            rows = _people_rows(ui.state.workbench) if ui.state.workbench is not None else []
            people = gr.Dataframe(headers=["id", "name", "photos"], value=rows, interactive=False,
                                  label="Enrolled people", elem_id="people")
            with gr.Accordion("Rename or delete", open=False):
                who = gr.Textbox(label="Current name", elem_id="manage-name")
                new = gr.Textbox(label="New name (for rename)", elem_id="manage-new")
                with gr.Row():
                    rename = gr.Button("Rename", elem_id="rename-btn")
                    delete = gr.Button("Delete...", variant="stop", elem_id="delete-btn")
                with gr.Row(visible=False) as confirm_row:
                    confirm = gr.Button("Yes, erase this person", variant="stop", elem_id="delete-confirm-btn")
                    cancel = gr.Button("Cancel", elem_id="delete-cancel-btn")
                manage_out = gr.Markdown(elem_id="manage-out")

    def do_enrol(person: str, uploads: Any) -> tuple[str, Any, Any]:
        wb, paths = ui.wb(), _paths(uploads)
        try:
            outcome = wb.enrol(person, paths)
        finally:
            ui.forget_uploads(paths)  # embeddings only: the photos go as soon as they are read
        lines = [f"Enrolled **{outcome.name}** from {len(outcome.used)} photo(s)." if outcome.identity_id
                 else f"Nothing enrolled for **{outcome.name}**."]
        lines += [f"- skipped {src}: {why}" for src, why in outcome.skipped]
        return clean_message("\n".join(lines), cache_dirs=ui.roots), _people_rows(wb), None

    def do_rename(old: str, new_name: str) -> tuple[str, Any]:
        ui.wb().gallery.rename(old, new_name)
        return f"Renamed **{old}** to **{new_name}**.", _people_rows(ui.wb())

    def ask_delete(person: str) -> tuple[str, Any]:
        person = (person or "").strip()
        if not person:
            return "Type the name to delete first.", gr.update(visible=False)
        if person not in {p.name for p in ui.wb().gallery.list_identities()}:
            return f"**{person}** is not enrolled.", gr.update(visible=False)
        return (f"Erase **{person}** and all their embeddings? This cannot be undone.",
                gr.update(visible=True))

    def do_delete(person: str) -> tuple[str, Any, Any]:
        person = person.strip()
        ui.wb().gallery.delete(person)
        return f"Deleted **{person}** and all their embeddings.", _people_rows(ui.wb()), gr.update(visible=False)

    write = {"concurrency_id": WRITE, "concurrency_limit": 1}
    enrolled = button.click(ui.guard(do_enrol, lambda m: (m, gr.update(), gr.update())), [name, files],
                            [out, people, files], api_name="enrol", **write)
    renamed = rename.click(ui.guard(do_rename, lambda m: (m, gr.update())), [who, new], [manage_out, people], **write)
    delete.click(ui.guard(ask_delete, lambda m: (m, gr.update(visible=False))), [who], [manage_out, confirm_row],
                 queue=False)
    deleted = confirm.click(ui.guard(do_delete, lambda m: (m, gr.update(), gr.update(visible=False))), [who],
                            [manage_out, people, confirm_row], **write)
    cancel.click(lambda: ("Nothing deleted.", gr.update(visible=False)), None, [manage_out, confirm_row], queue=False,
                 api_visibility="private")
    return people, [enrolled, renamed, deleted]


def _build_ask_tab(ui: _Ui) -> list[Any]:
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

    def show_faces(path: Any) -> tuple[Any, str, str]:
        # A new photo (or none) clears the previous answer: it was about another picture.
        if not path:
            return None, "", ""
        annotated, summary = _annotated(ui, _paths(path)[0])
        return annotated, "", summary

    def run(path: Any, text: str | None) -> Iterator[tuple[Any, str, str]]:
        if not path:
            yield gr.update(), "", "Upload a photo first."
            return
        wb = ui.wb()
        annotated, summary = _annotated(ui, _paths(path)[0])
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
            yield gr.update(), "", ui.message(exc)
        except Exception as exc:  # the UI boundary
            log.exception("demo request failed")
            yield gr.update(), "", ui.message(f"internal error ({type(exc).__name__}: {exc})")

    def caption_run(path: Any) -> Iterator[tuple[Any, str, str]]:  # a generator function, so Gradio streams it
        yield from guarded_run(path, None)

    vlm = {"concurrency_id": VLM, "concurrency_limit": 1}
    return [
        photo.change(ui.guard(show_faces, lambda m: (None, "", m)), [photo], [faces, answer, info],
                     api_name="label_faces", concurrency_id=READ, concurrency_limit=ui.settings.read_concurrency),
        caption.click(caption_run, [photo], [faces, answer, info], api_name="caption", **vlm),
        ask.click(guarded_run, [photo, question], [faces, answer, info], api_name="ask", **vlm),
        question.submit(guarded_run, [photo, question], [faces, answer, info], api_visibility="private", **vlm),
    ]


def _store_uploads(state: DemoState, uploads: list[str]) -> dict[str, str]:
    """Copy uploaded photos into a folder the demo owns (the cache is swept), named by content hash
    so re-uploads dedupe. Returns stored path -> the name the user uploaded."""
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


def _placeholder(size: int = 256) -> np.ndarray:
    """The tile shown for an indexed photo whose file is not on the server (uploaded without 'keep')."""
    import cv2

    tile = np.full((size, size, 3), 225, np.uint8)
    for row, text in enumerate(("photo not kept", "on the server")):
        cv2.putText(tile, text, (20, size // 2 + 28 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (90, 90, 90), 2)
    return tile


def _build_search_tab(ui: _Ui) -> list[Any]:
    with gr.Row():
        with gr.Column(scale=1):
            uploads = gr.File(label="Add photos to the collection", file_count="multiple", file_types=["image"],
                              elem_id="index-files")
            keep = gr.Checkbox(value=ui.settings.keep_uploads, elem_id="index-keep",
                               label="Keep copies of these photos on the server (results can then show them; "
                                     "otherwise only their faces and a CLIP vector are stored)")
            index = gr.Button("Index photos", elem_id="index-btn")
            index_out = gr.Markdown(elem_id="index-out")
            query = gr.Textbox(label="Search", placeholder="Alice at the beach", elem_id="search-query")
            face = gr.File(label="...or find this face", file_types=["image"], elem_id="search-face")
            search = gr.Button("Search", variant="primary", elem_id="search-btn")
            out = gr.Markdown(elem_id="search-out")
        with gr.Column(scale=2):
            grid = gr.Gallery(label="Results", columns=4, height=520, object_fit="contain", preview=False,
                              elem_id="search-grid")

    def do_index(files: Any, keep_copies: bool) -> tuple[str, Any]:
        paths = _paths(files)
        if not paths:
            return "Choose photos to add first.", gr.update()
        wb = ui.wb()
        try:
            names = _store_uploads(ui.state, paths) if keep_copies else {p: Path(p).name for p in paths}
            report = wb.index_photos(list(names))
        finally:
            ui.forget_uploads(paths)
        kept = "copies kept" if keep_copies else "photos not kept"
        lines = [f"Indexed {report.indexed} photo(s) ({report.faces} faces), skipped {report.skipped} already indexed, "
                 f"{len(report.failed)} failed ({kept}); collection: {len(wb.photos)} photos."]
        lines += [f"- {names.get(p, Path(p).name)}: {why}" for p, why in report.failed]
        return clean_message("\n".join(lines), names, ui.roots), None

    def do_search(text: str, face_file: Any) -> tuple[Any, str]:
        wb = ui.wb()
        hits = wb.search(text or "", _paths(face_file)[0] if face_file else None)
        items = []
        for i, hit in enumerate(hits):
            names = sorted({f.name for f in hit.faces if f.name})
            thumb = wb.thumbnail(hit) if Path(hit.path).is_file() else _placeholder()
            # A fresh file per result: identical concurrent searches never share (and rewrite) one.
            items.append((write_result_image(thumb, ui.cache_dir, f"result-{i}"),
                          f"{hit.score:.2f} " + (", ".join(names) if names else "") + f" · {Path(hit.path).name}"))
        return items, f"{len(hits)} photo(s) found." if hits else "No matching photo."

    read = {"concurrency_id": READ, "concurrency_limit": ui.settings.read_concurrency}
    index_event = index.click(ui.guard(do_index, lambda m: (m, gr.update())), [uploads, keep], [index_out, uploads],
                              api_name="index", concurrency_id=WRITE, concurrency_limit=1)
    search.click(ui.guard(do_search, lambda m: ([], m)), [query, face], [grid, out], api_name="search", **read)
    query.submit(ui.guard(do_search, lambda m: ([], m)), [query, face], [grid, out], api_visibility="private", **read)
    return [index_event]


def _build_models_box(ui: _Ui, people: gr.Dataframe) -> tuple[gr.Markdown, list[Any]]:
    cfg = ui.state.config
    with gr.Accordion("Models", open=bool(ui.state.problems())):
        status = gr.Markdown("\n".join(f"- {line}" for line in ui.state.status_lines()), elem_id="status")
        if cfg.tiny:
            gr.Markdown("Running with `--tiny`: random tiny models, so names come only from near-identical photos "
                        "and answers are gibberish. Start without `--tiny` for real models.")
            return status, []
        with gr.Row():
            face_model = gr.Dropdown(list(FACE_VARIANTS), value=cfg.face_model, label="LVFace variant")
            vlm = gr.Dropdown(list(dict.fromkeys((cfg.vlm or DEFAULT_VLM, *VLM_CHOICES))), value=cfg.vlm,
                              allow_custom_value=True, label="VLM (hub id or local folder)")
            apply = gr.Button("Use these models")

    def do_switch(model: str, vlm_id: str) -> Any:
        return _people_rows(ui.state.switch(model, vlm_id))

    event = apply.click(ui.guard(do_switch, lambda m: gr.update()), [face_model, vlm], [people],
                        concurrency_id=WRITE, concurrency_limit=1)
    return status, [event]


def _privacy_sentence(settings: DemoSettings) -> str:
    return (f"People are stored as face embeddings, never as photos. Uploaded photos are deleted from this server "
            f"within {settings.upload_lifetime_minutes} minutes; photos added to the collection are kept only if "
            f"you tick *Keep copies*.")


def build_demo(config: WorkbenchConfig | None = None, *, workbench: Workbench | None = None,
               state: DemoState | None = None, settings: DemoSettings | None = None) -> gr.Blocks:
    """The demo's Blocks (not launched). Pass a config, a ready workbench (tests) or a DemoState
    (the launcher, which checked models and the database first)."""
    state = state or DemoState(config, workbench, settings=settings)
    settings = state.settings
    title = "LVFace-MM: who is in the picture?"
    with gr.Blocks(title=title, analytics_enabled=False,
                   delete_cache=(settings.cache_every_s, settings.cache_age_s)) as demo:
        gr.Markdown(f"# {title}\nEnrol people from a photo or two, then caption and ask about pictures with their "
                    f"names, and find them in a photo collection. {_privacy_sentence(settings)}", elem_id="header")
        notice = gr.Markdown(state.notice(), elem_id="notice")
        ui = _Ui(state, demo.GRADIO_CACHE)
        with gr.Tabs():
            with gr.Tab("Enrol", id="enrol"):
                people, changes = _build_enrol_tab(ui)
            with gr.Tab("Caption & ask", id="ask"):
                changes += _build_ask_tab(ui)
            with gr.Tab("Search photos", id="search"):
                changes += _build_search_tab(ui)
        status, switches = _build_models_box(ui, people)

        def refresh() -> tuple[str, str]:
            return "\n".join(f"- {line}" for line in state.status_lines()), state.notice()

        # The Models box and the notice follow every change (a part loaded or failed, people added).
        for event in [*changes, *switches]:
            event.then(refresh, None, [status, notice], queue=False, api_visibility="private")
        demo.load(refresh, None, [status, notice], queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=settings.max_queue)
    demo.workbench_state = state  # for the launcher's clean shutdown
    return demo
