"""What every training method shares: the train state, the network, its global forward.

A *method* is how one batch becomes an update: plain loss training
(:mod:`proxy_jax.methods.proxy`), DADA's two-player game (:mod:`proxy_jax.methods.dada`),
and any later one. The trainer (:mod:`proxy_jax.train`) never names a method: it asks the
configured one (``config.method``, :func:`proxy_jax.methods.get_method`) for a
:class:`Plan` and runs that plan's step in its one loop, with its mesh, data, checkpoints,
logs and evaluation.

A method is a :class:`Method`: the config section it owns, the checks of its config, the
model head it needs, and ``setup``, which builds the :class:`Plan` of a run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from proxy_jax import models

__all__ = ["TrainState", "Method", "Plan", "create_model", "init_network", "forward_global",
           "network_params", "no_batch_check", "embedding_width"]

# forward_global folds this into the step's key for the backbone's stochastic depth, so that
# the 'drop_path' stream is independent of the keys the regularizers draw from.
_DROP_PATH_STREAM = 0x64726F70

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed as a whole).

    Attributes:
      step: int32 [], optimizer steps taken.
      params: what the method's optimizer updates: the network's {'backbone',
        'embedding'} and the method's own parameters ('proxies' [C, D], DADA's 'mix'),
        float32.
      batch_stats: the network's BatchNorm running statistics ({} without BatchNorm).
      opt_state: the optax state of ``params``.
      extra: state a method carries between steps, by name: ``{'memvir': MemVirState}``
        (MemVir's memory), ``{'discriminators': …}`` (DADA's other player), or {}.
      key: uint32 [2], the run's base PRNG key; step t uses ``fold_in(key, t)``.
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extra: Any
    key: Array


class Plan(NamedTuple):
    """A method's part of one run, as the trainer runs it.

    Attributes:
      state: the initial train state (on the host; the trainer replicates it).
      step_fn: ``(state, batch, *, replicated) -> (state, metrics)``: one update on the
        global batch ({'image': float32 [B, H, W, 3], 'label': int32 [B]}), pure; the
        trainer jits it once over its mesh (``proxy_jax.parallel.parallelize``). Metrics are
        float32 scalars and include 'loss' (the trainer stops on a non-finite one).
      learning_rates: ``step -> {'lr/<group>': float}`` for the logs.
      check_batch: host-side check of the labels this process loads for a batch (NumPy,
        its contiguous slice of the global batch); raises ValueError.
      describe: what the checkpoint record names the run's objective by (JSON).
    """

    state: TrainState
    step_fn: Callable[..., tuple]
    learning_rates: Callable[[int], dict]
    check_batch: Callable[[np.ndarray], None]
    describe: dict


class Method(NamedTuple):
    """A training method.

    Attributes:
      name: its ``config.method`` value.
      sections: ``() -> {name: ConfigDict}``, the config sections it owns (with their
        defaults); the base config holds them for every config of this method.
      validate: ``config -> None``; raises ValueError naming the field and what was expected.
      model_overrides: ``config -> dict`` of keyword arguments for the model's head
        (:func:`create_model`), e.g. DADA's ``layer_norm``.
      setup: ``(config, model, *, num_classes, steps_per_epoch) -> Plan``.
      legacy_slot: for checkpoints written before ``extra`` was named (format 1, one
        ``memory`` slot): the entry of ``extra`` that slot held (it held nothing when the
        run has no such entry); None when such checkpoints cannot be resumed (the trainer
        then says why).
    """

    name: str
    sections: Callable[[], dict]
    validate: Callable[[ml_collections.ConfigDict], None]
    model_overrides: Callable[[ml_collections.ConfigDict], dict]
    setup: Callable[..., Plan]
    legacy_slot: Optional[str] = None


def no_batch_check(labels: np.ndarray) -> None:
    del labels


def create_model(config: ml_collections.ConfigDict, **overrides) -> models.EmbeddingModel:
    """The embedding model of ``config.model`` (compute dtype float32 or bfloat16).

    ``overrides`` are further keyword arguments of :func:`proxy_jax.models.create_model`
    (a method's own head, e.g. DADA's ``layer_norm``).
    """
    m = config.model
    return models.create_model(
        backbone=m.backbone, embedding_dim=m.embedding_dim, pooling=m.pooling,
        l2_normalize=m.l2_normalize, freeze_bn=m.freeze_bn,
        bn_rule=models.BatchNormRule(m.bn_momentum, m.bn_running_var == "unbiased"),
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        embedding_init=m.embedding_init, drop_path_rate=m.drop_path_rate, **overrides)


def embedding_width(config: ml_collections.ConfigDict) -> int:
    """D, the width of the embeddings (and proxies): ``model.embedding_dim``, or the pooled
    width of the backbone when it is 0 (no linear layer)."""
    m = config.model
    return models.output_dim(m.backbone, m.embedding_dim, m.pooling)


def init_network(config: ml_collections.ConfigDict, model, key: Array) -> dict:
    """The network's variables {'params', 'batch_stats'?}: initialised from ``key``, then
    the pretrained backbone of ``config.model.pretrained`` if one is configured."""
    size = config.data.input_size
    variables = jax.jit(functools.partial(model.init, train=False))(
        key, jnp.zeros((1, size, size, 3), jnp.float32))
    variables = flax.core.unfreeze(variables)
    if config.model.pretrained:
        variables = models.load_pretrained(variables, config.model.pretrained,
                                           config.model.backbone)
    return dict(variables)


def network_params(params: dict) -> dict:
    """The network's part of ``TrainState.params`` ('backbone', 'embedding')."""
    return {k: v for k, v in params.items() if k in ("backbone", "embedding")}


def forward_global(model, net_params: dict, batch_stats: Any, images: Array, *, freeze_bn: bool,
                   replicated: Optional[NamedSharding] = None,
                   key: Optional[Array] = None) -> tuple[Array, Any]:
    """The training-mode forward of the global batch (shared by every method's step).

    Args:
      net_params: the network's parameters (:func:`network_params`).
      images: float [B, H, W, 3], sharded on the batch.
      freeze_bn: use and keep the running BatchNorm statistics.
      replicated: the mesh's replicated sharding; the embeddings are gathered to it so
        that the loss and the regularizers see the whole global batch.
      key: the step's PRNG key; a fold of it is the backbone's 'drop_path' stream (a ViT
        with ``model.drop_path_rate`` > 0 needs it; other networks ignore it).

    Returns:
      Embeddings float32 [B, D] and the BatchNorm statistics after this batch.
    """
    variables = {"params": net_params, "batch_stats": batch_stats}
    rngs = {} if key is None else {"drop_path": jax.random.fold_in(key, _DROP_PATH_STREAM)}
    if freeze_bn:
        embeddings = model.apply(variables, images, train=True, rngs=rngs)
    else:
        embeddings, updates = model.apply(variables, images, train=True, rngs=rngs,
                                          mutable=["batch_stats"])
        batch_stats = updates.get("batch_stats", {})  # a ViT has none
    embeddings = embeddings.astype(jnp.float32)
    if replicated is not None:
        embeddings = jax.lax.with_sharding_constraint(embeddings, replicated)
    return embeddings, batch_stats
