"""A bad local CLIP weights file (``--clip-pretrained FILE``) is one clear ValueError, never a torch
traceback or torch's advice to load the file with weights_only=False."""

from __future__ import annotations

import pytest
import torch

from lvface_mm.gallery.workbench import PartUnavailable, Workbench, WorkbenchConfig


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_junk_and_code_carrying_clip_files_are_refused_in_one_line(tmp_path):
    pytest.importorskip("open_clip")
    from lvface_mm.gallery.clip import ClipConfig, ClipEncoder

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk" * 50)
    with pytest.raises(ValueError, match=r"junk\.bin: not a usable ViT-B-32 checkpoint \(unrecognised content\)"):
        ClipEncoder.from_pretrained(ClipConfig("ViT-B-32", str(junk)))
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload()}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt: refused: it contains code \(a reference to print\)") as info:
        ClipEncoder.from_pretrained(ClipConfig("ViT-B-32", str(evil)))
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    # the demo's logic turns it into one unavailable part, not a crash
    wb = Workbench(WorkbenchConfig(db=str(tmp_path / "d.db"), clip_pretrained=str(junk)))
    with pytest.raises(PartUnavailable, match="CLIP unavailable: CLIP weights .*junk.bin"):
        _ = wb.clip
