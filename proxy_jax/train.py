"""Training and evaluation: the train state, the step, the loop, checkpoints and logs.

Reads top to bottom: model and data from the config, learning-rate schedules and the
optimizer, the train state, the pure ``train_step(state, batch)`` on the global batch, the
data-parallel wrapper (applied once, in ``parallelize``), evaluation, checkpoints, and
``train_and_evaluate(config, workdir)`` that ties them together. ``main.py`` calls it.

Data parallelism: one ``jax.jit`` over a 1-D device mesh (axis ``'data'``); the batch is
sharded along it and the train state is replicated. The backbone runs sharded; its
embeddings are then constrained to be replicated, so the loss, Proxy Synthesis and MemVir
see the whole global batch exactly as on one device (current JAX recommends this over
``pmap``: XLA inserts the all-gather and the gradient all-reduce).

Several processes (``proxy_jax.multihost``): the mesh spans every process's devices, in
process order, and each process loads only its contiguous slice of every global batch, so
the assembled batch, and everything computed from it, is the single-process one. Process 0
alone computes the metrics (then shared with the others), writes TensorBoard events,
pictures and ``metrics.json``; orbax writes each checkpoint once, from all processes.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterable, NamedTuple, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from proxy_jax import checkpoints, config_utils, evaluation, models, multihost, visualize
from proxy_jax.data import datasets, embedded, pipeline, samplers, transforms
from proxy_jax.objective import Objective, init_proxies, make_objective

__all__ = [
    "SCHEDULES", "TrainState", "learning_rate_fn", "make_optimizer", "freeze_until",
    "create_model", "create_train_state", "forward_global", "train_step", "make_mesh",
    "parallelize", "check_batch_size", "shard_batch", "load_data", "embed_dataset", "evaluate",
    "train_and_evaluate", "evaluate_checkpoint", "embed_folder", "images_under",
    "check_workdir", "check_input_files",
]

Array = jax.Array


# --------------------------------------------------------------------------- model, data

def create_model(config: ml_collections.ConfigDict, **overrides) -> models.EmbeddingModel:
    """The embedding model of ``config.model`` (compute dtype float32 or bfloat16).

    ``overrides`` are further keyword arguments of :func:`proxy_jax.models.create_model`
    (a method's own head, e.g. DADA's ``layer_norm``).
    """
    m = config.model
    return models.create_model(
        backbone=m.backbone, embedding_dim=m.embedding_dim, pooling=m.pooling,
        l2_normalize=m.l2_normalize, freeze_bn=m.freeze_bn,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        embedding_init=m.embedding_init, **overrides)


class Data(NamedTuple):
    """The data sets of a run. ``gallery`` is None for all-vs-all retrieval."""

    train: Any
    test: Any  # the queries for In-shop
    gallery: Any
    num_classes: int
    normalization: Any  # models.InputNormalization of the backbone


def _default_embedded_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "proxy_jax", "embedded")


def load_data(config: ml_collections.ConfigDict) -> Data:
    """The train and test sets of ``config.data`` (the embedded set is written if needed)."""
    d = config.data
    if d.dataset == "embedded":
        root = embedded.ensure_embedded_dataset(d.root or _default_embedded_root())
    else:
        root = d.root
    train = datasets.load_benchmark(root, "train")
    if d.dataset == "inshop":
        test, gallery = datasets.load_benchmark(root, "query"), datasets.load_benchmark(root, "gallery")
    else:
        test, gallery = datasets.load_benchmark(root, "test"), None
    return Data(train, test, gallery, len(train.classes),
                models.input_normalization(config.model.backbone))


def make_train_sampler(config: ml_collections.ConfigDict, dataset):
    """Shuffling (n_instance = 1) or class-balanced batches of n_instance per class."""
    if config.data.n_instance == 1:
        return samplers.ShuffleSampler(len(dataset))
    return samplers.ClassBalancedSampler(dataset.targets, n_instance=config.data.n_instance)


def steps_per_epoch_of(config: ml_collections.ConfigDict, sampler) -> int:
    """``config.steps_per_epoch``, or the sampler's number of full global batches."""
    if config.steps_per_epoch > 0:
        return config.steps_per_epoch
    steps = sampler.num_batches(batch_size=config.data.batch_size, drop_remainder=True)
    if steps < 1:
        raise ValueError(f"config.data.batch_size ({config.data.batch_size}) is larger than an "
                         "epoch of the training set")
    return steps


# --------------------------------------------------------------------- schedules, optimizer

SCHEDULES = ("constant", "step_decay", "step_lr", "multistep")


def learning_rate_fn(base_lr: float, optimizer_config, steps_per_epoch: int) -> Callable:
    """Learning rate as a function of the global step (jittable; also used for logging).

    Schedules (epochs 0-based, ``rate = decay_rate``):

    * 'constant'.
    * 'step_decay' (Proxy Synthesis / MemVir ``adjust_learning_rate``, called at the start
      of each 1-based epoch e: ``lr *= rate`` if ``e % decay_step == 0 and e <= decay_stop``):
      ``lr · rate^⌊min(epoch + 1, decay_stop) / decay_step⌋`` (``decay_stop = -1``: no stop).
    * 'step_lr' (``torch.optim.lr_scheduler.StepLR`` stepped after each epoch, Proxy-Anchor):
      ``lr · rate^⌊epoch / decay_step⌋``.
    * 'multistep' (MXNet ``MultiFactorScheduler`` over iterations, Embedding Expansion):
      ``lr · rate^#{m ∈ decay_epochs : step > m · steps_per_epoch}``.
    """
    o = optimizer_config
    if o.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule must be one of {list(SCHEDULES)}, got "
                         f"{o.schedule!r}")
    rate, decay_step, decay_stop = o.decay_rate, o.decay_step, o.decay_stop
    milestones = tuple(int(m) * steps_per_epoch for m in o.decay_epochs)

    def fn(step):
        step = jnp.asarray(step, jnp.int32)
        epoch = step // steps_per_epoch
        if o.schedule == "constant":
            n = jnp.zeros((), jnp.int32)
        elif o.schedule == "step_decay":
            e = epoch + 1 if decay_stop < 0 else jnp.minimum(epoch + 1, decay_stop)
            n = e // decay_step
        elif o.schedule == "step_lr":
            n = epoch // decay_step
        else:
            n = sum((step > m).astype(jnp.int32) for m in milestones)
        return base_lr * jnp.power(jnp.float32(rate), n.astype(jnp.float32))
    return fn


class FreezeState(NamedTuple):
    count: Array  # steps seen so far, frozen ones included
    inner: optax.OptState


def freeze_until(inner: optax.GradientTransformation, num_steps: int) -> optax.GradientTransformation:
    """Zero updates for the first ``num_steps`` steps; ``inner`` untouched meanwhile.

    This is the warm-up of the seeds (``requires_grad=False`` on the backbone for the first
    epochs): the parameters do not move, get no weight decay, and the inner optimizer's
    state (Adam moments and step count) starts only when training starts, as PyTorch's
    per-parameter state does. The switch is a ``lax.cond`` on the step: jittable.
    """
    def init_fn(params):
        return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        def frozen(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        def active(_):
            return inner.update(updates, state.inner, params)

        new_updates, new_inner = jax.lax.cond(state.count < num_steps, frozen, active, None)
        return new_updates, FreezeState(optax.safe_increment(state.count), new_inner)
    return optax.GradientTransformation(init_fn, update_fn)


_LR_FIELDS = {"backbone": "backbone_lr", "embedding": "embedding_lr", "proxies": "proxy_lr"}


def param_labels(params: dict, *, frozen_mask: Optional[dict] = None) -> dict:
    """The optimizer group of every leaf: its top-level name, or 'frozen' where masked."""
    labels = {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in params.items()}
    if frozen_mask is not None:
        labels["backbone"] = jax.tree.map(lambda label, frozen: "frozen" if frozen else label,
                                          labels["backbone"], frozen_mask["backbone"])
    return labels


def make_optimizer(config: ml_collections.ConfigDict, labels: dict, *,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """One optax transformation with a learning rate and schedule per parameter group.

    Groups are the top-level parameter names 'backbone', 'embedding', 'proxies' (plus
    'frozen' for parameters that never move). Per group: element-wise clipping (as
    ``torch.nn.utils.clip_grad_value_``), Adam with an L2 penalty ('adam', as
    ``torch.optim.Adam(weight_decay=…)``) or decoupled decay ('adamw'), the backbone's
    warm-up freeze, then the group's learning rate and schedule. A global-norm clip, if
    set, acts on all gradients first.
    """
    o = config.optimizer
    for name in set(jax.tree.leaves(labels)) - {"frozen"}:
        if name not in _LR_FIELDS:
            raise ValueError(f"parameter group {name!r} has no learning rate; expected the "
                             f"top-level parameter names {sorted(_LR_FIELDS)}")

    def group(name: str) -> optax.GradientTransformation:
        if o.name == "adam":
            core = [optax.add_decayed_weights(o.weight_decay), optax.scale_by_adam(eps=o.eps)]
        else:
            core = [optax.scale_by_adam(eps=o.eps), optax.add_decayed_weights(o.weight_decay)]
        if o.grad_clip_value > 0:
            core.insert(0, optax.clip(o.grad_clip_value))
        core = optax.chain(*core)
        if name == "backbone" and o.warmup_epochs > 0:
            core = freeze_until(core, o.warmup_epochs * steps_per_epoch)
        lr = learning_rate_fn(getattr(o, _LR_FIELDS[name]), o, steps_per_epoch)
        return optax.chain(core, optax.scale_by_learning_rate(lr))

    names = sorted(set(jax.tree.leaves(labels)))
    transforms = {n: optax.set_to_zero() if n == "frozen" else group(n) for n in names}
    tx = optax.multi_transform(transforms, labels)
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


# ---------------------------------------------------------------------------- train state

@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed as a whole).

    Attributes:
      step: int32 [], optimizer steps taken.
      params: {'backbone', 'embedding'[, 'proxies' [C, D]]}, float32.
      batch_stats: BatchNorm running statistics ({} for a model without any).
      opt_state: the optax state.
      memory: MemVir's ``MemVirState``, or {} without MemVir.
      key: uint32 [2], the run's base PRNG key; step t uses ``fold_in(key, t)``.
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    memory: Any
    key: Array


def create_train_state(config: ml_collections.ConfigDict, model, objective: Objective,
                       tx_factory: Callable[[dict, dict], optax.GradientTransformation], *,
                       num_classes: int) -> tuple[TrainState, optax.GradientTransformation]:
    """Initial parameters (pretrained backbone if configured), proxies, memory, optimizer.

    ``tx_factory(params, variables)`` builds the optimizer once the parameter tree is known.
    """
    k_model, k_proxies, k_train = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    size = config.data.input_size
    variables = jax.jit(functools.partial(model.init, train=False))(
        k_model, jnp.zeros((1, size, size, 3), jnp.float32))
    variables = flax.core.unfreeze(variables)
    if config.model.pretrained:
        variables = models.load_pretrained(variables, config.model.pretrained,
                                           config.model.backbone)
    params = dict(variables["params"])
    if objective.uses_proxies:
        params["proxies"] = init_proxies(
            k_proxies, num_classes=num_classes, dim=config.model.embedding_dim,
            init=config.loss.proxy_init, fan=config.loss.proxy_init_fan)
    tx = tx_factory(params, variables)
    state = TrainState(
        step=jnp.zeros([], jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
        memory=objective.init_memory() if objective.init_memory else {}, key=k_train)
    return state, tx


# ------------------------------------------------------------------------------ the step

def forward_global(model, net_params: dict, batch_stats: Any, images: Array, *, freeze_bn: bool,
                   replicated: Optional[NamedSharding] = None) -> tuple[Array, Any]:
    """The training-mode forward of the global batch (shared by every train step).

    Args:
      net_params: the network's parameters (no proxies).
      images: float [B, H, W, 3], sharded on the batch.
      freeze_bn: use and keep the running BatchNorm statistics.
      replicated: the mesh's replicated sharding; the embeddings are gathered to it so
        that the loss and the regularizers see the whole global batch.

    Returns:
      Embeddings float32 [B, D] and the BatchNorm statistics after this batch.
    """
    variables = {"params": net_params, "batch_stats": batch_stats}
    if freeze_bn:
        embeddings = model.apply(variables, images, train=True)
    else:
        embeddings, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
    embeddings = embeddings.astype(jnp.float32)
    if replicated is not None:
        embeddings = jax.lax.with_sharding_constraint(embeddings, replicated)
    return embeddings, batch_stats


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               objective: Objective, steps_per_epoch: int, freeze_bn: bool,
               replicated: Optional[NamedSharding] = None) -> tuple[TrainState, dict]:
    """One optimizer step on the global batch; pure (jit it via :func:`parallelize`).

    Args:
      state: the train state (replicated).
      batch: {'image': float32 [B, H, W, 3], 'label': int32 [B]} (B global, sharded).
      replicated: the mesh's replicated sharding: the embeddings are gathered to it before
        the loss, so every regularizer sees the whole batch.

    Returns:
      The new state and metrics {'loss', 'grad_norm', 'param_norm'} (float32 scalars).
    """
    key = jax.random.fold_in(state.key, state.step)
    epoch = state.step // steps_per_epoch

    def loss_fn(params):
        net_params = {k: v for k, v in params.items() if k != "proxies"}
        embeddings, batch_stats = forward_global(model, net_params, state.batch_stats,
                                                 batch["image"], freeze_bn=freeze_bn,
                                                 replicated=replicated)
        loss, memory = objective.loss_fn(embeddings, batch["label"], params.get("proxies"),
                                         key=key, memory=state.memory, epoch=epoch)
        return loss.astype(jnp.float32), (batch_stats, memory)

    (loss, (batch_stats, memory)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, memory=memory)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}
    return new_state, metrics


# ------------------------------------------------------------------ the parallel wrapper

def make_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D mesh (axis 'data') over the first ``num_devices`` devices (-1: all).

    Devices are ordered by process, so process p's devices hold the p-th contiguous slice
    of a batch sharded on 'data' (what :func:`shard_batch` and the loader's shards assume).
    With several processes the mesh spans all devices.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if jax.process_count() > 1 and num_devices not in (-1, len(devices)):
        raise ValueError(f"config.num_devices must be -1 (all {len(devices)} devices) in a run of "
                         f"{jax.process_count()} processes, got {num_devices}")
    if num_devices != -1:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"config.num_devices must be -1 or in [1, {len(devices)}], got "
                             f"{num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def parallelize(step_fn: Callable, mesh: Mesh, **static) -> Callable:
    """The one place the step becomes data-parallel: jit with batch-sharded inputs.

    ``step_fn(state, batch, *, replicated, **static)``; the state is replicated (and
    donated), the batch sharded on its first axis, outputs replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    fn = functools.partial(step_fn, replicated=replicated, **static)
    return jax.jit(fn, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))


def check_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over the processes and the mesh's devices."""
    batch = config.data.batch_size
    if batch % mesh.devices.size or batch % jax.process_count():
        raise ValueError(f"config.data.batch_size ({batch}) must be a multiple of the number of "
                         f"devices ({mesh.devices.size}) and of processes ({jax.process_count()})")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's part of a global batch (NumPy) → global arrays sharded on 'data'."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items() if k in ("image", "label", "mask")}


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ----------------------------------------------------------------------------- evaluation

def _make_embed_fn(model, mesh: Mesh) -> Callable:
    """jit of ``(variables, batch) -> (embeddings, labels, mask)``, inputs sharded on the
    batch, outputs replicated (so every process holds the whole batch)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def embed(variables, batch):
        embeddings = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
        return embeddings, batch["label"], batch["mask"]
    return jax.jit(embed, in_shardings=(replicated, sharded), out_shardings=replicated)


def embed_dataset(embed_fn: Callable, variables: dict, dataset, config, mesh: Mesh
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [N, D] float32 (l2-normalized) and labels [N] of a whole data set.

    Batches of ``config.data.eval_batch_size`` rounded up to a multiple of the device
    count, in dataset order; the last one is padded by the loader and its padding dropped.
    """
    norm = models.input_normalization(config.model.backbone)
    devices = mesh.devices.size
    batch_size = -(-config.data.eval_batch_size // devices) * devices
    loader = pipeline.make_loader(
        dataset, batch_size=batch_size,
        sampler=samplers.ShuffleSampler(len(dataset), shuffle=False),
        transform=transforms.eval_transform(config.data.resize, config.data.input_size, norm),
        num_workers=config.data.num_workers, seed=0, drop_remainder=False, num_epochs=1,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    outputs, labels = [], []
    with loader:
        for batch in loader:
            emb, label, mask = jax.device_get(embed_fn(variables, shard_batch(batch, mesh)))
            mask = np.asarray(mask, bool)
            outputs.append(np.asarray(emb)[mask])
            labels.append(np.asarray(label)[mask])
    embeddings = np.concatenate(outputs).astype(np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12), np.concatenate(labels).astype(np.int64)


def evaluate(embed_fn: Callable, state: TrainState, data: Data, config, mesh: Mesh,
             *, workdir: Optional[str] = None, tag: str = "") -> dict:
    """Retrieval (and optionally clustering) metrics of the test set; pictures if workdir.

    Returns metrics as floats, keys as :func:`proxy_jax.evaluation.retrieval_metrics`
    ('recall@1', …, 'r_precision', 'map@r'; 'nmi', 'f1' with ``config.eval.nmi``). With
    several processes all must call it; process 0 computes, all return the same metrics.
    """
    variables = {"params": {k: v for k, v in state.params.items() if k != "proxies"},
                 "batch_stats": state.batch_stats}
    query, query_y = embed_dataset(embed_fn, variables, data.test, config, mesh)
    gallery = gallery_y = None
    if data.gallery is not None:
        gallery, gallery_y = embed_dataset(embed_fn, variables, data.gallery, config, mesh)
    metrics = None
    if multihost.is_primary():  # computed once; every process holds all the embeddings
        metrics = evaluation.retrieval_metrics(query, query_y, ks=tuple(config.eval.ks),
                                               gallery_embeddings=gallery, gallery_labels=gallery_y)
        if config.eval.nmi:
            metrics.update(evaluation.clustering_metrics(query, query_y, seed=config.seed))
        metrics = {k: float(v) for k, v in metrics.items()}
        if workdir is not None:
            _save_pictures(workdir, tag, query, query_y, gallery, gallery_y, data, config)
    return multihost.broadcast_json(metrics)


def _save_pictures(workdir, tag, query, query_y, gallery, gallery_y, data, config) -> None:
    def loader(dataset):
        return lambda i: dataset[i][0]

    if config.eval.num_queries > 0:
        visualize.save_retrieval_grid(
            os.path.join(workdir, f"retrieval{tag}.png"), query, query_y, loader(data.test),
            num_queries=config.eval.num_queries, k=config.eval.top_k, seed=config.seed,
            gallery_embeddings=gallery, gallery_labels=gallery_y,
            load_gallery_image=loader(data.gallery) if data.gallery is not None else None)
    if config.eval.map_points > 0:
        visualize.save_embedding_map(
            os.path.join(workdir, f"embedding_map{tag}.png"), query, query_y,
            max_points=config.eval.map_points, seed=config.seed,
            title=f"{config.name}: test embeddings (PCA){tag.replace('_', ' ')}")


# ---------------------------------------------------------------------------- the loop

class _StopOnSignal:
    """SIGINT/SIGTERM → ``requested`` is set; the loop saves a checkpoint and returns.

    A second signal gets the previous handler (e.g. Ctrl-C twice interrupts at once).
    """

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.requested = signum
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _flatten_config(config: ml_collections.ConfigDict) -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in _flatten_config(value).items()})
        else:
            out[key] = str(value) if isinstance(value, (tuple, list)) else value
    return out


class _Run(NamedTuple):
    """What a run derives from its config (shared by training, evaluation and embedding)."""

    config: Any
    mesh: Mesh
    data: Data
    model: Any
    objective: Objective
    tx: optax.GradientTransformation
    state: TrainState  # initial, replicated
    sampler: Any
    steps_per_epoch: int
    total_steps: int


def _check_names(config: ml_collections.ConfigDict) -> None:
    """Registry names of the config, checked before any data is read."""
    from proxy_jax import objective as objective_lib

    models.get_backbone(config.model.backbone)
    if config.model.embedding_init not in models.EMBEDDING_INITS:
        raise ValueError(f"config.model.embedding_init must be one of "
                         f"{sorted(models.EMBEDDING_INITS)}, got {config.model.embedding_init!r}")
    if config.loss.name not in objective_lib.LOSSES:
        raise ValueError(f"config.loss.name must be one of {sorted(objective_lib.LOSSES)}, got "
                         f"{config.loss.name!r}")
    if config.regularizer.name not in objective_lib.REGULARIZERS:
        raise ValueError(f"config.regularizer.name must be one of "
                         f"{list(objective_lib.REGULARIZERS)}, got {config.regularizer.name!r}")
    if config.optimizer.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule must be one of {list(SCHEDULES)}, got "
                         f"{config.optimizer.schedule!r}")


def _is_dada(config: ml_collections.ConfigDict) -> bool:
    # DADA (proxy_jax.dada_train) runs in this loop with its own state and step; imported
    # lazily because it builds on this module.
    return "dada" in config


def check_workdir(workdir: str) -> None:
    """A workdir must be a folder or not exist yet (it is created then)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is a file, not a folder; pass a folder (it is "
                         "created if it does not exist)")


def check_input_files(config: ml_collections.ConfigDict) -> None:
    """The files a config names exist: checked first, before the seconds of start-up."""
    pretrained = config.model.pretrained
    if pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"config.model.pretrained: weight file {pretrained!r} not found; write one with "
            "`python -m proxy_jax.convert` (see the README), or train from scratch with "
            "--config.model.pretrained=''")
    root = config.data.root
    if config.data.dataset != "embedded" and root and not os.path.isdir(root):
        raise FileNotFoundError(f"config.data.root: data set folder {root!r} not found; pass "
                                f"the folder of the {config.data.dataset} data set")


def _build(config: ml_collections.ConfigDict) -> _Run:
    if _is_dada(config):
        from proxy_jax import dada_train

        return dada_train.build(config)
    config_utils.validate(config)
    _check_names(config)
    check_input_files(config)  # after the cheap checks of the config, before any other work
    mesh = make_mesh(config.num_devices)
    check_batch_size(config, mesh)
    batch = config.data.batch_size
    data = load_data(config)
    sampler = make_train_sampler(config, data.train)
    steps_per_epoch = steps_per_epoch_of(config, sampler)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)
    model = create_model(config)
    objective = make_objective(config, num_classes=data.num_classes, global_batch_size=batch)

    def tx_factory(params, variables):
        mask = models.batchnorm_param_mask(variables) if config.model.freeze_bn_affine else None
        return make_optimizer(config, param_labels(params, frozen_mask=mask),
                              steps_per_epoch=steps_per_epoch)

    state, tx = create_train_state(config, model, objective, tx_factory,
                                   num_classes=data.num_classes)
    return _Run(config, mesh, data, model, objective, tx, replicate(state, mesh), sampler,
                steps_per_epoch, total_steps)


def step_function(run: _Run) -> Callable:
    """The pure step of a run, before :func:`parallelize`: :func:`train_step`, or DADA's."""
    if _is_dada(run.config):
        from proxy_jax import dada_train

        return dada_train.make_train_step(run.config, num_classes=run.data.num_classes,
                                          steps_per_epoch=run.steps_per_epoch)
    return train_step


def _record(run: _Run, state: TrainState, *, loader_state, best_recall: float,
            metrics: dict, metrics_step: Optional[int]) -> dict:
    """The JSON record saved beside the state; ``metrics`` are those of ``metrics_step``."""
    c = run.config
    return {
        "step": int(jax.device_get(state.step)),
        "loader": checkpoints.loader_state_to_json(loader_state),
        "best_recall@1": best_recall,
        "metrics": metrics,
        "metrics_step": metrics_step,
        "model": {"backbone": c.model.backbone, "embedding_dim": c.model.embedding_dim,
                  "num_classes": run.data.num_classes, "loss": c.loss.name,
                  "regularizer": c.regularizer.name},
        "config": c.to_json(),
        "shapes": checkpoints.shape_signature(state),
    }


def _learning_rates(run: _Run, step: int) -> dict:
    """The learning rate each parameter group gets at ``step``, for the logs."""
    if _is_dada(run.config):
        from proxy_jax import dada_train

        return dada_train.learning_rates(run.config, step, steps_per_epoch=run.steps_per_epoch)
    o = run.config.optimizer
    groups = ["backbone", "embedding"] + (["proxies"] if run.objective.uses_proxies else [])
    rates = {}
    for g in groups:
        lr = float(learning_rate_fn(getattr(o, _LR_FIELDS[g]), o, run.steps_per_epoch)(step))
        if g == "backbone" and step < o.warmup_epochs * run.steps_per_epoch:
            lr = 0.0  # frozen for warm-up
        rates[f"lr/{g}"] = lr
    return rates


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Iterable[Callable[[int, TrainState], None]] = ()) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoint) and evaluates it.

    Writes ``workdir/checkpoints/{latest,best}``, TensorBoard events, ``metrics.json`` (the
    last evaluation) and, at each evaluation, ``retrieval.png`` and ``embedding_map.png``.

    Args:
      config: see ``proxy_jax.config_utils``.
      workdir: the run's folder.
      hooks: called as ``hook(step, state)`` after every step (e.g. profiling, tests).

    Returns:
      The metrics of the last evaluation (plus 'step').

    Raises:
      ValueError: a bad config, or a workdir holding an incompatible checkpoint.
      FloatingPointError: the loss became NaN or infinite (the message names the step; the
        last checkpoint, written before it, is kept).
    """
    from clu import metric_writers

    check_workdir(workdir)
    run = _build(config)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = checkpoints.Checkpointer(workdir)
    state = run.state
    best_recall = -1.0
    loader_state = None
    last_metrics: dict = {}
    metrics_step: Optional[int] = None  # the step last_metrics were measured at
    # Resume order: (1) build model, optimizer and a fresh state from the config; (2) read
    # the newest checkpoint's record and refuse an incompatible one before anything is
    # written; (3) restore the state into the fresh state's structure, verifying its
    # checksum (a damaged checkpoint is set aside and the previous intact one used);
    # (4) restore the loader position; (5) restore the best Recall@1 so far and the last
    # evaluation. The step, the RNG key, the optimizer state and MemVir's memory all live
    # in the state.
    restored = record = None
    if checkpointer.latest_step() is not None or checkpointer.latest_step(best=True) is not None:
        try:
            restored = checkpointer.restore(state, check=functools.partial(
                checkpoints.check_compatible, state=state, directory=checkpointer.directory))
        except BaseException:
            checkpointer.close()
            raise
    if restored is not None:
        state, record = replicate(restored.state, run.mesh), restored.record
        loader_state = checkpoints.loader_state_from_json(record["loader"])
        best_recall = float(record["best_recall@1"])
        last_metrics = dict(record.get("metrics") or {})
        metrics_step = record.get("metrics_step", record["step"] if last_metrics else None)
        logging.info("resumed from %s at step %d", restored.path, record["step"])
        if record["step"] >= run.total_steps:
            checkpointer.close()
            logging.info("already finished at step %d (of %d); nothing to train", record["step"],
                         run.total_steps)
            return _result(record["step"], metrics_step, last_metrics)

    loader = pipeline.make_loader(
        run.data.train, batch_size=config.data.batch_size, sampler=run.sampler,
        transform=transforms.train_transform(config.data.input_size, run.data.normalization,
                                             scale=(config.data.crop_scale_min, 1.0)),
        num_workers=config.data.num_workers, seed=config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True)
    if loader_state is not None:
        loader.set_state(loader_state)
    train_iter = iter(loader)

    p_train_step = parallelize(
        step_function(run), run.mesh, model=run.model, tx=run.tx, objective=run.objective,
        steps_per_epoch=run.steps_per_epoch, freeze_bn=config.model.freeze_bn)
    embed_fn = _make_embed_fn(run.model, run.mesh)
    primary = multihost.is_primary()
    # Process 0 writes TensorBoard events; the others' writer drops everything (the values
    # are the same). The progress lines come from the loop's own logging, so no
    # LoggingWriter (it would print every line a second time).
    writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])
              if primary else metric_writers.MultiWriter([]))
    if record is None:
        writer.write_hparams(_flatten_config(config))

    step = int(jax.device_get(state.step))
    pending: list = []  # (step, metrics on device): fetched at log time, no per-step sync
    timer = (time.perf_counter(), step)
    start_time, start_step = timer

    def check_pending():
        """Fetches the pending metrics; raises on a non-finite loss, naming its step."""
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            if not np.isfinite(m["loss"]):
                kept = checkpointer.latest_step()
                raise FloatingPointError(
                    f"loss is {float(m['loss'])} at step {s} (epoch {(s - 1) // run.steps_per_epoch}); "
                    f"training stopped. The last good checkpoint (step {kept}) is kept in "
                    f"{checkpointer.directory}/latest")
        return fetched

    def save(*, best=False):
        rec = _record(run, state, loader_state=loader.get_state(), best_recall=best_recall,
                      metrics=last_metrics, metrics_step=metrics_step)
        checkpointer.save(state, rec, best=best)

    try:
        with _StopOnSignal() as stop:
            while step < run.total_steps:
                batch = next(train_iter)
                run.objective.check_batch(np.asarray(batch["label"]))
                state, metrics = p_train_step(state, shard_batch(batch, run.mesh))
                step += 1
                pending.append((step, metrics))
                for hook in hooks:
                    hook(step, state)

                end_of_epoch = step % run.steps_per_epoch == 0
                epoch = (step - 1) // run.steps_per_epoch
                evaluate_now = step == run.total_steps or (
                    end_of_epoch and (epoch + 1) % config.eval.every_epochs == 0)
                log_now = step % config.log_every_steps == 0
                stopping = stop.requested is not None
                if jax.process_count() > 1:
                    # A signal may reach some processes, or reach them at different steps:
                    # they agree at logging steps (a collective, so only there).
                    stopping = log_now and multihost.any_process(stopping)
                if log_now or evaluate_now or stopping:
                    fetched = check_pending()
                    now = time.perf_counter()
                    rate = (step - timer[1]) / max(now - timer[0], 1e-9)
                    timer = (now, step)
                    scalars = {f"train/{k}": float(np.mean([m[k] for _, m in fetched]))
                               for k in fetched[-1][1]}
                    scalars.update(_learning_rates(run, step - 1))
                    scalars["train/steps_per_sec"] = rate
                    scalars["train/images_per_sec"] = rate * config.data.batch_size
                    writer.write_scalars(step, scalars)
                    eta = (run.total_steps - step) / max(
                        (step - start_step) / max(now - start_time, 1e-9), 1e-9)
                    logging.info("step %d/%d epoch %d loss %.4f  %.1f img/s  ETA %s", step,
                                 run.total_steps, epoch, scalars["train/loss"],
                                 scalars["train/images_per_sec"], _format_eta(eta))
                if evaluate_now:
                    last_metrics = evaluate(embed_fn, state, run.data, config, run.mesh,
                                            workdir=workdir)
                    metrics_step = step
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in last_metrics.items()})
                    logging.info("step %d eval %s", step,
                                 ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()))
                    improved = last_metrics["recall@1"] > best_recall
                    best_recall = max(best_recall, last_metrics["recall@1"])
                    save()
                    if improved:
                        save(best=True)
                    if primary:
                        with open(os.path.join(workdir, "metrics.json"), "w") as f:
                            json.dump({"step": step, **last_metrics}, f, indent=2)
                elif (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) \
                        or stopping:
                    check_pending()
                    save()
                if stopping:
                    logging.warning("stopped by a signal at step %d; resume with the same "
                                    "command", step)
                    break
        writer.flush()
    finally:
        writer.close()
        checkpointer.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return _result(step, metrics_step, last_metrics)


def _result(step: int, metrics_step: Optional[int], metrics: dict) -> dict:
    """What a run returns: the step reached, and the last metrics with the step of them."""
    return {"step": step, "metrics_step": metrics_step, **metrics}


# ------------------------------------------------------------------ evaluate, embed modes

def _restore_for_inference(config, workdir: str, *, best: bool):
    """The run of ``config`` and the best (else the latest) intact checkpoint of ``workdir``."""
    check_workdir(workdir)
    if not checkpoints.has_checkpoint(workdir):  # before any expensive work; creates nothing
        raise checkpoints.CheckpointError(
            f"workdir {workdir!r} holds no checkpoint (expected {workdir}/checkpoints/latest/"
            "<step>); train it first with --mode=train and the same --config and --workdir")
    run = _build(config)
    checkpointer = checkpoints.Checkpointer(workdir, create=False)
    try:
        restored = checkpointer.restore(run.state, prefer_best=best, check=functools.partial(
            checkpoints.check_compatible, state=run.state, directory=checkpointer.directory))
    finally:
        checkpointer.close()
    return run, replicate(restored.state, run.mesh), restored.record


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        best: bool = True) -> dict:
    """Evaluates the best (else the latest) checkpoint of ``workdir``; writes the pictures."""
    run, state, record = _restore_for_inference(config, workdir, best=best)
    metrics = evaluate(_make_embed_fn(run.model, run.mesh), state, run.data, config, run.mesh,
                       workdir=workdir, tag="_eval")
    logging.info("checkpoint step %d: %s", record["step"],
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"step": record["step"], **metrics}


def images_under(folder: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Every image file under ``folder`` (recursively, sorted) with a label.

    The label of a file is the index of the top-level sub-folder it lies in, among the sorted
    names of the sub-folders that hold images (its class, as in ``folder/<class>/**``), and
    -1 for a file directly in ``folder``.

    Returns:
      ([(path, label)], class names).

    Raises:
      ValueError: ``folder`` is not a folder or holds no image files.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"embed folder {folder!r} is not a folder")
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(parent, folder)
        top = "" if rel == "." else rel.split(os.sep)[0]
        found += [(os.path.join(parent, f), top) for f in sorted(files)
                  if datasets.is_image_file(f)]
    if not found:
        raise ValueError(f"embed folder {folder!r} holds no image files (extensions "
                         f"{', '.join(datasets.IMG_EXTENSIONS)})")
    classes = sorted({top for _, top in found if top})
    index = {c: i for i, c in enumerate(classes)}
    return [(path, index.get(top, -1)) for path, top in found], classes


def embed_folder(config: ml_collections.ConfigDict, workdir: str, folder: str, output: str, *,
                 best: bool = True) -> dict:
    """Embeds every image under ``folder`` with the workdir's checkpoint into ``output``.

    Every image file anywhere under ``folder`` is embedded (see :func:`images_under` for
    the labels). ``output`` is an ``.npz`` with ``embeddings`` float32 [N, D]
    (l2-normalized), ``labels`` int64 [N], ``paths`` [N] and ``classes``.
    """
    samples, classes = images_under(folder)  # before the checkpoint is read
    run, state, record = _restore_for_inference(config, workdir, best=best)
    dataset = datasets.ImageDataset([(path, 0) for path, _ in samples], ["?"])
    variables = {"params": {k: v for k, v in state.params.items() if k != "proxies"},
                 "batch_stats": state.batch_stats}
    embeddings, _ = embed_dataset(_make_embed_fn(run.model, run.mesh), variables, dataset,
                                  config, run.mesh)
    labels = np.asarray([label for _, label in samples], np.int64)
    paths = np.asarray([path for path, _ in samples])
    if multihost.is_primary():
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        np.savez(output, embeddings=embeddings, labels=labels, paths=paths,
                 classes=np.asarray(classes))
    logging.info("wrote %d embeddings (checkpoint step %d) to %s", len(embeddings),
                 record["step"], output)
    return {"num_images": len(embeddings), "dim": embeddings.shape[1], "step": record["step"]}
