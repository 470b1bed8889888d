"""Photo-collection index: faces + CLIP per photo, resumable by content hash, and the four query kinds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.gallery import Gallery
from lvface_mm.gallery.photos import IndexReport, PhotoIndex, find_images, split_query
from tests._faces_fixtures import composite, needs_dlib, portrait_path, shared_dlib

pytestmark = needs_dlib()


@pytest.fixture(scope="module")
def parts():
    """Tiny random face encoder on the real dlib detector (cached per picture) and a tiny random CLIP."""
    pytest.importorskip("open_clip")
    from lvface_mm.faces import FaceEmbedder
    from lvface_mm.gallery.clip import ClipEncoder

    return FaceEmbedder.from_tiny(seed=0, detector=shared_dlib()), ClipEncoder.tiny(seed=0)


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """Four portraits, one exact duplicate under another name, a two-person picture, two broken
    files and a text file (ignored: not an image extension)."""
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for name in ("obama", "obama2", "biden"):
        shutil.copyfile(portrait_path(name), folder / f"{name}.jpg")
    shutil.copyfile(portrait_path("obama3"), folder / "trip" / "obama3.jpg")
    shutil.copyfile(portrait_path("obama"), folder / "trip" / "obama_copy.jpg")
    Image.fromarray(composite(("biden", "obama2"), height=300)).save(folder / "trip" / "pair.png")
    (folder / "broken.jpg").write_bytes(portrait_path("biden").read_bytes()[:2000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def new_index(path: Path, parts, **kwargs) -> PhotoIndex:
    embedder, clip = parts
    return PhotoIndex(path, embedder=embedder, clip=clip, face_model="lvface_tiny", **kwargs)


def test_index_reports_bad_files_and_skips_known_content(tmp_path, parts, collection):
    assert len(find_images([collection])) == 8  # notes.txt is not an image file
    index = new_index(tmp_path / "lib.db", parts)
    seen = []
    report = index.add([collection], progress=seen.append)
    assert report.indexed == 5 and report.skipped == 1  # obama_copy.jpg has obama.jpg's bytes
    assert sorted(Path(p).name for p, _ in report.failed) == ["broken.jpg", "empty.png"]
    assert all("broken.jpg" not in why for _, why in report.failed)  # reasons, not just names
    assert any("truncated" in why for _, why in report.failed)
    assert [p.done for p in seen] == list(range(1, 9)) and {p.status for p in seen} == {"indexed", "skipped", "failed"}
    assert len(index) == 5 and index.num_faces == report.faces == 6  # the pair picture holds two faces
    assert sorted(Path(p).name for p, _ in index.failures()) == ["broken.jpg", "empty.png"]
    again = index.add([collection])
    assert (again.indexed, again.skipped, again.failed) == (0, 6, [])  # failures are not retried by default,
    assert sorted(Path(p).name for p, _ in again.failed_before) == ["broken.jpg", "empty.png"]  # nor counted as done
    retried = index.add([collection], retry_failed=True)
    assert retried.indexed == 0 and len(retried.failed) == 2


def test_two_faces_are_stored_in_original_pixels(tmp_path, parts, collection):
    index = new_index(tmp_path / "lib.db", parts)
    index.add([collection / "trip" / "pair.png"])
    hits = index.search_by_face(portrait_path("biden"), k=1)
    boxes = sorted(f.box for f in hits[0].faces)
    assert len(boxes) == 2
    width = composite(("biden", "obama2"), height=300).shape[1]
    assert boxes[0][2] < width / 2 < boxes[1][0]  # one face per half, in the composite's coordinates


def test_face_query_ranks_the_planted_photo_first(tmp_path, parts, collection):
    index = new_index(tmp_path / "lib.db", parts)
    index.add([collection])
    hits = index.search_by_face(collection / "obama2.jpg", k=3)
    assert Path(hits[0].path).name == "obama2.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score >= hits[2].score
    matched = [f for f in hits[0].faces if f.similarity is not None]
    assert len(matched) == 1 and matched[0].similarity == pytest.approx(1.0, abs=1e-4)


def test_name_text_and_combined_queries(tmp_path, parts, collection):
    embedder, clip = parts
    db = tmp_path / "lib.db"
    index = new_index(db, parts)
    index.add([collection])
    gallery = Gallery(db, model_name="lvface_tiny", threshold=0.9)
    gallery.enrol("Joe", embedder.embed_image(portrait_path("biden")).main_face().embedding)
    # by name: the photos whose face passes the threshold (random weights: the same picture)
    by_name = index.search_by_name("joe", gallery)
    joe_photos = {Path(h.path).name for h in by_name}
    assert "biden.jpg" in joe_photos and "obama.jpg" not in joe_photos
    assert any(f.name == "Joe" for f in by_name[0].faces)
    # combined: the same photos, ordered by CLIP similarity to the rest of the query
    combined = index.search("Joe at the beach", gallery)
    assert {Path(h.path).name for h in combined} == joe_photos
    text = clip.encode_text(["at the beach"])[0]
    from lvface_mm.faces.image_io import load_image

    expected = sorted(by_name, key=lambda h: -float(clip.encode_images([load_image(h.path).array])[0] @ text))
    assert [h.path for h in combined] == [h.path for h in expected]
    assert combined[0].score == pytest.approx(
        float(clip.encode_images([load_image(combined[0].path).array])[0] @ text), abs=1e-4)
    # text only: every photo, ranked by CLIP, best first
    by_text = index.search("a man in a suit", gallery, k=10)
    assert len(by_text) == 5 and all(a.score >= b.score for a, b in zip(by_text, by_text[1:]))
    # words that are not enrolled names only rank (CLIP); they never filter
    assert {h.path for h in index.search("Joe and Nobody", gallery)} == {h.path for h in index.search("Joe", gallery)}
    with pytest.raises(ValueError, match="empty"):
        index.search("  ", gallery)


def test_stop_midway_and_resume(tmp_path, parts, collection):
    index = new_index(tmp_path / "lib.db", parts)
    progress: list = []
    report = index.add([collection], batch_size=1, progress=progress.append,
                       should_stop=lambda: len([p for p in progress if p.status == "indexed"]) >= 2)
    assert report.stopped and report.indexed == 2 and len(index) == 2
    first_ids = {h.photo_id for h in index.search("x", None, k=10)}
    resumed = index.add([collection], batch_size=1)
    # skipped: the 2 indexed before and the duplicate; the 2 broken files recorded before the stop are listed again
    assert resumed.indexed == 3 and resumed.skipped == 3 and resumed.failed == [] and len(resumed.failed_before) == 2
    assert len(index) == 5 and first_ids <= {h.photo_id for h in index.search("x", None, k=10)}


def test_refuses_other_encoders_and_moved_files_are_followed(tmp_path, parts, collection):
    embedder, clip = parts
    db = tmp_path / "lib.db"
    new_index(db, parts).add([collection / "biden.jpg"])
    with pytest.raises(ValueError, match="lvface_tiny"):
        PhotoIndex(db, embedder=embedder, clip=clip, face_model="lvface_b")
    from lvface_mm.gallery.clip import ClipEncoder

    with pytest.raises(ValueError, match="CLIP"):
        PhotoIndex(db, clip=ClipEncoder.tiny(seed=1))
    moved = tmp_path / "moved.jpg"
    (collection / "biden.jpg").rename(moved)
    index = new_index(db, parts)
    assert index.add([moved]).skipped == 1
    assert index.search_by_face(moved, k=1)[0].path == str(moved)


def test_split_query():
    names = ["Ann", "Ann Lee", "Bob"]
    assert split_query("Ann Lee and Bob at the beach", names) == (["Ann Lee", "Bob"], "at the beach")
    assert split_query("bob, ann", names) == (["Bob", "Ann"], "")
    assert split_query("Annie at home", names) == ([], "Annie at home")  # whole words only
    assert split_query("sunset", names) == ([], "sunset")


def test_vectors_are_unit_length(tmp_path, parts, collection):
    index = new_index(tmp_path / "lib.db", parts)
    index.add([collection / "obama.jpg"])
    rows = index._conn.execute("SELECT clip FROM photos").fetchall() + \
        index._conn.execute("SELECT embedding FROM photo_faces").fetchall()
    norms = [np.linalg.norm(np.frombuffer(r[0], "<f4")) for r in rows]
    assert np.allclose(norms, 1.0, atol=1e-4)


def test_concurrent_runs_and_missing_paths(tmp_path, parts, collection):
    """Issue 14: a second run on the same collection no longer dies on the UNIQUE content hash, a rerun
    never counts broken files as indexed, and a missing path is listed while the rest is indexed."""
    db = tmp_path / "lib.db"
    first, second = new_index(db, parts), new_index(db, parts)
    # Both runs triage obama.jpg as new before either commits it (what two processes do at once).
    todo = second._triage(collection / "obama.jpg", retry_failed=False)
    assert todo[0] == "todo"
    assert first.add([collection / "obama.jpg"]).indexed == 1
    report = IndexReport()
    second._index_batch([(collection / "obama.jpg", todo[1], todo[2])], report, lambda path, status: None)
    assert (report.indexed, report.skipped, report.failed) == (0, 1, [])
    assert len(second) == 1
    mixed = second.add([collection / "biden.jpg", tmp_path / "typo.jpg", collection / "broken.jpg"])
    assert mixed.indexed == 1 and len(second) == 2
    assert sorted(Path(p).name for p, _ in mixed.failed) == ["broken.jpg", "typo.jpg"]
    assert any("no such file" in why for _, why in mixed.failed)
