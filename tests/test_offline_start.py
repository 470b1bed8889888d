"""No network: loading official weights stops within seconds with one message naming the files and
HF_HUB_OFFLINE=1, instead of half a minute of hub retries. Run in a child process whose environment
points the Hub at a closed local port, with HF_HUB_OFFLINE unset (the suite sets it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = r"""
import contextlib, io, json, sys, time
out = {}
from lvface_mm.models import create_model
from lvface_mm.models.pretrained import WeightsNotAvailableError, hub_reachable
out["reachable"] = hub_reachable()
t = time.monotonic()
try:
    create_model("lvface_t", pretrained=True)
except WeightsNotAvailableError as exc:
    out["lvface"] = [time.monotonic() - t, str(exc)]
import open_clip  # imported before the clock starts: its import alone is seconds on a busy machine
from lvface_mm.gallery.clip import ClipEncoder
t = time.monotonic()
try:
    ClipEncoder.from_pretrained()
except WeightsNotAvailableError as exc:
    out["clip"] = [time.monotonic() - t, str(exc)]
from lvface_mm.cli import main
import lvface_mm.faces  # likewise: the clock measures waiting for the network, not imports
err = io.StringIO()
t = time.monotonic()
with contextlib.redirect_stderr(err):
    rc = main(["embed", sys.argv[1], "--model", "lvface_t", "--backend", "torch", "-o", sys.argv[2]])
out["cli"] = [time.monotonic() - t, err.getvalue(), rc]
print(json.dumps(out))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_unreachable_hub_fails_fast_naming_files_and_offline_switch(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    from PIL import Image

    Image.new("RGB", (112, 112), (120, 90, 60)).save(tmp_path / "face.png")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "face.png"), str(tmp_path / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["reachable"] is False
    seconds, message = out["lvface"]
    assert seconds < 5, seconds
    assert "cannot be reached" in message and "HF_HUB_OFFLINE=1" in message
    assert "LVFace-T_Glint360K/LVFace-T_Glint360K.pt" in message
    seconds, message = out["clip"]
    assert seconds < 5, seconds
    assert "HF_HUB_OFFLINE=1" in message and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    seconds, err, rc = out["cli"]
    assert seconds < 5 and rc == 2, (seconds, rc, err)
    assert "HF_HUB_OFFLINE=1" in err and "LVFace-T_Glint360K.pt" in err and "--checkpoint" in err
    assert "Retrying" not in done.stderr + err and "Traceback" not in err
    assert not (tmp_path / "out.npz").exists()


def test_hub_reachable_checks_a_connection_and_ensure_names_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from lvface_mm.models import pretrained

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert pretrained.hub_reachable(1.0, endpoint=f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not pretrained.hub_reachable(1.0, endpoint=f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(pretrained, "hub_offline", lambda: False)
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(pretrained.WeightsNotAvailableError, match=r"not in the local cache: a/b\.bin, c\.bin.*"
                                                                  r"HF_HUB_OFFLINE=1"):
        pretrained.ensure_hub_reachable(["a/b.bin", "c.bin"])
    monkeypatch.setattr(pretrained, "hub_offline", lambda: True)  # offline mode: the libraries fail fast alone
    pretrained.ensure_hub_reachable(["a/b.bin"])
