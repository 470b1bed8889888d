"""Verified identity tokens: open-set references bound to the picture faces they match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvface_mm.vlm.matching import ReferenceMatcher, bind_references
from lvface_mm.vlm.projectors import FaceFeatures
from tests._vlm_fixtures import tiny_identity_vlm

pytestmark = pytest.mark.usefixtures("single_thread")


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g), dim=-1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def test_a_matching_reference_carries_its_faces_slot_and_a_stranger_none() -> None:
    d, D, norm = 64, 32, torch.tensor(0.8)
    matcher = ReferenceMatcher(d)
    basis = torch.linalg.qr(torch.randn(D, 4, generator=torch.Generator().manual_seed(0)))[0].T  # (4, D) orthonormal
    # Two faces; reference 0 is another photo of face 1 (cosine 0.6), reference 1 is nobody in the picture.
    same_person = 0.6 * basis[1] + 0.8 * basis[2]
    embeddings = torch.stack([basis[0], basis[1], same_person, basis[3]])  # (F + R, D)
    tokens = F.normalize(torch.randn(4, 1, d, generator=torch.Generator().manual_seed(3)), dim=-1) * norm
    gates = matcher.gates(embeddings[:2], embeddings[2:])
    assert gates[1, 0] > 0.95 and gates[0, 0] < 0.01 and gates[:, 1].max() < 0.01
    bound = matcher(tokens, embeddings, 2, norm)  # (4, 1, d)
    assert torch.allclose(bound.norm(dim=-1), norm.expand(4, 1), atol=1e-5)
    # The reference now looks like face 1 (shared slot), not like face 0.
    assert _cos(bound[2], bound[1]) > _cos(tokens[2], tokens[1]) + 0.3
    assert _cos(bound[2], bound[1]) > _cos(bound[2], bound[0]) + 0.3
    # The stranger keeps its own tokens.
    assert _cos(bound[3], tokens[3]) > 0.999
    # Faces alone (closed-set token mode) stay exactly the projector's tokens.
    assert torch.equal(matcher(tokens[:2], embeddings[:2], 2, norm), tokens[:2])


def test_matcher_rejects_shapes_it_cannot_bind() -> None:
    matcher = ReferenceMatcher(16, max_faces=2)
    tokens, emb = torch.zeros(4, 1, 16), _unit(4, 8, 0)
    with pytest.raises(ValueError, match="at most 2"):
        matcher(tokens, emb, 3, torch.tensor(1.0))
    with pytest.raises(ValueError, match="3 embeddings for 4"):
        matcher(tokens, emb[:3], 2, torch.tensor(1.0))
    with pytest.raises(ValueError, match="num_faces=5"):
        matcher(tokens, emb, 5, torch.tensor(1.0))
    with pytest.raises(ValueError, match="max_faces"):
        ReferenceMatcher(16, max_faces=0)


def test_card_validates_and_saves_the_matcher_with_the_projector(tmp_path: Path) -> None:
    from lvface_mm.vlm.adapter import IdentityAdapter
    from lvface_mm.vlm.config import IdentityAdapterConfig

    with pytest.raises(ValueError, match="embedding_source must be 'pooled' or 'both'"):
        IdentityAdapterConfig(
            name="x", vlm_id="x", family="llava", encoder="lvface_tiny", embedding_source="patch",
            projector="resampler", reference_matching=True,
        )
    vlm = tiny_identity_vlm("llava", reference_matching=True)
    projector = vlm.adapter.projector
    assert projector.matcher is not None
    assert any(k.startswith("projector.matcher.") for k in vlm.adapter.adapter_state_dict())
    with torch.no_grad():
        projector.matcher.threshold.fill_(0.123)
        projector.matcher.slots.mul_(2.0)
    folder = vlm.adapter.save_pretrained(tmp_path / "adapter")
    again = IdentityAdapter.from_pretrained(folder, encoder=vlm.adapter.encoder)
    assert again.config.reference_matching is True
    assert again.projector.matcher.threshold.item() == pytest.approx(0.123)
    assert torch.equal(again.projector.matcher.slots, projector.matcher.slots)
    # A card without matching has no matcher and binding is then a no-op.
    plain = tiny_identity_vlm("llava")
    assert plain.adapter.projector.matcher is None
    tokens = torch.randn(3, 2, 32)
    assert bind_references(plain.adapter.projector, tokens, _unit(3, 512, 0), 1) is tokens


def test_training_batches_bind_references_and_train_the_matcher(tmp_path: Path) -> None:
    from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
    from lvface_mm.vqa.binding import BindingConfig, build_binding_vqa
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer
    from lvface_mm.vqa.schema import load_samples
    from lvface_mm.vqa.sources import embedding_cluster_photos

    out = tmp_path / "binding"
    build_binding_vqa(
        embedding_cluster_photos(12, 3, dim=512, seed=2), out,
        BindingConfig(num_eval_identities=3, name_pool_size=60, train_per_task=8, eval_per_task=2),
    )
    vlm = tiny_identity_vlm("causal_lm", reference_matching=True)
    samples = load_samples(out / "train.json")[:4]
    renderer = SampleRenderer(vlm, out, "token")
    store = FaceStore.open(out, "embedding")
    data = RenderedDataset(samples, renderer, store, pad_id=vlm.processor.tokenizer.pad_token_id)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    assert batch["picture_faces"].tolist() == [len(s.faces) for s in samples]
    task = IdentityAdapterTask(vlm, face_input="embedding")
    vlm.adapter.projector.requires_grad_(True)
    loss = task(batch)["loss"]
    loss.backward()
    matcher = vlm.adapter.projector.matcher
    assert matcher.slots.grad is not None and matcher.slots.grad.abs().sum() > 0
    assert matcher.threshold.grad is not None and matcher.threshold.grad != 0
    assert "adapter.projector.matcher.slots" in task.state_dict()


def test_ask_binds_the_gallerys_references_like_training() -> None:
    from tests.test_vqa_binding import two_people_scene

    vlm = tiny_identity_vlm("llava", reference_matching=True)
    gallery, faces, image = two_people_scene(noise=0.03)  # cosine ~0.8 to the enrolled photo
    seen: list[torch.Tensor] = []
    generate_ids = vlm.generate_ids

    def record(inputs, face_tokens, **kwargs):  # observe what reaches the model, then generate as usual
        seen.append(face_tokens[0])
        return generate_ids(inputs, face_tokens, **kwargs)

    vlm.generate_ids = record
    vlm.ask(image, "Who is on the left?", gallery, faces=faces, identity_tokens=True, references=2, max_new_tokens=2)
    picture = vlm.find_faces(image, faces)
    refs, ref_tokens, templates = vlm._references(picture, gallery, 2)
    projector = vlm.adapter.projector
    with torch.no_grad():
        own = vlm.encode_faces(picture.crops)
        expected = projector.matcher(
            torch.cat([own, ref_tokens]),
            torch.cat([torch.as_tensor(picture.embeddings), templates]),
            2,
            projector.output_norm,
        )
    torch.testing.assert_close(seen[0], expected)
    # Sheli's reference is bound to the left face (another photo of her), Koren's to the right one.
    names = [r.name for r in refs]
    gates = projector.matcher.gates(torch.as_tensor(picture.embeddings), templates)
    assert gates[0, names.index("Sheli")] > 0.5 and gates[1, names.index("Koren")] > 0.5
    assert torch.equal(templates, F.normalize(torch.as_tensor(np.stack([gallery.template(n) for n in names])), dim=-1))
    assert not torch.equal(seen[0][2:], projector(FaceFeatures(pooled=templates)))
