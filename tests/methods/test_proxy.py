"""proxy_jax.methods.proxy: the step is independent of the device count and of the
convolution implementation, MemVir's memory is updated in place, bfloat16 compute keeps
float32 parameters, regularizer chains train end to end."""

import os

import jax
import numpy as np
import pytest

from proxy_jax import methods, parallel, xla_flags
from proxy_jax.methods import proxy

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _initial(config):
    """The proxy method's plan of ``config`` for 4 classes, 2 steps per epoch."""
    model = methods.create_model(config)
    plan = proxy.METHOD.setup(config, model, num_classes=4, steps_per_epoch=2)
    return plan._replace(state=jax.device_get(plan.state))


def _one_run(config, plan, num_devices, num_steps):
    """``num_steps`` train steps from ``plan`` on fixed global batches, ``num_devices``."""
    mesh = parallel.make_mesh(num_devices)
    state = parallel.replicate(plan.state, mesh)
    step = parallel.parallelize(plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(num_steps):
        batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                 "label": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)[rng.permutation(8)]}
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


@pytest.mark.parametrize("changes, num_steps", [
    ({"regularizer.name": "ps", "regularizer.ps_mu": 1.0}, 1),  # Norm-SoftMax + PS
    ({"loss.name": "proxy_anchor", "optimizer.grad_clip_value": 10.0,
      "optimizer.name": "adamw"}, 1),  # Proxy-Anchor, BatchNorm training (global statistics)
    ({"regularizer.name": "memvir", "regularizer.memvir_num_steps": 2,
      "regularizer.memvir_step_gap": 0, "loss.name": "proxy_nca"}, 3),  # MemVir, memory used
], ids=["norm_softmax_ps", "proxy_anchor", "memvir"])
def test_step_is_independent_of_the_device_count(tiny_root, tiny_config, changes, num_steps,
                                                 assert_same_training):
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
        assert_same_training(
            losses, reference_losses,
            jax.tree.leaves((state.params, state.batch_stats, state.extra)),
            jax.tree.leaves((reference.params, reference.batch_stats, reference.extra)))


def test_step_is_independent_of_the_convolution_implementation(tiny_root, tiny_config,
                                                              monkeypatch, assert_same_training):
    """oneDNN convolutions (what a one-device CPU run uses) and XLA's give the same training
    (tiny_cnn, BatchNorm trained, Norm-SoftMax + PS, 2 steps)."""
    config = tiny_config(tiny_root, **{"optimizer.eps": 0.01, "regularizer.name": "ps"})
    initial = _initial(config)
    runs = {}
    for conv in ("xla", "onednn"):
        monkeypatch.setenv("PROXY_JAX_CONV", conv)
        runs[conv] = _one_run(config, initial, 1, 2)
    (xla_losses, xla_state), (losses, state) = runs["xla"], runs["onednn"]
    assert_same_training(losses, xla_losses, jax.tree.leaves((state.params, state.batch_stats)),
                         jax.tree.leaves((xla_state.params, xla_state.batch_stats)))


def test_memvir_step_updates_the_memory_without_copying_it(tiny_root, tiny_config):
    """With main.py's XLA flags (proxy_jax.xla_flags, applied by conftest), the compiled
    MemVir step (fused Norm-SoftMax, cache included) updates the donated memory in place:
    no copy of a memory-sized buffer. XLA's default copy analysis makes six."""
    config = tiny_config(tiny_root, **{"regularizer.name": "memvir",
                                       "regularizer.memvir_num_steps": 3,
                                       "regularizer.memvir_step_gap": 1})
    assert all(flag in os.environ["XLA_FLAGS"].split() for flag in xla_flags.CPU_FLAGS)
    plan = _initial(config)
    state = plan.state
    mesh = parallel.make_mesh(1)
    step = parallel.parallelize(plan.step_fn, mesh)
    batch = {"image": np.zeros((8, 16, 16, 3), np.float32),
             "label": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)}
    hlo = step.lower(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh)).compile()
    hlo = hlo.as_text()
    memory = state.extra["memvir"]
    memory_shapes = {f"f32[{','.join(map(str, a.shape))}]"
                     for a in (memory.embeddings, memory.proxies, memory.lse_cache)}
    assert len(memory_shapes) == 3 and "copy(" in hlo
    copies = [line for line in hlo.splitlines()
              if " copy(" in line and any(f"= {s}" in line for s in memory_shapes)]
    assert copies == []



def test_bfloat16_compute_keeps_float32_params_and_loss(tiny_root, tiny_config):
    config = tiny_config(tiny_root, **{"model.dtype": "bfloat16", "optimizer.eps": 0.01})
    initial = _initial(config)
    losses, state = _one_run(config, initial, 2, 2)
    assert np.all(np.isfinite(losses))
    assert {np.asarray(x).dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    # Close to the float32 run (bfloat16 has ~3 significant digits).
    config32 = tiny_config(tiny_root, **{"optimizer.eps": 0.01})
    losses32, _ = _one_run(config32, _initial(config32), 2, 1)
    np.testing.assert_allclose(losses[0], losses32[0], rtol=0.05)


# ------------------------------------------------ the padded last batch (data.drop_last=False)

def _padded_batch(rng, real):
    """A global batch of 8 whose first ``real`` rows are images and the rest padding, as the
    loader pads the last batch of an epoch: zero pixels, label -1, mask False."""
    image = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    image[real:] = 0.0
    label = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)[rng.permutation(8)]
    label[real:] = -1
    return {"image": image, "label": label, "mask": np.arange(8) < real}


def test_padded_step_equals_the_step_on_the_partial_batch(tiny_root, tiny_config):
    """Norm-SoftMax, frozen BatchNorm: one step on 5 real images padded to 8 (mask) gives
    the loss and the updated parameters of the step on the 5 images alone."""
    changes = {"optimizer.eps": 0.01, "model.freeze_bn": True}
    padded_config = tiny_config(tiny_root, **{**changes, "data.drop_last": False})
    plain_config = tiny_config(tiny_root, **changes)
    plan = _initial(padded_config)
    mesh = parallel.make_mesh(1)
    batch = _padded_batch(np.random.default_rng(1), 5)
    step = parallel.parallelize(plan.step_fn, mesh)
    state, metrics = step(parallel.replicate(plan.state, mesh), parallel.shard_batch(batch, mesh))
    plain_plan = _initial(plain_config)
    plain_step = parallel.parallelize(plain_plan.step_fn, mesh)
    real = {"image": batch["image"][:5], "label": batch["label"][:5]}
    plain_state, plain_metrics = plain_step(parallel.replicate(plain_plan.state, mesh),
                                            parallel.shard_batch(real, mesh))
    np.testing.assert_allclose(float(metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(plain_metrics["grad_norm"]),
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(jax.device_get(plain_state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padded_ps_memvir_steps_are_independent_of_the_device_count(tiny_root, tiny_config,
                                                                   assert_same_training):
    """PS then MemVir over full and padded batches (the padded global batch divides across
    devices): 1 and 8 devices give the same losses, parameters and memory."""
    config = tiny_config(tiny_root, **{
        "optimizer.eps": 0.01, "model.freeze_bn": True, "data.drop_last": False,
        "regularizer.name": "ps+memvir", "regularizer.memvir_num_steps": 2,
        "regularizer.memvir_step_gap": 0})
    initial = _initial(config)
    runs = []
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        state = parallel.replicate(initial.state, mesh)
        step = parallel.parallelize(initial.step_fn, mesh)
        rng = np.random.default_rng(0)
        losses = []
        for real in (8, 5, 8):
            state, metrics = step(state, parallel.shard_batch(_padded_batch(rng, real), mesh))
            losses.append(float(metrics["loss"]))
        runs.append((losses, jax.device_get(state)))
    (reference_losses, reference), (losses, state) = runs
    assert np.all(np.isfinite(reference_losses))
    assert_same_training(losses, reference_losses, jax.tree.leaves((state.params, state.extra)),
                         jax.tree.leaves((reference.params, reference.extra)))
    assert int(np.sum(np.asarray(state.extra["memvir"].labels) < 0)) == 3
