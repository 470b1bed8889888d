"""Region features: what is around each face, read from the VLM's own vision tower."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvface_mm.vlm.regions import (
    RegionReader,
    add_region_features,
    cell_boxes,
    person_region,
    processed_box,
    region_masks,
)
from tests._vlm_fixtures import faces_at, tiny_identity_vlm

pytestmark = pytest.mark.usefixtures("single_thread")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def test_processed_box_follows_resize_crop_and_pad() -> None:
    # A 200 x 100 picture squashed to 50 x 50: fractions of the picture.
    squash = SimpleNamespace(size={"height": 50, "width": 50}, do_center_crop=False)
    assert processed_box((20, 10, 60, 50), 200, 100, squash) == pytest.approx((0.1, 0.1, 0.3, 0.5))
    # Shortest edge 50 (200 x 100 -> 100 x 50), centre crop 50 x 50: x in [25, 75) of the resized picture.
    crop = SimpleNamespace(size={"shortest_edge": 50}, do_center_crop=True, crop_size={"height": 50, "width": 50})
    assert processed_box((60, 0, 100, 100), 200, 100, crop) == pytest.approx((0.1, 0.0, 0.5, 1.0))
    assert processed_box((0, 0, 40, 100), 200, 100, crop) == pytest.approx((0.0, 0.0, 0.0, 1.0))  # cropped away
    # LLaVA's pad to a square (200 x 200, the picture centred vertically), then resize.
    pad = SimpleNamespace(size={"height": 20, "width": 20}, do_pad=True, do_center_crop=False)
    assert processed_box((0, 0, 200, 100), 200, 100, pad) == pytest.approx((0.0, 0.25, 1.0, 0.75))
    with pytest.raises(ValueError, match="size"):
        processed_box((0, 0, 1, 1), 2, 2, SimpleNamespace(size={"longest_edge": 4}))


def test_region_masks_pick_the_patches_inside_and_never_none() -> None:
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.55, 0.55, 0.6, 0.6]])  # 4x4 grid: top-left quarter; a sliver
    masks = region_masks(boxes, 4)  # (2, 16)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[0, 1, 4, 5]] = True
    assert torch.equal(masks[0], expected)
    assert masks[1].sum() == 1 and masks[1][10]  # no centre inside: the nearest patch (row 2, col 2)


def test_person_region_holds_the_persons_object_and_not_the_neighbours() -> None:
    from lvface_mm.vqa.scenes import render_scene

    crops = [np.full((112, 112, 3), v, dtype=np.uint8) for v in (90, 160, 220)]
    image, faces, objects = render_scene(crops, [("red", "cup"), ("blue", "flag"), ("green", "box")], 296, seed=3)
    height, width = image.shape[:2]
    for i, face in enumerate(faces):
        x1, y1, x2, y2 = person_region(face, width, height)
        for j, (ox1, oy1, ox2, oy2) in enumerate(objects):
            centre = ((ox1 + ox2) / 2, (oy1 + oy2) / 2)
            inside = x1 <= centre[0] <= x2 and y1 <= centre[1] <= y2
            assert inside == (i == j), (i, j)


def test_cells_split_a_region_row_major() -> None:
    cells = cell_boxes(torch.tensor([[0.0, 0.0, 0.6, 0.3]]), (3, 2))  # (1, 6, 4)
    assert cells.shape == (1, 6, 4)
    torch.testing.assert_close(cells[0, 1], torch.tensor([0.3, 0.0, 0.6, 0.1]))  # row 0, col 1
    torch.testing.assert_close(cells[0, 4], torch.tensor([0.0, 0.2, 0.3, 0.3]))  # row 2, col 0


def test_a_fresh_reader_changes_nothing_and_an_open_gate_tells_regions_apart() -> None:
    from lvface_mm.vlm.matching import ReferenceMatcher

    d, norm = 32, torch.tensor(1.5)
    projector = torch.nn.Module()
    projector.region_reader = RegionReader(d, cells=(2, 2), cell_dim=8)
    projector.matcher = ReferenceMatcher(d)
    projector.register_buffer("output_norm", norm)
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(3, 2, d, generator=g), dim=-1) * norm  # 2 faces + 1 reference
    patches = torch.randn(64, d, generator=g)  # an 8x8 grid
    patches[:32] += 3.0  # the top half differs from the bottom half
    boxes = torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]])  # face 0: top half, face 1: bottom
    basis = torch.eye(8)
    embeddings = torch.stack([basis[0], basis[1], 0.6 * basis[1] + 0.8 * basis[2]])  # the reference is face 1
    fresh = add_region_features(projector, tokens, patches, boxes, 2, embeddings)
    torch.testing.assert_close(fresh, tokens)  # the gate starts closed: exactly the projector's tokens
    with torch.no_grad():
        projector.region_reader.gate.fill_(3.0)
    read = add_region_features(projector, tokens, patches, boxes, 2, embeddings)
    assert torch.allclose(read.norm(dim=-1), norm.expand(3, 2), atol=1e-5)  # every token keeps the norm
    # Each face moved towards its own region's vector; the reference towards face 1's.
    masks = region_masks(cell_boxes(boxes, (2, 2)).reshape(-1, 4), 8).reshape(2, 4, 64)
    region = projector.region_reader(patches, masks).detach()  # (2, d)
    assert torch.allclose(region.norm(dim=-1), torch.tanh(torch.tensor(3.0)).expand(2))  # bounded by the gate
    assert _cos(region[0], region[1]) < 0.5
    for row, own, other in ((0, 0, 1), (1, 1, 0), (2, 1, 0)):  # face 0, face 1, the reference of face 1
        moved = read[row, 0] - tokens[row, 0]
        assert _cos(moved, region[own]) > 0.6 and _cos(moved, region[own]) > _cos(moved, region[other]) + 0.3
    # A stranger reference is left alone.
    stranger = torch.stack([basis[0], basis[1], basis[5]])
    alone = add_region_features(projector, tokens, patches, boxes, 2, stranger)
    assert _cos(alone[2], tokens[2]) > 0.999
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        add_region_features(projector, tokens, patches, boxes[:1], 2, embeddings)
    with pytest.raises(ValueError, match="square"):
        add_region_features(projector, tokens, patches[:63], boxes, 2, embeddings)
    with pytest.raises(ValueError, match="cells"):
        RegionReader(d, cells=(0, 2))


@pytest.mark.parametrize("build", ["llava", "paligemma", "fast_vlm"])
def test_tiny_vlm_reads_regions_from_its_own_picture_features(tmp_path: Path, build: str) -> None:
    from lvface_mm.vlm.adapter import IdentityAdapter

    vlm = tiny_identity_vlm(build, region_features=True)
    reader = vlm.adapter.projector.region_reader
    assert reader is not None
    assert any(k.startswith("projector.region_reader.") for k in vlm.adapter.adapter_state_dict())
    with torch.no_grad():
        reader.gate.fill_(1.0)
    folder = vlm.adapter.save_pretrained(tmp_path / "adapter")
    again = IdentityAdapter.from_pretrained(folder, encoder=vlm.adapter.encoder)
    assert again.config.region_features
    assert torch.equal(again.projector.region_reader.combine.weight, reader.combine.weight)

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8) for _ in range(2)]
    faces = faces_at([(4.0, 2.0, 16.0, 14.0), (36.0, 2.0, 48.0, 14.0)])
    seen: list[torch.Tensor] = []
    generate_ids = vlm.generate_ids

    def record(inputs, face_tokens, **kwargs):
        seen.append(face_tokens[0])
        return generate_ids(inputs, face_tokens, **kwargs)

    vlm.generate_ids = record
    for picture in pictures:
        vlm.ask(picture, "What is <face_1> holding?", faces=faces, identity_tokens=True, max_new_tokens=1)
    # Same faces, other picture: other tokens; and the two faces read different regions of one picture.
    assert not torch.allclose(seen[0], seen[1])
    plain = vlm.encode_faces(np.stack([f.crop for f in faces]))
    assert _cos(seen[0][0] - plain[0], seen[0][1] - plain[1]) < 0.99
    image_processor = vlm.processor.processor.image_processor
    pixel_values = image_processor(images=[pictures[0]], return_tensors="pt")["pixel_values"]
    patches = vlm.family.picture_patches(vlm.model, pixel_values)
    assert patches.shape[1] == 16  # each tiny build here: a 4x4 grid (8 px / 2 px, 128 px / stride 32), no CLS


def test_region_features_are_refused_where_the_family_cannot_read_them() -> None:
    with pytest.raises(ValueError, match="'qwen2_vl' family"):
        tiny_identity_vlm("qwen2_vl", region_features=True)
    with pytest.raises(ValueError, match="region_features must be true or false"):
        tiny_identity_vlm("llava", region_features="yes")


@pytest.mark.parametrize("build", ["llava", "paligemma", "fast_vlm"])
def test_training_batches_carry_regions_and_train_the_reader(tmp_path: Path, build: str) -> None:
    from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer
    from lvface_mm.vqa.scenes import ScenesConfig, build_scenes_vqa
    from lvface_mm.vqa.schema import load_samples

    out = tmp_path / "scenes"
    config = ScenesConfig(num_identities=12, num_unseen=4, train_per_task=2, eval_per_task=1, name_pool_size=200)
    build_scenes_vqa(out, config)
    vlm = tiny_identity_vlm(build, region_features=True, reference_matching=True)
    samples = [s for s in load_samples(out / "train.json") if len(s.faces) == 2][:3]
    renderer = SampleRenderer(vlm, out, "token")
    store = FaceStore.open(out, "embedding")
    data = RenderedDataset(samples, renderer, store, pad_id=vlm.processor.tokenizer.pad_token_id)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    regions = batch["face_regions"]  # (B, F_max, 4)
    assert regions.shape[-1] == 4 and bool((regions[:, 0, 2] <= regions[:, 1, 0] + 0.25).all())  # left, then right
    boxes = [f.box for f in samples[0].faces]
    expected = vlm.family.region_boxes(boxes, *samples[0].image_size, vlm.processor.processor)
    torch.testing.assert_close(regions[0, :2], expected)
    task = IdentityAdapterTask(vlm, face_input="embedding")
    vlm.adapter.projector.requires_grad_(True)
    task(batch)["loss"].backward()
    gate_grad = vlm.adapter.projector.region_reader.gate.grad  # the closed gate opens from the first step
    assert gate_grad is not None and gate_grad != 0
