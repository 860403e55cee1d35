"""proxy_jax.train: exact resume after SIGTERM, NaN stop, incompatible workdir, checkpoints
written before the method seam (format 1)."""

import os
import signal

import jax
import numpy as np
import pytest

from proxy_jax import checkpoints, train


pytestmark = pytest.mark.usefixtures("compilation_cache")


# ------------------------------------------------------------------ resume, NaN, workdir

def _latest_state(workdir, config):
    run = train.build(config)
    checkpointer = checkpoints.Checkpointer(workdir)
    try:
        state, record, _ = checkpointer.restore(run.state)
    finally:
        checkpointer.close()
    return jax.device_get(state), record


def test_sigterm_saves_and_resume_equals_uninterrupted(tiny_root, tmp_path, tiny_config):
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


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_root, tmp_path, tiny_config):
    workdir = str(tmp_path / "run")
    config = tiny_config(tiny_root, num_train_steps=2, **{"eval.every_epochs": 100})
    train.train_and_evaluate(config, workdir)
    bad = tiny_config(tiny_root, num_train_steps=4, **{"loss.scale": float("nan"),
                                                       "eval.every_epochs": 100})
    with pytest.raises(FloatingPointError, match=r"at step 3 .*last good checkpoint \(step 2\)"):
        train.train_and_evaluate(bad, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["2"]


def test_incompatible_workdir_is_refused_untouched(tiny_root, tmp_path, tiny_config):
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




def test_checkpoint_of_format_1_resumes(tiny_root, tmp_path, tiny_config):
    """A workdir written before the method seam (one ``memory`` slot, no format in the
    record) resumes and continues exactly as a run in the current format."""
    config = tiny_config(tiny_root, num_train_steps=2, steps_per_epoch=3,
                         **{"regularizer.name": "memvir", "regularizer.memvir_num_steps": 2,
                            "regularizer.memvir_step_gap": 0, "eval.every_epochs": 100})
    current, old = str(tmp_path / "current"), str(tmp_path / "old")
    train.train_and_evaluate(config, current)
    state, record = _latest_state(current, config)
    v1 = train._StateV1(state.step, state.params, state.batch_stats, state.opt_state,
                        state.extra["memvir"], state.key)
    record = {k: v for k, v in record.items() if k not in ("format", "checksum")}
    record["shapes"] = checkpoints.shape_signature(v1)
    assert any(name.startswith("memory/") for name in record["shapes"])
    checkpointer = checkpoints.Checkpointer(old)
    checkpointer.save(v1, record)
    checkpointer.close()

    config.num_train_steps = 4
    resumed = train.train_and_evaluate(config, old)
    straight = train.train_and_evaluate(config, current)
    assert resumed["step"] == straight["step"] == 4
    a, _ = _latest_state(old, config)
    b, _ = _latest_state(current, config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_of_format_1_dada_is_refused_untouched(tiny_root, tmp_path, tiny_config):
    """Format 1 kept DADA's discriminators in the ``memory`` slot in another layout: such a
    workdir is refused with a message saying why, and nothing in it is overwritten."""
    proxy = tiny_config(tiny_root, num_train_steps=1, **{"eval.every_epochs": 100})
    state = jax.device_get(train.build(proxy).state)
    old = str(tmp_path / "old")
    v1 = train._StateV1(state.step, state.params, state.batch_stats, state.opt_state, {},
                        state.key)
    checkpointer = checkpoints.Checkpointer(old)
    checkpointer.save(v1, {"step": 0, "shapes": checkpoints.shape_signature(v1)})
    checkpointer.close()
    before = sorted((p, os.path.getmtime(os.path.join(d, p)))
                    for d, _, files in os.walk(old) for p in files)

    from configs import dada_base
    dada = dada_base.get_config()
    dada.data.update(proxy.data)
    dada.model.backbone, dada.model.pretrained, dada.model.embedding_dim = "tiny_cnn", "", 8
    dada.num_devices, dada.num_train_steps = 1, 1
    dada.eval.nmi, dada.eval.num_queries, dada.eval.map_points = False, 0, 0
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint format 1"):
        train.train_and_evaluate(dada, old)
    after = sorted((p, os.path.getmtime(os.path.join(d, p)))
                   for d, _, files in os.walk(old) for p in files)
    assert after == before


def test_best_evaluation_of_a_record_written_before_it_was_kept_whole():
    # Checkpoints written before the best evaluation was kept (format 2 without
    # 'best_evaluation') resume with their best Recall@1, its step unknown.
    assert train._best_of({"best_recall@1": 0.5}) == {"step": None, "epoch": None,
                                                      "recall@1": 0.5}
    assert train._best_of({"best_recall@1": -1.0}) == {}  # no evaluation yet
    best = {"step": 40, "epoch": 4, "recall@1": 0.5}
    assert train._best_of({"best_evaluation": best, "best_recall@1": 0.1}) == best


# --------------------------------------------------- the partial last batch of an epoch

PARTIAL_CONFIGS = ("cars196_norm_softmax", "cars196_proxy_nca", "cars196_ps_norm_softmax",
                   "cars196_ps_proxy_nca", "cars196_memvir_norm_softmax",
                   "cars196_memvir_proxy_nca", "cars196_soft_triple")


def test_configs_of_loaders_without_drop_last_keep_the_partial_batch():
    """The Proxy Synthesis, MemVir and SoftTriple loaders are torch DataLoaders with
    shuffle=True and no drop_last (proxy-synthesis and MemVir utils/custom_loader.py:91-95,
    SoftTriple train.py:106-108); the other recipes drop it."""
    import importlib
    import pathlib

    for path in sorted(pathlib.Path("configs").glob("*.py")):
        if path.stem in ("__init__", "dada_base"):
            continue
        module = importlib.import_module(f"configs.{path.stem}")
        if not hasattr(module, "get_config"):  # a shared base of variants (ViT recipes)
            continue
        config = module.get_config()
        assert config.data.drop_last == (path.stem not in PARTIAL_CONFIGS), path.stem


def test_steps_per_epoch_and_last_batch_of_cars196_sizes():
    """8,054 Cars196 training images, batch 128: 63 steps, the last of 118 real images
    (torch: len(DataLoader) = ceil(8054 / 128)); with drop_last 62 full steps."""
    from proxy_jax.data import samplers

    sampler = samplers.ShuffleSampler(8054)
    assert sampler.num_batches(batch_size=128, drop_remainder=False) == 63
    assert sampler.num_batches(batch_size=128, drop_remainder=True) == 62
    batches = sampler.epoch_batches(0, batch_size=128, seed=0, drop_remainder=False)
    assert batches.shape == (63, 128)
    real = batches != samplers.PAD_INDEX
    assert real[:62].all() and real[62].sum() == 118 and real[62, :118].all()
    assert sorted(batches[real].tolist()) == list(range(8054))  # every image once


def test_an_epoch_with_a_partial_last_batch_trains_end_to_end(tiny_root, tmp_path,
                                                              tiny_config):
    """24 tiny training images, batch 16 on 8 devices (2 rows each): ceil(24/16) = 2 steps
    per epoch, the second of 8 real images padded to 16, with PS then MemVir; the padded
    step enters the memory with its 8 padded rows invalid, and the schedule counts 2
    steps per epoch (one Adam update per step, the learning-rate epochs of 2 steps)."""
    config = tiny_config(tiny_root, base="cars196_memvir_norm_softmax", num_epochs=2,
                         **{"data.batch_size": 16, "regularizer.name": "ps+memvir",
                            "regularizer.memvir_num_steps": 2,
                            "regularizer.memvir_step_gap": 0,
                            "regularizer.memvir_warm_epochs": 0,
                            "optimizer.decay_step": 2, "optimizer.decay_stop": 10,
                            "eval.every_epochs": 100})
    assert not config.data.drop_last
    run = train.build(config)
    assert (run.steps_per_epoch, run.total_steps) == (2, 4)
    # The step decay is per epoch (official adjust_learning_rate at each epoch's start:
    # x0.1 when the 1-based epoch is a multiple of decay_step), so its boundary is at step 2.
    rates = [run.plan.learning_rates(s)["lr/proxies"] for s in range(4)]
    assert rates[0] == rates[1] and rates[2] == rates[3]
    np.testing.assert_allclose(rates[2], 0.1 * rates[0], rtol=1e-6)
    invalid = []

    def record(step, state):
        invalid.append(int(np.sum(np.asarray(jax.device_get(state.extra["memvir"].labels)) < 0)))

    result = train.train_and_evaluate(config, str(tmp_path / "run"), hooks=[record])
    assert result["step"] == 4
    # Slots hold steps (1, 2), (2, 3): the padded steps 2 and 4 (1-based) bring 8 invalid rows.
    assert invalid == [0, 8, 8, 8]
    state, record_ = _latest_state(str(tmp_path / "run"), config)
    assert int(state.step) == 4 and record_["loader"]["step"] == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
