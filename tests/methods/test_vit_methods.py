"""A tiny ViT trains one step with every method and regularizer family: Proxy Synthesis,
MemVir, Embedding Expansion and DADA, with each token pooling, with and without the linear
projection, and with stochastic depth (whose 'drop_path' stream the step supplies)."""
import jax
import numpy as np
import pytest

from proxy_jax import models, parallel, train
from proxy_jax.data import pipeline, transforms

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _one_step(config):
    run = train.build(config)
    loader = pipeline.make_loader(
        run.data.train, batch_size=config.data.batch_size, sampler=run.sampler,
        transform=transforms.transform_from_config(
            run.config.data, models.input_normalization(run.config.model.backbone),
            training=True),
        num_workers=0, seed=0)
    batch = next(loader)
    run.plan.check_batch(np.asarray(batch["label"]))
    before = jax.tree.map(np.asarray, run.state.params)  # the step donates its input state
    step = parallel.parallelize(run.plan.step_fn, run.mesh)
    state, metrics = step(run.state, parallel.shard_batch(batch, run.mesh))
    return run, before, state, metrics


# The ViT optimizer of the recipes: AdamW, warm-up + cosine, layer decay, clip, patch freeze.
_VIT_OPTIMIZER = {"optimizer.name": "adamw", "optimizer.schedule": "warmup_cosine",
                  "optimizer.lr_warmup_epochs": 0, "optimizer.cosine_epochs": 3,
                  "optimizer.layer_decay": 0.75, "optimizer.grad_clip_norm": 3.0,
                  "optimizer.freeze_patch_embed_epochs": 1}


@pytest.mark.parametrize("base, pooling, embedding_dim, drop_path, extra", [
    ("cars196_ps_norm_softmax", "cls", 8, 0.0, {}),
    ("cars196_ps_norm_softmax", "cls", 0, 0.1, _VIT_OPTIMIZER),
    ("cars196_memvir_norm_softmax", "mean", 0, 0.1, {}),
    ("cars196_ee_hphn_triplet", "cls+mean", 8, 0.1, {}),
    ("dada_cars196", "cls", 0, 0.1, {}),
])
def test_tiny_vit_trains_one_step(base, pooling, embedding_dim, drop_path, extra, tiny_root,
                                  tiny_config):
    config = tiny_config(tiny_root, base=base, **{
        "model.backbone": "vit_tiny_test", "model.pooling": pooling,
        "model.embedding_dim": embedding_dim, "model.drop_path_rate": drop_path,
        "num_devices": 1, **extra})
    config.data.n_instance = min(config.data.n_instance, 2)
    run, before, state, metrics = _one_step(config)
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1
    width = models.output_dim("vit_tiny_test", embedding_dim, pooling)
    if "proxies" in before:  # HPHN (with EE) is a pair loss
        assert before["proxies"].shape[-1] == width
    assert ("embedding" in before) == (embedding_dim > 0)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, state.params)
    if config.optimizer.warmup_epochs == 0 and config.method == "proxy":
        assert any(jax.tree.leaves(moved["backbone"]["blocks"]))
        frozen = config.optimizer.freeze_patch_embed_epochs > 0
        assert any(jax.tree.leaves(moved["backbone"]["patch_embed"])) != frozen
