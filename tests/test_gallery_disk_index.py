"""On-disk index: exact-equal answers on identity-clustered data, restart without re-encoding,
deletes/replacements/compaction, crash leftovers, and clear errors for missing or damaged files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from lvface_mm.gallery.disk_index import DiskIndex, DiskIndexConfig, IndexFileError, list_stages

pytest.importorskip("faiss", reason="faiss-cpu is part of the [demo] extra")

DIM = 64
PQ = DiskIndexConfig(kind="pq", pq_m=16, rerank=32, purge_every=8)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def genuine(rng: np.random.Generator, templates: np.ndarray, cos: float = 0.6) -> np.ndarray:
    """Another photo of each person: at cosine ``cos`` to its template, in a random orthogonal direction."""
    noise = unit(rng, len(templates))
    noise -= (noise * templates).sum(1, keepdims=True) * templates
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return cos * templates + np.sqrt(1 - cos**2) * noise


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    templates = unit(rng, 3000)
    return np.arange(1000, 4000, dtype=np.int64), templates, genuine(rng, templates[:200])


def exact_top(ids: np.ndarray, templates: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ templates.T
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def test_config_validates(tmp_path):
    assert {"flat", "pq"} <= set(list_stages())
    with pytest.raises(ValueError, match="kind='ivf9'"):
        DiskIndexConfig(kind="ivf9")
    with pytest.raises(ValueError, match="rerank"):
        DiskIndexConfig(rerank=0)
    with pytest.raises(ValueError, match="pq_m=10 must divide the dimension 64"):
        DiskIndex.create(tmp_path / "idx", DIM, DiskIndexConfig(kind="pq", pq_m=10))
    assert not (tmp_path / "idx").exists()
    # `auto` (what Gallery and PhotoIndex use) stays exact for a dimension pq_m does not divide.
    x = np.random.default_rng(0).standard_normal((300, 100)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    odd = DiskIndex.build(tmp_path / "odd", 100, [(np.arange(300), x)], DiskIndexConfig(flat_below=100, pq_m=16))
    assert odd.stage == "flat" and (odd.search(x[:20], 1)[1][:, 0] == np.arange(20)).all()


@pytest.mark.parametrize("config", [DiskIndexConfig(kind="flat"), PQ, DiskIndexConfig(flat_below=1000, pq_m=16)],
                         ids=["flat", "pq", "auto"])
def test_answers_equal_exact_search_on_clustered_data(tmp_path, data, config):
    ids, templates, queries = data
    index = DiskIndex.build(tmp_path / "idx", DIM, [(ids[:1200], templates[:1200]), (ids[1200:], templates[1200:])],
                            config)
    assert index.stage == ("flat" if config.kind == "flat" else "pq") and len(index) == 3000
    scores, found = index.search(queries, 5)
    truth_s, truth_i = exact_top(ids, templates, queries, 5)
    assert (found[:, 0] == truth_i[:, 0]).all()  # recall@1 against exact search = 1.0
    assert (found[:, 0] == ids[:200]).all()  # and each genuine query finds its own person
    np.testing.assert_allclose(scores[:, 0], truth_s[:, 0], atol=2e-3)  # float16 vectors: true cosines
    assert (np.diff(scores, axis=1) <= 0).all()


def test_restart_memory_maps_without_re_encoding_and_answers_the_same(tmp_path, data):
    ids, templates, queries = data
    index = DiskIndex.build(tmp_path / "idx", DIM, [(ids, templates)], PQ)
    before = index.search(queries, 3)
    index.close()
    reopened = DiskIndex.open(tmp_path / "idx")
    assert reopened.encoded_at_open == 0 and reopened.stage == "pq"
    assert isinstance(reopened._vectors.base, np.memmap)  # a view of the file, not a copy in memory
    after = reopened.search(queries, 3)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    # Rows added after the last save (no close: a crash) are the only ones encoded at the next open.
    rng = np.random.default_rng(5)
    extra = unit(rng, 7)
    reopened.add(np.arange(9000, 9007), extra)
    again = DiskIndex.open(tmp_path / "idx")
    assert again.encoded_at_open == 7 and len(again) == 3007
    assert again.search(extra, 1)[1][:, 0].tolist() == list(range(9000, 9007))


def test_deletes_replacements_and_compaction(tmp_path, data):
    ids, templates, queries = data
    index = DiskIndex.build(tmp_path / "idx", DIM, [(ids, templates)], PQ)
    index.remove(ids[:100])  # the first 100 queries' own people (more than purge_every)
    assert len(index) == 2900 and index.remove(ids[:5]) == 0
    raw = np.fromfile(tmp_path / "idx" / "vectors.0.f16", np.float16).reshape(-1, DIM)
    assert not raw[:100].any() and raw[100:].any(axis=1).all()  # a deleted face is not left readable
    _, found = index.search(queries, 5)
    assert not np.isin(found, ids[:100]).any()
    truth_s, truth_i = exact_top(ids[100:], templates[100:], queries, 1)
    assert (found[100:, 0] == ids[100:200]).all()  # genuine queries whose person is still enrolled
    # Queries whose person was deleted now only have impostors (near-ties at cosine ~0.3): the PQ
    # stage does not promise the exact order among those, but it must return live, real scores.
    assert (found[:100, 0] == truth_i[:100, 0]).mean() >= 0.5
    # Replace a vector: the id answers with its new vector, once. (This add comes after purges of the
    # PQ codes; with fast-scan's own remove_ids, FAISS 1.15 never found vectors added after one.)
    index.add(ids[150:151], queries[:1])
    s, i = index.search(queries[:1], 2)
    assert i[0, 0] == ids[150] and s[0, 0] == pytest.approx(1.0, abs=2e-3) and i[0, 1] != ids[150]
    assert index.add(ids[150:151], queries[:1]) == 0  # unchanged vector: nothing written
    # Past a quarter dead the files are rewritten; the old generation's files are gone.
    index.remove(ids[200:1000])
    assert index._rows == len(index) == 2100
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert names == ["coarse.1.codes.faiss", "coarse.1.fast.faiss", "coarse.1.rows.npy", "ids.1.i64", "manifest.json",
                     "vectors.1.f16"]
    kept = np.setdiff1d(ids, np.concatenate([ids[:100], ids[200:1000], ids[150:151]]))
    _, found = index.search(templates[np.isin(ids, kept)][:300], 1)
    assert (found[:, 0] == kept[:300]).all()
    index.close()
    assert sorted(DiskIndex.open(tmp_path / "idx").ids().tolist()) == sorted(kept.tolist() + [int(ids[150])])


def test_crash_after_append_before_manifest_is_cut_off(tmp_path, data):
    ids, templates, queries = data
    index = DiskIndex.build(tmp_path / "idx", DIM, [(ids, templates)], PQ)
    expected = index.search(queries, 3)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    with open(tmp_path / "idx" / manifest["files"]["vectors"], "ab") as f:
        f.write(b"\x01" * (2 * DIM * 3 + 5))  # a torn append of 3.x rows the manifest never counted
    reopened = DiskIndex.open(tmp_path / "idx")
    assert len(reopened) == 3000
    np.testing.assert_array_equal(reopened.search(queries, 3)[1], expected[1])


def test_missing_foreign_and_damaged_files_are_named(tmp_path, data, caplog):
    ids, templates, queries = data
    with pytest.raises(IndexFileError, match="does not exist"):
        DiskIndex.open(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "someone-else"}')
    with pytest.raises(IndexFileError, match=r"other/manifest.json: format 'someone-else'"):
        DiskIndex.open(tmp_path / "other")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        DiskIndex.create(tmp_path / "other", DIM)
    index = DiskIndex.build(tmp_path / "idx", DIM, [(ids, templates)], PQ)
    expected = index.search(queries, 3)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    # Damaged PQ codes: the vectors are the truth, so they are re-encoded (with a warning naming the file).
    (tmp_path / "idx" / manifest["stage_files"][0]).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        reopened = DiskIndex.open(tmp_path / "idx")
    assert manifest["stage_files"][0] in caplog.text and reopened.encoded_at_open == 3000
    np.testing.assert_array_equal(reopened.search(queries, 3)[1], expected[1])
    # The plain codes (needed for changes, not for searching) are read when first needed, but a file
    # too short for them is caught at open and re-encoded like damaged fast-scan codes.
    DiskIndex.build(tmp_path / "idx2", DIM, [(ids, templates)], PQ).close()
    lazy = DiskIndex.open(tmp_path / "idx2")
    assert lazy._stage._plain_file is not None and lazy.encoded_at_open == 0
    lazy.remove(ids[:PQ.purge_every])  # a purge needs them
    assert lazy._stage._plain_file is None and not np.isin(lazy.search(queries, 3)[1], ids[:PQ.purge_every]).any()
    lazy.close()
    codes = next((tmp_path / "idx2").glob("coarse.*.codes.faiss"))
    codes.write_bytes(codes.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert DiskIndex.open(tmp_path / "idx2").encoded_at_open == 3000  # (row count, the 8 dead ones included)
    assert f"{codes.name}: 100 bytes: too short" in caplog.text
    # A truncated vectors file cannot be repaired from inside the index: say which file.
    vec = tmp_path / "idx" / manifest["files"]["vectors"]
    vec.write_bytes(vec.read_bytes()[: 2 * DIM * 10])
    with pytest.raises(IndexFileError, match=rf"{vec.name}: holds 10 rows, the manifest says 3000"):
        DiskIndex.open(tmp_path / "idx")


def test_bad_vectors_are_refused(tmp_path):
    index = DiskIndex.create(tmp_path / "idx", DIM)
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        index.add([1], np.zeros((1, 8)))
    with pytest.raises(ValueError, match="NaN"):
        index.add([1], np.full((1, DIM), np.nan))
    with pytest.raises(ValueError, match=">= 0"):
        index.add([-3], np.ones((1, DIM)))
    s, i = index.search(np.ones((2, DIM)), 3)
    assert (i == -1).all() and np.isneginf(s).all()


def test_threaded_scan_over_parts_answers_like_one_scan(tmp_path, data, monkeypatch):
    from lvface_mm.gallery.disk_index import PQFastScanStage

    monkeypatch.setattr(PQFastScanStage, "split_rows", 500)  # 3,000 rows: three parts of 1,000
    ids, templates, queries = data
    index = DiskIndex.build(tmp_path / "idx", DIM, [(ids, templates)], PQ)
    one_s, one_i = index.search(queries, 5)
    index.set_scan_threads(3)
    three_s, three_i = index.search(queries, 5)
    assert [lo for lo, _ in index._stage._parts] == [0, 1000, 2000]
    assert (three_i[:, 0] == one_i[:, 0]).all() and (three_i[:, 0] == ids[:200]).all()
    np.testing.assert_allclose(three_s[:, 0], one_s[:, 0], atol=1e-6)
    # A small add goes to the last part (no re-split); a delete re-splits from the purged codes.
    index.add(np.array([99_999]), queries[7:8])
    parts = index._stage._parts
    assert parts is not None and int(parts[-1][1].ntotal) == 1001
    assert index.search(queries[7:8], 1)[1][0, 0] == 99_999
    index.remove(ids[:20])  # more than purge_every: the codes are purged and the parts rebuilt
    _, found = index.search(queries[20:200], 1)
    assert (found[:, 0] == ids[20:200]).all()
    assert sum(int(part.ntotal) for _, part in index._stage._parts) == 3000 + 1 - 20
    with pytest.raises(ValueError, match="scan_threads"):
        index.set_scan_threads(0)
