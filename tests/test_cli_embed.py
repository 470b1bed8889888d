"""`lvface-mm embed` and `lvface-mm verify` end to end on lvface_tiny, through `lvface_mm.cli.main`."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from lvface_mm.cli import build_parser, main
from lvface_mm.faces import FaceEmbedder
from tests._faces_fixtures import PORTRAITS, needs_dlib, portrait, portrait_path, shared_dlib


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Four portraits (two in a subfolder), a text file posing as a JPEG, and a non-image file that is skipped."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, name in enumerate(PORTRAITS):
        shutil.copy(portrait_path(name), (root / "sub" if i % 2 else root) / f"{name}.jpg")
    (root / "broken.jpg").write_text("not a jpeg")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


@pytest.fixture(scope="module")
def embedded(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "faces.npz"
    rc = main(["embed", str(photo_dir), str(photo_dir / "missing.png"), "--tiny", "-o", str(out), "--no-progress"])
    return rc, out


@needs_dlib()
def test_embed_folder_writes_every_face_and_reports_bad_files(embedded, photo_dir, capsys):
    rc, out = embedded
    assert rc == 1  # some inputs failed, the rest was saved
    data = np.load(out)
    assert data["embeddings"].shape == (4, 512) and data["embeddings"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
    assert data["boxes"].shape == (4, 4) and data["landmarks"].shape == (4, 5, 2) and data["scores"].shape == (4,)
    assert sorted(p.rsplit("/", 1)[1] for p in data["sources"]) == sorted(f"{n}.jpg" for n in PORTRAITS)
    assert data["face_index"].tolist() == [0, 0, 0, 0]
    files = [str(f) for f in data["files"]]
    assert len(files) == 6 and not any(f.endswith("notes.txt") for f in files)
    errors = dict(zip(files, data["file_errors"]))
    assert "not an image" in errors[str(photo_dir / "broken.jpg")]
    assert errors[str(photo_dir / "missing.png")] == "file not found"
    assert json.loads(str(data["meta"]))["model"].startswith("lvface_tiny")
    assert not list(out.parent.glob(".*tmp"))  # the temporary file was renamed into place


@needs_dlib()
def test_embed_matches_the_library(embedded):
    _, out = embedded
    data = np.load(out)
    results = FaceEmbedder.from_tiny(seed=0, detector=shared_dlib()).embed([str(s) for s in data["sources"]])
    np.testing.assert_allclose(data["embeddings"], np.stack([r.faces[0].embedding for r in results]), atol=1e-5)
    np.testing.assert_allclose(data["boxes"], np.stack([r.faces[0].box for r in results]), atol=1e-4)


@needs_dlib()
def test_embed_parquet_has_the_same_rows(embedded, photo_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "faces.parquet"
    assert main(["embed", str(photo_dir / "sub"), "--tiny", "-o", str(out)]) == 0
    table = pq.read_table(out)
    assert set(table.column_names) >= {"source", "face_index", "score", "box", "landmarks", "embedding"}
    npz = np.load(embedded[1])
    by_source = {str(s): e for s, e in zip(npz["sources"], npz["embeddings"])}
    rows = table.to_pylist()
    assert len(rows) == 2
    for row in rows:
        np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), by_source[row["source"]], atol=1e-6)
    assert json.loads(table.schema.metadata[b"lvface_mm"])["detector"] == "dlib"


@needs_dlib()
def test_verify_prints_similarity_and_decision(embedded, capsys):
    data = np.load(embedded[1])
    by_name = {str(s).rsplit("/", 1)[1]: e for s, e in zip(data["sources"], data["embeddings"])}
    a, b = portrait_path("obama"), portrait_path("biden")
    assert main(["verify", str(a), str(b), "--tiny", "--threshold", "0.2"]) == 0
    out = capsys.readouterr()
    similarity = float(re.search(r"cosine similarity: (-?[0-9.]+)", out.out).group(1))
    assert similarity == pytest.approx(float(by_name["obama.jpg"] @ by_name["biden.jpg"]), abs=1e-4)
    verdict = "same person" if similarity >= 0.2 else "different people"
    assert f"{verdict} (threshold 0.2" in out.out
    assert "random weights" in out.err


@needs_dlib()
def test_verify_same_image_json(capsys):
    a = str(portrait_path("obama3"))
    assert main(["verify", a, a, "--tiny", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["similarity"] == pytest.approx(1.0, abs=1e-5) and record["same"] is True
    assert record["threshold"] == 0.35 and record["faces"] == [1, 1] and record["random_weights"] is True


def test_verify_names_the_unusable_image(tmp_path, capsys):
    crop = tmp_path / "crop.png"
    from PIL import Image

    Image.fromarray(portrait("obama")[100:212, 200:312]).save(crop)
    assert main(["verify", str(crop), str(tmp_path / "gone.jpg"), "--tiny", "--assume-aligned", "yes"]) == 1
    assert "gone.jpg: file not found" in capsys.readouterr().err
    assert main(["verify", str(crop), str(crop), "--tiny", "--threshold", "2"]) == 2


def test_embed_aligned_crops_and_model_name_without_weights(tmp_path, capsys):
    from PIL import Image

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, (x, y) in enumerate([(200, 100), (210, 110)]):
        Image.fromarray(portrait("obama")[y : y + 112, x : x + 112]).save(crops / f"c{i}.png")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["embed", str(crops), "--tiny", "--assume-aligned", "yes", "-o", str(a)]) == 0
    assert main(["embed", str(crops), "--model", "lvface_tiny", "--assume-aligned", "yes", "-o", str(b)]) == 0
    assert "no official weights" in capsys.readouterr().err
    da, db = np.load(a), np.load(b)
    assert da["embeddings"].shape == (2, 512) and np.isnan(da["scores"]).all()
    np.testing.assert_array_equal(da["embeddings"], db["embeddings"])  # same seed, same random weights


def test_embed_with_the_onnx_backend(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import warnings

    from PIL import Image

    from lvface_mm.models.onnx import export_onnx

    crop = tmp_path / "crop.png"
    Image.fromarray(portrait("obama2")[150:262, 100:212]).save(crop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_file = export_onnx(FaceEmbedder.from_tiny(seed=0).encoder.model, tmp_path / "tiny.onnx")
    a, b, c = tmp_path / "torch.npz", tmp_path / "onnx.npz", tmp_path / "auto.npz"
    assert main(["embed", str(crop), "--tiny", "--backend", "torch", "--assume-aligned", "yes", "-o", str(a)]) == 0
    args = ["embed", str(crop), "--model", "lvface_tiny", "--backend", "onnx", "--onnx-path", str(onnx_file)]
    args += ["--assume-aligned", "yes"]
    assert main([*args, "-o", str(b)]) == 0
    assert main(["embed", str(crop), "--tiny", "--assume-aligned", "yes", "-o", str(c)]) == 0  # default: auto
    np.testing.assert_allclose(np.load(a)["embeddings"], np.load(b)["embeddings"], atol=1e-4)
    np.testing.assert_allclose(np.load(a)["embeddings"], np.load(c)["embeddings"], atol=1e-4)
    assert json.loads(str(np.load(b)["meta"]))["backend"] == "onnx"
    assert json.loads(str(np.load(c)["meta"]))["backend"] == "auto"
    assert main(["embed", str(crop), "--tiny", "--backend", "onnx", "-o", str(tmp_path / "d.npz")]) == 2
    assert "--tiny means random PyTorch weights" in capsys.readouterr().err


def test_embed_never_clobbers_existing_output_on_failure(tmp_path, monkeypatch, capsys):
    from PIL import Image

    out = tmp_path / "keep.npz"
    np.savez(out, embeddings=np.ones((1, 512), np.float32))
    before = out.read_bytes()
    # Nothing to embed: refused before any work.
    (tmp_path / "empty").mkdir()
    assert main(["embed", str(tmp_path / "empty"), "--tiny", "-o", str(out)]) == 2
    assert "no image files" in capsys.readouterr().err
    # Unknown output format: refused up front.
    assert main(["embed", str(tmp_path), "--tiny", "-o", str(tmp_path / "x.csv")]) == 2
    # A crash while writing leaves the old file and no temporary behind.
    crop = tmp_path / "crop.png"
    Image.fromarray(portrait("biden")[60:172, 110:222]).save(crop)

    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    assert main(["embed", str(crop), "--tiny", "--assume-aligned", "yes", "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: disk full"  # one line, no traceback
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.png", "empty", "keep.npz"]


def test_commands_are_registered_with_help():
    parser = build_parser()
    for command in ("embed", "verify"):
        args = parser.parse_args([command, "a.jpg", "b.jpg", "--tiny"])
        assert args.command == command and args.tiny and args.detector == "dlib"
    with pytest.raises(SystemExit):
        parser.parse_args(["embed", "a.jpg", "--backend", "tensorrt"])
