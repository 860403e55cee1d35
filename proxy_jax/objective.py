"""The training objective: a config turned into one pure loss function on the global batch.

``make_objective(config, …)`` picks a base loss and at most one regularizer by name from the
small registries below and returns an :class:`Objective` whose ``loss_fn`` is::

    loss_fn(embeddings [B, D], labels [B], proxies [C, D] | None, *, key, memory, epoch)
        -> (loss: float32 scalar, new_memory)

It knows nothing about networks, optimizers or devices: ``proxy_jax.train`` runs the
backbone (sharded over devices) and hands this function the *global* batch, so the loss,
the synthetic classes of Proxy Synthesis and MemVir's queue do not depend on how many
devices computed the embeddings.

Registries:

* ``LOSSES``: 'norm_softmax', 'proxy_nca', 'proxy_anchor' (proxy losses: proxies are the
  ``params['proxies']`` parameter, [C, D]) and 'hphn_triplet' (no proxies).
* ``REGULARIZERS``: '' (none), 'ps' (Proxy Synthesis; the batch is first reordered in-graph
  so that neighbouring labels differ, as the official loop does), 'memvir' (virtual classes
  from a ring buffer carried in the train state; memory active from the 0-based epoch
  ``config.regularizer.memvir_warm_epochs`` on, i.e. the official ``epoch > warm_epoch``
  with 1-based epochs; Norm-SoftMax and Proxy-NCA use the fused, cached MemVir losses of
  ``proxy_jax.regularizers.memvir``), 'ee' (Embedding Expansion, HPHN only).
  No seed combines two regularizers and their batch contracts do not compose (PS adds
  classes that MemVir's fixed-shape queue has no room for), so a config names at most one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from proxy_jax import losses, regularizers
from proxy_jax.regularizers import memvir

__all__ = ["Objective", "make_objective", "init_proxies", "LOSSES", "REGULARIZERS"]

Array = jax.Array


class _LossSpec(NamedTuple):
    fn: Callable[..., Array]
    uses_proxies: bool
    hyper_parameters: Callable[[Any], dict]  # config.loss -> keyword arguments of fn


LOSSES = {
    "norm_softmax": _LossSpec(losses.norm_softmax, True, lambda c: dict(scale=c.scale)),
    "proxy_nca": _LossSpec(losses.proxy_nca, True, lambda c: dict(scale=c.scale)),
    "proxy_anchor": _LossSpec(losses.proxy_anchor, True,
                              lambda c: dict(alpha=c.alpha, margin=c.margin)),
    "hphn_triplet": _LossSpec(losses.hphn_triplet, False,
                              lambda c: dict(margin=c.margin, soft_margin=c.soft_margin,
                                             reduction=c.reduction)),
}

REGULARIZERS = ("", "ps", "memvir", "ee")

# Base losses with a fused MemVir loss (same keyword arguments as the base loss).
_MEMVIR_FUSED = {
    "norm_softmax": memvir.memvir_norm_softmax,
    "proxy_nca": memvir.memvir_proxy_nca,
}


class Objective(NamedTuple):
    """What the trainer needs to know about the objective of a config.

    Attributes:
      loss_fn: ``(embeddings, labels, proxies, *, key, memory, epoch) -> (loss, memory)``,
        pure and jittable; ``proxies`` is None and ``memory`` passes through unchanged when
        unused.
      uses_proxies: whether ``params['proxies']`` [C, D] exists.
      init_memory: ``() -> MemVirState`` for MemVir, else None.
      check_batch: host-side check of the labels this process loads (NumPy [B / processes],
        its contiguous slice of the global batch) for the regularizer's batch contract
        (EE's pairs, DADA's classes); raises ValueError.
    """

    loss_fn: Callable[..., tuple]
    uses_proxies: bool
    init_memory: Optional[Callable[[], Any]]
    check_batch: Callable[[np.ndarray], None]


def init_proxies(key: Array, *, num_classes: int, dim: int, init: str, fan: str) -> Array:
    """Proxies [C, D] float32, initialised as the official code initialises them.

    ``init='kaiming_uniform'`` is PyTorch's ``kaiming_uniform_(a=√5)``: U(±1/√fan);
    ``init='kaiming_normal'`` is ``kaiming_normal_`` (gain √2): N(0, 2/fan). ``fan`` says
    which dimension PyTorch took as the fan for the official parameter layout: 'dim' (D,
    e.g. proxy-synthesis' [C, D] tensor with fan_in) or 'classes' (C, e.g. MemVir's [D, C]
    weight with fan_in, or Proxy-Anchor's [C, D] tensor with mode='fan_out'). The norm of
    the proxies matters although every loss normalizes them: Adam's steps are of a fixed
    size, so smaller proxies turn faster.
    """
    if fan not in ("dim", "classes"):
        raise ValueError(f"fan must be 'dim' or 'classes', got {fan!r}")
    fan_size = dim if fan == "dim" else num_classes
    if init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(fan_size)
        return jax.random.uniform(key, (num_classes, dim), jnp.float32, -bound, bound)
    if init == "kaiming_normal":
        return math.sqrt(2.0 / fan_size) * jax.random.normal(key, (num_classes, dim), jnp.float32)
    raise ValueError(f"init must be 'kaiming_uniform' or 'kaiming_normal', got {init!r}")


def _no_check(labels: np.ndarray) -> None:
    del labels


def make_objective(config, *, num_classes: int, global_batch_size: int,
                   _fused_memvir: bool = True) -> Objective:
    """Builds the objective of ``config`` (its ``loss`` and ``regularizer`` sections).

    Args:
      config: the training ConfigDict (see ``proxy_jax.config_utils``).
      num_classes: C, the number of training classes (rows of the proxies).
      global_batch_size: B, the batch the loss sees (all devices and hosts together).
      _fused_memvir: internal (tests and benchmarks): False makes MemVir with Norm-SoftMax
        or Proxy-NCA run the generic path (base loss over ``memvir_virtual``, memory
        without cache) instead of the fused loss; the value and gradients are the same.

    Raises:
      ValueError: an unknown loss or regularizer name (listing the known ones), or a
        regularizer that does not fit the loss.
    """
    loss_name, reg = config.loss.name, config.regularizer
    if loss_name not in LOSSES:
        raise ValueError(f"config.loss.name must be one of {sorted(LOSSES)}, got {loss_name!r}")
    if reg.name not in REGULARIZERS:
        raise ValueError(f"config.regularizer.name must be one of {list(REGULARIZERS)}, got "
                         f"{reg.name!r}")
    spec = LOSSES[loss_name]
    base = spec.fn
    kwargs = spec.hyper_parameters(config.loss)
    if reg.name in ("ps", "memvir") and not spec.uses_proxies:
        raise ValueError(f"config.regularizer.name={reg.name!r} needs a proxy loss, but "
                         f"config.loss.name={loss_name!r} has no proxies")
    if reg.name == "ee" and loss_name != "hphn_triplet":
        raise ValueError("config.regularizer.name='ee' (Embedding Expansion) works with "
                         f"config.loss.name='hphn_triplet', got {loss_name!r}")

    if reg.name == "":
        def loss_fn(embeddings, labels, proxies, *, key, memory, epoch):
            del key, epoch
            if spec.uses_proxies:
                return base(embeddings, labels, proxies, **kwargs), memory
            return base(embeddings, labels, **kwargs), memory
        return Objective(loss_fn, spec.uses_proxies, None, _no_check)

    if reg.name == "ps":
        alpha, mu = float(reg.ps_alpha), float(reg.ps_mu)
        if mu > 0 and math.floor(global_batch_size * mu) == 0:
            raise ValueError(f"config.regularizer.ps_mu={mu} with a global batch of "
                             f"{global_batch_size} synthesizes no sample; use ps_mu=0 or more")

        def loss_fn(embeddings, labels, proxies, *, key, memory, epoch):
            del epoch
            key_order, key_lambda = jax.random.split(key)
            # The official loop reorders each batch so that y[i] != y[i+1]: synthetic class
            # i mixes rows i and i-1, and must not be a mix of one class with itself.
            order = regularizers.distinct_neighbours(labels, key_order)
            e, y, p = regularizers.proxy_synthesis(
                key_lambda, embeddings[order], labels[order], proxies, alpha=alpha, mu=mu)
            return base(e, y, p, **kwargs), memory
        return Objective(loss_fn, True, None, _no_check)

    if reg.name == "memvir":
        num_steps, step_gap = int(reg.memvir_num_steps), int(reg.memvir_step_gap)
        warm_epochs = int(reg.memvir_warm_epochs)
        if num_steps < 1 or step_gap < 0:
            raise ValueError("config.regularizer.memvir_num_steps must be >= 1 and "
                             f"memvir_step_gap >= 0, got {num_steps}, {step_gap}")
        # Norm-SoftMax and Proxy-NCA have a fused MemVir loss: same value and gradients,
        # but only the current step is differentiated and the memory-memory logsumexps
        # come from a cache the push maintains (memvir's module docstring). Other proxy
        # losses run over memvir_virtual's masked concatenation.
        fused = _MEMVIR_FUSED.get(loss_name) if _fused_memvir else None
        cache = dict(cache_loss=loss_name, cache_scale=float(kwargs["scale"])) if fused else {}

        def init_memory():
            return memvir.memvir_init(
                num_steps=num_steps, step_gap=step_gap, batch_size=global_batch_size,
                num_classes=num_classes, dim=config.model.embedding_dim, dtype=jnp.float32,
                **cache)

        def loss_fn(embeddings, labels, proxies, *, key, memory, epoch):
            del key
            # Official order (MemVir main.py): read the memory, push the current step, then
            # compute the loss over the current step and what was read.
            if fused is not None:
                loss = fused(memory, embeddings, labels, proxies, **kwargs)
            else:
                e, y, p, sample_mask, proxy_mask = memvir.memvir_virtual(
                    memory, embeddings, labels, proxies)
                loss = base(e, y, p, proxy_mask=proxy_mask, sample_mask=sample_mask, **kwargs)
            # The official code pushes (and reads) only while its 1-based epoch is
            # > warm_epoch; ``epoch`` here is the trainer's 0-based step // steps_per_epoch,
            # so that is epoch + 1 > warm_epochs, i.e. epoch >= warm_epochs. During the
            # warm-up the memory stays empty, so the read above adds nothing either.
            new_memory = memvir.memvir_push(
                memory, jax.lax.stop_gradient(embeddings), labels,
                jax.lax.stop_gradient(proxies), active=epoch >= warm_epochs)
            return loss, new_memory
        return Objective(loss_fn, True, init_memory, _no_check)

    # reg.name == "ee"
    num_inner, l2_norm = int(reg.ee_num_inner), bool(reg.ee_l2_norm)
    if num_inner < 0:
        raise ValueError(f"config.regularizer.ee_num_inner must be >= 0, got {num_inner}")

    def loss_fn(embeddings, labels, proxies, *, key, memory, epoch):
        del proxies, key, epoch
        if num_inner == 0:
            return base(embeddings, labels, **kwargs), memory
        e, y = regularizers.embedding_expansion(embeddings, labels, num_inner=num_inner,
                                                l2_norm=l2_norm)
        return base(e, y, num_original=embeddings.shape[0], **kwargs), memory
    return Objective(loss_fn, False, None, regularizers.check_pairs)
