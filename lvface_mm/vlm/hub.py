"""Identity adapters on the Hugging Face Hub: find a saved adapter by path or repo id, push one, write its card.

A saved identity adapter is one folder (see `IdentityAdapter.save_pretrained`):

    identity_adapter_config.json     the adapter card (which VLM, encoder, projector, K, LoRA)
    identity_adapter.safetensors     the trained projector
    adapter_config.json              PEFT LoRA of the LLM (when it was fine-tuned) ...
    adapter_model.safetensors        ... its weights, loadable with `PeftModel.from_pretrained`
    placeholder_rows.safetensors     the embedding rows added for the placeholder (when the table grew)
    README.md                        the model card

`resolve_adapter("user/repo", revision=...)` downloads exactly these files through `snapshot_download`
into the Hugging Face cache (pinned revisions, tokens and offline mode are huggingface_hub's);
`push_to_hub` stages the same folder and hands it to `HfApi.upload_folder`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.pretrained import WeightsNotAvailableError
from .config import CONFIG_NAME

WEIGHTS_NAME = "identity_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
ROWS_NAME = "placeholder_rows.safetensors"
README_NAME = "README.md"
# Everything an adapter repo may hold that loading uses; other files (training logs, ...) are not fetched.
ADAPTER_PATTERNS = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    ROWS_NAME,
    README_NAME,
    "*/*.json",
    "*/*.safetensors",
)


def is_repo_id(value: str) -> bool:
    """ "user/name" with no local meaning: not an existing path, exactly one slash, no leading dot."""
    text = str(value)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def resolve_adapter(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local folder of a saved identity adapter: `path_or_repo_id` itself, or its Hub snapshot.

    Args:
        path_or_repo_id: a folder written by `save_pretrained`, or a Hub model repo id ("user/repo").
        revision: branch, tag or commit of the repo (pin a commit for reproducible loads).
        token: Hub token for private repos (None: the logged-in user's).
        cache_dir: Hugging Face cache folder (None: `HF_HUB_CACHE`).
        local_files_only: never touch the network (also implied by `HF_HUB_OFFLINE=1`).

    Raises:
        FileNotFoundError: the folder (or the snapshot) lacks a file an adapter needs; names it.
        WeightsNotAvailableError: the repo is not cached and cannot be downloaded (offline, no
            network, no access); says what to fetch and where to put it.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given for the local folder {path}; revisions are for repo ids")
        return check_adapter_folder(path, str(path))
    if not is_repo_id(str(path_or_repo_id)):
        raise FileNotFoundError(
            f"{str(path_or_repo_id)!r} is neither a saved identity adapter folder nor a Hub repo id ('user/name')"
        )
    from huggingface_hub import snapshot_download

    repo_id = str(path_or_repo_id)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            allow_patterns=list(ADAPTER_PATTERNS),
        )
    except Exception as exc:  # offline, no network, no access: huggingface_hub raises several types
        raise WeightsNotAvailableError(not_available_message(repo_id, revision, cache_dir, exc)) from exc
    where = f"{repo_id} at revision {revision or 'main'}"
    return check_adapter_folder(Path(folder), where)


def check_adapter_folder(folder: Path, where: str) -> Path:
    """`folder` when it holds a complete adapter; else a FileNotFoundError naming the missing file."""
    required = [CONFIG_NAME, WEIGHTS_NAME]
    if (folder / PEFT_CONFIG_NAME).is_file():
        required.append(PEFT_WEIGHTS_NAME)  # a LoRA config without its weights is half an adapter
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{where} is not a complete identity adapter: missing {', '.join(missing)} "
            f"(a saved adapter has {CONFIG_NAME} and {WEIGHTS_NAME}, plus {PEFT_CONFIG_NAME} and "
            f"{PEFT_WEIGHTS_NAME} when the LLM was fine-tuned with LoRA)"
        )
    return folder


def not_available_message(
    repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None, exc: Exception
) -> str:
    """The encoder weights' offline message, for an adapter repo: what to fetch and where it goes."""
    from huggingface_hub import constants

    offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)() or os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ).lower() in ("1", "true", "yes", "on")
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    rev = revision or "main"
    target = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "<commit>"
    reason = "HF_HUB_OFFLINE is set and it is not cached" if offline else f"{exc.__class__.__name__}: {exc}"
    # "runs/adapter" reads as a repo id too: say so when it was probably a mistyped folder.
    local = f"\n(No local folder {repo_id!r} exists either, if a folder was meant.)"
    return (
        f"identity adapter {repo_id} (revision {rev}) is not available ({reason}).\n"
        f"Fetch it on a machine with internet access:\n"
        f"  hf download {repo_id} --revision {rev}\n"
        f"then copy that machine's Hugging Face cache folder here (set HF_HUB_CACHE to it); it lands in\n"
        f"  {target}\n"
        f"or pass the adapter folder directly: IdentityVLM.from_pretrained(model, adapter='/path/to/adapter')."
        f"{local}"
    )


def push_folder(
    save: Callable[[Path], Any],
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload identity adapter",
    create_pr: bool = False,
) -> Any:
    """Stage the adapter with `save(folder)` in a temporary folder and upload that folder as one commit.

    The staging is ours (exactly the files `save_pretrained` writes); creating the repo and uploading
    are huggingface_hub's (`HfApi.create_repo(exist_ok=True)`, `HfApi.upload_folder`). Returns the
    commit info `upload_folder` returns.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lvface-adapter-") as tmp:
        folder = Path(tmp)
        save(folder)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            repo_type="model",
        )


__all__ = [
    "ADAPTER_PATTERNS",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "README_NAME",
    "ROWS_NAME",
    "WEIGHTS_NAME",
    "check_adapter_folder",
    "is_repo_id",
    "not_available_message",
    "push_folder",
    "resolve_adapter",
]
