"""Face sources for the VQA builder: each returns `FacePhoto`s (identity, unique photo id, crop and/or
embedding).

- `folder_photos`: a folder per identity of aligned crops (listing by `lvface_mm.data.image_folder`).
- `recordio_photos`: an InsightFace `.rec/.idx` pair; crops are written out as PNG files, since
  samples refer to files.
- `synthetic_photos`: the procedural identities of `lvface_mm.data.synthetic`, written as PNG crops.
- `embedding_table_photos`: a safetensors file with "embeddings" (N, D) and "labels" (N,) —
  e.g. the output of `lvface-mm embed` over a data set, so training never has to run the encoder.
- `embedding_cluster_photos`: identities as clusters on the unit sphere, the shape of a trained
  encoder's output space (each identity a centre, each photo the centre plus noise). This is the
  cheap stand-in for encoder outputs in tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .builder import FacePhoto


def embedding_cluster_photos(
    num_identities: int,
    photos_per_identity: int,
    dim: int = 512,
    noise: float = 0.6,
    seed: int = 0,
) -> list[FacePhoto]:
    """Identities `id_0000`... with unit-norm embeddings centre + noise (per-coordinate std `noise`/sqrt(dim)).

    With `noise` 0.6, photos of one identity have cosine ~0.74 to each other and ~0 to anyone
    else, close to what a face encoder gives on good photos.
    """
    if num_identities < 1 or photos_per_identity < 1 or dim < 1 or noise < 0:
        raise ValueError(
            "embedding_cluster_photos needs num_identities, photos_per_identity, dim >= 1 and noise >= 0, got "
            f"{num_identities}, {photos_per_identity}, {dim}, {noise}"
        )
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)  # (I, D)
    photos = []
    for i in range(num_identities):
        x = centres[i] + rng.normal(scale=noise / np.sqrt(dim), size=(photos_per_identity, dim))  # (P, D)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        photos += [
            FacePhoto(f"id_{i:04d}", f"id_{i:04d}/{k}", embedding=x[k].astype(np.float32)) for k in range(len(x))
        ]
    return photos


def embedding_table_photos(path: str | Path) -> list[FacePhoto]:
    """Read "embeddings" (N, D) and integer "labels" (N,) from a safetensors file.

    Optional metadata: "identities" (JSON list, label -> identity name) and "photos" (JSON list of
    N photo ids); otherwise identities are `id_<label>` and photos `<row>`.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="numpy") as fh:
        keys = set(fh.keys())
        if not {"embeddings", "labels"} <= keys:
            raise ValueError(f"{path}: expected tensors 'embeddings' and 'labels', found {sorted(keys)}")
        emb, labels = fh.get_tensor("embeddings"), fh.get_tensor("labels")
        meta = fh.metadata() or {}
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"{path}: embeddings must be (N, D) and labels (N,), got {emb.shape} and {labels.shape}")
    identities = json.loads(meta["identities"]) if "identities" in meta else None
    photo_ids = json.loads(meta["photos"]) if "photos" in meta else [str(i) for i in range(len(emb))]
    if len(photo_ids) != len(emb):
        raise ValueError(f"{path}: metadata 'photos' has {len(photo_ids)} ids for {len(emb)} embeddings")

    def name(label: int) -> str:
        if identities is None:
            return f"id_{label}"
        if not 0 <= label < len(identities):
            raise ValueError(f"{path}: label {label} has no entry in metadata 'identities' ({len(identities)})")
        return identities[label]

    return [FacePhoto(name(int(y)), photo_ids[i], embedding=emb[i]) for i, y in enumerate(labels)]


def _write_png(image_chw_uint8: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image_chw_uint8.transpose(1, 2, 0))).save(path)


def synthetic_photos(
    out_dir: str | Path,
    num_identities: int,
    photos_per_identity: int,
    seed: int = 0,
    variation: float = 1.0,
) -> list[FacePhoto]:
    """Draw synthetic identities (`lvface_mm.data.synthetic`) and save the crops under `out_dir/crops`."""
    from ..data.synthetic import SyntheticFaces, SyntheticFacesConfig

    # The data set is identity-major (item = label * photos_per_identity + k), like a RecordIO file.
    faces = SyntheticFaces(
        SyntheticFacesConfig(
            num_identities=num_identities, images_per_identity=photos_per_identity, seed=seed, variation=variation
        ),
        cache=False,
    )
    out = Path(out_dir)
    photos = []
    for index in range(len(faces)):
        image, label = faces[index]
        k = index % photos_per_identity
        rel = f"crops/syn_{label:04d}/{k:03d}.png"
        _write_png(image.numpy(), out / rel)
        photos.append(FacePhoto(f"syn_{label:04d}", f"syn_{label:04d}/{k}", crop=str((out / rel).resolve())))
    return photos


def folder_photos(root: str | Path, min_images: int = 1) -> list[FacePhoto]:
    """Aligned crops in `root/<identity>/<image>`; photo ids are paths relative to `root`."""
    from ..data.image_folder import list_identity_folder

    tree = list_identity_folder(root, min_images=min_images)
    base = Path(root).resolve()
    return [
        FacePhoto(tree.identities[label], path.resolve().relative_to(base).as_posix(), crop=str(path.resolve()))
        for path, label in tree.samples
    ]


def recordio_photos(path: str | Path, out_dir: str | Path, limit: int | None = None) -> list[FacePhoto]:
    """Crops of an InsightFace RecordIO set, written to `out_dir/crops/<label>/<index>.png`.

    Args:
        path: directory with `train.rec`/`train.idx`, a `.rec` path, or a prefix.
        out_dir: the dataset directory being built (crops are written inside it).
        limit: read only the first `limit` images (a quick subset of a large set).
    """
    from ..data.record_dataset import RecordDataset

    data = RecordDataset(path)
    out = Path(out_dir)
    photos = []
    for index in range(len(data) if limit is None else min(limit, len(data))):
        image, label = data.read_image(index)  # (112, 112, 3) uint8 RGB
        rel = f"crops/rec_{label:06d}/{index}.png"
        _write_png(image.transpose(2, 0, 1), out / rel)
        photos.append(FacePhoto(f"rec_{label:06d}", f"rec:{index}", crop=str((out / rel).resolve())))
    return photos


def embed_photos(
    photos: list[FacePhoto],
    model: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    batch_size: int = 64,
    device: str | None = None,
) -> list[FacePhoto]:
    """Attach L2-normalised embeddings of each photo's crop, computed with an LVFace encoder.

    Args:
        photos: photos with `crop` files (aligned 112x112).
        model: registered encoder name (e.g. "lvface_b").
        checkpoint: a local checkpoint instead of the official weights.
        pretrained: load the official weights (False: a random encoder seeded with 0, for smoke runs).
        batch_size: crops per forward pass.
        device: torch device (default: cuda if available, else cpu).
    """
    import torch
    from PIL import Image

    from ..faces.alignment import to_model_input
    from ..models import create_model

    missing = [p.photo for p in photos if p.crop is None]
    if missing:
        raise ValueError(f"{len(missing)} photo(s) have no crop to embed, e.g. {missing[:3]}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = create_model(model, pretrained=pretrained and checkpoint is None, checkpoint_path=checkpoint)
    encoder = encoder.to(dev).eval()
    out = []
    for start in range(0, len(photos), batch_size):
        chunk = photos[start : start + batch_size]
        crops = []
        for p in chunk:
            with Image.open(p.crop) as im:
                crops.append(np.asarray(im.convert("RGB").resize((112, 112))))
        with torch.no_grad():
            emb = encoder(to_model_input(np.stack(crops), device=dev), normalize=True).float().cpu().numpy()  # (B, 512)
        out += [FacePhoto(p.identity, p.photo, p.crop, e) for p, e in zip(chunk, emb)]
    return out
