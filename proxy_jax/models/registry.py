"""Backbones by name.

Each entry says how to build the Flax feature extractor, how many channels it outputs, and
which keys of the corresponding PyTorch state_dict are ImageNet classifier heads that the
converter drops on purpose (every other key must map, see proxy_jax.convert).
"""
import functools
from typing import Any, Callable, NamedTuple

from proxy_jax.models.bn_inception import BNInception
from proxy_jax.models.googlenet import GoogLeNet
from proxy_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from proxy_jax.models.tiny_cnn import TinyCNN

__all__ = ["BackboneSpec", "BACKBONES", "get_backbone"]


class BackboneSpec(NamedTuple):
    factory: Callable[..., Any]  # (*, freeze_bn, bn_momentum, dtype, name) -> flax Module
    num_features: int  # channels of the output feature map
    head_prefixes: tuple  # state_dict key prefixes of classifier heads (dropped on import)
    torch_source: str  # the PyTorch model whose state_dict key names are used


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
}


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry of ``name``; ValueError listing the names if it is unknown."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}") from None
