"""Shared test setup: offline, seeded, single-threaded-friendly. Area-specific fixtures live in
the area's own test modules or in `tests/_<area>_fixtures.py`."""

from __future__ import annotations

import os
import random

import pytest

# Tests never reach the network or a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_restore() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def single_thread():
    """Run tiny models on one intra-op thread: at these sizes threads only add synchronisation,
    which on a busy 2-core machine costs more than the work itself. Restored afterwards.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory) -> None:
    """FaceEmbedder(backend="auto") exports encoders into this session's folder, never ~/.cache."""
    os.environ["LVFACE_MM_ONNX_CACHE"] = str(tmp_path_factory.mktemp("onnx_cache"))


@pytest.fixture(scope="session")
def data_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "data")
