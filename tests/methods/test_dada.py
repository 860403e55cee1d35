"""DADA as a method of the trainer (proxy_jax.methods.dada): the LayerNorm head, the official
schedules of the three optimizers, the DADA step on 1 and 8 devices, exact resume through
the trainer's loop and checkpoints, and the configs against the official yaml files (one
step of every config on tiny shapes runs in tests/test_configs.py)."""

import bisect
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dada_base
from proxy_jax import checkpoints, config_utils, methods, models, optim, parallel, train
from proxy_jax.data import samplers
from proxy_jax.methods import dada as dada_method

DADA_CONFIGS = ("dada_cub200", "dada_cars196", "dada_sop", "dada_inshop")


pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture
def dada_config(tiny_config):
    """``make(name, root, **changes)``: the DADA config ``name`` with its real game,
    optimizers, schedule, warm-ups and BatchNorm mode on one device; only the network and
    the data shrink (conftest's ``tiny_config``)."""
    return lambda name, root, **changes: tiny_config(root, name, num_devices=1, **changes)


# ---------------------------------------------------------------------------- the head

def test_layer_norm_head_is_torch_layernorm_without_affine():
    torch = pytest.importorskip("torch")
    model = models.create_model(backbone="tiny_cnn", embedding_dim=6, l2_normalize=False,
                                layer_norm=True)
    plain = models.create_model(backbone="tiny_cnn", embedding_dim=6, l2_normalize=False)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    # No parameters added: the same variables drive the model without the head.
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(plain.init, jax.random.PRNGKey(0), images))
    default = models.create_model(backbone="tiny_cnn", embedding_dim=6)
    z, out, l2 = jax.jit(lambda v, x: (plain.apply(v, x), model.apply(v, x),
                                       default.apply(v, x)))(variables, images)
    expected = torch.nn.LayerNorm(6, elementwise_affine=False)(torch.tensor(np.asarray(z)))
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)
    # The default is unchanged: l2-normalized output.
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------- the schedules

def _official_lrs(base, epochs, *, kind, warmup, d_warmup, step=1, rate=0.5, milestones=()):
    """Learning rate per epoch of a torch scheduler stepped as the official main.py does:
    once after each epoch that is past both warm-ups.

    After n scheduler steps torch's StepLR gives ``base·rate^⌊n/step⌋`` and MultiStepLR
    ``base·rate^(number of milestones ≤ n)`` (their documented closed forms). They are
    written out here rather than run: constructing a torch optimizer imports torch's compiler
    stack (triton), which segfaulted test workers that already had XLA loaded.
    """
    lrs, n = [], 0
    for epoch in range(epochs):
        if kind == "step_lr":
            lrs.append(base * rate ** (n // step))
        else:
            lrs.append(base * rate ** bisect.bisect_right(sorted(milestones), n))
        if epoch >= warmup and epoch >= d_warmup:
            n += 1
    return np.asarray(lrs)


@pytest.mark.parametrize("kind", ["step_lr", "multistep_lr"])
def test_three_optimizers_follow_the_official_schedules_and_warm_ups(kind):
    c = dada_base.get_config()  # the official parameters.py defaults (Adam eps 1e-8)
    c.optimizer.schedule, c.optimizer.decay_step, c.optimizer.decay_epochs = kind, 1, (1, 3)
    c.optimizer.warmup_epochs, c.dada.d_warmup_epochs = 3, 1
    c.dada.d_step, c.dada.g_step = 2, 2
    c.optimizer.weight_decay = c.dada.disc_weight_decay = 0.0
    c.optimizer.backbone_lr = c.optimizer.embedding_lr = 0.1
    c.optimizer.proxy_lr, c.dada.disc_lr = 0.4, 0.2
    spe, epochs = 3, 7
    gen = {"backbone": jnp.zeros(1), "embedding": jnp.zeros(1), "proxies": jnp.zeros(1)}
    disc = {"disc": jnp.zeros(1)}
    gen_tx, disc_tx = dada_method.make_optimizers(c, gen, disc, steps_per_epoch=spe)
    gen_state, disc_state = gen_tx.init(gen), disc_tx.init(disc)
    ones = lambda tree: jax.tree.map(jnp.ones_like, tree)  # noqa: E731
    seen = {k: np.zeros(epochs) for k in ("backbone", "embedding", "proxies", "disc")}
    for step in range(epochs * spe):
        epoch = step // spe
        # dada_update's call pattern: d_step discriminator updates every batch, g_step
        # generator updates from epoch d_warmup on. With a constant gradient of 1 (and no
        # decay) every Adam step is -lr (up to eps and float32 bias correction, ~1e-5),
        # so the updates read the rates.
        for _ in range(2):
            u, disc_state = disc_tx.update(ones(disc), disc_state, disc)
            seen["disc"][epoch] = -float(u["disc"][0])
        if epoch >= 1:
            for _ in range(2):
                u, gen_state = gen_tx.update(ones(gen), gen_state, gen)
                for k in ("backbone", "embedding", "proxies"):
                    seen[k][epoch] = -float(u[k][0])
    kw = dict(kind=kind, warmup=3, d_warmup=1, step=1, rate=0.5, milestones=(1, 3))
    np.testing.assert_allclose(seen["disc"], _official_lrs(0.2, epochs, **kw), rtol=1e-4)
    for k, base in (("embedding", 0.1), ("proxies", 0.4)):
        expected = _official_lrs(base, epochs, **kw)
        expected[0] = 0.0  # discriminator warm-up: no generator update
        np.testing.assert_allclose(seen[k], expected, rtol=1e-4)
    backbone = _official_lrs(0.1, epochs, **kw)
    backbone[:3] = 0.0  # frozen for warmup = 3 epochs (the first one is the d_warmup too)
    np.testing.assert_allclose(seen["backbone"], backbone, rtol=1e-4)
    # The logged rates are the applied ones.
    logged = [dada_method.learning_rates(c, e * spe, steps_per_epoch=spe) for e in range(epochs)]
    for k in seen:
        np.testing.assert_allclose([r[f"lr/{k}"] for r in logged], seen[k], rtol=1e-4)
    # The one schedule function of every method, delayed by both warm-ups, is the official
    # rule at every step of every epoch (the scheduler steps between epochs only).
    fn = optim.learning_rate_fn(0.2, c.optimizer, spe, delay_epochs=3)
    np.testing.assert_allclose([float(fn(s)) for s in range(epochs * spe)],
                               np.repeat(_official_lrs(0.2, epochs, **kw), spe), rtol=1e-6)


# ------------------------------------------------------------- device-count invariance

def _run_steps(run, num_devices, num_steps=2):
    """``num_steps`` DADA steps from ``run.state`` on fixed global batches, ``num_devices``."""
    mesh = parallel.make_mesh(num_devices)
    state = parallel.replicate(jax.device_get(run.state), mesh)
    step = parallel.parallelize(run.plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(num_steps):
        classes = rng.permutation(4)
        batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                 "label": np.repeat(classes, 2).astype(np.int32)}
        run.plan.check_batch(batch["label"])
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return history, jax.device_get(state)


def test_dada_step_is_independent_of_the_device_count(tiny_root, dada_config):
    # Adam eps 0.01 as in the trainer's own device test: with torch's 1e-8, Adam's first
    # step is ±lr for any non-zero gradient, and gradients that are ~0 (summed in another
    # order on 8 devices) would flip whole steps. One epoch = one step: step 0 is the
    # discriminator warm-up, step 1 a full DADA step.
    config = dada_config("dada_cub200", tiny_root, steps_per_epoch=1, **{"optimizer.eps": 0.01})
    run = train.build(config)
    initial = jax.device_get(run.state)
    one, state_1 = _run_steps(run, 1)
    eight, state_8 = _run_steps(run, 8)

    # The warm-up step trained the discriminators only; the full step trained everything.
    assert one[0]["gen_loss"] == 0.0 and one[1]["gen_loss"] != 0.0
    for m in one + eight:
        assert m["pair_count"] == 4.0  # 4 classes of 2 samples: 4 pairs
        assert all(np.isfinite(v) for v in m.values())
    for a, b in zip(one, eight):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    leaves_1 = jax.tree_util.tree_leaves_with_path(
        (state_1.params, state_1.batch_stats, state_1.extra))
    leaves_8 = jax.tree.leaves((state_8.params, state_8.batch_stats, state_8.extra))
    for (path, a), b in zip(leaves_1, leaves_8):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                         state_1.params, initial.params))
    assert max(moved) > 0.0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                         state_1.extra["discriminators"]["params"],
                                         initial.extra["discriminators"]["params"]))
    assert max(moved) > 0.0


def test_trained_batchnorm_moves_once_per_official_forward(tiny_root, dada_config):
    # The official loop runs every forward in training mode: the no-grad one (always) and
    # the first gradient one (after the discriminator warm-up). So the network's running
    # statistics move once in a warm-up step and twice in a full step (g_step 1), each time
    # by the batch's own statistics (the network's weights are the same in both forwards).
    config = dada_config("dada_sop", tiny_root, steps_per_epoch=1)
    assert not config.model.freeze_bn and config.dada.d_warmup_epochs == 1
    run = train.build(config)
    mesh = parallel.make_mesh(1)
    state = parallel.replicate(jax.device_get(run.state), mesh)
    step = parallel.parallelize(run.plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": np.repeat(rng.permutation(4), 2).astype(np.int32)}

    def forward(params, stats):  # one training-mode forward: the statistics it leaves
        net = {k: v for k, v in params.items() if k in ("backbone", "embedding")}
        _, updates = run.model.apply({"params": net, "batch_stats": stats}, batch["image"],
                                     train=True, mutable=["batch_stats"])
        return updates["batch_stats"]

    before = jax.device_get(state)
    warm, _ = step(state, parallel.shard_batch(batch, mesh))  # step 0: the warm-up
    warm = jax.device_get(warm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 warm.batch_stats, forward(before.params, before.batch_stats))
    full, metrics = step(parallel.replicate(warm, mesh), parallel.shard_batch(batch, mesh))
    full = jax.device_get(full)
    assert float(metrics["gen_loss"]) != 0.0  # the generator did update
    twice = forward(warm.params, forward(warm.params, warm.batch_stats))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 full.batch_stats, twice)
    once = forward(warm.params, warm.batch_stats)
    assert not np.allclose(full.batch_stats["backbone"]["bn1"]["mean"],
                           once["backbone"]["bn1"]["mean"], rtol=1e-3)


# ---------------------------------------------------------------------------- resume

def _latest(workdir, run):
    checkpointer = checkpoints.Checkpointer(workdir)
    try:
        state, record, _ = checkpointer.restore(jax.device_get(run.state))
    finally:
        checkpointer.close()
    return jax.device_get(state), record


def test_resumed_dada_run_equals_uninterrupted(tiny_root, tmp_path, dada_config):
    # 3 steps per epoch, stopped mid-epoch 1 (after the discriminator warm-up): the
    # discriminators, their BatchNorm statistics and optimizer, the generator optimizer, the
    # key and the loader position must all come back.
    config = dada_config("dada_cub200", tiny_root, num_train_steps=5, steps_per_epoch=3,
                         **{"eval.every_epochs": 100})
    short = config.copy_and_resolve_references()
    short.num_train_steps = 4
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    assert train.train_and_evaluate(short, interrupted)["step"] == 4
    resumed = train.train_and_evaluate(config, interrupted)
    uninterrupted = train.train_and_evaluate(config, straight)
    assert resumed["step"] == uninterrupted["step"] == 5
    run = train.build(config)
    a, record = _latest(interrupted, run)
    b, _ = _latest(straight, run)
    assert record["step"] == 5
    assert "extra/discriminators/params/disc/domain/fc1/kernel" in record["shapes"]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert resumed["recall@1"] == pytest.approx(uninterrupted["recall@1"])


# --------------------------------------------------------------------------- configs

# Official flag -> proxy_jax field, and the value of every flag after parameters.py's
# defaults and the config's yaml file (Noahsark/DADA configs/*.yaml, read by hand).
FLAGS = {
    "n_epochs": "num_epochs", "batch_size": "data.batch_size",
    "samples_per_class": "data.n_instance", "lr": "optimizer.backbone_lr",
    "decay": "optimizer.weight_decay", "warmup": "optimizer.warmup_epochs",
    "lr_reduce_rate": "optimizer.decay_rate", "loss_adv_proxy_lr": "optimizer.proxy_lr",
    "loss_adv_classifier_lr": "dada.disc_lr", "dis_decay": "dada.disc_weight_decay",
    "d_warmup": "dada.d_warmup_epochs", "d_step": "dada.d_step", "g_step": "dada.g_step",
    "fd2_bn": "dada.domain_final_bn", "fc2_bn": "dada.class_final_bn",
    "fd_fc1_dim": "dada.domain_hidden_dim", "pos_class_mix": "dada.pos_class_mix",
    "d_dis_ratio": "dada.d_dis_ratio", "d_discrepancy_ratio": "dada.d_discrepancy_ratio",
    "oproxy_ratio": "dada.oproxy_ratio", "dis_gamma": "dada.dis_gamma",
    "loss_oproxy_pos_alpha": "dada.pos_alpha", "loss_oproxy_neg_alpha": "dada.neg_alpha",
    "loss_oproxy_pos_delta": "dada.pos_delta", "loss_oproxy_neg_delta": "dada.neg_delta",
    "mix_alpha": "dada.mix_alpha", "mix_beta": "dada.mix_beta", "mix_mode": "dada.mix_mode",
    "shift_scale": "dada.shift_scale", "dis_mode": "dada.dis_mode", "dropout": "dada.dropout",
    "embed_dim": "model.embedding_dim",
}
DEFAULTS = dict(n_epochs=50, batch_size=90, samples_per_class=2, lr=1e-4, decay=4e-4,
                warmup=1, lr_reduce_rate=0.5, loss_adv_proxy_lr=0.04,
                loss_adv_classifier_lr=5e-4, dis_decay=1e-4, d_warmup=1, d_step=3, g_step=1,
                fd2_bn=False, fc2_bn=False, fd_fc1_dim=512, pos_class_mix=False,
                d_dis_ratio=0.01, d_discrepancy_ratio=0.5, oproxy_ratio=0.0075, dis_gamma=1.0,
                loss_oproxy_pos_alpha=32.0, loss_oproxy_neg_alpha=32.0,
                loss_oproxy_pos_delta=0.1, loss_oproxy_neg_delta=-0.1, mix_alpha=0.5,
                mix_beta=0.5, mix_mode="random", shift_scale=1.0, dis_mode="nwd", dropout=0.5,
                embed_dim=512, fc_fc1_dim=512, fc_fc2_dim=128, scheduler="step",
                lr_reduce_step=5, lr_reduce_multi_steps=(20, 45, 70),
                arch="resnet50_frozen_layernorm_double")
YAML = {
    "dada_cars196": dict(n_epochs=60, fd2_bn=True, d_dis_ratio=0.01, decay=1e-4, lr=1.2e-4,
                         lr_reduce_step=10, mix_alpha=2.0, mix_beta=1.0, oproxy_ratio=0.0075,
                         warmup=5),
    "dada_cub200": dict(pos_class_mix=True, batch_size=90, n_epochs=60, lr=1.2e-4, fd2_bn=True,
                        fc2_bn=True, d_dis_ratio=0.005, decay=1e-4, dis_decay=4e-4,
                        loss_oproxy_pos_alpha=40.0, loss_oproxy_neg_alpha=100.0,
                        lr_reduce_step=4, lr_reduce_rate=0.45, mix_alpha=3.0, mix_beta=0.5,
                        oproxy_ratio=0.0075),
    "dada_inshop": dict(n_epochs=200, batch_size=180, fd2_bn=True, fc2_bn=True,
                        pos_class_mix=True, arch="resnet50_layernorm_double", d_dis_ratio=0.01,
                        decay=1e-4, dis_decay=5e-5, fc_fc2_dim=4096, fd_fc1_dim=512,
                        loss_oproxy_neg_alpha=200.0, loss_oproxy_pos_alpha=40.0, lr=1.2e-4,
                        lr_reduce_rate=0.25, lr_reduce_step=40, oproxy_ratio=0.0075,
                        mix_alpha=3.0, mix_beta=3.0, warmup=5),
    "dada_sop": dict(n_epochs=200, batch_size=180, d_dis_ratio=0.05, decay=5e-5, lr=1.2e-4,
                     dis_decay=1e-4, fc_fc1_dim=1024, fc_fc2_dim=8192, fd_fc1_dim=128,
                     loss_oproxy_neg_alpha=200.0, loss_oproxy_pos_alpha=100.0,
                     lr_reduce_rate=0.1, lr_reduce_step=20, mix_alpha=2.0, mix_beta=5.0,
                     oproxy_ratio=0.03, pos_class_mix=True, fd2_bn=True, scheduler="multi",
                     arch="resnet50_layernorm_double"),
}


@pytest.mark.parametrize("name", DADA_CONFIGS)
def test_dada_config_reproduces_the_official_yaml(name):
    """Every official flag of parameters.py + the yaml lands in the config. (One training
    step of every config on tiny shapes runs in tests/test_configs.py.)"""
    config = importlib.import_module(f"configs.{name}").get_config()
    config_utils.validate(config)
    official = {**DEFAULTS, **YAML[name]}
    for flag, path in FLAGS.items():
        node = config
        for part in path.split("."):
            node = node[part]
        assert node == pytest.approx(official[flag]), (flag, path)
    assert config.optimizer.embedding_lr == official["lr"]  # one model group at lr
    assert tuple(config.dada.class_hidden_dims) == (official["fc_fc1_dim"],
                                                    official["fc_fc2_dim"])
    assert config.optimizer.schedule == {"step": "step_lr", "multi": "multistep_lr"}[
        official["scheduler"]]
    if official["scheduler"] == "step":
        assert config.optimizer.decay_step == official["lr_reduce_step"]
    else:
        assert tuple(config.optimizer.decay_epochs) == official["lr_reduce_multi_steps"]
    assert config.model.freeze_bn == ("frozen" in official["arch"])
    assert config.dada.layer_norm_head and not config.model.l2_normalize
    assert config.model.pooling == "gap+gmp" and config.model.backbone == "resnet50"
    assert config.optimizer.eps == 1e-8 and config.optimizer.name == "adam"
    # data_sampler 'class_random' (datasampler/class_random_sampler.py).
    assert config.data.sampler == "classes_with_replacement"


def test_a_dada_config_trains_with_the_dada_step(tiny_root, dada_config):
    # config.method routes a DADA config to DADA's step, state and batch check (the plain
    # proxy step, with one loss, never sees it).
    run = train.build(dada_config("dada_cars196", tiny_root))
    assert run.method is methods.get_method("dada") is dada_method.METHOD
    assert run.plan.step_fn.func is dada_method.train_step
    assert run.plan.describe == {"method": "dada"}
    assert set(run.state.extra) == {"discriminators"}
    assert set(run.state.extra["discriminators"]) == {"params", "batch_stats", "opt_state"}


@pytest.mark.parametrize("changes, message", [
    ({"dada.dis_mode": "l2"}, r"config.dada: dis_mode must be one of"),
    ({"dada.d_step": 0}, r"config.dada.d_step must be >= 1"),
    ({"optimizer.schedule": "step_decay"}, r"config.optimizer.schedule must be one of"),
    # MXNet's iteration-level rule (Embedding Expansion), not torch's MultiStepLR:
    ({"optimizer.schedule": "multistep"}, r"config.optimizer.schedule must be one of"),
    ({"data.n_instance": 1}, r"config.data.n_instance must be >= 2"),
    ({"optimizer.name": "adamw"}, r"config.optimizer.name must be 'adam'"),
    ({"data.batch_size": 0}, r"config.data.batch_size must be >= 1"),
])
def test_validate_names_the_bad_field(changes, message, tiny_root, dada_config):
    with pytest.raises(ValueError, match=message):
        config_utils.validate(dada_config("dada_cub200", tiny_root, **changes))
    # An unknown field is refused by the locked config itself, naming the key.
    config = dada_config("dada_cub200", tiny_root)
    with pytest.raises(AttributeError, match="mix_rate"):
        config.dada.mix_rate = 0.5
    with pytest.raises(KeyError, match="mix_rate"):
        config.update_from_flattened_dict({"dada.mix_rate": 0.5})


def test_dada_takes_batches_with_a_class_drawn_twice(tiny_root, dada_config):
    """DADA's official sampler draws classes with replacement; like the official criterion,
    the step takes such a batch (a class in two groups is one class and one mixed pair)."""
    config = dada_config("dada_cub200", tiny_root, steps_per_epoch=1)
    run = train.build(config)
    assert isinstance(run.sampler, samplers.ClassesWithReplacementSampler)
    assert run.steps_per_epoch == 1
    repeated = np.array([3, 3, 1, 1, 3, 3, 0, 0], np.int32)  # class 3 drawn twice
    run.plan.check_batch(repeated)
    run.plan.check_batch(np.array([3, 3, 1, 1, 0, 0, 2, 1]))  # any batch, as officially
    mesh = parallel.make_mesh(1)
    step = parallel.parallelize(run.plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    state = run.state
    for _ in range(2):  # the discriminator warm-up step, then a full DADA step
        batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                 "label": repeated}
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        metrics = jax.device_get(metrics)
        assert metrics["pair_count"] == 3.0  # classes 0, 1, 3
        assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["gen_loss"] != 0.0
