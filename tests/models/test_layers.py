"""proxy_jax.models.layers.BatchNorm in training mode: torch's rule, or MXNet's.

The reference is ``torch.nn.BatchNorm2d`` itself (train mode, several batches in a row) and,
for the biased rule, MXNet's update written out in float64 (``BatchNormBackwardImpl``:
``moving = momentum_mx * moving + (1 - momentum_mx) * var``, ``var`` the biased variance the
forward normalized with, ``momentum_mx = 1 - momentum``). A ResNet-18 in training mode checks
that every backbone layer receives the rule from the model.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from proxy_jax.convert import convert_state_dict
from proxy_jax.models import BatchNormRule, create_model, load_pretrained, save_weights
from proxy_jax.models.layers import BatchNorm

torch.set_num_threads(1)

C = 5


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _batches(n=3, shape=(4, 3, 6, C)):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=shape) * (1 + i) + i).astype(np.float32) for i in range(n)]


def _flax_updates(rule, batches):
    """Outputs [B, H, W, C] and (mean, var) [C] after each batch, from the Flax BatchNorm."""
    bn = BatchNorm(frozen=False, rule=rule)
    variables = bn.init(jax.random.PRNGKey(0), batches[0])
    apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
    outputs, stats = [], []
    for x in batches:
        y, updates = apply(variables, x)
        variables = {**variables, **updates}
        outputs.append(np.asarray(y))
        stats.append((np.asarray(updates["batch_stats"]["mean"]),
                      np.asarray(updates["batch_stats"]["var"])))
    return outputs, stats


@pytest.mark.parametrize("momentum", [0.1, 0.9])
def test_training_batchnorm_matches_torch(momentum):
    batches = _batches()
    outputs, stats = _flax_updates(BatchNormRule(momentum), batches)
    ref = torch.nn.BatchNorm2d(C, momentum=momentum).train()
    for x, y, (mean, var) in zip(batches, outputs, stats):
        with torch.no_grad():
            t = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(y, t, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean, ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, ref.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_biased_rule_is_mxnets_update():
    batches = _batches()
    momentum = 0.1  # gluon's BatchNorm(momentum=0.9)
    _, stats = _flax_updates(BatchNormRule(momentum, unbiased_var=False), batches)
    moving_mean, moving_var = np.zeros(C), np.ones(C)
    for x, (mean, var) in zip(batches, stats):
        x64 = x.astype(np.float64).reshape(-1, C)
        moving_mean = 0.9 * moving_mean + 0.1 * x64.mean(0)
        moving_var = 0.9 * moving_var + 0.1 * x64.var(0)  # biased: divides by n
        np.testing.assert_allclose(mean, moving_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, moving_var, rtol=1e-5, atol=1e-6)
    # ... which differs from torch's by n / (n - 1) on the new batch's share.
    _, unbiased = _flax_updates(BatchNormRule(momentum), batches)
    assert not np.allclose(unbiased[0][1], stats[0][1], rtol=1e-4)


def test_frozen_and_bfloat16():
    x = _batches(1)[0]
    bn = BatchNorm(frozen=True, rule=BatchNormRule(0.9))
    variables = bn.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(bn.apply(variables, x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    half = BatchNorm(frozen=False, dtype=jnp.bfloat16)
    y, updates = half.apply(variables, jnp.asarray(x, jnp.bfloat16), mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and updates["batch_stats"]["var"].dtype == jnp.float32
    _, float_stats = _flax_updates(BatchNormRule(), [x])
    np.testing.assert_allclose(updates["batch_stats"]["mean"], float_stats[0][0], atol=2e-2)


def test_resnet_in_training_mode_updates_like_torch(tmp_path):
    # Proxy-Anchor's recipe with trained BatchNorm, at torch momentum 0.9, through the model.
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.9
    trunk = torch.nn.Sequential(*list(net.children())[:-2]).train()
    path = str(tmp_path / "resnet18.npz")
    save_weights(path, convert_state_dict(net.state_dict(), "resnet18"), arch="resnet18")
    model = create_model(backbone="resnet18", embedding_dim=4, freeze_bn=False,
                         bn_rule=BatchNormRule(0.9))
    images = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    variables = load_pretrained(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                                path, "resnet18")
    variables["params"]["embedding"] = jax.tree.map(np.ones_like, variables["params"]["embedding"])
    features, updates = jax.jit(lambda v, x: model.apply(
        v, x, train=True, method="features", mutable=["batch_stats"]))(variables, images)
    with torch.no_grad():
        t_features = trunk(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    # Training BatchNorm over few values amplifies rounding: compare to the largest value.
    assert _relative_error(features, t_features.permute(0, 2, 3, 1).numpy()) < 1e-4
    stats = updates["batch_stats"]["backbone"]
    for name, got in (("bn1", stats["bn1"]), ("layer4.1.bn2", stats["layer4"]["1"]["bn2"])):
        module = dict(trunk.named_modules())[{"bn1": "1", "layer4.1.bn2": "7.1.bn2"}[name]]
        assert _relative_error(got["mean"], module.running_mean.numpy()) < 1e-4, name
        assert _relative_error(got["var"], module.running_var.numpy()) < 1e-4, name


def test_masked_statistics_are_those_of_the_marked_rows():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, C)).astype(np.float32)
    mask = np.array([True, False, True, True, False, True])
    bn = BatchNorm(frozen=False, rule=BatchNormRule(0.9))
    variables = bn.init(jax.random.PRNGKey(0), x)
    y, updates = bn.apply(variables, x, mask=mask[:, None], mutable=["batch_stats"])
    ref = torch.nn.BatchNorm1d(C, momentum=0.9).train()
    with torch.no_grad():
        ref(torch.from_numpy(x[mask]))
    np.testing.assert_allclose(updates["batch_stats"]["var"], ref.running_var.numpy(), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], ref.running_mean.numpy(),
                               rtol=1e-5, atol=1e-6)
    mean, var = x[mask].mean(0), x[mask].var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
