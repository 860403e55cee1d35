"""The ViT training conventions of proxy_jax.optim and the proxy method: the warm-up +
cosine schedule, layer-wise learning-rate decay, the patch embedding's own freeze, the
global-norm clip, and the checks of their config fields."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proxy_jax import config_utils, models, optim
from proxy_jax.methods import proxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
    c = config_utils.load_config_file(os.path.join(REPO, "configs", "default.py"))
    c.update_from_flattened_dict({"model.backbone": "vit_tiny_test", "model.pooling": "cls",
                                  "optimizer.name": "adamw", **changes})
    return c


def _params():
    model = models.create_model(backbone="vit_tiny_test", embedding_dim=4, pooling="cls")
    params = dict(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"])
    params["proxies"] = jnp.ones((3, 4))
    return params


def test_warmup_cosine_schedule():
    c = _config(**{"optimizer.schedule": "warmup_cosine", "optimizer.lr_warmup_epochs": 2,
                   "optimizer.cosine_epochs": 10, "optimizer.final_lr_ratio": 0.1})
    fn = optim.learning_rate_fn(2.0, c.optimizer, 5)  # W = 10 steps, T = 50 steps
    steps = np.array([0, 5, 10, 30, 50, 80])
    cos = 0.5 * (1 + np.cos(np.pi * (steps - 10) / 40))
    expected = np.where(steps < 10, 2.0 * steps / 10,
                        np.where(steps < 50, 0.2 + (2.0 - 0.2) * cos, 0.2))
    np.testing.assert_allclose([float(fn(s)) for s in steps], expected, rtol=1e-5, atol=1e-7)
    delayed = optim.learning_rate_fn(2.0, c.optimizer, 5, delay_epochs=1)
    np.testing.assert_allclose(float(delayed(5 + 5)), float(fn(5)), rtol=1e-6)


def test_layer_decay_scales_number_the_blocks():
    params = _params()
    scales = optim.layer_decay_scales(params, decay=0.5, depth=2)
    b = scales["backbone"]
    assert b["patch_embed"]["proj"]["kernel"] == b["cls_token"] == b["pos_embed"] == 0.5 ** 3
    assert b["blocks"]["0"]["attn"]["qkv"]["kernel"] == 0.5 ** 2
    assert b["blocks"]["1"]["mlp"]["fc2"]["bias"] == 0.5
    assert b["norm"]["scale"] == 1.0
    assert scales["embedding"]["kernel"] == scales["proxies"] == 1.0


def _updates(config, params, grads, *, steps=1, steps_per_epoch=1):
    groups = proxy.optimizer_groups(config, steps_per_epoch=steps_per_epoch, uses_proxies=True)
    labels = optim.param_labels(params, patch_embed_group="patch_embed" in groups)
    tx = proxy.make_tx(config, groups, params, labels, steps_per_epoch=steps_per_epoch)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        out.append(updates)
    return out


def test_layer_decay_scales_each_update():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    plain = _updates(_config(), params, grads)[0]
    decayed = _updates(_config(**{"optimizer.layer_decay": 0.5}), params, grads)[0]
    scales = optim.layer_decay_scales(params, decay=0.5, depth=2)
    jax.tree.map(lambda d, p, s: np.testing.assert_allclose(d, p * s, rtol=1e-6, atol=1e-12),
                 decayed, plain, scales)


def test_patch_embedding_frozen_for_its_epochs():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    c = _config(**{"optimizer.freeze_patch_embed_epochs": 2})
    updates = _updates(c, params, grads, steps=5, steps_per_epoch=2)
    for step, u in enumerate(updates):
        frozen = step < 4
        patch = jax.tree.leaves(u["backbone"]["patch_embed"])
        assert all(not np.any(np.asarray(x)) for x in patch) == frozen, step
        assert np.any(np.asarray(u["backbone"]["blocks"]["0"]["attn"]["qkv"]["kernel"]))
    rates = optim.learning_rates(c.optimizer, proxy.optimizer_groups(
        c, steps_per_epoch=2, uses_proxies=True), 3, steps_per_epoch=2,
        frozen_until={"patch_embed": 4})
    assert rates["lr/patch_embed"] == 0.0 and rates["lr/backbone"] > 0


def test_global_norm_clip_acts_on_all_gradients():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    norm = float(optax.global_norm(grads))
    clipped = _updates(_config(**{"optimizer.grad_clip_norm": 1.0}), params, grads)[0]
    by_hand = _updates(_config(), params, jax.tree.map(lambda g: g / norm, grads))[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
                 clipped, by_hand)


@pytest.mark.parametrize("changes, message", [
    ({"optimizer.schedule": "warmup_cosine", "optimizer.lr_warmup_epochs": 3,
      "optimizer.cosine_epochs": 3}, "config.optimizer.cosine_epochs \\(3\\) must exceed"),
    ({"optimizer.final_lr_ratio": 1.5}, "config.optimizer.final_lr_ratio must lie in"),
    ({"optimizer.layer_decay": 0.0}, "config.optimizer.layer_decay must lie in"),
    ({"optimizer.layer_decay": 0.7, "model.backbone": "resnet18", "model.pooling": "gap"},
     "config.optimizer.layer_decay needs a ViT backbone"),
    ({"optimizer.freeze_patch_embed_epochs": -1},
     "config.optimizer.freeze_patch_embed_epochs must be >= 0"),
    ({"optimizer.freeze_patch_embed_epochs": 1, "model.backbone": "tiny_cnn",
      "model.pooling": "gap"}, "freeze_patch_embed_epochs needs a ViT backbone"),
])
def test_vit_optimizer_fields_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        config_utils.validate(_config(**changes))
