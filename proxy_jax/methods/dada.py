"""DADA (AAAI 2024) as a method: a two-player game of the embedding network and discriminators.

The official training loop (``main.py`` of Noahsark/DADA), per batch:

1. embeddings of the batch under ``no_grad``;
2. ``d_step`` updates of the discriminators (and a 'linear' mix weight) on
   :func:`~proxy_jax.regularizers.dada.discriminator_objective`, with their own Adam;
3. unless in the discriminator warm-up, ``g_step`` updates of the embedding network, the
   proxies (and an 'individual' mix weight) on
   :func:`~proxy_jax.regularizers.dada.generator_objective`: a fresh forward with gradients
   each time, the network with its optimizer, proxies with theirs.

:func:`dada_update` does the same with one forward fewer: the forward of step 1 is taken
with ``jax.vjp`` and its pull-back reused by the first generator update, which is exact
because the discriminator updates do not touch the network (the official no-grad forward
and its first gradient forward see the same weights and batch). Each official forward runs
in training mode, so a network whose BatchNorm *trains* (SOP, In-shop) moves its running
statistics once per forward: twice per batch when the generator updates (the no-grad
forward and the first gradient forward), once in the discriminator warm-up. There, and only
there, one extra forward computes the statistics alone (``stats_forward``). Further
generator updates (``g_step > 1``) run fresh forwards, as the official loop does, each from
the statistics the previous forward left.

As a method (:data:`METHOD`, ``config.method = 'dada'``) it owns the ``config.dada``
section and runs in the trainer's one loop, mesh, checkpoints and evaluation. Its train
state:

* ``params``: ``{'backbone', 'embedding', 'proxies' [C, D][, 'mix' [1, D]]}`` (the
  generator; ``'mix'`` only for ``mix_mode='individual'``; the model ignores it);
* ``opt_state``: the generator's optax state (network and proxy groups);
* ``extra['discriminators']``: the other player, ``{'params': {'disc'[, 'mix' [2D, D]]},
  'batch_stats', 'opt_state'}``.

Official schedule (Noahsark/DADA ``main.py``): the three optimizers' StepLR / MultiStepLR
step once per epoch, but only after both the network warm-up (``--warmup``: backbone
frozen) and the discriminator warm-up (``--d_warmup``: no generator update) are over.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from proxy_jax import optim
from proxy_jax.methods.base import (Method, Plan, TrainState, embedding_width, forward_global,
                                    init_network)
from proxy_jax.regularizers import dada

Array = jax.Array

__all__ = ["METHOD", "dada_update", "dada_config_section", "game_config", "optimizer_groups",
           "make_optimizers", "create_dada_state", "DadaPlan", "train_step"]

# Generator parameters that are not the network's.
_NOT_NET = ("proxies", "mix")


def _net(gen_params: dict) -> dict:
    """The network's part of the generator side: all but 'proxies' and 'mix'."""
    return {n: v for n, v in gen_params.items() if n not in _NOT_NET}


def dada_update(
    embed: Callable[[Any, Any], Tuple[Array, Any]],
    gen_params: dict,
    gen_opt_state: Any,
    disc_params: dict,
    disc_batch_stats: Any,
    disc_opt_state: Any,
    labels: Array,
    key: Array,
    *,
    gen_tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    discriminators: dada.DadaDiscriminators,
    config: dada.DadaConfig,
    d_step: int = 3,
    g_step: int = 1,
    update_generator: bool | Array = True,
    max_pairs: Optional[int] = None,
    draws: Optional[Any] = None,
    net_aux: Any = (),
    stats_forward: bool = False,
) -> Tuple[dict, Any, dict, Any, Any, Any, dict]:
    """One batch of DADA: ``d_step`` discriminator updates, then ``g_step`` generator updates.

    Parameter sets (plain dicts, so that optax ``multi_transform`` labels can name them):

    * ``gen_params``: the network's parameters as top-level entries (the trainer's
      ``{'backbone': …, 'embedding': …}``), ``'proxies': [C, D]``, and ``'mix': [1, D]``
      for ``mix_mode='individual'``. ``gen_tx`` gives the network its optimizer and
      'proxies' / 'mix' the proxy optimizer (official: Adam, lr 0.04 for the proxies, the
      discriminators' lr 5e-4 for 'mix', no weight decay).
    * ``disc_params``: ``{'disc': <DadaDiscriminators params>}`` plus ``'mix': [2D, D]`` for
      ``mix_mode='linear'`` (official: Adam lr 5e-4 with L2 weight decay ``dis_decay`` on
      'disc', none on 'mix').

    Randomness: ``key`` is split into one key per forward (``d_step + g_step``); each
    draws its Beta variables (:func:`~proxy_jax.regularizers.dada.draw_mixes`) and its
    dropout mask from its own key.

    Args:
      embed: ``(net_params, aux) -> (raw embeddings [B, D] float, aux)`` of the global
        batch, ``net_params`` being ``gen_params`` without 'proxies' and 'mix', ``aux``
        the network's state that a training forward moves (its BatchNorm statistics); each
        forward starts from the ``aux`` the previous one returned (the first from
        ``net_aux``), and the last one's is returned.
      gen_params, gen_opt_state: the generator side and its optax state.
      disc_params, disc_batch_stats, disc_opt_state: the discriminator side, its
        BatchNorm running statistics and its optax state.
      labels: ``[B]`` int labels of the global batch.
      key: this step's PRNG key.
      gen_tx, disc_tx: the two optax transformations (learning rates and schedules inside).
      discriminators: the :class:`~proxy_jax.regularizers.dada.DadaDiscriminators`.
      config: the :class:`~proxy_jax.regularizers.dada.DadaConfig`.
      d_step, g_step: updates per batch (official 3 and 1).
      update_generator: False during the discriminator warm-up (official ``d_warmup``
        epochs): the generator side is returned unchanged. May be a traced bool (the
        generator update is then computed and discarded in the warm-up).
      max_pairs: for ``pos_class_mix``, the mixed rows reserved (default ``B // 2``, which
        no batch exceeds: any labels are accepted, a class drawn twice included, as by the
        official criterion; see :func:`~proxy_jax.regularizers.dada.positive_pairs`).
      draws: optional fixed Beta variables, a sequence of ``d_step + g_step``
        :class:`~proxy_jax.regularizers.dada.DadaDraws` (tests); drawn from ``key`` if None.
      net_aux: ``aux`` before this batch.
      stats_forward: the network's BatchNorm trains: when the generator updates, one more
        forward (statistics only) stands for the official first gradient forward, whose
        output the reused pull-back replaces but whose statistics update it does not.

    Returns:
      ``(gen_params, gen_opt_state, disc_params, disc_batch_stats, disc_opt_state, aux,
      metrics)``; metrics (float32 scalars): 'dis_loss' (mean over the discriminator
      updates, as the official log), 'gen_loss' (the last generator update's; 0 when
      skipped), 'proxy_loss', 'domain', 'class_ce', 'discrepancy', and 'pair_count' with
      ``pos_class_mix`` (the batch's classes with two or more samples: the mixed pairs).
    """
    for name, value in (("d_step", d_step), ("g_step", g_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(config, dada.DadaConfig):
        raise ValueError(f"config must be a DadaConfig, got {type(config).__name__}")
    if "proxies" not in gen_params or not _net(gen_params):
        raise ValueError("gen_params must hold the network's parameters and 'proxies', got "
                         f"{sorted(gen_params)}")
    if "disc" not in disc_params:
        raise ValueError(f"disc_params must hold 'disc', got {sorted(disc_params)}")
    if draws is not None and len(draws) != d_step + g_step:
        raise ValueError(f"draws must hold d_step + g_step = {d_step + g_step} DadaDraws, "
                         f"got {len(draws)}")
    linear = config.mix_mode == "linear"
    keys = jax.random.split(key, d_step + g_step)

    split = jax.vmap(jax.random.split)(keys)  # [forwards, 2, key]
    draw_keys, dropout_keys = split[:, 0], split[:, 1]
    if draws is None:
        # Every forward's Beta variables in one vmapped draw: the same values as one
        # draw_mixes per key, but one Gamma rejection sampler per kind in the compiled
        # step instead of one per forward (it dominated the compile time).
        stacked = jax.vmap(functools.partial(dada.draw_mixes, config=config))(draw_keys)
    else:
        stacked = jax.tree.map(lambda *v: jnp.stack([jnp.asarray(x, jnp.float32) for x in v]),
                               *draws)

    def forward_args(k: int):
        return dict(config=config, draws=jax.tree.map(lambda v: v[k], stacked),
                    dropout_key=dropout_keys[k], max_pairs=max_pairs)

    def mix_weight(gp, dp):
        return dp.get("mix") if linear else gp.get("mix")

    # One forward with its pull-back: the discriminators train on its (fixed) output, the
    # first generator update back-propagates through it.
    embeddings, pullback, aux = jax.vjp(lambda net: embed(net, net_aux), _net(gen_params),
                                        has_aux=True)
    fixed = jax.lax.stop_gradient(embeddings)
    fixed_proxies = jax.lax.stop_gradient(gen_params["proxies"])

    # ----------------------------------------------------------- discriminator updates
    # One compiled body for the d_step updates (lax.scan), each with its own draws and
    # dropout key: unrolled, they multiplied the step's compile time.
    def dis_update(carry, xs):
        dp, stats, opt_state = carry
        step_draws, dropout_key = xs

        def dis_loss(dp):
            terms, new_stats = dada.dada_terms(
                discriminators, {"params": dp["disc"], "batch_stats": stats}, fixed, labels,
                fixed_proxies, mix_weight=mix_weight(gen_params, dp), with_proxy_loss=False,
                config=config, draws=step_draws, dropout_key=dropout_key, max_pairs=max_pairs)
            return dada.discriminator_objective(terms, config=config), (new_stats, terms)

        (loss, (stats, terms)), grads = jax.value_and_grad(dis_loss, has_aux=True)(dp)
        updates, opt_state = disc_tx.update(grads, opt_state, dp)
        return (optax.apply_updates(dp, updates), stats, opt_state), (loss, terms.pair_count)

    xs = (jax.tree.map(lambda v: v[:d_step], stacked), dropout_keys[:d_step])
    (disc_params, stats, disc_opt_state), (dis_losses, pair_counts) = jax.lax.scan(
        dis_update, (disc_params, disc_batch_stats, disc_opt_state), xs)

    # --------------------------------------------------------------- generator updates
    def gen_terms(emb, gp, stats, k):
        return dada.dada_terms(
            discriminators, {"params": disc_params["disc"], "batch_stats": stats}, emb, labels,
            gp["proxies"], mix_weight=mix_weight(gp, disc_params), **forward_args(k))

    def generator(operand):
        gp, opt_state, stats, aux = operand
        terms = None
        for j in range(g_step):
            k = d_step + j
            if j == 0:  # reuse the first forward
                def loss_of(emb, rest, stats=stats, k=k):
                    terms, new_stats = gen_terms(emb, {**gp, **rest}, stats, k)
                    return dada.generator_objective(terms, config=config), (terms, new_stats)

                rest = {n: v for n, v in gp.items() if n in _NOT_NET}
                (loss, (terms, stats)), (g_emb, g_rest) = jax.value_and_grad(
                    loss_of, argnums=(0, 1), has_aux=True)(embeddings, rest)
                (g_net,) = pullback(g_emb)
                grads = {**g_rest, **g_net}
                if stats_forward:  # the official first gradient forward's statistics
                    _, aux = embed(jax.lax.stop_gradient(_net(gp)), aux)
            else:
                def loss_of(gp, stats=stats, k=k, aux=aux):
                    emb, new_aux = embed(_net(gp), aux)
                    terms, new_stats = gen_terms(emb, gp, stats, k)
                    return dada.generator_objective(terms, config=config), (terms, new_stats,
                                                                             new_aux)

                (loss, (terms, stats, aux)), grads = jax.value_and_grad(
                    loss_of, has_aux=True)(gp)
            updates, opt_state = gen_tx.update(grads, opt_state, gp)
            gp = optax.apply_updates(gp, updates)
        return gp, opt_state, stats, aux, loss, terms

    def skip(operand):
        gp, opt_state, stats, aux = operand
        zero = jnp.zeros((), jnp.float32)
        terms = dada.DadaTerms(zero, zero, zero, zero, jnp.zeros((), jnp.int32))
        return gp, opt_state, stats, aux, zero, terms

    operand = (gen_params, gen_opt_state, stats, aux)
    if isinstance(update_generator, bool):
        result = (generator if update_generator else skip)(operand)
    else:
        # Computed, then selected, rather than lax.cond: XLA:CPU runs the network's
        # backward ~20x slower inside a conditional (measured: ResNet-50, batch 16, 128²).
        # The price is one discarded generator update per warm-up step.
        result = jax.tree.map(lambda done, skipped: jnp.where(update_generator, done, skipped),
                              generator(operand), skip(operand))
    gen_params, gen_opt_state, stats, aux, gen_loss, terms = result

    metrics = {
        "dis_loss": jnp.mean(dis_losses),
        "gen_loss": gen_loss,
        "proxy_loss": terms.proxy,
        "domain": terms.domain,
        "class_ce": terms.class_ce,
        "discrepancy": terms.discrepancy,
    }
    if config.pos_class_mix:
        # From a discriminator forward: those run in the warm-up too.
        metrics["pair_count"] = pair_counts[-1].astype(jnp.float32)
    return gen_params, gen_opt_state, disc_params, stats, disc_opt_state, aux, metrics


# ---------------------------------------------------------------------------- the config

# Schedules of the official trainer (its --scheduler 'step' and 'multi'), or none.
_SCHEDULES = ("constant", "step_lr", "multistep_lr")


def dada_config_section() -> ml_collections.ConfigDict:
    """The ``config.dada`` section with the official defaults (``parameters.py``).

    Fields (official flag in brackets): every field of
    :class:`~proxy_jax.regularizers.dada.DadaConfig` (the game), plus

    * ``d_step``, ``g_step``: discriminator / generator updates per batch [d_step 3, g_step 1];
    * ``d_warmup_epochs``: epochs with discriminator updates only [d_warmup 1];
    * ``disc_lr``: the discriminators' Adam learning rate, also that of a learned mix
      weight [loss_adv_classifier_lr 5e-4];
    * ``disc_weight_decay``: their torch-style L2 penalty [dis_decay 1e-4];
    * ``layer_norm_head``: end the network with a LayerNorm without affine parameters
      (the official ``*_layernorm_*`` architectures; set ``model.l2_normalize=False``).

    The rest of a DADA run lives in the usual fields: ``optimizer.backbone_lr`` and
    ``embedding_lr`` [lr], ``optimizer.weight_decay`` [decay], ``optimizer.proxy_lr``
    [loss_adv_proxy_lr 0.04, no weight decay], ``optimizer.eps`` (torch's 1e-8),
    ``optimizer.warmup_epochs`` [warmup], ``optimizer.schedule`` 'step_lr' / 'multistep_lr'
    with ``decay_rate`` [lr_reduce_rate], ``decay_step`` [lr_reduce_step],
    ``decay_epochs`` [lr_reduce_multi_steps], ``data.n_instance`` [samples_per_class],
    ``model.freeze_bn`` ('frozen' in the official arch name). ``loss`` and
    ``regularizer`` are not used (``regularizer.name`` must stay '').
    """
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(dada.DadaConfig):
        value = field.default
        section[field.name] = tuple(value) if isinstance(value, list) else value
    section.d_step = 3
    section.g_step = 1
    section.d_warmup_epochs = 1
    section.disc_lr = 5e-4
    section.disc_weight_decay = 1e-4
    section.layer_norm_head = True
    return section


def game_config(config: ml_collections.ConfigDict) -> dada.DadaConfig:
    """The :class:`~proxy_jax.regularizers.dada.DadaConfig` of ``config.dada``."""
    names = [f.name for f in dataclasses.fields(dada.DadaConfig)]
    values = {n: config.dada[n] for n in names}
    values["class_hidden_dims"] = tuple(values["class_hidden_dims"])
    try:
        return dada.DadaConfig(**values)
    except ValueError as e:
        raise ValueError(f"config.dada: {e}") from None


def _validate(config: ml_collections.ConfigDict) -> None:
    """What DADA needs of a config beyond the trainer's checks; ValueError naming the field."""
    game_config(config)
    d, o = config.dada, config.optimizer
    for name in ("d_step", "g_step"):
        if d[name] < 1:
            raise ValueError(f"config.dada.{name} must be >= 1, got {d[name]}")
    for name in ("d_warmup_epochs", "disc_lr", "disc_weight_decay"):
        if d[name] < 0:
            raise ValueError(f"config.dada.{name} must be >= 0, got {d[name]}")
    if o.schedule not in _SCHEDULES:
        raise ValueError(f"config.optimizer.schedule must be one of {list(_SCHEDULES)} for "
                         f"DADA (the official 'step' and 'multi'), got {o.schedule!r}")
    if o.name != "adam":
        raise ValueError(f"config.optimizer.name must be 'adam' for DADA (the official "
                         f"optimizers are torch.optim.Adam), got {o.name!r}")
    if o.grad_clip_value or o.grad_clip_norm:
        raise ValueError("config.optimizer.grad_clip_value and grad_clip_norm must be 0 for "
                         "DADA (the official trainer does not clip)")
    if config.model.freeze_bn_affine:
        raise ValueError("config.model.freeze_bn_affine must be False for DADA (the official "
                         "networks train BatchNorm's scale and bias)")
    if config.regularizer.name:
        raise ValueError(f"config.regularizer.name must be '' for DADA (the game is its "
                         f"regularizer), got {config.regularizer.name!r}")
    if d.pos_class_mix and config.data.n_instance < 2:
        raise ValueError(f"config.data.n_instance must be >= 2 with config.dada.pos_class_mix "
                         f"(it mixes two samples of each class), got {config.data.n_instance}")


# ------------------------------------------------------------------------------ optimizers

def _delay(config) -> int:
    return max(config.optimizer.warmup_epochs, config.dada.d_warmup_epochs)


def optimizer_groups(config: ml_collections.ConfigDict, *, steps_per_epoch: int
                     ) -> Tuple[dict, dict]:
    """DADA's parameter groups: ``(generator groups, discriminator groups)``.

    Official (``main.py``, ``criteria/dadaproxy.py``), all ``torch.optim.Adam`` with
    L2 weight decay added to the gradient:

    * network ('backbone', 'embedding'): lr ``optimizer.backbone_lr`` /
      ``embedding_lr``, decay ``optimizer.weight_decay``; the backbone frozen (no update,
      no decay, no Adam state) during ``optimizer.warmup_epochs``;
    * 'proxies': lr ``optimizer.proxy_lr``, no decay; an 'individual' 'mix': lr
      ``dada.disc_lr``, no decay (both the official proxy optimizer);
    * 'disc': lr ``dada.disc_lr``, decay ``dada.disc_weight_decay``; a 'linear' 'mix':
      lr ``dada.disc_lr``, no decay (the official discriminator optimizer).

    optax counts a group's own updates, not the trainer's steps, so each group maps them
    back: the discriminators are updated ``d_step`` times every step, the generator
    ``g_step`` times every step from epoch ``d_warmup_epochs`` on. The backbone's freeze
    is counted in generator updates for the same reason.
    """
    o, d = config.optimizer, config.dada
    spe, d_step, g_step, d_warmup = steps_per_epoch, d.d_step, d.g_step, d.d_warmup_epochs

    def gen_step(count):  # generator update number -> trainer step
        return d_warmup * spe + count // g_step

    def disc_step(count):  # discriminator update number -> trainer step
        return count // d_step

    frozen = max(0, o.warmup_epochs - d_warmup) * spe * g_step
    start = d_warmup * spe
    gen = {"backbone": optim.Group(o.backbone_lr, o.weight_decay, frozen, gen_step, start),
           "embedding": optim.Group(o.embedding_lr, o.weight_decay, 0, gen_step, start),
           "proxies": optim.Group(o.proxy_lr, 0.0, 0, gen_step, start),
           "mix": optim.Group(d.disc_lr, 0.0, 0, gen_step, start)}
    disc = {"disc": optim.Group(d.disc_lr, d.disc_weight_decay, 0, disc_step),
            "mix": optim.Group(d.disc_lr, 0.0, 0, disc_step)}
    return gen, disc


def make_optimizers(config: ml_collections.ConfigDict, gen_params: dict, disc_params: dict, *,
                    steps_per_epoch: int
                    ) -> Tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """``(gen_tx, disc_tx)`` for the two parameter sets of :func:`dada_update`."""
    gen, disc = optimizer_groups(config, steps_per_epoch=steps_per_epoch)

    def tx(groups, params):
        return optim.make_optimizer(config.optimizer, groups, optim.param_labels(params),
                                    steps_per_epoch=steps_per_epoch, delay_epochs=_delay(config))
    return tx(gen, gen_params), tx(disc, disc_params)


def learning_rates(config: ml_collections.ConfigDict, step: int, *,
                   steps_per_epoch: int) -> dict:
    """The learning rates in force at trainer ``step`` (host floats, for logging):
    'lr/backbone', 'lr/embedding', 'lr/proxies' (0 while frozen or in the discriminator
    warm-up) and 'lr/disc'."""
    gen, disc = optimizer_groups(config, steps_per_epoch=steps_per_epoch)
    groups = {n: gen[n] for n in ("backbone", "embedding", "proxies")}
    groups["disc"] = disc["disc"]
    return optim.learning_rates(
        config.optimizer, groups, step, steps_per_epoch=steps_per_epoch,
        delay_epochs=_delay(config),
        frozen_until={"backbone": config.optimizer.warmup_epochs * steps_per_epoch})


# ------------------------------------------------------------------------- state, plan

class DadaPlan(NamedTuple):
    """What :func:`train_step` needs besides the network and its optimizer (static)."""

    discriminators: dada.DadaDiscriminators
    disc_tx: optax.GradientTransformation
    game: dada.DadaConfig
    d_step: int
    g_step: int
    d_warmup_epochs: int


def create_dada_state(config: ml_collections.ConfigDict, model, *, num_classes: int,
                      steps_per_epoch: int
                      ) -> Tuple[TrainState, optax.GradientTransformation, DadaPlan]:
    """The initial DADA train state (layout in the module docstring), ``gen_tx`` and the plan.

    Network as every method initialises it (pretrained backbone if configured), proxies
    N(0, 1)/8 (:func:`~proxy_jax.regularizers.dada.init_dada_proxies`), discriminators
    with PyTorch's default initialisation, a learned mix weight xavier-uniform.
    """
    game = game_config(config)
    dim = embedding_width(config)
    discriminators = dada.make_discriminators(game, num_classes=num_classes)
    k_model, k_proxies, k_disc, k_mix, k_train = jax.random.split(
        jax.random.PRNGKey(config.seed), 5)
    variables = init_network(config, model, k_model)

    @jax.jit  # one compilation for every initialiser (eagerly, each op compiles alone)
    def initial(k_proxies, k_disc, k_mix):
        x = jnp.zeros((2, dim), jnp.float32)
        return (dada.init_dada_proxies(k_proxies, num_classes, dim),
                discriminators.init(k_disc, x, x, x, x, train=False),
                dada.init_mix_weight(k_mix, mode=game.mix_mode, dim=dim))

    proxies, disc_variables, mix = initial(k_proxies, k_disc, k_mix)
    params = dict(variables["params"])
    params["proxies"] = proxies
    disc_params = {"disc": disc_variables["params"]}
    if game.mix_mode == "individual":
        params["mix"] = mix
    elif game.mix_mode == "linear":
        disc_params["mix"] = mix
    gen_tx, disc_tx = make_optimizers(config, params, disc_params,
                                      steps_per_epoch=steps_per_epoch)
    gen_opt_state, disc_opt_state = jax.jit(lambda p, d: (gen_tx.init(p), disc_tx.init(d)))(
        params, disc_params)
    discriminator_state = {"params": disc_params,
                           "batch_stats": disc_variables.get("batch_stats", {}),
                           "opt_state": disc_opt_state}
    state = TrainState(
        step=jnp.zeros([], jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), opt_state=gen_opt_state,
        extra={"discriminators": discriminator_state}, key=k_train)
    d = config.dada
    plan = DadaPlan(discriminators, disc_tx, game, int(d.d_step), int(d.g_step),
                    int(d.d_warmup_epochs))
    return state, gen_tx, plan


def _check_batch(labels: np.ndarray) -> None:
    """DADA takes any batch, as the official criterion does: a class drawn twice by its
    sampler (``class_random``, classes with replacement) is one class of the proxy loss and
    gives one ``pos_class_mix`` pair (its first two samples); the compiled step reserves
    ``batch // 2`` mixed rows, which no batch exceeds, and masks the unused ones."""
    del labels


def _setup(config: ml_collections.ConfigDict, model, *, num_classes: int,
           steps_per_epoch: int) -> Plan:
    state, gen_tx, plan = create_dada_state(config, model, num_classes=num_classes,
                                            steps_per_epoch=steps_per_epoch)
    step_fn = functools.partial(train_step, model=model, tx=gen_tx,
                                steps_per_epoch=steps_per_epoch,
                                freeze_bn=config.model.freeze_bn, plan=plan)
    return Plan(state=state, step_fn=step_fn,
                learning_rates=functools.partial(learning_rates, config,
                                                 steps_per_epoch=steps_per_epoch),
                check_batch=_check_batch, describe={"method": "dada"})


# ------------------------------------------------------------------------------ the step

def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               steps_per_epoch: int, freeze_bn: bool, plan: DadaPlan,
               replicated=None) -> Tuple[TrainState, dict]:
    """One DADA batch on the global batch: ``d_step`` discriminator updates, then (after
    the discriminator warm-up) ``g_step`` generator updates; pure (the trainer jits it with
    ``parallel.parallelize``).

    The network runs sharded over the mesh; its embeddings are gathered (``replicated``)
    before the game, so the discriminators' BatchNorm statistics, the mixups and the proxy
    loss see the whole batch as on one device.

    Args:
      state: the DADA train state (see the module docstring), replicated.
      batch: {'image': float32 [B, H, W, 3], 'label': int32 [B]} (B global, sharded).
      tx: the generator optimizer (:func:`make_optimizers`).
      plan: the :class:`DadaPlan`.

    Returns:
      The new state and float32 scalar metrics: those of :func:`dada_update`, 'loss' (the
      generator objective; the discriminators' during the warm-up or when theirs is not
      finite, so that the trainer's NaN stop watches both players) and 'param_norm'.
    """
    key = jax.random.fold_in(state.key, state.step)
    update_generator = (True if plan.d_warmup_epochs == 0 else  # static: no selection
                        state.step // steps_per_epoch >= plan.d_warmup_epochs)

    def embed(net_params, batch_stats):
        return forward_global(model, net_params, batch_stats, batch["image"],
                              freeze_bn=freeze_bn, replicated=replicated, key=key)

    side = state.extra["discriminators"]
    (params, opt_state, disc_params, disc_stats, disc_opt_state, batch_stats,
     metrics) = dada_update(
        embed, state.params, state.opt_state, side["params"], side["batch_stats"],
        side["opt_state"], batch["label"], key, gen_tx=tx, disc_tx=plan.disc_tx,
        discriminators=plan.discriminators, config=plan.game, d_step=plan.d_step,
        g_step=plan.g_step, update_generator=update_generator, net_aux=state.batch_stats,
        stats_forward=not freeze_bn)
    use_gen = update_generator & jnp.isfinite(metrics["dis_loss"])
    metrics = {**metrics,
               "loss": jnp.where(use_gen, metrics["gen_loss"], metrics["dis_loss"]),
               "param_norm": optax.global_norm(params)}
    extra = {"discriminators": {"params": disc_params, "batch_stats": disc_stats,
                                "opt_state": disc_opt_state}}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, extra=extra)
    return new_state, metrics


METHOD = Method(
    name="dada", sections=lambda: {"dada": dada_config_section()}, validate=_validate,
    model_overrides=lambda config: {"layer_norm": config.dada.layer_norm_head}, setup=_setup,
    legacy_slot=None)  # its optimizer state's layout changed with the one optimizer builder
