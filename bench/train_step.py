"""Training steps/s: proxy_jax's train step beside the same step in PyTorch.

Both sides: ResNet-50 (BatchNorm frozen, as the seeds train) → GAP → linear 512 → Norm-SoftMax
(scale 23, 98 classes, proxies [98, 512]), Adam with three parameter groups (backbone and
embedding at 1e-4, proxies at 1e-2, eps 0.01, weight decay 1e-4): the PS / MemVir recipe.
proxy_jax runs the proxy method's step (``proxy_jax.methods.proxy``) through
``parallel.parallelize`` (jit over a one-device mesh); PyTorch runs torchvision's
``resnet50`` with a transcription of the loss and ``torch.optim.Adam``. Inputs are random (the input pipeline is benchmarked elsewhere).

Method: the two implementations alternate in blocks (``--steps`` steps each); per block the
median step time is kept unless the machine was busy, i.e. the process got less than
``--min_cpu_share`` of ``threads × wall time`` in CPU time or the 1-minute load average
exceeded the thread count by more than 1 (such blocks are reported and dropped, unless
every block was busy). Both use the same cores: ``--threads N`` pins the whole process to
N cores (os.sched_setaffinity) and sets torch.set_num_threads(N); XLA's CPU thread pool
follows the affinity mask.

  python bench/train_step.py                      # batch 32, 224x224, ~3 min on 2 cores
  python bench/train_step.py --batch 8 --size 112 # a quicker look
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per block and implementation")
    p.add_argument("--min_cpu_share", type=float, default=0.7)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="proxy_jax compute dtype (torch stays float32 on the CPU)")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: proxy_jax.malloc.keep_freed_memory() as main.py does (one "
                        "process: it applies to torch too); default: glibc's settings")
    return p.parse_args()


def _jax_step(args):
    import jax
    import numpy as np

    from proxy_jax import config_utils, methods, parallel

    config = config_utils.base_config()
    config.data.dataset, config.data.root = "folder", "-"
    config.model.backbone, config.model.embedding_dim, config.model.pooling = "resnet50", 512, "gap"
    config.model.dtype = args.dtype
    config.data.input_size = config.data.resize = args.size
    config.data.batch_size = args.batch
    config.num_devices = 1
    mesh = parallel.make_mesh(1)
    model = methods.create_model(config)
    plan = methods.get_method("proxy").setup(config, model, num_classes=98, steps_per_epoch=100)
    state = parallel.replicate(plan.state, mesh)
    step = parallel.parallelize(plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({
        "image": rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32),
        "label": rng.integers(0, 98, args.batch).astype(np.int32)}, mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
    return run


def _torch_step(args):
    import torch
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.resnet50()
    backbone.fc = torch.nn.Identity()
    embedding = torch.nn.Linear(2048, 512)
    proxies = torch.nn.Parameter(torch.empty(98, 512).uniform_(-512 ** -0.5, 512 ** -0.5))
    for m in backbone.modules():  # frozen BatchNorm, as --freeze_BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.Adam([{"params": backbone.parameters(), "lr": 1e-4},
                            {"params": embedding.parameters(), "lr": 1e-4},
                            {"params": [proxies], "lr": 1e-2}], eps=0.01, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 98, (args.batch,))

    def run():
        x = embedding(backbone(images))
        logits = 23.0 * torch.nn.functional.normalize(x, dim=1) @ \
            torch.nn.functional.normalize(proxies, dim=1).T
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run


def _block(fn, steps, threads, min_cpu_share):
    times, busy = [], False
    for _ in range(steps):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        times.append(wall)
        busy |= cpu < min_cpu_share * threads * wall or os.getloadavg()[0] > threads + 1
    return statistics.median(times), busy


def timed_blocks(impls, args, *, unit="s"):
    """Warms up every implementation, then times them in interleaved blocks.

    Each block runs every implementation for ``args.steps`` steps; a block during which the
    process got less than ``args.min_cpu_share`` of its threads is dropped.

    Returns ``(medians, note, dropped)``: the median seconds per step of each implementation
    over the kept blocks (over all blocks if none was kept, with ``note`` saying so) and the
    number of dropped blocks.
    """
    for name, fn in impls.items():  # compile / warm up
        t0 = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")
    kept = {n: [] for n in impls}
    allb = {n: [] for n in impls}
    dropped = 0
    for b in range(args.blocks):
        results = {n: _block(fn, args.steps, args.threads, args.min_cpu_share)
                   for n, fn in impls.items()}
        busy = any(r[1] for r in results.values())
        dropped += busy
        for n, (t, _) in results.items():
            allb[n].append(t)
            if not busy:
                kept[n].append(t)
        print(f"block {b}: " + ", ".join(f"{n} {t:.2f} {unit}" for n, (t, _) in results.items())
              + ("  (busy: dropped)" if busy else "") + f"  load {os.getloadavg()[0]:.1f}")
    use = kept if all(kept.values()) else allb
    note = "" if all(kept.values()) else "  (every block was busy: medians of all blocks)"
    return {n: statistics.median(v) for n, v in use.items()}, note, dropped


if __name__ == "__main__":
    args = _parse()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    if args.malloc == "keep":  # before any library starts threads
        from proxy_jax import malloc
        malloc.keep_freed_memory()
    import torch

    torch.set_num_threads(args.threads)
    import jax

    print(f"devices: {jax.devices()}  threads: {args.threads}  batch {args.batch}, "
          f"{args.size}x{args.size}, proxy_jax {args.dtype}, malloc {args.malloc}; "
          f"load {os.getloadavg()}")
    impls = {"proxy_jax": _jax_step(args), "torch": _torch_step(args)}
    med, note, dropped = timed_blocks(impls, args, unit="s/step")
    print()
    print(f"| step (ResNet-50, batch {args.batch}, {args.size}², Norm-SoftMax, Adam) "
          "| proxy_jax | torch | torch / proxy_jax |")
    print("|---|---|---|---|")
    print(f"| CPU, {args.threads} threads, steps/s | {1 / med['proxy_jax']:.3f} | "
          f"{1 / med['torch']:.3f} | {med['torch'] / med['proxy_jax']:.2f}× |")
    print(f"| CPU, {args.threads} threads, images/s | {args.batch / med['proxy_jax']:.2f} | "
          f"{args.batch / med['torch']:.2f} | |")
    print(f"blocks kept {args.blocks - dropped}/{args.blocks}{note}; load {os.getloadavg()}")
