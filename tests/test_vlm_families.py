"""Identity-token injection on every supported family, with tiny random models built from configs.

For each tiny build (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, a
text-only Llama): no faces -> the base model's logits exactly; identity tokens land at the
placeholders in reference order and nowhere else; generation injects once (prefill), with batches
of 0/1/3 faces and with beam search; a count mismatch raises.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvface_mm.vlm import FaceCountError, IdentityTokens
from lvface_mm.vlm.testing import TINY_IMAGE_SIZE, random_face_crops
from tests._vlm_fixtures import TINY_BUILDS, base_model, logits_of, tiny_identity_vlm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

K = 2  # identity tokens per face in the tiny cards


class EmbeddingRecorder:
    """Records (ids, output) of every call to the input-embedding module, after the injection hook."""

    def __init__(self, vlm) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        vlm.injector.attach()
        self.handle = vlm.model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls.append((args[0].detach().clone(), output.detach().clone()))

    def close(self) -> None:
        self.handle.remove()


_CACHE: dict[str, object] = {}


def bridge(build: str):
    """One IdentityVLM per build for the whole module (building is the slow part)."""
    if build not in _CACHE:
        _CACHE[build] = tiny_identity_vlm(build)
    return _CACHE[build]


def images_for(vlm, build: str, n: int):
    """One random image per prompt, or None for text-only builds."""
    size = TINY_IMAGE_SIZE[build]
    if not size:
        return None
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [[image] for _ in range(n)]  # the same picture for every prompt, so rows can be compared


def prompts(vlm, build: str, texts: list[str]) -> list[str]:
    """Chat-rendered prompts holding one image each (none for text-only models)."""
    n_images = 0 if images_for(vlm, build, 1) is None else 1
    out = []
    for text in texts:
        messages = [{"role": "user", "content": vlm.family.user_content(text, n_images)}]
        out.append(vlm.processor.render_chat(messages))
    return out


def crops_list(counts: list[int], seed: int = 0) -> list[np.ndarray | None]:
    return [random_face_crops(c, seed=seed + i) if c else None for i, c in enumerate(counts)]


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_no_faces_gives_base_logits_exactly(build: str) -> None:
    vlm = bridge(build)
    base = base_model(build)
    texts = prompts(vlm, build, ["describe the picture", "who is on the left ?"])
    inputs, face_tokens = vlm.prepare(texts, images_for(vlm, build, 2), None)
    assert not bool((inputs.inputs["input_ids"] == vlm.processor.placeholder_id).any())
    with torch.no_grad():
        ours = vlm.forward(inputs, face_tokens).logits
    theirs = logits_of(base.model, inputs.inputs)
    vocab = theirs.shape[-1]
    # The bridge may add one vocabulary row for the placeholder; the base model's columns are untouched.
    assert ours.shape[-1] >= vocab
    assert torch.equal(ours[..., :vocab], theirs)


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_identity_tokens_land_at_placeholders_in_reference_order(build: str) -> None:
    vlm = bridge(build)
    texts = prompts(vlm, build, ["<face_1> is next to <face_0> ."])
    crops = random_face_crops(2, seed=3)
    inputs, face_tokens = vlm.prepare(texts, images_for(vlm, build, 1), [crops])
    assert inputs.face_order == ((1, 0),)
    recorder = EmbeddingRecorder(vlm)
    try:
        with torch.no_grad():
            injected = vlm.forward(inputs, face_tokens).logits
    finally:
        recorder.close()
    ids, embeds = recorder.calls[0]
    mask = ids == vlm.processor.placeholder_id  # (1, T)
    assert int(mask.sum()) == 2 * K
    tokens = face_tokens[0]  # (2 faces, K, d)
    expected = torch.cat([tokens[1], tokens[0]]).to(embeds.dtype)  # text order: face 1 then face 0
    torch.testing.assert_close(embeds[mask], expected, rtol=0, atol=0)
    # Everything else is the model's own embedding of the ids.
    plain = vlm.model.get_input_embeddings()(torch.where(mask, 0, ids)).detach()
    assert torch.equal(embeds[~mask], plain[~mask])
    # And the tokens reach the output: without injection (placeholder rows left as embedded) logits differ.
    vlm.injector.detach()
    try:
        with torch.no_grad():
            plain_logits = vlm.model(**inputs.inputs).logits
    finally:
        vlm.injector.attach()
    assert not torch.allclose(injected, plain_logits)

    # Swapping the references is the same as swapping the faces.
    swapped, swapped_tokens = vlm.prepare(
        prompts(vlm, build, ["<face_0> is next to <face_1> ."]), images_for(vlm, build, 1), [crops[::-1].copy()]
    )
    with torch.no_grad():
        torch.testing.assert_close(vlm.forward(swapped, swapped_tokens).logits, injected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_generate_batch_with_0_1_3_faces_injects_once(build: str) -> None:
    vlm = bridge(build)
    texts = prompts(vlm, build, ["describe the picture", "<face> is here", "<face> , <face> and <face> smile"])
    crops = crops_list([0, 1, 3])
    inputs, face_tokens = vlm.prepare(texts, images_for(vlm, build, 3), crops)
    recorder = EmbeddingRecorder(vlm)
    try:
        new = vlm.generate_ids(inputs, face_tokens, max_new_tokens=3)
    finally:
        recorder.close()
    assert new.shape == (3, 3)
    assert not bool((new == vlm.processor.placeholder_id).any())  # the placeholder is never generated
    with_faces = [(ids == vlm.processor.placeholder_id).sum(1).tolist() for ids, _ in recorder.calls]
    assert with_faces[0] == [0, K, 3 * K]  # prefill: every row's placeholders
    assert all(sum(c) == 0 for c in with_faces[1:])  # decode steps: none
    prefill_ids, prefill_embeds = recorder.calls[0]
    for row, tokens in enumerate(face_tokens):
        mask = prefill_ids[row] == vlm.processor.placeholder_id
        torch.testing.assert_close(prefill_embeds[row][mask], tokens.reshape(-1, tokens.shape[-1]), rtol=0, atol=0)

    # Each row of the padded batch predicts what the prompt alone predicts (first generated step;
    # generate derives positions from the attention mask, which plain forward does not for every family).
    batch_scores = first_step_logits(vlm, inputs, face_tokens)
    for row, (text, crop) in enumerate(zip(texts, crops)):
        single, single_tokens = vlm.prepare([text], images_for(vlm, build, 1), [crop])
        torch.testing.assert_close(
            first_step_logits(vlm, single, single_tokens)[0], batch_scores[row], rtol=1e-4, atol=1e-4
        )


def first_step_logits(vlm, inputs, face_tokens) -> torch.Tensor:
    tokens = IdentityTokens.from_faces(face_tokens, inputs.face_order)
    with torch.no_grad(), vlm.injector.provide(tokens):
        out = vlm.model.generate(
            **inputs.inputs,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=vlm.processor.tokenizer.pad_token_id,
        )
    return out.logits[0]


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_beam_search_expands_identity_rows(build: str) -> None:
    vlm = bridge(build)
    # Different face counts per prompt: a wrong row mapping after expansion would fail the count check.
    texts = prompts(vlm, build, ["<face> is here", "<face> and <face> are here"])
    inputs, face_tokens = vlm.prepare(texts, images_for(vlm, build, 2), crops_list([1, 2], seed=5))
    recorder = EmbeddingRecorder(vlm)
    try:
        new = vlm.generate_ids(inputs, face_tokens, max_new_tokens=2, num_beams=2, num_return_sequences=2)
    finally:
        recorder.close()
    assert new.shape[0] == 4
    ids, embeds = recorder.calls[0]
    assert ids.shape[0] == 4
    for row in range(4):
        tokens = face_tokens[row // 2]
        mask = ids[row] == vlm.processor.placeholder_id
        torch.testing.assert_close(embeds[row][mask], tokens.reshape(-1, tokens.shape[-1]), rtol=0, atol=0)


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_count_mismatch_raises_clear_error(build: str) -> None:
    vlm = bridge(build)
    texts = prompts(vlm, build, ["<face> is here"])
    inputs, face_tokens = vlm.prepare(texts, images_for(vlm, build, 1), crops_list([1]))
    too_many = IdentityTokens((torch.cat([face_tokens[0][0], face_tokens[0][0][:1]]),), num_id_tokens=K)
    mismatch = r"row 0 has 2 <face> token\(s\) but 3 identity token\(s\)"
    with pytest.raises(FaceCountError, match=mismatch), torch.no_grad(), vlm.injector.provide(too_many):
        vlm.model(**inputs.inputs)
    # Placeholders without identity tokens, and identity tokens without placeholders, both raise.
    with pytest.raises(FaceCountError, match="no identity tokens were given"), torch.no_grad():
        vlm.model(**inputs.inputs)
    plain, _ = vlm.prepare(prompts(vlm, build, ["describe the picture"]), images_for(vlm, build, 1), None)
    one_face = IdentityTokens((face_tokens[0][0],), num_id_tokens=K)
    with (
        pytest.raises(FaceCountError, match="no <face> token reached"),
        torch.no_grad(),
        vlm.injector.provide(one_face),
    ):
        vlm.model(**plain.inputs)
    # A reference past the faces given is caught before the model runs.
    with pytest.raises(FaceCountError, match="refers to face 1"):
        vlm.prepare(prompts(vlm, build, ["<face_1> is here"]), images_for(vlm, build, 1), crops_list([1]))


@pytest.mark.parametrize("build", TINY_BUILDS)
def test_identity_tokens_have_the_norm_of_the_models_own_embeddings(build: str) -> None:
    """Projector outputs match the mean norm of the embedding module's outputs, which for Gemma
    (PaliGemma) in transformers 5.x already include the sqrt(hidden) scale."""
    vlm = bridge(build)
    placeholder = vlm.processor.placeholder_id
    ids = torch.tensor([i for i in range(len(vlm.processor.tokenizer)) if i != placeholder])
    module = vlm.model.get_input_embeddings()
    with torch.no_grad():
        expected = module(ids[None])[0].norm(dim=-1).mean()  # as the decoder sees them
        rows = module.weight[ids].norm(dim=-1).mean()  # the raw table
    norm = vlm.adapter.projector.output_norm
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    scale = 32**0.5 if build == "paligemma" else 1.0
    torch.testing.assert_close(expected / rows, torch.tensor(scale), rtol=1e-5, atol=0)
    with torch.no_grad():
        tokens = vlm.encode_faces(random_face_crops(3))  # (3, K, d)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.full((3, K), float(norm)), rtol=1e-5, atol=0)
