"""proxy_jax.optim: the schedules of the official scripts, the optimizer against torch's
parameter groups, the backbone's warm-up freeze, frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proxy_jax import config_utils, optim
from proxy_jax.methods import proxy


def _groups(c, params, steps_per_epoch=1):
    """The proxy method's groups (one learning rate per top-level name)."""
    return proxy.optimizer_groups(c, steps_per_epoch=steps_per_epoch,
                                  uses_proxies="proxies" in params)


# ------------------------------------------------------------------ schedules, optimizer

def _schedule(kind, **fields):
    c = config_utils.base_config().optimizer
    c.schedule = kind
    for k, v in fields.items():
        c[k] = v
    return optim.learning_rate_fn(1.0, c, 10)


def test_step_decay_is_proxy_synthesis_adjust_learning_rate():
    # --decay_step=50 --decay_stop=50: 1-based epochs 1..49 at lr, 50.. at 0.1 lr, no more.
    fn = _schedule("step_decay", decay_rate=0.1, decay_step=50, decay_stop=50)
    lrs = {e: float(fn(e * 10)) for e in (0, 48, 49, 50, 99, 129)}
    np.testing.assert_allclose([lrs[0], lrs[48]], [1.0, 1.0])
    np.testing.assert_allclose([lrs[49], lrs[50], lrs[99], lrs[129]], [0.1] * 4, rtol=1e-6)
    fn = _schedule("step_decay", decay_rate=0.5, decay_step=2, decay_stop=-1)
    np.testing.assert_allclose([float(fn(e * 10)) for e in range(5)], [1, .5, .5, .25, .25])


def test_step_lr_and_multistep():
    fn = _schedule("step_lr", decay_rate=0.5, decay_step=10)  # torch StepLR per epoch
    np.testing.assert_allclose([float(fn(e * 10 + 9)) for e in (0, 9, 10, 19, 20)],
                               [1, 1, .5, .5, .25])
    fn = _schedule("multistep", decay_rate=0.5, decay_epochs=(2, 4))  # MXNet MultiFactor
    np.testing.assert_allclose([float(fn(s)) for s in (0, 20, 21, 40, 41, 100)],
                               [1, 1, .5, .5, .25, .25])
    with pytest.raises(ValueError, match="config.optimizer.schedule must be one of"):
        _schedule("cosine")


def _torch_reference(name, grads_seq, params0, *, lrs, eps, wd, clip):
    torch = pytest.importorskip("torch")
    tparams = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params0.items()}
    groups = [{"params": [tparams[k]], "lr": lrs[k]} for k in sorted(params0)]
    opt_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    opt = opt_cls(groups, eps=eps, weight_decay=wd)
    for grads in grads_seq:
        for k, p in tparams.items():
            p.grad = torch.tensor(np.asarray(grads[k]))
        if clip:
            torch.nn.utils.clip_grad_value_(list(tparams.values()), clip)
        opt.step()
    return {k: v.detach().numpy() for k, v in tparams.items()}


@pytest.mark.parametrize("name, clip", [("adam", 0.0), ("adamw", 0.05)])
def test_optimizer_matches_torch_param_groups(name, clip):
    c = config_utils.base_config()
    c.optimizer.name, c.optimizer.eps, c.optimizer.weight_decay = name, 1e-3, 1e-2
    c.optimizer.backbone_lr, c.optimizer.embedding_lr, c.optimizer.proxy_lr = 1e-3, 2e-3, 1e-1
    c.optimizer.grad_clip_value = clip
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
              for k in ("backbone", "embedding", "proxies")}
    grads_seq = [{k: jnp.asarray(rng.normal(size=(3, 4)) * 0.1, jnp.float32) for k in params}
                 for _ in range(3)]
    tx = optim.make_optimizer(c.optimizer, _groups(c, params), optim.param_labels(params),
                              steps_per_epoch=10)
    state, p = tx.init(params), params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    expected = _torch_reference(name, grads_seq, params, eps=1e-3, wd=1e-2, clip=clip,
                                lrs={"backbone": 1e-3, "embedding": 2e-3, "proxies": 1e-1})
    for k in params:
        # float32 round-off of two orders of the same formula: ~2e-6 after 3 steps of 0.1.
        np.testing.assert_allclose(p[k], expected[k], rtol=1e-5, atol=1e-5)


def test_warm_up_freezes_backbone_and_its_optimizer_state():
    c = config_utils.base_config()
    c.optimizer.warmup_epochs = 2
    c.optimizer.weight_decay = 0.1
    params = {"backbone": jnp.ones((2,)), "embedding": jnp.ones((2,))}
    tx = optim.make_optimizer(c.optimizer, _groups(c, params), optim.param_labels(params),
                              steps_per_epoch=1)
    state, p = tx.init(params), params
    grads = {"backbone": jnp.full((2,), 0.5), "embedding": jnp.full((2,), 0.5)}
    update = jax.jit(tx.update)
    history = []
    for _ in range(3):
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
        history.append(p)
    np.testing.assert_array_equal(history[1]["backbone"], params["backbone"])  # 2 frozen steps
    assert float(history[0]["embedding"][0]) != 1.0
    # Step 3 is the backbone's first Adam step: a fresh Adam (count 1) with the same lr.
    c.optimizer.warmup_epochs = 0
    fresh = optim.make_optimizer(c.optimizer, _groups(c, {"backbone": 0}), {"backbone": "backbone"},
                                 steps_per_epoch=1)
    u, _ = fresh.update({"backbone": grads["backbone"]}, fresh.init({"backbone": params["backbone"]}),
                        {"backbone": params["backbone"]})
    np.testing.assert_allclose(history[2]["backbone"], params["backbone"] + u["backbone"], rtol=1e-6)


def test_frozen_group_never_moves():
    c = config_utils.base_config()
    params = {"backbone": {"bn": jnp.ones((2,)), "conv": jnp.ones((2,))}, "embedding": jnp.ones(2)}
    labels = optim.param_labels(params, frozen_mask={"backbone": {"bn": True, "conv": False}})
    assert labels["backbone"] == {"bn": "frozen", "conv": "backbone"}
    tx = optim.make_optimizer(c.optimizer, _groups(c, params), labels, steps_per_epoch=1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["backbone"]["bn"]).max()) == 0.0
    assert float(jnp.abs(updates["backbone"]["conv"]).max()) > 0.0


def test_multistep_lr_is_torch_multisteplr_per_epoch_with_delay():
    # DADA --scheduler multi: MultiStepLR stepped after each epoch past the warm-ups (2).
    c = config_utils.base_config().optimizer
    c.schedule, c.decay_rate, c.decay_epochs = "multistep_lr", 0.5, (1, 3)
    fn = optim.learning_rate_fn(1.0, c, 10, delay_epochs=2)
    np.testing.assert_allclose([float(fn(e * 10)) for e in range(7)],
                               [1, 1, 1, .5, .5, .25, .25])
    c.schedule, c.decay_step = "step_lr", 2  # StepLR with the same delay
    fn = optim.learning_rate_fn(1.0, c, 10, delay_epochs=2)
    np.testing.assert_allclose([float(fn(e * 10 + 9)) for e in range(7)],
                               [1, 1, 1, 1, .5, .5, .25])


def test_groups_map_their_update_count_to_the_trainer_step():
    # A group updated 3 times a step (DADA's discriminators) follows the schedule of the
    # trainer's step, not of its own count.
    c = config_utils.base_config().optimizer
    c.schedule, c.decay_rate, c.decay_step, c.eps = "step_lr", 0.5, 1, 1e-8
    groups = {"disc": optim.Group(1.0, 0.0, step_of_update=lambda count: count // 3)}
    tx = optim.make_optimizer(c, groups, {"disc": "disc"}, steps_per_epoch=2)
    params, state = {"disc": jnp.zeros(())}, None
    state = tx.init(params)
    moves = []
    for _ in range(12):  # 4 trainer steps = 2 epochs
        updates, state = tx.update({"disc": jnp.ones(())}, state, params)
        moves.append(float(updates["disc"]))
    # Adam with a constant gradient moves by -lr each update: lr 1 in epoch 0, 0.5 in epoch 1.
    np.testing.assert_allclose(moves, [-1.0] * 6 + [-0.5] * 6, rtol=1e-4)
    assert optim.learning_rates(c, groups, 3, steps_per_epoch=2) == {"lr/disc": 0.5}
