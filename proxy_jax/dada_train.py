"""DADA's two-player update of one batch, as one pure, jittable function.

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
and its first gradient forward see the same weights and batch). Only a network whose
BatchNorm is *trained* differs: the official loop moves its running statistics twice per
batch (once per forward), here once. Further generator updates (``g_step > 1``) run fresh
forwards, as the official loop does.

It runs on the *global* batch: call it inside the trainer's data-parallel ``jit`` after the
embeddings have been gathered (``embed`` may constrain them to the replicated sharding),
like the other objectives.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from proxy_jax.regularizers import dada

Array = jax.Array

__all__ = ["dada_update"]

# Generator parameters that are not the network's.
_NOT_NET = ("proxies", "mix")


def _net(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in _NOT_NET}


def dada_update(
    embed: Callable[[Any], Tuple[Array, Any]],
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
    num_pairs: Optional[int] = None,
    draws: Optional[Any] = None,
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
      embed: ``net_params -> (raw embeddings [B, D] float, aux)`` of the global batch,
        ``net_params`` being ``gen_params`` without 'proxies' and 'mix';
        ``aux`` (e.g. updated BatchNorm statistics of the network) is returned as is from
        the last forward.
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
        epochs): the generator side is returned unchanged. May be a traced bool.
      num_pairs: for ``pos_class_mix``, the classes per batch (``batch //
        samples_per_class``).
      draws: optional fixed Beta variables, a sequence of ``d_step + g_step``
        :class:`~proxy_jax.regularizers.dada.DadaDraws` (tests); drawn from ``key`` if None.

    Returns:
      ``(gen_params, gen_opt_state, disc_params, disc_batch_stats, disc_opt_state, aux,
      metrics)``; metrics (float32 scalars): 'dis_loss' (mean over the discriminator
      updates, as the official log), 'gen_loss' (the last generator update's; 0 when
      skipped), 'proxy_loss', 'domain', 'class_ce', 'discrepancy', and 'pair_count' with
      ``pos_class_mix`` (it must equal ``num_pairs``).
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

    def forward_args(k: int):
        draw_key, dropout_key = jax.random.split(keys[k])
        step_draws = draws[k] if draws is not None else dada.draw_mixes(draw_key, config=config)
        return dict(config=config, draws=step_draws, dropout_key=dropout_key,
                    num_pairs=num_pairs)

    def mix_weight(gp, dp):
        return dp.get("mix") if linear else gp.get("mix")

    # One forward with its pull-back: the discriminators train on its (fixed) output, the
    # first generator update back-propagates through it.
    embeddings, pullback, aux = jax.vjp(embed, _net(gen_params), has_aux=True)
    fixed = jax.lax.stop_gradient(embeddings)
    fixed_proxies = jax.lax.stop_gradient(gen_params["proxies"])

    # ----------------------------------------------------------- discriminator updates
    dis_losses = []
    stats = disc_batch_stats
    for k in range(d_step):
        def dis_loss(dp, stats=stats, k=k):
            terms, new_stats = dada.dada_terms(
                discriminators, {"params": dp["disc"], "batch_stats": stats}, fixed, labels,
                fixed_proxies, mix_weight=mix_weight(gen_params, dp), with_proxy_loss=False,
                **forward_args(k))
            return dada.discriminator_objective(terms, config=config), (new_stats, terms)

        (loss, (stats, dis_terms)), grads = jax.value_and_grad(dis_loss, has_aux=True)(
            disc_params)
        updates, disc_opt_state = disc_tx.update(grads, disc_opt_state, disc_params)
        disc_params = optax.apply_updates(disc_params, updates)
        dis_losses.append(loss)

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
            else:
                def loss_of(gp, stats=stats, k=k):
                    emb, new_aux = embed(_net(gp))
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
        result = jax.lax.cond(update_generator, generator, skip, operand)
    gen_params, gen_opt_state, stats, aux, gen_loss, terms = result

    metrics = {
        "dis_loss": jnp.mean(jnp.stack(dis_losses)),
        "gen_loss": gen_loss,
        "proxy_loss": terms.proxy,
        "domain": terms.domain,
        "class_ce": terms.class_ce,
        "discrepancy": terms.discrepancy,
    }
    if config.pos_class_mix:
        # From a discriminator forward: those run in the warm-up too.
        metrics["pair_count"] = dis_terms.pair_count.astype(jnp.float32)
    return gen_params, gen_opt_state, disc_params, stats, disc_opt_state, aux, metrics
