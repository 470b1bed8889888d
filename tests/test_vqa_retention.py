"""Text-only retention: the trained model and its base (LoRA off) answer the same no-face questions."""

from __future__ import annotations

import json

import pytest
import torch

from lvface_mm.vqa.report import write_report
from lvface_mm.vqa.retention import GENERAL_QUESTIONS, TextQuestion, text_only_answers, text_retention

QUESTIONS = GENERAL_QUESTIONS[:6]


@pytest.fixture(scope="module")
def vlm():
    from tests._vlm_fixtures import tiny_identity_vlm

    # lora_scope "all": the LoRA acts on text-only prompts too, which is what this check must see
    # (under the default "faces" scope they run the base weights; tests/test_vlm_lora_scope.py).
    vlm = tiny_identity_vlm("causal_lm", encoder="lvface_tiny", lora_scope="all")
    vlm.apply_lora({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]})
    return vlm


def test_a_zero_lora_changes_nothing(vlm) -> None:
    """PEFT starts LoRA's B at zero: the trained model is the base, answer for answer."""
    result = text_retention(vlm, QUESTIONS, batch_size=4, max_new_tokens=6)
    assert result["difference"] == 0.0 and result["trained"] == result["base"]
    assert result["n_text_qa"] == len(QUESTIONS) == len(result["answers"])
    assert all(a["trained"] == a["base"] for a in result["answers"])


def test_base_is_the_model_without_lora_and_a_trained_lora_is_seen(vlm) -> None:
    base_before = text_only_answers(vlm, QUESTIONS, max_new_tokens=6)
    lora_b = [p for n, p in vlm.model.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)  # a LoRA far from zero
        result = text_retention(vlm, QUESTIONS, max_new_tokens=6)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_b, saved):
                p.copy_(s)
    assert [a["base"] for a in result["answers"]] == base_before  # LoRA off: the base's answers
    assert any(a["trained"] != a["base"] for a in result["answers"])  # LoRA on: the trained model's
    assert result["difference"] == pytest.approx(result["trained"] - result["base"])


def test_report_shows_both_columns_and_the_difference(tmp_path) -> None:
    retention = {"trained": 0.9, "base": 0.95, "difference": -0.05, "n_text_qa": 40, "answers": []}
    results = {"token": {"naming_acc": 0.5, "n_naming": 4}}
    paths = write_report(results, tmp_path, plot=False, retention=retention)
    md = paths["markdown"].read_text()
    assert "| metric | token | text-only | text-only base |" in md
    assert "| text_qa_acc ↑ | – | 0.900 | 0.950 |" in md and "difference -0.050" in md
    report = json.loads(paths["json"].read_text())
    assert set(report["results"]) == {"token"} and report["text_retention"]["difference"] == -0.05


def test_questions_are_checked() -> None:
    with pytest.raises(ValueError, match="TextQuestion.answer"):
        TextQuestion("What is 2 plus 2?", " ")
    assert 30 <= len(GENERAL_QUESTIONS) <= 50
    assert len({q.question for q in GENERAL_QUESTIONS}) == len(GENERAL_QUESTIONS)
