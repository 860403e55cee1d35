"""The proxy method: one loss (with its regularizer chain) on the global batch, one optimizer.

The method of every proxy-loss and pair-loss paper here (Norm-SoftMax, Proxy-NCA,
Proxy-Anchor, SoftTriple, HPHN, with Proxy Synthesis, MemVir or Embedding Expansion):
the network's embeddings of the global batch go through :mod:`proxy_jax.objective`, and
one optimizer (:func:`proxy_jax.optim.make_optimizer`) updates the network and the proxies,
each group with its own learning rate. Its carried state (MemVir's memory) is the
objective's ``extra``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

from proxy_jax import models, objective as objective_lib, optim
from proxy_jax.methods.base import (Method, Plan, TrainState, embedding_width, forward_global,
                                    init_network, network_params)

__all__ = ["METHOD", "train_step", "optimizer_groups", "make_tx"]

_LR_FIELDS = {"backbone": "backbone_lr", "embedding": "embedding_lr", "proxies": "proxy_lr"}


def optimizer_groups(config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                     uses_proxies: bool) -> dict:
    """The parameter groups: the network's two and the proxies, each with its rate; the
    backbone frozen for ``optimizer.warmup_epochs``. With ``freeze_patch_embed_epochs``, a
    ViT's patch embedding is a group of its own: the backbone's rate, frozen for the longer
    of the two."""
    o = config.optimizer
    names = ["backbone", "embedding"] + (["proxies"] if uses_proxies else [])
    groups = {n: optim.Group(getattr(o, _LR_FIELDS[n]), o.weight_decay,
                             frozen_updates=(o.warmup_epochs * steps_per_epoch
                                             if n == "backbone" else 0))
              for n in names}
    if o.freeze_patch_embed_epochs > 0:
        epochs = max(o.warmup_epochs, o.freeze_patch_embed_epochs)
        groups["patch_embed"] = optim.Group(o.backbone_lr, o.weight_decay,
                                            frozen_updates=epochs * steps_per_epoch)
    return groups


def _frozen_until(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
    o = config.optimizer
    return {"backbone": o.warmup_epochs * steps_per_epoch,
            "patch_embed": max(o.warmup_epochs, o.freeze_patch_embed_epochs) * steps_per_epoch}


def make_tx(config: ml_collections.ConfigDict, groups: dict, params: dict, labels: dict, *,
            steps_per_epoch: int) -> optax.GradientTransformation:
    """The method's optimizer: :func:`proxy_jax.optim.make_optimizer`, then a ViT's
    layer-wise learning-rate decay (``optimizer.layer_decay`` < 1)."""
    tx = optim.make_optimizer(config.optimizer, groups, labels, steps_per_epoch=steps_per_epoch)
    decay = config.optimizer.layer_decay
    if decay < 1:
        depth = models.get_backbone(config.model.backbone).factory.keywords["depth"]
        tx = optax.chain(tx, optim.scale_by_tree(
            optim.layer_decay_scales(params, decay=decay, depth=depth)))
    return tx


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               objective: objective_lib.Objective, steps_per_epoch: int, freeze_bn: bool,
               replicated: Optional[NamedSharding] = None) -> tuple[TrainState, dict]:
    """One optimizer step on the global batch; pure (jit it via ``parallel.parallelize``).

    Args:
      state: the train state (replicated).
      batch: {'image': float32 [B, H, W, 3], 'label': int32 [B]} (B global, sharded), and
        'mask': bool [B] for the padded last batch of an epoch (``data.drop_last=False``):
        its False rows count nowhere (loss means, synthetic classes, MemVir's memory).
      replicated: the mesh's replicated sharding: the embeddings are gathered to it before
        the loss, so every regularizer sees the whole batch.

    Returns:
      The new state and metrics {'loss', 'grad_norm', 'param_norm'} (float32 scalars).
    """
    key = jax.random.fold_in(state.key, state.step)
    epoch = state.step // steps_per_epoch

    def loss_fn(params):
        embeddings, batch_stats = forward_global(model, network_params(params),
                                                 state.batch_stats, batch["image"],
                                                 freeze_bn=freeze_bn, replicated=replicated,
                                                 key=key)
        loss, extra = objective.loss_fn(embeddings, batch["label"], params.get("proxies"),
                                        key=key, extra=state.extra, epoch=epoch,
                                        sample_mask=batch.get("mask"))
        return loss.astype(jnp.float32), (batch_stats, extra)

    (loss, (batch_stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, extra=extra)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}
    return new_state, metrics


def _validate(config: ml_collections.ConfigDict) -> None:
    chain = objective_lib.regularizer_chain(config.regularizer.name)
    objective_lib.check_chain(config.loss.name, chain, config.loss,
                              padded=not config.data.drop_last)


def _setup(config: ml_collections.ConfigDict, model, *, num_classes: int,
           steps_per_epoch: int) -> Plan:
    objective = objective_lib.make_objective(config, num_classes=num_classes,
                                             global_batch_size=config.data.batch_size)
    k_model, k_proxies, k_train = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    variables = init_network(config, model, k_model)
    params = dict(variables["params"])
    if objective.uses_proxies:
        params["proxies"] = objective_lib.init_proxies(
            k_proxies, num_rows=objective.num_proxy_rows, dim=embedding_width(config),
            init=config.loss.proxy_init, fan=config.loss.proxy_init_fan)
    groups = optimizer_groups(config, steps_per_epoch=steps_per_epoch,
                              uses_proxies=objective.uses_proxies)
    mask = models.batchnorm_param_mask(variables) if config.model.freeze_bn_affine else None
    labels = optim.param_labels(params, frozen_mask=mask,
                                patch_embed_group="patch_embed" in groups)
    tx = make_tx(config, groups, params, labels, steps_per_epoch=steps_per_epoch)
    state = TrainState(step=jnp.zeros([], jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                       extra=objective.init_extra(), key=k_train)
    step_fn = functools.partial(train_step, model=model, tx=tx, objective=objective,
                                steps_per_epoch=steps_per_epoch,
                                freeze_bn=config.model.freeze_bn)
    frozen = _frozen_until(config, steps_per_epoch)
    return Plan(
        state=state, step_fn=step_fn,
        learning_rates=lambda step: optim.learning_rates(
            config.optimizer, groups, step, steps_per_epoch=steps_per_epoch,
            frozen_until=frozen),
        check_batch=objective.check_batch, describe=objective.describe)


METHOD = Method(name="proxy", sections=dict, validate=_validate,
                model_overrides=lambda config: {}, setup=_setup,
                legacy_slot="memvir")  # format 1 kept MemVir's memory as the whole slot
