"""Folder-per-identity image trees: `root/<identity>/<image>`.

The listing is deterministic (identities and files sorted by name), so the class ids it assigns
are the same on every machine; packing and evaluation both use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class IdentityFolder:
    """The images of one identity tree.

    Attributes:
        root: the tree's root directory.
        identities: identity (sub-folder) names; class id = position in this tuple.
        samples: (path, class id) for every image, grouped by identity, sorted by file name.
    """

    root: Path
    identities: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.samples)

    def groups(self) -> Iterator[tuple[int, list[Path]]]:
        """(class id, its image paths) in class order; one pass over the samples."""
        for label, items in itertools.groupby(self.samples, key=lambda sample: sample[1]):
            yield label, [path for path, _ in items]


def list_identity_folder(
    root: str | Path,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    min_images: int = 1,
) -> IdentityFolder:
    """List `root/<identity>/<image>` files.

    Args:
        root: directory whose sub-directories are identities. Images directly under `root` and
            hidden entries (starting with ".") are ignored; nested sub-folders are searched.
        extensions: file suffixes counted as images (case-insensitive).
        min_images: identities with fewer images are left out (and get no class id).

    Raises:
        FileNotFoundError: `root` is not a directory.
        ValueError: no identity folder holds an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identity folder not found: {root} (expected root/<identity>/<image files>)")
    suffixes = {e.lower() for e in extensions}
    identities: list[str] = []
    samples: list[tuple[Path, int]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and _visible_file(p, folder))
        if len(files) < max(min_images, 1):
            continue
        label = len(identities)
        identities.append(folder.name)
        samples.extend((path, label) for path in files)
    if not samples:
        raise ValueError(
            f"{root}: no images found in identity sub-folders (expected root/<identity>/<image> with one of "
            f"{', '.join(sorted(suffixes))})"
        )
    return IdentityFolder(root, tuple(identities), tuple(samples))


def _visible_file(path: Path, folder: Path) -> bool:
    return path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
