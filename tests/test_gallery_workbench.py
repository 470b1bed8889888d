"""The demo's logic without the UI, and the gallery / index / search commands, end to end on tiny models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lvface_mm.cli import main
from lvface_mm.gallery.workbench import PartUnavailable, Workbench, WorkbenchConfig
from tests._faces_fixtures import needs_dlib, portrait_path


def test_offline_missing_weights_say_which_files_to_fetch(tmp_path):
    """HF_HUB_OFFLINE is set for the suite and no weights are cached: each part names its files."""
    pytest.importorskip("open_clip")
    wb = Workbench(WorkbenchConfig(db=str(tmp_path / "demo.db"), face_model="lvface_t"))
    with pytest.raises(PartUnavailable, match=r"hf download bytedance-research/LVFace LVFace-T_Glint360K"):
        _ = wb.embedder
    with pytest.raises(PartUnavailable, match=r"hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K "
                                              r"open_clip_model\.safetensors"):
        _ = wb.clip
    pytest.importorskip("transformers")
    with pytest.raises(PartUnavailable, match=r"hf download HuggingFaceTB/SmolVLM-256M-Instruct"):
        _ = wb.vlm
    status = "\n".join(wb.status())
    assert status.count("unavailable") == 3 and "gallery: 0 people" in status
    with pytest.raises(PartUnavailable, match="LVFace-T"):  # remembered, not retried on every request
        _ = wb.embedder
    assert Workbench(WorkbenchConfig(db=str(tmp_path / "b.db"), vlm=None)).status()[2] == "VLM: disabled (--vlm none)"
    with pytest.raises(PartUnavailable, match="--vlm"):
        _ = Workbench(WorkbenchConfig(db=str(tmp_path / "c.db"), vlm=None)).vlm
    with pytest.raises(ValueError, match="file path"):
        WorkbenchConfig(db=":memory:")


@needs_dlib()
def test_gallery_index_and_search_commands(tmp_path, capsys):
    pytest.importorskip("open_clip")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama", "biden"):
        shutil.copyfile(portrait_path(name), photos / f"{name}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    db = str(tmp_path / "library.db")

    assert main(["gallery", "enrol", "Joe", str(photos / "biden.jpg"), "--db", db, "--tiny", "--meta", "role=vp"]) == 0
    assert "enrolled Joe (id 1) from 1 photo" in capsys.readouterr().out
    assert main(["index", str(photos), "--db", db, "--tiny", "--quiet"]) == 1  # one bad file: reported, rest done
    out = capsys.readouterr()
    assert "indexed 2 photos" in out.out and "broken.jpg" in out.err
    assert main(["index", str(photos), "--db", db, "--tiny", "--quiet"]) == 1  # rerun: the bad file is still listed
    out = capsys.readouterr()
    assert "skipped 2 already indexed" in out.out and "failed before" in out.err and "broken.jpg" in out.err

    assert main(["search", "Joe at the beach", "--db", db, "--tiny", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["path"].rsplit("/", 1)[1] for h in hits] == ["biden.jpg"] and hits[0]["names"] == ["Joe"]
    assert main(["search", "--face", str(photos / "obama.jpg"), "--db", db, "--tiny", "-k", "1"]) == 0
    assert capsys.readouterr().out.split("\t")[1].endswith("obama.jpg")
    assert main(["search", "--name", "Nobody", "--db", db, "--tiny"]) == 2
    assert "Nobody" in capsys.readouterr().err

    assert main(["gallery", "identify", str(photos / "biden.jpg"), "--db", db, "--tiny", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["name"] == "Joe" and row["score"] > 0.99
    assert main(["gallery", "rename", "Joe", "Joseph", "--db", db, "--tiny"]) == 0
    assert main(["gallery", "export", str(tmp_path / "people.npz"), "--db", db, "--tiny"]) == 0
    assert main(["gallery", "delete", "Joseph", "--db", db, "--tiny"]) == 0
    assert main(["gallery", "delete", "Joseph", "--db", db, "--tiny"]) == 2
    assert main(["gallery", "import", str(tmp_path / "people.npz"), "--db", db, "--tiny"]) == 0
    capsys.readouterr()
    assert main(["gallery", "list", "--db", db, "--tiny", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip())
    assert listed["name"] == "Joseph" and listed["metadata"] == {"role": "vp"}
    assert main(["gallery", "list", "--db", db, "--model", "lvface_b"]) == 2  # other encoder: refused
    assert "not comparable" in capsys.readouterr().err


def test_calibrate_command_saves_the_threshold(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 64))
    x = np.repeat(centres, 5, axis=0) + 0.2 * rng.normal(size=(200, 64))
    np.savez(tmp_path / "labelled.npz", embeddings=x, labels=np.repeat(np.arange(40), 5))
    db = str(tmp_path / "g.db")
    assert main(["gallery", "calibrate", "--npz", str(tmp_path / "labelled.npz"), "--far", "1e-3", "--save",
                 "--db", db, "--tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["far"] <= 1e-3 and result["num_impostor"] == 200 * 199 // 2 - 40 * 10
    from lvface_mm.gallery import Gallery

    assert Gallery(db, model_name="lvface_tiny").threshold == pytest.approx(result["threshold"])
