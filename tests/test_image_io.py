"""Image loading: every kind of file a photo folder holds becomes RGB uint8 or a clear error naming it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvface_mm.faces import ImageLoadError, load_image
from lvface_mm.faces.image_io import array_to_rgb, describe_source
from tests._faces_fixtures import portrait, portrait_path


def rgb(path_or_image, **kwargs) -> np.ndarray:
    loaded = load_image(path_or_image, **kwargs)
    assert loaded.array.dtype == np.uint8 and loaded.array.ndim == 3 and loaded.array.shape[2] == 3
    assert loaded.array.flags.c_contiguous
    return loaded.array


def test_jpeg_portrait_loads_as_rgb():
    loaded = load_image(portrait_path("obama"))
    assert loaded.array.shape == (640, 512, 3)
    assert loaded.original_size == (512, 640) and loaded.scale == 1.0
    assert loaded.source.endswith("obama.jpg")


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = rgb(tmp_path / "g.png")
    assert out.shape == (10, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    Image.fromarray(gray > 128).save(tmp_path / "bw.png")  # 1-bit
    assert set(np.unique(rgb(tmp_path / "bw.png"))) == {0, 255}


def test_rgba_is_composited_on_black(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[0, :, 3] = 255  # opaque row
    a[1, :, 3] = 0  # transparent row
    a[2:, :, 3] = 128  # half
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])
    np.testing.assert_allclose(out[2, 0], np.round(np.array([200, 100, 50]) * 128 / 255), atol=1)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    import cv2

    gray16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(rgb(tmp_path / "g16.png")[0, :, 0], [0, 1, 128, 255])
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[0, 0] = (40000, 20000, 65535)  # written by OpenCV in BGR order
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    np.testing.assert_allclose(rgb(tmp_path / "rgb16.png")[0, 0], [255, 78, 156], atol=1)


def test_palette_with_and_without_transparency(tmp_path):
    base = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))
    pal = base.convert("P", palette=Image.ADAPTIVE, colors=2)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(rgb(tmp_path / "p.png")[0], [[255, 0, 0], [0, 0, 255]])
    red_index = pal.getpixel((0, 0))
    pal.save(tmp_path / "pt.png", transparency=red_index)
    np.testing.assert_array_equal(rgb(tmp_path / "pt.png")[0], [[0, 0, 0], [0, 0, 255]])


def test_cmyk_jpeg_converts(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    out = rgb(tmp_path / "c.jpg")
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60


def test_multiframe_gif_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = rgb(tmp_path / "anim.gif")
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.open(portrait_path("obama2")).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.array.shape == (upright.height, upright.width, 3)
    assert loaded.original_size == upright.size
    diff = np.abs(loaded.array.astype(int) - np.asarray(upright).astype(int)).mean()
    assert diff < 4  # same picture up to JPEG re-encoding
    # The same file handed over as a PIL image is also turned upright.
    assert load_image(Image.open(tmp_path / "rot.jpg")).array.shape == loaded.array.shape


def test_truncated_jpeg_is_reported_with_its_name(tmp_path):
    data = portrait_path("obama").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: truncated or corrupt") as info:
        load_image(tmp_path / "cut.jpg")
    assert info.value.source.endswith("cut.jpg")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("notes.jpg", b"this is text, not a JPEG", "not an image"),
        ("empty.png", b"", "not an image"),
        ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image|truncated or corrupt"),
    ],
)
def test_non_images_are_reported(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageLoadError, match=message) as info:
        load_image(tmp_path / name)
    assert name in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="ghost.jpg: file not found"):
        load_image(tmp_path / "ghost.jpg")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def big_jpeg(path: Path, scale: int) -> np.ndarray:
    image = portrait("obama2")
    big = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale))
    big.save(path, quality=90)
    return np.asarray(big)


def test_huge_jpeg_is_decoded_reduced_within_the_pixel_budget(tmp_path):
    big_jpeg(tmp_path / "big.jpg", 4)  # 1336 x 2560 = 3.4 MP
    for budget, size in [(1_000_000, (668, 1280)), (500_000, (334, 640))]:
        loaded = load_image(tmp_path / "big.jpg", max_pixels=budget)
        h, w = loaded.array.shape[:2]
        assert h * w <= budget
        assert (w, h) == size  # libjpeg decoded at 1/2, then 1/4, directly
        assert loaded.original_size == (1336, 2560) and loaded.scale == pytest.approx(size[0] / 1336)
    assert load_image(tmp_path / "big.jpg").scale == 1.0  # under the default budget: full size


def test_huge_png_is_refused_before_decoding(tmp_path):
    Image.new("RGB", (1500, 1000)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=r"big\.png: 1500x1000 = 1\.5 MP exceeds the limit of 1\.0 MP"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_decompression_bomb_is_refused(tmp_path):
    # A 40-byte file claiming 30000 x 30000 pixels: refused from the header alone.
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ImageLoadError, match=r"bomb\.png: (refused|.*exceeds the limit)"):
        load_image(tmp_path / "bomb.png")


def test_arrays_of_every_layout():
    gray = np.full((4, 5), 7, np.uint8)
    assert array_to_rgb(gray).shape == (4, 5, 3)
    assert array_to_rgb(gray[..., None]).shape == (4, 5, 3)
    np.testing.assert_array_equal(array_to_rgb(np.full((2, 2, 3), 0.5, np.float32))[0, 0], [128, 128, 128])
    np.testing.assert_array_equal(array_to_rgb(np.full((2, 2, 3), 65535, np.uint16))[0, 0], [255, 255, 255])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, 0
    np.testing.assert_array_equal(array_to_rgb(rgba), 0)


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((3, 20, 30), np.uint8), "channel-first"),
        (np.full((4, 4, 3), 255.0), r"\[0, 1\]"),
        (np.zeros((4, 4, 3), bool), "dtype"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "shape"),
    ],
)
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(array, source="<array 7>")


def test_source_names():
    assert describe_source("a/b.jpg") == "a/b.jpg"
    assert describe_source(np.zeros(1), 3) == "<array 3>"
    with Image.open(portrait_path("biden")) as im:
        assert describe_source(im).endswith("biden.jpg")
    assert describe_source(Image.new("RGB", (2, 2)), 1) == "<Image 1>"
    with pytest.raises(ImageLoadError, match="unsupported input type"):
        load_image(io.BytesIO(b"abc"))
