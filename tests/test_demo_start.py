"""`lvface-mm demo` starts and degrades as docs/gallery_and_demo.md promises: bad files, a database
made by another encoder, and no network give one clear message and a page that says which tabs
work, never a traceback. The launcher is driven through the CLI's own argument path (no server)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from lvface_mm.cli import build_parser

pytest.importorskip("gradio")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, whatever this machine has cached."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def start(tmp_path: Path, *argv: str):
    """build_from_args for `lvface-mm demo ARGV` (not launched); returns (demo, state)."""
    from lvface_mm.cli.demo import build_from_args

    args = build_parser().parse_args(["demo", "--db", str(tmp_path / "demo.db"), *argv])
    demo, launch = build_from_args(args)
    assert launch["quiet"] is True  # no "set share=True" hint
    return demo, demo.workbench_state


def fn_by_api(demo, name):
    return next(f for f in demo.fns.values() if f.api_name == name).fn


def warm_imports() -> None:
    """Import what the launcher imports, so the timed part is the start itself (on a busy 2-core CI
    machine importing gradio + open_clip alone can take several seconds)."""
    import open_clip  # noqa: F401

    import lvface_mm.demo.app  # noqa: F401


def message_time(argv: list[str]) -> float:
    """Seconds from the start of the launcher's check to its offline message (the user-visible part)."""
    from lvface_mm.cli.demo import _offline_parts
    from lvface_mm.gallery.workbench import WorkbenchConfig

    args = build_parser().parse_args(["demo", *argv])
    config = WorkbenchConfig(db="unused.db", face_model=args.model, vlm=None if args.vlm == "none" else args.vlm)
    t0 = time.monotonic()
    assert _offline_parts(config)
    return time.monotonic() - t0


def test_offline_start_is_fast_and_says_what_is_missing_once(tmp_path, empty_hub_cache, capsys):
    warm_imports()
    elapsed = message_time([])
    assert elapsed < 5.0, f"the offline message took {elapsed:.1f} s"
    capsys.readouterr()
    t0 = time.monotonic()
    demo, state = start(tmp_path)  # the real defaults: LVFace-B, CLIP ViT-B-32, SmolVLM-256M
    # No part tries to load (a Hub retry loop takes minutes); the bound is loose for a busy CI machine.
    assert time.monotonic() - t0 < 30.0
    try:
        err = capsys.readouterr().err
        assert err.count("Offline (HF_HUB_OFFLINE=1)") == 1 and "Traceback" not in err
        for needed in ("LVFace-B_Glint360K.pt", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                       "HuggingFaceTB/SmolVLM-256M-Instruct", "hf download"):
            assert needed in err
        notice = state.notice()
        assert "face encoder" in notice and "CLIP" in notice and "VLM" in notice
        assert "No tab works until the face encoder loads" in notice
        # an action answers with the reason instead of trying to load (or download) again
        message = fn_by_api(demo, "search")("anything", None)[1]
        assert "not on this machine" in message and "hf download" in message
    finally:
        state.close()


def test_no_network_turns_the_hub_offline_within_seconds(tmp_path, empty_hub_cache, monkeypatch, capsys):
    from lvface_mm.demo import startup

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as s:  # a local port nobody listens on stands in for an unreachable Hub
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(startup, "HUB_HOST", "127.0.0.1")
    monkeypatch.setattr(startup, "HUB_PORT", closed)
    warm_imports()
    assert message_time(["--vlm", "none"]) < 5.0
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the check above turned them on; start from none
        monkeypatch.delenv(var)
    demo, state = start(tmp_path, "--vlm", "none")
    try:
        err = capsys.readouterr().err
        assert "cannot be reached; running with HF_HUB_OFFLINE=1" in err
        import os

        from huggingface_hub import constants

        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
        assert "VLM disabled" in state.notice()
    finally:
        state.close()
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # as CI runs (the monkeypatched env is restored by pytest)


def test_network_probe_sees_an_open_and_a_closed_port():
    from lvface_mm.demo.startup import network_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert network_reachable("127.0.0.1", port, timeout=2.0)
    t0 = time.monotonic()
    assert not network_reachable("127.0.0.1", port, timeout=2.0)
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("problem", ["corrupt", "wrong_variant"])
def test_a_bad_checkpoint_disables_the_face_encoder_with_a_message(tmp_path, empty_hub_cache, capsys, problem):
    from _encoder_fixtures import official_state_dict

    checkpoint = tmp_path / "model.pt"
    if problem == "corrupt":
        checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint" * 100)
        model = "lvface_t"
    else:  # LVFace-T weights given to an LVFace-S model
        torch.save(official_state_dict(256, 12), checkpoint)
        model = "lvface_s"
    demo, state = start(tmp_path, "--model", model, "--checkpoint", str(checkpoint), "--vlm", "none",
                        "--clip-pretrained", "none-such-tag")
    try:
        err = capsys.readouterr().err
        assert "Traceback" not in err and "warning: face encoder unavailable:" in err
        problems = state.problems()
        assert "face encoder" in problems and "CLIP" in problems
        assert "model.pt" in problems["face encoder"] or "size mismatch" in problems["face encoder"]
        assert "No tab works until the face encoder loads" in state.notice()
        portrait = Path(__file__).parent / "data" / "portraits" / "obama.jpg"
        message = fn_by_api(demo, "enrol")("Ann", [str(portrait)])[0]
        assert portrait.is_file()  # only uploads in the demo's own cache are deleted after use
        assert message.startswith("**Could not do that:** face encoder unavailable")
    finally:
        state.close()


def test_a_bad_clip_file_disables_search_only(tmp_path):
    bad = tmp_path / "clip.bin"
    bad.write_bytes(b"\x80\x02 definitely not a pickle" * 50)
    from lvface_mm.demo.state import DemoState
    from lvface_mm.gallery.workbench import WorkbenchConfig

    state = DemoState(WorkbenchConfig(db=str(tmp_path / "b.db"), face_model="lvface_t", vlm=None,
                                      clip_pretrained=str(bad)))
    try:
        from lvface_mm.gallery.workbench import PartUnavailable

        with pytest.raises(PartUnavailable, match="CLIP unavailable"):
            _ = state.workbench.clip
        assert "indexing photos and text search unavailable" in state.notice()
    finally:
        state.close()


def test_a_database_of_another_encoder_starts_with_a_notice(tmp_path, capsys):
    from lvface_mm.gallery import Gallery

    with Gallery(str(tmp_path / "demo.db"), model_name="lvface_t") as g:
        g.enrol("Ann", torch.randn(512).numpy())
    demo, state = start(tmp_path, "--tiny")  # --tiny is lvface_tiny: another encoder
    try:
        err = capsys.readouterr().err
        assert "warning: The database cannot be used" in err and "Traceback" not in err
        assert state.notice().startswith("**Nothing works yet.**") and "lvface_t" in state.notice()
        message = fn_by_api(demo, "search")("Ann", None)[1]
        assert "The database cannot be used" in message and "--model" in message
    finally:
        state.close()
    with Gallery(str(tmp_path / "demo.db"), model_name="lvface_t") as g:  # and nothing was lost
        assert [p.name for p in g.list_identities()] == ["Ann"]


def test_photos_given_at_start_are_indexed_with_a_progress_bar(tmp_path, capsys):
    portraits = Path(__file__).parent / "data" / "portraits"
    demo, state = start(tmp_path, "--tiny", "--photos", str(portraits))
    try:
        err = capsys.readouterr().err
        assert "indexing: 100%" in err and "4/4" in err  # tqdm's bar on stderr
        assert "indexed 4 photos (4 faces), skipped 0, failed 0" in err
        assert len(state.workbench.photos) == 4
    finally:
        state.close()
