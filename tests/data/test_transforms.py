"""Transforms equal their references for the same image and the same random draws.

torch/torchvision are test-only references here; the package never imports them. The
RandomResizedCrop/Resize/CenterCrop path and AutoAugment are compared with torchvision on
PIL images; Embedding Expansion's MXNet transforms with a fixture made by the official
code (see :func:`test_ee_train_transform_matches_official_with_the_same_draws`).
"""

import pathlib
from types import SimpleNamespace
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


# --- Embedding Expansion (MXNet / OpenCV) -------------------------------------------------

EE_FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "ee_transforms_official.npz"


def _ee_fixture():
    """The fixture's arrays, pixel arrays decoded from their row differences."""
    with np.load(EE_FIXTURE) as data:
        out = {}
        for key in data.files:
            value = data[key]
            if key.endswith("_row_delta"):
                key, value = key[: -len("_row_delta")], np.cumsum(value, axis=1, dtype=np.uint8)
            out[key] = value
    return out


def _ee_data(**overrides):
    """A config's data section as the EE configs set it (227, EE train and test geometry)."""
    fields = dict(input_size=227, resize=227, crop_scale_min=0.08, autoaugment=False,
                  train_augment="ee_random_2d_translation", eval_resize_mode="squash")
    fields.update(overrides)
    return SimpleNamespace(**fields)


class _Replay:
    """A generator stand-in that returns recorded draws in order, checking their kind."""

    def __init__(self, draws):
        self.draws = list(draws)

    def random(self):
        kind, value = self.draws.pop(0)
        assert kind == "random"
        return value

    def uniform(self, low, high):
        kind, value = self.draws.pop(0)
        assert kind == "uniform" and (low, high) == (0, 28)  # 255 - 227
        return value


def test_ee_train_transform_matches_official_with_the_same_draws():
    """Random2DTranslation(227) + flip equal the official code's pixels for its draws.

    tests/fixtures/ee_transforms_official.npz was made outside the repository by running
    the official ``transforms/transforms.py`` of clovaai/embedding-expansion (commit
    1aa68cb; its ``Transforms(227, 227, is_train=True)``: ``Random2DTranslation`` then
    gluon ``RandomFlipLeftRight``, before ``ToTensor``) under MXNet 1.9.1 on four generated
    uint8 images (40x30, 33x47, 300x260, 228x226: upscaling and downscaling, both
    branches, both flips), with the module's ``random`` replaced by a recorder of the
    values it returned (``train*/draws``, ``draw_kinds``; seeds 0, 7, 5, 2); the flip, drawn
    by MXNet's own RNG, was read off the output (``train*/flip``). Also the test transform,
    gluon ``Resize((227, 227))`` (``eval_*``). Pixel arrays are stored as uint8 differences
    along each row (they compress ~3x better); ``np.cumsum(..., dtype=uint8)`` restores them.

    MXNet's flip kernel never writes the middle column of an odd-width image
    (apache/mxnet#18911): there the official output holds whatever the fresh buffer held,
    so that one column is not compared on flipped cases.
    """
    data = _ee_fixture()
    transform = T.transform_from_config(_ee_data(), training=True)
    cases = sorted({k.split("/")[0] for k in data if k.startswith("train")})
    assert len(cases) == 4 and {bool(data[f"{c}/flip"]) for c in cases} == {True, False}
    for case in cases:
        image = Image.fromarray(data[f"image_{data[f'{case}/image']}"])
        draws = list(zip(data[f"{case}/draw_kinds"], data[f"{case}/draws"]))
        flip = bool(data[f"{case}/flip"])
        replay = _Replay(draws + [("random", 0.0 if flip else 0.75)])
        ours = transform(image, replay)
        assert not replay.draws, case
        expected = data[f"{case}/output"]
        keep = np.ones(227, bool)
        keep[113] = not flip
        np.testing.assert_array_equal(ours[:, keep], expected[:, keep], err_msg=case)
    # Both branches of the official draw are in the fixture.
    assert {len(data[f"{c}/draws"]) for c in cases} == {1, 3}


def test_ee_eval_transform_matches_official():
    data = _ee_fixture()
    transform = T.transform_from_config(_ee_data(), training=False)
    for name in ("a", "c", "d"):
        ours = transform(Image.fromarray(data[f"image_{name}"]), None)
        np.testing.assert_array_equal(ours, data[f"eval_{name}/output"], err_msg=name)


def test_opencv_bilinear_resize_properties():
    image = _image(46, 30, seed=4)
    pixels = T.to_uint8_array(image)
    # Same size: unchanged. Exactly half: OpenCV's bilinear is the rounded 2x2 mean.
    np.testing.assert_array_equal(T.to_uint8_array(T.opencv_bilinear_resize(image, (30, 46))), pixels)
    quads = pixels.reshape(15, 2, 23, 2, 3).astype(np.int32).sum(axis=(1, 3))
    np.testing.assert_array_equal(T.to_uint8_array(T.opencv_bilinear_resize(image, (15, 23))),
                                  ((quads + 2) >> 2).astype(np.uint8))
    # Not PIL's antialiased bilinear on a strong downscale; grayscale keeps its mode.
    big = _image(400, 300, seed=5)
    assert not np.array_equal(T.to_uint8_array(T.opencv_bilinear_resize(big, (30, 40))),
                              T.to_uint8_array(T.resize(big, (30, 40))))
    gray = T.opencv_bilinear_resize(big.convert("L"), (17, 23))
    assert gray.mode == "L" and gray.size == (23, 17)


def test_random_2d_translation_draws_and_sizes():
    image = _image(64, 48, seed=6)
    translate = T.Random2DTranslation(227)
    # The enlarged size is round(227 * 1.125) = 255; offsets are rounded draws in [0, 28].
    for left, top in [(0.0, 0.0), (27.6, 0.4), (12.5, 13.5)]:
        ours = translate(image, _Replay([("random", 0.5), ("uniform", left), ("uniform", top)]))
        x, y = round(left), round(top)  # 12.5 -> 12, 13.5 -> 14 (half to even, as Python)
        enlarged = T.opencv_bilinear_resize(image, 255)
        np.testing.assert_array_equal(T.to_uint8_array(ours),
                                      T.to_uint8_array(enlarged)[y:y + 227, x:x + 227])
    plain = translate(image, _Replay([("random", 0.49)]))
    np.testing.assert_array_equal(T.to_uint8_array(plain),
                                  T.to_uint8_array(T.opencv_bilinear_resize(image, 227)))
    rng = np.random.default_rng(0)
    assert {translate(image, rng).size for _ in range(8)} == {(227, 227)}
    with pytest.raises(ValueError, match="p must"):
        T.Random2DTranslation(227, p=2.0)


# --- AutoAugment (torchvision) ----------------------------------------------------------

def _aa_images():
    """Small RGB images: textured, non-square, low-contrast (AutoContrast/Equalize act), and
    one tall enough that a shear's slope shows in the last bit."""
    low = Image.fromarray((100 + T.to_uint8_array(_image(37, 29, seed=9)) // 5).astype(np.uint8))
    return [_image(40, 30, seed=7), _image(31, 45, seed=8), low, _image(96, 128, seed=10)]


def _torchvision_autoaugment(image, index, probs, signs):
    """torchvision's AutoAugment(IMAGENET).forward with its get_params replaced by these draws."""
    params = (index, torch.tensor(probs, dtype=torch.float64), torch.tensor(signs))
    with mock.patch.object(tv.AutoAugment, "get_params", staticmethod(lambda n: params)):
        return tv.AutoAugment(tv.AutoAugmentPolicy.IMAGENET)(image)


def test_autoaugment_policy_and_magnitudes_equal_torchvision():
    reference = tv.AutoAugment(tv.AutoAugmentPolicy.IMAGENET)
    assert [tuple(s) for s in reference.policies] == [tuple(s) for s in T.IMAGENET_POLICY]
    space = reference._augmentation_space(10, (30, 40))
    for op in {op for sub in T.IMAGENET_POLICY for op, _, _ in sub}:
        magnitudes, signed = space[op]
        for bin_index in range(10) if magnitudes.ndim else [None]:
            expected = float(magnitudes[bin_index].item()) if bin_index is not None else 0.0
            assert T.autoaugment_magnitude(op, bin_index, False) == expected, (op, bin_index)
            assert T.autoaugment_magnitude(op, bin_index, True) == (-expected if signed else expected)


@pytest.mark.parametrize("index", range(25))
def test_autoaugment_every_sub_policy_equals_torchvision(index):
    # Both ops applied (with every sign pair), then each op alone.
    decisions = [((0.0, 0.0), (0, 0)), ((0.0, 0.0), (1, 1)), ((0.0, 0.0), (0, 1)),
                 ((0.0, 0.99), (1, 0)), ((0.99, 0.0), (0, 0))]
    for image in _aa_images():
        for probs, signs in decisions:
            ours = T.autoaugment_apply(image, T.IMAGENET_POLICY[index], probs, signs)
            theirs = _torchvision_autoaugment(image, index, probs, signs)
            np.testing.assert_array_equal(T.to_uint8_array(ours), _tv_pixels(theirs),
                                          err_msg=f"{T.IMAGENET_POLICY[index]} {probs} {signs}")


def test_autoaugment_class_equals_torchvision_given_its_draws():
    # The class draws (sub-policy, two probabilities, two signs) from the generator; replayed
    # into torchvision, they give the same pixels. Probabilities compare in float64 on both.
    image = _aa_images()[0]
    applied = 0
    for seed in range(30):
        ours = T.AutoAugment()(image, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        index, probs, signs = int(replay.integers(0, 25)), replay.random(2), replay.integers(0, 2, 2)
        theirs = _torchvision_autoaugment(image, index, list(probs), list(signs))
        np.testing.assert_array_equal(T.to_uint8_array(ours), _tv_pixels(theirs), err_msg=str(seed))
        applied += not np.array_equal(T.to_uint8_array(ours), T.to_uint8_array(image))
    assert applied > 10
    with pytest.raises(ValueError, match="op must"):
        T.AutoAugment([(("Blur", 0.5, 1), ("Equalize", 0.5, None))])


# --- config seam --------------------------------------------------------------------------

def test_transform_from_config_defaults_are_the_seeds_transforms():
    data = _ee_data(input_size=32, resize=40, crop_scale_min=0.3,
                    train_augment="random_resized_crop", eval_resize_mode="short_side_center_crop")
    image = _image(64, 48, seed=2)
    for seed in range(3):
        np.testing.assert_array_equal(
            T.transform_from_config(data, IMAGENET, training=True)(image, np.random.default_rng(seed)),
            T.train_transform(32, IMAGENET, scale=(0.3, 1.0))(image, np.random.default_rng(seed)))
    np.testing.assert_array_equal(T.transform_from_config(data, training=False)(image, None),
                                  T.eval_transform(40, 32)(image, None))
    assert T.transform_from_config(data, IMAGENET, training=False).norm == IMAGENET
    # DADA's 'auto': AutoAugment on the whole image, then the crop and the flip.
    ops = T.transform_from_config(_ee_data(autoaugment=True, train_augment="random_resized_crop"),
                                  training=True).ops
    assert [type(op) for op in ops] == [T.AutoAugment, T.RandomResizedCrop, T.RandomHorizontalFlip]


def test_transform_from_config_names_a_bad_value():
    with pytest.raises(ValueError, match=r"config\.data\.train_augment must be one of"):
        T.transform_from_config(_ee_data(train_augment="ee"), training=True)
    with pytest.raises(ValueError, match=r"config\.data\.eval_resize_mode must be one of"):
        T.transform_from_config(_ee_data(eval_resize_mode="crop"), training=False)
