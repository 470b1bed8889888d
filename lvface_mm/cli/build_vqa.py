"""`lvface-mm build-vqa`: identity-grounded VQA training and evaluation sets from labelled faces.

    lvface-mm build-vqa --source folder --path faces/ --embed lvface_b --out data/vqa
    lvface-mm build-vqa --source recordio --path glint/ --limit 20000 --embed lvface_b --out data/vqa
    lvface-mm build-vqa --source clusters --num-identities 40 --out data/vqa_tiny     # no images at all
    lvface-mm build-vqa --source scenes --num-identities 24 --out data/scenes         # identity + picture
    lvface-mm build-vqa --source clusters --open-set --out data/binding               # names from references

Writes train.json / eval.json (LLaVA-style samples), manifest.json, and embeddings.safetensors
(when the source has embeddings or `--embed` computes them), split so that evaluation photos and
evaluation-only people never appear in training. When a run fails, whatever it wrote is removed
(a folder it created goes entirely; in an existing folder only the new files go).

Exit status: 0 written, 2 bad arguments or the build failed (nothing left behind).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_DEFAULT_TASKS = "recognition,naming,caption,counting,unknown,text_qa"
SOURCES = ("folder", "recordio", "synthetic", "embeddings", "clusters", "scenes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("faces")
    src.add_argument(
        "--source",
        choices=SOURCES,
        required=True,
        help="folder: root/<identity>/<crop>; recordio: InsightFace .rec/.idx; synthetic: drawn "
        "identities; embeddings: safetensors with 'embeddings' and 'labels'; clusters: random "
        "identity clusters on the sphere (embeddings only, for smoke runs); scenes: procedural pictures of "
        "synthetic people holding objects, with open-set names (lvface_mm.vqa.scenes)",
    )
    src.add_argument("--path", help="the folder, .rec directory/prefix or embeddings file")
    src.add_argument("--limit", type=int, default=None, help="recordio: read only the first N images")
    src.add_argument("--num-identities", type=int, default=40, help="synthetic/clusters: identities to make")
    src.add_argument("--photos-per-identity", type=int, default=6, help="synthetic/clusters: photos each")
    src.add_argument("--dim", type=int, default=512, help="clusters: embedding width")
    src.add_argument(
        "--embed",
        metavar="MODEL",
        help="embed the crops with this encoder (e.g. lvface_b) and store the table, so training can skip the encoder",
    )
    src.add_argument("--embed-checkpoint", help="local encoder checkpoint for --embed")
    src.add_argument("--random-weights", action="store_true", help="--embed with a random (seeded) encoder")
    src.add_argument("--scenes", nargs="*", default=[], help="background photos: compose scene images from the crops")
    out = parser.add_argument_group("samples")
    out.add_argument("--out", required=True, help="output dataset directory")
    out.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    out.add_argument("--names", help="JSON file: identity label -> display name")
    out.add_argument("--attributes", help="JSON file: identity label -> {attribute: value} (text-only QA)")
    out.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks (default: recognition,naming,caption,counting,unknown,text_qa; "
        "scenes: region,naming,unknown,counting)",
    )
    out.add_argument("--num-enrolled", type=int, default=None)
    out.add_argument("--num-train-unknown", type=int, default=2)
    out.add_argument("--num-eval-unknown", type=int, default=2)
    out.add_argument("--eval-photos", type=int, default=1, help="held-out photos per enrolled identity")
    out.add_argument("--train-per-task", type=int, default=200)
    out.add_argument("--eval-per-task", type=int, default=50)
    out.add_argument("--max-faces", type=int, default=3)
    out.add_argument("--unknown-prob", type=float, default=0.3)
    out.add_argument("--negative-context-prob", type=float, default=0.3)
    out.add_argument("--seed", type=int, default=0)
    open_set = parser.add_argument_group("open-set binding (--open-set, and --source scenes)")
    open_set.add_argument(
        "--open-set",
        action="store_true",
        help="samples name people through the gallery's candidates and their reference tokens "
        "(lvface_mm.vqa.binding); evaluation people and names never occur in training",
    )
    open_set.add_argument("--name-pool", type=int, default=600, help="names generated per dataset")
    open_set.add_argument("--num-candidates", type=int, default=3, help="references shown per sample")
    open_set.add_argument("--num-eval-identities", type=int, default=8, help="people held out for evaluation")


def _read_json(path: str | None, what: str) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--{what}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--{what}: {path} must hold a JSON object")
    return data


def _photos(args: argparse.Namespace) -> list:
    from ..vqa import sources

    if args.source in ("folder", "recordio", "embeddings") and not args.path:
        raise ValueError(f"--source {args.source} needs --path")
    if args.source == "folder":
        return sources.folder_photos(args.path)
    if args.source == "recordio":
        return sources.recordio_photos(args.path, args.out, limit=args.limit)
    if args.source == "synthetic":
        return sources.synthetic_photos(args.out, args.num_identities, args.photos_per_identity, seed=args.seed)
    if args.source == "embeddings":
        return sources.embedding_table_photos(args.path)
    return sources.embedding_cluster_photos(args.num_identities, args.photos_per_identity, args.dim, seed=args.seed)


def _run_open_set(args: argparse.Namespace, out: Path) -> dict:
    from ..vqa.binding import BindingConfig, build_binding_vqa
    from ..vqa.scenes import SCENE_TASKS, ScenesConfig, build_scenes_vqa

    if args.source == "scenes":
        tasks = SCENE_TASKS if args.tasks is None else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        config = ScenesConfig(
            seed=args.seed,
            num_identities=args.num_identities,
            photos_per_identity=max(3, args.photos_per_identity),
            num_unseen=args.num_eval_identities,
            max_people=min(args.max_faces, 6),
            name_pool_size=args.name_pool,
            num_candidates=args.num_candidates,
            train_per_task=args.train_per_task,
            eval_per_task=args.eval_per_task,
            tasks=tasks,
        )
        return build_scenes_vqa(out, config, overwrite=args.overwrite)
    config = BindingConfig(
        seed=args.seed,
        num_eval_identities=args.num_eval_identities,
        name_pool_size=args.name_pool,
        num_candidates=args.num_candidates,
        train_per_task=args.train_per_task,
        eval_per_task=args.eval_per_task,
        max_faces=args.max_faces,
    )
    photos = _photos(args)
    if args.embed:
        from ..vqa.sources import embed_photos

        photos = embed_photos(photos, args.embed, checkpoint=args.embed_checkpoint, pretrained=not args.random_weights)
    return build_binding_vqa(photos, out, config, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    from ..vqa.builder import VQABuildConfig, build_vqa

    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.overwrite:
        print(f"{out} already holds a VQA dataset; pass --overwrite to replace it", file=sys.stderr)
        return 1
    if args.open_set or args.source == "scenes":
        try:
            manifest = _run_open_set(args, out)
        except (ValueError, FileNotFoundError) as exc:
            print(f"build-vqa: {exc}", file=sys.stderr)
            return 1
        print(f"{out}: {json.dumps(manifest['num_samples'])} samples ({manifest['kind']}, open-set names)")
        return 0
    try:
        config = VQABuildConfig(
            seed=args.seed,
            num_enrolled=args.num_enrolled,
            num_train_unknown=args.num_train_unknown,
            num_eval_unknown=args.num_eval_unknown,
            eval_photos_per_identity=args.eval_photos,
            tasks=tuple(t.strip() for t in (args.tasks or _DEFAULT_TASKS).split(",") if t.strip()),
            train_per_task=args.train_per_task,
            eval_per_task=args.eval_per_task,
            max_faces=args.max_faces,
            unknown_prob=args.unknown_prob,
            negative_context_prob=args.negative_context_prob,
            names=_read_json(args.names, "names"),
            attributes=_read_json(args.attributes, "attributes"),
        )
        photos = _photos(args)
        if args.embed:
            from ..vqa.sources import embed_photos

            photos = embed_photos(
                photos, args.embed, checkpoint=args.embed_checkpoint, pretrained=not args.random_weights
            )
        manifest = build_vqa(photos, out, config, scenes=args.scenes, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        print(f"build-vqa: {exc}", file=sys.stderr)
        return 1
    n = manifest["num_samples"]
    print(
        f"{out}: {n['train']} training and {n['eval']} evaluation samples; {len(manifest['enrolled'])} enrolled, "
        f"{len(manifest['train_unknown'])} + {len(manifest['eval_unknown'])} unknown identities"
    )
    return 0


_build = run  # the build itself; `run` below adds the exit statuses and the clean-up


def run(args: argparse.Namespace) -> int:  # noqa: F811 - wraps the build above
    """Build, and on any failure (an error, an exception, Ctrl-C) remove what this run wrote."""
    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.overwrite:
        print(f"error: {out} already holds a VQA dataset; pass --overwrite to replace it", file=sys.stderr)
        return 2
    existed = out.exists()
    before = set(out.rglob("*")) if existed else set()
    done = False
    try:
        done = _build(args) == 0
    finally:
        if not done:
            _remove_new(out, existed, before)
    return 0 if done else 2  # the build has no partial success: a failure means nothing was made


def _remove_new(out: Path, existed: bool, before: set[Path]) -> None:
    """Undo a failed run: drop the folder it created, or the files it added to an existing one."""
    import shutil

    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in sorted(set(out.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
