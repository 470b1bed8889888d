"""FaceEmbedder end to end on the tiny random model: detection, alignment, batching, flip-test,
dtypes, tokens, aligned-crop inputs, bad inputs and coordinates mapped back to the original."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lvface_mm.faces import FaceEmbedder, ImageResult, PipelineConfig, to_model_input
from lvface_mm.faces.detection import _DETECTORS, DetectorEntry
from lvface_mm.models import WeightsNotAvailableError, create_model
from tests._faces_fixtures import PORTRAITS, composite, needs_dlib, portrait, portrait_path, shared_dlib

pytestmark = needs_dlib()


def tiny(**kwargs) -> FaceEmbedder:
    """The tiny random embedder (seed 0) with the session's dlib detector, which caches per picture."""
    kwargs.setdefault("detector", shared_dlib())
    return FaceEmbedder.from_tiny(**kwargs)


@pytest.fixture(scope="module")
def embedder() -> FaceEmbedder:
    return tiny()


@pytest.fixture(scope="module")
def portrait_results(embedder) -> list[ImageResult]:
    return embedder.embed([portrait_path(n) for n in PORTRAITS])


def reference_embeddings(model: torch.nn.Module, crops: np.ndarray, flip: bool = False) -> np.ndarray:
    """What the encoder should give, computed straight from the model."""
    x = to_model_input(crops)
    with torch.no_grad():
        raw = model.eval()(x)
        if flip:
            raw = raw + model(x.flip(-1))
    return F.normalize(raw, dim=-1).numpy()


def test_one_face_per_portrait_with_everything_filled_in(portrait_results):
    for name, result in zip(PORTRAITS, portrait_results):
        assert result.ok and result.source.endswith(f"{name}.jpg")
        assert result.image_size == Image.open(portrait_path(name)).size
        assert len(result.faces) == 1
        face = result.faces[0]
        assert face.crop.shape == (112, 112, 3) and face.crop.dtype == np.uint8
        assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
        assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
        assert face.norm > 0 and face.score > 0 and face.tokens is None
        assert face.landmarks.shape == (5, 2) and face.box.shape == (4,)


def test_embeddings_are_the_models_output_on_the_aligned_crops(embedder, portrait_results):
    crops = np.stack([r.faces[0].crop for r in portrait_results])
    expected = reference_embeddings(embedder.encoder.model, crops)
    got = np.stack([r.faces[0].embedding for r in portrait_results])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_crops(crops), expected, atol=1e-5)
    raw = embedder.embed_crops(crops, normalize=False)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), [r.faces[0].norm for r in portrait_results], rtol=1e-5)


def test_batching_across_images_does_not_change_results(portrait_results):
    one_by_one = tiny(batch_size=1).embed([portrait_path(n) for n in PORTRAITS[:2]])
    for a, b in zip(one_by_one, portrait_results[:2]):
        np.testing.assert_allclose(a.faces[0].embedding, b.faces[0].embedding, atol=1e-5)
        np.testing.assert_array_equal(a.faces[0].box, b.faces[0].box)


def test_bad_inputs_are_reported_per_image_and_the_rest_is_kept(embedder, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    data = portrait_path("obama").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    blank = np.full((200, 300, 3), 90, np.uint8)
    inputs = [tmp_path / "notes.jpg", portrait_path("biden"), tmp_path / "missing.png", blank, tmp_path / "cut.jpg"]
    results = embedder.embed(inputs)
    assert [r.source for r in results] == [str(inputs[0]), str(inputs[1]), str(inputs[2]), "<array 3>", str(inputs[4])]
    assert "not an image" in results[0].error and not results[0].faces
    assert results[1].ok and len(results[1].faces) == 1
    assert results[2].error == "file not found"
    assert results[3].ok and results[3].faces == []  # no face is a result, not an error
    assert "truncated" in results[4].error
    with pytest.raises(ValueError, match="notes.jpg: not an image"):
        results[0].main_face()
    with pytest.raises(ValueError, match="<array 3>: no face found"):
        results[3].main_face()


def test_group_photo_order_limits_and_main_face(embedder):
    group = composite(("obama", "obama2", "obama3", "biden"))
    result = embedder.embed_image(group)
    areas = [f.area for f in result.faces]
    assert len(areas) == 4 and areas == sorted(areas, reverse=True)
    assert result.main_face() is result.faces[0]
    assert result.embeddings.shape == (4, 512)
    two = tiny(max_faces=2).embed_image(group)
    np.testing.assert_array_equal(np.stack([f.box for f in two.faces]), np.stack([f.box for f in result.faces[:2]]))
    smallest = min(min(f.box[2] - f.box[0], f.box[3] - f.box[1]) for f in result.faces)
    bigger = tiny(min_face_size=float(smallest) + 1).embed_image(group)
    assert len(bigger.faces) == 3


def test_flip_test_sums_original_and_mirror(embedder, portrait_results):
    crops = np.stack([r.faces[0].crop for r in portrait_results])
    flipped = tiny(flip_test=True)
    got = flipped.embed_crops(crops)
    np.testing.assert_allclose(got, reference_embeddings(flipped.encoder.model, crops, flip=True), atol=1e-5)
    assert not np.allclose(got, embedder.embed_crops(crops), atol=1e-3)
    # A symmetric crop's flip-test embedding equals its plain one.
    sym = np.concatenate([crops[:, :, :56], crops[:, :, :56][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(flipped.embed_crops(sym), embedder.embed_crops(sym), atol=1e-5)


def test_tokens_are_the_encoders_patch_tokens(embedder, portrait_results):
    crops = np.stack([r.faces[0].crop for r in portrait_results[:2]])
    emb, tokens = embedder.embed_crops(crops, return_tokens=True)
    assert tokens.shape == (2, 144, 32) and tokens.dtype == np.float32
    with torch.no_grad():
        expected = embedder.encoder.model.forward_features(to_model_input(crops)).numpy()
    np.testing.assert_allclose(tokens, expected, atol=1e-5)
    np.testing.assert_allclose(emb, embedder.embed_crops(crops), atol=1e-6)
    result = embedder.embed_image(portrait_path("obama"), return_tokens=True)
    assert result.faces[0].tokens.shape == (144, 32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_stays_close_to_fp32(embedder, portrait_results, dtype):
    crops = np.stack([r.faces[0].crop for r in portrait_results])
    low = tiny(dtype=dtype)
    assert low.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    got = low.embed_crops(crops)
    assert got.dtype == np.float32
    cosine = (got * embedder.embed_crops(crops)).sum(1)
    assert cosine.min() > 0.99


def test_aligned_crops_skip_detection():
    class MustNotRun:
        def detect(self, image):
            raise AssertionError("detection should be skipped for aligned crops")

    embedder = FaceEmbedder.from_tiny(detector=MustNotRun())
    crop = portrait("obama")[100:212, 200:312].copy()  # any 112x112 picture counts as a crop
    result = embedder.embed_image(crop)
    assert len(result.faces) == 1 and math.isnan(result.faces[0].score)
    np.testing.assert_array_equal(result.faces[0].box, [0, 0, 112, 112])
    np.testing.assert_allclose(result.faces[0].embedding, embedder.embed_crops(crop[None])[0], atol=1e-6)
    # Forced on a larger square crop: resized to 112, coordinates in the input's pixels.
    big = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BILINEAR))
    forced = embedder.embed_image(big, assume_aligned=True)
    np.testing.assert_array_equal(forced.faces[0].box, [0, 0, 224, 224])
    assert (forced.faces[0].embedding @ result.faces[0].embedding) > 0.95
    assert "square" in embedder.embed_image(np.zeros((112, 150, 3), np.uint8), assume_aligned=True).error


def test_custom_detector_from_the_registry(monkeypatch):
    from lvface_mm.faces import DetectedFace
    from lvface_mm.models.pretrained import ARCFACE_TEMPLATE_112

    class TemplateDetector:
        """'Finds' a face whose landmarks are the template scaled by 2: the crop is the image downscaled."""

        def __init__(self, factor: float = 2.0):
            self.factor = factor

        def detect(self, image):
            pts = np.asarray(ARCFACE_TEMPLATE_112) * self.factor
            return [DetectedFace([0, 0, 112 * self.factor, 112 * self.factor], 1.0, pts)]

    monkeypatch.setitem(_DETECTORS, "template", DetectorEntry("template", TemplateDetector, "test"))
    embedder = FaceEmbedder.from_tiny(detector="template", detector_kwargs={"factor": 2.0})
    image = np.asarray(Image.fromarray(portrait("biden")[:224, :224]))
    face = embedder.embed_image(image, assume_aligned=False).faces[0]
    expected = np.asarray(Image.fromarray(image).resize((112, 112), Image.BILINEAR)).astype(int)
    assert np.abs(face.crop.astype(int) - expected).mean() < 6  # same picture, different resampling


def test_exif_rotated_photo_gives_the_same_face(embedder, portrait_results, tmp_path):
    upright = Image.fromarray(portrait("obama"))
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to display"
    # Lossless (PNG with an eXIf chunk), so the upright pixels are exactly the portrait's.
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "sideways.png", exif=exif)
    result = embedder.embed_image(tmp_path / "sideways.png")
    assert result.image_size == upright.size
    assert len(result.faces) == 1
    reference = portrait_results[PORTRAITS.index("obama")].faces[0]
    np.testing.assert_allclose(result.faces[0].box, reference.box, atol=1e-4)
    np.testing.assert_allclose(result.faces[0].embedding, reference.embedding, atol=1e-5)
    # Without the orientation tag the face lies on its side, and the frontal detector misses it.
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "plain.png")
    assert embedder.embed_image(tmp_path / "plain.png").faces == []


def test_coordinates_map_back_from_reduced_detection_and_decoding(portrait_results, tmp_path):
    reference = portrait_results[PORTRAITS.index("obama2")].faces[0]
    image = Image.open(portrait_path("obama2"))
    big = image.resize((image.width * 3, image.height * 3), Image.BICUBIC)  # 1002 x 1920
    big.save(tmp_path / "big.jpg", quality=92)
    # Detection on a copy at most 640 px; decoding at 1/2 to stay under 1 MP.
    embedder = tiny(detect_max_side=640, max_image_pixels=1_000_000)
    result = embedder.embed_image(tmp_path / "big.jpg")
    assert result.image_size == (1002, 1920)
    assert len(result.faces) == 1
    np.testing.assert_allclose(result.faces[0].box, reference.box * 3, atol=12)
    np.testing.assert_allclose(result.faces[0].landmarks, reference.landmarks * 3, atol=12)
    assert result.faces[0].embedding @ reference.embedding > 0.9


def test_inputs_of_every_kind(embedder, portrait_results):
    reference = portrait_results[PORTRAITS.index("biden")].faces[0].embedding
    array = portrait("biden")
    results = embedder.embed([Image.open(portrait_path("biden")), array, str(portrait_path("biden"))])
    for result in results:
        np.testing.assert_allclose(result.faces[0].embedding, reference, atol=1e-5)
    assert results[1].source == "<array 1>"
    assert len(embedder.embed(array)) == 1  # one image is accepted on its own
    assert len(embedder.embed(np.stack([array, array]))) == 2  # (N, H, W, 3) is a stack


def test_from_tiny_is_reproducible_and_leaves_the_global_rng_alone(portrait_results):
    state = torch.random.get_rng_state()
    a = FaceEmbedder.from_tiny(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    crops = portrait_results[0].faces[0].crop[None]
    np.testing.assert_array_equal(a.embed_crops(crops), FaceEmbedder.from_tiny(seed=0).embed_crops(crops))
    assert not np.allclose(a.embed_crops(crops), FaceEmbedder.from_tiny(seed=1).embed_crops(crops))


def test_module_input_keeps_its_device_and_timings_add_up(portrait_results):
    model = create_model("lvface_tiny")
    embedder = FaceEmbedder(model, dtype=None, detector=shared_dlib())
    assert embedder.device == torch.device("cpu") and embedder.dtype == torch.float32
    embedder.embed([portrait_path("obama")])
    assert set(embedder.stage_seconds) == {"load", "detect", "align", "embed"}
    assert all(v > 0 for v in embedder.stage_seconds.values())
    embedder.reset_timings()
    assert sum(embedder.stage_seconds.values()) == 0


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_faces"):
        PipelineConfig(max_faces=0)
    with pytest.raises(ValueError, match="dtype"):
        FaceEmbedder.from_tiny(dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        FaceEmbedder.from_tiny(backend="tensorrt")
    with pytest.raises(ValueError, match="onnx_path"):
        FaceEmbedder.from_tiny(backend="onnx")
    with pytest.raises(ValueError, match="embed_crops takes aligned"):
        FaceEmbedder.from_tiny().embed_crops(np.zeros((2, 100, 100, 3), np.uint8))


def test_missing_official_onnx_says_what_to_fetch(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, offline
    with pytest.raises(WeightsNotAvailableError, match=r"LVFace-T_Glint360K\.onnx"):
        FaceEmbedder("lvface_t", backend="onnx")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    import warnings

    from lvface_mm.models.onnx import export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings are not ours
        return export_onnx(tiny().encoder.model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_onnx_backend_matches_torch(tiny_onnx, portrait_results):
    crops = np.stack([r.faces[0].crop for r in portrait_results])
    onnx = FaceEmbedder("lvface_tiny", backend="onnx", onnx_path=tiny_onnx, detector=shared_dlib())
    np.testing.assert_allclose(onnx.embed_crops(crops), tiny(backend="torch").embed_crops(crops), atol=1e-4)
    flipped = FaceEmbedder("lvface_tiny", backend="onnx", onnx_path=tiny_onnx, flip_test=True, detector=shared_dlib())
    torch_flipped = tiny(flip_test=True, backend="torch")
    np.testing.assert_allclose(flipped.embed_crops(crops), torch_flipped.embed_crops(crops), atol=1e-4)
    result = onnx.embed_image(portrait_path("obama3"))
    np.testing.assert_allclose(result.faces[0].embedding, portrait_results[2].faces[0].embedding, atol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        onnx.embed_crops(crops, return_tokens=True)
    with pytest.raises(ValueError, match="dtype"):
        FaceEmbedder("lvface_tiny", backend="onnx", onnx_path=tiny_onnx, dtype="bf16")


def test_auto_backend_runs_a_cached_export_on_cpu_and_keeps_torch_for_tokens(portrait_results, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import warnings

    from lvface_mm.faces.encoders import CachedOnnxCropEncoder, TorchCropEncoder
    from lvface_mm.models import onnx as onnx_module

    monkeypatch.setenv("LVFACE_MM_ONNX_CACHE", str(tmp_path / "cache"))
    crops = np.stack([r.faces[0].crop for r in portrait_results])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracer warnings
        auto = tiny(flip_test=True)  # backend="auto" is the default
    assert isinstance(auto.encoder, CachedOnnxCropEncoder)
    options = auto.encoder.onnx._run.session.get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()  # torch's thread setting carries over
    files = list((tmp_path / "cache").glob("*.onnx"))
    assert files == [auto.encoder.path]
    reference = tiny(flip_test=True, backend="torch")
    assert isinstance(reference.encoder, TorchCropEncoder)
    np.testing.assert_allclose(auto.embed_crops(crops), reference.embed_crops(crops), atol=1e-4)
    emb, tokens = auto.embed_crops(crops, return_tokens=True)  # tokens come from the PyTorch module
    np.testing.assert_array_equal(tokens, reference.embed_crops(crops, return_tokens=True)[1])

    # Same weights: the export is reused, not redone. Other weights: a new file.
    def must_not_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_module, "export_onnx", must_not_export)
    assert tiny().encoder.path == files[0]
    monkeypatch.undo()
    monkeypatch.setenv("LVFACE_MM_ONNX_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = FaceEmbedder.from_tiny(seed=1, detector=shared_dlib())
    assert other.encoder.path != files[0] and len(list((tmp_path / "cache").glob("*.onnx"))) == 2

    # Where onnxruntime is not the faster exact path, auto stays in PyTorch.
    assert isinstance(tiny(dtype="bf16").encoder, TorchCropEncoder)
    wrapped = torch.nn.Sequential(tiny(backend="torch").encoder.model)  # not a FaceViT
    assert isinstance(FaceEmbedder(wrapped, detector=shared_dlib()).encoder, TorchCropEncoder)


def test_auto_backend_falls_back_to_torch_when_the_cache_is_unwritable(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from lvface_mm.faces.encoders import TorchCropEncoder

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LVFACE_MM_ONNX_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="PyTorch"):
        embedder = tiny()
    assert isinstance(embedder.encoder, TorchCropEncoder)
    assert blocker.read_text().startswith("a file")  # nothing overwritten


def test_weights_fingerprint_follows_every_weight():
    from lvface_mm.models.checkpoint import weights_fingerprint

    model = create_model("lvface_tiny")
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before and len(before) == 64
    with torch.no_grad():
        model.feature[3].running_var[0] += 1e-3  # a buffer, not a parameter
    assert weights_fingerprint(model) != before
