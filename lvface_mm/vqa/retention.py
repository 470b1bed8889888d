"""Text-only retention: does the trained adapter leave the model's no-face answers unchanged?

An adapter whose card says `lora_scope: all` changes the language model for every prompt, also
those without a face; under the default `faces` scope a text-only prompt runs the base weights
(`lvface_mm.vlm.lora_scope`), so both answer alike by construction and this check confirms it.
It asks the trained model and its base (the same model with the LoRA switched off) the same general
questions, with no picture, no face and no identity tokens, and scores both with the
harness's `text_qa` metric (the normalised reference answer contained in the normalised answer).
The issue's target: the trained model's `text_qa` accuracy within 0.02 of the base's.

`GENERAL_QUESTIONS` is a small built-in list (capitals, arithmetic, everyday facts): the 49 of 75
written ones that SmolLM2-135M-Instruct (greedy, 24 new tokens, its own chat template) answers
right, so its base scores 1.000 and any loss shows. Pass your own questions to measure other models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .metrics import contains_answer


@dataclass(frozen=True)
class TextQuestion:
    """One text-only question and the words a right answer contains."""

    question: str
    answer: str

    def __post_init__(self) -> None:
        for key in ("question", "answer"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ValueError(f"TextQuestion.{key} must be a non-empty string, got {getattr(self, key)!r}")


GENERAL_QUESTIONS: tuple[TextQuestion, ...] = tuple(
    TextQuestion(q, a)
    for q, a in (
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is the capital of England?", "London"),
        ("What is the capital of Russia?", "Moscow"),
        ("What is the capital of China?", "Beijing"),
        ("What is the capital of Egypt?", "Cairo"),
        ("What is the capital of Greece?", "Athens"),
        ("What is the capital of Canada?", "Ottawa"),
        ("What is the capital of Ireland?", "Dublin"),
        ("What is the capital of Austria?", "Vienna"),
        ("What is the capital of Poland?", "Warsaw"),
        ("What is the capital of Sweden?", "Stockholm"),
        ("What is the capital of Norway?", "Oslo"),
        ("What is the capital of Kenya?", "Nairobi"),
        ("What is the capital of Thailand?", "Bangkok"),
        ("What is the capital of South Korea?", "Seoul"),
        ("What is the capital of India?", "Delhi"),
        ("What is the capital of Mexico?", "Mexico City"),
        ("What is the capital of Cuba?", "Havana"),
        ("What is the capital of Scotland?", "Edinburgh"),
        ("What is the capital of the Netherlands?", "Amsterdam"),
        ("What is 2 plus 2?", "4"),
        ("What is 100 divided by 10?", "10"),
        ("What is half of 10?", "5"),
        ("How many days are in a week?", "7"),
        ("How many sides does a triangle have?", "3"),
        ("What color is the sky on a clear day?", "blue"),
        ("Which planet is known as the Red Planet?", "Mars"),
        ("What is the largest ocean on Earth?", "Pacific"),
        ("What is the longest river in Africa?", "Nile"),
        ("What is the tallest mountain in the world?", "Everest"),
        ("What is the largest mammal on Earth?", "blue whale"),
        ("What is the chemical symbol for water?", "H2O"),
        ("What is the chemical symbol for gold?", "Au"),
        ("What gas do plants absorb from the air?", "carbon dioxide"),
        ("What is the boiling point of water in degrees Celsius?", "100"),
        ("Who wrote Romeo and Juliet?", "Shakespeare"),
        ("Who painted the Mona Lisa?", "Leonardo"),
        ("Who developed the theory of relativity?", "Einstein"),
        ("What is the currency of Japan?", "yen"),
        ("What language is spoken in Brazil?", "Portuguese"),
        ("In which country are the pyramids of Giza?", "Egypt"),
        ("What is the first month of the year?", "January"),
        ("What is the last month of the year?", "December"),
        ("What is the opposite of hot?", "cold"),
        ("What is the opposite of up?", "down"),
        ("What is the opposite of day?", "night"),
        ("What is the opposite of big?", "small"),
    )
)


@contextlib.contextmanager
def base_model(vlm: Any) -> Iterator[None]:
    """The model with its LoRA switched off (PEFT's `disable_adapter`); unchanged when it has none."""
    from peft import PeftModel

    if isinstance(vlm.model, PeftModel):
        with vlm.model.disable_adapter():
            yield
    else:
        yield


@torch.no_grad()
def text_only_answers(
    vlm: Any, questions: Sequence[TextQuestion], *, batch_size: int = 16, max_new_tokens: int = 24
) -> list[str]:
    """Greedy answers to `questions`: one user turn through the model's chat template, no picture, no faces."""
    from .harness import end_of_turn_ids

    family, processor = vlm.family, vlm.processor
    stops = end_of_turn_ids(vlm)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts = [
            family.render_prompt(processor.processor, [{"role": "user", "content": family.user_content(q.question, 0)}])
            for q in chunk
        ]
        inputs = processor(texts, images=None, num_faces=0)
        empty = torch.zeros(0, vlm.config.num_id_tokens, vlm.adapter.projector.spec.out_dim)  # (0, K, d): no faces
        new = vlm.generate_ids(inputs, [empty] * len(chunk), max_new_tokens=max_new_tokens, eos_token_id=stops)
        answers += [a.strip() for a in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def text_retention(
    vlm: Any,
    questions: Sequence[TextQuestion] = GENERAL_QUESTIONS,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """`text_qa` accuracy of the trained model and of its base on the same text-only questions.

    Returns:
        {"trained": acc, "base": acc, "difference": trained - base, "n_text_qa": count,
         "answers": [{"question", "answer", "trained", "base"}, ...]}.
    """
    if not questions:
        raise ValueError("text_retention needs at least one question")
    questions = [q if isinstance(q, TextQuestion) else TextQuestion(*q) for q in questions]
    was_training = vlm.model.training
    vlm.model.eval()
    try:
        trained = text_only_answers(vlm, questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
        with base_model(vlm):
            base = text_only_answers(vlm, questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
    finally:
        vlm.model.train(was_training)
    hits = {
        key: sum(contains_answer(a, q.answer) for a, q in zip(said, questions)) / len(questions)
        for key, said in (("trained", trained), ("base", base))
    }
    return {
        "trained": hits["trained"],
        "base": hits["base"],
        "difference": hits["trained"] - hits["base"],
        "n_text_qa": len(questions),
        "answers": [
            {"question": q.question, "answer": q.answer, "trained": t, "base": b}
            for q, t, b in zip(questions, trained, base)
        ],
    }


__all__ = ["GENERAL_QUESTIONS", "TextQuestion", "base_model", "text_only_answers", "text_retention"]
