"""Checks the demo runs before any model loads, so a machine without network or weights gets one
clear message in seconds instead of a traceback (or a minute of Hub retries).

- `network_reachable`: can this machine open a TCP connection to the Hub at all (bounded wait)?
- `missing_files`: which weights of a `WorkbenchConfig` are neither local files nor in the
  Hugging Face cache, each with the command that fetches it. Nothing here downloads.
- `go_offline`: make huggingface_hub and transformers fail fast instead of retrying.

(A shared helper for the same check is planned in `lvface_mm.models.pretrained`; this module keeps
the demo's own minimal version until then.)
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MissingFile", "go_offline", "hub_offline", "missing_files", "network_reachable", "offline_message"]

HUB_HOST, HUB_PORT = "huggingface.co", 443  # read at call time (tests point them at a closed local port)
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class MissingFile:
    part: str  # "face encoder", "CLIP" or "VLM" (the Workbench's part names)
    what: str  # the repo file or local path that is missing
    fetch: str  # what to run or pass to get it


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def network_reachable(host: str | None = None, port: int | None = None, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to host:port (default: the Hub) opens within `timeout` seconds, DNS
    included. The probe runs in a daemon thread because a stuck DNS lookup ignores socket timeouts."""
    host = HUB_HOST if host is None else host
    port = HUB_PORT if port is None else port
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="lvface-demo-network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    """Tell huggingface_hub and transformers not to try the network (env for later imports, and the
    hub's constant when it is imported already)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def _in_hub_cache(repo_id: str, filename: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return isinstance(found, str) and Path(found).is_file()


def _face_missing(config: Any) -> list[MissingFile]:
    if config.face_checkpoint is not None:
        path = Path(config.face_checkpoint)
        if path.is_file():
            return []
        return [MissingFile("face encoder", str(path), "pass an existing LVFace checkpoint to --checkpoint")]
    from ..models.registry import get_model_spec

    try:
        weights = get_model_spec(config.face_model).weights
    except (KeyError, ValueError):
        return []  # an unknown variant is reported by the loader with the list of known ones
    if weights is None or _in_hub_cache(weights.repo_id, weights.filename, weights.revision):
        return []
    return [MissingFile("face encoder", f"{weights.repo_id}/{weights.filename}",
                        f"hf download {weights.repo_id} {weights.filename} --revision {weights.revision}")]


def _clip_missing(config: Any) -> list[MissingFile]:
    tag = config.clip_pretrained
    if tag is None or os.path.isfile(tag):
        return []
    if os.sep in tag or tag.endswith((".bin", ".pt", ".safetensors")):
        return [MissingFile("CLIP", tag, "pass an existing open_clip weights file to --clip-pretrained")]
    try:
        from open_clip.pretrained import get_pretrained_cfg
    except ImportError:
        return []  # the loader reports the missing package
    hub = (get_pretrained_cfg(config.clip_model, tag) or {}).get("hf_hub", "")
    repo, filename = os.path.split(hub)
    if not repo:
        return []  # not a Hub tag: the loader names the problem
    # open_clip takes the safetensors twin first, then the named file; either one is enough.
    filename = filename or "open_clip_pytorch_model.bin"
    safe = filename.rsplit(".", 1)[0].replace("pytorch_model", "model") + ".safetensors"
    if _in_hub_cache(repo, safe) or _in_hub_cache(repo, filename):
        return []
    return [MissingFile("CLIP", f"{repo}/{safe}", f"hf download {repo} {safe}")]


def _vlm_missing(config: Any) -> list[MissingFile]:
    name = config.vlm
    if name is None or Path(name).is_dir():
        return []
    repo = name
    if Path(name).suffix == ".json" or "/" not in name:  # an adapter card: check the model it names
        try:
            from ..vlm.config import load_adapter_card

            card = load_adapter_card(name)
        except (FileNotFoundError, ValueError, ImportError):
            return []  # the loader reports a bad card
        if Path(card.vlm_id).is_dir():
            return []
        repo = card.vlm_id
    if _in_hub_cache(repo, "config.json"):
        return []
    return [MissingFile("VLM", repo, f"hf download {repo}")]


def missing_files(config: Any) -> list[MissingFile]:
    """Weights of `config` (a `WorkbenchConfig`) that are neither local files nor cached; no network."""
    if config.tiny:
        return []
    return [*_face_missing(config), *_clip_missing(config), *_vlm_missing(config)]


def offline_message(missing: list[MissingFile], reason: str) -> str:
    """The one message printed (and shown on the page) when weights are missing offline."""
    lines = [f"Offline ({reason}); these model files are not on this machine:"]
    lines += [f"  - {m.part}: {m.what}   (fetch: {m.fetch})" for m in missing]
    lines.append("Fetch them on a machine with internet and copy its Hugging Face cache (HF_HOME) here. "
                 "Start with HF_HUB_OFFLINE=1 to skip the network check.")
    return "\n".join(lines)
