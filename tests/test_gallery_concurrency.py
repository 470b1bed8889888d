"""Several connections and processes on one gallery file: readers never miss a committed person,
many processes may create the same new gallery at once, and files that are not galleries are refused."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from lvface_mm.gallery import Gallery


def unit(seed: int, n: int = 1, dim: int = 512) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _CommitBetween:
    """Stands in for a gallery's connection and lets another connection commit right after the
    template SELECT returned its rows, the window where an earlier version lost that commit."""

    def __init__(self, conn: sqlite3.Connection, commit: object) -> None:
        self._conn, self._commit = conn, commit

    def execute(self, sql: str, *args: object) -> object:
        cursor = self._conn.execute(sql, *args)
        if sql.startswith("SELECT id, name, template FROM identities") and self._commit is not None:
            rows = cursor.fetchall()
            commit, self._commit = self._commit, None
            commit()

            class Rows:
                def fetchall(self) -> list:
                    return rows

            return Rows()
        return cursor

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_a_commit_between_the_cache_read_and_the_version_read_is_not_missed(tmp_path):
    path = tmp_path / "g.db"
    # The in-memory cache's reload (the on-disk index has its own watermark: test_gallery_disk_sync.py).
    reader, writer = Gallery(path, disk_index=False), Gallery(path, disk_index=False)
    writer.enrol("Ann", unit(1))
    ann, bo = unit(1), unit(2)
    reader._conn = _CommitBetween(reader._conn, lambda: writer.enrol("Bo", bo))
    assert reader.identify(ann)[0].name == "Ann"  # this search reloads; Bo commits in the middle
    assert reader.identify(bo)[0].name == "Bo"  # ... and is seen by the next one, not called unknown
    assert [o.name for o in reader.identify(np.vstack([ann, bo]))] == ["Ann", "Bo"]


def _create_and_enrol(paths: list[str], who: int, barrier: object, results: object) -> None:
    from lvface_mm.gallery import Gallery

    errors = []
    for path in paths:
        barrier.wait()  # all processes start creating each new file at the same moment
        try:
            with Gallery(path, model_name="lvface_tiny") as g:
                g.enrol(f"p{who}", unit(who))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts there are none
            errors.append(f"{path}: {exc}")
    results.put(errors)


@pytest.mark.multiproc
def test_several_processes_create_one_new_gallery_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    workers, paths = 4, [str(tmp_path / f"g{i}.db") for i in range(8)]
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_create_and_enrol, args=(paths, w, barrier, results)) for w in range(workers)]
    for p in procs:
        p.start()
    errors = [e for _ in procs for e in results.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert errors == []
    for path in paths:
        with Gallery(path, create=False) as g:
            assert sorted(i.name for i in g.list_identities()) == [f"p{w}" for w in range(workers)]
            assert g.model_name == "lvface_tiny"


def test_another_applications_database_is_refused_untouched(tmp_path):
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers VALUES (1, 'Ann')")
    conn.close()
    before = other.read_bytes()
    with pytest.raises(ValueError, match=r"app\.db.*belongs to something else.*customers"):
        Gallery(other)
    assert other.read_bytes() == before  # no tables added, journal mode unchanged
    clash = tmp_path / "meta.db"
    with sqlite3.connect(clash) as conn:  # a table named like ours, but not ours
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('owner', 'someone else')")
    conn.close()
    with pytest.raises(ValueError, match="belongs to something else"):
        Gallery(clash)
    shared = tmp_path / "library.db"  # the photo index may share the file: that is fine
    with sqlite3.connect(shared) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE photo_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.close()
    Gallery(shared).enrol("Ann", unit(1))


def test_opening_without_create_never_makes_a_file(tmp_path):
    missing = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match="no gallery at .*typo.db"):
        Gallery(missing, create=False)
    assert not missing.exists()
    photos_only = tmp_path / "photos.db"
    with sqlite3.connect(photos_only) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(FileNotFoundError, match="holds no enrolled"):
        Gallery(photos_only, create=False)
    with sqlite3.connect(photos_only) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["photos"]
    conn.close()


def test_the_gallery_remembers_its_encoder(tmp_path):
    path = tmp_path / "g.db"
    with Gallery(path, model_name="lvface_tiny") as g:
        assert g.encoder is None
        g.remember_encoder({"model": "lvface_tiny", "tiny": True, "seed": 0})
        g.remember_encoder({"tiny": True, "model": "lvface_tiny", "seed": 0})  # same: fine
    with Gallery(path, create=False) as g:
        assert g.encoder == {"model": "lvface_tiny", "tiny": True, "seed": 0}
        assert g.model_name == "lvface_tiny"
        with pytest.raises(ValueError, match="not comparable"):
            g.remember_encoder({"model": "lvface_tiny", "tiny": True, "seed": 1})
