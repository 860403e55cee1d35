"""MemVir: proxies and embeddings of past steps as virtual classes, as carried state.

Reproduces the training strategy of Ko et al., "Learning with Memory-based Virtual
Classes for Deep Metric Learning" (ICCV 2021), as its official code defines it
(navervision/MemVir: ``loss/memvir.py`` ``MemVir`` and the call order in ``main.py``).

Each step the official code

1. reads the memory (the last ``N·(M+1)`` pushed steps) *before* pushing anything,
2. pushes the current step: the detached embeddings the loss receives (already
   l2-normalized by the model), the labels and the raw proxies *before* this step's
   optimizer update,
3. appends, most recent first, the steps of age ``M+1, 2(M+1), …`` (at most N of them,
   fewer while the queue fills): virtual step k brings its proxies as classes
   ``kC … (k+1)C−1`` and its embeddings with labels offset by ``kC``,
4. runs the base loss over the concatenation.

With N=3, M=2 the virtual steps at step t are t−3, t−6, t−9, so their count is 0, 1, 2, 3
for t < 3, 3–5, 6–8, ≥ 9. Nothing is pushed or read during the ``warm_epoch`` warm-up.

The partial last batch of an epoch (torch's DataLoader without ``drop_last``) is a step
like any other: officially it enters the queue with its b < B rows, and later virtual
steps read those b rows. Here that batch arrives padded to B with a ``sample_mask``;
:func:`memvir_push` stores its padded rows with label −1, and every read masks rows of
label −1 out, so the memory holds what the official queue holds.

In JAX the queue is a fixed-shape ring buffer (:class:`MemVirState`) carried in the train
state, and the growing concatenation becomes fixed-shape arrays with validity masks, which
every proxy loss of :mod:`proxy_jax.losses` accepts: a block that is not yet available is
masked out of every denominator and every mean, so the result equals the official growing
concatenation. Memory entries carry no gradient.

Typical use inside a jitted train step (global batch, i.e. before any per-device split)::

    def loss_fn(params, memory, images, labels):
        emb = model.apply(params, images)
        x, y, p, smask, pmask = memvir_virtual(memory, emb, labels, params['proxies'])
        loss = norm_softmax(x, y, p, scale=23.0, proxy_mask=pmask, sample_mask=smask)
        return loss, emb
    (loss, emb), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, memory, ...)
    memory = memvir_push(memory, emb, labels, params['proxies'], active=epoch > warm_epoch)

Fast path. :func:`memvir_norm_softmax` and :func:`memvir_proxy_nca` compute the same
losses without forming the concatenation and differentiate only the blocks that have a
gradient (the current embeddings and proxies). Their remaining cost is the forward pass of
the memory-rows × memory-proxies block, ``N·B × N·C`` logits of constants, of which only
the per-row logsumexp is needed. Those logsumexps split into one term per pair of past
steps, and every pair is read again at later steps, so a memory built with
``memvir_init(..., cache_loss='norm_softmax', cache_scale=s)`` keeps them: each push
computes the terms of the new step against the ``N−1`` same-phase steps before it (about
``2·N·B·C·D`` multiply-adds instead of ``N²·B·C·D`` per step) and the fused loss only adds
them up. This is the same loss up to floating-point reassociation (tested against the
uncached path and the official numbers). The cache costs ``N(M+1)·B·(2N−1)`` float32.

Buffer copies. When the reads and :func:`memvir_push` sit in one jitted program, XLA
(measured on CPU with jax 0.10.2) copies every state buffer that is both read and
updated, even with the state donated: two copies of the whole memory per step (for the
Cars196 setting 2 × 219 MiB; for SOP 2 × 11 GiB, which also doubles peak memory). Jitting
the push on its own with ``donate_argnums`` writes one slot in place::

    push = jax.jit(memvir_push, donate_argnums=0)
    loss, grads = train_grads(params, memory, batch)   # reads only, no donation
    memory = push(memory, emb, labels, proxies, active)
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import numpy as np

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from proxy_jax import losses
from proxy_jax.losses import l2_normalize, normalized_pair

Array = jax.Array

__all__ = [
    "MemVirState",
    "memvir_init",
    "memvir_virtual",
    "memvir_push",
    "memvir_norm_softmax",
    "memvir_proxy_nca",
]


@struct.dataclass
class MemVirState:
    """Ring buffer of the last ``N·(M+1)`` steps (a pytree; carry it in the train state).

    Attributes:
      embeddings: ``[L, B, D]`` embeddings of the pushed steps, ``L = N·(M+1)``.
      labels: ``[L, B]`` int32 labels of the pushed steps; −1 marks a padded row (of a
        partial batch), which no read uses.
      proxies: ``[L, C, D]`` raw proxies of the pushed steps (before that step's update).
      head: ``[]`` int32, the slot the next push writes.
      size: ``[]`` int32, how many slots hold a pushed step (at most L).
      lse_cache: ``[L, B, 2N−1]`` float32 or None. ``lse_cache[a, :, N−1+o]`` is the
        logsumexp, over the proxies of the step ``o·(M+1)`` steps after step a, of the
        fused loss's logits of step a's embeddings (−inf where not known); only kept for
        a memory built with ``cache_loss``.
      num_steps: N, how many virtual steps are read (static).
      step_gap: M, the gap between virtual steps (static).
      cache_loss: None, 'norm_softmax' or 'proxy_nca': the loss the cache serves (static).
      cache_scale: the scale of that loss (static).
    """

    embeddings: Array
    labels: Array
    proxies: Array
    head: Array
    size: Array
    lse_cache: Optional[Array] = None
    num_steps: int = struct.field(pytree_node=False, default=1)
    step_gap: int = struct.field(pytree_node=False, default=0)
    cache_loss: Optional[str] = struct.field(pytree_node=False, default=None)
    cache_scale: Optional[float] = struct.field(pytree_node=False, default=None)

    @property
    def capacity(self) -> int:
        """L = N·(M+1), the number of steps kept."""
        return self.num_steps * (self.step_gap + 1)

    @property
    def batch_size(self) -> int:
        return self.embeddings.shape[1]

    @property
    def num_classes(self) -> int:
        return self.proxies.shape[1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[2]


def _check_positive_int(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def memvir_init(
    *,
    num_steps: int,
    step_gap: int,
    batch_size: int,
    num_classes: int,
    dim: int,
    dtype=jnp.float32,
    cache_loss: Optional[str] = None,
    cache_scale: Optional[float] = None,
) -> MemVirState:
    """An empty MemVir memory.

    Args:
      num_steps: N, the number of virtual steps (official ``--mem_num_step``; 45 for
        Norm-SoftMax on Cars196).
      step_gap: M, the gap between virtual steps (official ``--mem_step_gap``; 10).
      batch_size: B, the global batch size of every pushed step.
      num_classes: C, the number of proxies.
      dim: D, the embedding dimension.
      dtype: float dtype of the stored embeddings and proxies (bfloat16 halves the
        memory; the losses compute in float32 either way).
      cache_loss: 'norm_softmax' or 'proxy_nca' to keep the partial logsumexps that make
        :func:`memvir_norm_softmax` / :func:`memvir_proxy_nca` fast (see the module
        docstring); None (default) keeps none, and any loss may use the memory.
      cache_scale: the scale of ``cache_loss``; required with it.

    Returns:
      A :class:`MemVirState` holding ``N·(M+1)·(B·D + C·D)`` values of ``dtype`` plus
      ``N·(M+1)·B`` int32 labels (plus ``N·(M+1)·B·(2N−1)`` float32 with a cache).
    """
    _check_positive_int(num_steps, "num_steps")
    _check_positive_int(step_gap, "step_gap", minimum=0)
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(dim, "dim")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a float dtype, got {dtype!r}")
    if cache_loss is not None:
        if cache_loss not in _LOGITS:
            raise ValueError(
                f"cache_loss must be None or one of {sorted(_LOGITS)}, got {cache_loss!r}"
            )
        if isinstance(cache_scale, bool) or not isinstance(cache_scale, (int, float)):
            raise ValueError(f"cache_scale must be a float with cache_loss, got {cache_scale!r}")
        cache_scale = float(cache_scale)
    elif cache_scale is not None:
        raise ValueError(f"cache_scale={cache_scale!r} given without cache_loss")
    capacity = num_steps * (step_gap + 1)
    lse_cache = None
    if cache_loss is not None:
        lse_cache = jnp.full((capacity, batch_size, 2 * num_steps - 1), -jnp.inf, jnp.float32)
    return MemVirState(
        embeddings=jnp.zeros((capacity, batch_size, dim), dtype),
        labels=jnp.zeros((capacity, batch_size), jnp.int32),
        proxies=jnp.zeros((capacity, num_classes, dim), dtype),
        head=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
        lse_cache=lse_cache,
        num_steps=num_steps,
        step_gap=step_gap,
        cache_loss=cache_loss,
        cache_scale=cache_scale,
    )


def _check_step(state: MemVirState, embeddings, labels, proxies) -> None:
    if not isinstance(state, MemVirState):
        raise ValueError(f"state must be a MemVirState, got {type(state).__name__}")
    b, d, c = state.batch_size, state.dim, state.num_classes
    if jnp.shape(embeddings) != (b, d):
        raise ValueError(
            f"embeddings must be [batch_size={b}, dim={d}] as the memory was built, "
            f"got shape {jnp.shape(embeddings)}"
        )
    if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
        raise ValueError(f"embeddings must be a float array, got {jnp.result_type(embeddings)}")
    if jnp.shape(labels) != (b,):
        raise ValueError(f"labels must be [batch_size={b}], got shape {jnp.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}")
    if jnp.shape(proxies) != (c, d):
        raise ValueError(
            f"proxies must be [num_classes={c}, dim={d}] as the memory was built, "
            f"got shape {jnp.shape(proxies)}"
        )
    if not jnp.issubdtype(jnp.result_type(proxies), jnp.floating):
        raise ValueError(f"proxies must be a float array, got {jnp.result_type(proxies)}")


def _fill_padded(embeddings: Array, mask: Array) -> Array:
    """``embeddings`` [B, D] with the padded rows (mask False) set to ones: a padded row may
    be zero, and normalizing a zero row has a NaN gradient even where none flows back."""
    return jnp.where(mask[:, None], embeddings, jnp.ones_like(embeddings))


def _virtual_blocks(state: MemVirState):
    """The N virtual steps, most recent first: ages ``k·(M+1)`` for k = 1..N.

    Returns ``(embeddings [N, B, D], labels [N, B], proxies [N, C, D], valid [N] bool,
    rows [N, B] bool)``, all without gradient; padded rows' labels are 0 there. Step k is
    valid once ``k·(M+1)`` steps were pushed, which is the official selection
    ``reversed(queue)[M::M+1]`` of a queue holding ``size`` steps; ``rows`` marks its real
    rows (valid steps only).
    """
    ages = (state.step_gap + 1) * jnp.arange(1, state.num_steps + 1, dtype=jnp.int32)
    slots = jnp.mod(state.head - ages, state.capacity)
    valid = ages <= state.size
    take = lambda a: lax.stop_gradient(jnp.take(a, slots, axis=0))
    labels = take(state.labels)
    rows = valid[:, None] & (labels >= 0)
    return (take(state.embeddings), jnp.maximum(labels, 0), take(state.proxies), valid, rows)


def memvir_virtual(
    state: MemVirState, embeddings: Array, labels: Array, proxies: Array,
    sample_mask: Optional[Array] = None,
) -> tuple[Array, Array, Array, Array, Array]:
    """The current step extended with the memory's virtual steps, in fixed shapes.

    Call it before :func:`memvir_push` of the same step (the official order). Hand the
    result to any proxy loss of :mod:`proxy_jax.losses`::

      x, y, p, sample_mask, proxy_mask = memvir_virtual(state, emb, labels, proxies)
      loss = proxy_nca(x, y, p, scale=12.0, proxy_mask=proxy_mask, sample_mask=sample_mask)

    Block k = 1..N holds the step of age ``k·(M+1)``: its embeddings at rows
    ``kB … (k+1)B−1`` with labels ``y + kC``, its proxies at rows ``kC … (k+1)C−1``. Blocks
    the memory cannot fill yet are masked out, so the loss equals the official loss over
    the concatenation of the available steps only.

    Args:
      state: the memory.
      embeddings: ``[B, D]`` float embeddings of the current step (they keep their gradient).
      labels: ``[B]`` int labels in ``[0, C)``.
      proxies: ``[C, D]`` float current proxies (they keep their gradient).
      sample_mask: optional ``[B]`` bool, the real rows of a padded current batch.

    Returns:
      ``embeddings [B+N·B, D]`` (dtype of ``embeddings``), ``labels [B+N·B]`` int32,
      ``proxies [C+N·C, D]`` (dtype of ``proxies``), ``sample_mask [B+N·B]`` bool and
      ``proxy_mask [C+N·C]`` bool. The memory rows carry no gradient.
    """
    _check_step(state, embeddings, labels, proxies)
    n, b, c, d = state.num_steps, state.batch_size, state.num_classes, state.dim
    mem_x, mem_y, mem_p, valid, mem_rows = _virtual_blocks(state)
    current = jnp.ones((b,), bool) if sample_mask is None else jnp.asarray(sample_mask, bool)
    embeddings = _fill_padded(embeddings, current)
    offsets = c * jnp.arange(1, n + 1, dtype=jnp.int32)
    all_x = jnp.concatenate([embeddings, mem_x.astype(embeddings.dtype).reshape(n * b, d)])
    all_y = jnp.concatenate(
        [labels.astype(jnp.int32), (mem_y + offsets[:, None]).reshape(n * b)]
    )
    all_p = jnp.concatenate([proxies, mem_p.astype(proxies.dtype).reshape(n * c, d)])
    sample_mask = jnp.concatenate([current, mem_rows.reshape(n * b)])
    proxy_mask = jnp.concatenate([jnp.ones((c,), bool), jnp.repeat(valid, c)])
    return all_x, all_y, all_p, sample_mask, proxy_mask


def memvir_push(
    state: MemVirState,
    embeddings: Array,
    labels: Array,
    proxies: Array,
    active: Union[bool, Array] = True,
    sample_mask: Optional[Array] = None,
) -> MemVirState:
    """Pushes the current step into the memory, overwriting the oldest step when full.

    Push what the loss saw this step: the model's embeddings (normalized or not, the
    losses normalize them) and the proxies *before* this step's optimizer update, as the
    official ``put_memory``. Gradients are stopped.

    Args:
      state: the memory.
      embeddings: ``[B, D]`` float embeddings.
      labels: ``[B]`` int labels.
      proxies: ``[C, D]`` float proxies.
      active: False leaves the state unchanged (the official warm-up: nothing is pushed
        while ``epoch <= warm_epoch``). A Python bool or a traced bool scalar; only one
        slot is rewritten either way, so the update stays in place under buffer donation.
      sample_mask: optional ``[B]`` bool, the real rows of a padded batch; the others are
        stored with label −1, so no later read uses them.

    Returns:
      The new :class:`MemVirState`. With a cache (``cache_loss``) the push also computes
      the new step's partial logsumexps, about ``2·N·B·C·D`` multiply-adds.
    """
    _check_step(state, embeddings, labels, proxies)
    if jnp.shape(active) != ():
        raise ValueError(f"active must be a bool scalar, got shape {jnp.shape(active)}")
    active = jnp.asarray(active, bool)
    head = state.head
    # Stored as the memory's dtype; the cache is computed from exactly what is stored.
    embeddings = lax.stop_gradient(embeddings).astype(state.embeddings.dtype)
    proxies = lax.stop_gradient(proxies).astype(state.proxies.dtype)
    if sample_mask is not None:
        labels = jnp.where(jnp.asarray(sample_mask, bool), labels, -1)

    def write(buffer, value):
        old = lax.dynamic_index_in_dim(buffer, head, axis=0, keepdims=False)
        value = jnp.where(active, value.astype(buffer.dtype), old)
        return lax.dynamic_update_index_in_dim(buffer, value, head, 0)

    written = state.replace(
        embeddings=write(state.embeddings, embeddings),
        labels=write(state.labels, labels),
        proxies=write(state.proxies, proxies),
    )
    if state.lse_cache is not None:
        # Computed from the buffers *after* the write (the slots it reads are not the
        # head slot), so XLA updates the buffers in place instead of copying them.
        written = written.replace(lse_cache=_push_cache(written, embeddings, proxies, active))
    step = active.astype(jnp.int32)
    return written.replace(
        head=jnp.mod(head + step, state.capacity),
        size=jnp.minimum(state.size + step, state.capacity),
    )


def _push_cache(state: MemVirState, embeddings, proxies, active) -> Array:
    """The cache after pushing a step into the head slot (head and size not yet advanced).

    Two steps are ever read together only if their distance is a multiple of M+1 below
    N·(M+1), so the new step pairs with the steps of ages j·(M+1), j = 1..N−1 (those
    already pushed): its rows against their proxies (offsets −j) and their rows against
    its proxies (offsets +j), plus its rows against its own proxies (offset 0).
    """
    n, gap = state.num_steps, state.step_gap + 1
    b, c, d = state.batch_size, state.num_classes, state.dim
    logits_fn, _ = _logits_fns(state.cache_loss, state.cache_scale)
    ages = gap * jnp.arange(1, n, dtype=jnp.int32)  # [N−1]
    slots = jnp.mod(state.head - ages, state.capacity)
    known = ages <= state.size
    x_new = l2_normalize(embeddings.astype(jnp.float32))
    p_new = l2_normalize(proxies.astype(jnp.float32))
    x_old = l2_normalize(jnp.take(state.embeddings, slots, axis=0).astype(jnp.float32))
    p_old = l2_normalize(jnp.take(state.proxies, slots, axis=0).astype(jnp.float32))

    # Row of the new step: offset 0 at column N−1, offset −j at column N−1−j.
    own = jax.nn.logsumexp(logits_fn(x_new, p_new), axis=1)  # [B]
    against_old = jax.nn.logsumexp(
        logits_fn(x_new, p_old.reshape((n - 1) * c, d)).reshape(b, n - 1, c), axis=2
    )  # [B, N−1], column j−1 is offset −j
    against_old = jnp.where(known[None, :], against_old, -jnp.inf)
    new_row = jnp.concatenate(
        [against_old[:, ::-1], own[:, None], jnp.full((b, n - 1), -jnp.inf)], axis=1
    )  # [B, 2N−1]
    cache = state.lse_cache
    old_row = lax.dynamic_index_in_dim(cache, state.head, axis=0, keepdims=False)
    cache = lax.dynamic_update_index_in_dim(
        cache, jnp.where(active, new_row, old_row), state.head, 0
    )

    # Rows of the older steps against the new proxies: offset +j at column N−1+j.
    old_against_new = jax.nn.logsumexp(
        logits_fn(x_old.reshape((n - 1) * b, d), p_new), axis=1
    ).reshape(n - 1, b)
    rows = slots[:, None]
    cols = (n - 1 + jnp.arange(1, n, dtype=jnp.int32))[:, None]
    current = cache[rows, jnp.arange(b)[None, :], cols]  # [N−1, B]
    update = jnp.where(active & known[:, None], old_against_new, current)
    return cache.at[rows, jnp.arange(b)[None, :], cols].set(update, unique_indices=True)


# --------------------------------------------------------------------------- fused losses


# name -> that loss's logits of normalized rows, [R, D] x [K, D] -> [R, K]: the one
# definition in proxy_jax.losses, which the unfused losses use too.
_LOGITS = {
    "norm_softmax": losses.norm_softmax_logits,
    "proxy_nca": losses.proxy_nca_logits,
}


def _logits_fns(loss: str, scale: float) -> tuple[Callable, Callable]:
    """``loss``'s logits of all pairs ``[R, D] × [K, D] → [R, K]`` and of matching rows.

    The matching-rows form ``[R, D] × [R, D] → [R]`` (row i against row i only) is the
    all-pairs function mapped over single rows, so it cannot drift from it.
    """
    pairs = functools.partial(_LOGITS[loss], scale=scale)
    rows = jax.vmap(lambda x, p: pairs(x[None, :], p[None, :])[0, 0])
    return pairs, rows


def _memvir_cross_entropy(state, embeddings, labels, proxies, loss: str, scale: float,
                          sample_mask=None) -> Array:
    """Mean softmax cross-entropy over the current and the valid virtual rows.

    Equal to the base loss over :func:`memvir_virtual`'s output, computed in blocks so
    that no gradient flows where none exists. Rows are (current ``xc`` [B], memory ``xm``
    [N·B]) and columns (current ``pc`` [C], memory ``pm`` [N·C]):

    * ``xc·pc`` and ``xc·pm`` are differentiated (w.r.t. xc, pc and xc respectively);
    * ``xm·pc`` is differentiated w.r.t. pc only;
    * ``xm·pm``, by far the largest block, is a constant: it enters only through its
      per-row logsumexp and the label logits (memory labels point at memory proxies), so
      its backward pass is never formed.

    torch differentiates the whole ``[B+N·B, C+N·C]`` matrix instead. With a matching
    cache the ``xm·pm`` block is not formed at all: its row logsumexps are sums of cached
    per-step-pair terms and the label logits are row-wise products.
    """
    _check_step(state, embeddings, labels, proxies)
    use_cache = state.cache_loss is not None
    if use_cache and (state.cache_loss, state.cache_scale) != (loss, float(scale)):
        raise ValueError(
            f"the memory's cache serves {state.cache_loss} with scale {state.cache_scale}, "
            f"but {loss} was called with scale {scale}; build the memory with "
            f"cache_loss={loss!r}, cache_scale={scale} (or without a cache)"
        )
    logits_fn, row_logits_fn = _logits_fns(loss, scale)
    n, b, c, d = state.num_steps, state.batch_size, state.num_classes, state.dim
    mem_x, mem_y, mem_p, valid, mem_rows = _virtual_blocks(state)
    current = jnp.ones((b,), bool) if sample_mask is None else jnp.asarray(sample_mask, bool)
    labels = jnp.where(current, labels, 0)
    xc, pc = normalized_pair(_fill_padded(embeddings, current), proxies)
    dtype = xc.dtype
    xm = l2_normalize(mem_x.astype(dtype)).reshape(n * b, d)
    pm = l2_normalize(mem_p.astype(dtype)).reshape(n * c, d)
    col_valid = jnp.repeat(valid, c)[None, :]
    row_valid = mem_rows.reshape(n * b)

    # Current rows against every column.
    cur_cur = logits_fn(xc, pc)
    cur_mem = jnp.where(col_valid, logits_fn(xc, pm), -jnp.inf)
    cur_lse = jax.nn.logsumexp(jnp.concatenate([cur_cur, cur_mem], axis=1), axis=1)
    cur_label = jnp.take_along_axis(cur_cur, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]

    # Memory rows: the memory-memory block is constant (xm, pm carry no gradient), and
    # memory labels point at the proxies of their own step.
    if use_cache:
        ks = np.arange(1, n + 1)
        slots = jnp.mod(state.head - (state.step_gap + 1) * ks, state.capacity)
        cached = jnp.take(state.lse_cache, slots, axis=0)  # [N, B, 2N−1]
        # Row block k against column block j is the pair at offset k − j.
        offset_col = np.broadcast_to((ks[:, None] - ks[None, :] + n - 1)[:, None, :], (n, b, n))
        parts = jnp.take_along_axis(cached, jnp.asarray(offset_col), axis=2)  # [N, B, N]
        parts = jnp.where(valid[None, None, :], parts, -jnp.inf)
        mem_mem_lse = lax.stop_gradient(jax.nn.logsumexp(parts, axis=2).reshape(n * b))
        label_p = jnp.take_along_axis(
            l2_normalize(mem_p.astype(dtype)), mem_y[:, :, None], axis=1
        ).reshape(n * b, d)
        mem_label = row_logits_fn(xm, label_p)
    else:
        mem_mem = logits_fn(xm, pm)
        mem_label_col = (mem_y + c * jnp.arange(n, dtype=jnp.int32)[:, None]).reshape(n * b)
        mem_label = jnp.take_along_axis(mem_mem, mem_label_col[:, None], axis=1)[:, 0]
        mem_mem_lse = jax.nn.logsumexp(jnp.where(col_valid, mem_mem, -jnp.inf), axis=1)
    mem_lse = jnp.logaddexp(jax.nn.logsumexp(logits_fn(xm, pc), axis=1), mem_mem_lse)

    total = (jnp.sum(jnp.where(current, cur_lse - cur_label, 0.0))
             + jnp.sum(jnp.where(row_valid, mem_lse - mem_label, 0.0)))
    return total / (jnp.sum(current) + jnp.sum(row_valid)).astype(dtype)


def memvir_norm_softmax(
    state: MemVirState, embeddings: Array, labels: Array, proxies: Array, *, scale: float,
    sample_mask: Optional[Array] = None,
) -> Array:
    """Norm-SoftMax with MemVir, fused: equals ``norm_softmax`` over ``memvir_virtual``.

    ``norm_softmax(*memvir_virtual(state, x, y, p)[:3], scale=s, sample_mask=…,
    proxy_mask=…)`` computed in blocks, differentiating only the blocks that carry a
    gradient (see the module docstring); reproduces the official MemVir ``NormSoftmax``.

    Args:
      state: the memory (read only; push afterwards with :func:`memvir_push`).
      embeddings: ``[B, D]`` float embeddings of the current step.
      labels: ``[B]`` int labels in ``[0, C)``.
      proxies: ``[C, D]`` float current proxies.
      scale: logit scale s.
      sample_mask: optional ``[B]`` bool, the real rows of a padded current batch.

    Returns:
      The float32 scalar loss (the mean over the current and the valid virtual samples).
    """
    return _memvir_cross_entropy(state, embeddings, labels, proxies, "norm_softmax", scale,
                                 sample_mask)


def memvir_proxy_nca(
    state: MemVirState, embeddings: Array, labels: Array, proxies: Array, *, scale: float,
    sample_mask: Optional[Array] = None,
) -> Array:
    """Proxy-NCA with MemVir, fused: equals ``proxy_nca`` over ``memvir_virtual``.

    Same contract as :func:`memvir_norm_softmax`; reproduces the official MemVir
    ``ProxyNCA`` (squared distances, positive proxy kept in the denominator).
    """
    return _memvir_cross_entropy(state, embeddings, labels, proxies, "proxy_nca", scale,
                                 sample_mask)
