r"""Converts a PyTorch ImageNet state_dict into a proxy_jax backbone weight file.

Run once, on a machine with torch (the only place proxy_jax imports it; a gluoncv
``.params`` file needs neither torch nor MXNet):

    python -m proxy_jax.convert --arch resnet50 --src resnet50-0676ba61.pth \
        --dst weights/resnet50.npz
    python -m proxy_jax.convert --arch bn_inception --src bn_inception-52deb4733.pth \
        --dst weights/bn_inception.npz

    python -m proxy_jax.convert --arch googlenet_gluon --src googlenet-c7c89366.params \
        --dst weights/googlenet_gluon.npz

    python -m proxy_jax.convert --arch deit_small_patch16_224 \
        --src dino_deitsmall16_pretrain.pth --dst weights/vit_s16_dino.npz
    python -m proxy_jax.convert --arch vit_small_patch14_reg4_dinov2 \
        --src dinov2_vits14_reg4_pretrain.pth --dst weights/vit_s14_reg4_dinov2.npz
    python -m proxy_jax.convert --arch vit_small_patch16_224 --src model.safetensors \
        --dst weights/vit_s16_augreg.npz

then point a config at the ``.npz`` (``proxy_jax.models.load_pretrained`` reads it, no torch).
A ``.params`` file (gluoncv's model zoo, Gluon ``save_parameters``) is read without MXNet
(``proxy_jax.models.mxnet_params``) and its keys renamed to torchvision's
(:func:`gluon_googlenet_to_torch`) before the same mapping.

Key names are those of torchvision (``resnet18/34/50/101``, ``googlenet``) and of Cadene's
``pretrainedmodels`` ``bninception``. A key ``a.b.weight`` becomes ``params/a/b/kernel``
(convs transposed OIHW → HWIO) or ``params/a/b/scale`` (BatchNorm); ``bias`` stays;
``running_mean``/``running_var`` become ``batch_stats/a/b/mean``/``var``;
``num_batches_tracked`` and the ImageNet classifier heads (``fc``, GoogLeNet's
``aux1``/``aux2``, ``last_linear`` of BN-Inception and of pretrainedmodels' ResNets) are
dropped. A ``module.`` prefix (DataParallel) is removed.
The older circulating BN-Inception file stores BatchNorm tensors as [1, C]; they are reshaped
to [C]. A key naming a parameter of the backbone directly (a ViT's ``cls_token``,
``pos_embed``, ``reg_token``, ``blocks.0.ls1.gamma``) keeps its name.

Vision Transformers take timm's state_dicts (``.pth``, or ``.safetensors``, read without
torch) and the DINO / DINOv2 release files (:func:`vit_state_dict_to_timm`: DINO's keys are
timm's; DINOv2's ``mask_token`` is dropped and its ``register_tokens`` become ``reg_token``,
the class token taking its position entry, since timm's register models give position
entries to patches only). A position table stored for another patch grid (weights for
384², say) is resampled to the backbone's grid as timm does when it loads them
(:func:`proxy_jax.models.vit.resample_pos_embed`). A DeiT release file's ``{'model': …}``
wrapper is unwrapped. Anything else that does not map -- missing, unexpected or wrongly
shaped -- is an error that lists it.
"""
import argparse
import sys
from typing import Mapping, Sequence

import numpy as np

from proxy_jax.models.mxnet_params import read_mxnet_params
from proxy_jax.models.registry import BACKBONES, get_backbone
from proxy_jax.models.vit import resample_pos_embed
from proxy_jax.models.weights import backbone_shapes, save_weights

__all__ = ["convert_state_dict", "gluon_googlenet_to_torch", "vit_state_dict_to_timm", "main"]

# Gluon BatchNorm leaf names -> torch's; a basic conv is HybridSequential(Conv2D, BatchNorm,
# Activation): child 0 is torch's 'conv', child 1 its 'bn'.
_GLUON_LEAVES = {"weight": "weight", "gamma": "weight", "beta": "bias",
                 "running_mean": "running_mean", "running_var": "running_var"}
_GLUON_BRANCHES = ("branch1", "branch2", "branch3", "branch4")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; bfloat16/half go through float32
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def convert_state_dict(state_dict: Mapping[str, object], arch: str) -> dict:
    """Maps a PyTorch state_dict to flat proxy_jax backbone weights.

    Args:
      state_dict: ``{torch key: tensor or array}`` of the model named by ``arch``'s registry
        entry (``BACKBONES[arch].torch_source``).
      arch: a backbone name of ``proxy_jax.models.BACKBONES``.

    Returns:
      ``{'params/…' | 'batch_stats/…': np.float32 array}`` ready for ``save_weights``.

    Raises:
      ValueError: missing, unexpected or wrongly shaped keys (all listed, in torch names).
    """
    spec = get_backbone(arch)
    expected = backbone_shapes(arch)
    if spec.is_transformer:
        state_dict = vit_state_dict_to_timm(state_dict, expected)
    weights, unexpected, wrong, wrong_names = {}, [], [], set()
    for torch_key, value in state_dict.items():
        key = torch_key[len("module."):] if torch_key.startswith("module.") else torch_key
        if key.endswith("num_batches_tracked") or key.startswith(spec.head_prefixes):
            continue
        module, _, leaf = key.rpartition(".")
        path = module.replace(".", "/")
        if leaf == "running_mean":
            name = f"batch_stats/{path}/mean"
        elif leaf == "running_var":
            name = f"batch_stats/{path}/var"
        elif leaf == "bias":
            name = f"params/{path}/bias"
        elif leaf == "weight" and f"params/{path}/kernel" in expected:
            name = f"params/{path}/kernel"
        elif leaf == "weight":
            name = f"params/{path}/scale"
        else:
            name = "params/" + key.replace(".", "/")  # a parameter named as it is
        if name not in expected:
            unexpected.append(torch_key)
            continue
        array = _to_numpy(value)
        if name.endswith("/kernel"):
            # conv OIHW → HWIO; linear [out, in] → [in, out]
            array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
        elif array.shape == (1,) + expected[name]:
            array = array.reshape(expected[name])  # the older BN-Inception file's [1, C]
        if array.shape != expected[name]:
            wrong.append(f"{torch_key} -> {name}: got {array.shape}, expected {expected[name]}")
            wrong_names.add(name)
            continue
        weights[name] = np.ascontiguousarray(array)
    missing = sorted(set(expected) - set(weights) - wrong_names)
    if missing or unexpected or wrong:
        lines = [f"state_dict does not match {arch} ({spec.torch_source}):"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                             ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))
    return weights


def vit_state_dict_to_timm(state_dict: Mapping[str, object],
                           expected: Mapping[str, tuple]) -> dict:
    """A timm, DINO or DINOv2 ViT state_dict in timm's names, its position table on the
    backbone's grid.

    Args:
      state_dict: ``{key: tensor or array}``, a ``module.`` prefix allowed.
      expected: the backbone's flat shapes (:func:`~proxy_jax.models.backbone_shapes`).

    Returns:
      ``{timm key: float32 array}``: DINOv2's ``mask_token`` dropped; its
      ``register_tokens`` → ``reg_token`` with ``cls_token + pos_embed[:, :1]`` and
      ``pos_embed[:, 1:]`` (timm's no-class-position layout of the register models); then
      ``pos_embed`` resampled to the backbone's patch grid if it holds another.
    """
    state = {(k[len("module."):] if k.startswith("module.") else k): v
             for k, v in state_dict.items()}
    state.pop("mask_token", None)
    if "register_tokens" in state and "pos_embed" in state and "cls_token" in state:
        pos = _to_numpy(state["pos_embed"])
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = _to_numpy(state["cls_token"]) + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    want = tuple(expected["params/pos_embed"])
    pos = state.get("pos_embed")
    if pos is not None and tuple(np.shape(pos)) != want and np.ndim(pos) == 3:
        prefix = 1 if _has_class_entry(want[1]) else 0
        grid = int(round((want[1] - prefix) ** 0.5))
        pos = _to_numpy(pos)
        if _has_class_entry(pos.shape[1]) == bool(prefix) and pos.shape[2] == want[2]:
            state["pos_embed"] = np.asarray(
                resample_pos_embed(pos, (grid, grid), num_prefix=prefix))
        # otherwise it stays as it is and is reported as a wrong shape
    return state


def _has_class_entry(entries: int) -> bool:
    """A table of 1 + g² entries has a class position; one of g² has none."""
    root = int(round(entries ** 0.5))
    return root * root != entries


def gluon_googlenet_to_torch(params: Mapping[str, object]) -> dict:
    """Renames gluoncv GoogLeNet ``.params`` keys to torchvision GoogLeNet state_dict keys.

    gluoncv (``model_zoo/googlenet.py``) names parameters by structure: ``conv1.0.weight``
    (conv) and ``conv1.1.gamma`` (its BatchNorm) are torchvision's ``conv1.conv.weight`` and
    ``conv1.bn.weight``; in an Inception block ``inception3a.{b}.{i}.{0|1}.*`` is branch b+1,
    layer i (branch 1 has one layer and no index in torchvision; branch 4's conv is layer
    1 after its pool, as in torchvision). Other keys (the heads ``head.``/``output.``/
    ``aux1.``/``aux2.``) are returned unchanged.

    Args:
      params: ``{gluon key: array}``.

    Returns:
      ``{torch key: array}``, values unchanged (Gluon's OIHW conv layout is torch's).
    """
    out = {}
    for key, value in params.items():
        parts = key.split(".")
        new = key
        if parts[0] in ("conv1", "conv2", "conv3") and len(parts) == 3:
            layer = {"0": "conv", "1": "bn"}.get(parts[1])
            if layer and parts[2] in _GLUON_LEAVES:
                new = f"{parts[0]}.{layer}.{_GLUON_LEAVES[parts[2]]}"
        elif parts[0].startswith("inception") and len(parts) == 5:
            block, branch, index, layer, leaf = parts
            layer = {"0": "conv", "1": "bn"}.get(layer)
            if branch in ("0", "1", "2", "3") and layer and leaf in _GLUON_LEAVES:
                name = _GLUON_BRANCHES[int(branch)]
                seq = "" if name == "branch1" else f".{index}"
                if name != "branch1" or index == "0":
                    new = f"{block}.{name}{seq}.{layer}.{_GLUON_LEAVES[leaf]}"
        out[new] = value
    return out


def read_source(path: str, arch: str) -> Mapping[str, object]:
    """The state_dict in ``path``: a PyTorch file, or a gluoncv ``.params`` file.

    A ``.params`` file is read without MXNet and, for ``googlenet_gluon``, renamed by
    :func:`gluon_googlenet_to_torch`; anything else is loaded with torch (imported here).

    Raises:
      ValueError: a ``.params`` file for an arch with no Gluon naming, or a file that holds
        no state_dict.
    """
    if path.endswith(".params"):
        if arch != "googlenet_gluon":
            raise ValueError(f"src {path!r} is an MXNet .params file; only --arch "
                             f"googlenet_gluon reads those, got {arch!r}")
        return gluon_googlenet_to_torch(read_mxnet_params(path))
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # only this command needs safetensors

        return load_file(path)
    import torch  # only this command needs torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # a training checkpoint, a DeiT release file
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"src {path!r} holds a {type(state).__name__}, expected a state_dict")
    return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy_jax.convert",
        description="Convert a PyTorch state_dict (.pth, .safetensors) or a gluoncv "
                    "GoogLeNet .params file into a proxy_jax weight file (.npz).")
    parser.add_argument("--arch", required=True,
                        choices=sorted(name for name in BACKBONES
                                       if name not in ("tiny_cnn", "vit_tiny_test")))
    parser.add_argument("--src", required=True,
                        help="PyTorch file holding a state_dict, a .safetensors file, or an "
                             "MXNet .params file")
    parser.add_argument("--dst", required=True, help="output .npz for load_pretrained")
    args = parser.parse_args(argv)

    weights = convert_state_dict(read_source(args.src, args.arch), args.arch)
    save_weights(args.dst, weights, arch=args.arch)
    print(f"wrote {args.dst}: {args.arch}, {len(weights)} arrays, "
          f"{sum(a.size for a in weights.values()):,} numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
