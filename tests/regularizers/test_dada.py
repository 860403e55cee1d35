"""Tests of proxy_jax.regularizers.dada against the official DADA criterion.

Fixtures tests/fixtures/dada_{default,cub,individual,linear,disc,same}.npz hold numbers
only. They were produced by a scratch script outside the repository that imports the
official ``criteria/dadaproxy.py`` of Noahsark/DADA unchanged and runs it on CPU in
float64 (inputs rounded to float32 first), with ``np.random.beta`` replaced by a queue of
fixed draws (the fixture's ``*_draws``) and dropout 0. Per case it stores the inputs
(embeddings, proxies, discriminator state dicts, mix weights), the proxy loss, the
mixups with a fixed draw, the generator objective ``Criterion.forward`` and the
discriminator objective ``Criterion.discriminator_forward`` with their gradients, the
individual terms, and one full update as the official ``main.py`` does it: the
embeddings of a tiny linear+LayerNorm "network" under no_grad, ``d_step`` Adam updates of
the discriminators, then one Adam update of the network and (separately) the proxies.
JAX runs in float32; everything must agree to 1e-5 relative (to the array's largest
entry; for a gradient tree, to the tree's; for the 'nwd' term, to the nuclear norms it
subtracts). The full update is checked through ``proxy_jax.methods.dada.dada_update`` for
two of the four cases (the fixtures hold all four). The scratch script was
/work/scratch/dada/make_reference.py.

tests/fixtures/dada_repeat.npz: the same official criterion (unchanged, float64 on CPU,
inputs rounded to float32, fixed Beta draws, dropout 0) on a batch as DADA's
``class_random`` sampler draws it, classes with replacement: labels [4, 4, 1, 1, 4, 4, 0,
0, 2, 2], class 4 drawn twice. Cases 'cub' (pos_class_mix with CUB's yaml options, nwd),
'l1' (pos_class_mix, l1, leaky ReLU, negative shift) and 'cars' (Cars' options, no
pos_class_mix); per case the generator objective with its gradients, the discriminator
objective with the discriminators' gradients and the BatchNorm running means after it,
and the pairs mixed (4 of the 5 reserved rows). Scratch script:
/tmp/scratch/dada_repeat/make_fixture.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proxy_jax.methods.dada import dada_update
from proxy_jax.losses import proxy_anchor
from proxy_jax.regularizers.dada import (
    DadaConfig,
    DadaDraws,
    ClassDiscriminator,
    DomainDiscriminator,
    dada_proxy_loss,
    dada_terms,
    discrepancy,
    discriminator_objective,
    draw_mixes,
    generator_objective,
    init_mix_weight,
    init_dada_proxies,
    make_discriminators,
    positive_pair_mixup,
    positive_pairs,
    sample_proxy_mixup,
)

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
RTOL = 1e-5

# The official options of each fixture case (the scratch script's opt namespaces), as
# DadaConfig fields plus the trainer's (lr, decay, dis_decay, d_step).
_SMALL = dict(domain_hidden_dim=12, class_hidden_dims=(10, 8), dropout=0.0)
CASES = {
    "default": dict(config=dict(), d_step=3, dis_decay=1e-4),
    "cub": dict(
        config=dict(
            pos_class_mix=True, domain_final_bn=True, class_final_bn=True, dis_mode="l1",
            pos_alpha=40.0, neg_alpha=100.0, mix_alpha=3.0, mix_beta=0.5, shift_scale=-0.3,
            activation="leaky_relu", d_dis_ratio=0.005,
        ),
        d_step=2, dis_decay=4e-4,
    ),
    "individual": dict(
        config=dict(
            mix_mode="individual", domain_final_bn=True, d_dis_ratio=0.05,
            d_discrepancy_ratio=0.7, dis_gamma=0.8, oproxy_ratio=0.03,
        ),
        d_step=3, dis_decay=1e-4,
    ),
    "linear": dict(
        config=dict(
            mix_mode="linear", pos_class_mix=True, dis_mode="l1", class_final_bn=True,
            mix_alpha=2.0, mix_beta=5.0, shift_scale=0.6,
        ),
        d_step=1, dis_decay=1e-4,
    ),
}
MODEL_LR, MODEL_DECAY, PROXY_LR, DIS_LR = 1.2e-4, 1e-4, 0.04, 5e-4
NUM_CLASSES = 6


def load(name):
    with np.load(os.path.join(FIXTURES, f"dada_{name}.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def fixtures():
    return {name: load(name) for name in (*CASES, "disc", "same")}


def assert_close(actual, expected, rtol=RTOL, what="", scale=None):
    """Max error relative to ``scale``, by default the largest entry of ``expected``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if scale is None:
        scale = max(float(np.max(np.abs(expected))), 1e-30) if expected.size else 1.0
    err = float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"
    return err


def quick_jit(fn, *args):
    """``jax.jit(fn)(*args)`` compiled with XLA's backend optimizations off.

    The parity programs are small but long (five discriminator passes, forward and
    backward); LLVM's optimizations take most of their compile time and change no result
    beyond float32 rounding.
    """
    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


def config_of(case):
    return DadaConfig(**_SMALL, **CASES[case]["config"])


def draws_of(config, values):
    """The official draw order: [pair sample, pair proxy], domain, class."""
    values = [jnp.asarray(values[i], jnp.float32) for i in range(len(values))]
    fields = (["pair_sample", "pair_proxy"] if config.pos_class_mix else []) + (
        ["domain", "cls"] if config.mix_mode == "random" else []
    )
    assert len(values) == len(fields)
    return DadaDraws(**dict(zip(fields, values)))


def n_draws(config):
    return 2 * config.pos_class_mix + 2 * (config.mix_mode == "random")


def _bn(f, prefix):
    return {"scale": f[f"{prefix}.weight"], "bias": f[f"{prefix}.bias"]}


def _bn_stats(f, prefix):
    return {"mean": f[f"{prefix}.running_mean"], "var": f[f"{prefix}.running_var"]}


def _dense(f, prefix):
    return {"kernel": f[f"{prefix}.weight"].T, "bias": f[f"{prefix}.bias"]}


def disc_variables(f, config, prefix=""):
    """Flax variables of DadaDiscriminators from the official state dicts."""
    d, c = prefix + "domain", prefix + "class"
    dom = {"fc1": _dense(f, f"{d}.fc1"), "bn1": _bn(f, f"{d}.bn1_fc"), "fc2": _dense(f, f"{d}.fc2")}
    dom_s = {"bn1": _bn_stats(f, f"{d}.bn1_fc")}
    cls = {
        "fc1": _dense(f, f"{c}.fc1"), "bn1": _bn(f, f"{c}.bn1_fc"),
        "fc2": _dense(f, f"{c}.fc2"), "bn2": _bn(f, f"{c}.bn2_fc"),
        "fc3": _dense(f, f"{c}.fc3"),
    }
    cls_s = {"bn1": _bn_stats(f, f"{c}.bn1_fc"), "bn2": _bn_stats(f, f"{c}.bn2_fc")}
    if config.domain_final_bn:
        dom["bn2"], dom_s["bn2"] = _bn(f, f"{d}.bn2_fc"), _bn_stats(f, f"{d}.bn2_fc")
    if config.class_final_bn:
        cls["bn3"], cls_s["bn3"] = _bn(f, f"{c}.bn3_fc"), _bn_stats(f, f"{c}.bn3_fc")
    tree = {
        "params": {"domain": dom, "classifier": cls},
        "batch_stats": {"domain": dom_s, "classifier": cls_s},
    }
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _torch_names():
    """flax path → official parameter name, for comparing gradients and updated weights."""
    names = {}
    for sub, off in (("domain", "domain"), ("classifier", "class")):
        for layer in ("fc1", "fc2", "fc3"):
            names[(sub, layer, "kernel")] = (f"{off}.{layer}.weight", True)
            names[(sub, layer, "bias")] = (f"{off}.{layer}.bias", False)
        for i in (1, 2, 3):
            names[(sub, f"bn{i}", "scale")] = (f"{off}.bn{i}_fc.weight", False)
            names[(sub, f"bn{i}", "bias")] = (f"{off}.bn{i}_fc.bias", False)
    return names


def compare_disc_tree(tree, f, prefix, what, sub=()):
    """Compares a discriminator tree leaf by leaf, relative to the tree's largest entry.

    The tree-wide scale matters for gradients: a Linear bias followed by training-mode
    BatchNorm has a gradient that is exactly zero in theory and rounding noise in practice
    (1e-17 in float64, 1e-9 in float32).
    """
    names = _torch_names()
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name, transpose = names[tuple(sub) + tuple(p.key for p in path)]
        leaves.append((name, leaf.T if transpose else leaf))
    scale = max(float(np.max(np.abs(f[prefix + name]))) for name, _ in leaves)
    return max(assert_close(leaf, f[prefix + name], what=f"{what} {name}", scale=scale)
               for name, leaf in leaves)


# --------------------------------------------------------------------------- proxy loss


@pytest.mark.parametrize("case", list(CASES))
def test_proxy_loss_matches_official(fixtures, case):
    f, config = fixtures[case], config_of(case)
    loss = jax.jit(
        lambda x, y, p: dada_proxy_loss(
            x, y, p, pos_alpha=config.pos_alpha, pos_delta=config.pos_delta,
            neg_alpha=config.neg_alpha, neg_delta=config.neg_delta,
        )
    )(f["embeddings"], f["labels"], f["proxies"])
    assert_close(loss, f["proxy_loss_plain"], what=case)


def test_proxy_loss_one_class_batch_matches_official(fixtures):
    # Every sample has one label: that proxy has no negative, its term must be 0 (not log 1
    # of a masked fill) as in the official masked logsumexp.
    f = fixtures["same"]
    loss = jax.jit(dada_proxy_loss)(f["embeddings"], f["labels"], f["proxies"])
    assert_close(loss, f["proxy_loss"])


def test_proxy_loss_counts_a_class_once_per_sample():
    # Against a plain-NumPy re-derivation of the per-sample average, with a class of 3,
    # a class of 1 and absent classes.
    rng = np.random.default_rng(0)
    x, p = rng.normal(size=(5, 4)), rng.normal(size=(4, 4))
    y = np.array([2, 0, 2, 2, 3])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    cos = xn @ pn.T
    pos = np.mean([np.log1p(np.exp(-20 * (cos[y == y[j], y[j]] - 0.2)).sum()) for j in range(5)])
    neg = np.mean([np.log1p(np.exp(10 * (cos[y != c, c] + 0.3)).sum()) for c in range(4)])
    got = jax.jit(lambda x, y, p: dada_proxy_loss(
        x, y, p, pos_alpha=20.0, pos_delta=0.2, neg_alpha=10.0, neg_delta=-0.3,
    ))(jnp.float32(x), jnp.asarray(y), jnp.float32(p))
    assert_close(got, pos + neg)


def test_proxy_loss_equals_proxy_anchor_for_distinct_labels():
    # One sample per class: the per-sample average is the per-proxy average of Proxy-Anchor.
    key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
    x, p = jax.random.normal(key_x, (6, 8)), jax.random.normal(key_p, (9, 8))
    y = jnp.array([4, 0, 7, 2, 8, 5])
    both = jax.jit(lambda x, y, p: (dada_proxy_loss(x, y, p),
                                    proxy_anchor(x, y, p, margin=0.1, alpha=32.0)))
    dada, anchor = both(x, y, p)
    assert_close(dada, anchor)


def test_proxy_loss_is_finite_in_bfloat16():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 16)).astype(jnp.bfloat16)
    p = jax.random.normal(jax.random.PRNGKey(2), (5, 16)).astype(jnp.bfloat16)
    y = jnp.array([0, 1, 2, 3, 4, 0, 1, 2])
    loss, grads = jax.jit(jax.value_and_grad(
        lambda x, y, p: dada_proxy_loss(x, y, p, neg_alpha=200.0), argnums=(0, 2)))(x, y, p)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


# --------------------------------------------------------------------------- mixups


@pytest.mark.parametrize("case", list(CASES))
def test_mixup_with_fixed_draw_matches_official(fixtures, case):
    f, config = fixtures[case], config_of(case)
    x, q = jnp.asarray(f["embeddings"]), jnp.asarray(f["proxies"])[f["labels"]]
    if config.mix_mode == "random":
        for tag, s in (("pos", 0.6), ("neg", -0.4), ("one", 1.0)):
            got = sample_proxy_mixup(None, x, q, shift_scale=s, mix=0.37)
            assert_close(got, f[f"mixup_{tag}"], what=tag)
    else:
        got = sample_proxy_mixup(None, x, q, mode=config.mix_mode, mix_weight=f["mix_w"])
        assert_close(got, f["mixup_learned"])


@pytest.mark.parametrize("case", ["cub", "linear"])
def test_positive_pair_mixup_matches_official(fixtures, case):
    f, config = fixtures[case], config_of(case)
    sample_mix, proxy_mix = f["dis_draws"][:2]
    fn = jax.jit(
        lambda x, y, p: positive_pair_mixup(
            None, x, y, p, sample_mix=sample_mix, proxy_mix=proxy_mix
        )
    )
    x, y, q, mask = fn(f["embeddings"], f["labels"], f["proxies"])
    b = f["labels"].shape[0]
    # B // 2 mixed rows reserved, the 3 real pairs first.
    assert x.shape[0] == b + b // 2
    np.testing.assert_array_equal(mask, np.arange(b + b // 2) < b + 3)
    assert_close(x[:b + 3], f["pos_mix_embeddings"])
    assert_close(q[:b + 3], f["pos_mix_proxies"])
    np.testing.assert_array_equal(y[:b + 3], f["pos_mix_labels"])
    assert np.isfinite(np.asarray(x)).all() and np.isfinite(np.asarray(q)).all()


def test_positive_pairs_first_two_of_each_class_by_label():
    y = jnp.array([7, 2, 7, 5, 2, 9, 2, 5, 7])
    anchor, positive, valid = jax.jit(positive_pairs)(y)
    assert anchor.shape == positive.shape == valid.shape == (4,)  # B // 2 rows reserved
    np.testing.assert_array_equal(valid, [True, True, True, False])
    np.testing.assert_array_equal(anchor[:3], [1, 3, 0])  # classes 2, 5, 7
    np.testing.assert_array_equal(positive[:3], [4, 7, 2])
    exact = jax.jit(lambda y: positive_pairs(y, max_pairs=3))(y)
    np.testing.assert_array_equal(exact[0], [1, 3, 0])
    assert bool(jnp.all(exact[2]))


def test_positive_pairs_of_a_class_drawn_twice():
    # DADA's sampler drew class 4 twice (four samples): still one pair, its first two
    # samples, as the official np.unique over all same-label pairs gives.
    y = jnp.array([4, 4, 1, 1, 4, 4, 0, 0])
    anchor, positive, valid = jax.jit(positive_pairs)(y)
    np.testing.assert_array_equal(valid, [True, True, True, False])
    np.testing.assert_array_equal(anchor[:3], [6, 2, 0])  # classes 0, 1, 4
    np.testing.assert_array_equal(positive[:3], [7, 3, 1])


def test_random_mixup_draw_is_beta_and_keyed():
    config = DadaConfig(mix_alpha=2.0, mix_beta=5.0)
    # With x = 1 and q = 0 (s = 1) the mixture is 1 − m, a draw of Beta(2, 5).
    x, q = jnp.ones((3, 2)), jnp.zeros((3, 2))
    mixup = lambda k: 1.0 - sample_proxy_mixup(k, x, q, mix_alpha=2.0, mix_beta=5.0)[0, 0]
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    one = jax.jit(lambda k: (draw_mixes(k, config=config), mixup(k)))
    draws, mixes = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[one(k) for k in keys])
    ms = np.concatenate([draws.domain, draws.cls])
    assert 0 < mixes.min() and mixes.max() < 1 and abs(mixes.mean() - 2 / 7) < 0.04
    assert 0 < ms.min() and ms.max() < 1 and abs(ms.mean() - 2 / 7) < 0.03
    assert draws.pair_sample is None and not np.allclose(draws.domain, draws.cls)
    both = draw_mixes(jax.random.PRNGKey(0),
                      config=DadaConfig(pos_class_mix=True, mix_mode="linear"))
    assert both.domain is None and both.pair_sample is not None and both.pair_proxy is not None


# --------------------------------------------------------------------------- discrepancy


def test_discrepancies_match_official(fixtures):
    f = fixtures["disc"]
    assert_close(discrepancy(f["a"], f["b"], mode="l1"), f["l1"])
    nwd = jax.jit(lambda a, b: discrepancy(a, b, mode="nwd"))
    assert_close(nwd(f["a"], f["b"]), f["nwd"])
    assert float(f["nwd"]) < 0  # a difference of norms, not a norm
    assert_close(nwd(f["wide_a"], f["wide_b"]), f["wide_nwd"])
    assert_close(jax.grad(nwd)(jnp.asarray(f["a"]), jnp.asarray(f["b"])), f["nwd_grad_a"])


# --------------------------------------------------------------------------- networks


def test_discriminator_shapes_and_torch_init():
    x = jnp.ones((4, 20))
    dom = DomainDiscriminator(hidden_dim=300, final_bn=True)
    v = jax.jit(lambda k, x: dom.init(k, x, train=False))(jax.random.PRNGKey(0), x)
    assert jax.eval_shape(lambda: dom.apply(v, x, train=False)).shape == (4, 3)
    k = np.asarray(v["params"]["fc1"]["kernel"])
    b = np.asarray(v["params"]["fc2"]["bias"])
    # U(±1/√fan_in) for weight and bias, as PyTorch's nn.Linear.
    assert np.abs(k).max() <= 1 / np.sqrt(20) and np.abs(k).max() > 0.9 / np.sqrt(20)
    assert np.abs(b).max() <= 1 / np.sqrt(300) and np.abs(b).std() > 0
    cls = ClassDiscriminator(num_classes=7, hidden_dims=(6, 5))
    v = jax.eval_shape(lambda: cls.init(jax.random.PRNGKey(0), x, train=False))
    assert jax.eval_shape(lambda v: cls.apply(v, x, train=False), v).shape == (4, 7)
    assert "bn3" not in v["params"]


def test_class_discriminator_dropout():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
    cls = ClassDiscriminator(num_classes=5, hidden_dims=(32, 32), dropout_rate=0.5)
    no_drop = ClassDiscriminator(num_classes=5, hidden_dims=(32, 32), dropout_rate=0.0)

    @jax.jit
    def run(k):
        v = cls.init(jax.random.PRNGKey(1), x, train=False)
        train = lambda m, **kw: m.apply(v, x, train=True, mutable=["batch_stats"], **kw)[0]
        return (train(cls, rngs={"dropout": k}), train(cls, rngs={"dropout": k + 1}),
                train(no_drop), cls.apply(v, x, train=False), no_drop.apply(v, x, train=False))

    a, b, c, e1, e2 = run(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, run(jax.random.PRNGKey(2))[0])
    assert not np.allclose(a, b) and not np.allclose(a, c)
    np.testing.assert_allclose(e1, e2, rtol=1e-6)  # no dropout in eval mode


def test_domain_discriminator_runs_three_separate_passes():
    config = DadaConfig(**_SMALL)
    disc = make_discriminators(config, num_classes=4)
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    xs = [jax.random.normal(k[i], (6, 8)) + i for i in range(4)]
    @jax.jit
    def run(xs):
        v = disc.init(k[4], *xs, train=False)
        ((d0, d1, d2), _), _ = disc.apply(v, *xs, train=True, mutable=["batch_stats"])
        dom_v = {"params": v["params"]["domain"], "batch_stats": v["batch_stats"]["domain"]}
        alone = lambda x: DomainDiscriminator(hidden_dim=12).apply(  # noqa: E731
            dom_v, x, train=True, mutable=["batch_stats"])[0]
        return (d0, d1, d2), tuple(alone(x) for x in xs[:3]), alone(jnp.concatenate(xs[:3]))[:6]

    passes, alone, together = run(xs)
    # Each pass normalizes with its own batch statistics: pass i equals the domain
    # discriminator run on input i alone, not on the concatenation.
    for out, ref in zip(passes, alone):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(passes[0], together, atol=1e-3)


def test_init_helpers():
    p = init_dada_proxies(jax.random.PRNGKey(0), 50, 64)
    assert p.shape == (50, 64) and abs(float(jnp.std(p)) - 1 / 8) < 0.01
    assert init_mix_weight(jax.random.PRNGKey(0), mode="random", dim=8) is None
    w = init_mix_weight(jax.random.PRNGKey(0), mode="individual", dim=8)
    assert w.shape == (1, 8) and float(jnp.abs(w).max()) <= 1.414 * np.sqrt(6 / 9)
    assert init_mix_weight(jax.random.PRNGKey(0), mode="linear", dim=8).shape == (16, 8)


# --------------------------------------------------------------------------- objectives


def _terms_fn(case, f, **kw):
    config = config_of(case)
    disc = make_discriminators(config, num_classes=NUM_CLASSES)
    return config, disc, lambda v, x, p, w, draws, **extra: dada_terms(
        disc, v, x, jnp.asarray(f["labels"]), p, config=config, draws=draws, mix_weight=w,
        **kw, **extra,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_objectives_and_gradients_match_official(fixtures, case):
    f = fixtures[case]
    config, disc, terms = _terms_fn(case, f)
    v = disc_variables(f, config)
    x, p = jnp.asarray(f["embeddings"]), jnp.asarray(f["proxies"])
    w = jnp.asarray(f["mix_w"]) if "mix_w" in f else None

    g_draws = draws_of(config, f["gen_draws"])
    d_draws = draws_of(config, f["dis_draws"])

    def gen(x, p, w, params):  # official Criterion.forward
        t, _ = terms({"params": params, "batch_stats": v["batch_stats"]}, x, p, w, g_draws)
        return generator_objective(t, config=config), t

    def dis(params, w):  # official Criterion.discriminator_forward
        t, _ = terms({"params": params, "batch_stats": v["batch_stats"]}, x, p, w, d_draws,
                     with_proxy_loss=False)
        return discriminator_objective(t, config=config), t

    def both(x, p, w, params):  # one compilation for both players
        return (jax.value_and_grad(gen, argnums=(0, 1, 2, 3), has_aux=True)(x, p, w, params),
                jax.value_and_grad(dis, argnums=(0, 1), has_aux=True)(params, w))

    ((g_loss, g_terms), g_grads), ((d_loss, d_terms), d_grads) = quick_jit(
        both, x, p, w, v["params"])
    assert_close(g_loss, f["gen_loss"], what="generator objective")
    assert_close(g_terms.proxy, f["gen_proxy_loss"], what="proxy loss")
    assert_close(g_grads[0], f["gen_grad_embeddings"], what="d/d embeddings")
    assert_close(g_grads[1], f["gen_grad_proxies"], what="d/d proxies")
    if w is not None:
        assert_close(g_grads[2], f["gen_grad_mix_w"], what="d/d mix_w")
    compare_disc_tree(g_grads[3]["classifier"], f, "gen_grad_", "generator d/d class",
                      sub=("classifier",))

    assert_close(d_loss, f["dis_loss"], what="discriminator objective")
    assert_close(d_terms.domain, f["term_domain"], what="domain term")
    assert_close(2 * d_terms.class_ce, f["term_class_ce2"], what="class term")
    # 'nwd' is a difference of two nuclear norms, each at least the Frobenius norm
    # √(N/C) of a row-stochastic [N, C] matrix; float32 carries that magnitude's error.
    n = f["pos_mix_labels"].shape[0] if config.pos_class_mix else x.shape[0]
    scale = np.sqrt(n / NUM_CLASSES) / n if config.dis_mode == "nwd" else None
    assert_close(d_terms.discrepancy, f["term_discrepancy"], what="discrepancy term", scale=scale)
    compare_disc_tree(d_grads[0], f, "dis_grad_", "discriminator grad")
    if config.mix_mode == "linear":
        assert_close(d_grads[1], f["dis_grad_mix_w"], what="d/d mix_w (linear)")


def _adam(lr, decay=0.0):
    # torch.optim.Adam: weight decay added to the gradient before the moments.
    return optax.chain(optax.add_decayed_weights(decay), optax.adam(lr))


def _network(feats):
    """The fixtures' tiny "embedding network": linear, then LayerNorm without affine."""
    def embed(net, aux):
        z = feats @ net["model"]["w"].T + net["model"]["b"]
        mu = jnp.mean(z, -1, keepdims=True)
        var = jnp.mean(jnp.square(z - mu), -1, keepdims=True)
        return (z - mu) / jnp.sqrt(var + 1e-5), ()
    return embed


def _players(f, case, config):
    """Initial parameter sets and the official optimizers (plain Adam, torch-style L2)."""
    v = disc_variables(f, config)
    gen = {"model": {"w": jnp.asarray(f["model.weight"]), "b": jnp.asarray(f["model.bias"])},
           "proxies": jnp.asarray(f["proxies"])}
    disc = {"disc": v["params"]}
    if config.mix_mode == "individual":
        gen["mix"] = jnp.asarray(f["mix_w"])  # stepped by the proxy optimizer, lr 5e-4
    if config.mix_mode == "linear":
        disc["mix"] = jnp.asarray(f["mix_w"])  # stepped by the discriminator optimizer
    gen_tx = optax.multi_transform(
        {"model": _adam(MODEL_LR, MODEL_DECAY), "proxies": _adam(PROXY_LR), "mix": _adam(DIS_LR)},
        {k: k for k in gen})
    disc_tx = optax.multi_transform(
        {"disc": _adam(DIS_LR, CASES[case]["dis_decay"]), "mix": _adam(DIS_LR)},
        {k: k for k in disc})
    return gen, disc, v["batch_stats"], gen_tx, disc_tx


def _full_update(f, case, config, *, update_generator=True, embed_wrap=lambda e: e):
    """dada_update from the fixture's initial state with its fixed draws (a function of
    the batch, the three parameter sets and the warm-up flag, to be jitted)."""
    d_step = CASES[case]["d_step"]
    gen_tx, disc_tx = _players(f, case, config)[3:]
    rows = np.asarray(f["step_draws"]).reshape(d_step + 1, n_draws(config))

    def update(feats, labels, gen, disc, stats, update_generator):
        return dada_update(
            embed_wrap(_network(feats)), gen, gen_tx.init(gen), disc, stats,
            disc_tx.init(disc), labels, jax.random.PRNGKey(0),
            gen_tx=gen_tx, disc_tx=disc_tx,
            discriminators=make_discriminators(config, num_classes=NUM_CLASSES),
            config=config, d_step=d_step, g_step=1, update_generator=update_generator,
            draws=[draws_of(config, rows[k]) for k in range(d_step + 1)])
    return update


def _check_full_update(f, config, gen, result):
    """The official update: d_step discriminator updates, then network and proxies."""
    g_new, _, d_new, stats, _, _, metrics = result
    assert_close(metrics["dis_loss"], np.mean(f["step_dis_losses"]), what="discriminator loss")
    assert_close(metrics["gen_loss"], f["step_gen_loss"], what="generator loss")
    assert_close(g_new["model"]["w"], f["step_model.weight"], what="network weight")
    assert_close(g_new["model"]["b"], f["step_model.bias"], what="network bias")
    assert_close(g_new["proxies"], f["step_proxies"], what="proxies")
    if "mix" in g_new:
        assert_close(g_new["mix"], f["step_mix_w"], what="mix_w (individual)")
    if "mix" in d_new:
        assert_close(d_new["mix"], f["step_mix_w"], what="mix_w (linear)")
    compare_disc_tree(d_new["disc"], f, "step_", "discriminators")
    # The updates themselves (new − old), so that the check is not swamped by the weights.
    # Both sides store float32 weights, so a difference carries ulp(weight) / update of
    # rounding: ~1e-6 for the proxies (lr 0.04), ~3e-4 for the network (lr 1.2e-4).
    assert_close(g_new["proxies"] - gen["proxies"], f["step_proxies"] - f["proxies"], rtol=1e-4,
                 what="proxy update")
    assert_close(g_new["model"]["w"] - gen["model"]["w"],
                 f["step_model.weight"] - f["model.weight"], rtol=1e-3, what="network update")
    # Running statistics follow torch (unbiased variance, momentum 0.1).
    for sub, off in (("domain", "step_domain"), ("classifier", "step_class")):
        for name, s in stats[sub].items():
            assert_close(s["mean"], f[f"{off}.{name}_fc.running_mean"], what=f"{sub} {name} mean")
            assert_close(s["var"], f[f"{off}.{name}_fc.running_var"], what=f"{sub} {name} var")
    if config.pos_class_mix:
        assert float(metrics["pair_count"]) == 3


def test_one_full_update_matches_official(fixtures):
    """'individual': nwd, a generator-side mix weight, three discriminator updates."""
    case = "individual"
    f, config = fixtures[case], config_of(case)
    gen, disc, stats = _players(f, case, config)[:3]
    update = _full_update(f, case, config)
    result = quick_jit(update, jnp.asarray(f["features"]), jnp.asarray(f["labels"]), gen, disc,
                       stats, jnp.bool_(True))
    _check_full_update(f, config, gen, result)


def test_full_update_on_8_devices_matches_official_and_1_device(fixtures):
    """'cub' (pos_class_mix, l1, two discriminator updates): the update on a batch sharded
    over 8 fake devices equals the 1-device update and the official one; in the
    discriminator warm-up the generator side does not move."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    case = "cub"
    f, config = fixtures[case], config_of(case)
    gen, disc, stats = _players(f, case, config)[:3]
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def gather(embed):  # the trainer gathers the embeddings before the objective
        def gathered(net, aux):
            emb, aux = embed(net, aux)
            return jax.lax.with_sharding_constraint(emb, replicated), aux
        return gathered

    update = _full_update(f, case, config, embed_wrap=gather)
    args = (jnp.asarray(f["features"]), jnp.asarray(f["labels"]), gen, disc, stats,
            jnp.bool_(True))
    one = quick_jit(update, *args)
    _check_full_update(f, config, gen, one)
    many = quick_jit(update, *jax.device_put(args, (sharded, sharded) + (replicated,) * 4))
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    warm = quick_jit(update, *args[:-1], jnp.bool_(False))
    np.testing.assert_array_equal(warm[0]["proxies"], gen["proxies"])
    np.testing.assert_array_equal(warm[0]["model"]["w"], gen["model"]["w"])
    np.testing.assert_allclose(warm[2]["disc"]["domain"]["fc1"]["kernel"],
                               one[2]["disc"]["domain"]["fc1"]["kernel"], rtol=1e-6)
    assert float(warm[6]["gen_loss"]) == 0.0


def test_eval_mode_leaves_batch_stats_and_needs_no_dropout_key(fixtures):
    f = fixtures["default"]
    config = DadaConfig(**{**_SMALL, "dropout": 0.5})
    disc = make_discriminators(config, num_classes=NUM_CLASSES)
    v = disc_variables(f, config)
    args = (disc, v, jnp.asarray(f["embeddings"]), jnp.asarray(f["labels"]),
            jnp.asarray(f["proxies"]))
    draws = DadaDraws(domain=0.3, cls=0.6)
    with pytest.raises(ValueError, match="dropout_key"):
        dada_terms(*args, config=config, draws=draws)

    @jax.jit
    def run(key):
        t, same = dada_terms(*args, config=config, draws=draws, train=False)
        _, new = dada_terms(*args, config=config, draws=draws, dropout_key=key)
        return t, same, new

    t, same, new = run(jax.random.PRNGKey(0))
    assert np.isfinite(t.domain) and np.isfinite(t.discrepancy)
    old = v["batch_stats"]["domain"]["bn1"]["mean"]
    np.testing.assert_array_equal(same["domain"]["bn1"]["mean"], old)
    assert not np.allclose(new["domain"]["bn1"]["mean"], old)


# --------------------------------------------------------------------------- errors


def test_bad_input_raises_value_error_naming_the_argument():
    x, y, p = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="embeddings"):
        dada_proxy_loss(jnp.ones(4), y, p)
    with pytest.raises(ValueError, match="labels"):
        dada_proxy_loss(x, jnp.ones(4), p)
    with pytest.raises(ValueError, match="proxies"):
        dada_proxy_loss(x, y, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="positive_proxies"):
        dada_proxy_loss(x, y, p, positive_proxies=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="shift_scale"):
        sample_proxy_mixup(None, x, x, mix=0.5, shift_scale=-1.0)
    with pytest.raises(ValueError, match="key"):
        sample_proxy_mixup(None, x, x)
    with pytest.raises(ValueError, match="mix_weight"):
        sample_proxy_mixup(None, x, x, mode="linear", mix_weight=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="mode"):
        sample_proxy_mixup(None, x, x, mode="cubic")
    with pytest.raises(ValueError, match="mode"):
        discrepancy(x, x, mode="l2")
    with pytest.raises(ValueError, match="logits_b"):
        discrepancy(x, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="max_pairs"):
        positive_pairs(y, max_pairs=3)  # more than B // 2
    with pytest.raises(ValueError, match="max_pairs"):
        positive_pairs(jnp.array([0, 0, 1, 1]), max_pairs=1)  # two classes have a pair
    for field, value in (("mix_mode", "x"), ("dis_mode", "x"), ("activation", "tanh"),
                         ("shift_scale", 1.5), ("mix_alpha", 0.0), ("dropout", 1.0),
                         ("class_hidden_dims", (4,)), ("domain_hidden_dim", 0)):
        with pytest.raises(ValueError, match=field):
            DadaConfig(**{field: value})
    config = DadaConfig(pos_class_mix=True)
    disc = make_discriminators(config, num_classes=2)
    with pytest.raises(ValueError, match="draws"):
        dada_terms(disc, {}, x, y, p, config=config, draws=DadaDraws(domain=0.1, cls=0.2))
    with pytest.raises(ValueError, match="config"):
        dada_terms(disc, {}, x, y, p, config={}, draws=DadaDraws())


# --------------------------------------------------------------------------- repeated classes

REPEAT_CASES = {
    "cub": dict(pos_class_mix=True, domain_final_bn=True, class_final_bn=True, pos_alpha=40.0,
                neg_alpha=100.0, mix_alpha=3.0, mix_beta=0.5, d_dis_ratio=0.005),
    "l1": dict(pos_class_mix=True, dis_mode="l1", domain_final_bn=True, shift_scale=-0.3,
               activation="leaky_relu", d_discrepancy_ratio=0.7),
    "cars": dict(domain_final_bn=True, mix_alpha=2.0, mix_beta=1.0),
}


@pytest.fixture(scope="module")
def repeat_fixture():
    return load("repeat")


@pytest.mark.parametrize("case", list(REPEAT_CASES))
def test_batch_with_a_class_drawn_twice_matches_official(repeat_fixture, case):
    """The official criterion takes a batch that holds class 4 in two groups: the proxy
    loss sees one class of four samples, pos_class_mix one pair of it (4 pairs in 5
    reserved rows, the fifth masked out of every term and BatchNorm statistic)."""
    f, p = repeat_fixture, case + "__"
    config = DadaConfig(**_SMALL, **REPEAT_CASES[case])
    disc = make_discriminators(config, num_classes=NUM_CLASSES)
    v = disc_variables(f, config, prefix=p)
    x, y = jnp.asarray(f["embeddings"]), jnp.asarray(f["labels"])
    proxies = jnp.asarray(f[p + "proxies"])
    g_draws, d_draws = draws_of(config, f[p + "gen_draws"]), draws_of(config, f[p + "dis_draws"])

    def terms(params, x, q, draws, **kw):
        return dada_terms(disc, {"params": params, "batch_stats": v["batch_stats"]}, x, y, q,
                          config=config, draws=draws, **kw)

    def gen(x, q):
        t, _ = terms(v["params"], x, q, g_draws)
        return generator_objective(t, config=config), t

    def dis(params):
        t, stats = terms(params, x, proxies, d_draws, with_proxy_loss=False)
        return discriminator_objective(t, config=config), (t, stats)

    def both(x, q, params):
        plain = dada_proxy_loss(x, y, q, pos_alpha=config.pos_alpha, neg_alpha=config.neg_alpha)
        return (plain, jax.value_and_grad(gen, argnums=(0, 1), has_aux=True)(x, q),
                jax.value_and_grad(dis, has_aux=True)(params))

    plain, ((g_loss, g_terms), g_grads), ((d_loss, (d_terms, stats)), d_grads) = quick_jit(
        both, x, proxies, v["params"])
    assert_close(plain, f[p + "proxy_loss_plain"], what="proxy loss")
    assert_close(g_terms.proxy, f[p + "gen_proxy_loss"], what="proxy loss of the forward")
    assert_close(g_loss, f[p + "gen_loss"], what="generator objective")
    assert_close(g_grads[0], f[p + "gen_grad_embeddings"], what="d/d embeddings")
    assert_close(g_grads[1], f[p + "gen_grad_proxies"], what="d/d proxies")
    assert_close(d_loss, f[p + "dis_loss"], what="discriminator objective")
    compare_disc_tree(d_grads, f, p + "dis_grad_", "discriminator grad")
    for sub, off in (("domain", "domain"), ("classifier", "class")):
        for name, st in stats[sub].items():
            assert_close(st["mean"], f[f"{p}step_{off}.{name}_fc.running_mean"],
                         what=f"{sub} {name} running mean")
    if config.pos_class_mix:
        assert int(g_terms.pair_count) == int(f[p + "pair_count"]) == 4
