"""The training objective: a loss and a chain of regularizers, declared once, composed by rule.

``make_objective(config, …)`` returns an :class:`Objective` whose ``loss_fn`` is::

    loss_fn(embeddings [B, D], labels [B], proxies [P, D] | None, *, key, extra, epoch,
            sample_mask [B] bool | None) -> (loss: float32 scalar, new_extra)

It knows nothing about networks, optimizers or devices: the proxy method
(:mod:`proxy_jax.methods.proxy`) runs the backbone (sharded over devices) and hands this
function the *global* batch, so the loss, the synthetic classes of Proxy Synthesis and
MemVir's memory do not depend on how many devices computed the embeddings.

Two registries, one declaration per entry, hold everything the rest of proxy_jax knows of a
loss or a regularizer: the function, its config fields and their defaults (the base config
is built from them, ``proxy_jax.config_utils``), and what it needs and produces.

* :data:`LOSSES`: ``config.loss.name``. A proxy loss's proxies are the
  ``params['proxies']`` parameter, [P, D] with P = C · ``centers_per_class``.
* :data:`REGULARIZERS`: ``config.regularizer.name`` is a chain, names joined by '+'
  (``'ps'``, ``'ps+memvir'``; ``''`` for none), applied in order to the batch
  (embeddings, labels, proxies, masks) before the loss.

Compatibility follows from the declarations, never from names: a regularizer *needs*
properties of the loss ('proxies': a proxy loss; 'one_proxy_per_class': row c of the
proxies is class c) and of the batch ('pairs': checked on the host before every step);
it *produces* features of the batch it hands on ('synthetic': appended samples and classes;
'masks': sample and proxy masks; 'expanded': extra points a loss must know of; 'padded', from
the data: masked padded rows), and every
later stage and the loss must *accept* each feature it receives. An incompatible chain fails
at start-up naming both parts and the feature.

Proxy Synthesis then MemVir (``'ps+memvir'``): the synthetic classes live for one step
only. MemVir's memory holds the real embeddings, labels and proxies of past steps (what a
MemVir run without PS would hold), and the loss of a step sees the real batch, its
synthetic classes and the memory's virtual classes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from proxy_jax import losses, models, regularizers
from proxy_jax.regularizers import memvir

__all__ = ["Loss", "Regularizer", "Stage", "Flow", "Objective", "LOSSES", "REGULARIZERS",
           "LOSS_FIELDS", "make_objective", "regularizer_chain", "check_chain", "init_proxies"]

Array = jax.Array


# ------------------------------------------------------------------------------- losses

class Loss(NamedTuple):
    """A loss of :data:`LOSSES`.

    Attributes:
      fn: the loss of :mod:`proxy_jax.losses`: ``fn(embeddings, labels[, proxies], **kw)``.
      fields: its fields of ``config.loss`` with their defaults (shared names, such as
        ``margin``, must have equal defaults).
      kwargs: ``config.loss -> keyword arguments of fn``.
      uses_proxies: it takes proxies (``params['proxies']``).
      accepts: the batch features (see the module docstring) it takes from regularizers.
      centers_per_class: ``config.loss -> K``, proxy rows per class (1 for most).
      memvir_fused: ``(memory, embeddings, labels, proxies, **kw) -> loss``, a fused MemVir
        form with the same value and gradients (used when MemVir alone precedes it).
    """

    fn: Callable[..., Array]
    fields: Mapping[str, Any]
    kwargs: Callable[[Any], dict]
    uses_proxies: bool
    accepts: frozenset = frozenset()
    centers_per_class: Callable[[Any], int] = lambda c: 1
    memvir_fused: Optional[Callable[..., Array]] = None


_MASKS = frozenset({"masks", "synthetic", "padded"})

LOSSES = {
    "norm_softmax": Loss(losses.norm_softmax, {"scale": 23.0}, lambda c: dict(scale=c.scale),
                         True, _MASKS, memvir_fused=memvir.memvir_norm_softmax),
    "proxy_nca": Loss(losses.proxy_nca, {"scale": 23.0}, lambda c: dict(scale=c.scale),
                      True, _MASKS, memvir_fused=memvir.memvir_proxy_nca),
    "proxy_anchor": Loss(losses.proxy_anchor, {"alpha": 32.0, "margin": 0.1},
                         lambda c: dict(alpha=c.alpha, margin=c.margin), True, _MASKS),
    "soft_triple": Loss(
        losses.soft_triple,
        {"centers_per_class": 10, "la": 20.0, "gamma": 0.1, "tau": 0.2, "delta": 0.01},
        lambda c: dict(centers_per_class=c.centers_per_class, la=c.la, gamma=c.gamma,
                       tau=c.tau, margin=c.delta),
        True, _MASKS, centers_per_class=lambda c: c.centers_per_class),
    "hphn_triplet": Loss(losses.hphn_triplet,
                         {"margin": 0.1, "soft_margin": False, "reduction": "mean",
                          "tie_gradient": "each"},
                         lambda c: dict(margin=c.margin, soft_margin=c.soft_margin,
                                        reduction=c.reduction, tie_gradient=c.tie_gradient),
                         False, frozenset({"expanded"})),
}

# Fields of config.loss that every loss section has: its name and the proxies' initialiser.
LOSS_FIELDS = {"name": "norm_softmax", "proxy_init": "kaiming_uniform", "proxy_init_fan": "dim"}


def init_proxies(key: Array, *, num_rows: int, dim: int, init: str, fan: str) -> Array:
    """Proxies [P, D] float32, initialised as the official code initialises them.

    ``init='kaiming_uniform'`` is PyTorch's ``kaiming_uniform_(a=√5)``: U(±1/√fan);
    ``init='kaiming_normal'`` is ``kaiming_normal_`` (gain √2): N(0, 2/fan). ``fan`` says
    which dimension PyTorch took as the fan for the official parameter layout: 'dim' (D,
    e.g. proxy-synthesis' [C, D] tensor with fan_in) or 'classes' (P, e.g. MemVir's [D, C]
    weight with fan_in, or Proxy-Anchor's [C, D] tensor with mode='fan_out'). The norm of
    the proxies matters although every loss normalizes them: Adam's steps are of a fixed
    size, so smaller proxies turn faster.
    """
    if fan not in ("dim", "classes"):
        raise ValueError(f"fan must be 'dim' or 'classes', got {fan!r}")
    fan_size = dim if fan == "dim" else num_rows
    if init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(fan_size)
        return jax.random.uniform(key, (num_rows, dim), jnp.float32, -bound, bound)
    if init == "kaiming_normal":
        return math.sqrt(2.0 / fan_size) * jax.random.normal(key, (num_rows, dim), jnp.float32)
    raise ValueError(f"init must be 'kaiming_uniform' or 'kaiming_normal', got {init!r}")


# ------------------------------------------------------------------------- regularizers

class Flow(NamedTuple):
    """The batch as it passes along the chain (global, inside the jitted step).

    Attributes:
      embeddings: [N, D]; labels: [N] int; proxies: [P, D] or None.
      sample_mask: [N] bool or None (all valid); proxy_mask: [P] bool or None.
      real_samples, real_classes: how many leading rows are the real batch and its classes
        (static ints; a regularizer appends what it adds after them).
      loss_kwargs: further static keyword arguments for the loss (EE's ``num_original``).
      loss: the loss value, when a fused stage computed it (the last stage only).
    """

    embeddings: Array
    labels: Array
    proxies: Optional[Array]
    sample_mask: Optional[Array]
    proxy_mask: Optional[Array]
    real_samples: int
    real_classes: int
    loss_kwargs: dict
    loss: Optional[Array] = None


class Stage(NamedTuple):
    """A built regularizer in a chain.

    ``apply(flow, *, key, extra, epoch) -> (flow, extra)``; ``init_extra`` gives the state
    it carries in ``extra[state_name]`` (None: it carries none).
    """

    apply: Callable[..., tuple]
    state_name: Optional[str] = None
    init_extra: Optional[Callable[[], Any]] = None


class Context(NamedTuple):
    """What a regularizer is built with besides its config section."""

    loss_name: str
    loss: Loss
    loss_kwargs: dict
    num_classes: int
    global_batch_size: int
    dim: int
    alone: bool  # the only stage of the chain


class Regularizer(NamedTuple):
    """A regularizer of :data:`REGULARIZERS`.

    Attributes:
      fields: its fields of ``config.regularizer`` with their defaults.
      needs: of the loss: 'proxies', 'one_proxy_per_class'; of the batch: 'pairs'.
      accepts: the batch features it can take from earlier stages.
      produces: the batch features it hands on.
      build: ``(config.regularizer, Context) -> Stage``.
      check_batch: the host check of a 'pairs' batch (labels NumPy [B_local]), or None.
    """

    fields: Mapping[str, Any]
    needs: frozenset
    accepts: frozenset
    produces: frozenset
    build: Callable[[Any, Context], Stage]
    check_batch: Optional[Callable[[np.ndarray], None]] = None


def _build_ps(reg, ctx: Context) -> Stage:
    alpha, mu = float(reg.ps_alpha), float(reg.ps_mu)
    if reg.ps_reorder not in regularizers.PS_REORDERS:
        raise ValueError(f"config.regularizer.ps_reorder must be one of "
                         f"{sorted(regularizers.PS_REORDERS)}, got {reg.ps_reorder!r}")
    reorder = regularizers.PS_REORDERS[reg.ps_reorder]
    if mu > 0 and math.floor(ctx.global_batch_size * mu) == 0:
        raise ValueError(f"config.regularizer.ps_mu={mu} with a global batch of "
                         f"{ctx.global_batch_size} synthesizes no sample; use ps_mu=0 or more")

    def apply(flow: Flow, *, key, extra, epoch):
        del epoch
        key_order, key_lambda = jax.random.split(key)
        # The official loop reorders each batch so that y[i] != y[i+1]: synthetic class
        # i mixes rows i and i-1, and must not be a mix of one class with itself.
        if flow.sample_mask is None:
            order = reorder(flow.labels, key_order)
            e, y, p = regularizers.proxy_synthesis(key_lambda, flow.embeddings[order],
                                                   flow.labels[order], flow.proxies,
                                                   alpha=alpha, mu=mu)
            return flow._replace(embeddings=e, labels=y, proxies=p), extra
        # A padded batch: the real rows are reordered among themselves and come first;
        # synthesis uses them only (the official step on torch's partial batch).
        order = reorder(flow.labels, key_order, flow.sample_mask)
        if mu == 0:
            return flow._replace(embeddings=flow.embeddings[order], labels=flow.labels[order],
                                 sample_mask=flow.sample_mask[order]), extra
        e, y, p, sample_mask, proxy_mask = regularizers.masked_proxy_synthesis(
            key_lambda, flow.embeddings[order], flow.labels[order], flow.proxies,
            flow.sample_mask[order], alpha=alpha, mu=mu)
        if flow.proxy_mask is not None:
            proxy_mask = jnp.concatenate([flow.proxy_mask, proxy_mask[flow.proxies.shape[0]:]])
        return flow._replace(embeddings=e, labels=y, proxies=p, sample_mask=sample_mask,
                             proxy_mask=proxy_mask), extra
    return Stage(apply)


def _build_memvir(reg, ctx: Context) -> Stage:
    num_steps, step_gap = int(reg.memvir_num_steps), int(reg.memvir_step_gap)
    warm_epochs = int(reg.memvir_warm_epochs)
    if num_steps < 1 or step_gap < 0:
        raise ValueError("config.regularizer.memvir_num_steps must be >= 1 and "
                         f"memvir_step_gap >= 0, got {num_steps}, {step_gap}")
    # A loss with a fused MemVir form gets it when MemVir alone precedes it: same value and
    # gradients, but only the current step is differentiated and the memory-memory
    # logsumexps come from a cache the push maintains (memvir's module docstring).
    fused = ctx.loss.memvir_fused if ctx.alone else None
    cache = {}
    if fused is not None:
        cache = dict(cache_loss=ctx.loss_name, cache_scale=float(ctx.loss_kwargs["scale"]))

    def init_extra():
        return memvir.memvir_init(
            num_steps=num_steps, step_gap=step_gap, batch_size=ctx.global_batch_size,
            num_classes=ctx.num_classes, dim=ctx.dim, dtype=jnp.float32, **cache)

    def apply(flow: Flow, *, key, extra, epoch):
        del key
        memory = extra["memvir"]
        b, c = flow.real_samples, flow.real_classes
        real_x, real_y, real_p = flow.embeddings[:b], flow.labels[:b], flow.proxies[:c]
        # The real rows of a padded batch (None: all rows real).
        real_mask = None if flow.sample_mask is None else flow.sample_mask[:b]
        # Official order (MemVir main.py): read the memory, push the current step, then
        # the loss over the current step and what was read.
        if fused is not None:
            flow = flow._replace(loss=fused(memory, flow.embeddings, flow.labels,
                                            flow.proxies, **ctx.loss_kwargs,
                                            sample_mask=real_mask))
        else:
            x, y, p, sample_mask, proxy_mask = memvir.memvir_virtual(memory, real_x, real_y,
                                                                     real_p, real_mask)
            # What an earlier stage appended (PS's synthetic classes) goes after the
            # virtual classes, relabelled past them; a loss does not depend on the order.
            added_x, added_y = flow.embeddings[b:], flow.labels[b:]
            added_p = flow.proxies[c:]
            offset = p.shape[0] - c
            added_sample_mask = (jnp.ones(added_x.shape[:1], bool) if flow.sample_mask is None
                                 else flow.sample_mask[b:])
            added_proxy_mask = (jnp.ones(added_p.shape[:1], bool) if flow.proxy_mask is None
                                else flow.proxy_mask[c:])
            flow = flow._replace(
                embeddings=jnp.concatenate([x, added_x.astype(x.dtype)]),
                labels=jnp.concatenate([y, added_y.astype(y.dtype) + offset]),
                proxies=jnp.concatenate([p, added_p.astype(p.dtype)]),
                sample_mask=jnp.concatenate([sample_mask, added_sample_mask]),
                proxy_mask=jnp.concatenate([proxy_mask, added_proxy_mask]))
        # The official code pushes (and reads) only while its 1-based epoch is
        # > warm_epoch; ``epoch`` here is the trainer's 0-based step // steps_per_epoch,
        # so that is epoch + 1 > warm_epochs, i.e. epoch >= warm_epochs. During the
        # warm-up the memory stays empty, so the read above adds nothing either.
        memory = memvir.memvir_push(memory, jax.lax.stop_gradient(real_x), real_y,
                                    jax.lax.stop_gradient(real_p), active=epoch >= warm_epochs,
                                    sample_mask=real_mask)
        return flow, {**extra, "memvir": memory}
    return Stage(apply, "memvir", init_extra)


def _build_ee(reg, ctx: Context) -> Stage:
    num_inner, l2_norm = int(reg.ee_num_inner), bool(reg.ee_l2_norm)
    if num_inner < 0:
        raise ValueError(f"config.regularizer.ee_num_inner must be >= 0, got {num_inner}")

    def apply(flow: Flow, *, key, extra, epoch):
        del key, epoch
        if num_inner == 0:
            return flow, extra
        e, y = regularizers.embedding_expansion(flow.embeddings, flow.labels,
                                                num_inner=num_inner, l2_norm=l2_norm)
        return flow._replace(embeddings=e, labels=y,
                             loss_kwargs={**flow.loss_kwargs,
                                          "num_original": flow.embeddings.shape[0]}), extra
    return Stage(apply)


REGULARIZERS = {
    "ps": Regularizer({"ps_alpha": 0.4, "ps_mu": 1.0, "ps_reorder": "neighbour_swaps"},
                      needs=frozenset({"proxies", "one_proxy_per_class"}),
                      accepts=frozenset({"padded"}), produces=frozenset({"synthetic"}),
                      build=_build_ps),
    "memvir": Regularizer({"memvir_num_steps": 45, "memvir_step_gap": 10,
                           "memvir_warm_epochs": 0},
                          needs=frozenset({"proxies", "one_proxy_per_class"}),
                          accepts=frozenset({"synthetic", "padded"}),
                          produces=frozenset({"masks"}),
                          build=_build_memvir),
    "ee": Regularizer({"ee_num_inner": 2, "ee_l2_norm": True}, needs=frozenset({"pairs"}),
                      accepts=frozenset(), produces=frozenset({"expanded"}), build=_build_ee,
                      check_batch=regularizers.check_pairs),
}

_WHAT = {"proxies": "a proxy loss", "one_proxy_per_class": "one proxy row per class",
         "padded": "the padded last batch (data.drop_last=False)",
         "synthetic": "appended synthetic classes", "masks": "masked (virtual) samples and "
         "classes", "expanded": "expanded points", "pairs": "batches of same-class pairs"}


def regularizer_chain(name: str) -> list[str]:
    """The regularizer names of ``config.regularizer.name`` ('a+b'), in order."""
    names = [n.strip() for n in name.split("+")] if name.strip() else []
    for n in names:
        if n not in REGULARIZERS:
            raise ValueError(f"config.regularizer.name: {n!r} is not a regularizer; known: "
                             f"{sorted(REGULARIZERS)} (chain them with '+', e.g. 'ps+memvir')")
    if len(set(names)) < len(names):
        raise ValueError(f"config.regularizer.name={name!r} names a regularizer twice")
    return names


def check_chain(loss_name: str, chain: list[str], loss_config=None, *,
                padded: bool = False) -> None:
    """Raises ValueError, naming both parts, if the chain does not compose with the loss.

    ``padded``: the batches include the masked padded last batch of an epoch
    (``data.drop_last=False``); the chain and the loss must then take sample masks.
    """
    if loss_name not in LOSSES:
        raise ValueError(f"config.loss.name must be one of {sorted(LOSSES)}, got {loss_name!r}")
    loss = LOSSES[loss_name]
    has = set()
    if loss.uses_proxies:
        has.add("proxies")
        if loss_config is None or loss.centers_per_class(loss_config) == 1:
            has.add("one_proxy_per_class")
    produced: dict[str, str] = {}  # feature -> the stage that produced it
    if padded:
        produced["padded"] = "padded"
    for name in chain:
        reg = REGULARIZERS[name]
        missing = [n for n in ("proxies", "one_proxy_per_class") if n in reg.needs - has]
        if missing:
            need = missing[0]
            raise ValueError(f"regularizer {name!r} needs {_WHAT[need]}, but loss "
                             f"{loss_name!r} has {'none' if need == 'proxies' else 'several'}")
        for feature, source in produced.items():
            if feature not in reg.accepts:
                if source == "padded":
                    raise ValueError(f"regularizer {name!r} cannot take {_WHAT[feature]}: it "
                                     "has no sample masks; set config.data.drop_last=True")
                raise ValueError(f"regularizer {name!r} cannot follow {source!r}: it does not "
                                 f"take the {_WHAT[feature]} that {source!r} produces")
        produced.update({f: name for f in reg.produces})
    for feature, source in produced.items():
        if feature not in loss.accepts:
            if source == "padded":
                raise ValueError(f"loss {loss_name!r} cannot take {_WHAT[feature]}: it has no "
                                 "sample masks; set config.data.drop_last=True")
            raise ValueError(f"loss {loss_name!r} cannot take the {_WHAT[feature]} that "
                             f"regularizer {source!r} produces")


# ---------------------------------------------------------------------------- objective

class Objective(NamedTuple):
    """What the proxy method needs to know about the objective of a config.

    Attributes:
      loss_fn: ``(embeddings, labels, proxies, *, key, extra, epoch, sample_mask=None)
        -> (loss, extra)``, pure and jittable; ``sample_mask`` [B] bool marks the real rows
        of a padded batch (None: all real); ``proxies`` is None for a loss without them;
        ``extra`` holds the chain's carried states by name (``{'memvir': MemVirState}``).
      uses_proxies: whether ``params['proxies']`` exists.
      num_proxy_rows: its rows P (C · centres per class).
      init_extra: ``() -> dict`` of the initial carried states ({} for none).
      check_batch: host-side check of the labels this process loads (NumPy [B / processes],
        its contiguous slice of the global batch) for the chain's batch contracts.
      describe: ``{'loss': …, 'regularizer': …}`` for the checkpoint record.
    """

    loss_fn: Callable[..., tuple]
    uses_proxies: bool
    num_proxy_rows: int
    init_extra: Callable[[], dict]
    check_batch: Callable[[np.ndarray], None]
    describe: dict


def make_objective(config, *, num_classes: int, global_batch_size: int,
                   _fused_memvir: bool = True) -> Objective:
    """Builds the objective of ``config`` (its ``loss`` and ``regularizer`` sections).

    Args:
      config: the training ConfigDict (see ``proxy_jax.config_utils``).
      num_classes: C, the number of training classes.
      global_batch_size: B, the batch the loss sees (all devices and hosts together).
      _fused_memvir: internal (tests and benchmarks): False makes MemVir with Norm-SoftMax
        or Proxy-NCA run the generic path (base loss over ``memvir_virtual``, memory
        without cache) instead of the fused loss; the value and gradients are the same.

    Raises:
      ValueError: an unknown loss or regularizer (listing the known ones), or a chain that
        does not compose with the loss (naming both).
    """
    chain = regularizer_chain(config.regularizer.name)
    check_chain(config.loss.name, chain, config.loss, padded=not config.data.drop_last)
    loss = LOSSES[config.loss.name]
    if not _fused_memvir:
        loss = loss._replace(memvir_fused=None)
    kwargs = loss.kwargs(config.loss)
    dim = models.output_dim(config.model.backbone, config.model.embedding_dim,
                            config.model.pooling)
    ctx = Context(config.loss.name, loss, kwargs, num_classes, global_batch_size, dim,
                  alone=len(chain) == 1)
    stages = [REGULARIZERS[name].build(config.regularizer, ctx) for name in chain]
    checks = [REGULARIZERS[n].check_batch for n in chain if REGULARIZERS[n].check_batch]

    def loss_fn(embeddings, labels, proxies, *, key, extra, epoch, sample_mask=None):
        if sample_mask is not None:
            # Padded rows carry label -1, set to 0 (a class index every gather accepts); they
            # are zero images and may embed to zero: ones keep every normalization's
            # gradient finite, and no gradient reaches the network through them.
            sample_mask = jnp.asarray(sample_mask, bool)
            labels = jnp.where(sample_mask, labels, 0)
            embeddings = jnp.where(sample_mask[:, None], embeddings, jnp.ones_like(embeddings))
        flow = Flow(embeddings, labels, proxies, sample_mask, None, embeddings.shape[0],
                    num_classes, {})
        for i, stage in enumerate(stages):
            # The first stage takes the step's key itself (a single regularizer draws
            # exactly as it always has), later ones a key folded from it.
            flow, extra = stage.apply(flow, key=key if i == 0 else jax.random.fold_in(key, i),
                                      extra=extra, epoch=epoch)
        if flow.loss is not None:
            return flow.loss, extra
        masks = {k: v for k, v in (("sample_mask", flow.sample_mask),
                                   ("proxy_mask", flow.proxy_mask)) if v is not None}
        args = (flow.embeddings, flow.labels) + ((flow.proxies,) if loss.uses_proxies else ())
        return loss.fn(*args, **kwargs, **flow.loss_kwargs, **masks), extra

    def init_extra():
        return {s.state_name: s.init_extra() for s in stages if s.init_extra is not None}

    def check_batch(labels: np.ndarray) -> None:
        for check in checks:
            check(labels)

    rows = num_classes * loss.centers_per_class(config.loss) if loss.uses_proxies else 0
    return Objective(loss_fn, loss.uses_proxies, rows, init_extra, check_batch,
                     {"loss": config.loss.name, "regularizer": config.regularizer.name})
