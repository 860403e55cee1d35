"""Tests of proxy_jax.regularizers.expansion.embedding_expansion (+ losses.hphn_triplet).

Two fixtures of the official Embedding Expansion code (clovaai/embedding-expansion at
1aa68cb, ``loss/embedding_aug.py`` and ``loss/hphn_triplet.py``):

* tests/fixtures/hphn_ties_mxnet.npz, the official MXNet code run as it is: MXNet 1.9.1
  (CPU wheel, Python 3.8 scratch venv outside the repository) with the repository's
  ``loss/`` package imported unchanged. For each batch, ``HPHNTripletLoss(margin=0.2,
  soft_margin=s, num_instances=2, n_inner_pts=n, l2_norm=True)`` is called on
  ``mx.nd.array(embeddings)`` (with ``attach_grad()``) and float32 labels inside
  ``mx.autograd.record()``; ``loss.backward()`` (the official trainer's call on the
  per-anchor vector, i.e. the gradient of its sum) fills ``embeddings.grad``. Stored per
  ``{batch}/inner{n}_{hard|soft}``, n in {0, 1, 2}: ``loss_per_sample`` [B] and
  ``grad_embeddings`` [B, D]; per batch ``embeddings`` (float32, rows l2-normalized,
  ``np.random.RandomState(16)``, D = 6) and ``labels`` (int32). Batches: ``b8`` 4 classes x 2;
  ``b8_dup`` the same rows with rows 2-3 set to rows 0-1 and labels [0,0,0,0,1,1,2,2] (a
  pair present twice in its class: tied hardest positives and negatives even without
  inner points); ``b4_oneclass`` 4 rows of one class (no negatives: every entry of the
  hardest-negative row ties at the row maximum). With n > 0 every inner point occurs twice,
  so hardest negatives tie; the generating script checked that the twin distance columns
  are bit-equal in the MXNet run, so the ties there are exact, as they are (by
  construction) in hphn_triplet.
* tests/fixtures/ee_official.npz, an earlier transcription of the same two files to torch
  float64 (/work/scratch/ps_ee/make_ee_fixtures.py, outside the repository), for 0 and 2
  inner points, hard and soft margin: the per-sample loss and two gradients of its sum,
  ``grad_embeddings`` with ties split evenly (``tie_gradient='split'``) and
  ``grad_embeddings_mxnet`` with the full gradient to every tied entry (``'each'``).
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

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
BATCHES = ["b10", "b8_inst4"]  # 5 classes x 2 instances; 2 classes x 4 instances
MXNET_BATCHES = ["b8", "b8_dup", "b4_oneclass"]


@functools.lru_cache(maxsize=None)
def _fixture(name="ee_official.npz"):
    with np.load(FIXTURES / name) as data:
        return {k: data[k] for k in data.files}


def _ee_hphn(x, y, *, num_inner, soft_margin, tie_gradient="each", margin=0.2):
    """The official per-sample HPHN vector with embedding expansion, in proxy_jax terms."""
    ex, ey = embedding_expansion(x, y, num_inner=num_inner)
    return losses.hphn_triplet(ex, ey, num_original=x.shape[0], margin=margin,
                               soft_margin=soft_margin, reduction="none",
                               tie_gradient=tie_gradient)


def _rel_err(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


def _loss_and_grad(x, y, **kw):
    fn = jax.jit(functools.partial(_ee_hphn, **kw))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, y))))(x)  # the official sum
    return fn(x, y), grad


# ----------------------------------------------------------------- parity with official code


@pytest.mark.parametrize("batch", MXNET_BATCHES)
@pytest.mark.parametrize("num_inner", [0, 1, 2])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_matches_mxnet_run_of_official_loss(batch, num_inner, soft_margin):
    data = _fixture("hphn_ties_mxnet.npz")
    name = f"{batch}/inner{num_inner}_{'soft' if soft_margin else 'hard'}"
    x = jnp.asarray(data[f"{batch}/embeddings"])
    y = jnp.asarray(data[f"{batch}/labels"])
    per_sample, grad = _loss_and_grad(x, y, num_inner=num_inner, soft_margin=soft_margin,
                                      margin=float(data["margin"]))
    np.testing.assert_allclose(per_sample, data[f"{name}/loss_per_sample"], rtol=1e-5,
                               atol=1e-6)
    assert _rel_err(grad, data[f"{name}/grad_embeddings"]) < 1e-5


@pytest.mark.parametrize("batch", MXNET_BATCHES)
def test_even_split_differs_from_mxnet_only_where_points_repeat(batch):
    data = _fixture("hphn_ties_mxnet.npz")
    x = jnp.asarray(data[f"{batch}/embeddings"])
    y = jnp.asarray(data[f"{batch}/labels"])
    for num_inner in (0, 2):
        expected = data[f"{batch}/inner{num_inner}_hard/grad_embeddings"]
        _, split = _loss_and_grad(x, y, num_inner=num_inner, soft_margin=False,
                                  tie_gradient="split")
        repeated = batch != "b8" or num_inner > 0  # ties exist
        assert (_rel_err(split, expected) > 1e-2) == repeated


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_inner", [0, 2])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("tie_gradient, key", [("split", "grad_embeddings"),
                                               ("each", "grad_embeddings_mxnet")])
def test_matches_official_transcription(batch, num_inner, soft_margin, tie_gradient, key):
    data = _fixture()
    name = f"{batch}/inner{num_inner}_{'soft' if soft_margin else 'hard'}"
    x = jnp.asarray(data[f"{batch}/embeddings"])
    y = jnp.asarray(data[f"{batch}/labels"])
    per_sample, grad = _loss_and_grad(x, y, num_inner=num_inner, soft_margin=soft_margin,
                                      tie_gradient=tie_gradient)
    np.testing.assert_allclose(per_sample, data[f"{name}/loss_per_sample"], rtol=1e-5, atol=1e-6)
    assert _rel_err(grad, data[f"{name}/{key}"]) < 1e-5


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


@pytest.mark.parametrize("tie_gradient", ["split", "each"])
def test_check_grads_through_expansion(tie_gradient):
    # Twin inner points are one function of x, so min(f, f) = f: the even split is the
    # derivative of the loss; the official rule counts the twin twice and is not.
    x, y = _pairs(batch=6, dim=4, seed=3)

    def loss_fn(x):
        return jnp.sum(_ee_hphn(x, y, num_inner=2, soft_margin=True, tie_gradient=tie_gradient))

    with jax.enable_x64(True):
        args = (jnp.asarray(x, jnp.float64),)
        if tie_gradient == "split":
            check_grads(jax.jit(loss_fn), args, order=1, modes=["fwd", "rev"])
        else:
            with pytest.raises(AssertionError):
                check_grads(jax.jit(loss_fn), args, order=1, modes=["rev"])


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
