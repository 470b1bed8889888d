"""One image loader: the VLM path (`IdentityVLM.ask` -> `vlm.model.load_image`) and the FaceEmbedder
decode a photo through `faces.image_io`, so both see an EXIF-rotated JPEG the same way up."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lvface_mm.faces import load_image
from tests._faces_fixtures import portrait

vlm_model = pytest.importorskip("lvface_mm.vlm.model", reason="the [vlm] extra is not installed")


@pytest.fixture
def rotated_jpeg(tmp_path):
    """A portrait stored lying on its side with EXIF orientation 6 ("rotate 90 degrees clockwise to show")."""
    upright = portrait("obama")
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    return path, upright


def test_exif_rotated_jpeg_gives_the_same_pixels_through_both_paths(rotated_jpeg):
    path, upright = rotated_jpeg
    via_embedder = load_image(path).array
    via_vlm = vlm_model.load_image(path)
    assert via_vlm.shape == via_embedder.shape == upright.shape  # upright again, not lying on its side
    assert np.array_equal(via_vlm, via_embedder)
    with Image.open(path) as im:  # a PIL image carrying the EXIF tag: same answer
        assert np.array_equal(vlm_model.load_image(im), via_embedder)
    # And it is the photo itself, up to JPEG noise.
    assert np.abs(via_vlm.astype(int) - upright.astype(int)).mean() < 4


def test_vlm_loader_keeps_its_array_contract_and_names_bad_files(tmp_path):
    array = np.zeros((8, 9, 3), np.uint8)
    assert vlm_model.load_image(array) is not None and vlm_model.load_image(array).shape == (8, 9, 3)
    with pytest.raises(ValueError, match=r"image arrays must be \(H, W, 3\) uint8 RGB"):
        vlm_model.load_image(array[..., 0])
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: not an image"):
        vlm_model.load_image(broken)
