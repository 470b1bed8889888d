"""Data builders shared by the dataset and evaluation tests: small synthetic images, identity
folders, verification .bin files and an IJB-style folder. Everything is generated, deterministic
and small."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lvface_mm.models.pretrained import ARCFACE_TEMPLATE_112


def pattern_image(seed: int, size: int = 112) -> np.ndarray:
    """A smooth random colour pattern (H, W, 3) uint8 RGB; distinct seeds give distinct images."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 6, 3)).astype(np.uint8)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def write_identity_tree(root: Path, identities: int = 3, per_identity: int = 3, size: int = 112) -> Path:
    """root/id_k/img_j.{jpg,png}: aligned-size crops, one PNG per identity to cover both formats."""
    for k in range(identities):
        folder = root / f"id_{k:02d}"
        folder.mkdir(parents=True)
        for j in range(per_identity):
            image = pattern_image(100 * k + j, size)
            if j == per_identity - 1:
                (folder / f"img_{j}.png").write_bytes(png_bytes(image))
            else:
                (folder / f"img_{j}.jpg").write_bytes(jpeg_bytes(image))
    return root


def write_ijb_folder(root: Path, target: str = "IJBC", subjects: int = 6, with_one_to_n: bool = True) -> dict:
    """A miniature IJB release: loose crops, the three meta files and the 1:N CSVs.

    Every image of a subject is the same picture with the same landmarks, so any encoder gives
    genuine template scores of exactly 1 and the protocol's answers are known: TAR 1 at every
    measurable FAR, rank-1 1, TPIR 1.
    Subjects alternate between gallery 1 and gallery 2; each subject has one gallery template and
    two probe templates (one with two images from one media, one with images from two media).
    """
    prefix = target.lower()
    base = root / target
    (base / "loose_crop").mkdir(parents=True)
    (base / "meta").mkdir(parents=True)
    offset = np.array([19.0, 17.0])
    landmarks = np.asarray(ARCFACE_TEMPLATE_112) * 1.1 + offset  # face inside a 150x150 loose crop
    tid_mid, name_lm, gallery = [], [], {1: [], 2: []}
    probes = []
    template = 0
    media = 1000
    img = 0
    for s in range(subjects):
        picture = pattern_image(7000 + s, 150)
        layout = [(1, "gallery"), (2, "probe"), (2, "probe-2media")]
        for count, role in layout:
            template += 1
            for i in range(count):
                img += 1
                name = f"{img}.jpg"
                cv2.imwrite(str(base / "loose_crop" / name), picture[:, :, ::-1])
                m = media + (i if role == "probe-2media" else 0)
                tid_mid.append(f"{name} {template} {m}")
                pts = " ".join(f"{v:.4f}" for v in landmarks.reshape(-1))
                name_lm.append(f"{name} {pts} {0.5 + 0.5 * ((img % 3) / 2):.3f}")
                row = f"{template},{s + 1},img/{name},0"
                if role == "gallery":
                    gallery[1 + s % 2].append(row)
                else:
                    probes.append(row)
            media += 10
    templates = template
    genuine, impostor = [], []
    for t1 in range(1, templates + 1):
        for t2 in range(t1 + 1, templates + 1):
            same = (t1 - 1) // 3 == (t2 - 1) // 3
            (genuine if same else impostor).append(f"{t1} {t2} {int(same)}")
    (base / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    # Landmark file in reverse order: the loader must join by name, not by line.
    (base / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(reversed(name_lm)) + "\n")
    (base / "meta" / f"{prefix}_template_pair_label.txt").write_text("\n".join(genuine + impostor) + "\n")
    if with_one_to_n:
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
        names = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}[target]
        for g, gname in zip((1, 2), names):
            (base / "meta" / f"{prefix}_1N_gallery_{gname}.csv").write_text(header + "\n".join(gallery[g]) + "\n")
        (base / "meta" / f"{prefix}_1N_probe_mixed.csv").write_text(header + "\n".join(probes) + "\n")
    return {
        "images": img,
        "templates": templates,
        "pairs": len(genuine) + len(impostor),
        "genuine": len(genuine),
        "probe_templates": 2 * subjects,
        "gallery_templates": subjects,
    }
