"""Test photos for the indexing benchmarks: the committed portraits, mirrored and slightly rotated
into as many distinct files as asked."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORTRAITS = [ROOT / "tests" / "data" / "portraits" / f"{n}.jpg" for n in ("obama", "obama2", "obama3", "biden")]


def make_photos(folder: Path, n: int) -> None:
    """Write `n` JPEGs p000.jpg ... into the new folder `folder`."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):  # distinct bytes per file, or the hash check would skip them
        with Image.open(PORTRAITS[i % len(PORTRAITS)]) as im:
            im = im.convert("RGB")
            if (i // len(PORTRAITS)) % 2:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im.rotate(i // (2 * len(PORTRAITS)), fillcolor=(128, 128, 128)).save(folder / f"p{i:03d}.jpg", quality=90)
