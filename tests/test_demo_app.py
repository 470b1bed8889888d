"""The demo's Blocks without a browser: concurrency groups and queue, uploads kept only on opt-in,
messages without server paths, delete confirmation, unique result files, the swept cache.

Handlers are called as Gradio calls them (the functions registered on the Blocks), with uploads
placed in the Blocks' cache folder as Gradio places them."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.gallery.workbench import WorkbenchConfig

pytest.importorskip("gradio")

PORTRAITS = Path(__file__).parent / "data" / "portraits"


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The --tiny demo with its own Gradio cache folder (as the launcher sets it up)."""
    from lvface_mm.demo import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    blocks = build_demo(WorkbenchConfig(db=str(tmp_path / "demo.db"), tiny=True))
    yield blocks
    blocks.workbench_state.close()


def handler(demo, api_name):
    return next(f for f in demo.fns.values() if f.api_name == api_name).fn


def upload(demo, source: Path, name: str | None = None) -> str:
    """A file where Gradio puts an upload: <cache>/<random folder>/<the user's file name>."""
    folder = Path(demo.GRADIO_CACHE) / os.urandom(8).hex()
    folder.mkdir(parents=True)
    return str(shutil.copyfile(source, folder / (name or source.name)))


def test_reads_are_concurrent_writes_and_answers_one_at_a_time(demo):
    fns = {f.api_name: f for f in demo.fns.values() if f.api_name}
    for name in ("search", "label_faces"):
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ("read", 4)
    for name in ("enrol", "index", "do_rename", "do_delete"):
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ("write", 1)
    for name in ("caption", "ask"):
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ("vlm", 1)
    assert demo._queue.max_size == 512 and demo.analytics_enabled is False
    assert demo.delete_cache == (300, 1800)
    # the Models box and the notice refresh after every change
    refreshed = {f.trigger_after for f in demo.fns.values() if f.name == "refresh"}
    changing = {i for i, f in demo.fns.items() if f.api_name in ("enrol", "index", "do_rename", "do_delete", "caption")}
    assert changing <= refreshed


def test_header_states_how_long_uploads_stay(tmp_path, monkeypatch):
    from lvface_mm.demo import DemoSettings, build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    settings = DemoSettings(cache_age_s=600, cache_every_s=120, read_concurrency=2, max_queue=50)
    blocks = build_demo(WorkbenchConfig(db=str(tmp_path / "d.db"), tiny=True), settings=settings)
    try:
        header = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "header").value
        assert "deleted from this server within 12 minutes" in header and "never as photos" in header
        assert blocks.delete_cache == (120, 600) and blocks._queue.max_size == 50
        assert {f.concurrency_limit for f in blocks.fns.values() if f.api_name == "search"} == {2}
    finally:
        blocks.workbench_state.close()
    with pytest.raises(ValueError, match="read_concurrency"):
        DemoSettings(read_concurrency=0)


def test_enrol_deletes_the_uploaded_photos_and_index_keeps_them_only_on_opt_in(demo, tmp_path):
    state = demo.workbench_state
    photo = upload(demo, PORTRAITS / "obama.jpg")
    message, rows, files = handler(demo, "enrol")("Barack", [photo])
    assert message.startswith("Enrolled **Barack** from 1 photo") and rows[0][1] == "Barack" and files is None
    assert not Path(photo).exists()  # embeddings only

    uploads = [upload(demo, PORTRAITS / n) for n in ("obama.jpg", "biden.jpg")]
    message, cleared = handler(demo, "index")(uploads, False)
    assert "Indexed 2 photo(s)" in message and "photos not kept" in message and cleared is None
    assert not any(Path(p).exists() for p in uploads)
    photos_dir = tmp_path / "demo-photos"
    assert not photos_dir.exists() or not any(photos_dir.iterdir())
    items, found = handler(demo, "search")("Barack", None)
    assert found == "1 photo(s) found."
    (path, caption), = items
    assert caption.endswith("Barack · obama.jpg")
    from PIL import Image

    with Image.open(path) as im:  # a placeholder tile: the photo itself is gone
        assert im.size == (256, 256) and np.asarray(im).std() > 1

    kept = [upload(demo, PORTRAITS / "obama3.jpg")]
    message, _ = handler(demo, "index")(kept, True)
    assert "copies kept" in message and len(list(photos_dir.iterdir())) == 1
    assert len(state.workbench.photos) == 3


def test_messages_name_the_upload_not_the_server_path(demo):
    broken = upload(demo, PORTRAITS / "obama.jpg", "holiday.jpg")
    Path(broken).write_bytes(Path(broken).read_bytes()[:2000])  # a cut-off JPEG
    faces, answer, info = handler(demo, "label_faces")(broken)
    assert faces is None and answer == ""
    assert "holiday.jpg" in info and "truncated or corrupt" in info
    assert demo.GRADIO_CACHE not in info and "/tmp" not in info

    message = handler(demo, "enrol")("Ann", [upload(demo, PORTRAITS / "obama.jpg", "x.jpg"), broken])[0]
    assert "skipped holiday.jpg" in message and "/" not in message.split("skipped")[1].split(":")[0]

    from lvface_mm.demo.state import clean_message

    assert clean_message("<array 0>: no face found") == "the photo: no face found"
    assert clean_message(f"{demo.GRADIO_CACHE}/ab12/c.jpg: bad", cache_dirs=(demo.GRADIO_CACHE,)) == "c.jpg: bad"


def test_a_new_photo_clears_the_previous_answer(demo):
    faces, answer, info = handler(demo, "label_faces")(upload(demo, PORTRAITS / "obama.jpg"))
    assert answer == "" and info.startswith("1 face(s)")
    image, boxes = faces
    assert Path(image).is_file() and Path(image).is_relative_to(demo.GRADIO_CACHE) and len(boxes) == 1
    assert handler(demo, "label_faces")(None) == (None, "", "")


def test_delete_asks_for_confirmation(demo):
    state = demo.workbench_state
    state.workbench.gallery.enrol("Ann", np.ones(state.workbench.gallery.feature_dim))
    ask = next(f.fn for f in demo.fns.values() if f.name == "ask_delete")
    message, confirm_row = ask("Ann")
    assert "cannot be undone" in message and confirm_row["visible"] is True
    assert [p.name for p in state.workbench.gallery.list_identities()] == ["Ann"]  # nothing deleted yet
    assert ask("Bob")[1]["visible"] is False
    message, rows, confirm_row = handler(demo, "do_delete")("Ann")
    assert message.startswith("Deleted **Ann**") and rows == [] and confirm_row["visible"] is False
    assert len(state.workbench.gallery) == 0


def test_identical_concurrent_searches_get_their_own_complete_files(demo):
    state = demo.workbench_state
    state.workbench.index_photos([str(PORTRAITS)])
    search = handler(demo, "search")
    results: list[list[tuple[str, str]]] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        results.append(search("a portrait", None)[0])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    paths = [p for items in results for p, _ in items]
    assert len(results) == 8 and len(paths) == 8 * 4 and len(set(paths)) == len(paths)
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            im.load()  # a truncated file raises here


def test_sweep_deletes_old_files_and_spares_new_ones(tmp_path):
    from lvface_mm.demo.cache import CacheSweeper, sweep

    old = tmp_path / "abc" / "upload.jpg"
    orphan = tmp_path / "tmpx1y2z3"  # what a cut-off upload leaves at the top of the cache
    new = tmp_path / "def" / "fresh.jpg"
    for p in (old, orphan, new):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * 100)
    long_ago = time.time() - 3600
    for p in (old, orphan, old.parent):
        os.utime(p, (long_ago, long_ago))
    assert sweep(tmp_path, max_age_s=600) == 2
    assert not old.exists() and not orphan.exists() and new.exists()
    os.utime(old.parent, (long_ago, long_ago))  # deleting its file touched the folder
    sweep(tmp_path, max_age_s=600)
    assert not old.parent.exists() and new.parent.exists()

    sweeper = CacheSweeper(tmp_path, max_age_s=1, every_s=0.2).start()
    try:
        deadline = time.monotonic() + 10
        while new.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not new.exists()
    finally:
        sweeper.stop(remove=True)
    assert not tmp_path.exists()


def test_switching_models_gives_each_encoder_its_own_gallery(tmp_path):
    from lvface_mm.demo.state import DemoState

    state = DemoState(WorkbenchConfig(db=str(tmp_path / "demo.db"), face_model="lvface_b"))
    state.workbench.gallery.enrol("Ann", np.ones(512))
    wb = state.switch("lvface_t", "none")
    assert wb.config.db == str(tmp_path / "demo.lvface_t.db") and wb.config.vlm is None
    assert len(wb.gallery) == 0 and wb.gallery.model_name == "lvface_t"
    back = state.switch("lvface_b", "HuggingFaceTB/SmolVLM-256M-Instruct")
    assert [p.name for p in back.gallery.list_identities()] == ["Ann"]  # B's gallery is untouched
    state.close()


def test_the_checkout_launcher_runs_the_packaged_app():
    import demos.app
    from lvface_mm.cli import build_parser
    from lvface_mm.demo import app

    assert demos.app.build_demo is app.build_demo
    args = build_parser().parse_args(["demo", "--tiny"])
    assert (args.host, args.port, args.max_file_size, args.read_concurrency, args.max_queue, args.keep_minutes) == (
        "127.0.0.1", 7860, "20mb", 4, 512, 30)
