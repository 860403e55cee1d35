"""Flax backbones and the embedding model, with ImageNet weights imported from PyTorch files.

* ``create_model(*, backbone, embedding_dim, pooling, l2_normalize, freeze_bn, bn_rule, dtype)``
  → ``EmbeddingModel``: images [B, H, W, 3] NHWC → embeddings [B, D].
* ``input_normalization(backbone)`` → the ``InputNormalization`` its weights expect.
* ``load_pretrained(variables, path, backbone)`` merges a file written by
  ``python -m proxy_jax.convert`` into the backbone subtree.
* ``BACKBONES``: 'bn_inception', 'resnet18', 'resnet34', 'resnet50', 'resnet101',
  'googlenet', 'googlenet_gluon' (gluoncv's GoogLeNet, imported from MXNet ``.params``),
  'tiny_cnn', and the Vision Transformers (timm's names, ``proxy_jax.models.vit``)
  'vit_small_patch16_224', 'vit_base_patch16_224', 'deit_small_patch16_224',
  'vit_small_patch14_dinov2', 'vit_base_patch14_dinov2', 'vit_small_patch14_reg4_dinov2',
  'vit_base_patch14_reg4_dinov2', 'vit_tiny_test'.
"""
from proxy_jax.models.embedding import (EMBEDDING_INITS, POOLINGS, TOKEN_POOLINGS,
                                        EmbeddingModel, create_model, global_pool, output_dim,
                                        pooled_width, token_pool)
from proxy_jax.models.layers import BatchNormRule
from proxy_jax.models.normalization import InputNormalization, input_normalization
from proxy_jax.models.registry import BACKBONES, BackboneSpec, get_backbone
from proxy_jax.models.weights import (backbone_shapes, batchnorm_param_mask, check_weights,
                                      load_pretrained, load_weights, save_weights)

__all__ = [
    "BACKBONES", "BackboneSpec", "BatchNormRule", "EMBEDDING_INITS", "EmbeddingModel",
    "InputNormalization", "POOLINGS", "TOKEN_POOLINGS", "backbone_shapes",
    "batchnorm_param_mask", "check_weights", "create_model", "get_backbone", "global_pool",
    "input_normalization", "load_pretrained", "load_weights", "output_dim", "pooled_width",
    "save_weights", "token_pool",
]
