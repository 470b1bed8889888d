"""Search backends: every backend answers like the exact one, removal and replacement work."""

from __future__ import annotations

import numpy as np
import pytest

from lvface_mm.gallery import Gallery, IndexConfig, create_index, list_indexes

faiss = pytest.importorskip("faiss", reason="faiss-cpu is part of the [demo] extra")


def unit(rng: np.random.Generator, n: int, dim: int = 64) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_registry_lists_backends():
    assert set(list_indexes()) >= {"exact", "flat", "ivf", "hnsw", "auto"}
    with pytest.raises(ValueError, match="kind='nope'"):
        IndexConfig(kind="nope")
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivf"])
def test_backend_matches_exact_scores_and_handles_removal(kind):
    rng = np.random.default_rng(1)
    base, queries = unit(rng, 3000), unit(rng, 50)
    ids = np.arange(100, 3100, dtype=np.int64)
    index = create_index(64, IndexConfig(kind=kind, nlist=16, nprobe=16))  # nprobe=nlist: IVF is exact
    index.add(ids, base)
    assert len(index) == 3000
    scores, got = index.search(queries, 5)
    truth = queries @ base.T
    order = np.argsort(-truth, axis=1)[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(truth, order, 1), atol=1e-5)
    recall = (got[:, 0] == ids[order[:, 0]]).mean()
    assert recall >= (0.95 if kind == "hnsw" else 1.0)
    # remove every current top-1: none of them may come back
    top1 = np.unique(got[:, 0])
    index.remove(top1)
    assert len(index) == 3000 - len(top1)
    _, after = index.search(queries, 5)
    assert not np.isin(after, top1).any()
    # re-adding an id replaces its vector instead of duplicating it
    index.add(ids[:1], queries[:1])
    s, i = index.search(queries[:1], 2)
    assert i[0, 0] == ids[0] and s[0, 0] == pytest.approx(1.0, abs=1e-5) and i[0, 1] != ids[0]


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivf", "auto"])
def test_small_and_empty_indexes_pad_results(kind):
    index = create_index(8, kind)
    s, i = index.search(np.eye(8, dtype=np.float32)[:2], 3)
    assert s.shape == (2, 3) and (i == -1).all() and np.isneginf(s).all()
    index.add(np.array([5, 9]), np.eye(8, dtype=np.float32)[:2])
    s, i = index.search(np.eye(8, dtype=np.float32)[:1], 3)
    assert i[0].tolist() == [5, 9, -1] and s[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        index.add(np.array([1]), np.zeros((1, 4), np.float32))


def test_hnsw_rebuilds_after_many_deletions():
    rng = np.random.default_rng(2)
    x = unit(rng, 400)
    index = create_index(64, "hnsw")
    index.add(np.arange(400), x)
    index.remove(np.arange(0, 300))  # 75% dead: forces a rebuild
    assert len(index) == 100 and index._dead == 0
    _, got = index.search(x[300:], 1)
    assert (got[:, 0] == np.arange(300, 400)).mean() >= 0.98


def test_auto_switches_backend_past_the_limit():
    rng = np.random.default_rng(3)
    index = create_index(64, IndexConfig(kind="auto", exact_below=100, auto_kind="flat"))
    index.add(np.arange(100), unit(rng, 100))
    assert index.backend == "exact"
    extra = unit(rng, 5)
    index.add(np.arange(100, 105), extra)
    assert index.backend == "flat" and len(index) == 105
    _, got = index.search(extra, 1)
    assert got[:, 0].tolist() == list(range(100, 105))


def test_gallery_answers_the_same_with_every_backend(tmp_path):
    rng = np.random.default_rng(4)
    people, queries = unit(rng, 200, 512), unit(rng, 20, 512)
    queries[:10] = people[:10] + 0.01
    answers = {}
    for kind in ("exact", "flat", "hnsw"):
        g = Gallery(tmp_path / f"{kind}.db", index=kind, threshold=0.5)
        for i, p in enumerate(people):
            g.enrol(f"p{i}", p)
        answers[kind] = [(o.name, round(o.score, 4)) for o in g.identify(queries)]
    assert answers["exact"] == answers["flat"] == answers["hnsw"]
    assert [a[0] for a in answers["exact"][:10]] == [f"p{i}" for i in range(10)]
    assert all(a[0] is None for a in answers["exact"][10:])


def test_ivf_nprobe_trades_recall_for_work():
    rng = np.random.default_rng(5)
    base, queries = unit(rng, 4000), unit(rng, 200)
    index = create_index(64, IndexConfig(kind="ivf", nlist=32, nprobe=1))
    index.add(np.arange(4000), base)
    assert index.trained
    truth = np.argmax(queries @ base.T, axis=1)
    recall = {}
    for nprobe in (1, 32):
        index.set_nprobe(nprobe)
        recall[nprobe] = float((index.search(queries, 1)[1][:, 0] == truth).mean())
    assert recall[32] == 1.0 and recall[1] < 0.9  # all cells visited = exact; one cell misses many
    assert IndexConfig().kind == "auto" and IndexConfig().auto_kind == "flat"  # the default never loses recall
