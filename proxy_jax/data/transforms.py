"""Image transforms equal to torchvision's PIL path, driven by NumPy generators.

The seeds train with ``RandomResizedCrop(224) + RandomHorizontalFlip()`` and evaluate with
``Resize(256) + CenterCrop(224)`` (torchvision, PIL images), then ``ToTensor`` and
``Normalize``. Here the geometric part runs on PIL images with the same arithmetic and the
same PIL calls, so for the same image and the same crop parameters the pixels are
identical; randomness comes from a ``numpy.random.Generator`` instead of torch's global
RNG, so a loader can make it a pure function of ``(seed, epoch, slot)``.

A transform is a callable ``transform(image, rng) -> uint8 [H, W, 3]`` with an attribute
``norm``: the pipeline moves uint8 pixels between processes (4x less than float32) and
converts them with :func:`normalize` as late as possible. ``norm`` is an
:class:`InputNormalization` (``proxy_jax.models.input_normalization(backbone)`` gives the one
a backbone's weights expect): ``mean``, ``std`` (in the network's channel order), ``bgr``
and ``scale``, meaning ``x = (p[..., ::-1] if bgr else p) * scale`` then ``(x -
mean) / std`` for uint8 pixels ``p``. RGB ImageNet nets use ``scale=1/255`` with the
ImageNet statistics (torchvision ``ToTensor`` + ``Normalize``); BN-Inception uses
``bgr=True, scale=1, mean=(104, 117, 128), std=(1, 1, 1)`` (the seeds' ``RGB2BGR``,
``ToTensor``, ``x * 255``, ``Normalize``).

Example::

    t = train_transform(224, input_normalization("resnet50"))
    pixels = t(pil_image, np.random.default_rng(0))      # uint8 [224, 224, 3]
    x = normalize(pixels[None], t.norm)                    # float32 [1, 224, 224, 3]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

__all__ = [
    "InputNormalization",
    "UNIT_RANGE",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "Resize",
    "CenterCrop",
    "Compose",
    "train_transform",
    "eval_transform",
    "random_resized_crop_params",
    "resized_crop",
    "resize",
    "center_crop",
    "to_uint8_array",
    "normalize",
]

Size = Union[int, Sequence[int]]


class InputNormalization(NamedTuple):
    """How to turn uint8 RGB pixels into a network's input.

    For a pixel ``p`` in 0..255 (RGB order as decoded):
    ``x = (p[..., ::-1] if bgr else p) * scale``, then ``x = (x - mean) / std`` per channel.
    ``mean`` and ``std`` are given in the network's channel order, i.e. after the BGR flip.
    """

    mean: tuple
    std: tuple
    bgr: bool
    scale: float


# torchvision ``ToTensor`` alone: pixels / 255 in [0, 1].
UNIT_RANGE = InputNormalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=False, scale=1.0 / 255.0)


def _pair(size: Size, name: str) -> tuple[int, int]:
    """An int or (height, width) as a (height, width) tuple of positive ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size)):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check_range(value, name: str) -> tuple[float, float]:
    if len(value) != 2 or not value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _check_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    return image


# --- functional forms (the arithmetic of torchvision.transforms.functional, PIL path) ----

def random_resized_crop_params(width: int, height: int, rng: np.random.Generator, *,
                               scale: tuple = (0.08, 1.0),
                               ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)) -> tuple[int, int, int, int]:
    """Crop box ``(top, left, height, width)`` of ``RandomResizedCrop``.

    The algorithm of torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an
    area fraction ``U(scale)`` and a log-uniform aspect ratio in ``ratio``, rounded with
    ``int(round(.))``; the first box that fits gets a uniform position. If none fits, the
    largest central box whose aspect ratio is clamped to ``ratio``. Only the source of
    randomness differs (``rng.uniform`` / ``rng.integers`` instead of torch's RNG).

    Args:
      width, height: image size in pixels.
      rng: NumPy generator (anything with ``uniform(low, high)`` and ``integers(low, high)``).
      scale: range of the crop's area as a fraction of the image's.
      ratio: range of the crop's aspect ratio ``width / height``.
    """
    scale = _check_range(scale, "scale")
    ratio = _check_range(ratio, "ratio")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # No try fitted: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, top: int, left: int, height: int, width: int,
                 size: Size) -> Image.Image:
    """Crop ``[top, top + height) x [left, left + width)`` then bilinear-resize to ``size``.

    torchvision ``F.resized_crop`` on PIL: crop first (so the filter never reads outside the
    box, unlike ``Image.resize(box=...)``), then ``Image.resize`` with ``BILINEAR``, which
    PIL always antialiases (torchvision's ``antialias`` flag has no effect on PIL images).
    """
    out_h, out_w = _pair(size, "size")
    cropped = _check_image(image).crop((left, top, left + width, top + height))
    return cropped.resize((out_w, out_h), Image.BILINEAR)


def resize(image: Image.Image, size: Size) -> Image.Image:
    """torchvision ``F.resize`` on PIL, bilinear (antialiased).

    An int resizes the shorter side to ``size`` and the longer to ``int(size * long /
    short)`` (truncated, as torchvision); ``(height, width)`` resizes to exactly that. An
    image already of the output size is returned unchanged.
    """
    width, height = _check_image(image).size
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(size), int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = _pair(size, "size")
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: Size) -> Image.Image:
    """torchvision ``F.center_crop`` on PIL: offsets ``int(round((in - out) / 2))``.

    A side smaller than the crop is zero-padded first (``(out - in) // 2`` before, the rest
    after), as torchvision does; PIL's crop fills outside the image with zeros, so the
    padding is folded into the crop box.
    """
    crop_h, crop_w = _pair(size, "size")
    width, height = _check_image(image).size
    pad_left = (crop_w - width) // 2 if crop_w > width else 0
    pad_top = (crop_h - height) // 2 if crop_h > height else 0
    padded_w = width + pad_left + ((crop_w - width + 1) // 2 if crop_w > width else 0)
    padded_h = height + pad_top + ((crop_h - height + 1) // 2 if crop_h > height else 0)
    top = int(round((padded_h - crop_h) / 2.0)) - pad_top
    left = int(round((padded_w - crop_w) / 2.0)) - pad_left
    return image.crop((left, top, left + crop_w, top + crop_h))


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 ``[H, W, 3]`` RGB (grayscale, palette, CMYK, alpha converted)."""
    if _check_image(image).mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _affine_coefficients(norm) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-channel ``a, b`` with ``(p * scale - mean) / std == p * a + b``."""
    try:
        mean = np.asarray(norm.mean, np.float64)
        std = np.asarray(norm.std, np.float64)
        scale, bgr = float(norm.scale), bool(norm.bgr)
    except (AttributeError, TypeError) as e:
        raise ValueError(
            f"norm must have fields mean, std (3 values each), bgr and scale, got {norm!r}") from e
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError(f"norm.mean and norm.std must hold 3 values (std > 0), got {norm!r}")
    return (scale / std).astype(np.float32), (-mean / std).astype(np.float32), bgr


def normalize(images, norm=UNIT_RANGE):
    """uint8 pixels ``[..., H, W, 3]`` (RGB) -> float32 network input ``[..., H, W, 3]``.

    ``x = (p[..., ::-1] if norm.bgr else p) * norm.scale``, then ``(x - mean) / std``,
    computed as one multiply-add per element with float32 coefficients; it equals
    torchvision's ``ToTensor`` + ``Normalize`` to float32 rounding (~1e-6 relative).
    Works on NumPy arrays and, unchanged, on ``jax.Array`` (normalize on the device).

    Args:
      images: uint8 ``[..., H, W, 3]``.
      norm: an :class:`InputNormalization`; default :data:`UNIT_RANGE`.
    """
    a, b, bgr = _affine_coefficients(norm)
    if images.shape[-1:] != (3,):
        raise ValueError(f"images must be [..., H, W, 3], got shape {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got dtype {images.dtype}")
    if not isinstance(images, np.ndarray):  # jax.Array: let XLA fuse it
        if bgr:
            images = images[..., ::-1]
        return images.astype(np.float32) * a + b
    if bgr:
        images = np.ascontiguousarray(images[..., ::-1])
    else:
        images = np.ascontiguousarray(images)
    # Broadcasting a 3-vector over the last axis runs NumPy's inner loop 3 elements at a
    # time; rows of W * 3 values with tiled coefficients are ~4x faster on one core.
    row = images.shape[-2] * 3 if images.ndim >= 2 else 3
    out = np.empty(images.shape, np.float32)
    flat_out = out.reshape(-1, row)
    np.multiply(images.reshape(-1, row), np.tile(a, row // 3), out=flat_out)
    flat_out += np.tile(b, row // 3)
    return out


# --- composable transforms ------------------------------------------------------------

class RandomResizedCrop:
    """torchvision ``RandomResizedCrop(size, scale, ratio)`` (bilinear), NumPy-driven.

    ``__call__(image, rng) -> PIL.Image`` of ``size``.
    """

    def __init__(self, size: Size, *, scale: tuple = (0.08, 1.0),
                 ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)):
        self.size = _pair(size, "size")
        self.scale = _check_range(scale, "scale")
        self.ratio = _check_range(ratio, "ratio")

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        width, height = _check_image(image).size
        top, left, h, w = random_resized_crop_params(width, height, rng, scale=self.scale,
                                                     ratio=self.ratio)
        return resized_crop(image, top, left, h, w, self.size)

    def __repr__(self):
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (torchvision ``RandomHorizontalFlip``)."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return _check_image(image).transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """torchvision ``Resize(size)`` (bilinear) on PIL; see :func:`resize`."""

    def __init__(self, size: Size):
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            if size <= 0:
                raise ValueError(f"size must be positive, got {size}")
            self.size = int(size)
        else:
            self.size = _pair(size, "size")

    def __call__(self, image: Image.Image, rng: Optional[np.random.Generator] = None) -> Image.Image:
        del rng
        return resize(image, self.size)

    def __repr__(self):
        return f"Resize(size={self.size})"


class CenterCrop:
    """torchvision ``CenterCrop(size)`` on PIL; see :func:`center_crop`."""

    def __init__(self, size: Size):
        self.size = _pair(size, "size")

    def __call__(self, image: Image.Image, rng: Optional[np.random.Generator] = None) -> Image.Image:
        del rng
        return center_crop(image, self.size)

    def __repr__(self):
        return f"CenterCrop(size={self.size})"


class Compose:
    """PIL ops in sequence, then uint8 ``[H, W, 3]``; carries the ``norm`` to apply later.

    Args:
      ops: callables ``op(image, rng) -> PIL.Image``.
      norm: an :class:`InputNormalization`, applied by the loader (:func:`normalize`); None
        means :data:`UNIT_RANGE`.
    """

    def __init__(self, ops: Sequence[Any], *, norm=None):
        self.ops = tuple(ops)
        self.norm = UNIT_RANGE if norm is None else norm
        _affine_coefficients(self.norm)  # validate now, not in a worker process

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        image = _check_image(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        for op in self.ops:
            image = op(image, rng)
        return to_uint8_array(image)

    def __repr__(self):
        return f"Compose({list(self.ops)}, norm={self.norm})"


def train_transform(size: Size, norm=None, *, scale: tuple = (0.08, 1.0),
                    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0), flip: float = 0.5) -> Compose:
    """The seeds' training augmentation: RandomResizedCrop(size) + horizontal flip."""
    return Compose([RandomResizedCrop(size, scale=scale, ratio=ratio), RandomHorizontalFlip(flip)],
                   norm=norm)


def eval_transform(resize: Size, size: Size, norm=None) -> Compose:
    """The seeds' evaluation transform: Resize(resize) (shorter side) + CenterCrop(size)."""
    return Compose([Resize(resize), CenterCrop(size)], norm=norm)
