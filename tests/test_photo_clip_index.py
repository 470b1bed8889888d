"""CLIP text search on the on-disk index `<db>.clip.idx/` (``PhotoClipIndex``): the same photos and
scores as the in-memory path, photos added or deleted later found / not found without a rebuild, a
damaged index rebuilt with a warning naming the file, and no CLIP index for a faces-only collection.
Generated CLIP embeddings scored against a tiny random CLIP's text embedding (no weights)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.gallery.disk_sync import IndexRebuiltWarning, PhotoClipIndex
from lvface_mm.gallery.photos import IndexReport, PhotoIndex
from lvface_mm.gallery.shards import PhotoRecord
from tests._faces_fixtures import needs_dlib, portrait_path
from tests.test_search_disk_index import creations, unit  # the face index's tests: same helpers

TEXT = "a dog on a beach"
FACE_DIM = 512


def at_cosine(rng: np.random.Generator, target: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine ``cos`` to the unit vector ``target``."""
    noise = unit(rng.standard_normal(len(target)))
    noise = unit(noise - (noise @ target) * target)
    return unit(cos * target + np.sqrt(1 - cos**2) * noise)


def record(rng: np.random.Generator, name: str, clip: np.ndarray | None, faces: int = 0) -> PhotoRecord:
    return PhotoRecord(name, f"{name}-{rng.integers(1 << 62)}", "indexed", width=100, height=100,
                       boxes=np.tile(np.array([10, 10, 60, 60], np.float32), (faces, 1)),
                       scores=np.full(faces, 0.9, np.float32), landmarks=np.zeros((faces, 5, 2), np.float32),
                       embeddings=unit(rng.standard_normal((faces, FACE_DIM))) if faces else np.zeros((0, 0)),
                       clip=clip)


@pytest.fixture(scope="module")
def clip():
    pytest.importorskip("open_clip")
    from lvface_mm.gallery.clip import ClipEncoder

    return ClipEncoder.tiny(seed=0)


@pytest.fixture
def library(tmp_path: Path, clip) -> tuple[Path, np.ndarray]:
    """lib.db: 40 photos whose CLIP embeddings sit at distinct cosines (0.03 apart) to TEXT, some with a
    face, plus 3 faces-only photos (no CLIP). Returns (db, the text embedding)."""
    rng = np.random.default_rng(0)
    text = clip.encode_text([TEXT])[0]
    cosines = rng.permutation(np.linspace(0.85, -0.32, 40))
    records = [record(rng, f"p{n:02d}.jpg", at_cosine(rng, text, c), faces=n % 3) for n, c in enumerate(cosines)]
    records += [record(rng, f"faces{n}.jpg", None, faces=1) for n in range(3)]
    db = tmp_path / "lib.db"
    with PhotoIndex(db, clip_key=clip.key) as index:
        index.merge_records(records, "shard-0", IndexReport())
    return db, text


def text_search(db: Path, clip, disk: bool | None = None, k: int = 10) -> list[tuple[str, float]]:
    with PhotoIndex(db, clip=clip, disk_index=disk) as index:
        return [(h.path, h.score) for h in index.search_by_text(TEXT, k)]


def assert_same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    assert [p for p, _ in a] == [p for p, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=2e-3)  # float16 on disk


def test_text_search_on_disk_equals_the_in_memory_path(tmp_path, library, clip):
    db, text = library
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndexRebuiltWarning)  # the first build is expected: no warning
        hits = text_search(db, clip)
    assert (tmp_path / "lib.db.clip.idx" / "manifest.json").is_file()
    assert not (tmp_path / "lib.db.faces.idx").exists()  # text search does not build the face index
    memory = text_search(db, clip, disk=False)
    assert_same(hits, memory)
    # The ranking is the generated one: cosines to the text embedding, best first.
    np.testing.assert_allclose([s for _, s in hits], np.linspace(0.85, -0.32, 40)[:10], atol=2e-3)
    # k beyond the collection: every photo with CLIP once, none of the faces-only ones.
    everything = text_search(db, clip, k=100)
    assert len(everything) == 40 and not any(p.startswith("faces") for p, _ in everything)
    assert_same(everything, text_search(db, clip, disk=False, k=100))
    # Past the face index's flat_below too: text search stays exact (the in-memory path is exact).
    assert PhotoClipIndex.default_config().stage_for(500_000, 512) == "flat"
    with PhotoClipIndex(tmp_path / "lib.db.clip.idx", db) as index:  # reopened: nothing to do
        report = index.last_sync
        assert (report.added, report.removed, report.rebuilt, len(index)) == (0, 0, False, 40)


def test_photos_added_and_deleted_later_are_caught_up_without_a_rebuild(tmp_path, library, clip, monkeypatch):
    db, text = library
    before = text_search(db, clip)
    manifest = json.loads((tmp_path / "lib.db.clip.idx" / "manifest.json").read_text())
    made = creations(monkeypatch)
    rng = np.random.default_rng(1)
    with PhotoIndex(db, clip_key=clip.key) as index:  # the two best photos deleted, three indexed
        index.remove(before[0][0])
        index.remove(before[1][0])
        index.merge_records([record(rng, "new-best.jpg", at_cosine(rng, text, 0.97)),
                             record(rng, "new-third.jpg", at_cosine(rng, text, 0.775), faces=1),
                             record(rng, "new-worst.jpg", at_cosine(rng, text, -0.9))], "shard-1", IndexReport())
    after = text_search(db, clip)
    paths = [p for p, _ in after]
    assert paths[0] == "new-best.jpg" and paths[2] == "new-third.jpg"
    assert before[0][0] not in paths and before[1][0] not in paths
    assert paths == ["new-best.jpg", before[2][0], "new-third.jpg", *[p for p, _ in before[3:10]]][:10]
    assert_same(after, text_search(db, clip, disk=False))
    assert made == []  # caught up incrementally
    now = json.loads((tmp_path / "lib.db.clip.idx" / "manifest.json").read_text())
    assert now["source"]["gallery_uid"] == manifest["source"]["gallery_uid"]
    assert now["source"]["watermark"] > manifest["source"]["watermark"]

    # Another change seen by a PhotoClipIndex opened directly: its open reports exactly the catch-up.
    with PhotoIndex(db, clip_key=clip.key) as index:
        index.remove("new-worst.jpg")
        index.merge_records([record(rng, "later.jpg", at_cosine(rng, text, 0.5))], "shard-2", IndexReport())
    with PhotoClipIndex(tmp_path / "lib.db.clip.idx", db) as index:
        report = index.last_sync
        assert (report.added, report.removed, report.rebuilt) == (1, 1, False) and len(index) == 41
    assert made == []


def test_damaged_clip_index_warns_naming_the_file_and_is_rebuilt(tmp_path, library, clip):
    db, _ = library
    hits = text_search(db, clip)
    ids = next((tmp_path / "lib.db.clip.idx").glob("ids.*"))
    ids.write_bytes(ids.read_bytes()[:-8])  # cut short
    with pytest.warns(IndexRebuiltWarning) as caught:
        again = text_search(db, clip)
    message = str(caught[0].message)
    assert f"lib.db.clip.idx/{ids.name}" in message and "truncated" in message and "rebuilding" in message
    assert_same(again, hits)
    aside = list(tmp_path.glob("lib.db.clip.idx.broken-*"))
    assert len(aside) == 1 and (aside[0] / ids.name).is_file()  # kept for inspection, not overwritten
    # A foreign index (another collection's) in the folder: also rebuilt, with a warning naming its manifest.
    other = tmp_path / "other.db"
    shutil.copyfile(db, other)
    with sqlite3.connect(other) as c:  # the copy gets its own uid at its first open
        c.execute("DELETE FROM photo_meta WHERE key = 'clip_index_uid'")
    shutil.copytree(tmp_path / "lib.db.clip.idx", tmp_path / "other.db.clip.idx")
    with pytest.warns(IndexRebuiltWarning, match=r"other\.db\.clip\.idx/manifest\.json: index of another"):
        assert_same(text_search(other, clip), hits)


def test_faces_only_collection_makes_no_clip_index(tmp_path, clip):
    rng = np.random.default_rng(2)
    db = tmp_path / "faces.db"
    with PhotoIndex(db, face_model="lvface_tiny") as index:
        index.merge_records([record(rng, f"f{n}.jpg", None, faces=2) for n in range(5)], "shard-0", IndexReport())
        assert index.sync_clip_index() is None
        assert index.sync_face_index().added == 10
    with PhotoIndex(db, clip=clip) as index:
        assert index.search_by_text(TEXT) == []
    assert (tmp_path / "faces.db.faces.idx").is_dir() and not (tmp_path / "faces.db.clip.idx").exists()
    assert not list(tmp_path.glob("faces.db.clip.idx*"))  # nor its lock file


def test_another_holder_of_the_clip_index_falls_back_to_memory(tmp_path, library, clip, caplog):
    db, _ = library
    # The first object holds the folder's lock; the PhotoIndex searches in memory instead of waiting.
    with PhotoClipIndex(tmp_path / "lib.db.clip.idx", db), PhotoIndex(db, clip=clip) as index:
        hits = [(h.path, h.score) for h in index.search_by_text(TEXT, 10)]
        assert index.clip_index_path is None and "in use" in caplog.text
    assert_same(hits, text_search(db, clip))


def test_folder_given_as_a_path_keeps_the_clip_index_beside_it(tmp_path, library, clip):
    db, _ = library
    folder = tmp_path / "idx" / "faces"
    folder.parent.mkdir()
    with PhotoIndex(db, clip=clip, disk_index=folder) as index:
        assert index.clip_index_path == tmp_path / "idx" / "faces.clip"
        assert len(index.search_by_text(TEXT, 5)) == 5
    assert (tmp_path / "idx" / "faces.clip" / "manifest.json").is_file()


@needs_dlib()
def test_index_job_builds_the_clip_index_when_there_is_clip(tmp_path):
    from lvface_mm.gallery.index_job import run_index_job
    from lvface_mm.gallery.indexing import EncoderSpec, IndexJobConfig

    pytest.importorskip("open_clip")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("obama", "biden"):
        shutil.copyfile(portrait_path(name), folder / f"{name}.jpg")
    config = IndexJobConfig(db=str(tmp_path / "job.db"), shard_dir=str(tmp_path / "job.shards"))
    spec = EncoderSpec(tiny_seed=0, backend="torch", tiny_clip_seed=0)
    assert run_index_job([folder], config, spec, engine="inline").indexed == 2
    with PhotoClipIndex(config.db + ".clip.idx", config.db) as index:  # built by the job, not the first search
        assert not index.last_sync.rebuilt and (index.last_sync.added, len(index)) == (0, 2)
