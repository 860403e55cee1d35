"""Learning-rate schedules and the optimizer: one schedule function and one builder for every method.

A method describes its parameter groups (:class:`Group`: learning rate, weight decay, how
many of its updates are frozen, and which trainer step its n-th update belongs to) and
:func:`make_optimizer` turns them into one optax transformation over the parameter tree.
The schedules are those of the official training scripts, functions of the trainer's
0-based step (epochs are ``step // steps_per_epoch``), so that a run stopped and resumed
follows the same learning rates.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["SCHEDULES", "learning_rate_fn", "freeze_until", "Group", "make_optimizer",
           "learning_rates", "param_labels", "layer_decay_scales", "scale_by_tree"]

Array = jax.Array

SCHEDULES = ("constant", "step_decay", "step_lr", "multistep", "multistep_lr",
             "warmup_cosine")


def learning_rate_fn(base_lr: float, optimizer_config, steps_per_epoch: int, *,
                     delay_epochs: int = 0) -> Callable[[Array], Array]:
    """Learning rate as a function of the trainer's 0-based step (jittable; also for logs).

    ``k = max(0, epoch − delay_epochs)`` is the number of epochs the scheduler has stepped
    (DADA starts its schedulers only after its warm-ups; every other method has no delay),
    ``rate = decay_rate``:

    * 'constant'.
    * 'step_decay' (Proxy Synthesis / MemVir ``adjust_learning_rate``, called at the start
      of each 1-based epoch e: ``lr *= rate`` if ``e % decay_step == 0 and e <= decay_stop``):
      ``lr · rate^⌊min(k + 1, decay_stop) / decay_step⌋`` (``decay_stop = -1``: no stop).
    * 'step_lr' (``torch.optim.lr_scheduler.StepLR`` stepped after each epoch: Proxy-Anchor,
      DADA ``--scheduler step``): ``lr · rate^⌊k / decay_step⌋``.
    * 'multistep' (MXNet ``MultiFactorScheduler`` over iterations, Embedding Expansion):
      ``lr · rate^#{m ∈ decay_epochs : step − delay · steps_per_epoch > m · steps_per_epoch}``.
    * 'multistep_lr' (``torch.optim.lr_scheduler.MultiStepLR`` stepped after each epoch,
      DADA ``--scheduler multi``): ``lr · rate^#{m ∈ decay_epochs : k ≥ m}``.
    * 'warmup_cosine' (the ViT recipes', per step ``s`` of the scheduler, i.e. after the
      delay): linear from 0 to ``lr`` over ``W = lr_warmup_epochs · steps_per_epoch`` steps,
      then a cosine from ``lr`` to ``lr · final_lr_ratio`` at step ``T = cosine_epochs ·
      steps_per_epoch`` (warm-up included), constant after it
      (``optax.warmup_cosine_decay_schedule``).
    """
    o = optimizer_config
    if o.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule must be one of {list(SCHEDULES)}, got "
                         f"{o.schedule!r}")
    rate, decay_step, decay_stop = o.decay_rate, o.decay_step, o.decay_stop
    epochs = tuple(int(m) for m in o.decay_epochs)
    if o.schedule == "warmup_cosine":
        return _warmup_cosine(base_lr, o, steps_per_epoch, delay_epochs)

    def fn(step):
        step = jnp.asarray(step, jnp.int32) - delay_epochs * steps_per_epoch
        k = jnp.maximum(step, 0) // steps_per_epoch
        if o.schedule == "constant":
            n = jnp.zeros((), jnp.int32)
        elif o.schedule == "step_decay":
            e = k + 1 if decay_stop < 0 else jnp.minimum(k + 1, decay_stop)
            n = e // decay_step
        elif o.schedule == "step_lr":
            n = k // decay_step
        elif o.schedule == "multistep":
            n = sum((step > m * steps_per_epoch).astype(jnp.int32) for m in epochs)
        else:
            n = sum((k >= m).astype(jnp.int32) for m in epochs)
        return base_lr * jnp.power(jnp.float32(rate), jnp.asarray(n, jnp.float32))
    return fn


def _warmup_cosine(base_lr: float, o, steps_per_epoch: int, delay_epochs: int):
    if not 0 <= o.lr_warmup_epochs < o.cosine_epochs:
        raise ValueError(f"config.optimizer.cosine_epochs ({o.cosine_epochs}) must exceed "
                         f"config.optimizer.lr_warmup_epochs ({o.lr_warmup_epochs}) >= 0 for "
                         "the 'warmup_cosine' schedule")
    cosine = optax.warmup_cosine_decay_schedule(
        0.0, base_lr, o.lr_warmup_epochs * steps_per_epoch, o.cosine_epochs * steps_per_epoch,
        end_value=base_lr * o.final_lr_ratio)

    def fn(step):
        step = jnp.asarray(step, jnp.int32) - delay_epochs * steps_per_epoch
        return jnp.asarray(cosine(jnp.maximum(step, 0)), jnp.float32)
    return fn


class FreezeState(NamedTuple):
    count: Array  # updates seen so far, frozen ones included
    inner: optax.OptState


def freeze_until(inner: optax.GradientTransformation, num_updates: int
                 ) -> optax.GradientTransformation:
    """Zero updates for the first ``num_updates`` updates; ``inner`` untouched meanwhile.

    This is the warm-up of the seeds (``requires_grad=False`` on the backbone for the first
    epochs): the parameters do not move, get no weight decay, and the inner optimizer's
    state (Adam moments and step count) starts only when training starts, as PyTorch's
    per-parameter state does. The switch is a ``lax.cond`` on the count: jittable.
    """
    def init_fn(params):
        return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        def frozen(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        def active(_):
            return inner.update(updates, state.inner, params)

        new_updates, new_inner = jax.lax.cond(state.count < num_updates, frozen, active, None)
        return new_updates, FreezeState(optax.safe_increment(state.count), new_inner)
    return optax.GradientTransformation(init_fn, update_fn)


def _identity(count):
    return count


class Group(NamedTuple):
    """One parameter group of :func:`make_optimizer`.

    Attributes:
      lr: its base learning rate (the schedule multiplies it).
      weight_decay: its L2 penalty ('adam') or decoupled decay ('adamw').
      frozen_updates: its first updates that change nothing (the backbone's warm-up).
      step_of_update: maps the group's update count (what optax counts) to the trainer step
        its schedule reads; the identity when the group is updated once per step.
      active_from: the first trainer step at which the group is updated (for the logs).
    """

    lr: float
    weight_decay: float
    frozen_updates: int = 0
    step_of_update: Callable[[Array], Array] = _identity
    active_from: int = 0


def make_optimizer(optimizer_config, groups: Mapping[str, Group], labels, *,
                   steps_per_epoch: int, delay_epochs: int = 0
                   ) -> optax.GradientTransformation:
    """One optax transformation with a learning rate and schedule per parameter group.

    Per group: element-wise clipping (as ``torch.nn.utils.clip_grad_value_``), Adam with an
    L2 penalty ('adam', as ``torch.optim.Adam(weight_decay=…)``) or decoupled decay
    ('adamw'), the group's warm-up freeze, then its learning rate and schedule
    (:func:`learning_rate_fn`). A global-norm clip, if set, acts on all gradients first.

    Args:
      optimizer_config: ``config.optimizer``.
      groups: group name -> :class:`Group`; the name ``'frozen'`` is reserved (never moves).
      labels: the parameter tree (or a prefix of it) with a group name at every leaf.
      steps_per_epoch: the trainer's steps per epoch.
      delay_epochs: epochs before the schedules start (DADA's warm-ups).
    """
    o = optimizer_config
    missing = set(jax.tree.leaves(labels)) - set(groups) - {"frozen"}
    if missing:
        raise ValueError(f"parameter groups {sorted(missing)} have no learning rate; known "
                         f"groups are {sorted(groups)}")

    def group(g: Group) -> optax.GradientTransformation:
        if o.name == "adam":
            core = [optax.add_decayed_weights(g.weight_decay), optax.scale_by_adam(eps=o.eps)]
        else:
            core = [optax.scale_by_adam(eps=o.eps), optax.add_decayed_weights(g.weight_decay)]
        if o.grad_clip_value > 0:
            core.insert(0, optax.clip(o.grad_clip_value))
        core = optax.chain(*core)
        if g.frozen_updates > 0:
            core = freeze_until(core, g.frozen_updates)
        lr = learning_rate_fn(g.lr, o, steps_per_epoch, delay_epochs=delay_epochs)
        return optax.chain(core, optax.scale_by_learning_rate(
            lambda count: lr(g.step_of_update(count))))

    names = sorted(set(jax.tree.leaves(labels)))
    transforms = {n: optax.set_to_zero() if n == "frozen" else group(groups[n]) for n in names}
    tx = optax.multi_transform(transforms, labels)
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


def learning_rates(optimizer_config, groups: Mapping[str, Group], step: int, *,
                   steps_per_epoch: int, delay_epochs: int = 0,
                   frozen_until: Optional[Mapping[str, int]] = None) -> dict:
    """``{'lr/<group>': float}``: the rate each group gets at trainer ``step`` (for the logs).

    A group is reported at 0 before its ``active_from`` step and while it is frozen
    (``frozen_until[name]``: the first trainer step at which it moves).
    """
    frozen_until = frozen_until or {}
    rates = {}
    for name, g in groups.items():
        active = step >= g.active_from and step >= frozen_until.get(name, 0)
        lr = learning_rate_fn(g.lr, optimizer_config, steps_per_epoch,
                              delay_epochs=delay_epochs)(step)
        rates[f"lr/{name}"] = float(lr) if active else 0.0
    return rates


def param_labels(params: dict, *, frozen_mask: Optional[dict] = None,
                 patch_embed_group: bool = False) -> dict:
    """The optimizer group of every leaf: its top-level name, or 'frozen' where masked.

    With ``patch_embed_group``, a ViT's ``backbone/patch_embed`` leaves form the group
    'patch_embed' (frozen for its own number of epochs, ``freeze_patch_embed_epochs``).
    """
    labels = {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in params.items()}
    if frozen_mask is not None:
        labels["backbone"] = jax.tree.map(lambda label, frozen: "frozen" if frozen else label,
                                          labels["backbone"], frozen_mask["backbone"])
    if patch_embed_group:
        labels["backbone"] = dict(labels["backbone"])
        labels["backbone"]["patch_embed"] = jax.tree.map(
            lambda label: label if label == "frozen" else "patch_embed",
            labels["backbone"]["patch_embed"])
    return labels


def layer_decay_scales(params: dict, *, decay: float, depth: int) -> dict:
    """Layer-wise learning-rate decay (Clark et al., ELECTRA, ICLR 2020; BEiT's numbering
    for ViTs): a tree like ``params`` of the factor each leaf's update is multiplied by.

    A ViT backbone's layers are 0 (``patch_embed``, ``cls_token``, ``reg_token``,
    ``pos_embed``), i + 1 (``blocks/i``) and depth + 1 (the final ``norm``); layer l gets
    ``decay ** (depth + 1 - l)``. Every leaf outside the backbone gets 1.
    """
    def backbone_scale(path, _):
        top = path[0].key
        layer = int(path[1].key) + 1 if top == "blocks" else depth + 1 if top == "norm" else 0
        return float(decay ** (depth + 1 - layer))

    return {name: (jax.tree_util.tree_map_with_path(backbone_scale, sub) if name == "backbone"
                   else jax.tree.map(lambda _: 1.0, sub))
            for name, sub in params.items()}


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching static float of ``scales`` (a tree like
    the parameters, e.g. :func:`layer_decay_scales`)."""
    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, scales), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
