"""Gallery: enrol / identify / rename / delete / list / export-import, persistence and privacy."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from lvface_mm.gallery import Gallery, Identification, default_threshold


def unit(rng: np.random.Generator, n: int, dim: int = 512) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(x: np.ndarray, rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
    """Another 'photo' of the same person: a small perturbation of x."""
    y = x + noise * rng.normal(size=x.shape)
    return y / np.linalg.norm(y, axis=-1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_enrol_identify_known_and_unknown(tmp_path, rng):
    people = unit(rng, 4)
    g = Gallery(tmp_path / "g.db", threshold=0.5)
    ids = [g.enrol(name, near(people[i : i + 1], rng)) for i, name in enumerate(["Ann", "Bo", "Cy", "Di"])]
    assert ids == sorted(ids) and len(set(ids)) == 4
    stranger = unit(rng, 1)
    out = g.identify(np.vstack([near(people[2], rng), near(people[0], rng), stranger[0]]))
    assert [o.name for o in out] == ["Cy", "Ann", None]
    assert out[0].identity_id == ids[2] and out[0].score > 0.7
    assert out[2] == Identification(None, out[2].score, None) and out[2].score < 0.5
    assert not out[2].known and out[0].known
    # a per-call threshold above every score turns everyone into unknown
    assert all(o.name is None for o in g.identify(people, threshold=0.9999))


def test_template_is_quality_weighted_mean(tmp_path, rng):
    x = unit(rng, 3)
    q = np.array([1.0, 2.0, 5.0])
    g = Gallery(tmp_path / "g.db")
    g.enrol("Ann", x, quality=q)
    expected = (q[:, None] * x).sum(0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(g.template("Ann"), expected, atol=1e-6)
    # more samples later extend the same identity and update the template
    extra = unit(rng, 1)
    same_id = g.enrol("ann", extra, quality=4.0)  # names match case-insensitively
    assert same_id == g.get("Ann").identity_id and g.get("Ann").num_samples == 4
    expected = (q[:, None] * x).sum(0) + 4.0 * extra[0]
    np.testing.assert_allclose(g.template("Ann"), expected / np.linalg.norm(expected), atol=1e-6)
    g.enrol("Ann", extra, replace=True)
    assert g.get("Ann").num_samples == 1
    np.testing.assert_allclose(g.template("Ann"), extra[0], atol=1e-6)


def test_search_top_k_and_empty_gallery(tmp_path, rng):
    g = Gallery(tmp_path / "g.db")
    assert g.identify(unit(rng, 2)) == [Identification(None, -1.0, None)] * 2
    people = unit(rng, 6)
    for i, p in enumerate(people):
        g.enrol(f"p{i}", p)
    hits = g.search(people[3], k=3)[0]
    assert len(hits) == 3 and hits[0].name == "p3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert len(g.search(people[3], k=50)[0]) == 6


def test_rename_delete_list_and_persistence(tmp_path, rng):
    path = tmp_path / "g.db"
    people = unit(rng, 3)
    with Gallery(path, model_name="lvface_b") as g:
        a = g.enrol("Ann", people[0], metadata={"team": "red"})
        b = g.enrol("Bo", people[1])
        g.rename("Ann", "Annie")
        with pytest.raises(ValueError, match="already enrolled"):
            g.rename(b, "annie")
        assert g.delete("Bo") == b
        with pytest.raises(KeyError, match="Bo"):
            g.delete("Bo")
        c = g.enrol("Cy", people[2])
        assert c > b  # ids are never reused after a delete
    with Gallery(path, model_name="lvface_b") as g:
        listed = g.list_identities()
        assert [(i.name, i.identity_id, i.num_samples, i.metadata) for i in listed] == [
            ("Annie", a, 1, {"team": "red"}), ("Cy", c, 1, {})]
        assert g.identify(people[1:2], threshold=0.5)[0].name is None
        assert g.identify(people[0:1])[0].name == "Annie"
        assert "annie" in g and "Bo" not in g and len(g) == 2
        assert g.threshold == default_threshold("lvface_b").threshold


def test_bad_input_is_refused_and_nothing_changes(tmp_path, rng):
    g = Gallery(tmp_path / "g.db")
    g.enrol("Ann", unit(rng, 1))
    before = g.list_identities()
    with pytest.raises(ValueError, match=r"shape \(N, 512\)"):
        g.enrol("Bo", np.zeros((2, 128)))
    with pytest.raises(ValueError, match="NaN"):
        g.enrol("Bo", np.full((1, 512), np.nan))
    with pytest.raises(ValueError, match="all zeros"):
        g.enrol("Bo", np.zeros((1, 512)))
    with pytest.raises(ValueError, match="empty"):
        g.enrol("  ", unit(rng, 1))
    with pytest.raises(ValueError, match="quality"):
        g.enrol("Bo", unit(rng, 2), quality=[1.0, -1.0])
    with pytest.raises(ValueError, match="cancel out"):
        x = unit(rng, 1)
        g.enrol("Bo", np.vstack([x, -x]))
    with pytest.raises(ValueError, match="store_face_images=True"):
        g.enrol("Bo", unit(rng, 1), face_images=[np.zeros((112, 112, 3), np.uint8)])
    with pytest.raises(ValueError, match="JSON"):
        g.enrol("Bo", unit(rng, 1), metadata={"x": object()})
    assert g.list_identities() == before


def test_file_guards(tmp_path, rng):
    path = tmp_path / "g.db"
    Gallery(path, model_name="lvface_b").close()
    with pytest.raises(ValueError, match="lvface_b.*lvface_t|not comparable"):
        Gallery(path, model_name="lvface_t")
    with pytest.raises(ValueError, match="512-d"):
        Gallery(path, feature_dim=256)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="junk.db"):
        Gallery(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Gallery(tmp_path / "missing" / "g.db")


def test_saved_threshold_and_face_images_opt_in(tmp_path, rng):
    path = tmp_path / "g.db"
    with Gallery(path, store_face_images=True) as g:
        crop = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
        g.enrol("Ann", unit(rng, 1), face_images=[crop])
        png = g.face_images("Ann")
        assert len(png) == 1 and png[0][:8] == b"\x89PNG\r\n\x1a\n"
        g.save_threshold(0.123, far=1e-3, source="test")
    with Gallery(path) as g:
        assert g.threshold == pytest.approx(0.123)
    with Gallery(path, threshold=0.7) as g:  # an explicit threshold wins for the session
        assert g.threshold == 0.7


def test_export_import_roundtrip_and_conflicts(tmp_path, rng):
    people = unit(rng, 3)
    src = Gallery(tmp_path / "a.db", model_name="lvface_s")
    src.enrol("Ann", np.vstack([people[0], near(people[0], rng)]), quality=[1.0, 3.0], metadata={"k": 1})
    src.enrol("Bo", people[1])
    exported = src.export(tmp_path / "people.npz")
    dst = Gallery(tmp_path / "b.db", model_name="lvface_s")
    dst.enrol("Bo", people[2])
    with pytest.raises(ValueError, match="already enrolled"):
        dst.import_(exported)
    assert [i.name for i in dst.list_identities()] == ["Bo"]  # nothing half-imported
    dst.import_(exported, on_conflict="skip")
    np.testing.assert_allclose(dst.template("Ann"), src.template("Ann"), atol=1e-6)
    assert dst.get("Ann").metadata == {"k": 1} and dst.get("Bo").num_samples == 1
    dst.import_(exported, on_conflict="replace")
    np.testing.assert_allclose(dst.template("Bo"), src.template("Bo"), atol=1e-6)
    dst.import_(exported, on_conflict="merge")
    assert dst.get("Ann").num_samples == 4
    other = Gallery(tmp_path / "c.db", model_name="lvface_t")
    with pytest.raises(ValueError, match="lvface_s"):
        other.import_(exported)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a gallery export"):
        dst.import_(bad)


def test_two_connections_see_each_others_commits(tmp_path, rng):
    path = tmp_path / "g.db"
    reader, writer = Gallery(path), Gallery(path)
    x = unit(rng, 1)
    assert reader.identify(x)[0].name is None
    writer.enrol("Ann", x)
    assert reader.identify(x)[0].name == "Ann"
    writer.delete("Ann")
    assert reader.identify(x)[0].name is None
    # the reader's own write must not hide a commit it has not looked at yet
    y, z = unit(rng, 2)
    writer.enrol("Bo", y)
    reader.enrol("Cy", z)
    assert [o.name for o in reader.identify(np.vstack([y, z]))] == ["Bo", "Cy"]


def test_delete_really_removes_the_bytes(tmp_path, rng):
    """After delete, neither the database nor its WAL holds the person's name or any embedding."""
    path = tmp_path / "g.db"
    g = Gallery(path)
    for i in range(40):  # enough rows to fill several pages and trigger checkpoints
        g.enrol(f"filler-{i}", unit(rng, 3))
    secret_name = "Zelda Quartermaine"
    samples = unit(rng, 5)
    g.enrol(secret_name, samples, metadata={"note": "private-marker-xyz"})
    stored, _ = g.samples(secret_name)
    needles = [secret_name.encode(), b"private-marker-xyz", g.template(secret_name).astype("<f4").tobytes()]
    needles += [s.astype("<f4").tobytes() for s in stored]

    def file_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))

    blob = file_bytes()
    assert all(n in blob for n in needles)  # the check below can fail: the data was there
    g.delete(secret_name)
    g.enrol("after", unit(rng, 1))
    g.close()
    blob = file_bytes()
    assert [n in blob for n in needles] == [False] * len(needles)
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 40 * 3 + 1
