"""proxy_jax.models.onednn_conv: oneDNN convolutions on the CPU, checked against XLA's
convolution and PyTorch's, and the PROXY_JAX_CONV selection rules.

The library is built from source on first use (the C++ compiler and the oneDNN wheels in
requirements.txt); on x86-64 Linux, where requirements.txt installs oneDNN, failing to build
is a test failure, not a skip.
"""
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from proxy_jax.models import onednn_conv

ONEDNN_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture(scope="module")
def library():
    reason = onednn_conv.unavailable_reason()
    if reason is not None and not ONEDNN_EXPECTED:
        pytest.skip(f"no oneDNN wheel for this platform: {reason}")
    assert reason is None, reason


def _xla_conv(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# (batch, height, width, C_in, C_out, kernel, stride, padding): odd and even sizes, strides
# that leave part of the padding unused, 1x1 strided (ResNet's downsample), the 7x7 stem.
CASES = [
    (2, 8, 8, 3, 5, 3, 1, 1),
    (2, 9, 7, 4, 6, 3, 2, 1),
    (3, 8, 8, 4, 6, 1, 2, 0),
    (1, 9, 9, 5, 3, 1, 1, 0),
    (2, 16, 12, 3, 8, 7, 2, 3),
    (1, 11, 11, 2, 3, 5, 3, 2),
    (2, 6, 6, 16, 16, 3, 1, 0),
]


@pytest.mark.parametrize("b,h,w,c,o,k,s,p", CASES)
def test_forward_and_gradients_match_xla(library, b, h, w, c, o, k, s, p):
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(k, k, c, o)).astype(np.float32)

    want = jax.jit(lambda x, w: _xla_conv(x, w, s, p))(x, kernel)
    got = jax.jit(lambda x, w: onednn_conv.conv2d(x, w, s, p))(x, kernel)
    assert got.shape == want.shape
    assert _relative_error(got, want) < 1e-5

    cotangent = rng.normal(size=want.shape).astype(np.float32)

    def vjp(conv):
        return jax.jit(lambda x, w: jax.vjp(lambda x, w: conv(x, w, s, p), x, w)[1](cotangent))

    want_dx, want_dw = vjp(_xla_conv)(x, kernel)
    got_dx, got_dw = vjp(onednn_conv.conv2d)(x, kernel)
    assert _relative_error(got_dx, want_dx) < 1e-5
    assert _relative_error(got_dw, want_dw) < 1e-5


# (differentiated operands of (x, kernel, bias, residual), relu, with a bias): every operand
# subset the custom VJP distinguishes, and the call without a bias.
FUSED_CASES = [
    ((0, 1, 2, 3), True, True),
    ((0, 1, 2, 3), False, True),
    ((1, 2), True, True),      # the stem: no input gradient
    ((0,), True, True),        # frozen weights
    ((3,), False, True),       # only the shortcut
    ((0, 1, 3), True, False),  # a BasicBlock's second conv with BatchNorm training
]


@pytest.mark.parametrize("wrt, relu, with_bias", FUSED_CASES)
def test_bias_residual_and_relu_match_xla(library, wrt, relu, with_bias):
    """relu(conv + bias + residual) in one call, and its gradients for each operand subset;
    about a third of the pre-activations are negative, and some are exactly 0 (ReLU's
    gradient there is 0, as in torch)."""
    rng = np.random.default_rng(sum(wrt) + relu)
    x = rng.normal(size=(2, 9, 7, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32) if with_bias else None
    residual = rng.normal(size=(2, 5, 4, 6)).astype(np.float32)
    x[0, :, :, :] = 0.0
    if with_bias:
        bias[:2] = 0.0
    residual[0, ..., :2] = 0.0  # exact zeros: x's first image gives pre-activation 0 there

    def want_fn(x, kernel, bias, residual):
        y = _xla_conv(x, kernel, 2, 1) + residual
        y = y if bias is None else y + bias
        return jax.nn.relu(y) if relu else y

    def got_fn(x, kernel, bias, residual):
        return onednn_conv.conv2d(x, kernel, 2, 1, bias=bias, residual=residual, relu=relu)

    operands = (x, kernel, bias, residual)
    want = want_fn(*operands)
    got = jax.jit(got_fn)(*operands)
    assert _relative_error(got, want) < 1e-5
    if relu:
        assert 0 < np.mean(np.asarray(want) == 0) < 0.9
    cotangent = rng.normal(size=want.shape).astype(np.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=wrt))(*operands)

    for got_g, want_g in zip(grads(got_fn), grads(want_fn)):
        assert got_g.shape == want_g.shape
        assert _relative_error(got_g, want_g) < 1e-5


def test_bad_bias_and_residual_shapes_are_named(library):
    x = jnp.zeros((1, 6, 6, 3))
    kernel = jnp.zeros((3, 3, 3, 4))
    with pytest.raises(ValueError, match="bias"):
        onednn_conv.conv2d(x, kernel, 1, 1, bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="residual"):
        onednn_conv.conv2d(x, kernel, 1, 1, residual=jnp.zeros((1, 3, 3, 4)))
    with pytest.raises(TypeError, match="float32"):
        onednn_conv.conv2d(x, kernel, 1, 1, bias=jnp.zeros(4, jnp.bfloat16))


def test_matches_torch_conv2d(library):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, 10, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    tw = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).requires_grad_()
    ty = torch.nn.functional.conv2d(tx, tw, stride=2, padding=1)
    (ty ** 2).sum().backward()

    y, (dx, dw) = jax.value_and_grad(
        lambda x, w: jnp.sum(onednn_conv.conv2d(x, w, 2, 1) ** 2), (0, 1))(x, kernel)
    assert _relative_error(y, (ty ** 2).sum().item()) < 1e-5
    assert _relative_error(dx, tx.grad.permute(0, 2, 3, 1).numpy()) < 1e-5
    assert _relative_error(dw, tw.grad.permute(2, 3, 1, 0).numpy()) < 1e-5


def test_vmap_and_sharded_inputs_compute_the_same(library):
    """vmap runs the call per element; on a device mesh XLA runs it whole (gathered) per
    device: slower, as the module says, but correct."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 8, 8, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    want = jax.vmap(lambda x: _xla_conv(x, kernel, 1, 1))(x)
    got = jax.jit(jax.vmap(lambda x: onednn_conv.conv2d(x, kernel, 1, 1)))(x)
    assert _relative_error(got, want) < 1e-5

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    batch = jax.device_put(rng.normal(size=(len(jax.devices()), 9, 9, 3)).astype(np.float32),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(onednn_conv.conv2d(x, w, 2, 1) ** 2)))
    want_grad = jax.grad(lambda w, x: jnp.sum(_xla_conv(x, w, 2, 1) ** 2))(kernel, batch)
    assert _relative_error(grad(kernel, batch), want_grad) < 1e-5


def _uses_onednn(fn, *args) -> bool:
    """Traces ``fn`` afresh (jit caches traces per function, and the choice is made when
    tracing) and looks for the oneDNN call in the program."""
    return "proxy_jax_onednn_conv" in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def test_conv_mode_selection(library, monkeypatch):
    from proxy_jax.models.layers import Conv

    x = jnp.ones((1, 6, 6, 2))
    conv = Conv(3, 3, padding=1)
    variables = conv.init(jax.random.PRNGKey(0), x)
    apply = lambda v, x: conv.apply(v, x)  # noqa: E731

    monkeypatch.setenv(onednn_conv.ENV_VAR, "onednn")
    assert _uses_onednn(apply, variables, x)
    bf16 = Conv(3, 3, padding=1, dtype=jnp.bfloat16)  # float32 only: bfloat16 stays XLA's
    assert not _uses_onednn(lambda v, x: bf16.apply(v, x), variables, x)
    monkeypatch.setenv(onednn_conv.ENV_VAR, "xla")
    assert not _uses_onednn(apply, variables, x)
    # auto: these tests run on 8 CPU devices, where XLA's convolution is kept...
    monkeypatch.setenv(onednn_conv.ENV_VAR, "auto")
    assert jax.device_count() > 1 and not _uses_onednn(apply, variables, x)
    # ...and a single CPU device (the default machine) gets oneDNN.
    monkeypatch.setattr(onednn_conv.jax, "device_count", lambda: 1)
    assert _uses_onednn(apply, variables, x)
    monkeypatch.setenv(onednn_conv.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="PROXY_JAX_CONV='fastest'.*auto, xla, onednn"):
        onednn_conv.use_onednn(jnp.float32)


def test_without_a_compiler_auto_falls_back_and_onednn_says_why(tmp_path):
    """A fresh single-device process whose compiler is missing: 'auto' warns and computes
    with XLA,
    'onednn' raises an error naming the missing compiler."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from proxy_jax.models import onednn_conv\n"
        "from proxy_jax.models.layers import Conv\n"
        "x = jnp.ones((1, 5, 5, 2)); m = Conv(3, 3, padding=1)\n"
        "y = m.apply(m.init(jax.random.PRNGKey(0), x), x)\n"
        "print('shape', y.shape)\n")
    env = dict(os.environ, CXX="/nonexistent/c++", PROXY_JAX_CACHE_DIR=str(tmp_path),
               PROXY_JAX_CONV="auto", XLA_FLAGS="", PYTHONPATH=os.getcwd())
    auto = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert auto.returncode == 0, auto.stderr
    assert "shape (1, 5, 5, 3)" in auto.stdout
    assert "oneDNN convolutions unavailable" in auto.stderr
    assert "no C++ compiler" in auto.stderr
    forced = subprocess.run([sys.executable, "-c", code],
                            env=dict(env, PROXY_JAX_CONV="onednn"), capture_output=True,
                            text=True, timeout=120)
    assert forced.returncode != 0
    assert "PROXY_JAX_CONV=onednn but oneDNN convolutions are unavailable" in forced.stderr
    assert "/nonexistent/c++" in forced.stderr
    assert os.listdir(tmp_path) == []  # nothing half-built left behind


def test_build_failure_reports_the_compiler_output(tmp_path):
    """A compiler that fails: the reason carries its message, and no file is left."""
    fake = tmp_path / "fake-c++"
    fake.write_text("#!/bin/sh\necho 'fatal: no room' >&2\nexit 1\n")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    code = ("from proxy_jax.models import onednn_conv\n"
            "print(onednn_conv.unavailable_reason())\n")
    env = dict(os.environ, CXX=str(fake), PROXY_JAX_CACHE_DIR=str(cache), XLA_FLAGS="",
               PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "oneDNN not found" in out.stdout and not ONEDNN_EXPECTED:
        pytest.skip("no oneDNN on this platform")
    assert "compiling" in out.stdout and "fatal: no room" in out.stdout
    assert not any(cache.glob("*.so"))


# ------------------------------------------------------------------------ dense layers

@pytest.mark.parametrize("lead, k, n, with_bias", [
    ((5,), 3, 4, True),  # rank 2
    ((2, 7), 8, 5, True),  # rank 3: the tokens of a batch
    ((3, 1), 6, 1, False),  # one output, no bias
    ((9,), 1, 6, True),  # one input feature
])
def test_dense_forward_and_gradients_match_xla(library, lead, k, n, with_bias):
    rng = np.random.default_rng(k * 10 + n)
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    kernel = rng.normal(size=(k, n)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32) if with_bias else None
    cotangent = rng.normal(size=lead + (n,)).astype(np.float32)

    def loss(dense, x, kernel, bias):  # a non-trivial cotangent through every output
        return jnp.sum(dense(x, kernel, bias) * cotangent)

    def xla_dense(x, kernel, bias):
        return x @ kernel + (0 if bias is None else bias)

    argnums = (0, 1, 2) if with_bias else (0, 1)
    y = jax.jit(onednn_conv.dense)(x, kernel, bias)
    assert y.shape == lead + (n,)
    assert _relative_error(y, xla_dense(x, kernel, bias)) < 1e-5
    got = jax.jit(jax.grad(lambda *a: loss(onednn_conv.dense, *a), argnums))(x, kernel, bias)
    want = jax.grad(lambda *a: loss(xla_dense, *a), argnums)(x, kernel, bias)
    for g, w in zip(got, want):
        assert g.shape == w.shape and _relative_error(g, w) < 1e-5


def test_dense_matches_torch_linear(library):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 10, 12)).astype(np.float32)
    linear = torch.nn.Linear(12, 7)
    tx = torch.from_numpy(x).requires_grad_()
    ty = linear(tx)
    (ty ** 2).sum().backward()
    kernel = linear.weight.detach().numpy().T.copy()
    bias = linear.bias.detach().numpy()
    y, (dx, dw, db) = jax.value_and_grad(
        lambda x, w, b: jnp.sum(onednn_conv.dense(x, w, b) ** 2), (0, 1, 2))(x, kernel, bias)
    assert _relative_error(y, (ty ** 2).sum().item()) < 1e-5
    assert _relative_error(dx, tx.grad.numpy()) < 1e-5
    assert _relative_error(dw, linear.weight.grad.numpy().T) < 1e-5
    assert _relative_error(db, linear.bias.grad.numpy()) < 1e-5


def test_dense_shapes_are_named(library):
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"kernel \(5, 6\) does not fit input \(2, 3, 4\)"):
        onednn_conv.dense(x, jnp.ones((5, 6)))
    with pytest.raises(ValueError, match=r"bias \(5,\) does not fit 6 outputs"):
        onednn_conv.dense(x, jnp.ones((4, 6)), jnp.ones((5,)))


def test_dense_layer_is_flax_dense_and_follows_the_mode(library, monkeypatch):
    """layers.Dense has flax.linen.Dense's parameters and output; PROXY_JAX_CONV picks the
    product as for convolutions (float32 only)."""
    import flax.linen as nn

    from proxy_jax.models.layers import Dense

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 6)), jnp.float32)
    ours, flax_dense = Dense(3), nn.Dense(3)
    variables = ours.init(jax.random.PRNGKey(0), x)
    flax_variables = flax_dense.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(flax_variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(flax_variables)):
        np.testing.assert_array_equal(a, b)  # the same initialisation, draw for draw
    apply = lambda v, x: ours.apply(v, x)  # noqa: E731
    want = flax_dense.apply(flax_variables, x)
    for mode, onednn in (("onednn", True), ("xla", False)):
        monkeypatch.setenv(onednn_conv.ENV_VAR, mode)
        assert _uses_onednn(apply, variables, x) == onednn
        assert _relative_error(jax.jit(apply)(variables, x), want) < 1e-5
    monkeypatch.setenv(onednn_conv.ENV_VAR, "onednn")
    bf16 = Dense(3, dtype=jnp.bfloat16)
    assert not _uses_onednn(lambda v, x: bf16.apply(v, x), variables, x)


def test_vit_trains_the_same_with_onednn_dense_layers(library, monkeypatch):
    """The tiny ViT: tokens and every parameter's gradient with oneDNN's dense layers (what
    a one-device CPU run uses) equal XLA's."""
    from proxy_jax.models import vit

    model = vit.VisionTransformer(patch_size=4, width=16, depth=2, num_heads=2,
                                  layer_scale=0.1)
    images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, 12, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), images)
    loss = lambda v, x: jnp.sum(jnp.sin(model.apply(v, x)))  # noqa: E731
    runs = {}
    for mode in ("xla", "onednn"):
        monkeypatch.setenv(onednn_conv.ENV_VAR, mode)
        assert _uses_onednn(lambda v, x: model.apply(v, x), variables, images) == (
            mode == "onednn")
        runs[mode] = jax.jit(jax.value_and_grad(loss))(variables, images)
    (y_xla, g_xla), (y, g) = runs["xla"], runs["onednn"]
    assert _relative_error(y, y_xla) < 1e-5
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g),
                          jax.tree.leaves(g_xla)):
        assert _relative_error(a, b) < 1e-4, jax.tree_util.keystr(path[0])
