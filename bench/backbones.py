"""ResNet-50 or ViT-S/16 embedding model: proxy_jax (jit) beside PyTorch on the same CPU cores.

Measures images/s for
  * forward: embedding extraction (eval mode), batch 64 by default;
  * forward+backward: gradient of a loss on the embeddings w.r.t. every parameter, BatchNorm
    frozen as in every seed, batch 32 by default;
at 224x224, for the same network on both sides: torchvision ``resnet50`` trunk → GAP →
Linear(2048, 512) → l2 normalization, the Flax one loaded from the torch weights through
``proxy_jax.convert`` (the outputs are checked to agree before timing). With a ViT
``--arch`` (e.g. ``vit_small_patch16_224``) the torch side is timm's model (``pretrained=False``)
→ class token → Linear(384, 512) → l2 normalization, the Flax side pools 'cls'; there the
``--conv`` modes choose the implementation of the dense layers (oneDNN's matmul or XLA's
dot; the same PROXY_JAX_CONV switch).

Fairness: both run in one process pinned to the same ``--threads`` cores
(``os.sched_setaffinity``, ``torch.set_num_threads``; XLA's CPU pool follows the affinity);
PyTorch runs channels-last (its fastest CPU layout with oneDNN; ``--torch-format contiguous``
for NCHW); XLA flags can be added with ``--xla-flags``. proxy_jax runs once per
convolution implementation of ``--conv`` (proxy_jax.models.onednn_conv: 'onednn', the CPU
default, and 'xla', XLA's own), each a row. The implementations alternate in
blocks (order flipped every block); each block runs ``--reps`` batches per implementation
and records their median wall time, this process's CPU time and the load average; blocks where the process got less than ``--min-util`` of its cores
(other work on the machine) are discarded if any clean block remains; medians are reported.
Where a GPU is visible to JAX, float32 and bfloat16 forward/forward+backward images/s are
measured there too; otherwise the table says none was available.

    python bench/backbones.py            # ~3 min on 2 quiet cores
    python bench/backbones.py --quick    # smaller batches, one timed block (~1 min)
    python bench/backbones.py --arch vit_small_patch16_224   # ViT-S/16 vs timm (~3 min)
"""
import argparse
import os
import platform
import statistics
from collections import OrderedDict
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--forward-batch", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--blocks", type=int, default=2, help="timed blocks per measurement")
    p.add_argument("--reps", type=int, default=3,
                   help="batches per block and implementation; the block keeps their median "
                        "(the first batch after the other library ran can pay its heap layout)")
    p.add_argument("--min-util", type=float, default=0.7,
                   help="discard blocks where CPU time / (wall * threads) is below this")
    p.add_argument("--torch-format", choices=("channels_last", "contiguous"),
                   default="channels_last")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
    p.add_argument("--conv", default="onednn,xla",
                   help="comma-separated PROXY_JAX_CONV modes to measure on the CPU")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: proxy_jax.malloc.keep_freed_memory() as main.py does (one "
                        "process: it applies to torch too); default: glibc's settings")
    p.add_argument("--quick", action="store_true",
                   help="batches 16 / 8 and a single timed block")
    args = p.parse_args(argv)
    if args.quick:
        args.forward_batch, args.train_batch, args.blocks, args.reps = 16, 8, 1, 1
    return args


ARGS = parse_args()
# Before jax is imported: XLA reads its flags and sizes its CPU thread pool at start-up.
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()
if ARGS.malloc == "keep":  # before any library starts threads
    from proxy_jax import malloc  # noqa: E402
    malloc.keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from proxy_jax.convert import convert_state_dict  # noqa: E402
from proxy_jax.models import create_model, get_backbone, onednn_conv  # noqa: E402
from proxy_jax.models.weights import backbone_shapes  # noqa: E402

EMBEDDING_DIM = 512


class TorchEmbedding(torch.nn.Module):
    """The seeds' head on a torchvision trunk: GAP → Linear → l2 normalize."""

    def __init__(self, arch):
        super().__init__()
        self.vit = get_backbone(arch).is_transformer
        if self.vit:  # timm's ViT without its classifier: forward_features → tokens
            import timm
            self.trunk = timm.create_model(arch, pretrained=False, num_classes=0)
            self.embedding = torch.nn.Linear(self.trunk.embed_dim, EMBEDDING_DIM)
            return
        net = getattr(torchvision.models, arch)(weights=None)
        # A named Sequential keeps torchvision's state_dict keys (conv1.weight, layer1.0...).
        self.trunk = torch.nn.Sequential(OrderedDict(list(net.named_children())[:-2]))
        self.embedding = torch.nn.Linear(net.fc.in_features, EMBEDDING_DIM)

    def forward(self, x):
        if self.vit:
            return F.normalize(self.embedding(self.trunk.forward_features(x)[:, 0]), dim=1)
        return F.normalize(self.embedding(self.trunk(x).mean((2, 3))), dim=1)


def build(args):
    torch.manual_seed(0)
    tmodel = TorchEmbedding(args.arch)
    if args.torch_format == "channels_last":
        tmodel = tmodel.to(memory_format=torch.channels_last)
    weights = convert_state_dict(tmodel.trunk.state_dict(), args.arch)  # trunk keys = torchvision's
    params = {}
    for collection in ("params", "batch_stats"):
        flat = {tuple(k.split("/")[1:]): jnp.asarray(v) for k, v in weights.items()
                if k.startswith(collection + "/")}
        params[collection] = {"backbone": _unflatten(flat)}
    params["params"]["embedding"] = {
        "kernel": jnp.asarray(tmodel.embedding.weight.detach().numpy().T),
        "bias": jnp.asarray(tmodel.embedding.bias.detach().numpy())}
    assert len(weights) == len(backbone_shapes(args.arch))
    return tmodel, params


def _unflatten(flat):
    from flax import traverse_util
    return traverse_util.unflatten_dict(flat)


def make_runners(args, tmodel, variables, dtype=jnp.float32, device=None, conv="auto"):
    """{(pass, implementation): fn}, each fn running one batch to completion; proxy_jax is
    'proxy_jax', traced here with PROXY_JAX_CONV=conv (the choice is made at trace time)."""
    pooling = "cls" if get_backbone(args.arch).is_transformer else "gap"
    model = create_model(backbone=args.arch, embedding_dim=EMBEDDING_DIM, pooling=pooling,
                         dtype=dtype)
    rng = np.random.default_rng(0)
    s = args.size

    def images(b):
        return rng.normal(size=(b, s, s, 3)).astype(np.float32)

    xf, xt = images(args.forward_batch), images(args.train_batch)
    target = rng.normal(size=(args.train_batch, EMBEDDING_DIM)).astype(np.float32)
    put = (lambda a: jax.device_put(a, device)) if device is not None else jnp.asarray
    v = jax.tree.map(put, variables)
    jxf, jxt, jtarget = put(xf), put(xt), put(target)

    @jax.jit
    def jax_forward(v, x):
        return model.apply(v, x, train=False)

    def jax_loss(params, stats, x, t):
        emb = model.apply({"params": params, "batch_stats": stats}, x, train=True)
        return jnp.sum(emb * t)

    jax_grad = jax.jit(jax.grad(jax_loss))

    saved = os.environ.get(onednn_conv.ENV_VAR)
    os.environ[onednn_conv.ENV_VAR] = conv
    try:  # trace (and compile) now, under this convolution mode
        jax_forward = jax_forward.lower(v, jxf).compile()
        jax_grad = jax_grad.lower(v["params"], v["batch_stats"], jxt, jtarget).compile()
    finally:
        if saved is None:
            del os.environ[onednn_conv.ENV_VAR]
        else:
            os.environ[onednn_conv.ENV_VAR] = saved
    runners = {
        ("forward", "proxy_jax"): lambda: jax_forward(v, jxf).block_until_ready(),
        ("forward+backward", "proxy_jax"): lambda: jax.block_until_ready(
            jax_grad(v["params"], v["batch_stats"], jxt, jtarget)),
    }
    if tmodel is not None:
        fmt = (torch.channels_last if args.torch_format == "channels_last"
               else torch.contiguous_format)
        txf = torch.from_numpy(xf.transpose(0, 3, 1, 2)).contiguous(memory_format=fmt)
        txt = torch.from_numpy(xt.transpose(0, 3, 1, 2)).contiguous(memory_format=fmt)
        ttarget = torch.from_numpy(target)

        def torch_forward():
            tmodel.eval()
            with torch.inference_mode():
                tmodel(txf)

        def torch_train():
            tmodel.train()
            for m in tmodel.modules():  # frozen BatchNorm, as the seeds train
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
            tmodel.zero_grad(set_to_none=True)
            (tmodel(txt) * ttarget).sum().backward()

        runners[("forward", "torch")] = torch_forward
        runners[("forward+backward", "torch")] = torch_train
        # Same network, same weights: the outputs must agree before timing means anything.
        tmodel.eval()
        with torch.no_grad():
            want = tmodel(txf[:2]).numpy()
        got = np.asarray(jax_forward(v, jxf))[:2]
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        print(f"# forward agreement proxy_jax ({conv} conv) vs torch: max rel error {err:.2e}")
        assert err < 1e-3, err
    return runners


def measure(args, runners, passes, impls):
    batch = {"forward": args.forward_batch, "forward+backward": args.train_batch}
    results = {}
    for name in passes:
        for impl in impls:  # warm-up: compilation, allocator, oneDNN primitive caches
            t = time.perf_counter()
            runners[(name, impl)]()
            print(f"# warm-up {name:16s} {impl:9s} {time.perf_counter() - t:6.1f} s", flush=True)
        blocks = {impl: [] for impl in impls}
        for b in range(args.blocks):
            order = impls if b % 2 == 0 else impls[::-1]
            for impl in order:
                load = os.getloadavg()[0]
                walls, c0 = [], time.process_time()
                for _ in range(args.reps):
                    w0 = time.perf_counter()
                    runners[(name, impl)]()
                    walls.append(time.perf_counter() - w0)
                util = (time.process_time() - c0) / (sum(walls) * args.threads)
                wall = statistics.median(walls)
                blocks[impl].append((batch[name] / wall, util, load))
                print(f"# block {b} {name:16s} {impl:9s} {batch[name] / wall:7.2f} img/s "
                      f"util {util:.2f} load {load:.1f}", flush=True)
        for impl in impls:
            clean = [r for r in blocks[impl] if r[1] >= args.min_util]
            used = clean or blocks[impl]
            results[(name, impl)] = (statistics.median(r[0] for r in used), len(clean),
                                     len(blocks[impl]),
                                     statistics.median(r[2] for r in blocks[impl]))
    return results


def main(args):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen
    torch.set_num_threads(args.threads)
    tmodel, variables = build(args)
    passes = ("forward", "forward+backward")
    cpu = jax.devices("cpu")[0]
    modes = args.conv.split(",")
    runners = {}
    for i, mode in enumerate(modes):
        r = make_runners(args, tmodel if i == 0 else None, variables, device=cpu, conv=mode)
        runners.update({(k[0], f"proxy_jax/{mode}" if k[1] == "proxy_jax" else k[1]): fn
                        for k, fn in r.items()})
    res = measure(args, runners, passes, tuple(f"proxy_jax/{m}" for m in modes) + ("torch",))

    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\n{args.arch} {args.size}x{args.size}, CPU: {cpu_name}, {args.threads} threads "
          f"(torch {torch.__version__} {args.torch_format}, jax {jax.__version__}, "
          f"malloc {args.malloc}"
          f"{', XLA_FLAGS=' + os.environ['XLA_FLAGS'] if os.environ.get('XLA_FLAGS') else ''})\n")
    print("| device | conv | pass | batch | proxy_jax img/s | torch img/s | ratio | clean blocks "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for name in passes:
            batch = args.forward_batch if name == "forward" else args.train_batch
            j, jc, n, load = res[(name, f"proxy_jax/{mode}")]
            t, tc, _, _ = res[(name, "torch")]
            print(f"| CPU float32 | {mode} | {name} | {batch} | {j:.2f} | {t:.2f} | {j / t:.2f} | "
                  f"{min(jc, tc)}/{n} | {load:.1f} |")

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        print("| GPU | - | - | - | no GPU visible to JAX in this run | - | - | - | - |")
        return
    for dtype in (jnp.float32, jnp.bfloat16):
        runners = make_runners(args, None, variables, dtype=dtype, device=gpus[0], conv="xla")
        gres = measure(args, runners, passes, ("proxy_jax",))
        for name in passes:
            batch = args.forward_batch if name == "forward" else args.train_batch
            j, *_ = gres[(name, "proxy_jax")]
            print(f"| {gpus[0].device_kind} {jnp.dtype(dtype).name} | xla | {name} | {batch} | "
                  f"{j:.1f} | - | - | - | - |")


if __name__ == "__main__":
    main(ARGS)
