"""Killed writers lose nothing committed, concurrent writers do not collide, bad pictures never
crash a request."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sqlite3
import struct
import threading
import zlib

import numpy as np
import pytest

from lvface_mm.gallery import Gallery
from tests._faces_fixtures import needs_dlib, portrait_path, shared_dlib

# fork: the child reuses the already-imported libraries (no second torch import) and can be SIGKILLed.
fork = multiprocessing.get_context("fork")
SAMPLES = 1500  # per identity: a ~3 MB transaction, so the kill lands inside one with near certainty


def person(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).normal(size=(SAMPLES, 512)).astype(np.float32)


def _enrol_forever(path: str, conn) -> None:  # runs in the child
    g = Gallery(path)
    i = 0
    while True:
        g.enrol(f"person-{i}", person(i), quality=np.arange(1, SAMPLES + 1, dtype=np.float64))
        conn.send(i)  # only after COMMIT returned
        i += 1


def test_sigkill_during_large_enrolment_keeps_every_commit(tmp_path):
    path = str(tmp_path / "g.db")
    Gallery(path).close()
    parent, child = fork.Pipe()
    proc = fork.Process(target=_enrol_forever, args=(path, child), daemon=True)
    proc.start()
    committed = []
    try:
        while len(committed) < 4:
            assert parent.poll(120), "the enrolling child stopped reporting"
            committed.append(parent.recv())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    g = Gallery(path)
    people = {p.name: p for p in g.list_identities()}
    for i in committed:
        assert people[f"person-{i}"].num_samples == SAMPLES
    # at most one more commit than reported (killed between COMMIT and send), and never half a person
    assert len(people) - len(committed) in (0, 1)
    assert all(p.num_samples == SAMPLES for p in people.values())
    # what was committed is intact, byte for byte
    stored, quality = g.samples(f"person-{committed[-1]}")
    x = person(committed[-1])
    np.testing.assert_allclose(stored, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(quality, np.arange(1, SAMPLES + 1))
    # and the gallery keeps working after recovery
    g.enrol("after-crash", person(99)[:3])
    assert g.identify(person(99)[:1])[0].name == "after-crash"


def _enrol_some(path: str, prefix: str, n: int) -> None:
    g = Gallery(path)
    rng = np.random.default_rng(sum(map(ord, prefix)))
    for i in range(n):
        g.enrol(f"{prefix}-{i}", rng.normal(size=(20, 512)))


def test_concurrent_writers_processes_and_threads(tmp_path):
    path = str(tmp_path / "g.db")
    Gallery(path).close()
    procs = [fork.Process(target=_enrol_some, args=(path, f"proc{k}", 15)) for k in range(2)]
    for p in procs:
        p.start()
    g = Gallery(path)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            rng = np.random.default_rng(k)
            for i in range(15):
                g.enrol(f"thread{k}-{i}", rng.normal(size=(5, 512)))
                g.identify(rng.normal(size=(3, 512)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        p.join(120)
    assert errors == [] and [p.exitcode for p in procs] == [0, 0]
    names = {p.name for p in g.list_identities()}
    assert len(names) == 2 * 15 + 3 * 15
    assert g.search(g.template("proc1-7"), k=1)[0][0].name == "proc1-7"  # other processes' writes are searchable


# -- photo indexing -------------------------------------------------------------------------------------


def _tiny_index(path: str):
    from lvface_mm.faces import FaceEmbedder
    from lvface_mm.gallery.clip import ClipEncoder
    from lvface_mm.gallery.photos import PhotoIndex

    return PhotoIndex(path, embedder=FaceEmbedder.from_tiny(seed=0, detector=shared_dlib()),
                      clip=ClipEncoder.tiny(), face_model="lvface_tiny")


def _index_gated(path: str, folder: str, conn) -> None:  # runs in the child
    import torch

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: without this, torch ops hang

    def progress(p) -> None:
        if p.status == "indexed":
            conn.send(p.path)
            conn.recv()  # wait for the parent's go-ahead: the kill lands at a known point, every run

    _tiny_index(path).add([folder], batch_size=1, progress=progress)
    conn.send("done")


@needs_dlib()
def test_sigkill_during_indexing_then_resume(tmp_path):
    pytest.importorskip("open_clip")
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("obama", "obama2", "obama3", "biden"):
        shutil.copyfile(portrait_path(name), folder / f"{name}.jpg")
    with Image.open(portrait_path("biden")) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "mirrored.jpg")
    # Detect once here; the forked child and the rerun reuse these detections (same pixels, same answer).
    _tiny_index(str(tmp_path / "warm.db")).add([folder])
    path = str(tmp_path / "lib.db")
    parent, child = fork.Pipe()
    proc = fork.Process(target=_index_gated, args=(path, str(folder), child), daemon=True)
    proc.start()
    try:
        for step in range(2):
            assert parent.poll(120), "the indexing child stopped reporting"
            assert parent.recv() != "done"
            if step == 0:
                parent.send("go")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the child is mid-run: 2 photos committed, 3 to go
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT COUNT(*) FROM photos").fetchone()[0] == 2
        assert c.execute("SELECT COUNT(*) FROM photos WHERE clip IS NULL").fetchone()[0] == 0
        assert c.execute("SELECT COUNT(*) FROM photo_faces").fetchone()[0] == 2  # one portrait, one face each

    index = _tiny_index(path)
    report = index.add([folder])
    assert (report.skipped, report.indexed, report.failed) == (2, 3, [])
    assert len(index) == 5 and index.num_faces == 5
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT COUNT(DISTINCT sha256) FROM photos").fetchone()[0] == 5


# -- bad pictures ------------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is one tiny row: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


@needs_dlib()
def test_bad_pictures_give_messages_and_the_workbench_keeps_working(tmp_path):
    pytest.importorskip("open_clip")
    from PIL import Image

    from lvface_mm.gallery.workbench import Workbench, WorkbenchConfig

    bad = {
        "truncated.jpg": portrait_path("obama").read_bytes()[:4000],
        "random.jpg": np.random.default_rng(0).bytes(5000),
        "empty.png": b"",
        "bomb.png": png_claiming(6_000, 6_000),  # 36 MP, over the 20 MP limit
        "text.png": b"hello, I am not a picture",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    odd = tmp_path / "grey16.png"  # unusual but valid: 16-bit greyscale
    with Image.open(portrait_path("obama")) as im:
        Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257).save(odd)

    wb = Workbench(WorkbenchConfig(db=str(tmp_path / "demo.db"), tiny=True, max_image_pixels=20_000_000))
    from lvface_mm.faces import FaceEmbedder

    wb._embedder = FaceEmbedder.from_tiny(seed=0, detector=shared_dlib(), max_image_pixels=20_000_000)
    for name in bad:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            wb.label_faces(tmp_path / name)
    with pytest.raises(ValueError, match="exceeds the limit"):
        wb.label_faces(tmp_path / "bomb.png")
    _, faces, _ = wb.label_faces(odd)
    assert len(faces) == 1
    outcome = wb.enrol("Barack", [tmp_path / n for n in bad] + [portrait_path("obama")])
    assert outcome.identity_id is not None and outcome.used == ["obama.jpg"]
    assert sorted(s for s, _ in outcome.skipped) == sorted(bad)
    assert all(reason and name not in reason for name, reason in outcome.skipped)
    _, faces, _ = wb.label_faces(portrait_path("obama"))
    assert [f.name for f in faces] == ["Barack"]
    nothing = wb.enrol("Nobody", [tmp_path / "random.jpg"])
    assert nothing.identity_id is None and "Nobody" not in wb.gallery
    wb.close()
