"""`lvface-mm pack` with its default worker threads on unaligned photos: dlib detectors are not
thread-safe, and four threads sharing one crashed the process (segfault). Run in a child process so a
crash fails this test instead of killing the test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests._faces_fixtures import PORTRAITS, needs_dlib, portrait_path


@needs_dlib()
def test_pack_detects_with_several_workers_without_crashing(tmp_path):
    for i, name in enumerate(PORTRAITS):
        folder = tmp_path / "photos" / ("obama" if name.startswith("obama") else name)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(portrait_path(name), folder / f"{i}.jpg")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "lvface_mm", "pack", str(tmp_path / "photos"), str(tmp_path / "out"),
                           "--quiet", "--workers", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert f"{len(PORTRAITS)} images, 2 identities" in done.stdout
