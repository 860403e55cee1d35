"""proxy_jax.objective: registries, the regularizer chain and its declared compatibility,
Proxy Synthesis followed by MemVir, proxy init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxy_jax import config_utils, losses, regularizers
from proxy_jax.objective import LOSSES, init_proxies, make_objective

B, D, C = 8, 16, 6


def _config(loss="norm_softmax", regularizer="", **reg):
    c = config_utils.base_config()
    c.model.embedding_dim = D
    c.loss.name = loss
    c.regularizer.name = regularizer
    for k, v in reg.items():
        setattr(c.regularizer, k, v)
    return c


def _memvir(objective, *, jit=True):
    """``objective.loss_fn`` with MemVir's memory in and out instead of the ``extra`` dict."""
    def fn(e, y, p, memory, epoch=0, key=None):
        value, extra = objective.loss_fn(e, y, p, key=key, extra={"memvir": memory},
                                         epoch=epoch)
        return value, extra["memvir"]
    return jax.jit(fn) if jit else fn


def _inputs(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    emb = jax.random.normal(k1, (B, D))
    labels = jnp.array([0, 0, 1, 1, 2, 3, 4, 5], jnp.int32)
    proxies = jax.random.normal(k2, (C, D))
    return emb, labels, proxies


@pytest.mark.parametrize("loss", ["norm_softmax", "proxy_nca", "proxy_anchor"])
def test_plain_objective_is_the_base_loss(loss):
    emb, labels, proxies = _inputs()
    objective = make_objective(_config(loss), num_classes=C, global_batch_size=B)
    value, memory = jax.jit(lambda e, y, p: objective.loss_fn(
        e, y, p, key=jax.random.PRNGKey(1), extra={}, epoch=0))(emb, labels, proxies)
    spec = LOSSES[loss]
    expected = jax.jit(lambda e, y, p: spec.fn(e, y, p, **spec.kwargs(
        _config(loss).loss)))(emb, labels, proxies)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert memory == {}


@pytest.mark.parametrize("reorder", ["neighbour_swaps", "distinct_neighbours"])
def test_ps_objective_reorders_then_synthesizes(reorder):
    emb, labels, proxies = _inputs()
    config = _config("norm_softmax", "ps", ps_alpha=0.4, ps_mu=0.5, ps_reorder=reorder)
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    key = jax.random.PRNGKey(3)
    value, _ = jax.jit(lambda e, y, p: objective.loss_fn(e, y, p, key=key, extra={}, epoch=0))(
        emb, labels, proxies)

    @jax.jit
    def reference(emb, labels, proxies):
        key_order, key_lambda = jax.random.split(key)
        order = regularizers.PS_REORDERS[reorder](labels, key_order)
        e, y, p = regularizers.proxy_synthesis(key_lambda, emb[order], labels[order], proxies,
                                               alpha=0.4, mu=0.5)
        return (losses.norm_softmax(e, y, p, scale=23.0), labels[order], e.shape[0], p.shape[0],
                losses.norm_softmax(emb, labels, proxies, scale=23.0))
    expected, y, num_e, num_p, plain = reference(emb, labels, proxies)
    assert np.all(np.asarray(y) != np.roll(np.asarray(y), 1)), "neighbouring labels must differ"
    assert (int(num_e), int(num_p)) == (B + 4, C + 4)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    # The synthetic classes make it differ from the plain loss.
    assert abs(float(value) - float(plain)) > 1e-3


def test_unknown_ps_reorder_is_named():
    config = _config("norm_softmax", "ps", ps_reorder="sorted")
    with pytest.raises(ValueError, match="config.regularizer.ps_reorder must be one of"):
        make_objective(config, num_classes=C, global_batch_size=B)


def test_memvir_objective_reads_before_push_and_waits_for_warm_up():
    config = _config("proxy_nca", "memvir", memvir_num_steps=2, memvir_step_gap=0,
                     memvir_warm_epochs=1)
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    memory = objective.init_extra()["memvir"]
    fn = _memvir(objective)
    steps = [_inputs(seed) for seed in range(4)]
    # Epoch 0 is warm-up: nothing is pushed, the loss is the plain loss.
    e, y, p = steps[0]
    value, memory = fn(e, y, p, memory, 0)
    np.testing.assert_allclose(value, losses.proxy_nca(e, y, p, scale=23.0), rtol=1e-6)
    assert int(memory.size) == 0
    # Epoch 1: the first step reads an empty memory, then pushes.
    value, memory = fn(e, y, p, memory, 1)
    np.testing.assert_allclose(value, losses.proxy_nca(e, y, p, scale=23.0), rtol=1e-6)
    assert int(memory.size) == 1
    # The next step sees the previous step as virtual classes C..2C-1.
    e2, y2, p2 = steps[1]
    value, memory = fn(e2, y2, p2, memory, 1)
    expected = losses.proxy_nca(jnp.concatenate([e2, e]), jnp.concatenate([y2, y + C]),
                                jnp.concatenate([p2, p]), scale=23.0)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize("loss", ["norm_softmax", "proxy_nca"])
def test_fused_memvir_objective_equals_generic_path(loss):
    # N=2, M=1: the memory (4 slots) is full from step 5 on, and the later steps wrap the
    # ring. Step 0 is in the warm-up (epoch 0 < memvir_warm_epochs=1: nothing is pushed).
    config = _config(loss, "memvir", memvir_num_steps=2, memvir_step_gap=1,
                     memvir_warm_epochs=1)
    objectives = [make_objective(config, num_classes=C, global_batch_size=B,
                                 _fused_memvir=fused) for fused in (True, False)]
    memories = [o.init_extra()["memvir"] for o in objectives]
    assert memories[0].cache_loss == loss and memories[0].lse_cache is not None
    assert memories[1].cache_loss is None and memories[1].lse_cache is None

    def step_fn(objective):
        def step(e, y, p, memory, epoch):
            (value, memory), grads = jax.value_and_grad(
                lambda e, p: _memvir(objective, jit=False)(e, y, p, memory, epoch),
                argnums=(0, 1), has_aux=True)(e, p)
            return value, grads, memory
        return jax.jit(step)
    steps = [step_fn(o) for o in objectives]
    num_virtual = []
    for t in range(8):
        e, y, p = _inputs(seed=10 + t)
        epoch = 0 if t == 0 else 1
        num_virtual.append(int(memories[0].size) // 2)
        (fused_value, fused_grads, memories[0]), (value, grads, memories[1]) = (
            step(e, y, p, m, epoch) for step, m in zip(steps, memories))
        np.testing.assert_allclose(fused_value, value, rtol=1e-5, atol=1e-5)
        for g_fused, g in zip(fused_grads, grads):
            np.testing.assert_allclose(g_fused, g, rtol=1e-5, atol=1e-5)
        for name in ("embeddings", "labels", "proxies", "head", "size"):
            np.testing.assert_array_equal(getattr(memories[0], name), getattr(memories[1], name))
    # Virtual steps read (k valid once k(M+1) steps were pushed): none in the warm-up step
    # nor at the next two, then 1, then from step 5 both.
    assert num_virtual == [0, 0, 0, 1, 1, 2, 2, 2]
    # The memory really changed the loss: it differs from the plain base loss.
    e, y, p = _inputs(seed=99)
    value, _, _ = steps[0](e, y, p, memories[0], 1)
    spec = LOSSES[loss]
    plain = spec.fn(e, y, p, **spec.kwargs(config.loss))
    assert abs(float(value) - float(plain)) > 1e-3


def test_memvir_with_proxy_anchor_uses_the_generic_path():
    config = _config("proxy_anchor", "memvir", memvir_num_steps=1, memvir_step_gap=0)
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    memory = objective.init_extra()["memvir"]
    assert memory.cache_loss is None and memory.lse_cache is None
    step = _memvir(objective)
    e, y, p = _inputs()
    _, memory = step(e, y, p, memory)
    e2, y2, p2 = _inputs(seed=1)
    value, _ = step(e2, y2, p2, memory)
    hp = LOSSES["proxy_anchor"].kwargs(config.loss)
    expected = losses.proxy_anchor(jnp.concatenate([e2, e]), jnp.concatenate([y2, y + C]),
                                   jnp.concatenate([p2, p]), **hp)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_memvir_gradient_does_not_flow_into_memory():
    config = _config("norm_softmax", "memvir", memvir_num_steps=1, memvir_step_gap=0)
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    e, y, p = _inputs()
    step = _memvir(objective)
    _, memory = step(e, y, p, objective.init_extra()["memvir"])

    def total(mem_embeddings, mem_proxies):
        m = memory.replace(embeddings=mem_embeddings, proxies=mem_proxies)
        return _memvir(objective, jit=False)(e, y, p, m)[0]
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(memory.embeddings, memory.proxies)
    # The pushed embeddings and proxies are constants of later steps.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_ee_objective_matches_expansion_plus_hphn():
    config = _config("hphn_triplet", "ee", ee_num_inner=2)
    config.loss.margin = 0.2
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    emb, _, _ = _inputs()
    emb = losses.l2_normalize(emb)
    labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32)
    objective.check_batch(np.asarray(labels))
    value, _ = jax.jit(lambda e, y: objective.loss_fn(e, y, None, key=None, extra={},
                                                      epoch=0))(emb, labels)

    @jax.jit
    def reference(emb, labels):
        e, y = regularizers.embedding_expansion(emb, labels, num_inner=2)
        return losses.hphn_triplet(e, y, margin=0.2, num_original=B)
    np.testing.assert_allclose(value, reference(emb, labels), rtol=1e-6)
    with pytest.raises(ValueError, match="rows 4 and 5"):
        objective.check_batch(np.array([0, 0, 1, 1, 2, 3, 4, 4]))


@pytest.mark.parametrize("tie_gradient", ["each", "split"])
def test_ee_objective_takes_the_tie_rule_from_the_config(tie_gradient):
    config = _config("hphn_triplet", "ee", ee_num_inner=2)
    config.loss.margin = 0.2
    config.loss.tie_gradient = tie_gradient
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    emb = losses.l2_normalize(_inputs()[0])
    labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32)
    grad = jax.jit(jax.grad(lambda e: objective.loss_fn(e, labels, None, key=None, extra={},
                                                         epoch=0)[0]))(emb)

    def reference(emb):
        e, y = regularizers.embedding_expansion(emb, labels, num_inner=2)
        return losses.hphn_triplet(e, y, margin=0.2, num_original=B, tie_gradient=tie_gradient)
    np.testing.assert_allclose(grad, jax.jit(jax.grad(reference))(emb), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss, regularizer, message", [
    ("arcface", "", "config.loss.name must be one of"),
    ("norm_softmax", "dropout", "'dropout' is not a regularizer; known"),
    ("norm_softmax", "ps+ps", "names a regularizer twice"),
    ("hphn_triplet", "ps", "regularizer 'ps' needs a proxy loss, but loss 'hphn_triplet' has none"),
    ("hphn_triplet", "memvir", "regularizer 'memvir' needs a proxy loss"),
    ("proxy_anchor", "ee", "loss 'proxy_anchor' cannot take the expanded points that "
                           "regularizer 'ee' produces"),
    ("norm_softmax", "memvir+ps", "regularizer 'ps' cannot follow 'memvir': it does not take "
                                  "the masked"),
    ("soft_triple", "ps", "regularizer 'ps' needs one proxy row per class, but loss "
                          "'soft_triple' has several"),
    ("soft_triple", "memvir", "needs one proxy row per class"),
])
def test_bad_names_and_combinations_raise(loss, regularizer, message):
    with pytest.raises(ValueError, match=message):
        make_objective(_config(loss, regularizer), num_classes=C, global_batch_size=B)


def test_soft_triple_objective_has_k_centres_per_class():
    config = _config("soft_triple")
    config.loss.centers_per_class = 3
    objective = make_objective(config, num_classes=C, global_batch_size=B)
    assert objective.uses_proxies and objective.num_proxy_rows == 3 * C
    emb, labels, _ = _inputs()
    centres = jax.random.normal(jax.random.PRNGKey(5), (3 * C, D))
    value, _ = objective.loss_fn(emb, labels, centres, key=None, extra={}, epoch=0)
    expected = losses.soft_triple(emb, labels, centres, centers_per_class=3, la=20.0,
                                  gamma=0.1, tau=0.2, margin=0.01)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    # With one centre per class it composes with PS and MemVir like any proxy loss.
    config.loss.centers_per_class = 1
    config.regularizer.name = "ps+memvir"
    make_objective(config, num_classes=C, global_batch_size=B)


def test_ps_then_memvir_synthetic_classes_stay_out_of_the_memory():
    """'ps+memvir': the loss of a step sees the real batch, PS's synthetic classes and the
    memory's virtual classes; the memory holds only real steps, as MemVir alone would."""
    config = _config("norm_softmax", "ps+memvir", memvir_num_steps=1, memvir_step_gap=0)
    chained = make_objective(config, num_classes=C, global_batch_size=B)
    alone = make_objective(_config("norm_softmax", "memvir", memvir_num_steps=1,
                                   memvir_step_gap=0), num_classes=C, global_batch_size=B)
    memory = chained.init_extra()["memvir"]
    assert memory.cache_loss is None  # not alone: the generic path
    assert alone.init_extra()["memvir"].cache_loss == "norm_softmax"
    key1, key2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    (e, y, p), (e2, y2, p2) = _inputs(0), _inputs(1)
    step = _memvir(chained)
    _, memory = step(e, y, p, memory, key=key1)
    # What was pushed: the real (PS-normalized, reordered) batch and the real proxies, no
    # synthetic class.
    assert int(memory.size) == 1 and memory.embeddings.shape[1:] == (B, D)
    order = regularizers.neighbour_swaps(y)  # the default reorder
    np.testing.assert_array_equal(memory.labels[0], y[order])
    np.testing.assert_allclose(memory.proxies[0], losses.l2_normalize(p), rtol=1e-6)
    assert int(memory.labels.max()) < C

    value, _ = step(e2, y2, p2, memory, key=key2)
    # Reference: PS on this step, then the previous step appended as virtual classes
    # (labels shifted past the real and synthetic ones).
    k_order, k_lambda = jax.random.split(key2)
    o2 = regularizers.neighbour_swaps(y2)
    ps_e, ps_y, ps_p = regularizers.proxy_synthesis(k_lambda, e2[o2], y2[o2], p2, alpha=0.4,
                                                    mu=1.0)
    num_syn = ps_p.shape[0] - C
    virtual_y = memory.labels[0] + C + num_syn
    expected = losses.norm_softmax(jnp.concatenate([ps_e, memory.embeddings[0]]),
                                   jnp.concatenate([ps_y, virtual_y]),
                                   jnp.concatenate([ps_p, memory.proxies[0]]), scale=23.0)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_ps_with_too_small_batch_raises():
    with pytest.raises(ValueError, match="ps_mu"):
        make_objective(_config("norm_softmax", "ps", ps_mu=0.1), num_classes=C,
                       global_batch_size=8)


@pytest.mark.parametrize("init, fan, expected_std", [
    ("kaiming_uniform", "dim", 1 / math.sqrt(3 * 64)),
    ("kaiming_uniform", "classes", 1 / math.sqrt(3 * 500)),
    ("kaiming_normal", "dim", math.sqrt(2 / 64)),
    ("kaiming_normal", "classes", math.sqrt(2 / 500)),
])
def test_proxy_init_matches_pytorch_statistics(init, fan, expected_std):
    p = np.asarray(init_proxies(jax.random.PRNGKey(0), num_rows=500, dim=64, init=init,
                                fan=fan))
    assert p.shape == (500, 64) and p.dtype == np.float32
    np.testing.assert_allclose(p.std(), expected_std, rtol=0.02)
    if init == "kaiming_uniform":
        assert np.abs(p).max() <= math.sqrt(3) * expected_std + 1e-7


def test_proxy_init_bad_names():
    with pytest.raises(ValueError, match="init must be"):
        init_proxies(jax.random.PRNGKey(0), num_rows=3, dim=4, init="xavier", fan="dim")
    with pytest.raises(ValueError, match="fan must be"):
        init_proxies(jax.random.PRNGKey(0), num_rows=3, dim=4, init="kaiming_normal", fan="x")


# ------------------------------------------------- the padded last batch (data.drop_last=False)

REAL = 5  # real rows of the padded batch of B = 8


def _padded_inputs(seed=0, junk_seed=1):
    """The first REAL rows of _inputs (labels with distinct cyclic neighbours), padded to B
    with junk embeddings and label -1, as the loader pads the last batch; and the mask."""
    emb, _, proxies = _inputs(seed)
    labels = jnp.array([0, 1, 2, 3, 4, -1, -1, -1], jnp.int32)
    junk = jax.random.normal(jax.random.PRNGKey(junk_seed), (B - REAL, D))
    emb = emb.at[REAL:].set(junk)
    return emb, labels, proxies, jnp.arange(B) < REAL


def _padded_config(loss="norm_softmax", regularizer="", **reg):
    c = _config(loss, regularizer, **reg)
    c.data.drop_last = False
    return c


@pytest.mark.parametrize("loss", ["norm_softmax", "proxy_nca", "soft_triple"])
def test_padded_step_equals_the_unpadded_partial_batch(loss):
    """Loss and gradients of a padded batch equal those of its REAL rows alone (the
    official step on torch's partial batch); padded rows get no gradient."""
    emb, labels, proxies, mask = _padded_inputs()
    config = _padded_config(loss)
    rows = C * config.loss.centers_per_class if loss == "soft_triple" else C
    proxies = jax.random.normal(jax.random.PRNGKey(5), (rows, D))
    padded = make_objective(config, num_classes=C, global_batch_size=B)
    plain = make_objective(_config(loss), num_classes=C, global_batch_size=REAL)
    key = jax.random.PRNGKey(2)

    def f_padded(e, p):
        return padded.loss_fn(e, labels, p, key=key, extra={}, epoch=0, sample_mask=mask)[0]

    def f_plain(e, p):
        return plain.loss_fn(e, labels[:REAL], p, key=key, extra={}, epoch=0)[0]

    got, (ge, gp) = jax.jit(jax.value_and_grad(f_padded, argnums=(0, 1)))(emb, proxies)
    want, (we, wp) = jax.jit(jax.value_and_grad(f_plain, argnums=(0, 1)))(emb[:REAL], proxies)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(ge[:REAL], we, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gp, wp, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(ge[REAL:]))


@pytest.mark.parametrize("mu", [1.0, 0.5])
@pytest.mark.parametrize("reorder", ["neighbour_swaps", "distinct_neighbours"])
def test_padded_ps_step_equals_synthesis_of_the_real_rows(mu, reorder):
    """PS on a padded batch: the real rows reordered among themselves (distinct cyclic
    neighbours), ⌊b·μ⌋ synthetic classes of them only, the mean over b + ⌊b·μ⌋ rows; equal
    (value and gradients) to proxy_synthesis of the unpadded b rows in that order."""
    emb, labels, proxies, mask = _padded_inputs()
    objective = make_objective(_padded_config("norm_softmax", "ps", ps_alpha=0.4, ps_mu=mu,
                                              ps_reorder=reorder),
                               num_classes=C, global_batch_size=B)
    key = jax.random.PRNGKey(3)
    key_order, key_lambda = jax.random.split(key)
    order = regularizers.PS_REORDERS[reorder](jnp.where(mask, labels, 0), key_order, mask)
    real_order = np.asarray(order[:REAL])
    assert sorted(real_order.tolist()) == list(range(REAL))

    def f_padded(e, p):
        return objective.loss_fn(e, labels, p, key=key, extra={}, epoch=0, sample_mask=mask)[0]

    def f_plain(e, p):  # e: the REAL rows in their original positions
        x, y, pp = regularizers.proxy_synthesis(key_lambda, e[real_order], labels[real_order], p,
                                                alpha=0.4, mu=mu)
        assert x.shape[0] == REAL + math.floor(REAL * mu)
        return losses.norm_softmax(x, y, pp, scale=23.0)

    got, (ge, gp) = jax.jit(jax.value_and_grad(f_padded, argnums=(0, 1)))(emb, proxies)
    want, (we, wp) = jax.value_and_grad(f_plain, argnums=(0, 1))(emb[:REAL], proxies)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(ge[:REAL], we, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gp, wp, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(ge[REAL:]))
    # Other junk in the padded rows changes nothing.
    other = _padded_inputs(junk_seed=7)[0]
    np.testing.assert_allclose(jax.jit(f_padded)(other, proxies), got, rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_padded_memvir_steps_ignore_the_padding(fused):
    """MemVir over full and padded steps: the padded rows enter the memory as invalid
    (label -1), so other junk there gives the same losses and the same valid memory; the
    first step (empty memory) is the plain loss of the real rows. Memory contents against
    the official queue: tests/regularizers/test_memvir.py (fixture memvir_partial.npz)."""
    config = _padded_config("norm_softmax", "memvir", memvir_num_steps=2, memvir_step_gap=0)
    objective = make_objective(config, num_classes=C, global_batch_size=B,
                               _fused_memvir=fused)

    @jax.jit
    def step(e, y, p, mask, memory):
        value, extra = objective.loss_fn(e, y, p, key=jax.random.PRNGKey(0),
                                         extra={"memvir": memory}, epoch=0, sample_mask=mask)
        return value, extra["memvir"]

    runs = []
    for junk_seed in (1, 2):
        memory, values = objective.init_extra()["memvir"], []
        for t in range(4):
            if t % 2:
                emb, labels, proxies, mask = _padded_inputs(seed=t, junk_seed=junk_seed + 10 * t)
            else:
                emb, labels, proxies = _inputs(seed=t)
                mask = jnp.ones(B, bool)
            value, memory = step(emb, labels, proxies, mask, memory)
            values.append(float(value))
        runs.append((values, memory))
    (v1, m1), (v2, m2) = runs
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_array_equal(m1.labels, m2.labels)
    valid = np.asarray(m1.labels) >= 0
    assert (~valid).sum() == B - REAL  # slots of steps 2 (full) and 3 (padded)
    np.testing.assert_array_equal(np.asarray(m1.embeddings)[valid],
                                  np.asarray(m2.embeddings)[valid])
    emb, labels, proxies, mask = _padded_inputs(seed=0)
    first, _ = step(emb, labels, proxies, mask, objective.init_extra()["memvir"])
    np.testing.assert_allclose(first, losses.norm_softmax(emb[:REAL], labels[:REAL], proxies,
                                                          scale=23.0), rtol=1e-5)


@pytest.mark.parametrize("loss, regularizer, message", [
    ("hphn_triplet", "", "loss 'hphn_triplet' cannot take the padded last batch"),
    ("hphn_triplet", "ee", "regularizer 'ee' cannot take the padded last batch"),
])
def test_padded_batches_need_masks_in_the_chain(loss, regularizer, message):
    with pytest.raises(ValueError, match=message):
        make_objective(_padded_config(loss, regularizer), num_classes=C, global_batch_size=B)
