"""The input normalization each backbone's pretrained weights expect.

The type is the data layer's (``proxy_jax.data.transforms.InputNormalization``, which the
loader applies); this module only knows which values each backbone's weights were trained
with, so the models depend on the data layer and never the other way round.
"""
from proxy_jax.data.transforms import InputNormalization

__all__ = ["InputNormalization", "input_normalization"]


# torchvision ImageNet models: RGB on [0, 1] with the ImageNet statistics.
_TORCHVISION = InputNormalization(
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bgr=False, scale=1.0 / 255.0)
# Cadene pretrainedmodels `bninception` (a Caffe port): BGR on 0..255, mean [104, 117, 128]
# in BGR order, std 1 (its `pretrained_settings`).
_BN_INCEPTION = InputNormalization(
    mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), bgr=True, scale=1.0)
# tiny_cnn is trained from scratch: centre [0, 1] pixels at 0 with unit-ish range.
_TINY = InputNormalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bgr=False, scale=1.0 / 255.0)

# timm's augreg ViT-S/16 and ViT-B/16 (vit_*_patch16_224) take [-1, 1] (mean = std = 0.5).
_INCEPTION = InputNormalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bgr=False,
                                scale=1.0 / 255.0)

_BY_BACKBONE = {
    "resnet18": _TORCHVISION,
    "resnet34": _TORCHVISION,
    "resnet50": _TORCHVISION,
    "resnet101": _TORCHVISION,
    # torchvision's pretrained GoogLeNet takes ImageNet-normalized input and re-maps it
    # itself (transform_input=True, see proxy_jax.models.googlenet).
    "googlenet": _TORCHVISION,
    # gluoncv's GoogLeNet takes the same normalized input as it is (Embedding Expansion's
    # transforms: ToTensor + Normalize with the ImageNet mean and std).
    "googlenet_gluon": _TORCHVISION,
    "bn_inception": _BN_INCEPTION,
    "tiny_cnn": _TINY,
    "vit_small_patch16_224": _INCEPTION,
    "vit_base_patch16_224": _INCEPTION,
    # DeiT, DINO and DINOv2 were trained on ImageNet-normalized input.
    "deit_small_patch16_224": _TORCHVISION,
    "vit_small_patch14_dinov2": _TORCHVISION,
    "vit_base_patch14_dinov2": _TORCHVISION,
    "vit_small_patch14_reg4_dinov2": _TORCHVISION,
    "vit_base_patch14_reg4_dinov2": _TORCHVISION,
    "vit_tiny_test": _TINY,
}


def input_normalization(backbone: str) -> InputNormalization:
    """Returns the InputNormalization the named backbone's weights expect.

    Raises:
      ValueError: ``backbone`` is not a registered backbone name.
    """
    try:
        return _BY_BACKBONE[backbone]
    except KeyError:
        raise ValueError(
            f"backbone must be one of {sorted(_BY_BACKBONE)}, got {backbone!r}") from None
