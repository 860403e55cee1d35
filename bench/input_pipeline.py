"""Input-pipeline throughput: proxy_jax (grain) beside torch DataLoader + torchvision.

Measures images/s of the training pipeline (RandomResizedCrop 224 + horizontal flip +
ImageNet normalization) and of the evaluation pipeline (Resize 256 + CenterCrop 224 +
normalization) on Cars196-like JPEGs (about 500x375, generated into a temporary folder),
with the same number of worker processes and the same batch size for both.

Method: blocks alternate the two implementations (ABBA order); each block starts a fresh
iterator, discards the warm-up batches (worker start-up, buffers filling) and times the
next ones, recording the wall time and the CPU time of the whole process tree (main +
workers; CPU ms per image is the load-independent cost). A block counts as "busy" when the CPU time our process tree got was below
``--min-share`` of the cores it could use (other processes took them); busy blocks are
dropped when enough quiet ones remain. The table shows medians, the ratio proxy_jax /
torch, and the load average seen.

    .venv/bin/python bench/input_pipeline.py                 # ~2-3 minutes on 2 cores
    .venv/bin/python bench/input_pipeline.py --repeats 5 --images 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy_jax.data.pipeline import make_loader  # noqa: E402
from proxy_jax.data.samplers import ShuffleSampler  # noqa: E402
from proxy_jax.data.transforms import InputNormalization, eval_transform, train_transform  # noqa: E402

IMAGENET = InputNormalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bgr=False, scale=1 / 255)


def write_jpegs(root: str, count: int, num_classes: int = 16, seed: int = 0) -> None:
    """Photo-like JPEGs (gradients, shapes, sensor noise), 450-550 x 330-420, quality 90."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(450, 551)), int(rng.integers(330, 421))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        colour = rng.uniform(0, 255, (3, 3))
        pixels = (colour[:, 0] + colour[:, 1] * xx[..., None] / width + colour[:, 2] * yy[..., None] / height) / 2
        for _ in range(6):  # a few blobs for edges
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0, 8, pixels.shape)
        folder = os.path.join(root, f"class{index % num_classes:03d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{index:05d}.jpg"), quality=90)


def proxy_jax_iterator(root, kind, args):
    from proxy_jax.data.datasets import ImageFolder

    ds = ImageFolder(root)
    transform = train_transform(224, IMAGENET) if kind == "train" else eval_transform(256, 224, IMAGENET)
    loader = make_loader(ds, batch_size=args.batch_size, sampler=ShuffleSampler(len(ds)), transform=transform,
                         num_workers=args.workers, seed=0)
    return loader, loader.close


def torch_iterator(root, kind, args):
    import torch
    import torchvision
    from torchvision import transforms as tv

    normalize = tv.Normalize(IMAGENET.mean, IMAGENET.std)
    if kind == "train":
        transform = tv.Compose([tv.RandomResizedCrop(224), tv.RandomHorizontalFlip(), tv.ToTensor(), normalize])
    else:
        transform = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.ToTensor(), normalize])
    ds = torchvision.datasets.ImageFolder(root, transform=transform)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=10**7)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True)
    iterator = iter(loader)
    return iterator, getattr(iterator, "_shutdown_workers", lambda: None)


def _tree_cpu_seconds():
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def run_block(make, root, kind, args):
    iterator, close = make(root, kind, args)
    try:
        for _ in range(args.warmup):
            next(iterator)
        cpu0, t0 = _tree_cpu_seconds(), time.perf_counter()
        for _ in range(args.batches):
            batch = next(iterator)
        wall = time.perf_counter() - t0
        cpu1 = _tree_cpu_seconds()
    finally:
        close()
    del batch
    images = args.batches * args.batch_size
    usable = min(os.cpu_count() or 1, args.workers + 1) * wall
    share = None if cpu0 is None else (cpu1 - cpu0) / usable
    cpu_ms = None if cpu0 is None else (cpu1 - cpu0) / images * 1e3
    return images / wall, share, os.getloadavg()[0], cpu_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4, help="batches discarded per block")
    parser.add_argument("--batches", type=int, default=12, help="batches timed per block")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per implementation and pipeline")
    parser.add_argument("--min-share", type=float, default=0.6,
                        help="drop blocks whose process tree got less than this share of its cores")
    parser.add_argument("--pipelines", default="train,eval")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)  # the numpy side is single-threaded too; workers use 1 thread each

    impls = {"proxy_jax": proxy_jax_iterator, "torch": torch_iterator}
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, args.images)
        print(f"{args.images} JPEGs ~500x375 in {root}; batch {args.batch_size}, {args.workers} workers, "
              f"{args.repeats} blocks x {args.batches} batches each; cores {os.cpu_count()}", flush=True)
        rows = []
        for kind in args.pipelines.split(","):
            results = {name: [] for name in impls}
            for rep in range(args.repeats):
                order = list(impls) if rep % 2 == 0 else list(impls)[::-1]
                for name in order:
                    ips, share, load, cpu_ms = run_block(impls[name], root, kind, args)
                    results[name].append((ips, share, load, cpu_ms))
                    share_text = "n/a" if share is None else f"{share:.2f}"
                    cpu_text = "n/a" if cpu_ms is None else f"{cpu_ms:.2f}"
                    print(f"  {kind:5s} {name:9s} block {rep}: {ips:7.1f} img/s  cpu share {share_text}  "
                          f"cpu ms/img {cpu_text}  load {load:.1f}", flush=True)
            row = [kind]
            for name in impls:
                quiet = [r for r in results[name] if r[1] is None or r[1] >= args.min_share]
                used = quiet if len(quiet) >= max(1, args.repeats // 2) else results[name]
                cpu = [r[3] for r in results[name] if r[3] is not None]
                row += [statistics.median(r[0] for r in used), len(quiet),
                        statistics.median(cpu) if cpu else float("nan")]
            row.append(statistics.mean(r[2] for name in impls for r in results[name]))
            rows.append(row)

    print()
    print("| pipeline | proxy_jax img/s | torch img/s | ratio | CPU ms/img proxy_jax / torch | quiet blocks (pj/torch) | load avg |")
    print("|---|---|---|---|---|---|---|")
    for kind, pj, pj_quiet, pj_cpu, tt, tt_quiet, tt_cpu, load in rows:
        name = ("train: RandomResizedCrop 224 + flip + normalize" if kind == "train"
                else "eval: Resize 256 + CenterCrop 224 + normalize")
        print(f"| {name} | {pj:.0f} | {tt:.0f} | {pj / tt:.2f} | {pj_cpu:.2f} / {tt_cpu:.2f} | "
              f"{pj_quiet}/{tt_quiet} of {args.repeats} | {load:.1f} |")


if __name__ == "__main__":
    main()
