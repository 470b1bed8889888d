"""Photo indexing as a sharded job: shard files, engines (inline, local processes, torchrun ranks, Ray),
resuming after a killed worker, and bad shards. Face-only with the tiny encoder unless CLIP is the point."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lvface_mm.gallery.disk_sync import PhotoFaceIndex
from lvface_mm.gallery.index_job import run_index_job
from lvface_mm.gallery.indexing import EncoderSpec, IndexJobConfig, JobReport, ShardTask
from lvface_mm.gallery.photos import PhotoIndex
from lvface_mm.gallery.shards import PhotoRecord, ShardError, plan_shards, read_shard, write_shard
from tests._faces_fixtures import needs_dlib, portrait_path

REPO = Path(__file__).resolve().parents[1]
# Tiny random encoder in PyTorch (no ONNX export per worker), faces only.
SPEC = EncoderSpec(tiny_seed=0, backend="torch", clip_model=None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Seven photos of distinct bytes (four portraits, a mirror, two re-saved copies), a broken file
    and an exact duplicate. Shared by the module's tests: copy it before changing it."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("collection") / "photos"
    (folder / "b").mkdir(parents=True)
    for name in ("obama", "obama2", "obama3", "biden"):
        shutil.copyfile(portrait_path(name), folder / f"{name}.jpg")
    with Image.open(portrait_path("biden")) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "b" / "mirrored.jpg")
        im.save(folder / "b" / "biden_q70.jpg", quality=70)
    with Image.open(portrait_path("obama")) as im:
        im.save(folder / "b" / "obama.png")
    shutil.copyfile(portrait_path("obama2"), folder / "b" / "obama2_copy.jpg")
    (folder / "b" / "broken.jpg").write_bytes(portrait_path("biden").read_bytes()[:1500])
    return folder


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> dict[str, tuple]:
    """The rows of one process indexing the collection (inline engine), computed once."""
    config = job(tmp_path_factory.mktemp("reference"), "one", shard_size=3)
    run_index_job([photos], config, SPEC, engine="inline")
    return rows(Path(config.db))


def rows(db: Path) -> dict[str, tuple]:
    """path -> (sha256, width, height, clip?, faces sorted by box) of a collection database."""
    out = {}
    with sqlite3.connect(db) as c:
        for pid, sha, path, w, h, clip in c.execute("SELECT id, sha256, path, width, height, clip FROM photos"):
            faces = sorted((tuple(round(v, 3) for v in f[:4]), np.frombuffer(f[4], "<f4"))
                           for f in c.execute("SELECT x1, y1, x2, y2, embedding FROM photo_faces WHERE photo_id = ?",
                                              (pid,)))
            out[Path(path).name] = (sha, w, h, clip is not None, faces)
    return out


def assert_same_rows(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        (sha, w, h, clip, faces), (sha2, w2, h2, clip2, faces2) = a[name], b[name]
        assert (sha, w, h, clip) == (sha2, w2, h2, clip2), name
        assert [box for box, _ in faces] == [box for box, _ in faces2], name
        for (_, e), (_, e2) in zip(faces, faces2):
            np.testing.assert_allclose(e, e2, atol=1e-5)


def job(tmp_path: Path, name: str, **kwargs) -> IndexJobConfig:
    return IndexJobConfig(db=str(tmp_path / f"{name}.db"), shard_dir=str(tmp_path / f"{name}.shards"), **kwargs)


# -- shard files (no models) ---------------------------------------------------------------------------
def test_shard_round_trip_plan_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    records = [
        PhotoRecord("a.jpg", "aa", "indexed", None, 640, 480, rng.random((2, 4), np.float32),
                    rng.random(2, np.float32), rng.random((2, 5, 2), np.float32), rng.random((2, 8), np.float32),
                    rng.random(3, np.float32)),
        PhotoRecord("b.jpg", None, "failed", "cannot read file (Permission denied)"),
        PhotoRecord("c.jpg", "cc", "indexed", None, 10, 10, clip=rng.random(3, np.float32)),  # no face
        PhotoRecord("d.jpg", "dd", "known"),
    ]
    write_shard(tmp_path / "s.parquet", records, {"face_model": "lvface_tiny"})
    back, meta = read_shard(tmp_path / "s.parquet")
    assert meta["face_model"] == "lvface_tiny" and meta["rows"] == 4 and meta["embedding_dim"] == 8
    for a, b in zip(records, back):
        assert (a.path, a.sha256, a.status, a.error, a.width, a.height) == (b.path, b.sha256, b.status, b.error,
                                                                             b.width, b.height)
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.landmarks, b.landmarks)
        assert np.array_equal(a.embeddings.reshape(a.num_faces, -1) if a.num_faces else b.embeddings, b.embeddings)
        assert (a.clip is None) == (b.clip is None) and (a.clip is None or np.array_equal(a.clip, b.clip))
    import pyarrow.parquet as pq  # readable by any Parquet reader, faces as nested lists

    assert pq.read_table(tmp_path / "s.parquet").column("face_boxes").to_pylist()[0][1] == pytest.approx(
        records[0].boxes[1].tolist())

    truncated = tmp_path / "t.parquet"
    truncated.write_bytes((tmp_path / "s.parquet").read_bytes()[:-40])
    with pytest.raises(ShardError, match=r"t\.parquet.*not a readable Parquet"):
        read_shard(truncated)
    with pytest.raises(ShardError, match=r"missing/x\.parquet.*cannot write"):
        write_shard(tmp_path / "missing" / "x.parquet", records, {})
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind

    shards = plan_shards([f"p{i}.jpg" for i in range(7)], 3)
    assert [len(s.paths) for s in shards] == [3, 3, 1] and shards[2].name.startswith("shard-00002-")
    assert plan_shards([f"p{i}.jpg" for i in range(7)], 3) == shards  # stable across runs
    assert plan_shards([f"p{i}.jpg" for i in range(8)], 3)[2].name != shards[2].name  # other files, other shard
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards([], 0)


# -- the job --------------------------------------------------------------------------------------------
@needs_dlib()
def test_inline_job_matches_photo_index_and_reruns_are_idempotent(tmp_path, photos, reference):
    photos = Path(shutil.copytree(photos, tmp_path / "photos"))  # this test adds a file
    config = job(tmp_path, "inline", shard_size=3)
    report = run_index_job([photos, tmp_path / "typo.jpg"], config, SPEC, engine="inline")
    assert (report.shards, report.indexed, report.skipped, report.faces) == (3, 7, 1, 7)  # obama2_copy: duplicate
    assert sorted(Path(p).name for p, _ in report.failed) == ["broken.jpg", "typo.jpg"]
    assert len(list(Path(config.shard_dir).glob("shard-*.parquet"))) == 3
    with PhotoFaceIndex(config.db + ".faces.idx", config.db) as faces:  # built by the job, not the first search
        assert not faces.last_sync.rebuilt and (faces.last_sync.added, len(faces)) == (0, 7)
    assert not Path(config.db + ".clip.idx").exists()  # faces only: no CLIP index

    # The same rows as the one-process PhotoIndex.add path (today's `index`), faces only.
    direct = PhotoIndex(tmp_path / "ref.db", embedder=SPEC.build().embedder, face_model="lvface_tiny")
    assert direct.add([photos]).indexed == 7
    direct.close()
    assert_same_rows(rows(Path(config.db)), rows(tmp_path / "ref.db"))
    assert_same_rows(rows(Path(config.db)), reference)  # shard size does not matter

    again = run_index_job([photos], config, SPEC, engine="inline")
    assert (again.indexed, again.skipped, again.failed, again.shards_done_before) == (0, 8, [], 3)
    assert [Path(p).name for p, _ in again.failed_before] == ["broken.jpg"]  # listed, never counted as done
    assert len(PhotoIndex(config.db)) == 7

    # A photo added to the collection: the plan changes, content already in the database is not redone.
    shutil.copyfile(portrait_path("obama3"), photos / "b" / "zz_obama3_again.jpg")
    grown = run_index_job([photos], config, SPEC, engine="inline")
    assert grown.indexed == 0 and grown.skipped == 9 and len(PhotoIndex(config.db)) == 7


@needs_dlib()
@pytest.mark.multiproc
def test_two_local_processes_give_the_rows_of_one(tmp_path, photos, reference):
    two = job(tmp_path, "two", shard_size=2)
    report = run_index_job([photos], two, SPEC, engine="local", workers=2)
    assert report.indexed == 7 and report.shard_errors == [] and report.worker_cpu_seconds > 0
    assert_same_rows(rows(Path(two.db)), reference)


class DiesMidShard(ShardTask):
    """A worker that kills its own process halfway through shard 1, the first time only."""

    def __call__(self, shard):  # noqa: ANN001, ANN204
        marker = Path(self.config.shard_dir) / "died"
        if shard.index == 1 and not marker.exists():
            marker.touch()
            from lvface_mm.gallery.indexing import index_paths

            index_paths(shard.paths[:1], self.encoders)
            os._exit(9)  # as SIGKILL or the OOM killer would: no cleanup, no shard file
        return super().__call__(shard)


@needs_dlib()
@pytest.mark.multiproc
def test_killed_worker_then_rerun_gives_every_photo_once(tmp_path, photos, reference):
    from lvface_mm.gallery.indexing import build_collection
    from lvface_mm.gallery.runners import run_local

    config = job(tmp_path, "killed", shard_size=2)
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    shards = plan_shards(files, config.shard_size)
    Path(config.shard_dir).mkdir()
    outcomes = run_local(shards, DiesMidShard(config, SPEC), workers=2)
    failed = [o.name for o in outcomes if o.error is not None]
    assert shards[1].name in failed and all("worker failed" in o.error for o in outcomes if o.error)
    assert not shards[1].file(config.shard_dir).exists()  # the killed shard left nothing behind
    with PhotoIndex(config.db, face_model="lvface_tiny") as index:  # merge what finished
        build_collection(index, [s.file(config.shard_dir) for s in shards if s.file(config.shard_dir).exists()])
        partial = len(index)
    assert partial < 7

    report = run_index_job([photos], config, SPEC, engine="inline")  # only the lost shards are redone
    assert report.shard_errors == [] and report.indexed == 7 - partial
    assert report.shards_done_before == len(shards) - len(failed)
    assert_same_rows(rows(Path(config.db)), reference)  # every photo once, same rows
    with sqlite3.connect(config.db) as c:
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT sha256) FROM photos").fetchone() == (7, 7)


@needs_dlib()
def test_shard_write_failure_and_corrupt_shard_lose_nothing(tmp_path, photos, monkeypatch):
    import pyarrow.parquet as pq

    config = job(tmp_path, "bad", shard_size=3)
    real_write = pq.write_table

    def full_disk(table, where, *args, **kwargs):  # noqa: ANN001, ANN202 - the second shard hits a full disk
        if "shard-00001-" in str(where):
            raise OSError(28, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    report = run_index_job([photos], config, SPEC, engine="inline")
    assert len(report.shard_errors) == 1
    shard, reason = report.shard_errors[0]
    assert "shard-00001-" in reason and "No space left on device" in reason and "rerun" in reason
    before = rows(Path(config.db))
    assert 0 < len(before) < 7  # the other shards are indexed
    monkeypatch.setattr(pq, "write_table", real_write)

    # A shard file damaged after it was merged: named, moved aside, redone; nothing indexed is lost.
    first = sorted(Path(config.shard_dir).glob("shard-00000-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:100])
    rerun = run_index_job([photos], config, SPEC, engine="inline")
    assert any(first.name in s and "moved to" in r for s, r in rerun.shard_errors)
    assert (first.parent / (first.name + ".corrupt")).exists() and read_shard(first)[1]["rows"] == 3
    after = rows(Path(config.db))
    assert len(after) == 7 and all(after[k][0] == before[k][0] for k in before)
    with sqlite3.connect(config.db) as c:
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT sha256) FROM photos").fetchone() == (7, 7)

    # Building from a damaged shard alone: a clear error naming the file, the database untouched.
    from lvface_mm.gallery.indexing import build_collection

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 definitely not parquet")
    with PhotoIndex(config.db) as index, pytest.raises(ShardError, match=r"bad\.parquet"):
        build_collection(index, [bad])
    collected = build_collection(PhotoIndex(config.db), [bad], JobReport())
    assert collected.shard_errors and collected.shard_errors[0][0] == str(bad)
    assert len(rows(Path(config.db))) == 7


@needs_dlib()
def test_other_encoder_is_refused_before_any_work(tmp_path, photos):
    config = job(tmp_path, "spaces", shard_size=4)
    run_index_job([photos / "biden.jpg"], config, SPEC, engine="inline")
    with pytest.raises(ValueError, match="lvface_tiny"):
        run_index_job([photos], config, EncoderSpec(face_model="lvface_b", clip_model=None), engine="inline")
    with pytest.raises(ValueError, match="unknown indexing engine 'spark'"):
        run_index_job([photos], config, SPEC, engine="spark")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_dlib()
@pytest.mark.multiproc
def test_torchrun_ranks_give_the_rows_of_one_process(tmp_path, photos, reference):
    """Two ranks as torchrun starts them (RANK, WORLD_SIZE, MASTER_*): each indexes its shards, rank 0 merges."""
    db, shards = tmp_path / "ranks.db", tmp_path / "ranks.shards"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lvface_mm", "index", str(photos), "--db", str(db), "--shards", str(shards),
               "--shard-size", "2", "--engine", "torchrun", "--tiny", "--faces-only", "--backend", "torch", "--quiet"]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 0], outs  # rank 0 lists broken.jpg; rank 1 only indexes
    assert "indexed 7 photos" in outs[0][0] and "broken.jpg" in outs[0][1]
    assert_same_rows(rows(db), reference)


@needs_dlib()
@pytest.mark.multiproc
def test_local_ray_gives_the_rows_of_one_process(tmp_path, photos, reference):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = job(tmp_path, "ray", shard_size=3)
        report = run_index_job([photos], on_ray, SPEC, engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert report.indexed == 7 and report.shard_errors == [] and report.worker_cpu_seconds > 0
    assert_same_rows(rows(Path(on_ray.db)), reference)


def test_cli_rejects_bad_job_options(tmp_path, capsys):
    from lvface_mm.cli import main

    db = str(tmp_path / "lib.db")
    assert main(["index", str(tmp_path), "--db", db, "--tiny", "--engine", "spark"]) == 2
    assert "--engine 'spark'" in capsys.readouterr().err
    assert main(["index", str(tmp_path), "--db", db, "--tiny", "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    assert main(["index", str(tmp_path), "--db", db, "--tiny", "--shard-size", "0"]) == 2
    assert "shard_size=0" in capsys.readouterr().err
    assert not Path(db).exists()  # refused before anything was written


def test_cli_pixel_budget_and_detector_screening_reach_the_workers():
    from lvface_mm.cli import build_parser
    from lvface_mm.cli.index import encoder_spec

    args = build_parser().parse_args(["index", "photos", "--db", "x.db", "--tiny", "--faces-only", "--max-pixels",
                                      "1000", "--min-detection-score", "0.6", "--no-landmark-check"])
    spec = encoder_spec(args)
    assert (spec.max_image_pixels, spec.min_detection_score, spec.landmark_check) == (1000, 0.6, False)
    embedder = spec.build().embedder
    assert embedder.config.max_image_pixels == 1000
    assert embedder.config.min_detection_score == 0.6
    assert embedder.config.landmark_check is None
    default = encoder_spec(build_parser().parse_args(["index", "photos", "--db", "x.db", "--tiny", "--faces-only"]))
    assert default.build().embedder.config.landmark_check is not None
