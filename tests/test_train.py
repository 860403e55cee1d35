"""proxy_jax.train: schedules, optimizer parity with torch, warm-up, device-count invariance,
exact resume after SIGTERM, NaN stop, incompatible workdir."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proxy_jax import checkpoints, config_utils, train, xla_flags
from proxy_jax.objective import make_objective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(root, **changes):
    c = config_utils.load_config_file(os.path.join(REPO, "configs", "default.py"))
    c.data.dataset = "folder"
    c.data.root = root
    c.data.input_size = c.data.resize = 16
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.data.num_workers = 0
    c.model.embedding_dim = 8
    c.log_every_steps = 1
    c.eval.nmi = False
    c.eval.num_queries = 0
    c.eval.map_points = 0
    return config_utils.override(c, changes)


# ------------------------------------------------------------------ schedules, optimizer

def _schedule(kind, **fields):
    c = config_utils.base_config().optimizer
    c.schedule = kind
    for k, v in fields.items():
        c[k] = v
    return train.learning_rate_fn(1.0, c, 10)


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
    tx = train.make_optimizer(c, train.param_labels(params), steps_per_epoch=10)
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
    tx = train.make_optimizer(c, train.param_labels(params), steps_per_epoch=1)
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
    fresh = train.make_optimizer(c, {"backbone": "backbone"}, steps_per_epoch=1)
    u, _ = fresh.update({"backbone": grads["backbone"]}, fresh.init({"backbone": params["backbone"]}),
                        {"backbone": params["backbone"]})
    np.testing.assert_allclose(history[2]["backbone"], params["backbone"] + u["backbone"], rtol=1e-6)


def test_frozen_group_never_moves():
    c = config_utils.base_config()
    params = {"backbone": {"bn": jnp.ones((2,)), "conv": jnp.ones((2,))}, "embedding": jnp.ones(2)}
    labels = train.param_labels(params, frozen_mask={"backbone": {"bn": True, "conv": False}})
    assert labels["backbone"] == {"bn": "frozen", "conv": "backbone"}
    tx = train.make_optimizer(c, labels, steps_per_epoch=1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["backbone"]["bn"]).max()) == 0.0
    assert float(jnp.abs(updates["backbone"]["conv"]).max()) > 0.0


# ------------------------------------------------------------------ device invariance

def _initial(config):
    model = train.create_model(config)
    objective = make_objective(config, num_classes=4, global_batch_size=8)

    def tx_factory(params, variables):
        return train.make_optimizer(config, train.param_labels(params), steps_per_epoch=2)

    state, tx = train.create_train_state(config, model, objective, tx_factory, num_classes=4)
    return model, objective, tx, jax.device_get(state)


def _one_run(config, initial, num_devices, num_steps):
    """``num_steps`` train steps from ``initial`` on fixed global batches, ``num_devices``."""
    model, objective, tx, state = initial
    mesh = train.make_mesh(num_devices)
    state = train.replicate(state, mesh)
    step = train.parallelize(train.train_step, mesh, model=model, tx=tx, objective=objective,
                             steps_per_epoch=2, freeze_bn=config.model.freeze_bn)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(num_steps):
        batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                 "label": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)[rng.permutation(8)]}
        state, metrics = step(state, train.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


@pytest.mark.parametrize("changes, num_steps", [
    ({"regularizer.name": "ps", "regularizer.ps_mu": 1.0}, 1),  # Norm-SoftMax + PS
    ({"loss.name": "proxy_anchor", "optimizer.grad_clip_value": 10.0,
      "optimizer.name": "adamw"}, 1),  # Proxy-Anchor, BatchNorm training (global statistics)
    ({"regularizer.name": "memvir", "regularizer.memvir_num_steps": 2,
      "regularizer.memvir_step_gap": 0, "loss.name": "proxy_nca"}, 3),  # MemVir, memory used
], ids=["norm_softmax_ps", "proxy_anchor", "memvir"])
def test_step_is_independent_of_the_device_count(tiny_root, changes, num_steps):
    # Adam's eps of the Proxy Synthesis / MemVir seeds (0.01). With eps=1e-8 Adam's first
    # step is ±lr for any non-zero gradient, so the float32 round-off of gradients that
    # are ~0 (summed in a different order on 1 or 8 devices) would flip whole steps.
    config = tiny_config(tiny_root, **{"optimizer.eps": 0.01, **changes})
    assert not config.model.freeze_bn  # the batch statistics must be global too
    initial = _initial(config)
    reference_losses, reference = _one_run(config, initial, 1, num_steps)
    assert np.all(np.isfinite(reference_losses))
    for n in (2, 8):
        losses, state = _one_run(config, initial, n, num_steps)
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.memory)),
                        jax.tree.leaves((reference.params, reference.batch_stats,
                                         reference.memory))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_step_is_independent_of_the_convolution_implementation(tiny_root, monkeypatch):
    """oneDNN convolutions (what a one-device CPU run uses) and XLA's give the same training
    (tiny_cnn, BatchNorm trained, Norm-SoftMax + PS, 2 steps)."""
    config = tiny_config(tiny_root, **{"optimizer.eps": 0.01, "regularizer.name": "ps"})
    initial = _initial(config)
    runs = {}
    for conv in ("xla", "onednn"):
        monkeypatch.setenv("PROXY_JAX_CONV", conv)
        runs[conv] = _one_run(config, initial, 1, 2)
    (xla_losses, xla_state), (losses, state) = runs["xla"], runs["onednn"]
    np.testing.assert_allclose(losses, xla_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                    jax.tree.leaves((xla_state.params, xla_state.batch_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_memvir_step_updates_the_memory_without_copying_it(tiny_root):
    """With main.py's XLA flags (proxy_jax.xla_flags, applied by conftest), the compiled
    MemVir step (fused Norm-SoftMax, cache included) updates the donated memory in place:
    no copy of a memory-sized buffer. XLA's default copy analysis makes six."""
    config = tiny_config(tiny_root, **{"regularizer.name": "memvir",
                                       "regularizer.memvir_num_steps": 3,
                                       "regularizer.memvir_step_gap": 1})
    assert all(flag in os.environ["XLA_FLAGS"].split() for flag in xla_flags.CPU_FLAGS)
    model, objective, tx, state = _initial(config)
    mesh = train.make_mesh(1)
    step = train.parallelize(train.train_step, mesh, model=model, tx=tx, objective=objective,
                             steps_per_epoch=2, freeze_bn=config.model.freeze_bn)
    batch = {"image": np.zeros((8, 16, 16, 3), np.float32),
             "label": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)}
    hlo = step.lower(train.replicate(state, mesh), train.shard_batch(batch, mesh)).compile()
    hlo = hlo.as_text()
    memory_shapes = {f"f32[{','.join(map(str, a.shape))}]"
                     for a in (state.memory.embeddings, state.memory.proxies,
                               state.memory.lse_cache)}
    assert len(memory_shapes) == 3 and "copy(" in hlo
    copies = [line for line in hlo.splitlines()
              if " copy(" in line and any(f"= {s}" in line for s in memory_shapes)]
    assert copies == []


# ------------------------------------------------------------------ resume, NaN, workdir

def _latest_state(workdir, config):
    run = train._build(config)
    checkpointer = checkpoints.Checkpointer(workdir)
    try:
        state, record, _ = checkpointer.restore(run.state)
    finally:
        checkpointer.close()
    return jax.device_get(state), record


def test_sigterm_saves_and_resume_equals_uninterrupted(tiny_root, tmp_path):
    # MemVir so that the memory, the RNG key and the loader position (mid-epoch: 3 steps per
    # epoch) all have to come back exactly.
    config = tiny_config(tiny_root, num_train_steps=5, steps_per_epoch=3,
                         **{"regularizer.name": "memvir", "regularizer.memvir_num_steps": 2,
                            "regularizer.memvir_step_gap": 0, "eval.every_epochs": 100})
    interrupted = str(tmp_path / "interrupted")

    def send_sigterm(step, state):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    result = train.train_and_evaluate(config, interrupted, hooks=[send_sigterm])
    assert result["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored
    _, record = _latest_state(interrupted, config)
    assert record["step"] == 2 and record["loader"]["step"] == 2

    resumed = train.train_and_evaluate(config, interrupted)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert resumed["step"] == straight["step"] == 5
    a, _ = _latest_state(interrupted, config)
    b, _ = _latest_state(str(tmp_path / "straight"), config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert resumed["recall@1"] == pytest.approx(straight["recall@1"])
    for name in ("checkpoints/latest/5", "checkpoints/best", "metrics.json"):
        assert os.path.exists(os.path.join(interrupted, name)), name


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_root, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(tiny_root, num_train_steps=2, **{"eval.every_epochs": 100})
    train.train_and_evaluate(config, workdir)
    bad = tiny_config(tiny_root, num_train_steps=4, **{"loss.scale": float("nan"),
                                                       "eval.every_epochs": 100})
    with pytest.raises(FloatingPointError, match=r"at step 3 .*last good checkpoint \(step 2\)"):
        train.train_and_evaluate(bad, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["2"]


def test_incompatible_workdir_is_refused_untouched(tiny_root, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(tiny_root, num_train_steps=1), workdir)

    def snapshot():
        return sorted((os.path.relpath(os.path.join(d, f), workdir),
                       os.path.getmtime(os.path.join(d, f)))
                      for d, _, files in os.walk(workdir) for f in files)
    before = snapshot()
    other = tiny_config(tiny_root, num_train_steps=2, **{"model.embedding_dim": 12})
    with pytest.raises(ValueError, match=r"does not fit this config.*params/embedding/kernel"):
        train.train_and_evaluate(other, workdir)
    assert snapshot() == before


def test_bfloat16_compute_keeps_float32_params_and_loss(tiny_root):
    config = tiny_config(tiny_root, **{"model.dtype": "bfloat16", "optimizer.eps": 0.01})
    initial = _initial(config)
    losses, state = _one_run(config, initial, 2, 2)
    assert np.all(np.isfinite(losses))
    assert {np.asarray(x).dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    # Close to the float32 run (bfloat16 has ~3 significant digits).
    config32 = tiny_config(tiny_root, **{"optimizer.eps": 0.01})
    losses32, _ = _one_run(config32, _initial(config32), 2, 1)
    np.testing.assert_allclose(losses[0], losses32[0], rtol=0.05)
