"""The on-disk index follows the SQLite gallery: adds, deletes and template changes (also by other
connections and while it was closed), restart without a rebuild, and rebuilds from the gallery,
losing nothing, when the index is missing, foreign or damaged."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from lvface_mm.gallery import Gallery
from lvface_mm.gallery.disk_index import DiskIndexConfig, IndexFileError
from lvface_mm.gallery.disk_sync import GalleryIndex, IndexRebuiltWarning, read_parquet_vectors

pytest.importorskip("faiss", reason="faiss-cpu is part of the [demo] extra")

DIM = 64
CONFIG = DiskIndexConfig(flat_below=100, pq_m=16, rerank=32, purge_every=4)  # pq from 100 identities on


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def gallery(tmp_path):
    g = Gallery(tmp_path / "people.db", feature_dim=DIM, index="exact")
    rng = np.random.default_rng(0)
    for n, x in enumerate(unit(rng, 300)):
        g.enrol(f"person {n}", x)
    yield g
    g.close()


def assert_same_as_gallery(index: GalleryIndex, g: Gallery, queries: np.ndarray) -> None:
    ours = index.search(queries, 3)
    theirs = g.search(queries, 3)
    # Top-1 as the exact gallery search; lower ranks are near-tied impostors that PQ may order differently.
    assert [row[0].identity_id for row in ours] == [row[0].identity_id for row in theirs]
    assert all(len(row) == 3 for row in ours)
    assert [row[0].name for row in ours] == [row[0].name for row in theirs]
    np.testing.assert_allclose([row[0].score for row in ours], [row[0].score for row in theirs], atol=2e-3)


def test_follows_adds_deletes_and_template_changes(tmp_path, gallery):
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first build of a gallery's index is expected: no warning
        index = GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG)
    assert index.last_sync.rebuilt and index.last_sync.added == 300 and index.index.stage == "pq"
    queries = np.stack([gallery.template(f"person {n}") for n in range(0, 300, 10)]) + 0.05 * unit(rng, 30)
    assert_same_as_gallery(index, gallery, queries)
    # Changes through the Gallery (another connection) show up at the next search.
    gallery.delete("person 0")
    gallery.delete("person 10")
    newcomer = unit(rng, 1)[0]
    new_id = gallery.enrol("newcomer", newcomer)
    gallery.enrol("person 20", unit(rng, 1), replace=True)  # template replaced: the old one must not answer
    hits = index.search(np.concatenate([newcomer[None], queries]), 3)
    assert hits[0][0].identity_id == new_id and hits[0][0].name == "newcomer"
    assert index.last_sync.removed == 2 and index.last_sync.added == 2 and not index.last_sync.rebuilt
    assert_same_as_gallery(index, gallery, queries)
    gallery.rename("person 30", "Thirty")
    assert index.search(queries[3], 1)[0][0].name == "Thirty"
    gallery.save_threshold(0.5)
    assert index.threshold == 0.5
    answers = index.identify(np.stack([queries[3], unit(rng, 1)[0]]))
    assert answers[0].name == "Thirty" and answers[1].name is None and answers[1].score < 0.5
    score = index.search(queries[3], 1)[0][0].score
    assert [a.name for a in index.identify(queries[3:4], threshold=score + 0.01)] == [None]
    assert [a.name for a in index.identify(queries[3:4], threshold=score - 0.01)] == ["Thirty"]
    with pytest.raises(ValueError, match=r"shaped \(N, 64\), got \(1, 8\)"):
        index.search(np.ones((1, 8)), 1)
    index.close()


def test_restart_catches_up_without_a_rebuild(tmp_path, gallery):
    rng = np.random.default_rng(2)
    queries = np.stack([gallery.template(f"person {n}") for n in range(0, 300, 7)])
    GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG).close()
    reopened = GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG)
    assert not reopened.last_sync.rebuilt and reopened.last_sync.added == reopened.last_sync.removed == 0
    assert reopened.index.encoded_at_open == 0  # nothing re-encoded: the codes came from disk
    assert_same_as_gallery(reopened, gallery, queries)
    reopened.close()
    # Changes made while the index was closed are exactly what the next open applies.
    gallery.delete("person 7")
    for n in range(5):
        gallery.enrol(f"late {n}", unit(rng, 1))
    gallery.enrol("person 14", unit(rng, 1), replace=True)
    again = GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG)
    assert (again.last_sync.added, again.last_sync.removed, again.last_sync.rebuilt) == (6, 1, False)
    assert len(again.index) == len(gallery) == 304
    assert_same_as_gallery(again, gallery, np.concatenate([queries, unit(rng, 5)]))
    again.close()


def test_damaged_index_is_moved_aside_and_rebuilt_losing_nothing(tmp_path, gallery):
    queries = np.stack([gallery.template(f"person {n}") for n in range(0, 300, 7)])
    GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG).close()
    (tmp_path / "people.idx" / "manifest.json").write_text("{ not json")
    with pytest.warns(IndexRebuiltWarning, match=r"people.idx/manifest.json: unreadable .* moved to .*broken"):
        index = GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG)
    assert index.last_sync.rebuilt and len(index.index) == len(gallery) == 300
    assert len(list(tmp_path.glob("people.idx.broken-*"))) == 1  # kept for inspection, not deleted
    assert_same_as_gallery(index, gallery, queries)
    index.close()
    (tmp_path / "people.idx" / "manifest.json").write_text("[]")  # damaged again within the same second
    with pytest.warns(IndexRebuiltWarning, match="format 'list'"):
        GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG).close()
    assert len(list(tmp_path.glob("people.idx.broken-*"))) == 2
    shutil.rmtree(tmp_path / "people.idx")  # an index this gallery had before is gone: say so
    with pytest.warns(IndexRebuiltWarning, match=r"people.idx: no index here"):
        GalleryIndex(tmp_path / "people.idx", tmp_path / "people.db", CONFIG).close()


def test_index_of_another_gallery_is_not_trusted(tmp_path, gallery):
    other = Gallery(tmp_path / "other.db", feature_dim=DIM, index="exact")
    other.enrol("stranger", unit(np.random.default_rng(3), 1))
    GalleryIndex(tmp_path / "shared.idx", tmp_path / "other.db", CONFIG).close()
    with pytest.warns(IndexRebuiltWarning, match=r"shared.idx/manifest.json: index of another gallery"):
        index = GalleryIndex(tmp_path / "shared.idx", tmp_path / "people.db", CONFIG)
    assert len(index.index) == 300 and "stranger" not in {c.name for c in index.search(other.template(1), 5)[0]}
    index.close()
    other.close()


def test_folder_that_is_not_an_index_is_left_alone(tmp_path, gallery):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("mine")
    with pytest.raises(IndexFileError, match=r"photos/manifest.json: missing.*nothing was written there"):
        GalleryIndex(tmp_path / "photos", tmp_path / "people.db", CONFIG)
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="nope.db"):
        GalleryIndex(tmp_path / "x.idx", tmp_path / "nope.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="junk.db: not a readable gallery"):
        GalleryIndex(tmp_path / "x.idx", tmp_path / "junk.db")


def test_parquet_shards_build_an_index(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(4)
    faces = unit(rng, 5)
    table = pa.table({"path": ["a.jpg", "b.jpg", "c.jpg"],
                      "face_embeddings": [[faces[0].tolist(), faces[1].tolist()], None, [faces[2].tolist()]]})
    pq.write_table(table, tmp_path / "shard-0.parquet")
    pq.write_table(pa.table({"face_embeddings": [[faces[3].tolist(), faces[4].tolist()]]}),
                   tmp_path / "shard-1.parquet")
    batches = list(read_parquet_vectors(sorted(tmp_path.glob("shard-*.parquet")), faces_per_row=8))
    ids = np.concatenate([b[0] for b in batches])
    assert ids.tolist() == [0, 1, 16, 24, 25]  # row r, face j -> r * 8 + j; row 1 (no faces) skipped
    np.testing.assert_allclose(np.concatenate([b[1] for b in batches]), faces, atol=1e-6)
    with pytest.raises(ValueError, match=r"shard-0.parquet: no column 'clip'; columns are \['path', 'face_emb"):
        list(read_parquet_vectors([tmp_path / "shard-0.parquet"], column="clip"))


def test_parquet_id_column_and_raw_float32_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    faces = unit(np.random.default_rng(6), 3)
    pq.write_table(pa.table({"face_id": [70, 71, 72], "emb": [f.astype("<f4").tobytes() for f in faces]}),
                   tmp_path / "s.parquet")
    (ids, vectors), = read_parquet_vectors([tmp_path / "s.parquet"], column="emb", id_column="face_id")
    assert ids.tolist() == [70, 71, 72]
    np.testing.assert_array_equal(vectors, faces)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        list(read_parquet_vectors([tmp_path / "bad.parquet"]))
