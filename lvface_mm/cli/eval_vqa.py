"""`lvface-mm eval vqa`: the identity-grounded VQA harness on a dataset from `lvface-mm build-vqa`.

    lvface-mm eval vqa --data data/vqa --adapter runs/llava-id/adapter --out reports/vqa
    lvface-mm eval vqa --data data/vqa --vlm llava-1.5-7b --modes prompt,plain       # no adapter yet

Answers every evaluation sample with token grounding (the adapter's identity tokens), prompt
grounding (a gallery enrolled from the training photos, calibrated at --far) and the plain model,
and writes report.json, report.md, report.png and answers.json to --out. Unless --no-text-retention,
it also asks general text-only questions (no face) of the trained model and of its base (LoRA off)
and reports both `text_qa` accuracies and their difference (columns "text-only" and "text-only base").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument(
        "--adapter", help="adapter directory written by training/adapter.py (or IdentityVLM.save_pretrained)"
    )
    m.add_argument(
        "--vlm",
        help="card name/path or model id when no --adapter is given (token mode then uses an "
        "untrained projector: the chance-level control)",
    )
    m.add_argument("--encoder", help="LVFace encoder name (default: the card's)")
    m.add_argument("--gguf-file", help="GGUF file inside the model directory")
    m.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, help="dataset directory (manifest.json, train.json, eval.json)")
    d.add_argument(
        "--split",
        default="eval",
        choices=("eval", "eval_seen", "train"),
        help="which samples to answer (eval_seen: scenes' people seen in training, under unseen names)",
    )
    d.add_argument(
        "--face-input",
        choices=("embedding", "crop"),
        default=None,
        help="faces from the embedding table or from crops (default: embedding when the table exists)",
    )
    r = parser.add_argument_group("harness")
    r.add_argument(
        "--modes", default="token,prompt,plain", help="comma-separated: token, prompt, som, token+prompt, plain"
    )
    r.add_argument("--max-per-task", type=int, default=None, help="answer at most N samples per task")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--far", type=float, default=1e-3, help="FAR of the prompt-grounding gallery threshold")
    r.add_argument(
        "--no-text-retention",
        dest="text_retention",
        action="store_false",
        help="skip the text-only retention check (general questions without faces, trained model vs its base)",
    )
    r.add_argument("--out", required=True, help="report directory")


def _load_vlm(args: argparse.Namespace):  # noqa: ANN202 - IdentityVLM, imported lazily
    from ..vqa.harness import load_trained_vlm

    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    if args.encoder:
        kwargs["encoder"] = args.encoder
    if args.adapter:
        return load_trained_vlm(args.adapter, **kwargs)
    if not args.vlm:
        raise ValueError("give --adapter (a trained adapter) or --vlm (a card or model id)")
    from ..vlm import IdentityVLM

    vlm = IdentityVLM.from_pretrained(args.vlm, **kwargs)
    vlm.model.eval()
    return vlm


def run(args: argparse.Namespace) -> int:
    import torch

    from ..vqa.builder import load_manifest
    from ..vqa.data import FaceStore
    from ..vqa.harness import HarnessConfig, ReferenceGallery, build_gallery, run_modes
    from ..vqa.report import write_report
    from ..vqa.schema import load_samples

    try:
        root = Path(args.data)
        manifest = load_manifest(root)
        config = HarnessConfig(
            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            far=args.far,
            max_per_task=args.max_per_task,
        )
        face_input = args.face_input or ("embedding" if manifest.get("embeddings") else "crop")
        faces = FaceStore.open(root, face_input)
        train = load_samples(root / "train.json")
        samples = train if args.split == "train" else load_samples(root / f"{args.split}.json")
        vlm = _load_vlm(args)
        if args.device:
            vlm.model.to(torch.device(args.device))
            vlm.adapter.to(torch.device(args.device))
        needs_gallery = {"prompt", "som", "token+prompt"} & set(config.modes)
        if any("references" in s.meta for s in samples):  # open-set: each sample's own candidates
            gallery = ReferenceGallery.calibrated(train, faces, vlm.adapter, far=args.far)
        else:
            gallery = build_gallery(train, faces, vlm.adapter, far=args.far) if needs_gallery else None
        results, answers = run_modes(vlm, samples, faces, config, gallery, manifest["vocabulary"])
        retention = None
        if args.text_retention:
            from ..vqa.retention import text_retention

            retention = text_retention(vlm, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    except (ValueError, FileNotFoundError) as exc:
        print(f"eval vqa: {exc}", file=sys.stderr)
        return 1
    info = {
        "model": vlm.config.name,
        "adapter": args.adapter or "none (untrained projector)",
        "data": str(root),
        "split": args.split,
        "face_input": face_input,
    }
    paths = write_report(results, args.out, info=info, retention=retention)
    (Path(args.out) / "answers.json").write_text(json.dumps(answers, indent=2) + "\n", encoding="utf-8")
    print(paths["markdown"].read_text(encoding="utf-8"))
    return 0
