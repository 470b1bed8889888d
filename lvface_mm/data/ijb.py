"""IJB-B / IJB-C in InsightFace's release layout: protocol files and aligned face crops.

Expected folder (`root` may be the parent, with `<target>/` inside, or the target folder itself):

    IJBC/
      loose_crop/<image name>                 loosely cropped faces (NIST licence)
      meta/ijbc_face_tid_mid.txt              "<image name> <template id> <media id>" per image
      meta/ijbc_template_pair_label.txt       "<template 1> <template 2> <1 genuine | 0 impostor>"
      meta/ijbc_name_5pts_score.txt           "<image name> x1 y1 ... x5 y5 <detector score>"
      meta/ijbc_1N_gallery_G1.csv             1:N (optional): header row, then
      meta/ijbc_1N_gallery_G2.csv               TEMPLATE_ID,SUBJECT_ID,FILENAME,... per image
      meta/ijbc_1N_probe_mixed.csv

IJB-B uses the `ijbb_` prefix and galleries `ijbb_1N_gallery_S1.csv` / `_S2.csv`. The 1:N CSVs
are NIST's protocol files; template ids are shared with the 1:1 meta files, so the template
features computed for 1:1 serve both protocols.

What differs from InsightFace's scripts and why: landmarks and scores are joined to images by
name, not by line order, and every count is checked, so a partial download fails loudly.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._text import read_int_table

IJB_TARGETS = ("IJBB", "IJBC")
_ONE_TO_N_FILES = {
    "IJBB": (("S1", "ijbb_1N_gallery_S1.csv"), ("S2", "ijbb_1N_gallery_S2.csv"), "ijbb_1N_probe_mixed.csv"),
    "IJBC": (("G1", "ijbc_1N_gallery_G1.csv"), ("G2", "ijbc_1N_gallery_G2.csv"), "ijbc_1N_probe_mixed.csv"),
}

# Sizes of the full protocols, shown next to what was loaded. IJB-B from logs quoted in InsightFace
# issues/PRs; IJB-C 1:1 is the commonly cited count (not checked against a primary source).
PUBLISHED_COUNTS: dict[str, dict[str, int]] = {
    "IJBB": {"images": 227_630, "templates": 12_115, "pairs": 8_010_270, "genuine": 10_270},
    "IJBC": {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557,
             "gallery_templates": 3_531, "probe_templates": 19_593},
}


@dataclass(frozen=True)
class TemplateSet:
    """Templates of one 1:N gallery or probe set.

    Attributes:
        name: "G1", "G2", "S1", "S2" or "probe".
        templates: (T,) int64 unique template ids, sorted.
        subjects: (T,) int64 subject id of each template.
    """

    name: str
    templates: np.ndarray
    subjects: np.ndarray


@dataclass(frozen=True)
class IJBProtocol:
    """Everything an IJB evaluation needs, one row per face image.

    Attributes:
        target: "IJBB" or "IJBC".
        image_dir: folder of the loose crops.
        image_names: (N,) image file names.
        landmarks: (N, 5, 2) float32 five points in loose-crop pixels.
        scores: (N,) float32 detector (faceness) scores.
        templates: (N,) int64 template id of each image.
        medias: (N,) int64 media (photo or video) id of each image.
        pairs: (P, 2) int64 template ids of the 1:1 pairs.
        labels: (P,) int8, 1 genuine, 0 impostor.
        galleries: the two 1:N galleries (empty when the CSVs are absent).
        probes: the 1:N mixed probe set, or None.
    """

    target: str
    image_dir: Path
    image_names: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    galleries: tuple[TemplateSet, ...] = ()
    probes: TemplateSet | None = None

    def counts(self) -> dict[str, int]:
        """Sizes of what was loaded (the run prints them so a user sees the protocol loaded whole)."""
        out = {
            "images": len(self.image_names),
            "templates": len(np.unique(self.templates)),
            "medias": len(np.unique(self.medias)),
            "pairs": len(self.labels),
            "genuine": int((self.labels == 1).sum()),
            "impostor": int((self.labels == 0).sum()),
        }
        if self.galleries:
            out["gallery_templates"] = sum(len(g.templates) for g in self.galleries)
            for g in self.galleries:
                out[f"gallery_{g.name}_templates"] = len(g.templates)
        if self.probes is not None:
            out["probe_templates"] = len(self.probes.templates)
        return out


def resolve_ijb_dir(root: str | Path, target: str) -> Path:
    """`root/<target>` if it has `meta/`, else `root` itself if it has `meta/`."""
    target = _check_target(target)
    root = Path(root)
    for candidate in (root / target, root):
        if (candidate / "meta").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no IJB meta folder under {root}: expected {root / target / 'meta'} or {root / 'meta'} holding "
        f"{target.lower()}_face_tid_mid.txt, {target.lower()}_template_pair_label.txt and "
        f"{target.lower()}_name_5pts_score.txt (InsightFace's IJB_release layout)"
    )


def load_ijb(root: str | Path, target: str = "IJBC", one_to_n: bool = True) -> IJBProtocol:
    """Read and cross-check the protocol files of IJB-B or IJB-C.

    Args:
        root: the IJB folder (see module docstring).
        target: "IJBB" or "IJBC".
        one_to_n: also read the 1:N gallery/probe CSVs when present.

    Raises:
        FileNotFoundError: a required file is missing (the message lists what is expected).
        ValueError: a malformed line (file and line number named), or files that disagree (an image
            without landmarks, a pair naming an unknown template).
    """
    target = _check_target(target)
    base = resolve_ijb_dir(root, target)
    meta, prefix = base / "meta", target.lower()
    names, tid_mid = _read_name_table(meta / f"{prefix}_face_tid_mid.txt", numeric_columns=2)
    lm_names, lm_rows = _read_name_table(meta / f"{prefix}_name_5pts_score.txt", numeric_columns=11)
    pair_rows = read_int_table(_require(meta / f"{prefix}_template_pair_label.txt"), columns=3)

    # Join landmarks to images by name (InsightFace's scripts assume the two files share line order).
    row_of = {name: i for i, name in enumerate(lm_names.tolist())}
    missing = [n for n in names.tolist() if n not in row_of]
    if missing:
        raise ValueError(
            f"{meta / f'{prefix}_name_5pts_score.txt'}: no landmarks for {len(missing)} images listed in "
            f"{prefix}_face_tid_mid.txt (first: {missing[0]})"
        )
    rows = lm_rows[np.fromiter((row_of[n] for n in names.tolist()), dtype=np.int64, count=len(names))]
    templates = tid_mid[:, 0].astype(np.int64)
    labels = pair_rows[:, 2]
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{meta / f'{prefix}_template_pair_label.txt'}: labels must be 0 or 1")
    unknown = ~np.isin(pair_rows[:, :2], templates)
    if unknown.any():
        raise ValueError(
            f"{meta / f'{prefix}_template_pair_label.txt'}: pair template {int(pair_rows[:, :2][unknown][0])} has "
            f"no images in {prefix}_face_tid_mid.txt"
        )
    galleries, probes = _read_one_to_n(meta, target, templates) if one_to_n else ((), None)
    image_dir = base / "loose_crop"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"IJB images not found: {image_dir} (the loose crops of {target})")
    return IJBProtocol(
        target=target,
        image_dir=image_dir,
        image_names=names,
        landmarks=rows[:, :10].astype(np.float32).reshape(-1, 5, 2),
        scores=rows[:, 10].astype(np.float32),
        templates=templates,
        medias=tid_mid[:, 1].astype(np.int64),
        pairs=pair_rows[:, :2].astype(np.int64),
        labels=labels.astype(np.int8),
        galleries=galleries,
        probes=probes,
    )


class IJBAlignedFaces:
    """Image `i` of a protocol aligned to the ArcFace 112x112 template from its given landmarks.

    A map-style dataset (len / getitem), usable with a DataLoader. Items are (112, 112, 3) uint8 RGB.
    """

    def __init__(self, protocol: IJBProtocol, image_size: int = 112) -> None:
        self.protocol = protocol
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.protocol.image_names)

    def __getitem__(self, index: int) -> np.ndarray:
        import cv2

        from ..faces.alignment import align_face

        path = self.protocol.image_dir / str(self.protocol.image_names[index])
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"IJB image missing or unreadable: {path}")
        return align_face(np.ascontiguousarray(bgr[:, :, ::-1]), self.protocol.landmarks[index], self.image_size)


# -- parsing -------------------------------------------------------------------------------------------


def _check_target(target: str) -> str:
    upper = target.upper().replace("-", "")
    if upper not in IJB_TARGETS:
        raise ValueError(f"IJB target must be one of {', '.join(IJB_TARGETS)}, got {target!r}")
    return upper


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"IJB protocol file not found: {path}")
    return path


def _read_name_table(path: Path, numeric_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Lines of "<name> <number> ..." -> (names, (N, numeric_columns) float64)."""
    names: list[str] = []
    values: list[list[float]] = []
    with open(_require(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != numeric_columns + 1:
                    raise ValueError
                values.append([float(v) for v in fields[1:]])
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected a name and {numeric_columns} numbers, got {line.strip()!r}"
                ) from None
            names.append(fields[0])
    if not names:
        raise ValueError(f"{path}: the file is empty")
    return np.asarray(names), np.asarray(values, dtype=np.float64)


def _read_template_csv(path: Path, name: str) -> TemplateSet:
    """A NIST 1:N CSV (header TEMPLATE_ID,SUBJECT_ID,..., one row per image) -> unique templates."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: the file is empty")
    header = [c.strip().upper() for c in rows[0]]
    if "TEMPLATE_ID" in header and "SUBJECT_ID" in header:
        t_col, s_col, body, first = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID"), rows[1:], 2
    else:  # no header: the first two columns, as InsightFace's scripts read them
        t_col, s_col, body, first = 0, 1, rows, 1
    pairs = np.zeros((len(body), 2), dtype=np.int64)
    for i, row in enumerate(body):
        try:
            pairs[i] = int(row[t_col]), int(row[s_col])
        except (ValueError, IndexError):
            raise ValueError(
                f"{path}:{i + first}: expected integer TEMPLATE_ID and SUBJECT_ID, got {','.join(row)[:80]!r}"
            ) from None
    templates, index = np.unique(pairs[:, 0], return_index=True)
    subjects = pairs[index, 1]
    # A template belongs to one subject; anything else is a corrupt file.
    conflict = pairs[:, 1] != subjects[np.searchsorted(templates, pairs[:, 0])]
    if conflict.any():
        t = int(pairs[conflict][0, 0])
        raise ValueError(f"{path}: template {t} is listed with more than one SUBJECT_ID")
    return TemplateSet(name, templates, subjects)


def _read_one_to_n(
    meta: Path, target: str, known_templates: np.ndarray
) -> tuple[tuple[TemplateSet, ...], TemplateSet | None]:
    (g1_name, g1_file), (g2_name, g2_file), probe_file = _ONE_TO_N_FILES[target]
    paths = [meta / g1_file, meta / g2_file, meta / probe_file]
    present = [p.is_file() for p in paths]
    if not any(present):
        return (), None
    if not all(present):
        missing = [str(p) for p, ok in zip(paths, present) if not ok]
        raise FileNotFoundError(f"incomplete 1:N protocol: missing {', '.join(missing)}")
    sets = [_read_template_csv(paths[0], g1_name), _read_template_csv(paths[1], g2_name),
            _read_template_csv(paths[2], "probe")]
    for path, ts in zip(paths, sets):
        unknown = ~np.isin(ts.templates, known_templates)
        if unknown.any():
            raise ValueError(
                f"{path}: template {int(ts.templates[unknown][0])} has no images in {target.lower()}_face_tid_mid.txt"
            )
    return (sets[0], sets[1]), sets[2]
