"""The demo in a real browser: `lvface-mm demo --tiny` on localhost, driven by Playwright + Chromium.

Enrol a person, upload a photo and see the named face box and a streamed answer, index a small
collection and find the person in the search grid; screenshots go to tmp_path (and to
$LVFACE_MM_DEMO_SCREENSHOT when set, which is how docs/img/demo.png is made).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium; CI installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, Path]:
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    out = {"grace": folder / "grace.jpg", "astronaut": folder / "astronaut.jpg", "coffee": folder / "coffee.jpg",
           "broken": folder / "broken.jpg"}
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        im.convert("RGB").save(out["grace"], quality=90)
    Image.fromarray(data.astronaut()).save(out["astronaut"], quality=90)
    Image.fromarray(data.coffee()).save(out["coffee"], quality=90)
    out["broken"].write_bytes(out["grace"].read_bytes()[:3000])  # a truncated JPEG
    return out


@pytest.fixture
def demo_url(tmp_path: Path):
    """The --tiny demo, built through the CLI's own argument path, served from this process."""
    pytest.importorskip("gradio")
    from lvface_mm.cli import build_parser
    from lvface_mm.cli.demo import build_from_args

    port = free_port()
    args = build_parser().parse_args(["demo", "--tiny", "--db", str(tmp_path / "demo.db"), "--port", str(port),
                                      "--max-new-tokens", "12"])
    demo, launch = build_from_args(args)
    demo.launch(**launch, prevent_thread_lock=True)  # launch holds quiet=True already
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, 60)
        yield url
    finally:
        demo.close()
        demo.workbench_state.close()  # also removes the demo's private upload cache


def refused(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code in (403, 404)


def test_enrol_caption_and_search_in_chromium(demo_url, photos, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # the server hands out only its own upload cache: not the database, not arbitrary files
    for path in (tmp_path / "demo.db", Path("/etc/passwd"), photos["grace"]):
        assert refused(f"{demo_url}gradio_api/file={path}"), path

    long = 120_000  # ms; a loaded 2-core CI machine runs detection and the tiny VLM slowly
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(demo_url, wait_until="networkidle")

            # 1. enrol Grace from one photo
            page.locator("#enrol-name textarea, #enrol-name input").first.fill("Grace")
            page.locator("#enrol-files input[type=file]").set_input_files([str(photos["grace"])])
            expect(page.locator("#enrol-files")).to_contain_text("grace", timeout=long)  # upload finished
            page.locator("#enrol-btn").click()
            expect(page.locator("#enrol-out")).to_contain_text("Enrolled Grace from 1 photo", timeout=long)
            expect(page.locator("#people")).to_contain_text("Grace", timeout=long)
            expect(page.locator("#enrol-files")).not_to_contain_text("grace", timeout=long)  # the upload is gone
            page.get_by_role("button", name="Models").click()
            expect(page.locator("#status")).to_contain_text("gallery: 1 people", timeout=long)  # Models box refreshed

            # 1b. delete asks first: Cancel keeps her
            page.get_by_role("button", name="Rename or delete").click()
            page.locator("#manage-name textarea, #manage-name input").first.fill("Grace")
            page.locator("#delete-btn").click()
            expect(page.locator("#manage-out")).to_contain_text("cannot be undone", timeout=long)
            page.locator("#delete-cancel-btn").click()
            expect(page.locator("#manage-out")).to_contain_text("Nothing deleted", timeout=long)
            expect(page.locator("#people")).to_contain_text("Grace", timeout=long)

            # 2. her photo: the face is boxed and labelled with her name, the answer streams in
            page.get_by_role("tab", name="Caption & ask").click()
            page.locator("#ask-file input[type=file]").set_input_files([str(photos["grace"])])
            expect(page.locator("#ask-faces")).to_contain_text("Grace", timeout=long)
            page.locator("#caption-btn").click()
            expect(page.locator("#ask-info")).to_contain_text("prompt grounding", timeout=long)
            assert page.locator("#ask-answer textarea").input_value().strip() != ""
            info = page.locator("#ask-info").inner_text()
            assert "/tmp" not in info and "<array" not in info
            page.screenshot(path=str(tmp_path / "demo_caption.png"))

            # 3. index a small collection (one broken file) and find her by name
            page.get_by_role("tab", name="Search photos").click()
            page.locator("#index-files input[type=file]").set_input_files([str(p) for p in photos.values()])
            expect(page.locator("#index-files")).to_contain_text("coffee", timeout=long)
            page.locator("#index-btn").click()
            expect(page.locator("#index-out")).to_contain_text("Indexed 3 photo(s)", timeout=long)
            expect(page.locator("#index-out")).to_contain_text("broken.jpg: truncated or corrupt", timeout=long)
            page.locator("#search-query textarea, #search-query input").first.fill("Grace")
            page.locator("#search-btn").click()
            expect(page.locator("#search-out")).to_contain_text("1 photo(s) found", timeout=long)
            expect(page.locator("#search-grid img").first).to_be_visible(timeout=long)
            expect(page.locator("#search-grid")).to_contain_text("Grace", timeout=long)
            page.screenshot(path=str(tmp_path / "demo_search.png"), full_page=True)

            # 4. a corrupt photo as a face query gives a message naming the problem, and the app keeps serving
            page.locator("#search-face input[type=file]").set_input_files([str(photos["broken"])])
            expect(page.locator("#search-face")).to_contain_text("broken", timeout=long)
            page.locator("#search-btn").click()
            expect(page.locator("#search-out")).to_contain_text("truncated or corrupt", timeout=long)
        finally:
            browser.close()

    for name in ("demo_caption.png", "demo_search.png"):
        shot = tmp_path / name
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    from PIL import Image

    with Image.open(tmp_path / "demo_caption.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 20  # content, not a uniform colour
    target = os.environ.get("LVFACE_MM_DEMO_SCREENSHOT")
    if target:  # a 256-colour PNG keeps the guide's image small (a UI screenshot has few colours)
        with Image.open(tmp_path / "demo_caption.png") as im:
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
