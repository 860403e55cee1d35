"""Image transforms equal to torchvision's PIL path, driven by NumPy generators.

The seeds train with ``RandomResizedCrop(224) + RandomHorizontalFlip()`` and evaluate with
``Resize(256) + CenterCrop(224)`` (torchvision, PIL images), then ``ToTensor`` and
``Normalize``. Here the geometric part runs on PIL images with the same arithmetic and the
same PIL calls, so for the same image and the same crop parameters the pixels are
identical; randomness comes from a ``numpy.random.Generator`` instead of torch's global
RNG, so a loader can make it a pure function of ``(seed, epoch, slot)``.

Two recipes need more: DADA on Cars196 puts torchvision's ImageNet :class:`AutoAugment`
before the crop (PIL ops, the same calls as torchvision's), and Embedding Expansion (MXNet)
trains with :class:`Random2DTranslation` and tests with :class:`SquashResize`, whose
resizes are OpenCV's fixed-point bilinear (:func:`opencv_bilinear_resize`), not PIL's.
:func:`transform_from_config` builds the train or test transform a config's ``data``
section names.

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
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "InputNormalization",
    "UNIT_RANGE",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "Resize",
    "CenterCrop",
    "Compose",
    "SquashResize",
    "Random2DTranslation",
    "AutoAugment",
    "IMAGENET_POLICY",
    "TRAIN_AUGMENTS",
    "EVAL_RESIZE_MODES",
    "train_transform",
    "eval_transform",
    "transform_from_config",
    "opencv_bilinear_resize",
    "random_2d_translation_params",
    "autoaugment_magnitude",
    "autoaugment_op",
    "autoaugment_apply",
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


# --- OpenCV's bilinear resize (the MXNet seeds': Embedding Expansion) -------------------

# OpenCV's INTER_LINEAR on uint8 works in fixed point: 11-bit weights per axis.
_CV_COEF_BITS = 11
_CV_COEF_ONE = 1 << _CV_COEF_BITS


def _opencv_linear_taps(out_size: int, in_size: int, *, clamp_weights: bool):
    """Source indices ``i0, i1`` [out] int and 11-bit weights ``w0, w1`` [out] int32.

    Output pixel ``d`` samples ``(d + 0.5) * in / out - 0.5`` (computed in float64, then
    rounded to float32, as OpenCV does); weights are ``rint((1 - f) * 2048)`` and
    ``rint(f * 2048)`` of the float32 fraction ``f``. Columns (``clamp_weights=True``)
    outside ``[0, in - 1)`` take the edge pixel with weights (2048, 0); rows keep their
    fraction and read the clamped edge row twice, as OpenCV's vertical pass does (the two
    floor divisions of that pass make the difference visible).
    """
    scale = 1.0 / (float(out_size) / float(in_size))
    pos = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(pos).astype(np.int64)
    frac = (pos - start.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        edge = (start < 0) | (start >= in_size - 1)
        frac[edge] = 0.0
        start = np.clip(start, 0, in_size - 1)
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_CV_COEF_ONE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_CV_COEF_ONE)).astype(np.int32)
    return np.clip(start, 0, in_size - 1), np.clip(start + 1, 0, in_size - 1), w0, w1


def opencv_bilinear_resize(image: Image.Image, size: Size) -> Image.Image:
    """Resize to exactly ``size`` (aspect ratio not kept) with OpenCV's INTER_LINEAR.

    MXNet's ``image.resize`` / gluon ``transforms.Resize((w, h), interpolation=1)`` (the
    Embedding Expansion seed's resize) call OpenCV ``cv::resize(..., INTER_LINEAR)``:
    plain bilinear sampling (no antialiasing, unlike PIL's BILINEAR on downscaling) with
    fixed-point arithmetic. This is that arithmetic in NumPy: a horizontal pass ``h =
    p0 * w0 + p1 * w1`` (int32, weights from :func:`_opencv_linear_taps`), then the vertical
    pass of OpenCV's SSE2 kernel, ``((h0 >> 4) * v0 >> 16) + ((h1 >> 4) * v1 >> 16) + 2 >> 2``,
    so the uint8 output equals MXNet 1.9.1's bit for bit (tests/data/test_transforms.py).

    Args:
      image: a PIL image of mode RGB or L.
      size: int or ``(height, width)`` of the output.

    Returns:
      PIL image of ``size``, same mode.
    """
    out_h, out_w = _pair(size, "size")
    pixels = np.asarray(_check_image(image), dtype=np.uint8)
    if pixels.ndim not in (2, 3):
        raise ValueError(f"image must be RGB or L, got mode {image.mode}")
    channels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    in_h, in_w = channels.shape[:2]
    x0, x1, a0, a1 = _opencv_linear_taps(out_w, in_w, clamp_weights=True)
    y0, y1, b0, b1 = _opencv_linear_taps(out_h, in_h, clamp_weights=False)
    # The horizontal pass only for the source rows the vertical pass reads.
    used, inverse = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    source = channels[used].astype(np.int32)
    rows = (source[:, x0] * a0[None, :, None] + source[:, x1] * a1[None, :, None]) >> 4
    top, bottom = rows[inverse[:out_h]], rows[inverse[out_h:]]
    out = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    out = np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    return Image.fromarray(out.reshape((out_h, out_w) + pixels.shape[2:]), mode=image.mode)


def random_2d_translation_params(rng: np.random.Generator, *, p: float, margin_w: int,
                                 margin_h: int) -> Optional[tuple[int, int]]:
    """The draws of Embedding Expansion's ``Random2DTranslation``.

    One ``rng.random()``: below ``p`` means no translation (``None``). Otherwise the crop's
    ``(left, top)`` offsets in the enlarged image, each ``round(U(0, margin))`` with
    Python's round (half to even), left first.
    """
    if rng.random() < p:
        return None
    left = int(round(float(rng.uniform(0, margin_w))))
    top = int(round(float(rng.uniform(0, margin_h))))
    return left, top


# --- AutoAugment (torchvision's, PIL ops) -----------------------------------------------

# The ImageNet policy of AutoAugment (Cubuk et al., CVPR 2019, Table 9), as torchvision's
# ``AutoAugmentPolicy.IMAGENET`` lists it: 25 sub-policies of two (op, probability,
# magnitude bin of 10, or None) each.
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)

_AUTOAUGMENT_BINS = 10


def _float32_linspace(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num)`` in float32: ``start + step * i`` for the first
    half, ``end - step * (num - 1 - i)`` for the rest, ``step`` computed in float32."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(num - 1)
    i = np.arange(num)
    low = start32 + step * i.astype(np.float32)
    high = end32 - step * (num - 1 - i).astype(np.float32)
    return np.where(i < num // 2, low, high).astype(np.float32)


# op name -> (magnitudes of the 10 bins, signed): torchvision's ``_augmentation_space`` for
# the ops the ImageNet policy uses (none of them depends on the image size).
_AUTOAUGMENT_SPACE = {
    "ShearX": (_float32_linspace(0.0, 0.3, _AUTOAUGMENT_BINS), True),
    "Rotate": (_float32_linspace(0.0, 30.0, _AUTOAUGMENT_BINS), True),
    "Color": (_float32_linspace(0.0, 0.9, _AUTOAUGMENT_BINS), True),
    "Contrast": (_float32_linspace(0.0, 0.9, _AUTOAUGMENT_BINS), True),
    "Sharpness": (_float32_linspace(0.0, 0.9, _AUTOAUGMENT_BINS), True),
    # 8 - round(bin / 2.25): 8, 8, 7, 7, 6, 6, 5, 5, 4, 4 bits (round half to even).
    "Posterize": (8 - np.rint(np.arange(_AUTOAUGMENT_BINS, dtype=np.float32)
                              / np.float32((_AUTOAUGMENT_BINS - 1) / 4)), False),
    "Solarize": (_float32_linspace(255.0, 0.0, _AUTOAUGMENT_BINS), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
}


def autoaugment_magnitude(op: str, bin_index: Optional[int], negate: bool) -> float:
    """The magnitude torchvision's AutoAugment passes to ``op`` for a bin (10 bins).

    ``float`` of the float32 table value, negated when ``negate`` and the op is signed;
    0.0 for the ops without magnitude (``bin_index`` None).
    """
    if op not in _AUTOAUGMENT_SPACE:
        raise ValueError(f"op must be one of {sorted(_AUTOAUGMENT_SPACE)}, got {op!r}")
    magnitudes, signed = _AUTOAUGMENT_SPACE[op]
    if bin_index is None or magnitudes is None:
        return 0.0
    magnitude = float(magnitudes[bin_index])
    return -magnitude if signed and negate else magnitude


def autoaugment_op(image: Image.Image, op: str, magnitude: float) -> Image.Image:
    """One AutoAugment op on a PIL image, as torchvision's ``_apply_op`` does on PIL.

    Geometric ops sample with NEAREST and fill the uncovered area with black (torchvision's
    default ``fill=None``). ``ShearX`` shears about the top-left corner with the inverse map
    ``x' = x + tan(radians(degrees(atan(m)))) * y`` (torchvision's float path); ``Rotate`` turns
    by ``m`` degrees counter-clockwise about the centre without expanding; Color, Contrast and
    Sharpness are PIL enhancers with factor ``1 + m``; Posterize keeps ``int(m)`` bits;
    Solarize inverts pixels ``>= m``; AutoContrast, Equalize and Invert are ``ImageOps``'s.
    """
    image = _check_image(image)
    fill = (0,) * len(image.getbands()) if len(image.getbands()) > 1 else 0
    if op == "ShearX":
        slope = math.tan(math.radians(math.degrees(math.atan(magnitude))))
        return image.transform(image.size, Image.AFFINE, (1.0, slope, 0.0, 0.0, 1.0, 0.0),
                               Image.NEAREST, fillcolor=fill)
    if op == "Rotate":
        return image.rotate(magnitude, Image.NEAREST, False, None, fillcolor=fill)
    if op == "Color":
        return ImageEnhance.Color(image).enhance(1.0 + magnitude)
    if op == "Contrast":
        return ImageEnhance.Contrast(image).enhance(1.0 + magnitude)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(image).enhance(1.0 + magnitude)
    if op == "Posterize":
        return ImageOps.posterize(image, int(magnitude))
    if op == "Solarize":
        return ImageOps.solarize(image, magnitude)
    if op == "AutoContrast":
        return ImageOps.autocontrast(image)
    if op == "Equalize":
        return ImageOps.equalize(image)
    if op == "Invert":
        return ImageOps.invert(image)
    raise ValueError(f"op must be one of {sorted(_AUTOAUGMENT_SPACE)}, got {op!r}")


def autoaugment_apply(image: Image.Image, sub_policy: Sequence, probs: Sequence[float],
                      signs: Sequence[int]) -> Image.Image:
    """Apply one sub-policy with given draws, as torchvision's ``AutoAugment.forward``.

    Op ``i`` of ``sub_policy`` (``(name, probability, bin)``) runs when ``probs[i] <=
    probability``; a signed op's magnitude is negated when ``signs[i] == 0``.
    """
    for (op, probability, bin_index), prob, sign in zip(sub_policy, probs, signs):
        if prob <= probability:
            image = autoaugment_op(image, op, autoaugment_magnitude(op, bin_index, sign == 0))
    return image


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


class SquashResize:
    """Resize to exactly ``size`` with OpenCV's bilinear, ignoring the aspect ratio.

    The Embedding Expansion seed's test transform, MXNet gluon ``transforms.Resize((w,
    h))`` with its default ``interpolation=1``; see :func:`opencv_bilinear_resize`.
    ``__call__(image, rng=None) -> PIL.Image`` of ``size``.
    """

    def __init__(self, size: Size):
        self.size = _pair(size, "size")

    def __call__(self, image: Image.Image, rng: Optional[np.random.Generator] = None) -> Image.Image:
        del rng
        return opencv_bilinear_resize(image, self.size)

    def __repr__(self):
        return f"SquashResize(size={self.size})"


class Random2DTranslation:
    """Embedding Expansion's training crop: a squash resize, or a larger one and a crop.

    With probability ``p`` the image is squash-resized to ``size``; otherwise it is
    squash-resized to ``(round(h * enlarge), round(w * enlarge))`` (255 for 227 with 1.125)
    and a ``size`` window cut at the offsets of :func:`random_2d_translation_params`.
    Resizes are OpenCV bilinear (:func:`opencv_bilinear_resize`), as MXNet's.
    ``__call__(image, rng) -> PIL.Image`` of ``size``; draws ``rng.random()`` and, when it
    translates, two ``rng.uniform``.
    """

    def __init__(self, size: Size, *, p: float = 0.5, enlarge: float = 1.125):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not enlarge >= 1.0:
            raise ValueError(f"enlarge must be >= 1, got {enlarge}")
        self.size = _pair(size, "size")
        self.p = float(p)
        self.enlarge = float(enlarge)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        height, width = self.size
        big_h, big_w = int(round(height * self.enlarge)), int(round(width * self.enlarge))
        offsets = random_2d_translation_params(rng, p=self.p, margin_w=big_w - width,
                                               margin_h=big_h - height)
        if offsets is None:
            return opencv_bilinear_resize(image, self.size)
        left, top = offsets
        enlarged = opencv_bilinear_resize(image, (big_h, big_w))
        return enlarged.crop((left, top, left + width, top + height))

    def __repr__(self):
        return f"Random2DTranslation(size={self.size}, p={self.p}, enlarge={self.enlarge})"


class AutoAugment:
    """torchvision ``AutoAugment(AutoAugmentPolicy.IMAGENET)`` on PIL, NumPy-driven.

    Per image: a sub-policy ``rng.integers(0, 25)``, two probabilities ``rng.random(2)`` and
    two signs ``rng.integers(0, 2, 2)`` (torchvision draws the same three from torch's RNG),
    then :func:`autoaugment_apply`. NEAREST sampling and black fill, torchvision's defaults.
    ``__call__(image, rng) -> PIL.Image`` of the input's size.
    """

    def __init__(self, policy: Sequence = IMAGENET_POLICY):
        self.policy = tuple(policy)
        for sub_policy in self.policy:
            for op, _, bin_index in sub_policy:
                autoaugment_magnitude(op, bin_index, False)  # unknown ops fail here

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        index = int(rng.integers(0, len(self.policy)))
        probs = rng.random(2)
        signs = rng.integers(0, 2, 2)
        return autoaugment_apply(_check_image(image), self.policy[index], probs, signs)

    def __repr__(self):
        name = "IMAGENET" if self.policy == IMAGENET_POLICY else f"{len(self.policy)} sub-policies"
        return f"AutoAugment(policy={name})"


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


# --- the transforms a config names -------------------------------------------------------

def _random_resized_crop(data) -> list:
    return [RandomResizedCrop(data.input_size, scale=(data.crop_scale_min, 1.0))]


def _ee_random_2d_translation(data) -> list:
    return [Random2DTranslation(data.input_size)]


def _short_side_center_crop(data) -> list:
    return [Resize(data.resize), CenterCrop(data.input_size)]


def _squash(data) -> list:
    return [SquashResize(data.input_size)]


# config.data.train_augment -> the crop before the flip; config.data.eval_resize_mode -> the
# test-time geometry.
TRAIN_AUGMENTS = {
    "random_resized_crop": _random_resized_crop,
    "ee_random_2d_translation": _ee_random_2d_translation,
}
EVAL_RESIZE_MODES = {
    "short_side_center_crop": _short_side_center_crop,
    "squash": _squash,
}


def transform_from_config(data, norm=None, *, training: bool) -> Compose:
    """The train or test transform of a config's ``data`` section.

    Training: ``[AutoAugment() if data.autoaugment] + TRAIN_AUGMENTS[data.train_augment] +
    RandomHorizontalFlip(0.5)``, i.e.

    * 'random_resized_crop': RandomResizedCrop(input_size, scale=(crop_scale_min, 1)), the
      torchvision seeds';
    * 'ee_random_2d_translation': :class:`Random2DTranslation` (input_size), Embedding
      Expansion's;

    and AutoAugment (ImageNet policy) on the whole image before the crop, as DADA's
    ``augmentation: auto``. Test: ``EVAL_RESIZE_MODES[data.eval_resize_mode]``:

    * 'short_side_center_crop': Resize(resize) of the shorter side + CenterCrop(input_size);
    * 'squash': :class:`SquashResize` (input_size), Embedding Expansion's.

    Args:
      data: an object with the fields above (a config's ``data`` ConfigDict).
      norm: the :class:`InputNormalization` the batches carry.
      training: which of the two.

    Raises:
      ValueError: naming the field whose value is not a known name.
    """
    if training:
        if data.train_augment not in TRAIN_AUGMENTS:
            raise ValueError(f"config.data.train_augment must be one of {list(TRAIN_AUGMENTS)}, "
                             f"got {data.train_augment!r}")
        ops = [AutoAugment()] if data.autoaugment else []
        ops += TRAIN_AUGMENTS[data.train_augment](data) + [RandomHorizontalFlip(0.5)]
        return Compose(ops, norm=norm)
    if data.eval_resize_mode not in EVAL_RESIZE_MODES:
        raise ValueError(f"config.data.eval_resize_mode must be one of "
                         f"{list(EVAL_RESIZE_MODES)}, got {data.eval_resize_mode!r}")
    return Compose(EVAL_RESIZE_MODES[data.eval_resize_mode](data), norm=norm)
