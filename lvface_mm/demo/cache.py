"""The demo's file cache: where uploads land and result thumbnails are written, and how it is emptied.

Gradio writes uploads (and any array returned to an image component) into its cache folder
(`GRADIO_TEMP_DIR`, default /tmp/gradio, shared by every Gradio app on the machine). Two problems
with the defaults, both measured under load (benchmarks/results/demo.md):

- a returned array is saved under a hash of its pixels, so two users running the same search write
  the same file while it is being served, and some downloads come back truncated;
- an upload cut off mid-transfer leaves its temporary file behind, outside what `delete_cache`
  tracks, so the folder grows without bound.

So the launcher gives each demo its own cache folder (`private_cache_dir`), `write_result_image`
writes every thumbnail under a fresh name (written aside, then renamed into place), and
`CacheSweeper` deletes whatever in that folder is older than the promised age.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

__all__ = ["CacheSweeper", "private_cache_dir", "sweep", "write_result_image"]

RESULTS_FOLDER = "lvface-results"


def private_cache_dir(prefix: str = "lvface-demo-") -> Path:
    """A new folder under the system temp dir, readable by this user only."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def write_result_image(image: np.ndarray, cache_dir: str | Path, stem: str = "result", quality: int = 88) -> str:
    """Save an (H, W, 3) uint8 RGB image as JPEG under a name no other request uses; returns the path.

    The bytes go to a hidden staging file first and are renamed into place, so a reader never sees
    a half-written file."""
    from PIL import Image

    folder = Path(cache_dir) / RESULTS_FOLDER / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    target = folder / f"{stem}.jpg"
    staging = folder / f".{stem}.jpg.part"
    staging.write_bytes(buffer.getvalue())
    os.replace(staging, target)
    return str(target)


def sweep(root: str | Path, max_age_s: float, now: float | None = None) -> int:
    """Delete files under `root` not modified for `max_age_s` seconds, then the empty folders they
    leave; returns the number of files deleted. Files being written keep a fresh mtime, so an upload
    in progress is never taken."""
    root = Path(root)
    now = time.time() if now is None else now
    deleted = 0
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                if now - path.lstat().st_mtime > max_age_s:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                continue  # removed by Gradio's own cleanup meanwhile
        # Bottom-up, so its subfolders were handled first; a folder touched recently may be about to
        # receive a file (Gradio makes the folder, then writes), so only old empty ones go.
        if Path(dirpath) != root:
            _remove_if_empty(Path(dirpath), now - max_age_s)
    return deleted


def _remove_if_empty(folder: Path, older_than: float) -> None:
    try:
        if folder.lstat().st_mtime < older_than:
            folder.rmdir()
    except OSError:
        pass  # not empty, or gone


class CacheSweeper:
    """A daemon thread that runs `sweep(root, max_age_s)` every `every_s` seconds until `stop()`;
    `stop(remove=True)` also deletes the folder (the demo owns it)."""

    def __init__(self, root: str | Path, max_age_s: float, every_s: float) -> None:
        if max_age_s <= 0 or every_s <= 0:
            raise ValueError(f"CacheSweeper: max_age_s={max_age_s!r} and every_s={every_s!r} must be positive")
        self.root = Path(root)
        self.max_age_s = max_age_s
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> CacheSweeper:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lvface-demo-cache-sweeper", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.root.is_dir():
                sweep(self.root, self.max_age_s)

    def stop(self, remove: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
