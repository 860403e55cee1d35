"""Backbones by name.

Each entry says how to build the Flax feature extractor, how many channels it outputs, and
which keys of the corresponding PyTorch state_dict are ImageNet classifier heads that the
converter drops on purpose (every other key must map, see proxy_jax.convert).
"""
import functools
from typing import Any, Callable, NamedTuple, Optional

from proxy_jax.models.bn_inception import BNInception
from proxy_jax.models.googlenet import GoogLeNet
from proxy_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from proxy_jax.models.tiny_cnn import TinyCNN
from proxy_jax.models.vit import VisionTransformer

__all__ = ["BackboneSpec", "BACKBONES", "get_backbone"]


class BackboneSpec(NamedTuple):
    factory: Callable[..., Any]  # (*, freeze_bn, bn_rule, dtype[, drop_path_rate]) -> Module
    num_features: int  # channels of the output feature map (a ViT: its token width)
    head_prefixes: tuple  # state_dict key prefixes of classifier heads (dropped on import)
    torch_source: str  # the PyTorch model whose state_dict key names are used
    # None: a CNN, whose output is a feature map [B, h, w, C]. A ViT outputs tokens
    # [B, T, C] whose first num_prefix_tokens are the class token and the registers.
    num_prefix_tokens: Optional[int] = None

    @property
    def is_transformer(self) -> bool:
        return self.num_prefix_tokens is not None


def _vit(width: int, depth: int, heads: int, *, patch: int, pos_grid: int, registers: int = 0,
         layer_scale: Optional[float] = None, source: str) -> BackboneSpec:
    factory = functools.partial(VisionTransformer, patch_size=patch, width=width, depth=depth,
                                num_heads=heads, pos_grid=pos_grid, num_registers=registers,
                                embed_class=registers == 0, layer_scale=layer_scale)
    return BackboneSpec(factory, width, ("head.",), source, 1 + registers)


# timm's 224² ViT / DeiT files store a 14 x 14 position grid; DINOv2's (timm's and the
# facebookresearch release) a 37 x 37 one, for 518²; another input size resamples it.
_DINOV2 = dict(patch=14, pos_grid=37, layer_scale=1e-5)


# torchvision calls the classifier 'fc'; pretrainedmodels' resnet50 (DADA's backbone, the same
# network and weights) calls it 'last_linear'.
_RESNET_HEADS = ("fc.", "last_linear.")

BACKBONES = {
    "resnet18": BackboneSpec(functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
                             512, _RESNET_HEADS, "torchvision.models.resnet18"),
    "resnet34": BackboneSpec(functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3)),
                             512, _RESNET_HEADS, "torchvision.models.resnet34"),
    "resnet50": BackboneSpec(functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
                             2048, _RESNET_HEADS, "torchvision.models.resnet50"),
    "resnet101": BackboneSpec(functools.partial(ResNet, block=Bottleneck,
                                                stage_sizes=(3, 4, 23, 3)),
                              2048, _RESNET_HEADS, "torchvision.models.resnet101"),
    "googlenet": BackboneSpec(GoogLeNet, 1024, ("fc.", "aux1.", "aux2."),
                              "torchvision.models.googlenet"),
    # gluoncv's GoogLeNet (Embedding Expansion's backbone), with torchvision's key names:
    # proxy_jax.convert renames its .params keys (head., output., aux1., aux2. are heads).
    "googlenet_gluon": BackboneSpec(
        functools.partial(GoogLeNet, transform_input=False, pool4_ceil_mode=False), 1024,
        ("fc.", "aux1.", "aux2.", "head.", "output."),
        "torchvision.models.googlenet (renamed from gluoncv.model_zoo.googlenet .params)"),
    "bn_inception": BackboneSpec(BNInception, 1024, ("last_linear.",),
                                 "pretrainedmodels.models.bninception.BNInception"),
    "tiny_cnn": BackboneSpec(TinyCNN, 256, (), "proxy_jax.models.tiny_cnn (no PyTorch model)"),
    "vit_small_patch16_224": _vit(384, 12, 6, patch=16, pos_grid=14,
                                  source="timm vit_small_patch16_224"),
    "vit_base_patch16_224": _vit(768, 12, 12, patch=16, pos_grid=14,
                                 source="timm vit_base_patch16_224"),
    # DeiT-S is ViT-S/16; DINO's ViT-S/16 file (dino_deitsmall16_pretrain.pth) is this network.
    "deit_small_patch16_224": _vit(384, 12, 6, patch=16, pos_grid=14,
                                   source="timm deit_small_patch16_224 / DINO vit_small"),
    "vit_small_patch14_dinov2": _vit(384, 12, 6, **_DINOV2,
                                     source="timm vit_small_patch14_dinov2 / DINOv2 vits14"),
    "vit_base_patch14_dinov2": _vit(768, 12, 12, **_DINOV2,
                                    source="timm vit_base_patch14_dinov2 / DINOv2 vitb14"),
    "vit_small_patch14_reg4_dinov2": _vit(
        384, 12, 6, registers=4, **_DINOV2,
        source="timm vit_small_patch14_reg4_dinov2 / DINOv2 vits14_reg"),
    "vit_base_patch14_reg4_dinov2": _vit(
        768, 12, 12, registers=4, **_DINOV2,
        source="timm vit_base_patch14_reg4_dinov2 / DINOv2 vitb14_reg"),
    # Width 32, 2 blocks of 2 heads, 8 x 8 patches of a 32² image: for tests, from scratch.
    "vit_tiny_test": _vit(32, 2, 2, patch=8, pos_grid=4, source="proxy_jax (no PyTorch model)"),
}


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry of ``name``; ValueError listing the names if it is unknown."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}") from None
