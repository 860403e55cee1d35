"""Tests of proxy_jax.regularizers.synthesis: proxy_synthesis and distinct_neighbours.

Fixture tests/fixtures/ps_official.npz: produced by /work/scratch/ps_ee/make_ps_fixtures.py
(kept outside the repository), which imports ``loss/proxy_losses.py`` of
navervision/proxy-synthesis unchanged and runs ``Norm_SoftMax`` / ``Proxy_NCA`` on CPU
(``.cuda()`` a no-op) with ``np.random.beta`` patched to return the stored λ; it stores the
inputs, the loss and the gradients w.r.t. embeddings and proxies (torch float32). Cases
with ``mu = 0`` take the official path that skips synthesis.
"""

import functools
import pathlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

from proxy_jax import losses
from proxy_jax.regularizers import (distinct_neighbours, masked_proxy_synthesis, neighbour_swaps,
                                    proxy_synthesis)

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "ps_official.npz"
CASES = [
    "norm_softmax_mu1",
    "norm_softmax_mu05",
    "norm_softmax_b7_mu05",
    "norm_softmax_mu0",
    "proxy_nca_mu1",
    "proxy_nca_mu05",
    "proxy_nca_b7_mu05",
    "proxy_nca_mu0",
]
BASE_LOSSES = {"norm_softmax": losses.norm_softmax, "proxy_nca": losses.proxy_nca}


@functools.lru_cache(maxsize=None)
def _fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _case(name):
    data = _fixture()
    return {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(name + "/")}


def _problem(batch=8, classes=6, dim=16, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch, dim), jnp.float32)
    p = jnp.asarray(rng.randn(classes, dim), jnp.float32)
    y = jnp.asarray(np.arange(batch) % classes, jnp.int32)  # neighbours differ cyclically
    return x, y, p


def _rel_err(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


# ----------------------------------------------------------------- parity with official code


@pytest.mark.parametrize("name", CASES)
def test_matches_official_loss_and_gradients(name):
    case = _case(name)
    base = BASE_LOSSES["norm_softmax" if name.startswith("norm_softmax") else "proxy_nca"]
    labels = jnp.asarray(case["labels"])

    @jax.jit
    def loss_fn(x, p):
        x, y, p = proxy_synthesis(
            None, x, labels, p, alpha=0.4, mu=float(case["mu"]), lam=float(case["lam"])
        )
        return base(x, y, p, scale=float(case["scale"]))

    loss, (gx, gp) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        jnp.asarray(case["embeddings"]), jnp.asarray(case["proxies"])
    )
    np.testing.assert_allclose(loss, case["loss"], rtol=1e-5)
    assert _rel_err(gx, case["grad_embeddings"]) < 1e-5
    assert _rel_err(gp, case["grad_proxies"]) < 1e-5


# ----------------------------------------------------------------- semantics


def test_outputs_follow_the_formula_with_wraparound_and_floor():
    x, y, p = _problem(batch=7, classes=5)
    lam, mu = 0.3, 0.5  # floor(7 * 0.5) = 3 synthetic rows
    out_x, out_y, out_p = proxy_synthesis(None, x, y, p, alpha=0.4, mu=mu, lam=lam)
    assert out_x.shape == (10, 16) and out_y.shape == (10,) and out_p.shape == (8, 16)
    assert out_y.dtype == y.dtype and out_x.dtype == x.dtype

    xn = np.asarray(x, np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    pn = np.asarray(p, np.float64)
    pn /= np.linalg.norm(pn, axis=1, keepdims=True)
    py = pn[np.asarray(y)]
    prev = [6, 0, 1]  # row 0 mixes with the last row
    x_syn = lam * xn[:3] + (1 - lam) * xn[prev]
    p_syn = lam * py[:3] + (1 - lam) * py[prev]
    x_syn /= np.linalg.norm(x_syn, axis=1, keepdims=True)
    p_syn /= np.linalg.norm(p_syn, axis=1, keepdims=True)
    np.testing.assert_allclose(out_x, np.concatenate([xn, x_syn]), atol=1e-6)
    np.testing.assert_allclose(out_p, np.concatenate([pn, p_syn]), atol=1e-6)
    np.testing.assert_array_equal(out_y, np.concatenate([np.asarray(y), [5, 6, 7]]))


def test_mu_zero_returns_inputs_and_equals_base_loss():
    x, y, p = _problem()
    out = proxy_synthesis(jax.random.key(0), x, y, p, alpha=0.4, mu=0.0)
    assert out[0] is x and out[1] is y and out[2] is p
    for base in (losses.norm_softmax, losses.proxy_nca):
        fn = jax.jit(
            lambda x, p, base=base: base(
                *proxy_synthesis(None, x, y, p, alpha=0.4, mu=0.0), scale=10.0
            )
        )
        np.testing.assert_allclose(fn(x, p), base(x, y, p, scale=10.0), rtol=1e-6)
    np.testing.assert_allclose(
        losses.proxy_anchor(*proxy_synthesis(None, x, y, p, alpha=0.4, mu=0)),
        losses.proxy_anchor(x, y, p),
        rtol=1e-6,
    )


def test_lambda_is_one_beta_draw_from_key():
    x, y, p = _problem()
    key = jax.random.key(3)
    drawn = proxy_synthesis(key, x, y, p, alpha=0.4, mu=1.0)
    explicit = proxy_synthesis(None, x, y, p, alpha=0.4, mu=1.0, lam=jax.random.beta(key, 0.4, 0.4))
    for a, b in zip(drawn, explicit):
        np.testing.assert_array_equal(a, b)
    other = proxy_synthesis(jax.random.key(4), x, y, p, alpha=0.4, mu=1.0)
    assert not np.allclose(other[0], drawn[0])


def test_jit_matches_eager_and_lam_can_be_traced():
    # (the Beta draw under jit is exercised by test_reorder_then_synthesis_in_one_jitted_step)
    x, y, p = _problem()
    ps = functools.partial(proxy_synthesis, None, alpha=0.4, mu=0.5)
    # λ as a traced argument, e.g. drawn elsewhere in a train step
    jitted = jax.jit(lambda x, p, lam: ps(x, y, p, lam=lam))
    for a, b in zip(jitted(x, p, 0.25), ps(x, y, p, lam=0.25)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base", ["norm_softmax", "proxy_nca"])
def test_check_grads_through_synthesis(base):
    # fwd and rev mode, w.r.t. embeddings, proxies and λ, in float64
    x, y, p = _problem(batch=6, classes=4, dim=5, seed=2)

    def loss_fn(x, p, lam):
        out = proxy_synthesis(None, x, y, p, alpha=0.4, mu=0.5, lam=lam)
        return BASE_LOSSES[base](*out, scale=4.0)

    with jax.enable_x64(True):
        args = (jnp.asarray(x, jnp.float64), jnp.asarray(p, jnp.float64), jnp.float64(0.35))
        mode = "rev" if base == "norm_softmax" else "fwd"
        check_grads(jax.jit(loss_fn), args, order=1, modes=[mode])


def test_bfloat16_inputs_give_finite_loss_and_gradients():
    x, y, p = _problem()

    def loss_fn(x, p):
        out = proxy_synthesis(None, x, y, p, alpha=0.4, mu=1.0, lam=0.3)
        assert out[0].dtype == jnp.bfloat16 and out[2].dtype == jnp.bfloat16
        return losses.norm_softmax(*out, scale=23.0)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        x.astype(jnp.bfloat16), p.astype(jnp.bfloat16)
    )
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_vmap_over_a_stack_of_batches():
    x, y, p = _problem()
    lams = jnp.asarray([0.2, 0.5, 0.9])
    xs = jnp.stack([x, 2 * x, -x])
    ps = functools.partial(proxy_synthesis, None, alpha=0.4, mu=0.5)
    out_x, out_y, _ = jax.vmap(lambda x, lam: ps(x, y, p, lam=lam))(xs, lams)
    assert out_x.shape == (3, 12, 16) and out_y.shape == (3, 12)
    np.testing.assert_allclose(out_x[2], ps(-x, y, p, lam=0.9)[0], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- bad input


def _raises_at_trace(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        jax.jit(fn).trace(*args)


def test_bad_input_raises_value_error_at_trace_time():
    x, y, p = _problem()
    key = jax.random.key(0)
    ps = functools.partial(proxy_synthesis, alpha=0.4, mu=1.0)
    _raises_at_trace("labels has 7 entries", ps, key, x, y[:7], p)
    _raises_at_trace("proxies have dim 15", ps, key, x, y, p[:, :15])
    _raises_at_trace("labels must be integers", ps, key, x, y.astype(jnp.float32), p)
    _raises_at_trace("embeddings must be \\[batch, dim\\]", ps, key, x[0], y, p)
    _raises_at_trace("embeddings must be a float", ps, key, y[:, None], y, p[:, :1])
    _raises_at_trace("proxies must be \\[num_classes, dim\\]", ps, key, x, y, p[0])
    # μ > 0 with ⌊B·μ⌋ = 0
    def ps_with(**kw):
        return lambda x: proxy_synthesis(kw.pop("key", key), x, y, p, **{"alpha": 0.4, **kw})

    _raises_at_trace("mu=0.1 with a batch of 8", ps_with(mu=0.1), x)
    _raises_at_trace("mu must lie in", ps_with(mu=1.5), x)
    _raises_at_trace("mu must be a Python float", ps_with(mu="half"), x)
    _raises_at_trace("key must be a PRNG key", ps_with(key=None, mu=1.0), x)
    _raises_at_trace("alpha must be > 0", ps_with(alpha=0.0, mu=1.0), x)
    _raises_at_trace("lam must be a scalar", ps_with(mu=1.0, lam=jnp.ones(2)), x)
    # mu fixes the output shape: a traced mu is refused
    _raises_at_trace(
        "mu must be a Python float", lambda m: proxy_synthesis(key, x, y, p, alpha=0.4, mu=m), 0.5
    )


def test_concrete_labels_with_equal_neighbours_raise():
    x, _, p = _problem()
    y = jnp.asarray([0, 0, 1, 2, 3, 4, 5, 1], jnp.int32)  # rows 0 and 1 share a class
    with pytest.raises(ValueError, match="labels: neighbouring samples 0 and 1 share label 0"):
        proxy_synthesis(None, x, y, p, alpha=0.4, mu=1.0, lam=0.5)
    # only the kept synthetic rows matter: with mu = 1/8 only row 0 (mixing 7 and 0) is made
    proxy_synthesis(None, x, y, p, alpha=0.4, mu=0.125, lam=0.5)
    # ... and the reordered batch passes
    perm = distinct_neighbours(y, jax.random.key(0))
    proxy_synthesis(None, x[perm], y[perm], p, alpha=0.4, mu=1.0, lam=0.5)
    # when no order with distinct neighbours exists, synthesis proceeds (as the official loop)
    same = jnp.asarray([0, 0, 0, 0, 0, 1, 2, 3], jnp.int32)
    proxy_synthesis(None, x, same, p, alpha=0.4, mu=1.0, lam=0.5)


# ----------------------------------------------------------------- distinct_neighbours

_distinct_jit = jax.jit(distinct_neighbours)


def _cyclic_distinct(y):
    return bool(np.all(y != np.roll(y, -1)))


def _feasible(y):
    return np.unique(y, return_counts=True)[1].max() <= len(y) // 2


@settings(max_examples=100, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=13),
    seed=st.integers(0, 2**31 - 1),
)
def test_distinct_neighbours_property(labels, seed):
    y = np.asarray(labels, np.int32)
    perm = np.asarray(_distinct_jit(jnp.asarray(y), jax.random.key(seed)))
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(np.sort(perm), np.arange(len(y)))
    assert _cyclic_distinct(y[perm]) == _feasible(y)


def _partitions(n, largest=None):
    """All partitions of n into positive parts, largest first."""
    largest = n if largest is None else largest
    if n == 0:
        yield ()
        return
    for part in range(min(n, largest), 0, -1):
        for rest in _partitions(n - part, part):
            yield (part,) + rest


def test_distinct_neighbours_every_count_pattern():
    # Every multiset of labels of each batch size up to 13, up to renaming: the count patterns
    # are the partitions of the batch size. Each is tried in shuffled input orders and keys.
    for batch in range(1, 14):
        rng = np.random.RandomState(batch)
        rows = []
        for counts in _partitions(batch):
            for _ in range(3):
                y = np.repeat(rng.permutation(100)[: len(counts)], counts)
                rows.append(rng.permutation(y))
        for seed, y in enumerate(rows):
            # the same compiled function as the property test: one compilation per batch size
            perm = np.asarray(_distinct_jit(jnp.asarray(y, jnp.int32), jax.random.key(seed)))
            np.testing.assert_array_equal(np.sort(perm), np.arange(batch))
            assert _cyclic_distinct(y[perm]) == _feasible(y), (y, perm)


def test_distinct_neighbours_is_random_and_deterministic_per_key():
    y = jnp.asarray(np.repeat(np.arange(8), 4), jnp.int32)
    a = distinct_neighbours(y, jax.random.key(0))
    np.testing.assert_array_equal(a, distinct_neighbours(y, jax.random.key(0)))
    perms = {tuple(np.asarray(distinct_neighbours(y, jax.random.key(s)))) for s in range(20)}
    assert len(perms) == 20
    # every position sees many classes across keys: no class is pinned to the front
    firsts = {int(y[np.asarray(distinct_neighbours(y, jax.random.key(s)))[0]]) for s in range(40)}
    assert len(firsts) >= 5


def test_distinct_neighbours_bad_input():
    with pytest.raises(ValueError, match="labels must be integers"):
        distinct_neighbours(jnp.zeros(4), jax.random.key(0))
    with pytest.raises(ValueError, match="labels must be \\[batch\\]"):
        distinct_neighbours(jnp.zeros((2, 2), jnp.int32), jax.random.key(0))


def test_reorder_then_synthesis_in_one_jitted_step():
    rng = np.random.RandomState(0)
    y = jnp.asarray(np.repeat(np.arange(4), 3), jnp.int32)  # grouped by class, as a sampler yields
    x = jnp.asarray(rng.randn(12, 8), jnp.float32)
    p = jnp.asarray(rng.randn(4, 8), jnp.float32)

    @jax.jit
    def step(key, x, y, p):
        k_perm, k_ps = jax.random.split(key)
        perm = distinct_neighbours(y, k_perm)
        x, y = x[perm], y[perm]
        out = proxy_synthesis(k_ps, x, y, p, alpha=0.4, mu=1.0)
        return y, losses.norm_softmax(*out, scale=23.0)

    y_perm, loss = step(jax.random.key(0), x, y, p)
    assert _cyclic_distinct(np.asarray(y_perm)) and np.isfinite(float(loss))


# ------------------------------------------------------- the padded last batch of an epoch


def _padded_batch(real, batch, c=6, d=5, seed=0):
    """``real`` rows (neighbouring labels distinct, cyclically) padded with junk to ``batch``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, d)).astype(np.float32)
    y = np.concatenate([np.arange(real) % c, rng.integers(0, c, batch - real)]).astype(np.int32)
    if real % c == 1:  # row 0 and row real−1 would share class 0
        y[real - 1] = (y[real - 2] + 1) % c if y[real - 2] != 1 else 2
    p = rng.normal(size=(c, d)).astype(np.float32)
    return x, y, p, np.arange(batch) < real


@pytest.mark.parametrize("base", ["norm_softmax", "proxy_nca"])
@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_masked_synthesis_of_a_padded_batch_equals_the_unpadded_batch(base, mu):
    """b = 5 real rows of B = 8: ⌊5·μ⌋ synthetic classes, row 0 mixing with row 4 (the last
    real row), the loss the mean over the real and synthetic rows: value and gradients equal
    proxy_synthesis + loss on the [5, D] batch, as the official code runs torch's partial
    batch; padded rows get no gradient."""
    x, y, p, mask = _padded_batch(5, 8)
    fn = BASE_LOSSES[base]

    def plain(x_, p_):
        e, yy, pp = proxy_synthesis(None, x_, jnp.asarray(y[:5]), p_, alpha=0.4, mu=mu, lam=0.3)
        return fn(e, yy, pp, scale=10.0)

    def padded(x_, p_):
        e, yy, pp, smask, pmask = masked_proxy_synthesis(
            None, x_, jnp.asarray(y), p_, jnp.asarray(mask), alpha=0.4, mu=mu, lam=0.3)
        return fn(e, yy, pp, scale=10.0, sample_mask=smask, proxy_mask=pmask)

    want, (gx, gp) = jax.value_and_grad(plain, argnums=(0, 1))(jnp.asarray(x[:5]), jnp.asarray(p))
    got, (gxp, gpp) = jax.jit(jax.value_and_grad(padded, argnums=(0, 1)))(
        jnp.asarray(x), jnp.asarray(p))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(gxp[:5], gx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpp, gp, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(gxp[5:]))


def test_masked_synthesis_counts_and_masks():
    """Static shapes [B+⌊B·μ⌋]; the first ⌊b·μ⌋ synthetic slots valid; padded rows masked and
    their labels made 0; a zero padded row keeps the gradients finite."""
    x, y, p, mask = _padded_batch(5, 8)
    x[6] = 0.0
    y[5:] = -1
    e, yy, pp, smask, pmask = masked_proxy_synthesis(
        None, x, y, p, mask, alpha=0.4, mu=0.5, lam=0.7)
    assert e.shape == (12, 5) and yy.shape == (12,) and pp.shape == (10, 5)
    assert np.asarray(smask).tolist() == [True] * 5 + [False] * 3 + [True, True, False, False]
    assert np.asarray(pmask).tolist() == [True] * 6 + [True, True, False, False]
    assert np.asarray(yy).tolist() == y[:5].tolist() + [0, 0, 0, 6, 7, 8, 9]
    grads = jax.grad(lambda x_: losses.norm_softmax(
        *masked_proxy_synthesis(None, x_, y, p, mask, alpha=0.4, mu=0.5, lam=0.7)[:3],
        scale=10.0, sample_mask=smask, proxy_mask=pmask))(jnp.asarray(x))
    assert np.all(np.isfinite(grads))


def test_masked_synthesis_of_a_full_batch_equals_proxy_synthesis():
    x, y, p, mask = _padded_batch(8, 8)
    e, yy, pp = proxy_synthesis(None, x, y, p, alpha=0.4, mu=1.0, lam=0.6)
    e2, yy2, pp2, smask, pmask = masked_proxy_synthesis(None, x, y, p, mask, alpha=0.4, mu=1.0,
                                                        lam=0.6)
    np.testing.assert_allclose(e2, e, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pp2, pp, rtol=1e-6, atol=1e-7)
    assert np.array_equal(yy2, yy) and np.all(smask) and np.all(pmask)


def test_distinct_neighbours_with_all_rows_real_is_the_unmasked_order():
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 4, 12), jnp.int32)
    for seed in range(4):
        key = jax.random.PRNGKey(seed)
        assert np.array_equal(distinct_neighbours(labels, key),
                              distinct_neighbours(labels, key, jnp.ones(12, bool)))


@pytest.mark.parametrize("real", [3, 5, 8, 11])
def test_distinct_neighbours_of_a_padded_batch_orders_the_real_rows_first(real):
    """The official loop reorders torch's partial batch: here its b real rows come first, in
    an order whose cyclic neighbours (over the b rows) differ; the padded rows follow."""
    rng = np.random.default_rng(real)
    batch = 12
    labels = rng.integers(0, 3, batch).astype(np.int32)
    labels[:real] = np.arange(real) % 3
    if real % 3 == 1:
        labels[real - 1] = 1
    mask = np.arange(batch) < real
    order = jax.jit(distinct_neighbours)(jnp.asarray(labels), jax.random.PRNGKey(0),
                                         jnp.asarray(mask))
    order = np.asarray(order)
    assert sorted(order[:real].tolist()) == list(range(real))
    assert sorted(order[real:].tolist()) == list(range(real, batch))
    y = labels[order[:real]]
    assert np.all(y != np.roll(y, 1)), y


def test_neighbour_swaps_is_the_official_reorder():
    """300 label batches (B 1..39, few classes, so many neighbours collide) reordered by the
    official loop: its lines of ``main.py`` (navervision/proxy-synthesis @20dfe49, the
    ``ps_mu > 0`` block and ``swap_idx``) run unchanged under torch in a scratch folder on
    ``input = arange(B)``, whose final order is the permutation stored in
    ``fixtures/ps_swaps_official.npz`` (labels from ``default_rng(0)``)."""
    f = np.load(pathlib.Path(__file__).parent.parent / "fixtures" / "ps_swaps_official.npz")
    bounds = np.cumsum(f["sizes"])[:-1]
    swaps = jax.jit(neighbour_swaps)
    unresolved = 0
    for labels, order in zip(np.split(f["labels"], bounds), np.split(f["orders"], bounds)):
        got = np.asarray(swaps(jnp.asarray(labels)))
        np.testing.assert_array_equal(got, order)
        ordered = labels[got]
        unresolved += int(np.any(ordered == np.roll(ordered, -1))) if len(labels) > 1 else 0
    assert 0 < unresolved < len(f["sizes"])  # the fixture holds both outcomes


def test_neighbour_swaps_keeps_an_order_that_needs_no_swap():
    labels = jnp.asarray([3, 1, 3, 2, 0, 1])
    np.testing.assert_array_equal(neighbour_swaps(labels), np.arange(6))
    assert neighbour_swaps(jnp.zeros((0,), jnp.int32)).shape == (0,)


def test_neighbour_swaps_of_a_padded_batch_is_that_of_its_real_rows():
    # The official loop reorders torch's partial batch of b rows; padding stays last.
    f = np.load(pathlib.Path(__file__).parent.parent / "fixtures" / "ps_swaps_official.npz")
    bounds = np.cumsum(f["sizes"])[:-1]
    swaps = jax.jit(lambda y, m: neighbour_swaps(y, sample_mask=m))
    for labels, order in list(zip(np.split(f["labels"], bounds), np.split(f["orders"], bounds)))[:40]:
        b = len(labels)
        padded = np.concatenate([labels, np.full(7, -1, np.int32)])
        mask = np.arange(b + 7) < b
        got = np.asarray(swaps(jnp.asarray(padded), jnp.asarray(mask)))
        np.testing.assert_array_equal(got[:b], order)
        np.testing.assert_array_equal(got[b:], np.arange(b, b + 7))
