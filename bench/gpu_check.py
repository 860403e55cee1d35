"""The GPU check: what a lent GPU machine is used for, in one command of at most 8 minutes.

    bash bench/gpu_check.sh                  # on the GPU machine (installs the carried wheels)
    JAX_PLATFORMS=cpu python bench/gpu_check.py --dry-run --out /tmp/gpu_check   # anywhere

It writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (``$OUT`` on the device
machine), section by section as each finishes, so a run cut short still reports what it did:

1. **environment**: Python, jax/jaxlib/flax/optax/orbax/torch versions, JAX's devices.
2. **matmul ceiling**: the chip's measured bf16 and fp32 matmul throughput (JAX, n³ products).
3. **checks** on the device: the GPU-relevant test files under pytest (losses and
   regularizers under jit, the methods' steps, evaluation); the MemVir step's in-place memory
   update (no memory-sized ``copy`` in the compiled step); bfloat16 compute with float32
   parameters and loss; 'device' evaluation equal to 'blocks'; one ``main.py`` run on the
   embedded data.
4. **benchmarks** against torch on the same device, the two sides interleaved in blocks and
   the median of the block medians reported: ResNet-50 (batch 120), BN-Inception (batch
   180) and ViT-S/16 (batch 120, timm's on the torch side) train steps at 224² (frozen
   BatchNorm, Proxy-Anchor, AdamW; the cub200 Proxy-Anchor configs) in float32 and bfloat16
   (torch: float32, AMP bfloat16 + channels_last, and
   ``torch.compile`` of the AMP step while time allows); XLA's achieved FLOP/s of the
   ResNet-50 step (its compiled cost analysis over the step time) against the matmul
   ceiling; Proxy-Anchor at SOP scale (B=180, C=11,318); the MemVir Norm-SoftMax step (N=45,
   M=10, B=128, C=98, full memory); SOP-size evaluation (60,502 × 512, all-vs-all, Recall@1,
   10, 100, 1000) end to end with each search method.

``--dry-run`` runs every section at tiny sizes (seconds each, on the CPU), which is how the
script is kept working where no GPU is (``tests/test_gpu_check.py``). Sections past
``--budget-s`` are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

FULL = dict(matmul=8192, image=224, rn50_batch=120, bni_batch=180, vit_batch=120, pa_batch=180,
            pa_classes=11318, memvir=dict(num_steps=45, step_gap=10, batch_size=128,
                                          num_classes=98, dim=512),
            eval_n=60502, eval_dim=512, eval_classes=11316, eval_ks=(1, 10, 100, 1000),
            blocks=3, reps=5, main_epochs=4)
DRY = dict(matmul=256, image=64, rn50_batch=2, bni_batch=2, vit_batch=2, pa_batch=16,
           pa_classes=50,
           memvir=dict(num_steps=3, step_gap=1, batch_size=8, num_classes=10, dim=16),
           eval_n=600, eval_dim=16, eval_classes=100, eval_ks=(1, 10),
           blocks=1, reps=1, main_epochs=1)
# (config, batch size key, dtype) of the train-step rows; the dry run compiles each backbone
# once (a ResNet-50 step takes ~30 s to compile on a CPU).
TRAIN_ROWS = tuple((c, b, d) for c, b in (("cub200_proxy_anchor_resnet50", "rn50_batch"),
                                          ("cub200_proxy_anchor_bn_inception", "bni_batch"),
                                          ("cub200_proxy_anchor_vit_s16_dino", "vit_batch"))
                   for d in ("float32", "bfloat16"))
DRY_TRAIN_ROWS = (("cub200_proxy_anchor_resnet50", "rn50_batch", "bfloat16"),
                  ("cub200_proxy_anchor_bn_inception", "bni_batch", "float32"),
                  ("cub200_proxy_anchor_vit_s16_dino", "vit_batch", "bfloat16"))
# The test files whose tests mean something on a GPU (jit, the steps, evaluation).
TEST_FILES = ("tests/test_losses.py", "tests/regularizers", "tests/methods/test_proxy.py",
              "tests/test_objective.py", "tests/test_evaluation.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU): checks the script")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no section after this many seconds (the report is written "
                        "after every section)")
    p.add_argument("--sections", default="all",
                   help="comma list of env,matmul,checks,train,losses,evaluation")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ timing

def interleaved(impls: dict, *, blocks: int, reps: int) -> dict:
    """Median milliseconds per call of each ``impls[name]()`` (each call synchronizes itself).

    One warm-up call each (its time, compile included, is reported as ``first_ms``), then
    ``blocks`` rounds in which every implementation runs ``reps`` calls in turn; each block
    gives a median, and the result is the median of the block medians.
    """
    out = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        fn()
        out[name] = {"first_ms": 1e3 * (time.perf_counter() - t0), "blocks_ms": []}
    for _ in range(blocks):
        for name, fn in impls.items():
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name]["blocks_ms"].append(1e3 * statistics.median(times))
    for entry in out.values():
        entry["ms"] = statistics.median(entry["blocks_ms"])
    return out


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ sections

def section_env(sizes, report):
    import jax

    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "torchvision",
                 "numpy", "faiss", "grain", "ml_collections", "tensorboard"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001  (a missing package is a finding, not a crash)
            versions[name] = f"missing ({type(e).__name__})"
    report["env"] = {"versions": versions, "backend": jax.default_backend(),
                     "devices": [str(d) for d in jax.devices()],
                     "device_kind": jax.devices()[0].device_kind,
                     "tensorflow_importable": _importable("tensorflow")}


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def section_matmul(sizes, report):
    import jax
    import jax.numpy as jnp

    n = sizes["matmul"]
    rows = {}
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        timed = interleaved({dtype: lambda: f(a, b).block_until_ready()},
                            blocks=sizes["blocks"], reps=sizes["reps"])[dtype]
        rows[dtype] = {"n": n, "ms": timed["ms"], "tflops": 2 * n ** 3 / timed["ms"] / 1e9}
    report["matmul"] = rows


def section_checks(sizes, report, out_dir):
    checks = report.setdefault("checks", {})
    checks["pytest"] = _run_pytest(out_dir)
    for name, fn in (("memvir_in_place", check_memvir_in_place),
                     ("bfloat16_params_and_loss", check_bfloat16),
                     ("device_evaluation_equals_blocks", check_device_evaluation)):
        t0 = time.perf_counter()
        try:
            checks[name] = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-2000:]}
        checks[name]["seconds"] = round(time.perf_counter() - t0, 1)
    checks["main_py"] = _run_main(sizes, out_dir)


def _run_pytest(out_dir):
    """The GPU-relevant test files under pytest, JAX on the GPU (CPU in a dry run)."""
    t0 = time.perf_counter()
    dry = bool(os.environ.get("GPU_CHECK_DRY"))
    # conftest defaults JAX_PLATFORMS to cpu; here the GPU is the default device (tests that
    # build meshes of 8 fake CPU devices fail on it, and say so).
    env = dict(os.environ, JAX_PLATFORMS="cpu" if dry else "cuda,cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if _importable("pytest_timeout"):
        cmd.append("--timeout=240")
    files = [f for f in TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
    if dry:
        files = ["tests/test_evaluation.py::test_methods_agree_and_labels_are_arbitrary_ints"]
    result = subprocess.run(cmd + files, cwd=ROOT, env=env, capture_output=True, text=True)
    with open(os.path.join(out_dir, "pytest.log"), "w") as f:
        f.write(result.stdout + result.stderr)
    lines = result.stdout.strip().splitlines()
    failed = [line[len("FAILED "):][:200] for line in lines if line.startswith("FAILED ")]
    return {"ok": result.returncode == 0, "files": files, "summary": lines[-1:] if lines else
            [result.stderr[-300:]], "failed": failed[:30],
            "seconds": round(time.perf_counter() - t0, 1)}


def _run_main(sizes, out_dir):
    import tempfile

    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="gpu_check_main_")  # data and checkpoints stay out of OUT
    workdir = os.path.join(scratch, "run")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
           f"--config.num_epochs={sizes['main_epochs']}", "--config.eval.every_epochs=1",
           f"--config.data.root={os.path.join(scratch, 'embedded')}"]
    if os.environ.get("GPU_CHECK_DRY"):
        cmd += ["--config.steps_per_epoch=3", "--config.data.num_workers=0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(out_dir, "main_py.log"), "w") as f:
        f.write(result.stdout + result.stderr)
    metrics = {}
    path = os.path.join(workdir, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            metrics = json.load(f)
    return {"ok": result.returncode == 0, "command": " ".join(cmd[1:]),
            "recall@1": metrics.get("recall@1"), "step": metrics.get("step"),
            "last_line": (result.stdout.strip().splitlines() or [""])[-1][:300],
            "seconds": round(time.perf_counter() - t0, 1)}


def check_memvir_in_place():
    """The compiled MemVir step (donated state) holds no copy of a memory-sized buffer."""
    import numpy as np

    from proxy_jax import methods, parallel

    config = _seed_config("cars196_memvir_norm_softmax", batch=8, size=32, dtype="float32")
    config.model.backbone = "tiny_cnn"
    config.regularizer.memvir_num_steps, config.regularizer.memvir_step_gap = 3, 1
    mesh = parallel.make_mesh(1)
    plan = methods.get_method(config.method).setup(
        config, methods.create_model(config), num_classes=98, steps_per_epoch=10)
    step = parallel.parallelize(plan.step_fn, mesh)
    batch = {"image": np.zeros((8, 32, 32, 3), np.float32),
             "label": np.arange(8, dtype=np.int32) % 4}
    hlo = step.lower(parallel.replicate(plan.state, mesh),
                     parallel.shard_batch(batch, mesh)).compile().as_text()
    memory = plan.state.extra["memvir"]
    shapes = {f"f32[{','.join(map(str, a.shape))}]"
              for a in (memory.embeddings, memory.proxies, memory.lse_cache)}
    copies = [line.strip()[:200] for line in hlo.splitlines()
              if " copy(" in line and any(f"= {s}" in line for s in shapes)]
    if copies:
        raise AssertionError(f"{len(copies)} memory-sized copies: {copies[:3]}")
    return {"memory_shapes": sorted(shapes), "copies": 0}


def check_bfloat16():
    """bfloat16 compute: parameters stay float32, the loss is a finite float32."""
    import jax
    import numpy as np

    from proxy_jax import methods, parallel

    config = _seed_config("cars196_norm_softmax", batch=8, size=32, dtype="bfloat16")
    config.model.backbone = "tiny_cnn"
    mesh = parallel.make_mesh(1)
    plan = methods.get_method(config.method).setup(
        config, methods.create_model(config), num_classes=98, steps_per_epoch=10)
    step = parallel.parallelize(plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 98, 8).astype(np.int32)}
    state, metrics = step(parallel.replicate(plan.state, mesh), parallel.shard_batch(batch, mesh))
    dtypes = {str(np.asarray(x).dtype) for x in jax.tree.leaves(state.params)}
    loss = np.asarray(metrics["loss"])
    if dtypes != {"float32"} or loss.dtype != np.float32 or not np.isfinite(loss):
        raise AssertionError(f"param dtypes {dtypes}, loss {loss!r} ({loss.dtype})")
    return {"param_dtypes": sorted(dtypes), "loss": float(loss)}


def check_device_evaluation():
    """'device' search (on the accelerator) gives the metrics of 'blocks' (NumPy)."""
    import numpy as np

    from proxy_jax import evaluation

    x, y = _clustered(2000, 64, 200, seed=3)
    ks = (1, 2, 4, 8, 100)
    want = evaluation.retrieval_metrics(x, y, ks=ks, method="blocks")
    got = evaluation.retrieval_metrics(x, y, ks=ks, method="device")
    worst = max(abs(got[k] - want[k]) for k in want)
    if worst > 1e-9:
        raise AssertionError(f"device {got} vs blocks {want}")
    return {"metrics": {k: round(v, 6) for k, v in got.items()},
            "max_abs_difference": float(np.float64(worst))}


def _clustered(n, d, classes, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = centres[y] + 0.9 * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), y


def _seed_config(name, *, batch, size, dtype):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.pretrained = ""
    config.model.dtype = dtype
    # Every step updates every parameter on both sides (no proxy-only first epoch).
    config.optimizer.warmup_epochs = 0
    config.data.batch_size = batch
    config.data.input_size = config.data.resize = size
    config.num_devices = 1
    return config


# -------------------------------------------------------------------------- train steps

def jax_train_step(config_name, *, batch, size, dtype, num_classes=100):
    """``(run, flops)``: one synchronized proxy_jax train step of the seed config on the
    default device, and XLA's FLOP count of the compiled step (None if it reports none)."""
    import jax
    import numpy as np

    from proxy_jax import methods, parallel

    config = _seed_config(config_name, batch=batch, size=size, dtype=dtype)
    mesh = parallel.make_mesh(1)
    plan = methods.get_method(config.method).setup(
        config, methods.create_model(config), num_classes=num_classes, steps_per_epoch=100)
    step = parallel.parallelize(plan.step_fn, mesh)
    rng = np.random.default_rng(0)
    batch_ = parallel.shard_batch({
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, num_classes, batch).astype(np.int32)}, mesh)
    holder = {"state": parallel.replicate(plan.state, mesh)}
    flops = None
    try:
        cost = step.lower(holder["state"], batch_).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001  (cost analysis is optional per backend)
        pass

    def run():
        holder["state"], metrics = step(holder["state"], batch_)
        jax.block_until_ready(metrics["loss"])
    return run, flops


def torch_train_step(config_name, *, batch, size, amp, channels_last, compile_,
                     num_classes=100):
    """One synchronized torch train step of the same recipe: the torchvision / Cadene backbone,
    GAP + GMP, a linear embedding, pytorch-metric-learning's ProxyAnchorLoss, AdamW with the
    config's groups, gradient values clipped as the config says, BatchNorm frozen (eval mode).
    A ViT config: timm's model (its drop path rate, training mode), its class token, the
    linear embedding only where ``embedding_dim`` > 0, gradients clipped by global norm.
    ``amp``: autocast to bfloat16 (the loss in float32)."""
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning import losses as pml_losses

    config = _seed_config(config_name, batch=batch, size=size, dtype="float32")
    device = _torch_device()
    torch.manual_seed(0)
    vit = config.model.backbone.startswith(("vit_", "deit_"))
    if vit:
        import timm

        net = timm.create_model(config.model.backbone, pretrained=False, num_classes=0,
                                img_size=size, drop_path_rate=config.model.drop_path_rate)
        features, width = _ClassToken(net), net.embed_dim
    elif config.model.backbone == "resnet50":
        import torchvision

        net = torchvision.models.resnet50()
        features, width = torch.nn.Sequential(*list(net.children())[:-2]), 2048
    else:
        import pretrainedmodels

        net = pretrainedmodels.bninception(pretrained=None)
        net.last_linear = torch.nn.Identity()
        features, width = _FeatureMap(net), 1024
    dim = config.model.embedding_dim or width
    embedding = (torch.nn.Linear(width, dim) if config.model.embedding_dim
                 else torch.nn.Sequential())  # an empty Sequential has no parameters
    loss_fn = pml_losses.ProxyAnchorLoss(num_classes, dim,
                                         margin=config.loss.margin, alpha=config.loss.alpha)
    features, embedding, loss_fn = features.to(device), embedding.to(device), loss_fn.to(device)
    if channels_last and not vit:
        features = features.to(memory_format=torch.channels_last)
    features.train(vit)  # frozen BatchNorm (no dropout in the CNNs); a ViT's drop path trains
    opt = torch.optim.AdamW(
        [{"params": features.parameters(), "lr": config.optimizer.backbone_lr},
         {"params": embedding.parameters(), "lr": config.optimizer.embedding_lr},
         {"params": loss_fn.parameters(), "lr": config.optimizer.proxy_lr}],
        eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay)
    clip, clip_norm = config.optimizer.grad_clip_value, config.optimizer.grad_clip_norm
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last and not vit:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def forward(images):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if vit:
                return embedding(features(images))
            fmap = features(images)
            pooled = F.adaptive_avg_pool2d(fmap, 1) + F.adaptive_max_pool2d(fmap, 1)
            return embedding(pooled.flatten(1))

    if compile_:
        forward = torch.compile(forward)
    params = [p for g in opt.param_groups for p in g["params"]]

    def run():
        loss = loss_fn(forward(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_value_(params, clip)
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        _torch_sync()
    return run


def _ClassToken(net):
    """A module whose forward is a timm ViT's class token after its final norm [B, C]."""
    import torch

    class ClassToken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net.forward_features(images)[:, 0]

    return ClassToken()


def _FeatureMap(net):
    """A module whose forward is ``net.features`` (Cadene's models expose it as a method)."""
    import torch

    class FeatureMap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net.features(images)

    return FeatureMap()


def section_train(sizes, report, deadline):
    rows = report.setdefault("train", [])
    ceiling = report.get("matmul", {})
    for config_name, batch_key, dtype in (DRY_TRAIN_ROWS if sizes is DRY else TRAIN_ROWS):
        batch, size = sizes[batch_key], sizes["image"]
        if time.perf_counter() > deadline:
            rows.append({"config": config_name, "dtype": dtype, "skipped": "budget"})
            continue
        jax_run, flops = jax_train_step(config_name, batch=batch, size=size, dtype=dtype)
        amp = dtype == "bfloat16"
        impls = {"proxy_jax": jax_run,
                 "torch": torch_train_step(config_name, batch=batch, size=size, amp=amp,
                                           channels_last=amp, compile_=False)}
        # torch.compile of the AMP step costs a minute of compiling: only for ResNet-50 on
        # the GPU, and only while time allows (the dry run leaves it out: minutes on a CPU).
        if (amp and "resnet50" in config_name and sizes is not DRY
                and time.perf_counter() < deadline - 150):
            try:
                impls["torch.compile"] = torch_train_step(
                    config_name, batch=batch, size=size, amp=True, channels_last=True,
                    compile_=True)
            except Exception as e:  # noqa: BLE001
                rows.append({"config": config_name, "torch.compile": f"failed: {e}"})
        try:
            timed = interleaved(impls, blocks=sizes["blocks"], reps=sizes["reps"])
        except Exception as e:  # noqa: BLE001  (torch.compile fails at its first call)
            impls.pop("torch.compile", None)
            rows.append({"config": config_name, "torch.compile": f"failed: {e}"[:300]})
            timed = interleaved(impls, blocks=sizes["blocks"], reps=sizes["reps"])
        row = {"config": config_name, "batch": batch, "size": size, "dtype": dtype,
               **{f"{k}_ms": round(v["ms"], 2) for k, v in timed.items()},
               **{f"{k}_first_ms": round(v["first_ms"]) for k, v in timed.items()}}
        row["torch_over_proxy_jax"] = round(timed["torch"]["ms"] / timed["proxy_jax"]["ms"], 3)
        if "torch.compile" in timed:
            row["compiled_torch_over_proxy_jax"] = round(
                timed["torch.compile"]["ms"] / timed["proxy_jax"]["ms"], 3)
        if flops:
            row["xla_tflops"] = round(flops / timed["proxy_jax"]["ms"] / 1e9, 1)
            if dtype in ceiling:
                row["of_matmul_ceiling"] = round(row["xla_tflops"] / ceiling[dtype]["tflops"],
                                                 3)
        rows.append(row)
        _write(report)


# ------------------------------------------------------------------------------ losses

def section_losses(sizes, report):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning import losses as pml_losses

    from proxy_jax.losses import proxy_anchor
    from proxy_jax.regularizers.memvir import memvir_init, memvir_norm_softmax, memvir_push
    from torch_references import TorchMemVir

    device = _torch_device()
    rows = report.setdefault("losses", [])
    rng = np.random.default_rng(0)

    # Proxy-Anchor at SOP scale: loss and gradients w.r.t. embeddings and proxies.
    b, c, d = sizes["pa_batch"], sizes["pa_classes"], 512
    x = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, c, b).astype(np.int32)
    p = rng.normal(size=(c, d)).astype(np.float32)
    grad = jax.jit(jax.value_and_grad(
        lambda x, p: proxy_anchor(x, jnp.asarray(y), p, margin=0.1, alpha=32.0), argnums=(0, 1)))
    jx, jp = jnp.asarray(x), jnp.asarray(p)
    ref = pml_losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=32).to(device)
    with torch.no_grad():
        ref.proxies.copy_(torch.tensor(p))
    tx = torch.tensor(x, device=device, requires_grad=True)
    ty = torch.tensor(y, dtype=torch.long, device=device)

    def torch_pa():
        tx.grad = ref.proxies.grad = None
        ref(tx, ty).backward()
        _torch_sync()

    timed = interleaved({"proxy_jax": lambda: jax.block_until_ready(grad(jx, jp)),
                         "torch": torch_pa}, blocks=sizes["blocks"], reps=sizes["reps"])
    with torch.no_grad():
        torch_loss = ref(tx, ty).item()
    rows.append(_loss_row(f"Proxy-Anchor B={b} C={c} D={d}", timed, float(grad(jx, jp)[0]),
                          torch_loss))
    _write(report)

    # MemVir Norm-SoftMax with a full memory: read, loss, gradients, push.
    mv = sizes["memvir"]
    n, m, b, c, d = (mv[k] for k in ("num_steps", "step_gap", "batch_size", "num_classes", "dim"))
    scale, capacity = 23.0, n * (m + 1)
    mem_x = rng.normal(size=(capacity, b, d)).astype(np.float32)
    mem_x /= np.linalg.norm(mem_x, axis=-1, keepdims=True)
    mem_y = rng.integers(0, c, size=(capacity, b))
    mem_p = (rng.uniform(-1, 1, size=(capacity, c, d)) / np.sqrt(d)).astype(np.float32)
    x = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, c, b)
    p = (rng.uniform(-1, 1, size=(c, d)) / np.sqrt(d)).astype(np.float32)
    push = jax.jit(memvir_push, donate_argnums=0)
    state = memvir_init(**mv, cache_loss="norm_softmax", cache_scale=scale)
    for t in range(capacity):
        state = push(state, jnp.asarray(mem_x[t]), jnp.asarray(mem_y[t], jnp.int32),
                     jnp.asarray(mem_p[t]))
    fused = lambda s, x, y, p: memvir_norm_softmax(s, x, y, p, scale=scale)
    jx, jy, jp = jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(p)
    jx_hat = jx / jnp.linalg.norm(jx, axis=1, keepdims=True)
    jax_loss = float(jax.jit(fused)(state, jx, jy, jp))
    mv_grad = jax.jit(jax.value_and_grad(fused, argnums=(1, 3)))
    holder = [state]

    def jax_memvir():
        value, grads = mv_grad(holder[0], jx, jy, jp)
        holder[0] = push(holder[0], jx_hat, jy, jp)
        jax.block_until_ready((value, grads, holder[0]))

    memory = TorchMemVir(n, m)
    for t in range(capacity):
        memory.push(torch.tensor(mem_x[t], device=device), torch.tensor(mem_y[t], device=device),
                    torch.tensor(mem_p[t].T.copy(), device=device))
    probe = TorchMemVir(n, m)
    probe.queue.extend(memory.queue)
    weight = torch.tensor(p.T.copy(), device=device, requires_grad=True)
    tx = torch.tensor(x, device=device, requires_grad=True)
    ty = torch.tensor(y, device=device)
    with torch.no_grad():
        torch_loss = float(probe.norm_softmax_step(F.normalize(tx, dim=1), ty, weight, scale))

    def torch_memvir():
        tx.grad = weight.grad = None
        memory.norm_softmax_step(F.normalize(tx, dim=1), ty, weight, scale).backward()
        _torch_sync()

    timed = interleaved({"proxy_jax": jax_memvir, "torch": torch_memvir},
                        blocks=sizes["blocks"], reps=sizes["reps"])
    rows.append(_loss_row(f"MemVir Norm-SoftMax N={n} M={m} B={b} C={c} (fused, cached)", timed,
                          jax_loss, torch_loss))
    _write(report)


def _loss_row(name, timed, jax_loss, torch_loss):
    return {"name": name, "proxy_jax_ms": round(timed["proxy_jax"]["ms"], 3),
            "torch_ms": round(timed["torch"]["ms"], 3),
            "torch_over_proxy_jax": round(timed["torch"]["ms"] / timed["proxy_jax"]["ms"], 2),
            "loss_relative_difference": abs(jax_loss - torch_loss) / max(abs(torch_loss), 1e-30)}


# -------------------------------------------------------------------------- evaluation

def section_evaluation(sizes, report, deadline):
    from proxy_jax import evaluation

    x, y = _clustered(sizes["eval_n"], sizes["eval_dim"], sizes["eval_classes"], seed=0)
    rows = report.setdefault("evaluation", [])
    results = {}
    for method in ("device", "faiss", "blocks"):
        if time.perf_counter() > deadline:
            rows.append({"method": method, "skipped": "budget"})
            continue
        times = []
        for _ in range(2):  # the first includes compiling ('device')
            t0 = time.perf_counter()
            results[method] = evaluation.retrieval_metrics(x, y, ks=sizes["eval_ks"],
                                                           method=method)
            times.append(time.perf_counter() - t0)
        rows.append({"method": method, "n": len(x), "dim": x.shape[1], "first_s": round(times[0], 2),
                     "seconds": round(times[1], 2),
                     "recall@1": round(results[method]["recall@1"], 6)})
        _write(report)
    if len(results) > 1:
        ref = next(iter(results.values()))
        report["evaluation_methods_agree"] = all(
            abs(r[k] - ref[k]) < 1e-9 for r in results.values() for k in ref)


# ------------------------------------------------------------------------------ report

_OUT = {}


def _write(report):
    """Writes the JSON and the markdown report (after every section: a cut run keeps them)."""
    out = _OUT["dir"]
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))


def markdown(report) -> str:
    lines = ["# proxy_jax GPU check", ""]
    env = report.get("env", {})
    if env:
        lines += [f"Device: {env.get('device_kind')} ({env.get('backend')}); "
                  + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()), ""]
    if report.get("matmul"):
        lines += ["| matmul | n | TFLOP/s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {v['tflops']:.1f} |" for k, v in report["matmul"].items()]
        lines.append("")
    if report.get("checks"):
        lines += ["| check | ok | detail |", "|---|---|---|"]
        for name, c in report["checks"].items():
            detail = c.get("summary") or c.get("error") or {
                k: v for k, v in c.items() if k not in ("ok", "traceback")}
            lines.append(f"| {name} | {'yes' if c.get('ok') else 'NO'} | {detail} |")
        lines.append("")
    if report.get("train"):
        lines += ["| train step | dtype | batch | proxy_jax ms | torch ms | torch / proxy_jax "
                  "| torch.compile / proxy_jax | XLA TFLOP/s | of matmul ceiling |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["train"]:
            if "proxy_jax_ms" not in r:
                lines.append(f"| {r.get('config')} | {r.get('dtype', '')} | | | | | "
                             f"{r.get('torch.compile', r.get('skipped', ''))} | | |")
                continue
            lines.append(f"| {r['config']} | {r['dtype']} | {r['batch']} | {r['proxy_jax_ms']} | "
                         f"{r['torch_ms']} | {r['torch_over_proxy_jax']}× | "
                         f"{r.get('compiled_torch_over_proxy_jax', '')} | "
                         f"{r.get('xla_tflops', '')} | {r.get('of_matmul_ceiling', '')} |")
        lines.append("")
    if report.get("losses"):
        lines += ["| loss step | proxy_jax ms | torch ms | torch / proxy_jax | loss rel. diff |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['proxy_jax_ms']} | {r['torch_ms']} | "
                  f"{r['torch_over_proxy_jax']}× | {r['loss_relative_difference']:.1e} |"
                  for r in report["losses"]]
        lines.append("")
    if report.get("evaluation"):
        lines += ["| evaluation (all-vs-all) | n × d | first s | s | Recall@1 |",
                  "|---|---|---:|---:|---:|"]
        for r in report["evaluation"]:
            if "seconds" in r:
                lines.append(f"| {r['method']} | {r['n']} × {r['dim']} | {r['first_s']} | "
                             f"{r['seconds']} | {r['recall@1']} |")
            else:
                lines.append(f"| {r['method']} | skipped ({r['skipped']}) | | | |")
        lines.append("")
    if report.get("errors"):
        lines += ["Errors:", ""] + [f"- {k}: {v.splitlines()[-1] if v else ''}"
                                    for k, v in report["errors"].items()] + [""]
    lines.append(f"Total {report.get('seconds', '?')} s; skipped: {report.get('skipped', [])}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    # JAX and torch share the device: both allocate on demand (JAX would take 75% up front),
    # and so do the pytest and main.py processes started from here.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from proxy_jax import xla_flags

    xla_flags.apply_cpu_flags()  # as main.py (CPU-only flags: the dry run checks what it runs)
    sizes = DRY if args.dry_run else FULL
    if args.dry_run:
        os.environ["GPU_CHECK_DRY"] = "1"
    os.makedirs(args.out, exist_ok=True)
    _OUT["dir"] = args.out
    wanted = None if args.sections == "all" else set(args.sections.split(","))
    start = time.perf_counter()
    deadline = start + args.budget_s
    report = {"dry_run": args.dry_run, "skipped": [], "errors": {}}
    sections = [("env", lambda: section_env(sizes, report)),
                ("matmul", lambda: section_matmul(sizes, report)),
                ("checks", lambda: section_checks(sizes, report, args.out)),
                ("losses", lambda: section_losses(sizes, report)),
                ("evaluation", lambda: section_evaluation(sizes, report, deadline)),
                ("train", lambda: section_train(sizes, report, deadline))]
    for name, run in sections:
        if wanted is not None and name not in wanted:
            continue
        if time.perf_counter() > deadline:
            report["skipped"].append(name)
            continue
        t0 = time.perf_counter()
        try:
            run()
        except Exception:  # noqa: BLE001  (one failed section must not lose the others)
            report["errors"][name] = traceback.format_exc()[-3000:]
        report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        report["seconds"] = round(time.perf_counter() - start, 1)
        _write(report)
        print(f"[gpu_check] {name}: {report['section_seconds'][name]} s", flush=True)
    print(markdown(report))
    failed = report["errors"] or not all(
        c.get("ok") for c in report.get("checks", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
