"""Official LVFace weights: where they live, how to verify them, and the preprocessing they expect.

Facts from the LVFace release (reference/lvface.md §4-5): the weights are on the Hugging Face Hub
in `bytedance-research/LVFace`, one folder per model, pinned here at the revision third parties use.
sha256 and sizes are those published for the files; where a hash is not known it is None and the
download is accepted on size alone (or unchecked when the size is unknown too).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

HUB_REPO = "bytedance-research/LVFace"
HUB_REVISION = "b12702ab1f5c721748e054a66dc90e1edd1f0724"

# ArcFace 5-point template for 112x112 crops: left eye, right eye, nose tip, left and right mouth
# corner (in the image, "left" is the subject's right eye). InsightFace's `norm_crop` template.
ARCFACE_TEMPLATE_112: tuple[tuple[float, float], ...] = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


@dataclass(frozen=True)
class Preprocessing:
    """How a crop must look before it enters the encoder."""

    input_size: int = 112
    mean: float = 127.5  # RGB, (x - 127.5) / 127.5 -> [-1, 1]
    std: float = 127.5
    channel_order: str = "RGB"
    template: tuple[tuple[float, float], ...] = ARCFACE_TEMPLATE_112


@dataclass(frozen=True)
class PretrainedWeights:
    """One downloadable checkpoint: a file in a Hub repo at a pinned revision."""

    filename: str  # path inside the repo, for the PyTorch state dict
    sha256: str | None
    num_bytes: int | None
    onnx_filename: str
    onnx_sha256: str | None
    onnx_num_bytes: int | None
    repo_id: str = HUB_REPO
    revision: str = HUB_REVISION
    train_data: str = "Glint360K"
    license_note: str = (
        "code MIT; the release README says the weights are for non-commercial research only "
        "(the Hub card says MIT). Glint360K is research-only."
    )
    preprocessing: Preprocessing = Preprocessing()

    def url(self, onnx: bool = False) -> str:
        name = self.onnx_filename if onnx else self.filename
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{name}"


def _official(size: str, pt: tuple[str | None, int | None], onnx: tuple[str | None, int | None]) -> PretrainedWeights:
    folder = f"LVFace-{size}_Glint360K"
    return PretrainedWeights(
        filename=f"{folder}/{folder}.pt",
        sha256=pt[0],
        num_bytes=pt[1],
        onnx_filename=f"{folder}/{folder}.onnx",
        onnx_sha256=onnx[0],
        onnx_num_bytes=onnx[1],
    )


OFFICIAL_WEIGHTS: dict[str, PretrainedWeights] = {
    "lvface_t": _official(
        "T", (None, None), ("bf8da0e1e93c432d9a1d874a9ba0990f5859f970e8864b3990f2f33d11f9cdb3", 76_653_813)
    ),
    "lvface_s": _official(
        "S", (None, None), ("cd09f27c82ce0a3633fb8b1966d779a7171b23aa4f14ca0de6edf9677573d119", 304_196_926)
    ),
    "lvface_b": _official(
        "B",
        ("143ded01bf5794aafff91fcd1e3f3408bfbf6b890fc8482274f1c97a82fa7542", 455_445_494),
        ("9d834ed8e927fd35b9123b2bf97c40aad05785b1f9ecfb1c4c1f6242d38d1382", 455_533_594),
    ),
    "lvface_l": _official(
        "L", (None, None), ("49389036a4a5b69e0efcddfe34839ac72c7a71ce6b4dc1b6821e2ac368c87063", 1_022_938_188)
    ),
}


class WeightsNotAvailableError(RuntimeError):
    """Raised when weights are neither cached nor downloadable (offline)."""


class WeightsVerificationError(ValueError):
    """Raised when a downloaded or cached weights file has the wrong size or sha256."""


def sha256_of(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# Checks already passed in this process, keyed by file identity (real path, size, mtime) and the
# expectations: hashing 455 MB costs about a second, and a model is often created several times.
_VERIFIED: set[tuple[str, int, int, str | None, int | None]] = set()


def verify_file(path: str | Path, expected_sha256: str | None, expected_bytes: int | None) -> None:
    """Check size and sha256 of a weights file; raise `WeightsVerificationError` naming both values."""
    path = Path(path)
    stat = path.stat()
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected_sha256, expected_bytes)
    if key in _VERIFIED:
        return
    hint = "delete it and fetch it again"
    if expected_bytes is not None and stat.st_size != expected_bytes:
        raise WeightsVerificationError(
            f"{path}: {stat.st_size} bytes, expected {expected_bytes} (incomplete or wrong file; {hint})"
        )
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise WeightsVerificationError(
                f"{path}: sha256 {actual}, expected {expected_sha256} (corrupt or wrong file; {hint})"
            )
    _VERIFIED.add(key)


def _file_and_checks(weights: PretrainedWeights, onnx: bool) -> tuple[str, str | None, int | None]:
    if onnx:
        return weights.onnx_filename, weights.onnx_sha256, weights.onnx_num_bytes
    return weights.filename, weights.sha256, weights.num_bytes


def cached_weights_path(
    weights: PretrainedWeights, cache_dir: str | Path | None = None, onnx: bool = False
) -> Path | None:
    """The local file of these weights if it is already in the Hugging Face cache, else None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    filename = _file_and_checks(weights, onnx)[0]
    found = try_to_load_from_cache(weights.repo_id, filename, cache_dir=cache_dir, revision=weights.revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def fetch_weights(weights: PretrainedWeights, cache_dir: str | Path | None = None, onnx: bool = False) -> Path:
    """Return a local, verified path to the weights, downloading into the Hugging Face cache if needed.

    The file is taken from `weights.repo_id` at the pinned `weights.revision` and checked against the
    known size and sha256 (each check is skipped where the value is not published).

    Args:
        weights: the record, e.g. `get_model_spec("lvface_b").weights`.
        cache_dir: Hugging Face cache folder; None uses the default (`HF_HUB_CACHE` / `HF_HOME`).
        onnx: fetch the official `.onnx` file instead of the PyTorch state dict.

    Raises:
        WeightsNotAvailableError: offline (or no network) and not cached; the message says which file
            to fetch and where to put it.
        WeightsVerificationError: the file has the wrong size or sha256.
    """
    filename, sha, size = _file_and_checks(weights, onnx)
    from huggingface_hub import hf_hub_download

    cached = cached_weights_path(weights, cache_dir=cache_dir, onnx=onnx)
    if cached is None and not hub_offline() and not hub_reachable():
        # Without this check the hub client retries for half a minute, printing "Retrying" pages.
        reason = f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached and the file is not cached; " \
                 "set HF_HUB_OFFLINE=1 to use only the local cache without trying the network"
        raise WeightsNotAvailableError(_not_available_message(weights, filename, cache_dir, reason))
    try:
        path = cached or Path(hf_hub_download(weights.repo_id, filename, revision=weights.revision,
                                              cache_dir=cache_dir))
    except Exception as exc:  # offline the hub raises several types (LocalEntryNotFoundError, HTTP, OS errors)
        reason = "HF_HUB_OFFLINE is set and the file is not cached" if hub_offline() else \
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise WeightsNotAvailableError(_not_available_message(weights, filename, cache_dir, reason)) from exc
    verify_file(path, sha, size)
    return path


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks the Hugging Face libraries never to touch the network."""
    from huggingface_hub import constants

    flag = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
    return bool(flag) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The Hub URL in use (``HF_ENDPOINT`` when set, else https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_reachable(timeout: float = 3.0, endpoint: str | None = None) -> bool:
    """Whether a connection to the Hub (or to the HTTPS proxy set in the environment) opens within
    ``timeout`` seconds. Never raises. Call it before a download that is not cached: unreachable, the
    Hugging Face clients retry for 30-90 s before failing, which on an offline machine only delays
    the message saying which files to fetch. (Name resolution runs in a thread, so a dead DNS server
    cannot stretch the wait past ``timeout`` either.)"""
    import socket
    import threading
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    url = urlsplit(endpoint or hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and host not in ("localhost", "127.0.0.1", "::1") and not proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    if not host:
        return False
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True, name="hub-reachable")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def ensure_hub_reachable(files: list[str] | tuple[str, ...], timeout: float = 3.0) -> None:
    """Raise ``WeightsNotAvailableError`` at once, naming ``files`` and HF_HUB_OFFLINE=1, when the Hub
    cannot be reached; do nothing when it can, or when HF_HUB_OFFLINE is set (the libraries then
    fail fast on their own). For callers about to fetch files that are not cached."""
    if hub_offline() or hub_reachable(timeout):
        return
    raise WeightsNotAvailableError(
        f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached within {timeout:g} s, and these files are not "
        f"in the local cache: {', '.join(files)}. Fetch them on a machine with internet access and copy its "
        "Hugging Face cache (HF_HOME) here; set HF_HUB_OFFLINE=1 to use only the local cache without trying the "
        "network.")


def _not_available_message(
    weights: PretrainedWeights, filename: str, cache_dir: str | Path | None, reason: str
) -> str:
    from huggingface_hub import constants

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    target = cache / f"models--{weights.repo_id.replace('/', '--')}" / "snapshots" / weights.revision / filename
    return (
        f"LVFace weights {filename} are not available ({reason}).\n"
        f"Fetch them on a machine with internet access:\n"
        f"  hf download {weights.repo_id} {filename} --revision {weights.revision}\n"
        f"  (or download {weights.url(filename.endswith('.onnx'))})\n"
        f"then copy that machine's Hugging Face cache folder here (set HF_HUB_CACHE to it), or put the file at\n"
        f"  {target}\n"
        f"or pass it directly: create_model(name, checkpoint_path='/path/to/{Path(filename).name}') "
        f"/ --checkpoint on the command line."
    )
