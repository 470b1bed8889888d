"""Synthetic identities: procedural 112x112 "faces" for tests, smoke runs and demos.

Real face data sets cannot be downloaded here, so training and evaluation code is exercised on
cartoon faces drawn from a few dozen continuous identity parameters (head shape, skin tone, eye
spacing, hair, a per-identity skin texture). Every image of an identity shares those parameters
and differs in what varies between photos of one person: pose jitter (shift, rotation, scale),
expression (mouth curve, eye opening), lighting, background, noise and occasional occluders.
Background and lighting change per image, so raw pixel distance is a poor identity cue and a
model has to learn the identity parameters to verify unseen people.

Everything is deterministic: image `k` of identity `i` depends only on `(seed, i, k)`, never on
process, worker or call order. Training identities and held-out identities are disjoint ranges of
identity ids; verification pairs are drawn from the held-out ones only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SIZE = 112
_TEXTURE_GRID = 6  # identity texture resolution before it is stretched over the face

# Streams of the seed sequence, so identity, sample and pair draws never share random numbers.
_IDENTITY_STREAM, _SAMPLE_STREAM, _PAIR_STREAM = 1, 2, 3


@dataclass(frozen=True)
class SyntheticFacesConfig:
    """Size and difficulty of a synthetic identity set.

    Args:
        num_identities: identities in the training split (labels 0..num_identities-1).
        images_per_identity: training images drawn per identity.
        heldout_identities: further identities, never trained on, for verification.
        heldout_images_per_identity: images per held-out identity that pairs are drawn from.
        num_pairs: verification pairs (half genuine, half impostor).
        variation: scale of the within-identity variation (0 gives identical images per identity).
        seed: the data set's seed; two configs with the same fields give the same pixels.
    """

    num_identities: int = 200
    images_per_identity: int = 16
    heldout_identities: int = 50
    heldout_images_per_identity: int = 4
    num_pairs: int = 600
    variation: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_identities", "images_per_identity", "heldout_identities", "heldout_images_per_identity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticFacesConfig.{name} must be an int >= 1, got {value!r}")
        if self.heldout_identities < 2 or self.heldout_images_per_identity < 2:
            raise ValueError(
                "SyntheticFacesConfig needs >= 2 held-out identities with >= 2 images each to form pairs, got "
                f"heldout_identities={self.heldout_identities}, "
                f"heldout_images_per_identity={self.heldout_images_per_identity}"
            )
        if not isinstance(self.num_pairs, int) or self.num_pairs < 2 or self.num_pairs % 2:
            raise ValueError(f"SyntheticFacesConfig.num_pairs must be an even int >= 2, got {self.num_pairs!r}")
        if not 0.0 <= self.variation <= 3.0:
            raise ValueError(f"SyntheticFacesConfig.variation must be in [0, 3], got {self.variation!r}")


# -- parameters ---------------------------------------------------------------------------------
def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *keys])


def identity_params(seed: int, identity: int) -> dict[str, np.ndarray]:
    """The fixed appearance of one identity (lengths in pixels of the canonical 112x112 frame)."""
    r = _rng(seed, _IDENTITY_STREAM, identity)
    return {
        "skin": r.uniform([0.35, 0.22, 0.15], [0.98, 0.85, 0.75]),
        "face_ab": r.uniform([24.0, 31.0], [37.0, 45.0]),  # half width, half height of the head
        "hair": r.uniform(0.0, 1.0, size=3) * r.uniform(0.2, 1.0),
        "hairline": r.uniform(0.15, 0.75),  # how far down the forehead the hair reaches
        "eye_dx": r.uniform(12.0, 21.0),  # half distance between the eyes
        "eye_y": r.uniform(-12.0, -2.0),
        "eye_r": r.uniform(3.5, 7.0),
        "iris": r.uniform(0.0, 0.8, size=3),
        "brow_dy": r.uniform(5.0, 11.0),
        "brow_w": r.uniform(1.0, 3.5),
        "nose_len": r.uniform(6.0, 18.0),
        "nose_w": r.uniform(2.5, 7.0),
        "mouth_y": r.uniform(15.0, 26.0),
        "mouth_w": r.uniform(7.0, 17.0),
        "lip": r.uniform([0.4, 0.05, 0.05], [0.9, 0.45, 0.45]),
        "texture": r.normal(0.0, 1.0, size=(3, _TEXTURE_GRID, _TEXTURE_GRID)),
    }


def sample_params(seed: int, identity: int, index: int, variation: float) -> dict[str, np.ndarray]:
    """What changes between two photos of the same identity."""
    r = _rng(seed, _SAMPLE_STREAM, identity, index)
    v = variation
    return {
        "shift": r.normal(0.0, 2.5 * v, size=2),
        "angle": r.normal(0.0, math.radians(6.0) * v),
        "scale": 1.0 + r.normal(0.0, 0.05 * v),
        # Neutral half of the time (always, without variation), else one of the other expressions.
        "expression": int(r.integers(1, NUM_EXPRESSIONS)) if r.uniform() < 0.5 * min(v, 1.0) else 0,
        "light": 1.0 + r.normal(0.0, 0.15 * v),
        "light_dir": r.normal(0.0, 0.25 * v, size=2),
        "tint": r.normal(0.0, 0.04 * v, size=3),
        "background": r.uniform(0.0, 1.0, size=3),
        "background_grad": r.normal(0.0, 0.3, size=(3, 2)),
        "noise": abs(r.normal(0.0, 0.03 * v)),
        "noise_seed": int(r.integers(0, 2**31 - 1)),
        # A bar across the face (hand, microphone, scarf) in about a fifth of the images.
        "occluder": r.uniform([-40.0, -40.0, 6.0], [40.0, 40.0, 14.0]) if r.uniform() < 0.2 * min(v, 1.0) else None,
        "occluder_colour": r.uniform(0.0, 1.0, size=3),
    }


# -- rendering ----------------------------------------------------------------------------------
# Faces are drawn in two steps so a data set of thousands of images renders in seconds: the
# identity is drawn once per expression in a canonical frame (RGB + coverage), then each image
# warps that layer by its pose and composes it with its own background, lighting and noise.
NUM_EXPRESSIONS = 3


def _soft(sd: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Signed distance (negative inside) -> anti-aliased coverage in [0, 1]."""
    return 0.5 - 0.5 * np.tanh(sd / (2.0 * width))  # = sigmoid(-sd / width), without overflow warnings


def _ellipse_sd(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    # Approximate signed distance: exact on the axes, good enough for soft edges.
    return (np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2) - 1.0) * min(a, b)


def _bilinear(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample a (C, h, w) grid at fractional positions x, y in [0, w-1] x [0, h-1] -> (C, *x.shape)."""
    _, h, w = grid.shape
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2)
    fx, fy = x - x0, y - y0
    top = grid[:, y0, x0] * (1 - fx) + grid[:, y0, x0 + 1] * fx
    bottom = grid[:, y0 + 1, x0] * (1 - fx) + grid[:, y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def expression(index: int) -> tuple[float, float]:
    """(smile, eye opening) of expression `index`: neutral, smiling, frowning with narrowed eyes."""
    return ((0.0, 1.0), (1.0, 0.9), (-0.8, 0.55))[index]


def render_identity(ident: dict[str, np.ndarray], smile: float, eye_open: float) -> np.ndarray:
    """One identity in the canonical frame. Returns (112, 112, 4) float32: RGB in [0, 1] and coverage."""
    S = IMAGE_SIZE
    v, u = np.mgrid[0:S, 0:S].astype(np.float32)
    u = u - (S - 1) / 2
    v = v - (S - 1) / 2 + 4.0  # faces sit slightly high, like aligned crops
    img = np.zeros((3, S, S), np.float32)
    alpha = np.zeros((S, S), np.float32)

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        nonlocal img
        colour = np.asarray(colour, np.float32)
        img = img * (1 - mask) + (colour.reshape(3, 1, 1) if colour.ndim == 1 else colour) * mask

    a, b = (float(t) for t in ident["face_ab"])
    hair = _soft(_ellipse_sd(u, v, 0.0, -6.0, a + 5.0, b + 4.0))  # behind the head, shows above it
    paint(hair, ident["hair"])
    head = _soft(_ellipse_sd(u, v, 0.0, 0.0, a, b))
    alpha = np.maximum(hair, head)
    t = ident["texture"]
    g = t.shape[-1] - 1
    texture = _bilinear(t, (u / a + 1) * 0.5 * g, (v / b + 1) * 0.5 * g)  # (3, S, S), stretched over the head
    paint(head, ident["skin"].reshape(3, 1, 1) + 0.12 * texture)
    fringe = head * _soft(v - (-b + b * float(ident["hairline"])), 1.5)  # hair over the forehead
    paint(fringe, ident["hair"])

    eye_dx, eye_y, eye_r = float(ident["eye_dx"]), float(ident["eye_y"]), float(ident["eye_r"])
    for side in (-1.0, 1.0):
        cx = side * eye_dx
        white = _soft(_ellipse_sd(u, v, cx, eye_y, eye_r * 1.4, eye_r * eye_open * 0.9))
        paint(white, np.array([0.95, 0.95, 0.95]))
        paint(white * _soft(_ellipse_sd(u, v, cx, eye_y, eye_r * 0.6, eye_r * 0.6)), ident["iris"])
        brow = _soft(_ellipse_sd(u, v, cx, eye_y - float(ident["brow_dy"]), eye_r * 1.6, float(ident["brow_w"])))
        paint(brow, ident["hair"] * 0.8)

    nose_len = float(ident["nose_len"])
    nose = _soft(_ellipse_sd(u, v, 0.0, eye_y + nose_len * 0.6, float(ident["nose_w"]), nose_len * 0.5))
    paint(nose * 0.6, ident["skin"] * 0.7)
    mouth_w = float(ident["mouth_w"])
    curve = float(ident["mouth_y"]) - smile * 4.0 * (1 - np.clip(u / mouth_w, -1, 1) ** 2)
    paint(_soft(np.maximum(np.abs(v - curve) - 1.8, np.abs(u) - mouth_w)), ident["lip"])
    return np.concatenate([img.transpose(1, 2, 0), alpha[..., None]], axis=-1).astype(np.float32)


_AXIS = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE - 0.5  # pixel centres in [-0.5, 0.5]


def _ramp(base: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """`base + slope_x * x + slope_y * y` over the image: base (C,), slope (C, 2) -> (112, 112, C)."""
    base, slope = np.asarray(base, np.float32), np.asarray(slope, np.float32)
    return base + _AXIS[None, :, None] * slope[:, 0] + _AXIS[:, None, None] * slope[:, 1]


def compose(layer: np.ndarray, sample: dict[str, np.ndarray]) -> torch.Tensor:
    """Place a canonical face layer in one photo. Returns a (3, 112, 112) uint8 RGB tensor."""
    S = IMAGE_SIZE
    c = (S - 1) / 2
    angle, scale = float(sample["angle"]), float(sample["scale"])
    # Similarity transform about the image centre, then the shift (canonical -> image pixels).
    M = np.array(
        [[scale * math.cos(angle), -scale * math.sin(angle), 0.0],
         [scale * math.sin(angle), scale * math.cos(angle), 0.0]], np.float64)
    M[:, 2] = np.array([c, c]) - M[:, :2] @ np.array([c, c]) + sample["shift"]
    warped = cv2.warpAffine(layer, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0)  # (S, S, 4)
    bg = _ramp(sample["background"], sample["background_grad"])  # (S, S, 3)
    alpha = warped[..., 3:]
    img = bg + (warped[..., :3] - bg) * alpha  # (S, S, 3)
    if sample["occluder"] is not None:
        ox, oy = (int(round(float(t) + c)) for t in sample["occluder"][:2])
        half = int(sample["occluder"][2])
        img[max(oy - half, 0):max(oy + half, 0), max(ox - 30, 0):max(ox + 30, 0)] = sample["occluder_colour"]
    # Lighting: global gain with a directional ramp, a colour cast, then sensor noise.
    light = float(sample["light"])
    gain = _ramp(np.array([light]), light * 2 * sample["light_dir"][None])  # (S, S, 1)
    img = img * gain + sample["tint"].astype(np.float32)
    if sample["noise"] > 0:
        noise = np.random.default_rng(int(sample["noise_seed"])).standard_normal(img.shape, dtype=np.float32)
        img += float(sample["noise"]) * noise
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(out))


# -- data sets ----------------------------------------------------------------------------------
class FaceRenderer:
    """Draws image `index` of identity `identity`, keeping each identity's canonical layers.

    Identities `0..num_identities-1` are the training split; held-out identities have the ids
    after them. Layers are kept as uint8 RGBA (50 KB per identity and expression).
    """

    def __init__(self, config: SyntheticFacesConfig) -> None:
        self.config = config
        self._layers: dict[tuple[int, int], np.ndarray] = {}

    def layer(self, identity: int, expr: int) -> np.ndarray:
        key = (identity, expr)
        if key not in self._layers:
            rgba = render_identity(identity_params(self.config.seed, identity), *expression(expr))
            self._layers[key] = np.clip(rgba * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return self._layers[key]

    def image(self, identity: int, index: int) -> torch.Tensor:
        sample = sample_params(self.config.seed, identity, index, self.config.variation)
        layer = self.layer(identity, sample["expression"]).astype(np.float32) / 255.0
        return compose(layer, sample)


class SyntheticFaces(Dataset):
    """Training images of the synthetic identities: item `i` -> ((3, 112, 112) uint8, label).

    Items are ordered identity-major (`i = label * images_per_identity + k`), like an InsightFace
    RecordIO file. Images are drawn on first access (about 1 ms each); `cache=True` keeps them
    (37 KB each) so later epochs only copy.
    """

    def __init__(self, config: SyntheticFacesConfig, cache: bool = True) -> None:
        self.config = config
        self.num_classes = config.num_identities
        self.renderer = FaceRenderer(config)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return self.config.num_identities * self.config.images_per_identity

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"SyntheticFaces index {index} out of range [0, {len(self)})")
        label, k = divmod(index, self.config.images_per_identity)
        if self._cache is not None and index in self._cache:
            return self._cache[index], label
        image = self.renderer.image(label, k)
        if self._cache is not None:
            self._cache[index] = image
        return image, label


@dataclass(frozen=True)
class VerificationPairs:
    """Pairs of aligned crops for 1:1 verification: (N, 3, 112, 112) uint8 each, `issame` (N,) bool."""

    images_a: torch.Tensor
    images_b: torch.Tensor
    issame: torch.Tensor

    def __len__(self) -> int:
        return int(self.issame.numel())


def heldout_pair_list(config: SyntheticFacesConfig) -> list[tuple[int, int, int, int, bool]]:
    """(identity_a, index_a, identity_b, index_b, issame) for each verification pair.

    Genuine and impostor pairs alternate in blocks of 10, so each of the 10 contiguous folds of
    the standard protocol holds both kinds, as in a `.bin` set.
    """
    c = config
    r = _rng(c.seed, _PAIR_STREAM)
    first, n_img = c.num_identities, c.heldout_images_per_identity
    pairs: list[tuple[int, int, int, int, bool]] = []
    for p in range(c.num_pairs):
        genuine = (p // 10) % 2 == 0
        ia = first + int(r.integers(c.heldout_identities))
        if genuine:
            ib = ia
            ka, kb = (int(t) for t in r.choice(n_img, size=2, replace=False))
        else:
            ib = first + int((ia - first + 1 + r.integers(c.heldout_identities - 1)) % c.heldout_identities)
            ka, kb = int(r.integers(n_img)), int(r.integers(n_img))
        pairs.append((ia, ka, ib, kb, genuine))
    return pairs


def heldout_pairs(config: SyntheticFacesConfig) -> VerificationPairs:
    """Render the verification pairs of the held-out identities.

    Held-out images use sample indices past the training ones, so no training image can appear
    here even for a config whose identity ranges were changed to overlap.
    """
    renderer = FaceRenderer(config)
    offset = config.images_per_identity
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def image(identity: int, k: int) -> torch.Tensor:
        if (identity, k) not in cache:
            cache[identity, k] = renderer.image(identity, offset + k)
        return cache[identity, k]

    pairs = heldout_pair_list(config)
    a = torch.stack([image(ia, ka) for ia, ka, _, _, _ in pairs])  # (N, 3, 112, 112) uint8
    b = torch.stack([image(ib, kb) for _, _, ib, kb, _ in pairs])
    issame = torch.tensor([same for *_, same in pairs], dtype=torch.bool)
    return VerificationPairs(a, b, issame)
