"""Parity and property tests for proxy_jax.losses.

References:
* pytorch-metric-learning (live, float32): ProxyAnchorLoss, ProxyNCALoss,
  NormalizedSoftmaxLoss. Parameter mapping: pml ``proxies`` [C, D] are ours as they are;
  NormalizedSoftmaxLoss stores ``W`` as [D, C] and uses ``temperature``: proxies = W.T,
  scale = 1 / temperature.
* tests/fixtures/proxy_anchor_official.npz: the official ``Proxy_Anchor`` of
  tjddus9597/Proxy-Anchor-CVPR2020 (code/losses.py) run on CPU in float64 with ``.cuda()``
  patched out, on batches where some classes are absent (labels drawn from a subset).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from proxy_jax import losses

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def assert_rel_close(actual, expected, tol=1e-5):
    """max |actual − expected| ≤ tol · max |expected| (relative error in the max norm)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.max(np.abs(expected)), 1e-30)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def _batch(seed, b=24, c=10, d=16, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)).astype(dtype)
    p = rng.normal(size=(c, d)).astype(dtype)
    y = rng.integers(0, c, size=b).astype(np.int32)
    return x, y, p


PROXY_LOSSES = {
    "norm_softmax": lambda x, y, p, **kw: losses.norm_softmax(x, y, p, scale=23.0, **kw),
    "proxy_nca": lambda x, y, p, **kw: losses.proxy_nca(x, y, p, scale=12.0, **kw),
    "proxy_anchor": lambda x, y, p, **kw: losses.proxy_anchor(x, y, p, **kw),
}


# ----------------------------------------------------------------- pml parity


def _pml_reference(name, x, y, p):
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning import losses as pml

    c, d = p.shape
    if name == "proxy_anchor":
        fn = pml.ProxyAnchorLoss(num_classes=c, embedding_size=d, margin=0.1, alpha=32)
        fn.proxies.data = torch.tensor(p)
        weight = fn.proxies
    elif name == "proxy_nca":
        fn = pml.ProxyNCALoss(num_classes=c, embedding_size=d, softmax_scale=12.0)
        fn.proxies.data = torch.tensor(p)
        weight = fn.proxies
    else:
        fn = pml.NormalizedSoftmaxLoss(num_classes=c, embedding_size=d, temperature=1 / 23.0)
        fn.W.data = torch.tensor(p.T.copy())
        weight = fn.W
    xt = torch.tensor(x, requires_grad=True)
    loss = fn(xt, torch.tensor(y, dtype=torch.long))
    loss.backward()
    grad_p = weight.grad.numpy()
    if name == "norm_softmax":
        grad_p = grad_p.T
    return float(loss.detach()), xt.grad.numpy(), grad_p


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pytorch_metric_learning(name, seed):
    x, y, p = _batch(seed, b=32, c=12, d=24)
    ref_loss, ref_gx, ref_gp = _pml_reference(name, x, y, p)
    loss, (gx, gp) = jax.jit(jax.value_and_grad(PROXY_LOSSES[name], argnums=(0, 2)))(x, y, p)
    assert loss.dtype == jnp.float32
    assert_rel_close(loss, ref_loss)
    assert_rel_close(gx, ref_gx)
    assert_rel_close(gp, ref_gp)


@pytest.mark.parametrize("case", [0, 1])
def test_proxy_anchor_matches_official_code_with_absent_classes(case):
    ref = np.load(FIXTURES / "proxy_anchor_official.npz")
    x = ref[f"case{case}_x"].astype(np.float32)
    y = ref[f"case{case}_labels"].astype(np.int32)
    p = ref[f"case{case}_proxies"].astype(np.float32)
    assert len(np.unique(y)) < p.shape[0]  # some classes are absent
    loss, (gx, gp) = jax.value_and_grad(losses.proxy_anchor, argnums=(0, 2))(x, y, p)
    assert_rel_close(loss, ref[f"case{case}_loss"])
    assert_rel_close(gx, ref[f"case{case}_grad_x"])
    assert_rel_close(gp, ref[f"case{case}_grad_p"])


# ----------------------------------------------------------------- plain-numpy re-derivations


def _np_normalize(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_norm_softmax_and_proxy_nca_match_numpy():
    x, y, p = _batch(3, dtype=np.float64)
    cos = _np_normalize(x) @ _np_normalize(p).T
    rows = np.arange(len(y))
    ns = -_np_log_softmax(23.0 * cos)[rows, y].mean()
    nca = -_np_log_softmax(-12.0 * (2.0 - 2.0 * cos))[rows, y].mean()
    assert_rel_close(PROXY_LOSSES["norm_softmax"](x, y, p), ns)
    assert_rel_close(PROXY_LOSSES["proxy_nca"](x, y, p), nca)


def _np_hphn(x, y, margin, soft, b):
    n = len(y)
    sq = (x * x).sum(1)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * x @ x.T, 1e-12, 1e12))
    ap = np.zeros(b)
    an = np.full(b, np.inf)
    for i in range(b):
        ap[i] = max(dist[i, j] if y[i] == y[j] else 0.0 for j in range(b))
        for g in range(n // b):
            r = g * b + i
            negs = [dist[r, j] for j in range(n) if y[r] != y[j]]
            an[i] = min(an[i], min(negs) if negs else dist[r].max())
    z = ap - an
    return np.log1p(np.exp(z)) if soft else np.maximum(z + margin, 0.0)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_hphn_triplet_matches_loop_definition(soft, groups):
    rng = np.random.default_rng(7)
    b = 12
    x = rng.normal(size=(b * groups, 8))
    y = np.tile(np.repeat(np.arange(b // 2), 2), groups).astype(np.int32)
    expected = _np_hphn(x, y, 0.2, soft, b)
    got = losses.hphn_triplet(
        x, y, soft_margin=soft, num_original=b if groups > 1 else None, reduction="none"
    )
    assert_rel_close(got, expected)
    assert_rel_close(losses.hphn_triplet(x, y, soft_margin=soft,
                                         num_original=b, reduction="sum"), expected.sum())


# ----------------------------------------------------------------- masks


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_padded_call_equals_unpadded(name):
    x, y, p = _batch(4)
    rng = np.random.default_rng(9)
    # Pad with junk rows; junk samples even point at real classes.
    xp = np.concatenate([x, rng.normal(size=(5, x.shape[1])).astype(np.float32)])
    yp = np.concatenate([y, rng.integers(0, p.shape[0], 5).astype(np.int32)])
    pp = np.concatenate([p, rng.normal(size=(7, p.shape[1])).astype(np.float32)])
    smask = np.arange(len(yp)) < len(y)
    pmask = np.arange(len(pp)) < len(p)
    fn = PROXY_LOSSES[name]
    plain, (gx, gp) = jax.value_and_grad(fn, argnums=(0, 2))(x, y, p)
    padded, (gxp, gpp) = jax.value_and_grad(
        lambda a, b_, c: fn(a, b_, c, proxy_mask=pmask, sample_mask=smask), argnums=(0, 2)
    )(xp, yp, pp)
    assert_rel_close(padded, plain)
    assert_rel_close(gxp[: len(y)], gx)
    assert_rel_close(gpp[: len(p)], gp)
    assert np.all(gxp[len(y):] == 0) and np.all(gpp[len(p):] == 0)


def test_masked_proxy_is_in_no_denominator():
    x, y, p = _batch(5)
    y = np.where(y == 3, 0, y).astype(np.int32)  # class 3 has no sample
    keep = np.arange(p.shape[0]) != 3
    for name, fn in PROXY_LOSSES.items():
        masked = fn(x, y, p, proxy_mask=keep)
        removed = fn(x, np.where(y > 3, y - 1, y).astype(np.int32), p[keep])
        assert_rel_close(masked, removed)


# ----------------------------------------------------------------- gradients, dtypes, transforms


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_check_grads_proxy_losses(name):
    with jax.enable_x64(True):
        x, y, p = _batch(6, b=8, c=5, d=6, dtype=np.float64)
        fn = PROXY_LOSSES[name]
        check_grads(lambda a, c: fn(a, y, c), (x, p), order=2, modes=("rev",))


def test_check_grads_hphn():
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        x = rng.normal(size=(8, 5))
        y = np.repeat(np.arange(4), 2).astype(np.int32)
        for soft in (False, True):
            check_grads(lambda a: losses.hphn_triplet(a, y, soft_margin=soft), (x,),
                        order=1, modes=("rev",))


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_bfloat16_inputs_give_finite_loss_and_grads(name):
    x, y, p = _batch(10, b=64, c=16, d=32)
    x = jnp.asarray(x * 10, jnp.bfloat16)  # large norms; alpha = 32 in proxy_anchor
    p = jnp.asarray(p, jnp.bfloat16)
    loss, (gx, gp) = jax.jit(jax.value_and_grad(PROXY_LOSSES[name], argnums=(0, 2)))(x, y, p)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert gx.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gx, np.float32)))
    assert np.all(np.isfinite(np.asarray(gp, np.float32)))
    assert_rel_close(loss, PROXY_LOSSES[name](np.asarray(x, np.float32),
                                              y, np.asarray(p, np.float32)), tol=1e-2)


def test_proxy_anchor_does_not_overflow_at_extreme_similarity():
    # All samples of one class sit on a far-away proxy: the literal log(1 + sum exp) form
    # would overflow exp(32 * 1.1) in float16; the logsumexp form stays finite.
    p = jnp.eye(4, 8, dtype=jnp.float16)
    x = -jnp.tile(p, (4, 1))
    y = jnp.repeat(jnp.arange(4), 4)
    loss = losses.proxy_anchor(x, y, p)
    assert np.isfinite(loss)


def test_vmap_over_independent_batches():
    xs, ys, ps = zip(*[_batch(s, b=8, c=4, d=6) for s in range(3)])
    xs, ys, ps = map(np.stack, (xs, ys, ps))
    for name, fn in PROXY_LOSSES.items():
        batched = jax.vmap(fn)(xs, ys, ps)
        single = np.array([fn(xs[i], ys[i], ps[i]) for i in range(3)])
        assert_rel_close(batched, single)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_bad_input_names_the_argument(name):
    x, y, p = _batch(11)
    fn = jax.jit(PROXY_LOSSES[name])
    with pytest.raises(ValueError, match="labels"):
        fn(x, y[:-1], p)
    with pytest.raises(ValueError, match="labels must be integers"):
        fn(x, y.astype(np.float32), p)
    with pytest.raises(ValueError, match="proxies"):
        fn(x, y, p[:, :-1])
    with pytest.raises(ValueError, match="embeddings"):
        fn(x[0], y, p)
    with pytest.raises(ValueError, match="proxy_mask"):
        PROXY_LOSSES[name](x, y, p, proxy_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="sample_mask"):
        PROXY_LOSSES[name](x, y, p, sample_mask=np.ones(3, bool))


def test_hphn_bad_input():
    x, y, _ = _batch(12, b=12)
    with pytest.raises(ValueError, match="num_original"):
        losses.hphn_triplet(x, y, num_original=5)
    with pytest.raises(ValueError, match="reduction"):
        losses.hphn_triplet(x, y, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        losses.hphn_triplet(x, y[:3])
