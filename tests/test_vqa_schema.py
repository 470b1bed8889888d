"""VQA sample schema: valid samples parse into the views training needs; bad samples fail with an
error that names the sample and the field."""

from __future__ import annotations

import copy
import json

import pytest

from lvface_mm.vqa.schema import (
    VQAValidationError,
    check_files,
    dump_samples,
    load_samples,
    parse_sample,
    validate_samples,
)


def good_sample() -> dict:
    return {
        "id": "s1",
        "task": "naming",
        "images": ["scene.jpg"],
        "faces": [
            {"identity": "id_1", "name": "Alice", "photo": "p1", "crop": "crops/a.png"},
            {"identity": "id_2", "name": None, "image": 0, "box": [10, 10, 60, 70]},
            {"identity": "id_3", "name": "Bob", "embedding": 3},
        ],
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Faces: <face_2> <face_0> <face_1>. Who is this: <face_0>?"},
            {"from": "gpt", "value": "Alice."},
        ],
        "target": {"names": ["Alice"]},
    }


def test_valid_sample_views():
    sample, errors = parse_sample(good_sample())
    assert errors == []
    assert sample.face_order() == [2, 0, 1, 0]
    assert sample.prompt_face_order() == [2, 0, 1, 0]
    msgs = sample.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Faces: <face> <face> <face>. Who is this: <face>?"
    assert sample.answer == "Alice."
    assert sample.names_present() == ["Alice", "Bob"]
    assert sample.faces[1].box == (10.0, 10.0, 60.0, 70.0)


def test_bare_placeholders_map_in_order():
    raw = good_sample()
    raw["conversations"] = [
        {"from": "human", "value": "<face> and <face>"},
        {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "and <face>?"},
        {"from": "gpt", "value": "ok"},
    ]
    sample, errors = parse_sample(raw)
    assert errors == []
    assert sample.face_order() == [0, 1, 2]
    assert sample.messages(3)[-1] == {"role": "user", "content": "and <face>?"}


def _mutate(path_value):
    raw = good_sample()
    path, value = path_value
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


_DELETE = object()

BAD = [
    # (mutation (path, value), field named in the error, words in the message)
    ((("id",), ""), "id", "non-empty string"),
    ((("task",), "dance"), "task", "unknown task"),
    ((("colour",), "red"), "colour", "unknown field"),
    ((("conversations", 1, "from"), "robot"), "conversations[1].from", "unknown role"),
    ((("conversations", 2, "from"), "human"), "conversations[2].from", "expected an assistant turn"),
    (
        (("conversations", 1, "value"), "Who is <face_7>? <face_0> <face_1> <face_2>"),
        "conversations[1].value",
        "does not exist",
    ),
    ((("conversations", 1, "value"), "<face> <face_0> <face_1> <face_2>"), "conversations", "mixes"),
    ((("conversations", 1, "value"), "<face> <face>"), "conversations", "2 bare <face>"),
    ((("conversations", 1, "value"), "<face_0> <face_1>"), "faces", "[2] are never referenced"),
    ((("conversations", 1, "value"), "<face_0> <face_1> <face_2> <Face 1>"), "conversations[1].value", "malformed"),
    ((("conversations", 2, "value"), "It is <face_0>"), "conversations[2].value", "assistant turns"),
    ((("conversations",), []), "conversations", "non-empty list"),
    ((("faces", 1, "box"), [10, 10, 5, 70]), "faces[1].box", "x2 > x1"),
    ((("faces", 1, "box"), [10, 10, "a", 70]), "faces[1].box", "finite numbers"),
    ((("faces", 1, "box"), _DELETE), "faces[1]", "needs `box` or `landmarks`"),
    ((("faces", 1, "landmarks"), [[1, 2]] * 4), "faces[1].landmarks", "5 [x, y] points"),
    ((("faces", 1, "image"), 3), "faces[1].image", "out of range"),
    ((("faces", 2, "embedding"), -1), "faces[2].embedding", "row index"),
    ((("faces", 0, "crop"), _DELETE), "faces[0]", "no face source"),
    ((("faces", 0, "nickname"), "Al"), "faces[0].nickname", "unknown field"),
    ((("target",), {}), "target.names", "required for task 'naming'"),
    ((("target", "names"), "Alice"), "target.names", "expected list"),
]


@pytest.mark.parametrize(("mutation", "field", "words"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_samples_name_sample_and_field(mutation, field, words):
    raw = _mutate(mutation)
    with pytest.raises(VQAValidationError) as info:
        validate_samples([raw], source="bad.json")
    errors = info.value.errors
    assert any(f == field and words in msg for _, f, msg in errors), errors
    text = str(info.value)
    expected_id = raw["id"] if raw.get("id") else "#0"
    assert f"sample {expected_id!r}" in text and field in text and "bad.json" in text


def test_recognition_answer_must_be_yes_or_no_and_last_turn_is_answer():
    raw = good_sample()
    raw["task"], raw["target"] = "recognition", {"query": "Alice", "answer": "maybe"}
    raw["conversations"] = raw["conversations"][:2]
    _, errors = parse_sample(raw)
    fields = {f for _, f, _ in errors}
    assert {"target.answer", "conversations"} <= fields


def test_all_errors_reported_and_duplicates_caught():
    a, b, c = good_sample(), good_sample(), good_sample()
    c["id"] = "s3"
    c["faces"][1]["box"] = [0, 0, 0, 0]
    with pytest.raises(VQAValidationError) as info:
        validate_samples([a, b, c])
    errors = info.value.errors
    assert ("s1", "id", "duplicate id (also sample #0)") in errors
    assert any(sid == "s3" and f == "faces[1].box" for sid, f, _ in errors)


def test_json_and_jsonl_round_trip(tmp_path):
    raws = [good_sample(), {**copy.deepcopy(good_sample()), "id": "s2"}]
    samples = validate_samples(raws)
    (tmp_path / "a.json").write_text(dump_samples(samples))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(s.to_dict()) for s in samples) + "\n")
    assert load_samples(tmp_path / "a.json") == samples
    assert load_samples(tmp_path / "a.jsonl") == samples
    # LLaVA's single "image" key is accepted and becomes a one-element list.
    raw = good_sample()
    raw["image"] = raw.pop("images")[0]
    assert validate_samples([raw])[0].images == ("scene.jpg",)


def test_broken_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(good_sample()) + "\n{not json\n")
    with pytest.raises(VQAValidationError, match=r"line 2"):
        load_samples(path)
    (tmp_path / "y.json").write_text('{"id": "s1"}')
    with pytest.raises(VQAValidationError, match="JSON list"):
        load_samples(tmp_path / "y.json")


def test_check_files_reports_missing_paths_and_rows(tmp_path):
    sample = validate_samples([good_sample()])[0]
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "a.png").write_bytes(b"x")
    with pytest.raises(VQAValidationError) as info:
        check_files([sample], tmp_path, num_embeddings=2)
    fields = {f for _, f, _ in info.value.errors}
    assert fields == {"images[0]", "faces[2].embedding"}
    (tmp_path / "scene.jpg").write_bytes(b"x")
    check_files([sample], tmp_path, num_embeddings=4)
