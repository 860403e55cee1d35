"""Parity and property tests for proxy_jax.losses.

References:
* pytorch-metric-learning (live, float32): ProxyAnchorLoss, ProxyNCALoss,
  NormalizedSoftmaxLoss, SoftTripleLoss. Parameter mapping: pml ``proxies`` [C, D] are ours
  as they are; NormalizedSoftmaxLoss stores ``W`` as [D, C] and uses ``temperature``:
  proxies = W.T, scale = 1 / temperature; SoftTripleLoss: see the SoftTriple section.
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


def _duplicated_negative():
    """Anchor 0, its positive 1 and a nearer negative present twice (rows 2, 3) in 4 dims."""
    rng = np.random.default_rng(13)
    a, u, v = rng.normal(size=(3, 4))
    x = np.stack([a, a + 3 * u / np.linalg.norm(u), a + v / np.linalg.norm(v)])
    return np.concatenate([x, x[2:]]).astype(np.float32), np.array([0, 0, 1, 2], np.int32)


def test_hphn_tie_gradient_rules_on_a_repeated_hardest_negative():
    x, y = _duplicated_negative()

    def anchor_loss(a, tie):  # the loss of anchor 0 only, hardest negative rows 2 and 3
        return losses.hphn_triplet(a, y, margin=5.0, reduction="none", tie_gradient=tie)[0]

    each = jax.grad(anchor_loss)(x, "each")
    split = jax.grad(anchor_loss)(x, "split")
    assert_rel_close(losses.hphn_triplet(x, y, tie_gradient="each"),
                     losses.hphn_triplet(x, y, tie_gradient="split"), tol=0)
    # each copy gets the full gradient (MXNet), or half of it (jnp.min)
    assert_rel_close(each[2], each[3], tol=1e-6)
    assert_rel_close(each[2:], 2 * split[2:], tol=1e-6)
    assert_rel_close(each[1], split[1], tol=1e-6)  # the positive is not tied
    d_an = jax.grad(lambda a: jnp.linalg.norm(a[0] - a[2]))(x)[0]
    assert_rel_close(each[0] - split[0], -d_an, tol=1e-4)  # the anchor counts it twice


def test_hphn_tie_rules_agree_without_ties():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = np.repeat(np.arange(4), 2).astype(np.int32)
    grads = [jax.grad(lambda a: losses.hphn_triplet(a, y, tie_gradient=t))(x)
             for t in ("each", "split")]
    assert_rel_close(grads[0], grads[1], tol=1e-6)


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
            for tie in ("each", "split"):
                check_grads(lambda a: losses.hphn_triplet(a, y, soft_margin=soft,
                                                          tie_gradient=tie), (x,),
                            order=1, modes=("fwd", "rev"))


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
    with pytest.raises(ValueError, match="tie_gradient must be 'each' or 'split', got 'even'"):
        losses.hphn_triplet(x, y, tie_gradient="even")
    with pytest.raises(ValueError, match="labels"):
        losses.hphn_triplet(x, y[:3])


# ----------------------------------------------------------------- public logit helpers


def test_logit_helpers_match_numpy():
    with jax.enable_x64(True):
        x, y, p = _batch(13, dtype=np.float64)
        xh, ph = losses.normalized_pair(x, p)
        cos = _np_normalize(x) @ _np_normalize(p).T
        assert_rel_close(losses.norm_softmax_logits(xh, ph, scale=23.0), 23.0 * cos)
        assert_rel_close(losses.proxy_nca_logits(xh, ph, scale=12.0), -12.0 * (2.0 - 2.0 * cos))
        mask = y[:, None] == np.arange(p.shape[0])[None, :]
        pos = np.log1p(np.sum(np.where(mask, np.exp(-32.0 * (cos - 0.1)), 0.0), axis=0))
        neg = np.log1p(np.sum(np.where(~mask, np.exp(32.0 * (cos + 0.1)), 0.0), axis=0))
        assert_rel_close(losses.proxy_anchor_pos_terms(cos, mask, alpha=32.0, margin=0.1), pos)
        assert_rel_close(losses.proxy_anchor_neg_terms(cos, ~mask, alpha=32.0, margin=0.1), neg)


# ----------------------------------------------------------------- SoftTriple
#
# Reference: pytorch-metric-learning's SoftTripleLoss (live, float32) with the paper's
# centre regularizer, SparseCentersRegularizer(C, K) weighted by τ (pml refuses it for
# K = 1, where ours is 0). Parameter mapping: pml ``fc`` is [D, C·K], columns grouped by
# ``view(-1, C, K)``: proxies = fc.T, rows c·K … c·K+K−1 are class c's centres.


def _soft_triple_batch(seed, b, c, k, d):
    rng = np.random.default_rng(seed)
    x = (3.0 * rng.normal(size=(b, d)) + 0.5).astype(np.float32)  # not normalized
    p = rng.normal(size=(c * k, d)).astype(np.float32)
    y = rng.integers(0, c, size=b).astype(np.int32)
    return x, y, p


def _pml_soft_triple(x, y, p, k, *, la=20.0, gamma=0.1, tau=0.2, margin=0.01):
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning import regularizers

    c, d = p.shape[0] // k, p.shape[1]
    reg = {}
    if k > 1 and tau:
        reg = dict(weight_regularizer=regularizers.SparseCentersRegularizer(c, k),
                   weight_reg_weight=tau)
    fn = pml.SoftTripleLoss(c, d, centers_per_class=k, la=la, gamma=gamma, margin=margin, **reg)
    fn.fc.data = torch.tensor(p.T.copy())
    xt = torch.tensor(x, requires_grad=True)
    loss = fn(xt, torch.tensor(y, dtype=torch.long))
    loss.backward()
    return float(loss.detach()), xt.grad.numpy(), fn.fc.grad.numpy().T


def _soft_triple_value_and_grad(x, y, p, k, **kw):
    fn = jax.jit(jax.value_and_grad(
        lambda a, q: losses.soft_triple(a, y, q, centers_per_class=k, **kw), argnums=(0, 1)))
    loss, (gx, gp) = fn(x, p)
    return loss, gx, gp


@pytest.mark.parametrize("b,c,k,d", [(32, 12, 1, 24), (32, 12, 10, 24), (20, 7, 3, 16),
                                     (64, 30, 10, 64)])
@pytest.mark.parametrize("tau", [0.2, 0.0])
def test_soft_triple_matches_pytorch_metric_learning(b, c, k, d, tau):
    x, y, p = _soft_triple_batch(b + k, b, c, k, d)
    ref_loss, ref_gx, ref_gp = _pml_soft_triple(x, y, p, k, tau=tau)
    loss, gx, gp = _soft_triple_value_and_grad(x, y, p, k, tau=tau)
    assert loss.dtype == jnp.float32
    assert_rel_close(loss, ref_loss)
    assert_rel_close(gx, ref_gx)
    assert_rel_close(gp, ref_gp)


@pytest.mark.parametrize("wrong", ["margin", "gamma", "la", "tau", "layout"])
def test_soft_triple_parity_check_catches_a_wrong_loss(wrong):
    # The comparison above is sharp enough to see each hyper-parameter and the row layout.
    b, c, k, d = 32, 12, 10, 24
    x, y, p = _soft_triple_batch(1, b, c, k, d)
    ref = _pml_soft_triple(x, y, p, k)
    kw = {"margin": dict(margin=0.02), "gamma": dict(gamma=0.11), "la": dict(la=21.0),
          "tau": dict(tau=0.0), "layout": {}}[wrong]
    q = p.reshape(c, k, d).transpose(1, 0, 2).reshape(c * k, d) if wrong == "layout" else p
    got = _soft_triple_value_and_grad(x, y, q, k, **kw)
    with pytest.raises(AssertionError, match="relative error"):
        for actual, expected in zip(got, ref):
            assert_rel_close(actual, expected)


def _np_soft_triple(x, y, p, k, la, gamma, tau, margin):
    """The SoftTriple definition written out with loops (float64)."""
    c = p.shape[0] // k
    xh, ph = _np_normalize(x), _np_normalize(p)
    total = 0.0
    for i in range(len(y)):
        logits = np.empty(c)
        for cls in range(c):
            s = ph[cls * k:(cls + 1) * k] @ xh[i]
            w = np.exp(s / gamma - np.max(s / gamma))
            logits[cls] = la * (np.sum(w * s) / np.sum(w) - (margin if cls == y[i] else 0.0))
        total += -_np_log_softmax(logits[None])[0, y[i]]
    reg = 0.0
    for cls in range(c):
        for a in range(k):
            for b_ in range(a + 1, k):
                reg += np.sqrt(2.0 - 2.0 * ph[cls * k + a] @ ph[cls * k + b_])
    reg = reg / (c * k * (k - 1)) if k > 1 else 0.0
    return total / len(y) + tau * reg


def test_soft_triple_matches_loop_definition():
    with jax.enable_x64(True):
        x, y, p = _soft_triple_batch(2, 10, 4, 3, 6)
        x, p = x.astype(np.float64), p.astype(np.float64)
        kw = dict(la=20.0, gamma=0.1, tau=0.2, margin=0.01)
        got = losses.soft_triple(x, y, p, centers_per_class=3, **kw)
        assert_rel_close(got, _np_soft_triple(x, y, p, 3, **kw), tol=1e-12)


def test_soft_triple_padded_call_equals_unpadded():
    b, c, k, d = 16, 5, 3, 8
    x, y, p = _soft_triple_batch(3, b, c, k, d)
    rng = np.random.default_rng(4)
    # Two junk classes (K rows each) and three junk samples, which even point at real classes.
    xp = np.concatenate([x, rng.normal(size=(3, d)).astype(np.float32)])
    yp = np.concatenate([y, rng.integers(0, c, 3).astype(np.int32)])
    pp = np.concatenate([p, rng.normal(size=(2 * k, d)).astype(np.float32)])
    smask = np.arange(b + 3) < b
    cmask = np.arange(c + 2) < c
    plain, gx, gp = _soft_triple_value_and_grad(x, y, p, k)
    padded, gxp, gpp = _soft_triple_value_and_grad(
        xp, yp, pp, k, proxy_mask=cmask, sample_mask=smask)
    assert_rel_close(padded, plain)
    assert_rel_close(gxp[:b], gx)
    assert_rel_close(gpp[: c * k], gp)
    assert np.all(gxp[b:] == 0) and np.all(gpp[c * k:] == 0)


def test_soft_triple_masked_class_equals_removed_class():
    b, c, k, d = 16, 5, 3, 8
    x, y, p = _soft_triple_batch(5, b, c, k, d)
    y = np.where(y == 2, 0, y).astype(np.int32)  # class 2 has no sample
    keep = np.arange(c) != 2
    masked = losses.soft_triple(x, y, p, centers_per_class=k, proxy_mask=keep)
    removed = losses.soft_triple(x, np.where(y > 2, y - 1, y).astype(np.int32),
                                 p[np.repeat(keep, k)], centers_per_class=k)
    assert_rel_close(masked, removed)


def test_soft_triple_check_grads_and_vmap():
    with jax.enable_x64(True):
        x, y, p = _soft_triple_batch(6, 8, 3, 3, 5)
        x, p = x.astype(np.float64), p.astype(np.float64)
        check_grads(lambda a, q: losses.soft_triple(a, y, q, centers_per_class=3), (x, p),
                    order=1, modes=("rev",))
    xs, ys, ps = map(np.stack, zip(*[_soft_triple_batch(s, 8, 3, 2, 6) for s in range(3)]))
    fn = lambda a, b_, q: losses.soft_triple(a, b_, q, centers_per_class=2)  # noqa: E731
    single = np.array([fn(xs[i], ys[i], ps[i]) for i in range(3)])
    assert_rel_close(jax.jit(jax.vmap(fn))(xs, ys, ps), single)


def test_soft_triple_bfloat16_inputs_give_finite_loss_and_grads():
    x, y, p = _soft_triple_batch(7, 32, 8, 10, 32)
    x, p = jnp.asarray(x * 10, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)
    loss, gx, gp = _soft_triple_value_and_grad(x, y, p, 10)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert np.all(np.isfinite(np.asarray(gx, np.float32)))
    assert np.all(np.isfinite(np.asarray(gp, np.float32)))


def test_soft_triple_bad_input_names_the_argument():
    x, y, p = _soft_triple_batch(8, 8, 4, 3, 6)
    with pytest.raises(ValueError, match="multiple of centers_per_class=5"):
        losses.soft_triple(x, y, p, centers_per_class=5)
    with pytest.raises(ValueError, match="centers_per_class must be an int"):
        losses.soft_triple(x, y, p, centers_per_class=0)
    with pytest.raises(ValueError, match=r"proxy_mask must have shape \(4,\), one entry per class"):
        losses.soft_triple(x, y, p, centers_per_class=3, proxy_mask=np.ones(12, bool))
    with pytest.raises(ValueError, match="sample_mask"):
        losses.soft_triple(x, y, p, centers_per_class=3, sample_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="labels"):
        jax.jit(lambda a, b_, q: losses.soft_triple(a, b_, q, centers_per_class=3))(x, y[:-1], p)
