"""A built wheel works on its own: it holds the adapter cards and the demo app, and, installed
outside the checkout, `lvface-mm --help`, card lookup by name and `lvface-mm demo --tiny` work.

The wheel is built from a copy of the sources (nothing is written into the checkout) with the
current environment's setuptools, and installed with `pip install --no-deps --target DIR`; its
dependencies come from this environment. Commands run from a folder outside the repository with
PYTHONPATH=DIR, so nothing can be imported from the checkout by accident.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists packages by hand (the card folder is mapped); a new subpackage must be added."""
    find_packages = pytest.importorskip("setuptools").find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set(find_packages(str(ROOT), include=["lvface_mm*"]))
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"] == {"lvface_mm.adapter_cards": "adapters"}
    assert not list((ROOT / "adapters").glob("tiny-*.json")), "tiny test cards are made in code, not shipped"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="builds without isolation (offline) with this environment's setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lvface_mm", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(out)], check=True, cwd=src, timeout=300)
    (built,) = out.glob("lvface_mm-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(target folder, environment for subprocesses, a working folder outside the repository)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    return target, env, tmp_path_factory.mktemp("elsewhere")


def test_wheel_holds_the_cards_and_the_demo_app(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    cards = {Path(n).name for n in names if n.startswith("lvface_mm/adapter_cards/")}
    shipped = {p.name for p in (ROOT / "adapters").iterdir() if p.suffix in (".json", ".md")}
    assert cards == shipped and "smolvlm-256m-instruct.json" in cards
    assert not any(Path(n).name.startswith("tiny-") for n in names)
    for module in ("app", "state", "startup", "cache"):
        assert f"lvface_mm/demo/{module}.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lvface-mm = lvface_mm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


CHECK = """
import lvface_mm, sys
from pathlib import Path
assert Path(lvface_mm.__file__).is_relative_to(sys.argv[1]), lvface_mm.__file__
from lvface_mm.vlm import list_adapter_cards, load_adapter_card
from lvface_mm.vlm.config import default_card_dir
assert default_card_dir().is_relative_to(sys.argv[1]), default_card_dir()
assert load_adapter_card("smolvlm-256m-instruct").vlm_id == "HuggingFaceTB/SmolVLM-256M-Instruct"
assert {"llava-1.5-7b", "qwen2-vl-2b-instruct"} <= set(list_adapter_cards())
assert not [n for n in list_adapter_cards() if n.startswith("tiny-")]
from lvface_mm.demo import build_demo
from lvface_mm.gallery.workbench import WorkbenchConfig
demo = build_demo(WorkbenchConfig(db="w.db", tiny=True))
demo.workbench_state.close()
print("installed wheel OK")
"""


def test_installed_wheel_finds_cards_and_builds_the_demo(installed):
    target, env, cwd = installed
    done = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "installed wheel OK" in done.stdout
    helped = subprocess.run([str(target / "bin" / "lvface-mm"), "demo", "--help"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--tiny" in helped.stdout and "--keep-minutes" in helped.stdout


@pytest.mark.slow  # about 60 s more on a loaded 2-core machine; the default run keeps the suite short
def test_installed_entry_point_serves_the_tiny_demo(installed):
    target, env, cwd = installed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = cwd / "tmp"  # the demo's private upload cache is made here
    tmp.mkdir()
    proc = subprocess.Popen([str(target / "bin" / "lvface-mm"), "demo", "--tiny", "--db", "demo.db",
                             "--port", str(port)], cwd=cwd, env={**env, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                assert time.monotonic() < deadline, "the demo did not answer within 180 s"
                time.sleep(0.5)
        assert "LVFace-MM" in page
        assert len(list(tmp.glob("lvface-demo-*"))) == 1
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "share=True" not in output and "Traceback" not in output
    assert f"demo on http://127.0.0.1:{port}/" in output
    assert proc.returncode == 0 and not list(tmp.glob("lvface-demo-*"))  # SIGTERM: a clean stop, cache removed
