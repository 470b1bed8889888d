"""The injection primitives and the `<face>` expansion, without a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lvface_mm.vlm import (
    FaceCountError,
    IdentityInjector,
    IdentityTokens,
    expand_face_placeholders,
    inject_identity_tokens,
)

PID = 9


def test_expand_plain_and_indexed_references() -> None:
    text, order = expand_face_placeholders("<face> met <face_2> and <face>", num_faces=3, num_id_tokens=2)
    assert text == "<face><face> met <face><face> and <face><face>"
    assert order == [0, 2, 1]
    text, order = expand_face_placeholders("no faces here", num_faces=0, num_id_tokens=4)
    assert (text, order) == ("no faces here", [])
    text, order = expand_face_placeholders("<id_0>", num_faces=1, num_id_tokens=3, placeholder_token="<id>")
    assert (text, order) == ("<id><id><id>", [0])


def test_expand_rejects_references_past_the_faces() -> None:
    with pytest.raises(FaceCountError, match=r"refers to face 1 \('<face>', reference #2\) but 1 face"):
        expand_face_placeholders("<face> and <face>", num_faces=1, num_id_tokens=2)
    with pytest.raises(FaceCountError, match=r"refers to face 5 \('<face_5>', reference #1\) but 2 face"):
        expand_face_placeholders("<face_5>", num_faces=2, num_id_tokens=2)


def test_tokens_follow_reference_order() -> None:
    faces = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)  # 3 faces, K=2, D=4
    tokens = IdentityTokens.from_faces([faces, faces[:0]], [(2, 0), ()])
    assert tokens.counts == [4, 0]
    assert torch.equal(tokens.rows[0], torch.cat([faces[2], faces[0]]))
    with pytest.raises(FaceCountError, match=r"prompt 0 refers to face\(s\) \[3\] but only 3 face"):
        IdentityTokens.from_faces([faces], [(3,)])


def test_inject_writes_rows_in_order_and_expands_generation_rows() -> None:
    ids = torch.tensor([[1, PID, PID, 2], [PID, PID, PID, PID]])  # prompt 0: 1 face, prompt 1: 2 faces (K=2)
    embeds = torch.zeros(2, 4, 3)
    a = torch.ones(2, 3)
    b = torch.arange(12, dtype=torch.float32).view(4, 3)
    tokens = IdentityTokens((a, b), num_id_tokens=2)
    out = inject_identity_tokens(ids, embeds, tokens, PID)
    assert torch.equal(out[0, 1:3], a) and torch.equal(out[1], b)
    assert torch.equal(out[0, [0, 3]], torch.zeros(2, 3))  # non-placeholder positions untouched
    # Beam search / num_return_sequences repeat each prompt row in place: rows 0,1 <- prompt 0; 2,3 <- prompt 1.
    expanded = ids.repeat_interleave(2, dim=0)
    out = inject_identity_tokens(expanded, torch.zeros(4, 4, 3), tokens, PID)
    assert torch.equal(out[1, 1:3], a) and torch.equal(out[3], b)


def test_inject_count_mismatch_messages() -> None:
    tokens = IdentityTokens((torch.ones(2, 3),), num_id_tokens=2)
    with pytest.raises(FaceCountError, match=r"row 0 has 3 <face> token\(s\) but 2 identity token\(s\).*1 face"):
        inject_identity_tokens(torch.tensor([[PID, PID, PID]]), torch.zeros(1, 3, 3), tokens, PID)
    with pytest.raises(FaceCountError, match=r"given for 2 prompt row\(s\), but the model sees a batch of 3"):
        two = IdentityTokens((torch.ones(2, 3), torch.ones(2, 3)), num_id_tokens=2)
        inject_identity_tokens(torch.full((3, 2), PID), torch.zeros(3, 2, 3), two, PID)
    with pytest.raises(ValueError, match="identity tokens have width 3 but the model's embeddings have width 5"):
        inject_identity_tokens(torch.tensor([[PID, PID]]), torch.zeros(1, 2, 5), tokens, PID)


class TinyLM(nn.Module):
    """Just an embedding table and a head: enough to exercise the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 3)
        self.head = nn.Linear(3, 16)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_injector_follows_a_swapped_embedding_module() -> None:
    model = TinyLM()
    injector = IdentityInjector(model, PID)
    ids = torch.tensor([[1, PID, 2]])
    tokens = IdentityTokens((torch.full((1, 3), 5.0),))
    with injector.provide(tokens):
        hooked = model(ids)
    model.embed = nn.Embedding.from_pretrained(model.embed.weight.detach().clone())  # what PEFT wrapping does
    with injector.provide(tokens):
        assert torch.equal(model(ids), hooked)
    assert injector.hooked_module is model.embed
    injector.detach()
    assert not torch.equal(model(ids), hooked)  # detached: the placeholder row is the plain embedding
