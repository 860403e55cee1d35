"""Tests of MemVir as carried state (proxy_jax.regularizers.memvir).

Fixtures ``tests/fixtures/memvir_{norm_softmax,proxy_nca}.npz`` hold numbers computed by
the official navervision/MemVir code (``loss/memvir.py`` ``MemVir`` with
``loss/softmax_variants.py`` ``NormSoftmax`` (s=23) / ``ProxyNCA`` (s=12)) on CPU in float64,
in the call order of the official ``main.py`` (get_memory, put_memory(l2-normalized
output), criterion): N=3, M=2, warm_epoch=1, 4 steps per epoch, 40 steps (4 warm-up steps,
then 36 with memory), B=4, C=5, D=8, fresh seeded float32-valued embeddings every step and
proxies updated by SGD (lr 2) on the official gradient. Stored per step: raw embeddings z
(the loss saw F.normalize(z)), labels, proxies ([C, D], before the step's update), whether
the step is past warm-up, the loss, its gradients w.r.t. z and the proxies, and the
number of virtual steps the official code selected. Script: a scratch file outside the
repository (``make_fixtures.py``), not part of proxy_jax.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxy_jax.losses import l2_normalize, norm_softmax, proxy_anchor, proxy_nca
from proxy_jax.regularizers.memvir import (
    MemVirState,
    memvir_init,
    memvir_norm_softmax,
    memvir_proxy_nca,
    memvir_push,
    memvir_virtual,
)

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
BASE = {"norm_softmax": norm_softmax, "proxy_nca": proxy_nca}
FUSED = {"norm_softmax": memvir_norm_softmax, "proxy_nca": memvir_proxy_nca}


def _generic(name, scale):
    def loss(state, x, y, p):
        all_x, all_y, all_p, smask, pmask = memvir_virtual(state, x, y, p)
        return BASE[name](all_x, all_y, all_p, scale=scale, sample_mask=smask, proxy_mask=pmask)

    return loss


def _fused(name, scale):
    return lambda state, x, y, p: FUSED[name](state, x, y, p, scale=scale)


def _init(name_or_none, scale, **kwargs):
    """memvir_init, with the partial-logsumexp cache for ``name_or_none`` if given."""
    if name_or_none is None:
        return memvir_init(**kwargs)
    return memvir_init(**kwargs, cache_loss=name_or_none, cache_scale=scale)


def _random_state(seed, *, num_steps, step_gap, b, c, d, size, dtype=jnp.float32):
    """A memory with random contents and ``size`` filled slots (NumPy draws: no compiles)."""
    state = memvir_init(
        num_steps=num_steps, step_gap=step_gap, batch_size=b, num_classes=c, dim=d, dtype=dtype
    )
    rng = np.random.default_rng(seed)
    return state.replace(
        embeddings=jnp.asarray(rng.normal(size=state.embeddings.shape), dtype),
        proxies=jnp.asarray(rng.normal(size=state.proxies.shape), dtype),
        labels=jnp.asarray(rng.integers(0, c, state.labels.shape), jnp.int32),
        head=jnp.int32(size % state.capacity),
        size=jnp.int32(size),
    )


def _inputs(seed, b, c, d):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        jnp.asarray(rng.integers(0, c, (b,)), jnp.int32),
        jnp.asarray(rng.normal(size=(c, d)), jnp.float32),
    )


def _assert_close_to_largest(actual, expected, tol, what):
    """max |actual − expected| <= tol · max |expected| (relative to the largest entry)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.max(np.abs(actual - expected))
    assert err <= tol * np.max(np.abs(expected)), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("path", ["generic", "fused", "fused_cached"])
@pytest.mark.parametrize("name", ["norm_softmax", "proxy_nca"])
def test_matches_official_memvir_over_40_steps(name, path):
    ref = np.load(FIXTURES / f"memvir_{name}.npz")
    steps, b, d = ref["embeddings"].shape
    c = ref["proxies"].shape[1]
    scale = float(ref["scale"])
    loss_fn = (_generic if path == "generic" else _fused)(name, scale)

    @jax.jit
    def step(state, z, y, p, active):
        # Read before pushing; push what the official code pushes: the normalized output.
        loss, grads = jax.value_and_grad(loss_fn, argnums=(1, 3))(state, z, y, p)
        num_virtual = jnp.sum(memvir_virtual(state, z, y, p)[3][b:]) // b
        return loss, grads, num_virtual, memvir_push(state, l2_normalize(z), y, p, active=active)

    state = _init(
        name if path == "fused_cached" else None, scale,
        num_steps=int(ref["num_steps"]), step_gap=int(ref["step_gap"]),
        batch_size=b, num_classes=c, dim=d,
    )
    assert 30 <= int(ref["active"].sum())
    for t in range(steps):
        loss, (grad_z, grad_p), num_virtual, state = step(
            state,
            jnp.asarray(ref["embeddings"][t], jnp.float32),
            jnp.asarray(ref["labels"][t]),
            jnp.asarray(ref["proxies"][t], jnp.float32),
            jnp.asarray(ref["active"][t]),
        )
        assert int(num_virtual) == ref["num_virtual"][t], t
        np.testing.assert_allclose(float(loss), ref["loss"][t], rtol=1e-5, err_msg=f"step {t}")
        _assert_close_to_largest(grad_z, ref["grad_embeddings"][t], 1e-5, f"d/dz step {t}")
        _assert_close_to_largest(grad_p, ref["grad_proxies"][t], 1e-5, f"d/dproxies step {t}")


def test_virtual_steps_ages_offsets_and_growth():
    """N=3, M=2: virtual steps t−3, t−6, t−9 (most recent first), count 0,1,2,3 for
    t < 3, 3–5, 6–8, ≥ 9; block k has labels offset by k·C and the proxies of its step.
    Every pushed step is tagged by its index, through the ring buffer's wrap-around."""
    n, m, b, c, d = 3, 2, 2, 4, 3
    state = memvir_init(num_steps=n, step_gap=m, batch_size=b, num_classes=c, dim=d)
    virtual, push = jax.jit(memvir_virtual), jax.jit(memvir_push)

    def step_data(t):
        return (
            jnp.full((b, d), float(t)),
            (jnp.arange(b, dtype=jnp.int32) + t) % c,
            jnp.full((c, d), 100.0 + t),
        )

    for t in range(25):
        x, y, p = step_data(t)
        all_x, all_y, all_p, smask, pmask = virtual(state, x, y, p)
        assert all_x.shape == (b + n * b, d) and all_p.shape == (c + n * c, d)
        expected_count = min(t // (m + 1), n)
        np.testing.assert_array_equal(smask, np.repeat(np.arange(n + 1) <= expected_count, b))
        np.testing.assert_array_equal(pmask, np.repeat(np.arange(n + 1) <= expected_count, c))
        np.testing.assert_array_equal(all_x[:b], x)
        np.testing.assert_array_equal(all_y[:b], y)
        np.testing.assert_array_equal(all_p[:c], p)
        for k in range(1, expected_count + 1):
            past_x, past_y, past_p = step_data(t - k * (m + 1))
            np.testing.assert_array_equal(all_x[k * b:(k + 1) * b], past_x)
            np.testing.assert_array_equal(all_y[k * b:(k + 1) * b], past_y + k * c)
            np.testing.assert_array_equal(all_p[k * c:(k + 1) * c], past_p)
        state = push(state, x, y, p)
    assert int(state.size) == state.capacity == n * (m + 1)


@pytest.mark.parametrize("name", ["norm_softmax", "proxy_nca", "proxy_anchor"])
def test_empty_or_inactive_memory_equals_base_loss(name):
    b, c, d = 6, 5, 4
    x, y, p = _inputs(0, b, c, d)
    empty = memvir_init(num_steps=2, step_gap=1, batch_size=b, num_classes=c, dim=d)
    # Warm-up: pushes with active=False (a Python bool, then a traced bool) change nothing.
    inactive = memvir_push(empty, x * 2.0, y, p + 1.0, active=False)
    inactive = jax.jit(memvir_push)(inactive, x, y, p, jnp.asarray(False))
    for a, e in zip(jax.tree_util.tree_leaves(inactive), jax.tree_util.tree_leaves(empty)):
        np.testing.assert_array_equal(a, e)

    base = {"norm_softmax": lambda *a, **k: norm_softmax(*a, scale=23.0, **k),
            "proxy_nca": lambda *a, **k: proxy_nca(*a, scale=12.0, **k),
            "proxy_anchor": proxy_anchor}[name]

    def with_memory(state, x, p):
        all_x, all_y, all_p, smask, pmask = memvir_virtual(state, x, y, p)
        return base(all_x, all_y, all_p, sample_mask=smask, proxy_mask=pmask)

    plain_fn = jax.jit(jax.value_and_grad(lambda x, p: base(x, y, p), argnums=(0, 1)))
    plain, plain_grads = plain_fn(x, p)
    candidates = [jax.jit(jax.value_and_grad(with_memory, argnums=(1, 2)))]
    if name in FUSED:
        scale = 23.0 if name == "norm_softmax" else 12.0
        candidates.append(jax.jit(jax.value_and_grad(
            lambda s, x, p: FUSED[name](s, x, y, p, scale=scale), argnums=(1, 2))))
    for fn in candidates:
        loss, grads = fn(inactive, x, p)
        np.testing.assert_allclose(loss, plain, rtol=1e-6)
        for g, pg in zip(grads, plain_grads):
            _assert_close_to_largest(g, pg, 1e-6, "gradient")


@pytest.mark.parametrize(
    "name, dtype",
    [("norm_softmax", jnp.float32), ("proxy_nca", jnp.float32), ("norm_softmax", jnp.bfloat16)],
)
def test_fused_equals_generic(name, dtype):
    n, m, b, c, d = 3, 2, 8, 7, 16
    scale = 23.0 if name == "norm_softmax" else 12.0
    x, y, p = _inputs(1, b, c, d)
    generic = jax.jit(jax.value_and_grad(_generic(name, scale), argnums=(1, 3)))
    fused = jax.jit(jax.value_and_grad(_fused(name, scale), argnums=(1, 3)))
    # The fill level is data, not shape: one compilation serves every size, including a
    # full ring buffer that has wrapped around (size 9, head 5).
    for size, head in ((0, 0), (4, 4), (8, 8), (9, 5)):
        state = _random_state(size, num_steps=n, step_gap=m, b=b, c=c,
                              d=d, size=size, dtype=dtype).replace(head=jnp.int32(head))
        (loss_g, grads_g), (loss_f, grads_f) = generic(state, x, y, p), fused(state, x, y, p)
        assert np.isfinite(loss_f)
        np.testing.assert_allclose(loss_f, loss_g, rtol=1e-6)
        for gf, gg in zip(grads_f, grads_g):
            _assert_close_to_largest(gf, gg, 1e-5, "gradient")


@pytest.mark.parametrize(
    "name, num_steps, step_gap",
    # (Norm-SoftMax with N=3, M=2 is covered through the official fixture.)
    [("proxy_nca", 2, 3), ("norm_softmax", 1, 0)],
)
def test_cached_fused_equals_generic_through_pushes(name, num_steps, step_gap):
    """The cache, filled push by push (random warm-up gaps, ring wrap-around), gives the
    loss and gradients of the generic path at every step."""
    b, c, d = 5, 4, 6
    scale = 23.0 if name == "norm_softmax" else 12.0
    state = _init(name, scale, num_steps=num_steps, step_gap=step_gap, batch_size=b,
                  num_classes=c, dim=d)
    generic = jax.jit(jax.value_and_grad(_generic(name, scale), argnums=(1, 3)))
    fused = jax.jit(jax.value_and_grad(_fused(name, scale), argnums=(1, 3)))
    push = jax.jit(memvir_push)
    rng = np.random.default_rng(num_steps)
    for t in range(3 * state.capacity + 3):
        x, y, p = _inputs(1000 + t, b, c, d)
        (loss_g, grads_g), (loss_f, grads_f) = generic(state, x, y, p), fused(state, x, y, p)
        np.testing.assert_allclose(loss_f, loss_g, rtol=2e-6, err_msg=f"step {t}")
        for gf, gg in zip(grads_f, grads_g):
            _assert_close_to_largest(gf, gg, 1e-5, f"gradient at step {t}")
        state = push(state, x, y, p, jnp.asarray(rng.random() > 0.2))
    assert int(state.size) == state.capacity


def test_memory_carries_no_gradient():
    n, m, b, c, d = 2, 1, 4, 3, 5
    state = _random_state(2, num_steps=n, step_gap=m, b=b, c=c, d=d, size=4)
    x, y, p = _inputs(3, b, c, d)

    def loss_of_memory(mem_x, mem_p, fn):
        return fn(state.replace(embeddings=mem_x, proxies=mem_p), x, y, p)

    for fn in (_generic("norm_softmax", 10.0), _fused("proxy_nca", 5.0)):
        grad = jax.jit(jax.grad(lambda mx, mp: loss_of_memory(mx, mp, fn), argnums=(0, 1)))
        g_x, g_p = grad(state.embeddings, state.proxies)
        assert not np.any(g_x) and not np.any(g_p)
    # What is pushed is detached too.
    g = jax.jit(jax.grad(lambda x: jnp.sum(memvir_push(state, x, y, p).embeddings)))(x)
    assert not np.any(g)


def test_state_is_a_pytree_with_static_hyperparameters():
    state = memvir_init(num_steps=3, step_gap=2, batch_size=4, num_classes=5, dim=6,
                        dtype=jnp.bfloat16)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 5
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, MemVirState) and (rebuilt.num_steps, rebuilt.step_gap) == (3, 2)
    assert state.capacity == 9 and state.embeddings.dtype == jnp.bfloat16
    assert state.embeddings.shape == (9, 4, 6) and state.proxies.shape == (9, 5, 6)
    nbytes = sum(leaf.nbytes for leaf in leaves)
    assert nbytes == 9 * (4 * 6 + 5 * 6) * 2 + 9 * 4 * 4 + 2 * 4
    cached = memvir_init(num_steps=3, step_gap=2, batch_size=4, num_classes=5, dim=6,
                         cache_loss="proxy_nca", cache_scale=12.0)
    leaves, treedef = jax.tree_util.tree_flatten(cached)
    assert len(leaves) == 6 and cached.lse_cache.shape == (9, 4, 5)
    assert jax.tree_util.tree_unflatten(treedef, leaves).cache_scale == 12.0


def test_bad_input_raises_value_error():
    good = dict(num_steps=2, step_gap=1, batch_size=4, num_classes=3, dim=5)
    for key, bad in (("num_steps", 0), ("step_gap", -1), ("batch_size", 2.0), ("dim", True)):
        with pytest.raises(ValueError, match=key):
            memvir_init(**{**good, key: bad})
    with pytest.raises(ValueError, match="dtype"):
        memvir_init(**good, dtype=jnp.int32)
    state = memvir_init(**good)
    x, y, p = jnp.zeros((4, 5)), jnp.zeros((4,), jnp.int32), jnp.zeros((3, 5))
    for fn in (memvir_virtual, memvir_push,
               lambda *a: memvir_norm_softmax(*a, scale=1.0)):
        with pytest.raises(ValueError, match="embeddings"):
            fn(state, jnp.zeros((5, 5)), y, p)
        with pytest.raises(ValueError, match="labels"):
            fn(state, x, y.astype(jnp.float32), p)
        with pytest.raises(ValueError, match="proxies"):
            fn(state, x, y, jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="active"):
        memvir_push(state, x, y, p, active=jnp.ones((2,), bool))
    with pytest.raises(ValueError, match="state"):
        memvir_virtual({"embeddings": x}, x, y, p)
    with pytest.raises(ValueError, match="cache_loss"):
        memvir_init(**good, cache_loss="proxy_anchor", cache_scale=1.0)
    with pytest.raises(ValueError, match="cache_scale"):
        memvir_init(**good, cache_loss="norm_softmax")
    with pytest.raises(ValueError, match="cache_loss"):
        memvir_init(**good, cache_scale=3.0)
    cached = memvir_init(**good, cache_loss="norm_softmax", cache_scale=23.0)
    with pytest.raises(ValueError, match="cache"):
        memvir_norm_softmax(cached, x, y, p, scale=10.0)
    with pytest.raises(ValueError, match="cache"):
        memvir_proxy_nca(cached, x, y, p, scale=23.0)


def _queue_contents(state):
    """The memory oldest first, as the official queue: (rows [R, D], labels [R], sizes [L],
    proxies [size, C, D]) with the padded rows (label −1) of each step left out."""
    order = np.mod(int(state.head) - int(state.size) + np.arange(int(state.size)),
                   state.capacity)
    labels = np.asarray(state.labels)[order]
    keep = labels >= 0
    rows = np.asarray(state.embeddings)[order][keep]
    return rows, labels[keep], keep.sum(axis=1), np.asarray(state.proxies)[order]


@pytest.mark.parametrize("path", ["generic", "fused", "fused_cached"])
def test_padded_partial_batches_match_official_memvir(path):
    """Epochs whose last batch is partial, padded to B with a sample mask, against the
    official queue, which stores that batch's b < B rows.

    Fixture ``tests/fixtures/memvir_partial.npz``: the official navervision/MemVir
    ``loss/memvir.py`` ``MemVir`` and ``loss/softmax_variants.py`` ``NormSoftmax`` (s=23),
    run in a scratch folder outside the repository with torch in float64, in the call order
    of its ``main.py`` (get_memory, put_memory(normalized output), criterion): N=2, M=1,
    warm_epoch=0, 11 images, B=4, so each of 3 epochs has steps of 4, 4 and 3 images (torch's
    DataLoader without drop_last); C=5, D=6; fresh seeded float32-valued embeddings z each
    step, proxies updated by SGD (lr 2) on the official gradient. Stored per step, padded to
    B (label −1): z, labels, the real count, the proxies before the update, the loss, its
    gradients, and the queue after the push (rows of its entries concatenated, entry sizes,
    entry proxies).
    """
    ref = np.load(FIXTURES / "memvir_partial.npz")
    steps, b, d = ref["z"].shape
    c = ref["proxies"].shape[1]
    scale = float(ref["scale"])
    fused = path != "generic"

    def loss_fn(state, z, y, p, mask):
        if fused:
            return memvir_norm_softmax(state, z, y, p, scale=scale, sample_mask=mask)
        all_x, all_y, all_p, smask, pmask = memvir_virtual(state, z, y, p, mask)
        return norm_softmax(all_x, all_y, all_p, scale=scale, sample_mask=smask,
                            proxy_mask=pmask)

    @jax.jit
    def step(state, z, y, p, mask):
        loss, grads = jax.value_and_grad(loss_fn, argnums=(1, 3))(state, z, y, p, mask)
        return loss, grads, memvir_push(state, l2_normalize(z), y, p, sample_mask=mask)

    state = _init("norm_softmax" if path == "fused_cached" else None, scale,
                  num_steps=int(ref["num_steps"]), step_gap=int(ref["step_gap"]),
                  batch_size=b, num_classes=c, dim=d)
    assert sorted(set(ref["count"].tolist())) == [3, 4]
    for t in range(steps):
        mask = np.asarray(ref["labels"][t]) >= 0
        y = np.where(mask, ref["labels"][t], 0)  # the objective's safe label for padding
        loss, (grad_z, grad_p), state = step(
            state, jnp.asarray(ref["z"][t], jnp.float32), jnp.asarray(y, jnp.int32),
            jnp.asarray(ref["proxies"][t], jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(float(loss), ref["loss"][t], rtol=1e-5, err_msg=f"step {t}")
        _assert_close_to_largest(grad_z, ref["grad_z"][t], 1e-5, f"d/dz step {t}")
        assert not np.any(np.asarray(grad_z)[~mask]), t
        _assert_close_to_largest(grad_p, ref["grad_p"][t], 1e-5, f"d/dproxies step {t}")

        rows, labels, sizes, proxies = _queue_contents(state)
        size = int(state.size)
        np.testing.assert_array_equal(sizes, ref["mem_sizes"][t][:size], err_msg=f"step {t}")
        assert not ref["mem_sizes"][t][size:].any(), t
        total = int(sizes.sum())
        np.testing.assert_array_equal(labels, ref["mem_labels"][t][:total], err_msg=f"step {t}")
        np.testing.assert_allclose(rows, ref["mem_rows"][t][:total], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(proxies, ref["mem_proxies"][t][:size], rtol=1e-6, atol=1e-7)


def test_padded_call_equals_unpadded_memory_reads():
    """A memory holding a padded step reads as one that never saw the padded rows: the
    masked rows of memvir_virtual are exactly those of label −1."""
    state = memvir_init(num_steps=1, step_gap=0, batch_size=4, num_classes=3, dim=2)
    x, y, p = _inputs(0, 4, 3, 2)
    mask = jnp.array([True, True, True, False])
    state = memvir_push(state, x, y, p, sample_mask=mask)
    assert np.asarray(state.labels)[0].tolist()[3] == -1
    _, all_y, _, smask, pmask = memvir_virtual(state, x, y, p, mask)
    assert np.asarray(smask).tolist() == [True, True, True, False, True, True, True, False]
    assert np.asarray(all_y).min() >= 0 and np.asarray(pmask).all()
