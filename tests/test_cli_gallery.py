"""`lvface-mm gallery` as a user meets it: the gallery remembers its encoder, read commands never
create files, foreign files are refused, and every error is one line. Aligned 112x112 crops skip
the detector, so these run on lvface_tiny in seconds."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

from lvface_mm.cli import main


@pytest.fixture
def crops(tmp_path):
    """Three aligned 'faces' (random 112x112 RGB images: the pipeline takes them as crops)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"face{i}.png"
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_gallery_remembers_its_encoder(tmp_path, crops, capsys):
    db = str(tmp_path / "people.db")
    assert main(["gallery", "enrol", "Ann", crops[0], "--db", db, "--tiny", "--seed", "3", "-q"]) == 0
    assert main(["gallery", "enrol", "Bo", crops[1], "--db", db, "-q"]) == 0  # no model flags: the gallery's own
    capsys.readouterr()
    assert main(["gallery", "identify", crops[0], crops[1], "--db", db, "--json", "-q"]) == 0
    rows = [json.loads(line) for line in _lines(capsys.readouterr().out)]
    assert [r["name"] for r in rows] == ["Ann", "Bo"] and min(r["score"] for r in rows) > 0.999
    assert main(["gallery", "list", "--db", db, "--json"]) == 0
    assert [json.loads(line)["name"] for line in _lines(capsys.readouterr().out)] == ["Ann", "Bo"]
    assert main(["gallery", "rename", "Bo", "Bob", "--db", db]) == 0
    assert main(["gallery", "export", str(tmp_path / "people.npz"), "--db", db]) == 0
    assert main(["gallery", "delete", "Bob", "--db", db]) == 0
    capsys.readouterr()
    # another seed is another encoder: refused, in flags the user can act on
    assert main(["gallery", "identify", crops[0], "--db", db, "--tiny", "--seed", "4", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--tiny --seed 3" in err and "--tiny --seed 4" in err and "not comparable" in err
    assert len(_lines(err)) == 1
    assert main(["gallery", "list", "--db", db, "--model", "lvface_b"]) == 2
    assert "not comparable" in capsys.readouterr().err
    # a restored export remembers the encoder too: identify without flags still finds Bob
    restored = str(tmp_path / "restored.db")
    assert main(["gallery", "import", str(tmp_path / "people.npz"), "--db", restored]) == 0
    capsys.readouterr()
    assert main(["gallery", "identify", crops[1], "--db", restored, "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "Bob"


def test_a_mistyped_db_is_not_created(tmp_path, crops, capsys):
    typo = tmp_path / "peopel.db"
    for argv in (["list"], ["identify", crops[0], "--tiny"], ["rename", "A", "B"], ["delete", "A"],
                 ["export", str(tmp_path / "x.npz")]):
        assert main(["gallery", *argv, "--db", str(typo)]) == 2, argv
        err = capsys.readouterr().err
        assert "no gallery at" in err and "peopel.db" in err and len(_lines(err)) == 1
    assert not typo.exists() and not (tmp_path / "x.npz").exists()


def test_enrol_with_no_usable_photo_writes_nothing(tmp_path, capsys):
    db = tmp_path / "new.db"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["gallery", "enrol", "Ann", str(bad), str(tmp_path / "missing.jpg"), "--db", str(db), "--tiny",
                 "-q"]) == 2
    assert "nothing enrolled" in capsys.readouterr().err
    assert not db.exists()


def test_another_applications_database_is_refused(tmp_path, crops, capsys):
    other = tmp_path / "notes.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    assert main(["gallery", "enrol", "Ann", crops[0], "--db", str(other), "--tiny", "-q"]) == 2
    err = capsys.readouterr().err
    assert "belongs to something else" in err and "notes" in err and len(_lines(err)) == 1
    assert other.read_bytes() == before


def test_import_conflicts_and_bad_checkpoints_are_explained_in_flags(tmp_path, crops, capsys):
    db = str(tmp_path / "g.db")
    assert main(["gallery", "enrol", "Ann", crops[0], "--db", db, "--tiny", "-q"]) == 0
    assert main(["gallery", "export", str(tmp_path / "g.npz"), "--db", db]) == 0
    capsys.readouterr()
    assert main(["gallery", "import", str(tmp_path / "g.npz"), "--db", db]) == 2
    err = capsys.readouterr().err
    assert "already in" in err and "Ann" in err and "--on-conflict skip" in err and "on_conflict=" not in err
    assert main(["gallery", "import", str(tmp_path / "g.npz"), "--db", db, "--on-conflict", "merge"]) == 0
    capsys.readouterr()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert main(["gallery", "enrol", "Cy", crops[2], "--db", str(tmp_path / "c.db"), "--model", "lvface_t",
                 "--checkpoint", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and len(_lines(err)) == 1
    assert main(["embed", crops[2], "--checkpoint", str(folder), "-o", str(tmp_path / "e.npz")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and len(_lines(err)) == 1


class _Terminal:
    """A stderr that says it is a terminal, so tqdm draws its bar into it."""

    def __init__(self) -> None:
        import io

        self.buffer = io.StringIO()

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_never_with_quiet(tmp_path, crops, monkeypatch, capsys):
    db = str(tmp_path / "g.db")
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["gallery", "enrol", "Ann", *crops, "--db", db, "--tiny"]) == 0
    assert "enrol Ann:" in terminal.buffer.getvalue() and "/3 [" in terminal.buffer.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert main(["gallery", "enrol", "Bo", *crops, "--db", db, "-q"]) == 0
    assert "enrol Bo" not in quiet.buffer.getvalue()
    monkeypatch.undo()
    assert main(["gallery", "identify", *crops, "--db", db]) == 0  # stderr is not a terminal under pytest
    assert "identify" not in capsys.readouterr().err


def test_calibrate_from_a_folder_saves_the_threshold_with_its_encoder(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for person in ("ann", "bo", "cy"):
        (tmp_path / "people" / person).mkdir(parents=True)
        base = rng.integers(0, 256, (112, 112, 3))
        for i in range(2):  # two noisy copies of one random "face" per person
            noisy = np.clip(base + rng.integers(-10, 11, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(tmp_path / "people" / person / f"{i}.png")
    db = str(tmp_path / "g.db")
    assert main(["gallery", "calibrate", "--folder", str(tmp_path / "people"), "--far", "0.5", "--save",
                 "--db", db, "--tiny", "--seed", "2", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["num_genuine"] == 3 and result["num_impostor"] == 12
    from lvface_mm.gallery import Gallery

    with Gallery(db, create=False) as g:
        assert g.threshold == pytest.approx(result["threshold"])
        assert g.encoder == {"model": "lvface_tiny", "tiny": True, "seed": 2}


def test_a_remembered_checkpoint_is_checked_by_its_bytes(tmp_path, crops, capsys):
    import torch

    from lvface_mm.models import create_model

    torch.manual_seed(5)
    ckpt = tmp_path / "mine.pt"
    torch.save(create_model("lvface_tiny").state_dict(), ckpt)
    db = str(tmp_path / "g.db")
    assert main(["gallery", "enrol", "Ann", crops[0], "--db", db, "--model", "lvface_tiny", "--checkpoint", str(ckpt),
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["gallery", "identify", crops[0], "--db", db, "--json", "-q"]) == 0  # the checkpoint, remembered
    assert json.loads(capsys.readouterr().out)["score"] > 0.999
    moved = tmp_path / "moved.pt"
    ckpt.rename(moved)
    assert main(["gallery", "identify", crops[0], "--db", db, "-q"]) == 2
    assert "is no longer there" in capsys.readouterr().err
    assert main(["gallery", "identify", crops[0], "--db", db, "--model", "lvface_tiny", "--checkpoint", str(moved),
                 "--json", "-q"]) == 0  # same bytes elsewhere: fine
    assert json.loads(capsys.readouterr().out)["name"] == "Ann"
    torch.manual_seed(6)
    torch.save(create_model("lvface_tiny").state_dict(), moved)  # other weights under the same name
    assert main(["gallery", "identify", crops[0], "--db", db, "--model", "lvface_tiny", "--checkpoint", str(moved),
                 "-q"]) == 2
    assert "not comparable" in capsys.readouterr().err
