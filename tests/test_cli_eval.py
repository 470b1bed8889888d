"""`lvface-mm eval verify|ijb` end to end on the tiny model: reports, plots, caches, errors."""

from __future__ import annotations

import importlib.util
import json
import pickle

import pytest
import torch

from lvface_mm.cli import build_parser, main
from lvface_mm.data import write_verification_bin
from lvface_mm.models import create_model
from tests._datasets_and_eval_fixtures import jpeg_bytes, pattern_image, write_ijb_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def small_bin(tmp_path):
    # 20 pairs: genuine pairs are the same picture, impostors two different pictures.
    pairs = []
    for i in range(20):
        a = jpeg_bytes(pattern_image(i))
        pairs.append((a, a if i % 2 == 0 else jpeg_bytes(pattern_image(500 + i)), i % 2 == 0))
    return write_verification_bin(tmp_path / "tiny_lfw.bin", pairs)


def test_eval_subcommands_registered():
    eval_parser = next(
        a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "eval"
    )[1]
    choices = eval_parser._subparsers._group_actions[0].choices
    assert {"verify", "ijb"} <= set(choices)
    # vqa is another module; it is offered exactly when that module exists in this checkout.
    assert ("vqa" in choices) == (importlib.util.find_spec("lvface_mm.cli.eval_vqa") is not None)


def test_eval_verify_two_models_report_plot_and_cache(tmp_path, small_bin, capsys):
    torch.manual_seed(1)
    ckpt = tmp_path / "other_tiny.pt"
    torch.save(create_model("lvface_tiny").state_dict(), ckpt)
    argv = ["eval", "verify", "--bin", str(small_bin), "--model", "lvface_tiny", "--random-weights",
            "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--quiet", "--batch-size", "64",
            "--far", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny_lfw: 20 pairs (10 genuine), 40 images" in printed
    assert "[tiny_lfw] lvface_tiny: Accuracy-Flip" in printed and "[tiny_lfw] other_tiny: Accuracy-Flip" in printed
    report = json.loads((tmp_path / "out" / "verify_report.json").read_text())
    results = report["sets"]["tiny_lfw"]["results"]
    assert set(results) == {"lvface_tiny", "other_tiny"}
    assert report["models"]["other_tiny"]["source"] == f"lvface_tiny from {ckpt}"
    # Genuine pairs are identical pictures: distance 0, so every fold separates them perfectly.
    assert results["lvface_tiny"]["accuracy_flip"]["mean"] == 1.0
    assert len(results["lvface_tiny"]["accuracy"]["folds"]) == 10
    assert results["lvface_tiny"]["tar_at_far"][0]["far"] == 0.1
    plot = tmp_path / "out" / "roc_tiny_lfw.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    caches = sorted((tmp_path / "out" / "cache").glob("*.npy"))
    assert len(caches) == 2
    # Rerun: same numbers, served from the cache (the cache files are not rewritten).
    stamps = [p.stat().st_mtime_ns for p in caches]
    assert main(argv) == 0
    again = json.loads((tmp_path / "out" / "verify_report.json").read_text())["sets"]["tiny_lfw"]["results"]
    assert again == results
    assert [p.stat().st_mtime_ns for p in caches] == stamps


def test_eval_verify_refuses_malicious_bin(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil(), b""], [True])))
    code = main(["eval", "verify", "--bin", str(evil), "--model", "lvface_tiny", "--random-weights",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_eval_verify_errors_are_clear(tmp_path, small_bin, capsys):
    base = ["eval", "verify", "--bin", str(small_bin), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base) == 2
    assert "give at least one --model" in capsys.readouterr().err
    assert main([*base, "--model", "lvface_tiny"]) == 2
    assert "no official weights; add --random-weights" in capsys.readouterr().err
    assert main([*base, "--model", "lvface_nope", "--random-weights"]) == 2
    assert "unknown model 'lvface_nope'" in capsys.readouterr().err
    assert main(["eval", "verify", "--bin", str(tmp_path / "missing.bin"), "--model", "lvface_tiny",
                 "--random-weights", "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_ijb_cli(tmp_path, capsys):
    expected = write_ijb_folder(tmp_path / "IJB", "IJBC")
    argv = ["eval", "ijb", "--root", str(tmp_path / "IJB"), "--target", "ijbc", "--model", "lvface_tiny",
            "--random-weights", "--out", str(tmp_path / "out"), "--quiet", "--batch-size", "64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"templates: {expected['templates']}" in printed
    assert f"pairs: {expected['pairs']}  (full protocol: 15,658,489)" in printed
    assert "1:N rank-1 100.00" in printed
    report = json.loads((tmp_path / "out" / "ijb_IJBC_report.json").read_text())
    assert report["counts"]["genuine"] == expected["genuine"]
    tar = report["models"]["lvface_tiny"]["verification_1to1"]["tar_at_far"]
    assert [t["far"] for t in tar] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert report["models"]["lvface_tiny"]["identification_1toN"]["rank_accuracy"]["rank1"] == 1.0
    assert (tmp_path / "out" / "roc_IJBC.png").read_bytes()[:8] == PNG_MAGIC
    # Another scoring mode reuses the cached embeddings instead of recomputing them.
    cache = next((tmp_path / "out" / "cache").glob("*.npy"))
    stamp = cache.stat().st_mtime_ns
    assert main([*argv, "--no-flip", "--no-detector-score"]) == 0
    assert cache.stat().st_mtime_ns == stamp
    report = json.loads((tmp_path / "out" / "ijb_IJBC_report.json").read_text())
    assert report["mode"] == {"flip_sum": False, "detector_score_weighting": False, "normalize_images": False}
    assert main(["eval", "ijb", "--root", str(tmp_path / "nowhere"), "--model", "lvface_tiny",
                 "--random-weights", "--quiet"]) == 2
    assert "no IJB meta folder" in capsys.readouterr().err
