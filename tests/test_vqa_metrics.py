"""The harness metrics on hand-made predictions whose scores are worked out by hand."""

from __future__ import annotations

import json

import pytest

from lvface_mm.vqa.metrics import (
    NameMatcher,
    contains_answer,
    is_abstention,
    parse_count,
    parse_yes_no,
    score_predictions,
)
from lvface_mm.vqa.report import markdown_table, write_report
from lvface_mm.vqa.schema import Face, Sample, Turn


def make(sid: str, task: str, names: list[str | None], target: dict) -> Sample:
    faces = tuple(Face(identity=f"i{k}", name=n, embedding=k) for k, n in enumerate(names))
    prompt = " ".join("<face>" for _ in faces) + " ?"
    return Sample(sid, task, faces, (Turn("user", prompt), Turn("assistant", "ref")), target=target)


def test_parsers():
    assert parse_yes_no("Yes, Alice is on the left.") is True
    assert parse_yes_no("  no.") is False
    assert parse_yes_no("Not sure") is None and parse_yes_no("Alice is here") is None
    assert parse_count("There are 3 people.") == 3
    assert parse_count("I see two people") == 2
    assert parse_count("nobody") == 0 and parse_count("many") is None
    assert is_abstention("I don't know this person.") and is_abstention("An unknown person.")
    assert not is_abstention("This is Alice.")
    m = NameMatcher(["Anna", "Anna Lee", "Bo"])
    assert m.find("anna lee and Bo met Annabel") == {"Anna Lee", "Bo"}
    assert m.find("Anna, Bob") == {"Anna"}
    assert contains_answer("Alice's favourite colour is Blue.", "blue")
    assert contains_answer("It is the red car", "a red car")
    assert not contains_answer("blueish", "blue")


def test_known_values_on_hand_made_predictions():
    samples = [
        # recognition: 3 positives (2 right), 5 negatives (4 right)
        make("r1", "recognition", ["Alice"], {"query": "Alice", "answer": "yes"}),
        make("r2", "recognition", ["Bob"], {"query": "Bob", "answer": "yes"}),
        make("r3", "recognition", ["Cara"], {"query": "Cara", "answer": "yes"}),
        *[make(f"n{i}", "recognition", ["Alice"], {"query": "Bob", "answer": "no"}) for i in range(5)],
        # captions: true names {Alice, Bob}, {Cara}, {Alice}
        make("c1", "caption", ["Alice", "Bob"], {"names": ["Alice", "Bob"], "num_unknown": 0}),
        make("c2", "caption", ["Cara", None], {"names": ["Cara"], "num_unknown": 1}),
        make("c3", "caption", ["Alice"], {"names": ["Alice"], "num_unknown": 0}),
        # naming
        make("m1", "naming", ["Alice", "Bob"], {"names": ["Bob"]}),
        make("m2", "naming", ["Cara"], {"names": ["Cara"]}),
        # unknown people
        make("u1", "unknown", [None], {}),
        make("u2", "unknown", [None, "Bob"], {}),
        # counting and text-only QA
        make("k1", "counting", ["Alice", None], {"count": 2}),
        make("k2", "counting", ["Alice"], {"count": 1}),
        Sample("t1", "text_qa", (), (Turn("user", "?"), Turn("assistant", "x")), target={"answer": "blue"}),
        Sample("t2", "text_qa", (), (Turn("user", "?"), Turn("assistant", "x")), target={"answer": "Paris"}),
    ]
    predictions = {
        "r1": "Yes, Alice is in the photo.",
        "r2": "Yes.",
        "r3": "I am not sure.",  # neither yes nor no: wrong
        "n0": "No.",
        "n1": "No, Bob is not here.",
        "n2": "no",
        "n3": "No!",
        "n4": "Yes, Bob is there.",  # false positive
        "c1": "Alice on the left and Bob on the right.",  # 2 right
        "c2": "Cara and Dmitri.",  # 1 right, 1 hallucinated (Dmitri is a distractor name)
        "c3": "An unknown person.",  # misses Alice
        "m1": "Bob.",  # right
        "m2": "This is Alice.",  # wrong and hallucinated (Alice not in the photo)
        "u1": "I don't know this person.",  # abstains
        "u2": "That is Bob.",  # names Bob, who *is* in the photo but is not the asked person: no abstention
        "k1": "There are two people.",
        "k2": "There are 3 people.",
        "t1": "Alice's favourite colour is blue.",
        "t2": "London.",
    }
    out = score_predictions(samples, predictions, vocabulary=["Dmitri", "Eve"])
    assert out["recognition_pos_acc"] == pytest.approx(2 / 3)
    assert out["recognition_neg_acc"] == pytest.approx(4 / 5)
    assert out["recognition_weighted_acc"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # captions: tp = 2 + 1 + 0 = 3, predicted names = 2 + 2 + 0 = 4, true names = 2 + 1 + 1 = 4
    assert out["caption_precision"] == pytest.approx(3 / 4)
    assert out["caption_recall"] == pytest.approx(3 / 4)
    assert out["caption_f1"] == pytest.approx(3 / 4)
    assert out["naming_acc"] == pytest.approx(1 / 2)
    assert out["unknown_abstention"] == pytest.approx(1 / 2)
    # hallucination over caption (3) + naming (2) + unknown (2) answers: c2 and m2 say absent names
    assert out["hallucinated_name_rate"] == pytest.approx(2 / 7)
    assert out["counting_acc"] == pytest.approx(1 / 2)
    assert out["text_qa_acc"] == pytest.approx(1 / 2)
    assert out["n_recognition"] == 8 and out["n_caption"] == 3 and out["n_text_qa"] == 2


def test_missing_prediction_and_empty_categories():
    samples = [make("m1", "naming", ["Alice"], {"names": ["Alice"]})]
    with pytest.raises(ValueError, match="no prediction for 1 sample"):
        score_predictions(samples, {})
    out = score_predictions(samples, {"m1": "Alice"})
    assert out["naming_acc"] == 1.0
    assert out["recognition_weighted_acc"] is None and out["caption_f1"] is None


def test_report_files(tmp_path):
    results = {"token": {"naming_acc": 0.75, "n_naming": 4}, "plain": {"naming_acc": 0.25, "n_naming": 4}}
    table = markdown_table(results)
    assert "| naming_acc ↑ | 0.750 | 0.250 |" in table
    assert "recognition_pos_acc" not in table  # rows without any value are left out
    paths = write_report(results, tmp_path, verification={"before": {"TAR@FAR=1e-3": 0.5}}, info={"model": "tiny"})
    payload = json.loads(paths["json"].read_text())
    assert payload["results"]["token"]["naming_acc"] == 0.75
    assert payload["verification"]["before"]["TAR@FAR=1e-3"] == 0.5
    assert paths["plot"].stat().st_size > 1000
    assert "- model: tiny" in paths["markdown"].read_text()
