"""proxy_jax.models: parity with the PyTorch backbones, frozen BatchNorm, bfloat16, the head.

The references are the PyTorch models themselves, randomly initialised (no weights are
downloaded): torchvision ``resnet18``/``resnet50``/``googlenet`` and Cadene
``pretrainedmodels`` ``BNInception``, with randomized BatchNorm statistics and affine
parameters. Their state_dicts go through the real converter and weight file
(``convert_state_dict`` → ``save_weights`` → ``load_pretrained``); the Flax forward must equal
torch's eval-mode forward to 1e-4 relative (max |a - b| / max |b|) in float32, on the feature
map, the GAP+GMP pooled features and the l2-normalized embeddings.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from proxy_jax import losses
from proxy_jax.convert import convert_state_dict
from proxy_jax.models import (BACKBONES, EMBEDDING_INITS, InputNormalization, batchnorm_param_mask,
                              create_model, global_pool, input_normalization, load_pretrained,
                              save_weights)
from proxy_jax.models import onednn_conv
from proxy_jax.models.layers import avg_pool, max_pool

torch.set_num_threads(1)  # pytest-xdist runs one worker per core

EMBEDDING_DIM = 8


def _randomize_batchnorm(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))


def _torch_backbone(arch: str):
    """(state_dict module, eval-mode feature function NCHW → NCHW) for ``arch``."""
    torch.manual_seed(0)
    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        trunk = torch.nn.Sequential(*list(net.children())[:-2])  # drop avgpool, fc
        features = trunk
    elif arch == "googlenet":
        # transform_input=True is what torchvision's pretrained GoogLeNet uses.
        net = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True,
                                           init_weights=True)
        captured = {}
        net.inception5b.register_forward_hook(lambda m, i, o: captured.update(out=o))

        def features(x):
            net(x)
            return captured["out"]
    elif arch == "bn_inception":
        bninception = importlib.import_module("pretrainedmodels.models.bninception")
        net = bninception.BNInception(num_classes=1000)
        features = net.features
    else:
        raise AssertionError(arch)
    _randomize_batchnorm(net, seed=1)
    net.eval()
    return net, features


def _zero_variables(model, images):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _converted_model(arch, tmp_path, *, dtype=jnp.float32, image_hw=(64, 64)):
    """Torch reference + the Flax model loaded from its converted weight file."""
    net, features = _torch_backbone(arch)
    linear = torch.nn.Linear(BACKBONES[arch].num_features, EMBEDDING_DIM)
    path = str(tmp_path / f"{arch}.npz")
    save_weights(path, convert_state_dict(net.state_dict(), arch), arch=arch)
    model = create_model(backbone=arch, embedding_dim=EMBEDDING_DIM, pooling="gap+gmp",
                         dtype=dtype)
    probe = jnp.zeros((1, *image_hw, 3))
    variables = load_pretrained(_zero_variables(model, probe), path, arch)
    variables["params"]["embedding"] = {"kernel": linear.weight.detach().numpy().T,
                                        "bias": linear.bias.detach().numpy()}
    return net, features, linear, model, variables


# Non-square, non-multiple-of-32 sizes exercise ceil_mode and padding on both axes.
PARITY_CASES = {
    "resnet18": (72, 64),
    "resnet50": (64, 72),
    "googlenet": (64, 80),
    "bn_inception": (64, 96),  # BN-Inception needs even maps before its reduction blocks
}


# Each backbone runs with both convolution implementations (proxy_jax.models.onednn_conv):
# 'onednn' is what a single-device CPU run uses, 'xla' what GPUs and device meshes use.
CONV_MODES = ("xla", "onednn")


@pytest.mark.parametrize("conv", CONV_MODES)
@pytest.mark.parametrize("arch", sorted(PARITY_CASES))
def test_forward_matches_torch(arch, conv, tmp_path, monkeypatch):
    monkeypatch.setenv(onednn_conv.ENV_VAR, conv)
    hw = PARITY_CASES[arch]
    net, features, linear, model, variables = _converted_model(arch, tmp_path, image_hw=hw)
    images = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)

    with torch.no_grad():
        t_features = features(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        t_pooled = t_features.mean((2, 3)) + t_features.amax((2, 3))
        t_embeddings = F.normalize(linear(t_pooled), dim=1)
    out = jax.jit(lambda v, x: model.apply(v, x, method="outputs"))(variables, images)

    assert out["features"].shape == tuple(t_features.permute(0, 2, 3, 1).shape)
    assert _relative_error(out["features"], t_features.permute(0, 2, 3, 1).numpy()) < 1e-4
    assert _relative_error(out["pooled"], t_pooled.numpy()) < 1e-4
    assert _relative_error(out["embeddings"], t_embeddings.numpy()) < 1e-4


@pytest.mark.parametrize("conv", CONV_MODES)
@pytest.mark.parametrize("arch, hw", [("resnet18", (40, 48)), ("bn_inception", (64, 64))])
def test_gradients_match_torch(arch, hw, conv, tmp_path, monkeypatch):
    """The backward pass (BatchNorm frozen, as the seeds train): the gradient of a loss on the
    feature map w.r.t. the input and every parameter (kernels, conv biases, BatchNorm scales
    and shifts, which proxy_jax folds into the convolutions) equals torch autograd's."""
    monkeypatch.setenv(onednn_conv.ENV_VAR, conv)
    net, features, _, model, variables = _converted_model(arch, tmp_path, image_hw=hw)
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, *hw, 3)).astype(np.float32)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2)).requires_grad_()
    t_features = features(t_images)
    weights = rng.normal(size=tuple(t_features.shape)).astype(np.float32)
    (t_features * torch.from_numpy(weights)).sum().backward()

    def loss(params, images):
        out = model.apply({**variables, "params": params}, images, method="outputs")
        return jnp.sum(out["features"] * weights.transpose(0, 2, 3, 1))

    grads, d_images = jax.jit(jax.grad(loss, (0, 1)))(variables["params"], images)
    assert _relative_error(d_images, t_images.grad.permute(0, 2, 3, 1).numpy()) < 1e-5
    # torch's gradients, named and laid out as proxy_jax parameters by the converter (the
    # running statistics only complete the state_dict).
    t_grads = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
    stats = {k: v for k, v in net.state_dict().items() if "running" in k}
    want = {k: v for k, v in convert_state_dict({**t_grads, **stats}, arch).items()
            if k.startswith("params/")}
    got = {"params/" + "/".join(k.key for k in path): v for path, v in
           jax.tree_util.tree_leaves_with_path(grads["backbone"])}
    assert set(got) == set(want)
    for name in sorted(want):
        assert _relative_error(got[name], want[name]) < 1e-5, name
    assert any(name.endswith("/scale") for name in want)


def test_bfloat16_model_runs_and_tracks_float32(tmp_path):
    *_, model32, variables = _converted_model("resnet18", tmp_path, image_hw=(32, 32))
    model16 = create_model(backbone="resnet18", embedding_dim=EMBEDDING_DIM, pooling="gap+gmp",
                           dtype=jnp.bfloat16)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    both = jax.jit(lambda v, x: (model16.apply(v, x, method="outputs"), model32.apply(v, x)))
    out16, emb32 = both(variables, images)
    assert out16["features"].dtype == jnp.bfloat16
    assert out16["embeddings"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out16["embeddings"])))
    # bfloat16 keeps 8 bits of mantissa: the unit embeddings agree to a few percent.
    cosine = np.sum(np.asarray(out16["embeddings"]) * np.asarray(emb32), axis=1)
    assert np.all(cosine > 0.98), cosine


def _random_variables(model, images, seed):
    """He-normal kernels, small random biases and BatchNorm statistics (mean ≈ 0, var ≈ 1,
    not exactly, so that using the running statistics is observable). NumPy-made: a jitted
    ``model.init`` would cost a compilation per test on the 2-core CI machine."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(s.dtype)
        if name in ("scale", "var"):
            return rng.uniform(0.8, 1.2, s.shape).astype(s.dtype)
        return rng.uniform(-0.05, 0.05, s.shape).astype(s.dtype)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny_setup(freeze_bn):
    model = create_model(backbone="tiny_cnn", embedding_dim=EMBEDDING_DIM, freeze_bn=freeze_bn)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 16, 3)), jnp.float32)
    return model, images, _random_variables(model, images, seed=6)


def test_frozen_batchnorm_training_step_leaves_statistics_untouched():
    model, images, variables = _tiny_setup(freeze_bn=True)
    stats = variables["batch_stats"]

    def loss_fn(params):  # no mutable collections: a BatchNorm update would raise here
        emb = model.apply({"params": params, "batch_stats": stats}, images, train=True)
        return jnp.sum(emb[0] * emb[1])

    @jax.jit
    def step(params):
        grads = jax.grad(loss_fn)(params)
        new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        _, after = model.apply({"params": new_params, "batch_stats": stats}, images,
                               train=True, mutable=["batch_stats"])
        train_eval = (model.apply({"params": params, "batch_stats": stats}, images, train=True),
                      model.apply({"params": params, "batch_stats": stats}, images, train=False))
        return grads, after, train_eval

    grads, after, train_eval = step(variables["params"])
    # The backbone is trained (non-zero gradient) while BatchNorm keeps its statistics ...
    assert float(jnp.abs(grads["backbone"]["conv1"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["embedding"]["kernel"]).max()) > 0
    jax.tree.map(np.testing.assert_array_equal, after["batch_stats"], stats)
    # ... and normalizes with them: train mode equals eval mode.
    np.testing.assert_allclose(*train_eval, rtol=1e-6)


def test_unfrozen_batchnorm_uses_and_updates_batch_statistics():
    # The counterpart that proves the frozen test can fail.
    model, images, variables = _tiny_setup(freeze_bn=False)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(variables, images, train=True)
    (emb, updates), emb_eval = jax.jit(lambda v: (
        model.apply(v, images, train=True, mutable=["batch_stats"]),
        model.apply(v, images, train=False)))(variables)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(emb, emb_eval)


@pytest.mark.parametrize("arch", sorted(a for a in BACKBONES
                                        if not BACKBONES[a].is_transformer))  # ViTs: no BN
def test_every_backbone_freezes_every_batchnorm(arch):
    # Tracing only (no FLOPs): with freeze_bn a train-mode apply without mutable collections
    # must trace; without freeze_bn the same call must fail on batch_stats.
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    frozen = create_model(backbone=arch, embedding_dim=4, freeze_bn=True)
    shapes = jax.eval_shape(frozen.init, jax.random.PRNGKey(0), images)
    out = jax.eval_shape(lambda v, x: frozen.apply(v, x, train=True), shapes, images)
    assert out.shape == (1, 4)
    assert set(shapes) == {"params", "batch_stats"}
    assert set(shapes["params"]) == {"backbone", "embedding"}
    assert set(shapes["batch_stats"]) == {"backbone"}
    unfrozen = create_model(backbone=arch, embedding_dim=4, freeze_bn=False)
    with pytest.raises(Exception, match="batch_stats"):
        jax.eval_shape(lambda v, x: unfrozen.apply(v, x, train=True), shapes, images)


def test_batchnorm_param_mask_marks_only_batchnorm_affine():
    model = create_model(backbone="resnet18", embedding_dim=4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    mask = batchnorm_param_mask(shapes)
    backbone = mask["backbone"]
    assert backbone["bn1"] == {"scale": True, "bias": True}
    assert backbone["conv1"] == {"kernel": False}
    assert backbone["layer2"]["0"]["downsample"]["1"] == {"scale": True, "bias": True}
    assert backbone["layer2"]["0"]["downsample"]["0"] == {"kernel": False}
    assert mask["embedding"] == {"kernel": False, "bias": False}
    assert jax.tree.structure(mask) == jax.tree.structure(shapes["params"])


@pytest.mark.parametrize("size,window,stride,padding,ceil_mode,count_include_pad", [
    ((7, 8), 3, 2, 0, True, True),    # BN-Inception / GoogLeNet reduction pools
    ((6, 9), 3, 1, 1, True, True),    # BN-Inception's average pool (divides by 9)
    ((5, 7), 3, 1, 1, True, False),
    ((9, 6), 3, 2, 1, False, True),   # ResNet stem (floor mode crops the high side)
    ((5, 5), 2, 2, 0, True, True),    # GoogLeNet maxpool4: ceil overhang
    ((7, 5), 3, 2, 1, True, True),    # overhang beyond padding: excluded from the divisor
])
def test_pooling_matches_torch(size, window, stride, padding, ceil_mode, count_include_pad):
    x = np.random.default_rng(3).normal(size=(2, 3, *size)).astype(np.float32)
    t = torch.from_numpy(x)
    want_max = F.max_pool2d(t, window, stride, padding, ceil_mode=ceil_mode).numpy()
    want_avg = F.avg_pool2d(t, window, stride, padding, ceil_mode=ceil_mode,
                            count_include_pad=count_include_pad).numpy()
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    got_max = max_pool(xj, window=window, stride=stride, padding=padding, ceil_mode=ceil_mode)
    got_avg = avg_pool(xj, window=window, stride=stride, padding=padding, ceil_mode=ceil_mode,
                       count_include_pad=count_include_pad)
    np.testing.assert_allclose(np.asarray(got_max).transpose(0, 3, 1, 2), want_max, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_avg).transpose(0, 3, 1, 2), want_avg, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("size,window,stride,padding,ceil_mode", [
    ((7, 8), 3, 2, 0, True), ((6, 9), 3, 1, 1, True), ((9, 6), 3, 2, 1, False),
    ((5, 5), 2, 2, 0, True), ((7, 5), 3, 2, 1, True)])
def test_max_pool_gradient_matches_torch_with_ties(size, window, stride, padding, ceil_mode):
    """Each output's gradient goes to the first maximum of its window, as in PyTorch; the
    input is ReLU-like (many zeros), so most windows hold ties."""
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(size=(2, 3, *size)), 0).round(1).astype(np.float32)
    t = torch.from_numpy(x).requires_grad_()
    want_y = F.max_pool2d(t, window, stride, padding, ceil_mode=ceil_mode)
    dy = rng.normal(size=tuple(want_y.shape)).astype(np.float32)
    want_y.backward(torch.from_numpy(dy))

    def pool(v):
        return max_pool(v, window=window, stride=stride, padding=padding, ceil_mode=ceil_mode)

    y, vjp = jax.vjp(pool, jnp.asarray(x.transpose(0, 2, 3, 1)))
    (dx,) = vjp(jnp.asarray(dy.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(y).transpose(0, 3, 1, 2), want_y.detach().numpy())
    np.testing.assert_allclose(np.asarray(dx).transpose(0, 3, 1, 2), t.grad.numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["gap", "gmp", "gap+gmp"])
def test_global_pool(pooling):
    f = np.random.default_rng(4).normal(size=(2, 3, 5, 6)).astype(np.float32)
    want = {"gap": f.mean((1, 2)), "gmp": f.max((1, 2)),
            "gap+gmp": f.mean((1, 2)) + f.max((1, 2))}[pooling]
    np.testing.assert_allclose(global_pool(jnp.asarray(f), pooling=pooling), want, rtol=1e-6)


def test_head_without_l2_normalization_returns_the_linear_output():
    model = create_model(backbone="tiny_cnn", embedding_dim=5, l2_normalize=False, pooling="gmp")
    images = jnp.asarray(np.random.default_rng(5).normal(size=(3, 16, 16, 3)), jnp.float32)
    normalized = create_model(backbone="tiny_cnn", embedding_dim=5, pooling="gmp")
    variables = _random_variables(model, images, seed=7)
    out, unit = jax.jit(lambda v: (model.apply(v, images, method="outputs"),
                                   normalized.apply(v, images)))(variables)
    emb = variables["params"]["embedding"]
    np.testing.assert_allclose(out["embeddings"], out["pooled"] @ emb["kernel"] + emb["bias"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unit, losses.l2_normalize(out["embeddings"]), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def test_embedding_inits_follow_the_official_code():
    key = jax.random.PRNGKey(0)
    fan_in, dim = 1024, 512
    # Proxy-Anchor: kaiming_normal_(mode='fan_out') → N(0, 2 / dim); bias 0.
    kernel_init, bias_init = EMBEDDING_INITS["kaiming_fan_out"]
    w = np.asarray(kernel_init(key, (fan_in, dim)))
    assert abs(w.std() / np.sqrt(2.0 / dim) - 1) < 0.02 and abs(w.mean()) < 1e-3
    assert not np.any(np.asarray(bias_init(fan_in)(key, (dim,))))
    # PS / MemVir: torch.nn.Linear default, U(±1/sqrt(fan_in)) for weight and bias.
    kernel_init, bias_init = EMBEDDING_INITS["torch_default"]
    w, b = np.asarray(kernel_init(key, (fan_in, dim))), np.asarray(bias_init(fan_in)(key, (dim,)))
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.9 * bound
    # Embedding Expansion: MXNet Xavier(magnitude=2) → U(±sqrt(4 / (fan_in + dim))); bias 0.
    kernel_init, _ = EMBEDDING_INITS["xavier_mxnet"]
    w = np.asarray(kernel_init(key, (fan_in, dim)))
    bound = np.sqrt(4.0 / (fan_in + dim))
    assert np.abs(w).max() <= bound * (1 + 1e-6) and np.abs(w).max() > 0.99 * bound


def test_create_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backbone must be one of"):
        create_model(backbone="vgg16", embedding_dim=8)
    with pytest.raises(ValueError, match=r"pooling of 'tiny_cnn' \(a CNN\) must be one of"):
        create_model(backbone="tiny_cnn", embedding_dim=8, pooling="avg")
    with pytest.raises(ValueError, match="embedding_dim must be an int >= 0"):
        create_model(backbone="tiny_cnn", embedding_dim=-1)
    with pytest.raises(ValueError, match="embedding_init must be one of"):
        create_model(backbone="tiny_cnn", embedding_dim=8, embedding_init="glorot")


def test_bad_image_shapes_raise_value_errors():
    model = create_model(backbone="bn_inception", embedding_dim=4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    for bad, message in (((1, 64, 64), "NHWC"), ((1, 3, 64, 64), "NHWC"),
                         ((1, 24, 64, 3), "at least 31"),
                         # 39 px reaches inception_3c with an odd 5x5 map; PyTorch fails too.
                         ((1, 39, 64, 3), "multiple of 32")):
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct(bad, jnp.float32))


def test_input_normalization():
    bgr = input_normalization("bn_inception")
    assert isinstance(bgr, InputNormalization)
    assert bgr == InputNormalization(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), bgr=True,
                                     scale=1.0)
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "googlenet", "googlenet_gluon"):
        norm = input_normalization(arch)
        assert norm.mean == (0.485, 0.456, 0.406) and norm.std == (0.229, 0.224, 0.225)
        assert not norm.bgr and norm.scale == pytest.approx(1 / 255)
    assert set(BACKBONES) == {"bn_inception", "resnet18", "resnet34", "resnet50", "resnet101",
                              "googlenet", "googlenet_gluon", "tiny_cnn",
                              "vit_small_patch16_224", "vit_base_patch16_224",
                              "deit_small_patch16_224", "vit_small_patch14_dinov2",
                              "vit_base_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                              "vit_base_patch14_reg4_dinov2", "vit_tiny_test"}
    for arch in ("deit_small_patch16_224", "vit_small_patch14_dinov2",
                 "vit_base_patch14_reg4_dinov2"):
        assert input_normalization(arch) == input_normalization("resnet50")
    assert input_normalization("vit_small_patch16_224").mean == (0.5, 0.5, 0.5)
    for arch in BACKBONES:
        input_normalization(arch)
    with pytest.raises(ValueError, match="backbone must be one of"):
        input_normalization("vgg16")


def test_models_and_weight_loading_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, proxy_jax.models, proxy_jax.models.weights, proxy_jax.convert; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
