"""Transforms equal torchvision's (PIL path) for the same image and the same parameters.

torch/torchvision are test-only references here; the package never imports them.
"""

from unittest import mock

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision.transforms")
F = pytest.importorskip("torchvision.transforms.functional")

from proxy_jax.data import transforms as T  # noqa: E402

IMAGENET = T.InputNormalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bgr=False,
                           scale=1.0 / 255.0)
BN_INCEPTION = T.InputNormalization(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), bgr=True, scale=1.0)


def _image(width, height, seed=0, mode="RGB"):
    """A smooth image with some texture (bilinear filters see real gradients)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     127 + 120 * np.sin(xx / 7.0 + yy / 5.0)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _tv_pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class _Scripted:
    """Stands in for a NumPy generator with given uniform fractions and integers."""

    def __init__(self, fractions, integers):
        self.fractions, self.ints = list(fractions), list(integers)

    def uniform(self, low, high):
        return low + (high - low) * self.fractions.pop(0)

    def integers(self, low, high):
        return low + self.ints.pop(0) % (high - low)


def test_random_resized_crop_params_follow_torchvision_algorithm():
    # Feed torchvision's get_params and ours the same uniform fractions and integers: the
    # boxes agree, including retries (tiny image vs large scale) and every branch.
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (375, 500), (64, 48), (1000, 60)]:
        for _ in range(40):
            fractions = rng.uniform(0, 1, 20)
            ints = rng.integers(0, 10**6, 2)

            def fake_empty(*args, _f=iter(fractions), **kwargs):
                t = mock.Mock()
                t.uniform_ = lambda lo, hi: torch.tensor([lo + (hi - lo) * next(_f)], dtype=torch.float64)
                return t

            def fake_randint(low, high, size, _i=iter(ints)):
                return torch.tensor([low + int(next(_i)) % (high - low)])

            with mock.patch.object(torch, "empty", fake_empty), mock.patch.object(torch, "randint", fake_randint):
                expected = tv.RandomResizedCrop.get_params(Image.new("RGB", (width, height)),
                                                           [0.08, 1.0], [3 / 4, 4 / 3])
            got = T.random_resized_crop_params(width, height, _Scripted(fractions, ints))
            assert got == tuple(expected), (width, height)


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000), (12, 10)])
def test_random_resized_crop_fallback_equals_torchvision(width, height):
    # scale (0.9, 1) and ratio (2, 3) cannot fit (12x10) or extreme images: central fallback.
    kwargs = dict(scale=(0.99, 1.0), ratio=(2.0, 3.0)) if width == 12 else {}
    expected = tv.RandomResizedCrop.get_params(Image.new("RGB", (width, height)),
                                               list(kwargs.get("scale", (0.08, 1.0))),
                                               list(kwargs.get("ratio", (3 / 4, 4 / 3))))
    got = T.random_resized_crop_params(width, height, np.random.default_rng(0), **kwargs)
    assert got == tuple(expected)


def test_resized_crop_pixels_equal_torchvision():
    rng = np.random.default_rng(1)
    for seed, (width, height) in enumerate([(500, 375), (333, 480), (97, 61)]):
        image = _image(width, height, seed)
        for _ in range(5):
            top, left, h, w = T.random_resized_crop_params(width, height, rng)
            ours = T.to_uint8_array(T.resized_crop(image, top, left, h, w, 224))
            theirs = _tv_pixels(F.resized_crop(image, top, left, h, w, [224, 224]))
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (256, 300), (200, 150), (230, 100),
                                          (224, 224)])
def test_resize_and_center_crop_equal_torchvision(width, height):
    image = _image(width, height, seed=width)
    ours = T.eval_transform(256, 224)(image, np.random.default_rng(0))
    theirs = _tv_pixels(tv.Compose([tv.Resize(256), tv.CenterCrop(224)])(image))
    np.testing.assert_array_equal(ours, theirs)
    # CenterCrop alone on an image smaller than the crop: zero padding like torchvision.
    np.testing.assert_array_equal(T.to_uint8_array(T.center_crop(image, (240, 250))),
                                  _tv_pixels(F.center_crop(image, [240, 250])))
    np.testing.assert_array_equal(T.to_uint8_array(T.resize(image, (50, 70))),
                                  _tv_pixels(F.resize(image, [50, 70])))


def test_train_transform_equals_torchvision_with_the_same_draws():
    # Our train transform draws crop params then the flip from rng; torchvision applied with
    # those very params and flip decision gives the same pixels.
    image = _image(500, 375, seed=3)
    flips = 0
    for seed in range(12):
        ours = T.train_transform(224)(image, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        top, left, h, w = T.random_resized_crop_params(500, 375, replay)
        theirs = F.resized_crop(image, top, left, h, w, [224, 224])
        if replay.random() < 0.5:
            theirs = F.hflip(theirs)
            flips += 1
        np.testing.assert_array_equal(ours, _tv_pixels(theirs))
    assert 0 < flips < 12  # both branches exercised


def test_same_rng_same_output_and_modes_converted():
    t = T.train_transform(32)
    image = _image(64, 48)
    np.testing.assert_array_equal(t(image, np.random.default_rng(5)), t(image, np.random.default_rng(5)))
    for mode in ["L", "RGBA", "CMYK", "P"]:
        converted = _image(64, 48, mode=mode)
        out = T.eval_transform(40, 32)(converted, np.random.default_rng(0))
        expected = _tv_pixels(tv.Compose([tv.Resize(40), tv.CenterCrop(32)])(converted.convert("RGB")))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)


def test_normalize_equals_to_tensor_normalize():
    image = _image(40, 30)
    pixels = T.to_uint8_array(image)[None]
    ours = T.normalize(pixels, IMAGENET)
    theirs = tv.Normalize(IMAGENET.mean, IMAGENET.std)(tv.ToTensor()(image)).permute(1, 2, 0).numpy()
    assert ours.dtype == np.float32 and ours.shape == (1, 30, 40, 3)
    np.testing.assert_allclose(ours[0], theirs, rtol=1e-6, atol=2e-6)
    # BN-Inception as the seeds build it: RGB2BGR on the PIL image, ToTensor, x * 255, Normalize.
    b, g, r = image.split()
    bgr = tv.ToTensor()(Image.merge("RGB", (r, g, b))) * 255
    theirs = tv.Normalize(BN_INCEPTION.mean, BN_INCEPTION.std)(bgr).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(T.normalize(pixels, BN_INCEPTION)[0], theirs, rtol=1e-6, atol=1e-4)
    # ToTensor alone is the default.
    np.testing.assert_allclose(T.normalize(pixels)[0], tv.ToTensor()(image).permute(1, 2, 0).numpy(),
                               rtol=1e-6, atol=1e-7)


def test_models_input_normalization_and_jax_arrays():
    # A backbone's normalization is the data layer's InputNormalization with its weights'
    # values, and normalize runs unchanged on jax arrays (normalizing on the device).
    import jax.numpy as jnp
    from proxy_jax.models.normalization import input_normalization

    pixels = T.to_uint8_array(_image(20, 10))[None]
    for backbone, reference in [("resnet50", IMAGENET), ("bn_inception", BN_INCEPTION)]:
        norm = input_normalization(backbone)
        assert isinstance(norm, T.InputNormalization) and norm == reference
        np.testing.assert_allclose(T.normalize(pixels, norm), T.normalize(pixels, reference),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(T.normalize(jnp.asarray(pixels), norm)),
                                   T.normalize(pixels, norm), rtol=1e-6, atol=1e-5)
    assert T.train_transform(16, input_normalization("bn_inception")).norm.bgr


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        T.RandomResizedCrop(0)
    with pytest.raises(ValueError, match="scale"):
        T.RandomResizedCrop(8, scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="norm"):
        T.train_transform(8, norm=object())
    with pytest.raises(ValueError, match="uint8"):
        T.normalize(np.zeros((2, 4, 4, 3), np.float32), IMAGENET)
    with pytest.raises(ValueError, match="PIL"):
        T.train_transform(8)(np.zeros((4, 4, 3), np.uint8), np.random.default_rng(0))
