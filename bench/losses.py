"""Forward+backward speed of proxy_jax's losses against the PyTorch references, on the CPU.

    python bench/losses.py                # about 2-3 minutes on a quiet 2-core machine
    python bench/losses.py --threads 4 --blocks 7

Each row times one training-step worth of loss work: the loss and its gradients w.r.t.
the embeddings and the proxies (and, for MemVir, reading and pushing the memory). The
JAX side is one ``jax.jit`` function; the torch side is the reference the project is
tested against: pytorch-metric-learning where it has the loss (``NormalizedSoftmaxLoss``,
``ProxyNCALoss``, ``ProxyAnchorLoss``, ``SoftTripleLoss`` with ``SparseCentersRegularizer``)
and otherwise a plain torch transcription, below,
of the official modules (Proxy Synthesis: navervision/proxy-synthesis
``loss/proxy_losses.py``; MemVir: navervision/MemVir ``loss/memvir.py`` and
``loss/softmax_variants.py``).

Method: both run with the same number of threads (the process is pinned to that many
cores, which XLA's CPU thread pool follows, and ``torch.set_num_threads``). The two
implementations alternate in blocks of repetitions; each block gives a median. A block is
"busy" when other processes used more than ``--busy-cores`` cores on average while it ran
(from /proc/stat minus this process's own CPU time); busy blocks are discarded, and a row
with no quiet block falls back to all blocks and is flagged with ``*``. The table reports
the median over the kept blocks and the torch/JAX ratio. The MemVir state size is computed
with ``jax.eval_shape`` (nothing is allocated).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="CPU threads for both JAX and torch (default: 2)")
    parser.add_argument("--blocks", type=int, default=5, help="interleaved blocks per row")
    parser.add_argument("--busy-cores", type=float, default=0.3,
                        help="a block is busy when other processes used more cores than this")
    parser.add_argument("--verbose", action="store_true", help="print the loss values")
    parser.add_argument("--rows", default="all",
                        help="comma-separated row keys (ns,ns_ps,nca,nca_ps,pa98,pa_sop,st,memvir)")
    return parser.parse_args()


ARGS = _parse_args()
# Pin before jax and torch start their thread pools: XLA sizes its CPU pool from the
# schedulable cores, torch is told explicitly below.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import regularizers as pml_regularizers  # noqa: E402

from proxy_jax.losses import norm_softmax, proxy_anchor, proxy_nca, soft_triple  # noqa: E402
from proxy_jax.regularizers.memvir import (  # noqa: E402
    memvir_init, memvir_norm_softmax, memvir_push, memvir_virtual)
from proxy_jax.regularizers.synthesis import proxy_synthesis  # noqa: E402

from torch_references import TorchMemVir  # noqa: E402  (bench/ is sys.path[0])

torch.set_num_threads(ARGS.threads)


# ----------------------------------------------------------------- torch references


def torch_proxy_synthesis(x_hat, p_hat, labels, alpha, mu):
    """Official Proxy Synthesis on normalized inputs: mix each row with its predecessor."""
    lam = float(np.random.beta(alpha, alpha))
    rolled_x = torch.roll(x_hat, 1, dims=0)
    p_y = p_hat[labels]
    x_syn = lam * x_hat + (1.0 - lam) * rolled_x
    p_syn = lam * p_y + (1.0 - lam) * torch.roll(p_y, 1, dims=0)
    b, c = x_hat.shape[0], p_hat.shape[0]
    keep = int(b * mu)
    new_labels = torch.arange(c, c + keep)
    x_all = F.normalize(torch.cat([x_hat, x_syn[:keep]]), dim=1)
    p_all = F.normalize(torch.cat([p_hat, p_syn[:keep]]), dim=1)
    return x_all, p_all, torch.cat([labels, new_labels])


def torch_ps_norm_softmax(x, labels, proxies, scale, alpha, mu):
    x_hat, p_hat = F.normalize(x, dim=1), F.normalize(proxies, dim=1)
    x_hat, p_hat, labels = torch_proxy_synthesis(x_hat, p_hat, labels, alpha, mu)
    return F.cross_entropy(scale * x_hat @ p_hat.t(), labels)


def torch_ps_proxy_nca(x, labels, proxies, scale, alpha, mu):
    x_hat, p_hat = F.normalize(x, dim=1), F.normalize(proxies, dim=1)
    x_hat, p_hat, labels = torch_proxy_synthesis(x_hat, p_hat, labels, alpha, mu)
    sq_dist = scale * torch.cdist(x_hat, p_hat) ** 2
    one_hot = F.one_hot(labels, sq_dist.shape[1]).float()
    return torch.mean(torch.sum(-one_hot * F.log_softmax(-sq_dist, -1), -1))


# ----------------------------------------------------------------- timing


def _machine_busy_seconds():
    """CPU seconds all processes spent on non-idle work (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds():
    t = os.times()
    return t.user + t.system


def _time_block(fn, reps):
    """Median seconds per call over ``reps`` calls, and the other processes' load (cores)."""
    busy0, own0, wall0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    busy1, own1 = _machine_busy_seconds(), _own_cpu_seconds()
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return float(np.median(times)), others


def compare(fns, reps):
    """Runs ``fns`` (name -> callable) in interleaved blocks, the order reversed every
    other block. Returns name -> (median ms over quiet blocks, flagged) and the mean
    number of cores other processes used."""
    for fn in fns.values():
        fn()  # compile / warm up outside the timed blocks
    samples = {name: [] for name in fns}
    loads = []
    order = list(fns.items())
    for block in range(ARGS.blocks):
        for name, fn in order if block % 2 == 0 else order[::-1]:
            seconds, others = _time_block(fn, reps)
            samples[name].append((seconds, others))
            loads.append(others if others is not None else float("nan"))

    def pick(entries):
        quiet = [s for s, o in entries if o is not None and o <= ARGS.busy_cores]
        chosen, flagged = (quiet, False) if quiet else ([s for s, _ in entries], True)
        return 1e3 * float(np.median(chosen)), flagged

    return {name: pick(entries) for name, entries in samples.items()}, float(np.nanmean(loads))


# ----------------------------------------------------------------- rows


def _data(b, c, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)).astype(np.float32)
    # Cyclically distinct neighbours, as Proxy Synthesis requires (b % c != 1 here).
    y = np.arange(b, dtype=np.int64) % c
    p = (rng.uniform(-1, 1, size=(c, d)) / np.sqrt(d)).astype(np.float32)
    return x, y, p


def _jax_value_and_grad(loss):
    """Returns make(x, y, p) -> (runner, loss value)."""
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))

    def make(x, y, p):
        x, y, p = jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(p)
        return lambda: jax.block_until_ready(grad(x, y, p)), float(grad(x, y, p)[0])

    return make


def _torch_step(loss_fn, x, y, proxies_param=None):
    """Returns (runner, loss value)."""
    x = torch.tensor(x, requires_grad=True)
    y = torch.tensor(y)

    def run():
        x.grad = None
        if proxies_param is not None:
            proxies_param.grad = None
        loss = loss_fn(x, y)
        loss.backward()
        return float(loss.detach())

    return run, run()


def _with_check(jax_side, torch_side):
    """(jax runner, torch runner, relative loss difference) for a row."""
    (jax_fn, jax_loss), (torch_fn, torch_loss) = jax_side, torch_side
    if ARGS.verbose:
        print(f"  loss values: JAX {jax_loss!r}  torch {torch_loss!r}")
    return jax_fn, torch_fn, abs(jax_loss - torch_loss) / abs(torch_loss)


def row_norm_softmax(ps):
    b, c, d, scale = 128, 98, 512, 23.0
    x, y, p = _data(b, c, d)
    if ps:
        key = jax.random.PRNGKey(0)
        loss = lambda x, y, p: norm_softmax(
            *proxy_synthesis(key, x, y, p, alpha=0.4, mu=1.0), scale=scale)
        proxies = torch.tensor(p, requires_grad=True)
        torch_fn = _torch_step(
            lambda x, y: torch_ps_norm_softmax(x, y, proxies, scale, 0.4, 1.0), x, y, proxies)
    else:
        loss = lambda x, y, p: norm_softmax(x, y, p, scale=scale)
        ref = pml_losses.NormalizedSoftmaxLoss(c, d, temperature=1.0 / scale)
        with torch.no_grad():
            ref.W.copy_(torch.tensor(p.T))
        torch_fn = _torch_step(ref, x, y, ref.W)
    return _with_check(_jax_value_and_grad(loss)(x, y, p), torch_fn)


def row_proxy_nca(ps):
    b, c, d, scale = 128, 98, 512, 12.0
    x, y, p = _data(b, c, d)
    if ps:
        key = jax.random.PRNGKey(0)
        loss = lambda x, y, p: proxy_nca(
            *proxy_synthesis(key, x, y, p, alpha=0.4, mu=1.0), scale=scale)
        proxies = torch.tensor(p, requires_grad=True)
        torch_fn = _torch_step(
            lambda x, y: torch_ps_proxy_nca(x, y, proxies, scale, 0.4, 1.0), x, y, proxies)
    else:
        loss = lambda x, y, p: proxy_nca(x, y, p, scale=scale)
        ref = pml_losses.ProxyNCALoss(c, d, softmax_scale=scale)
        with torch.no_grad():
            ref.proxies.copy_(torch.tensor(p))
        torch_fn = _torch_step(ref, x, y, ref.proxies)
    return _with_check(_jax_value_and_grad(loss)(x, y, p), torch_fn)


def row_proxy_anchor(c):
    b, d = 180, 512
    x, y, p = _data(b, c, d)
    loss = lambda x, y, p: proxy_anchor(x, y, p, margin=0.1, alpha=32.0)
    ref = pml_losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=32)
    with torch.no_grad():
        ref.proxies.copy_(torch.tensor(p))
    return _with_check(_jax_value_and_grad(loss)(x, y, p), _torch_step(ref, x, y, ref.proxies))


def row_soft_triple():
    """The paper's Cars196 setting: K=10 centres per class, λ=20, γ=0.1, τ=0.2, δ=0.01."""
    b, c, k, d = 32, 98, 10, 512
    x, y, _ = _data(b, c, d)
    p = _data(b, c * k, d, seed=1)[2]  # [C·K, D], class c's centres at rows cK … cK+K−1
    loss = lambda x, y, p: soft_triple(x, y, p, centers_per_class=k)
    ref = pml_losses.SoftTripleLoss(
        c, d, centers_per_class=k, weight_reg_weight=0.2,
        weight_regularizer=pml_regularizers.SparseCentersRegularizer(c, k))
    with torch.no_grad():
        ref.fc.copy_(torch.tensor(p.T))  # pml stores the centres as [D, C·K]
    return _with_check(_jax_value_and_grad(loss)(x, y, p), _torch_step(ref, x, y, ref.fc))


MEMVIR = dict(num_steps=45, step_gap=10, batch_size=128, num_classes=98, dim=512)


def row_memvir():
    """A full memory (N=45, M=10: 495 steps), one training step: read, loss, gradients, push.

    JAX variants, all timed against the same torch runs: the fused loss with the
    partial-logsumexp cache (what a trainer should use), the fused loss without it, and
    the generic ``memvir_virtual`` + ``norm_softmax``. The push runs as its own jitted
    call with the state donated: in one program with the reads, XLA (CPU, jax 0.10.2)
    copies every buffer that is both read and updated, twice the state per step.
    """
    n, m, b, c, d = (MEMVIR[k] for k in ("num_steps", "step_gap", "batch_size",
                                          "num_classes", "dim"))
    scale = 23.0
    rng = np.random.default_rng(1)
    capacity = n * (m + 1)
    mem_x = rng.normal(size=(capacity, b, d)).astype(np.float32)
    mem_x /= np.linalg.norm(mem_x, axis=-1, keepdims=True)
    mem_y = rng.integers(0, c, size=(capacity, b))
    mem_p = (rng.uniform(-1, 1, size=(capacity, c, d)) / np.sqrt(d)).astype(np.float32)
    x, y, p = _data(b, c, d, seed=2)

    # JAX: fill the memory by pushing, which also fills the cache.
    push = jax.jit(memvir_push, donate_argnums=0)
    state = memvir_init(**MEMVIR, cache_loss="norm_softmax", cache_scale=scale)
    for t in range(capacity):
        state = push(state, jnp.asarray(mem_x[t]), jnp.asarray(mem_y[t], jnp.int32),
                     jnp.asarray(mem_p[t]))
    # Each variant owns its state: the push donates (consumes) it.
    uncached = lambda: jax.tree_util.tree_map(
        jnp.copy, state.replace(lse_cache=None, cache_loss=None, cache_scale=None))

    def generic(s, x, y, p):
        all_x, all_y, all_p, smask, pmask = memvir_virtual(s, x, y, p)
        return norm_softmax(all_x, all_y, all_p, scale=scale, sample_mask=smask,
                            proxy_mask=pmask)

    fused = lambda s, x, y, p: memvir_norm_softmax(s, x, y, p, scale=scale)
    jx, jy, jp = jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(p)
    jx_hat = jx / jnp.linalg.norm(jx, axis=1, keepdims=True)

    def make(loss, initial):
        grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 3)))
        holder = [initial]

        def run():
            value, grads = grad(holder[0], jx, jy, jp)
            holder[0] = push(holder[0], jx_hat, jy, jp)
            jax.block_until_ready((value, grads, holder[0]))

        return run

    jax_fns = {
        "MemVir Norm-SoftMax N=45 M=10 B=128 C=98": make(fused, state),
        "  fused, without the cache": make(fused, uncached()),
        "  generic memvir_virtual + norm_softmax": make(generic, uncached()),
    }

    # torch: the official queue and NormSoftmax, [D, C] weights.
    memory = TorchMemVir(n, m)
    for t in range(capacity):
        memory.push(torch.tensor(mem_x[t]), torch.tensor(mem_y[t]), torch.tensor(mem_p[t].T))
    weight = torch.tensor(p.T.copy(), requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y)

    def torch_fn():
        tx.grad = weight.grad = None
        x_hat = F.normalize(tx, dim=1)
        memory.norm_softmax_step(x_hat, ty, weight, scale).backward()

    # Same memory and inputs on both sides: the first step's losses must agree.
    probe = TorchMemVir(n, m)
    probe.queue.extend(memory.queue)
    with torch.no_grad():
        torch_loss = float(probe.norm_softmax_step(F.normalize(tx, dim=1), ty, weight, scale))
    jax_loss = float(jax.jit(fused)(state, jx, jy, jp))
    if ARGS.verbose:
        print(f"  loss values: JAX {jax_loss!r}  torch {torch_loss!r}")
    return jax_fns, torch_fn, abs(jax_loss - torch_loss) / abs(torch_loss)


ROWS = [
    ("ns", "Norm-SoftMax            B=128 C=98", lambda: row_norm_softmax(False), 20),
    ("ns_ps", "Norm-SoftMax + PS       B=128 C=98", lambda: row_norm_softmax(True), 20),
    ("nca", "Proxy-NCA               B=128 C=98", lambda: row_proxy_nca(False), 20),
    ("nca_ps", "Proxy-NCA + PS          B=128 C=98", lambda: row_proxy_nca(True), 20),
    ("pa98", "Proxy-Anchor            B=180 C=98", lambda: row_proxy_anchor(98), 20),
    ("pa_sop", "Proxy-Anchor            B=180 C=11318", lambda: row_proxy_anchor(11318), 3),
    ("st", "SoftTriple K=10         B=32 C=98", row_soft_triple, 20),
    ("memvir", None, row_memvir, 2),
]


def memvir_state_bytes(**kwargs):
    shapes = jax.eval_shape(lambda: memvir_init(**kwargs))
    return sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes))


def main():
    wanted = None if ARGS.rows == "all" else set(ARGS.rows.split(","))
    print(f"threads={ARGS.threads}  blocks={ARGS.blocks}  jax {jax.__version__}  "
          f"torch {torch.__version__}  loadavg(1m) at start {os.getloadavg()[0]:.1f}")
    print("forward+backward, median ms; D=512, float32; torch = pml where it has the loss, "
          "else a transcription of the official module")
    header = (f"{'loss':44s} {'JAX ms':>10s} {'torch ms':>10s} {'torch/JAX':>10s} "
              f"{'others':>7s} {'Δloss':>8s}")
    print(header)
    print("-" * len(header))
    any_flag = False
    for key, label, build, reps in ROWS:
        if wanted is not None and key not in wanted:
            continue
        jax_fns, torch_fn, loss_diff = build()
        if not isinstance(jax_fns, dict):
            jax_fns = {label: jax_fns}
        results, others = compare({**jax_fns, "torch": torch_fn}, reps)
        torch_ms, torch_flag = results["torch"]
        for name in jax_fns:
            jax_ms, jax_flag = results[name]
            flagged = jax_flag or torch_flag
            any_flag |= flagged
            mark = "*" if flagged else " "
            check = "-" if "PS" in name else f"{loss_diff:.0e}"
            print(f"{name:44s} {jax_ms:10.2f} {torch_ms:10.2f} {torch_ms / jax_ms:9.1f}x"
                  f"{mark} {others:6.1f} {check:>8s}", flush=True)
        del jax_fns, torch_fn
    print("others: mean CPU cores used by other processes while the row ran. Δloss: relative "
          "difference of the two losses on the row's inputs (PS rows draw different λ).")
    if any_flag:
        print(f"* no block of this row was quiet (others <= {ARGS.busy_cores} cores): "
              "median over all blocks, noisy.")
    print()
    print("MemVir state (ring buffer of N(M+1) steps), N=45, M=10, B=128, D=512:")
    for name, c in (("Cars196", 98), ("SOP", 11318)):
        sizes = [memvir_state_bytes(**{**MEMVIR, "num_classes": c, "dtype": dt})
                 for dt in (jnp.float32, jnp.bfloat16)]
        print(f"  {name:8s} C={c:<6d} float32 {sizes[0] / 2**20:10.1f} MiB   "
              f"bfloat16 {sizes[1] / 2**20:10.1f} MiB")


if __name__ == "__main__":
    main()
