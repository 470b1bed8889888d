"""What a new user sees: --version, help without developer notes, exit statuses as documented, and
one actionable line (in flags, not Python calls) for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvface_mm import __version__
from lvface_mm.cli import main


class _Payload:
    """Pickles as a call to print: a stand-in for a checkpoint that would run code when loaded."""

    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


@pytest.fixture
def crop(tmp_path) -> str:
    path = tmp_path / "crop.png"  # 112x112: taken as an aligned face, no detector needed
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
    return str(path)


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lvface-mm {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "own module" not in text and "add_arguments" not in text  # no developer notes
    assert "exit status:" in text and "2    usage error" in text and "COMMAND --help" in text
    with pytest.raises(SystemExit):
        main(["gallery", "--help"])
    text = capsys.readouterr().out
    assert "lvface-mm gallery enrol Alice" in text and "exit status:" in text
    assert "__future__" not in text and "imported lazily" not in text


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as done:
        main(["embed"])  # argparse: missing argument
    assert done.value.code == 2
    with pytest.raises(SystemExit) as done:
        main(["nosuchcommand"])
    assert done.value.code == 2


def test_checkpoint_messages_are_one_line_in_cli_terms(tmp_path, crop, capsys):
    out = tmp_path / "out.npz"
    common = [crop, "--assume-aligned", "yes", "-o", str(out)]
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload()}, evil)
    assert main(["embed", *common, "--model", "lvface_tiny", "--checkpoint", str(evil)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "refused: it contains code" in err[0] and "print" in err[0]
    assert "weights_only" not in err[0] and "corrupt" not in err[0]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world" * 10)  # torch's weights-only loader says only "KeyError: 101" here
    assert main(["embed", *common, "--model", "lvface_tiny", "--checkpoint", str(junk)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "not a readable PyTorch checkpoint" in err[0] and "101" not in err[0]
    tiny = tmp_path / "tiny.pt"
    from lvface_mm.models import create_model

    torch.save(create_model("lvface_tiny").state_dict(), tiny)
    assert main(["embed", *common, "--model", "lvface_t", "--checkpoint", str(tiny)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "pass --model lvface_tiny" in err[0] and "create_model(" not in err[0]
    assert main(["export-onnx", "--model", "lvface_t", "--checkpoint", str(tiny), "-o", str(tmp_path / "t.onnx")]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].endswith("pass --model lvface_tiny.")
    assert not out.exists() and not (tmp_path / "t.onnx").exists()


def test_verify_json_reports_errors_as_json(tmp_path, crop, capsys):
    assert main(["verify", crop, str(tmp_path / "gone.jpg"), "--tiny", "--assume-aligned", "yes", "--json"]) == 1
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["exit_status"] == 1 and "gone.jpg" in record["error"] and record["b"].endswith("gone.jpg")
    assert main(["verify", crop, crop, "--tiny", "--threshold", "2", "--json"]) == 2
    assert "threshold" in json.loads(capsys.readouterr().out)["error"]


def test_embed_says_where_it_wrote_and_writes_nothing_when_all_inputs_fail(tmp_path, crop, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["embed", crop, "--tiny", "-q"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'embeddings.npz'}" in err and "-o" in err
    assert np.load(tmp_path / "embeddings.npz")["embeddings"].shape == (1, 512)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["embed", str(bad), str(tmp_path / "missing.jpg"), "--tiny", "-q", "-o", "all_bad.npz"]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "all_bad.npz").exists()


def test_max_pixels_is_the_flag_the_message_names(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    assert main(["embed", str(big), "--tiny", "--max-pixels", "1000", "-o", str(tmp_path / "x.npz")]) == 2
    assert "raise --max-pixels" in capsys.readouterr().err
    assert main(["embed", str(big), "--tiny", "--max-pixels", "100000", "--assume-aligned", "yes",
                 "-o", str(tmp_path / "y.npz")]) == 0


def test_build_vqa_leaves_nothing_behind_when_it_fails(tmp_path, capsys):
    out = tmp_path / "vqa"
    argv = ["build-vqa", "--source", "synthetic", "--num-identities", "3", "--photos-per-identity", "2",
            "--out", str(out)]
    assert main(argv) == 2  # too few identities, found after the crops were drawn into out/crops
    assert "identities" in capsys.readouterr().err
    assert not out.exists()
    existing = tmp_path / "mine"
    (existing / "keep").mkdir(parents=True)
    (existing / "keep" / "notes.txt").write_text("mine")
    assert main([*argv[:-1], str(existing)]) == 2
    assert sorted(str(p.relative_to(existing)) for p in existing.rglob("*")) == ["keep", str(Path("keep/notes.txt"))]
