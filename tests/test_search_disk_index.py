"""`lvface-mm search` and `Gallery` on the on-disk indexes kept beside the database: the first search
builds `<db>.faces.idx/` and `<db>.people.idx/`, later runs open them without a rebuild and see what
was enrolled, deleted or indexed in between, a damaged index is rebuilt with a one-line warning, and
the answers equal the in-memory path's (`--no-disk-index`) on the same data."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.cli import main
from lvface_mm.gallery import Gallery
from lvface_mm.gallery.disk_index import DiskIndex
from lvface_mm.gallery.disk_sync import PhotoFaceIndex
from lvface_mm.gallery.photos import IndexReport, PhotoIndex
from lvface_mm.gallery.shards import PhotoRecord

DIM = 512
MODEL = "lvface_tiny"  # what --tiny names; the database records it


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def face_of(rng: np.random.Generator, person: np.ndarray, cos: float) -> np.ndarray:
    """Another photo of ``person``: a unit vector at cosine ``cos`` to the template."""
    noise = unit(rng.standard_normal(DIM))
    noise = unit(noise - (noise @ person) * person)
    return unit(cos * person + np.sqrt(1 - cos**2) * noise)


def photo(rng: np.random.Generator, name: str, faces: list[np.ndarray]) -> PhotoRecord:
    n = len(faces)
    return PhotoRecord(name, f"{name}-{rng.integers(1 << 62)}", "indexed", width=100, height=100,
                       boxes=np.tile(np.array([10, 10, 60, 60], np.float32), (n, 1)),
                       scores=np.full(n, 0.9, np.float32), landmarks=np.zeros((n, 5, 2), np.float32),
                       embeddings=np.stack(faces))


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """lib.db: 60 photos of 1-3 faces (people 0-5 and strangers) and a gallery of Alice (person 0)
    and Bob (person 1), threshold 0.6. Returns (db, people templates)."""
    rng = np.random.default_rng(0)
    people = unit(rng.standard_normal((6, DIM)))
    records = []
    for n in range(60):
        who = rng.choice(8, size=rng.integers(1, 4), replace=False)  # 6, 7: strangers
        records.append(photo(rng, f"p{n:02d}.jpg", [face_of(rng, people[w], rng.uniform(0.65, 0.95)) if w < 6 else
                                                    unit(rng.standard_normal(DIM)) for w in who]))
    db = tmp_path / "lib.db"
    with PhotoIndex(db, face_model=MODEL) as index:
        index.merge_records(records, "shard-0", IndexReport())
    with Gallery(db, model_name=MODEL) as gallery:
        gallery.enrol("Alice", people[0])
        gallery.enrol("Bob", people[1])
        gallery.save_threshold(0.6)
    return db, people


def search(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[dict], str]:
    code = main(["search", *args, "--tiny", "--json"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def creations(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every DiskIndex.create from now on (a rebuild creates one; an open with catch-up does not)."""
    made: list[Path] = []
    create = DiskIndex.create.__func__

    def counting(cls: type[DiskIndex], path: str | Path, *args: object, **kwargs: object) -> DiskIndex:
        made.append(Path(path))
        return create(cls, path, *args, **kwargs)

    monkeypatch.setattr(DiskIndex, "create", classmethod(counting))
    return made


def test_search_builds_the_indexes_beside_the_db_then_opens_them(tmp_path, library, capsys, monkeypatch):
    db, _ = library
    code, hits, err = search(capsys, "--name", "Alice", "--db", str(db))
    assert code == 0 and hits and "warning" not in err  # the first build is expected: no warning
    assert (tmp_path / "lib.db.faces.idx" / "manifest.json").is_file()
    assert (tmp_path / "lib.db.people.idx" / "manifest.json").is_file()
    assert all("Alice" in h["names"] for h in hits)
    # The same answers as the in-memory path built at start (float16 vectors: scores to ~1e-3).
    code, memory, _ = search(capsys, "--name", "Alice", "--db", str(db), "--no-disk-index")
    assert code == 0 and [h["path"] for h in memory] == [h["path"] for h in hits]
    np.testing.assert_allclose([h["score"] for h in memory], [h["score"] for h in hits], atol=2e-3)
    assert [h["names"] for h in memory] == [h["names"] for h in hits]
    # A second run opens both indexes: nothing is created again and nothing re-encoded.
    made = creations(monkeypatch)
    vectors = next((tmp_path / "lib.db.faces.idx").glob("vectors.*")).stat().st_ino
    assert search(capsys, "--name", "Alice", "--db", str(db))[1] == hits
    assert made == []
    assert next((tmp_path / "lib.db.faces.idx").glob("vectors.*")).stat().st_ino == vectors
    with PhotoFaceIndex(tmp_path / "lib.db.faces.idx", db) as faces, PhotoIndex(db) as index:
        assert not faces.last_sync.rebuilt and faces.last_sync.added == faces.last_sync.removed == 0
        assert len(faces) == index.num_faces


def test_changes_between_runs_are_seen_by_the_next_search(tmp_path, library, capsys, monkeypatch):
    db, people = library
    code, before, _ = search(capsys, "--name", "Alice", "--db", str(db))
    assert code == 0 and len(before) >= 2
    made = creations(monkeypatch)
    rng = np.random.default_rng(1)
    with PhotoIndex(db, face_model=MODEL) as index:  # a photo deleted, a new one indexed
        index.remove(before[0]["path"])
        index.merge_records([photo(rng, "new.jpg", [face_of(rng, people[0], 0.9), face_of(rng, people[2], 0.8)])],
                            "shard-1", IndexReport())
    with Gallery(db, model_name=MODEL) as gallery:  # Carol enrolled, Bob deleted
        gallery.enrol("Carol", people[2])
        gallery.delete("Bob")
    code, after, _ = search(capsys, "--name", "Alice", "--db", str(db))
    paths = [h["path"] for h in after]
    assert code == 0 and "new.jpg" in paths and before[0]["path"] not in paths
    assert sorted(paths) == sorted([h["path"] for h in before[1:]] + ["new.jpg"])
    assert next(h for h in after if h["path"] == "new.jpg")["names"] == ["Alice", "Carol"]
    assert not any("Bob" in h["names"] for h in after)
    code, carol, _ = search(capsys, "--name", "Carol", "--db", str(db))
    assert code == 0 and "new.jpg" in [h["path"] for h in carol]
    assert search(capsys, "--name", "Bob", "--db", str(db))[0] == 2  # not enrolled any more
    assert made == []  # all of it caught up incrementally
    # Same answers as the in-memory path on the changed data.
    code, memory, _ = search(capsys, "--name", "Alice", "--db", str(db), "--no-disk-index")
    assert [h["path"] for h in memory] == paths and [h["names"] for h in memory] == [h["names"] for h in after]


def test_damaged_index_gives_a_one_line_warning_and_correct_results(tmp_path, library, capsys):
    db, _ = library
    code, hits, _ = search(capsys, "--name", "Alice", "--db", str(db))
    (tmp_path / "lib.db.faces.idx" / "manifest.json").write_text("{ not json")
    ids = next((tmp_path / "lib.db.people.idx").glob("ids.*"))
    ids.write_bytes(ids.read_bytes()[:-8])  # cut short
    code, again, err = search(capsys, "--name", "Alice", "--db", str(db))
    assert code == 0 and again == hits
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2 and "IndexRebuiltWarning" not in err  # one line each, not Python's warning format
    assert any("lib.db.faces.idx/manifest.json: unreadable" in line and "rebuilding" in line for line in lines)
    assert any("lib.db.people.idx/ids.0.i64" in line and "truncated" in line for line in lines)
    assert len(list(tmp_path.glob("lib.db.faces.idx.broken-*"))) == 1  # kept for inspection


def test_gallery_in_a_file_searches_its_disk_index_like_the_memory_one(tmp_path, caplog):
    rng = np.random.default_rng(2)
    people = unit(rng.standard_normal((50, DIM)))
    queries = np.stack([face_of(rng, p, 0.6) for p in people[::5]] + [unit(rng.standard_normal(DIM))])
    with Gallery(tmp_path / "g.db") as g:
        for n, p in enumerate(people):
            g.enrol(f"person {n}", p)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            on_disk = g.search(queries, 3)
        assert g.disk_index_path == tmp_path / "g.db.people.idx" and g.disk_index_path.is_dir()
        with Gallery(tmp_path / "g.db", disk_index=False) as memory:
            in_memory = memory.search(queries, 3)
        # Another object holds the folder: this one searches in memory (logged), with the same answers.
        with caplog.at_level(logging.WARNING), Gallery(tmp_path / "g.db") as second:
            busy = second.search(queries, 3)
            assert second.disk_index_path is None and "in use" in caplog.text
    assert [[c.identity_id for c in row] for row in on_disk] == [[c.identity_id for c in row] for row in in_memory]
    assert [[c.identity_id for c in row] for row in busy] == [[c.identity_id for c in row] for row in in_memory]
    np.testing.assert_allclose([[c.score for c in row] for row in on_disk],
                               [[c.score for c in row] for row in in_memory], atol=2e-3)
    # Deleting a person zeroes their template in the index's file at once, as secure_delete does in SQLite.
    with Gallery(tmp_path / "g.db") as g:
        template = g.template("person 3").astype(np.float16)
        g.delete("person 3")
        raw = np.fromfile(next((tmp_path / "g.db.people.idx").glob("vectors.*")), np.float16).reshape(-1, DIM)
        assert len(raw) == 50 and not (raw == template).all(axis=1).any() and (raw == 0).all(axis=1).sum() == 1
    for off in (Gallery(":memory:"), Gallery(tmp_path / "h.db", index="exact")):  # nothing to keep / asked for
        assert off.disk_index_path is None
        off.close()
    assert not os.path.exists(tmp_path / "h.db.people.idx")
