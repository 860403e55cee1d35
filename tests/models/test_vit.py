"""proxy_jax.models.vit: parity with timm's Vision Transformers, their weight files, the head.

The references are timm's models built with ``pretrained=False`` (nothing is downloaded),
their parameters perturbed so that no bias, LayerNorm or LayerScale sits at its
initial value. Their state_dicts go through the real converter and weight file
(``convert_state_dict`` → ``save_weights`` → ``load_pretrained``); the Flax tokens must equal
timm's ``forward_features`` to 1e-4 relative (max |a - b| / max |b|) in float32, on the class
token and on the patch tokens, at 224² and at one other size, where both resample the
position table (timm with ``dynamic_img_size=True``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from proxy_jax import convert  # noqa: E402
from proxy_jax.models import (BACKBONES, backbone_shapes, create_model,  # noqa: E402
                              load_pretrained, save_weights, token_pool)
from proxy_jax.models.vit import resample_pos_embed  # noqa: E402

torch.set_num_threads(1)

VITS = ("vit_small_patch16_224", "vit_base_patch16_224", "deit_small_patch16_224",
        "vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
        "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2")
OTHER_SIZE = {16: 160, 14: 182}  # 10 x 10 and 13 x 13 patch grids


def _timm_model(arch: str, seed: int = 0):
    """timm's ``arch`` with random, perturbed parameters, eval mode, any input size."""
    torch.manual_seed(seed)
    if arch == "vit_tiny_test":
        net = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                            num_heads=2, num_classes=0, dynamic_img_size=True)
    else:
        net = timm.create_model(arch, pretrained=False, dynamic_img_size=True)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _relative(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def _flax_tokens(arch, net, images_nchw, tmp_path, *, dtype=jnp.float32):
    """(model, variables, tokens [B, T, C] float32) of the Flax ``arch`` loaded from ``net``'s
    state_dict through the converter and a weight file (written once per tmp_path)."""
    path = tmp_path / f"{arch}.npz"
    if not path.exists():
        save_weights(str(path), convert.convert_state_dict(net.state_dict(), arch), arch=arch)
    model = create_model(backbone=arch, embedding_dim=0, pooling="cls", dtype=dtype)
    size = images_nchw.shape[-1]
    # The weight file replaces every variable (no embedding layer): only the shapes of an
    # init are needed, and an eager init of ViT-B/16 takes 8 s on the CPU.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    variables = load_pretrained(shapes, str(path), arch)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(variables))
    x = jnp.asarray(images_nchw.numpy().transpose(0, 2, 3, 1))
    features = jax.jit(lambda v, x: model.apply(v, x, method="features"))
    return model, variables, np.asarray(features(variables, x).astype(jnp.float32))


@pytest.mark.parametrize("arch", VITS + ("vit_tiny_test",))
def test_tokens_equal_timm_at_two_sizes(arch, tmp_path):
    net = _timm_model(arch)
    spec = BACKBONES[arch]
    patch = spec.factory.keywords["patch_size"]
    sizes = (32, 40) if arch == "vit_tiny_test" else (224, OTHER_SIZE[patch])
    batch = 1 if "base" in arch else 2
    prefix = spec.num_prefix_tokens
    for size in sizes:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = net.forward_features(images).numpy()
        _, _, tokens = _flax_tokens(arch, net, images, tmp_path)
        assert tokens.shape == expected.shape == (batch, prefix + (size // patch) ** 2,
                                                  spec.num_features)
        assert _relative(tokens[:, 0], expected[:, 0]) < 1e-4, (arch, size, "class token")
        assert _relative(tokens[:, prefix:], expected[:, prefix:]) < 1e-4, (arch, size)


@pytest.mark.parametrize("grid", [(10, 10), (16, 16), (20, 20), (12, 18)])
@pytest.mark.parametrize("num_prefix", [0, 1])
def test_resample_pos_embed_is_timms(grid, num_prefix):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, num_prefix + 14 * 14, 8, generator=torch.Generator().manual_seed(1))
    expected = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=num_prefix)
    got = resample_pos_embed(jnp.asarray(pos.numpy()), grid, num_prefix=num_prefix)
    assert got.shape == tuple(expected.shape)
    assert _relative(got, expected.numpy()) < 1e-5
    np.testing.assert_array_equal(np.asarray(got[:, :num_prefix]), pos[:, :num_prefix].numpy())


def test_converter_resamples_a_table_of_another_grid():
    """A ViT-S/16 file for 96² (6 x 6 grid) becomes the registry's 14 x 14 table as timm's
    loader resamples it; the class entry is kept."""
    net = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=96)
    state = net.state_dict()
    weights = convert.convert_state_dict(state, "vit_small_patch16_224")
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(14, 14), num_prefix_tokens=1)
    assert weights["params/pos_embed"].shape == (1, 197, 384)
    assert _relative(weights["params/pos_embed"], expected.numpy()) < 1e-5


def _dinov2_release(net) -> dict:
    """timm's register model as a facebookresearch/dinov2 release state_dict: a class
    position in pos_embed (taken out of cls_token), 'register_tokens', a 'mask_token'."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    cls_pos = 0.1 * torch.randn(1, 1, state["cls_token"].shape[-1])
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def test_dinov2_release_keys_convert_to_timms_model():
    arch = "vit_small_patch14_reg4_dinov2"
    net = _timm_model(arch)
    from_timm = convert.convert_state_dict(net.state_dict(), arch)
    from_release = convert.convert_state_dict(_dinov2_release(net), arch)
    assert sorted(from_timm) == sorted(from_release)
    for k in from_timm:
        np.testing.assert_allclose(from_release[k], from_timm[k], rtol=1e-6, atol=1e-7,
                                   err_msg=k)


def test_dino_and_deit_release_files_read(tmp_path):
    """DINO's file is a bare state_dict in timm's names; DeiT's wraps it in {'model': …};
    a .safetensors file reads without torch. All three give the same weights."""
    from safetensors.torch import save_file

    arch = "deit_small_patch16_224"
    net = _timm_model(arch)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")},
               tmp_path / "dino.pth")
    torch.save({"model": state}, tmp_path / "deit.pth")
    save_file(state, str(tmp_path / "model.safetensors"))
    converted = [convert.convert_state_dict(convert.read_source(str(tmp_path / name), arch), arch)
                 for name in ("dino.pth", "deit.pth", "model.safetensors")]
    for other in converted[1:]:
        assert sorted(other) == sorted(converted[0])
        for k in other:
            np.testing.assert_array_equal(other[k], converted[0][k])


def test_command_line_writes_a_vit_file(tmp_path):
    from safetensors.torch import save_file

    net = _timm_model("vit_small_patch16_224")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    dst = str(tmp_path / "vit.npz")
    assert convert.main(["--arch", "vit_small_patch16_224", "--src",
                         str(tmp_path / "model.safetensors"), "--dst", dst]) == 0
    from proxy_jax.models import load_weights

    arch, weights = load_weights(dst)
    assert arch == "vit_small_patch16_224"
    assert {k: v.shape for k, v in weights.items()} == backbone_shapes(arch)


def test_missing_and_unexpected_keys_are_named():
    state = dict(_timm_model("vit_small_patch14_dinov2").state_dict())
    del state["blocks.3.ls2.gamma"]
    state["blocks.0.attn.q_norm.weight"] = torch.zeros(64)
    with pytest.raises(ValueError) as info:
        convert.convert_state_dict(state, "vit_small_patch14_dinov2")
    message = str(info.value)
    assert "missing (1): params/blocks/3/ls2/gamma" in message
    assert "unexpected (1): blocks.0.attn.q_norm.weight" in message


def test_poolings_and_projection():
    """'cls' is token 0, 'mean' the patch tokens' mean without the registers, 'cls+mean'
    both concatenated; embedding_dim 0 keeps that width, > 0 projects; l2 per row."""
    tokens = jax.random.normal(jax.random.PRNGKey(0), (2, 1 + 4 + 9, 6))
    np.testing.assert_array_equal(token_pool(tokens, pooling="cls", num_prefix_tokens=5),
                                  tokens[:, 0])
    np.testing.assert_allclose(token_pool(tokens, pooling="mean", num_prefix_tokens=5),
                               tokens[:, 5:].mean(1), rtol=1e-6)
    both = token_pool(tokens, pooling="cls+mean", num_prefix_tokens=5)
    assert both.shape == (2, 12)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
    for pooling, dim, width in (("cls", 0, 32), ("mean", 0, 32), ("cls+mean", 0, 64),
                                ("cls+mean", 16, 16)):
        model = create_model(backbone="vit_tiny_test", embedding_dim=dim, pooling=pooling)
        variables = model.init(jax.random.PRNGKey(0), images)
        assert ("embedding" in variables["params"]) == (dim > 0)
        out = model.apply(variables, images, method="outputs")
        assert out["embeddings"].shape == (3, width)
        np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, rtol=1e-5)
        if dim == 0:
            np.testing.assert_allclose(out["embeddings"],
                                       out["pooled"] / np.linalg.norm(out["pooled"], axis=1,
                                                                      keepdims=True),
                                       rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backbone="vit_tiny_test", pooling="gap"), "must be one of ('cls', 'mean'"),
    (dict(backbone="resnet18", pooling="cls"), "must be one of ('gap', 'gmp'"),
    (dict(backbone="vit_tiny_test", pooling="cls", embedding_dim=-1), "embedding_dim"),
    (dict(backbone="vit_tiny_test", pooling="cls", drop_path_rate=1.0), "drop_path_rate"),
    (dict(backbone="resnet18", pooling="gap", drop_path_rate=0.1), "be 0 for the CNN"),
])
def test_head_arguments_are_checked(kwargs, message):
    kwargs.setdefault("embedding_dim", 8)
    with pytest.raises(ValueError, match=None) as info:
        create_model(**kwargs)
    assert message in str(info.value)


def test_gelu_and_its_gradient_are_exact():
    from proxy_jax.models.vit import gelu

    x = jnp.linspace(-6.0, 6.0, 2001)
    exact = lambda a: jax.nn.gelu(a, approximate=False)  # noqa: E731
    np.testing.assert_allclose(gelu(x), exact(x), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda a: gelu(a).sum())(x),
                               jax.grad(lambda a: exact(a).sum())(x), atol=1e-6)
    np.testing.assert_allclose(gelu(x.astype(jnp.bfloat16)).astype(jnp.float32), exact(x),
                               atol=0.05)


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    net = _timm_model("vit_tiny_test")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net.forward_features(images).numpy()
    model, variables, tokens = _flax_tokens("vit_tiny_test", net, images, tmp_path,
                                            dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    assert model.apply(variables, jnp.zeros((1, 32, 32, 3)), method="features").dtype == \
        jnp.bfloat16
    assert _relative(tokens, expected) < 0.05


def test_drop_path_uses_its_own_rng_stream():
    """Training with a drop path rate needs the 'drop_path' stream; two keys give two
    results, the same key the same; eval and rate 0 are deterministic and need no key."""
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    model = create_model(backbone="vit_tiny_test", embedding_dim=0, pooling="cls",
                         drop_path_rate=0.5)
    variables = model.init(jax.random.PRNGKey(0), images)
    train = [model.apply(variables, images, train=True, rngs={"drop_path": jax.random.PRNGKey(k)})
             for k in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2])
    with pytest.raises(Exception, match="drop_path"):
        model.apply(variables, images, train=True)
    plain = create_model(backbone="vit_tiny_test", embedding_dim=0, pooling="cls")
    np.testing.assert_array_equal(model.apply(variables, images),
                                  plain.apply(variables, images, train=True))
