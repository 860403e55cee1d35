"""Tests of proxy_jax.regularizers.expansion.embedding_expansion (+ losses.hphn_triplet).

Fixture tests/fixtures/ee_official.npz: the official Embedding Expansion code
(clovaai/embedding-expansion, ``loss/embedding_aug.py`` and ``loss/hphn_triplet.py``) is
MXNet, which is not installable here, so /work/scratch/ps_ee/make_ee_fixtures.py (outside
the repository) transcribes it line by line to torch float64 and stores, for l2-normalized
float32 inputs (the official model's output), 0 and 2 inner points, hard and soft margin:
the per-sample loss vector and the gradient of its sum (the official trainer calls
``loss.backward()`` on the vector). Two gradients are stored because of ties (every inner
point occurs twice): ``grad_embeddings`` splits a tied min/max evenly, as ``jnp.min`` does;
``grad_embeddings_mxnet`` gives every tied entry the full gradient, as MXNet does.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from proxy_jax import losses
from proxy_jax.regularizers import check_pairs, embedding_expansion

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "ee_official.npz"
BATCHES = ["b10", "b8_inst4"]  # 5 classes x 2 instances; 2 classes x 4 instances


@functools.lru_cache(maxsize=None)
def _fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _ee_hphn(x, y, *, num_inner, soft_margin):
    """The official per-sample HPHN vector with embedding expansion, in proxy_jax terms."""
    ex, ey = embedding_expansion(x, y, num_inner=num_inner)
    return losses.hphn_triplet(
        ex, ey, num_original=x.shape[0], soft_margin=soft_margin, reduction="none"
    )


def _rel_err(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


# ----------------------------------------------------------------- parity with official code


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_inner", [0, 2])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_matches_official_hphn_with_expansion(batch, num_inner, soft_margin):
    data = _fixture()
    name = f"{batch}/inner{num_inner}_{'soft' if soft_margin else 'hard'}"
    x = jnp.asarray(data[f"{batch}/embeddings"])
    y = jnp.asarray(data[f"{batch}/labels"])
    fn = jax.jit(functools.partial(_ee_hphn, num_inner=num_inner, soft_margin=soft_margin))
    per_sample = fn(x, y)
    np.testing.assert_allclose(per_sample, data[f"{name}/loss_per_sample"], rtol=1e-5, atol=1e-6)
    # the official trainer back-propagates the sum of the per-sample vector
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, y))))(x)
    assert _rel_err(grad, data[f"{name}/grad_embeddings"]) < 1e-5


def _mxnet_rule(reduce, v, axis):
    """min/max whose gradient goes in full to every tied entry (MXNet's backward)."""
    frozen = jnp.expand_dims(jax.lax.stop_gradient(reduce(v, axis=axis)), axis)
    tied = jnp.abs(v - frozen) <= 1e-6 * jnp.abs(frozen)
    return jnp.squeeze(frozen, axis) + jnp.sum(
        jnp.where(tied, v - jax.lax.stop_gradient(v), 0.0), axis=axis
    )


@pytest.mark.parametrize("batch", BATCHES)
def test_official_gradient_differs_only_by_the_tie_rule(batch):
    # Re-derive HPHN on top of embedding_expansion with MXNet's tie rule: it reproduces the
    # official gradient, so proxy_jax's gradient differs from MXNet's by the tie rule alone
    # (a duplicated hardest negative counts once in JAX, twice in MXNet).
    data = _fixture()
    x = jnp.asarray(data[f"{batch}/embeddings"])
    y = jnp.asarray(data[f"{batch}/labels"])
    b = x.shape[0]

    def official_rule_loss(x):
        ex, ey = embedding_expansion(x, y, num_inner=2)
        sq = jnp.sum(ex * ex, axis=1)
        dist = jnp.sqrt(jnp.clip(sq[:, None] + sq[None, :] - 2 * ex @ ex.T, 1e-12, 1e12))
        is_pos = ey[:, None] == ey[None, :]
        d_ap = _mxnet_rule(jnp.max, jnp.where(is_pos, dist, 0.0)[:b, :b], 1)
        row_max = _mxnet_rule(jnp.max, dist, 1)[:, None]
        d_an = _mxnet_rule(jnp.min, jnp.where(is_pos, row_max, dist), 1)
        d_an = _mxnet_rule(jnp.min, d_an.reshape(3, b), 0)
        return jnp.sum(jax.nn.relu(d_ap - d_an + 0.2))

    name = f"{batch}/inner2_hard"
    grad = jax.jit(jax.grad(official_rule_loss))(x)
    assert _rel_err(grad, data[f"{name}/grad_embeddings_mxnet"]) < 1e-5
    assert _rel_err(grad, data[f"{name}/grad_embeddings"]) > 1e-2  # the rules really differ


# ----------------------------------------------------------------- semantics


def _pairs(batch=8, dim=6, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch, dim), jnp.float32)
    y = jnp.asarray(np.repeat(np.arange(batch // 2), 2) * 3, jnp.int32)
    return x, y


def test_layout_formula_and_twins():
    x, y = _pairs()
    n = 3
    ex, ey = embedding_expansion(x, y, num_inner=n)
    assert ex.shape == (32, 6) and ey.shape == (32,) and ex.dtype == x.dtype
    np.testing.assert_array_equal(ex[:8], x)  # originals first, unchanged (not normalized)
    np.testing.assert_array_equal(ey, np.tile(np.asarray(y), 4))
    xn = np.asarray(x, np.float64)
    partner = xn[[1, 0, 3, 2, 5, 4, 7, 6]]
    for k in range(1, n + 1):
        inner = (partner * k + xn * (n + 1 - k)) / (n + 1)
        inner /= np.linalg.norm(inner, axis=1, keepdims=True)
        np.testing.assert_allclose(ex[8 * k : 8 * (k + 1)], inner, rtol=1e-5, atol=1e-6)
        # twin: row r of group k is the partner's row of group n+1-k, bit for bit
        twin = np.asarray(ex[8 * (n + 1 - k) : 8 * (n + 2 - k)])[[1, 0, 3, 2, 5, 4, 7, 6]]
        np.testing.assert_array_equal(ex[8 * k : 8 * (k + 1)], twin)
    raw, _ = embedding_expansion(x, y, num_inner=1, l2_norm=False)
    np.testing.assert_allclose(raw[8:], (partner + xn) / 2, rtol=1e-6, atol=1e-7)


def test_zero_inner_points_returns_inputs():
    x, y = _pairs()
    ex, ey = embedding_expansion(x, y, num_inner=0)
    assert ex is x and ey is y


def test_jit_vmap_and_bfloat16():
    x, y = _pairs()
    fn = jax.jit(functools.partial(embedding_expansion, num_inner=2))
    for a, b in zip(fn(x, y), embedding_expansion(x, y, num_inner=2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    stacked, _ = jax.vmap(fn, in_axes=(0, None))(jnp.stack([x, -x]), y)
    np.testing.assert_allclose(stacked[1], fn(-x, y)[0], rtol=1e-6, atol=1e-7)
    loss_fn = jax.jit(
        jax.value_and_grad(lambda x: jnp.sum(_ee_hphn(x, y, num_inner=2, soft_margin=False)))
    )
    loss, grad = loss_fn(x.astype(jnp.bfloat16))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad, np.float32)).all()


def test_check_grads_through_expansion():
    x, y = _pairs(batch=6, dim=4, seed=3)

    def loss_fn(x):
        return jnp.sum(_ee_hphn(x, y, num_inner=2, soft_margin=True))

    with jax.enable_x64(True):
        check_grads(jax.jit(loss_fn), (jnp.asarray(x, jnp.float64),), order=1, modes=["fwd", "rev"])


# ----------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_at_trace_time():
    x, y = _pairs()
    ee = jax.jit(functools.partial(embedding_expansion, num_inner=2))
    cases = [
        ("even, non-empty batch", x[:7], y[:7]),
        ("labels has 6 entries", x, y[:6]),
        ("labels must be integers", x, y.astype(jnp.float32)),
        ("embeddings must be \\[batch, dim\\]", x[0], y),
        ("embeddings must be a float", y[:, None], y),
        ("labels must be \\[batch\\]", x, y[:, None]),
    ]
    for match, xs, ys in cases:
        with pytest.raises(ValueError, match=match):
            ee.trace(xs, ys)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_inner must be a Python int"):
            embedding_expansion(x, y, num_inner=bad)


def test_unpaired_classes_raise():
    x, _ = _pairs()
    y = jnp.asarray([0, 0, 1, 2, 2, 1, 3, 3], jnp.int32)
    # concrete labels (eager, or closed over by a jitted function): raised at trace time
    with pytest.raises(ValueError, match="rows 2 and 3 have labels 1 and 2"):
        embedding_expansion(x, y, num_inner=2)
    with pytest.raises(ValueError, match="rows 2 and 3"):
        jax.jit(lambda x: embedding_expansion(x, y, num_inner=2)).trace(x)
    # traced labels cannot be inspected: the host-side check is check_pairs
    with pytest.raises(ValueError, match="rows 2 and 3"):
        check_pairs(np.asarray(y))
    with pytest.raises(ValueError, match="even batch"):
        check_pairs(np.arange(3))
    check_pairs(np.asarray(_pairs()[1]))
