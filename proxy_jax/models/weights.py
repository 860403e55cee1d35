"""Backbone weight files: save, load, validate, merge into model variables.

A weight file is a NumPy ``.npz`` (no pickle, no torch needed to read it) written by
``python -m proxy_jax.convert``. Its arrays are named ``params/<path>`` and
``batch_stats/<path>`` with Flax paths relative to the backbone (``layer1/0/conv1/kernel``,
``layer1/0/bn1/mean``), plus ``__arch__``, the registry name of the backbone it belongs to.
"""
import os
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from proxy_jax.models.registry import get_backbone

__all__ = ["save_weights", "load_weights", "load_pretrained", "backbone_shapes",
           "check_weights", "batchnorm_param_mask"]

_ARCH_KEY = "__arch__"
_COLLECTIONS = ("params", "batch_stats")


def _flatten(tree: Mapping) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(
        flax.core.unfreeze(tree)).items()}


def backbone_shapes(arch: str) -> dict:
    """``{'params/…': shape, 'batch_stats/…': shape}`` of backbone ``arch``, computed abstractly
    (no memory, no FLOPs); shapes do not depend on the input size."""
    module = get_backbone(arch).factory(freeze_bn=True, dtype=jnp.float32)
    size = 64  # accepted by every backbone; parameter shapes are independent of it
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, size, size, 3)), train=False))
    return {k: tuple(v.shape) for k, v in _flatten(variables).items()}


def check_weights(weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple], *,
                  source: str) -> None:
    """Raises ValueError listing every missing, unexpected and wrongly shaped array.

    Args:
      weights: flat ``{'params/…' | 'batch_stats/…': array}``.
      expected: flat ``{name: shape}`` (see backbone_shapes).
      source: what ``weights`` came from, for the message.
    """
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(f"{k}: got {tuple(np.shape(weights[k]))}, expected {expected[k]}"
                   for k in set(weights) & set(expected)
                   if tuple(np.shape(weights[k])) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"{source} does not match the backbone:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", wrong)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(parts))


def save_weights(path: str, weights: Mapping[str, np.ndarray], *, arch: str) -> None:
    """Writes flat backbone weights (``{'params/…': array, 'batch_stats/…': array}``) to an
    ``.npz`` after checking them against backbone ``arch``."""
    check_weights(weights, backbone_shapes(arch), source="weights")
    arrays = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    arrays[_ARCH_KEY] = np.asarray(arch)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append '.npz' to a name without it
        np.savez(f, **arrays)


def load_weights(path: str) -> tuple[str, dict]:
    """Reads a weight file → (arch, flat ``{'params/…': np.ndarray, ...}``)."""
    with np.load(path, allow_pickle=False) as data:
        if _ARCH_KEY not in data.files:
            raise ValueError(f"path {path!r} is not a proxy_jax weight file (no {_ARCH_KEY}); "
                             "write one with `python -m proxy_jax.convert`")
        arch = str(data[_ARCH_KEY])
        weights = {k: data[k] for k in data.files if k != _ARCH_KEY}
    return arch, weights


def load_pretrained(variables: Mapping, path: str, backbone: str) -> dict:
    """Returns ``variables`` with its backbone subtrees replaced by the weights in ``path``.

    Args:
      variables: ``{'params': {'backbone', 'embedding'}, 'batch_stats': {'backbone'}}`` as
        returned by ``EmbeddingModel.init``.
      path: a file written by ``python -m proxy_jax.convert`` (or ``save_weights``).
      backbone: the registry name the model was built with; must equal the file's.

    Every array keeps the dtype it has in ``variables``. The embedding layer is untouched.

    Raises:
      ValueError: the file is for another backbone, or its arrays do not match the model's
        backbone (the message lists missing, unexpected and wrongly shaped ones).
    """
    arch, weights = load_weights(path)
    if arch != backbone:
        raise ValueError(f"backbone is {backbone!r} but {path!r} holds {arch!r} weights")
    variables = flax.core.unfreeze(variables)
    current = {}
    present = [c for c in _COLLECTIONS if "backbone" in variables.get(c, {})]  # ViTs: no stats
    for collection in present:
        for k, v in _flatten(variables[collection]["backbone"]).items():
            current[f"{collection}/{k}"] = v
    check_weights(weights, {k: tuple(v.shape) for k, v in current.items()}, source=path)
    for collection in present:
        prefix = collection + "/"
        flat = {tuple(k[len(prefix):].split("/")): jnp.asarray(v, current[k].dtype)
                for k, v in weights.items() if k.startswith(prefix)}
        variables[collection]["backbone"] = traverse_util.unflatten_dict(flat)
    return variables


def batchnorm_param_mask(variables: Mapping) -> dict:
    """A pytree like ``variables['params']``: True at BatchNorm scale/bias, False elsewhere.

    Proxy-Anchor's ``bn_freeze`` also stops training the BatchNorm affine parameters
    (``requires_grad_(False)``), while Proxy Synthesis / MemVir keep training them; give this
    mask to ``optax.masked``/``optax.set_to_zero`` to reproduce the former. A BatchNorm is
    recognised by having running statistics in ``variables['batch_stats']``.
    """
    stats_modules = {k.rsplit("/", 1)[0] for k in _flatten(variables.get("batch_stats", {}))}
    flat = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
    return traverse_util.unflatten_dict(
        {k: "/".join(k[:-1]) in stats_modules and k[-1] in ("scale", "bias") for k in flat})
