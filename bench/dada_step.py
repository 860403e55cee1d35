"""DADA's train step beside the plain Proxy-Anchor step, in proxy_jax and in official PyTorch.

Both sides: ResNet-50 (BatchNorm frozen) → GAP + GMP → linear 512, CUB-200 shapes (100
classes, batches of 2 images per class).

* **PA**: the plain Proxy-Anchor step (l2-normalized head, α 32, δ 0.1, AdamW, proxies at
  100 × lr). proxy_jax: the proxy method's step (``proxy_jax.methods.proxy``); torch: a
  transcription of the loss.
* **DADA**: the ``dada_cub200`` recipe (LayerNorm head, pos_class_mix, fd2_bn, fc2_bn,
  d_step 3, g_step 1, three Adam optimizers), after the warm-ups. proxy_jax:
  ``proxy_jax.methods.dada.train_step``; torch: the official loop of Noahsark/DADA ``main.py`` with its
  ``criteria/dadaproxy.Criterion`` imported unchanged from ``--official`` (a clone of
  github.com/Noahsark/DADA; the torch DADA row is skipped without it). Per batch the
  official loop runs the network once under ``no_grad`` (the discriminators' input), then
  once more with gradients for the generator update; proxy_jax runs it once
  (``jax.vjp``, its pull-back reused by the generator update).
* **forward**: the network's forward alone (no gradient), i.e. what the official extra
  pass costs and proxy_jax saves.

Method as bench/train_step.py: the implementations alternate in blocks (``--steps`` steps
each); per block the median is kept unless the machine was busy (process CPU time below
``--min_cpu_share`` of threads × wall, or the 1-minute load above threads + 1); same
threads for both (``--threads`` pins the process; torch.set_num_threads).

  python bench/dada_step.py                                   # batch 16, 128², ~3 min on 2 cores
  python bench/dada_step.py --official /path/to/Noahsark+DADA --batch 90 --size 224
"""

import argparse
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train_step import timed_blocks  # noqa: E402  (bench/ is on sys.path when run)
NUM_CLASSES = 100


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per block and implementation")
    p.add_argument("--min_cpu_share", type=float, default=0.7)
    p.add_argument("--official", default=os.path.join(os.path.dirname(ROOT), "scratch",
                                                      "Noahsark+DADA"),
                   help="a clone of github.com/Noahsark/DADA (for the torch DADA row)")
    return p.parse_args()


def _batch(args):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = np.repeat(rng.permutation(NUM_CLASSES)[:args.batch // 2], 2).astype(np.int32)
    return images, labels


# ------------------------------------------------------------------------------ proxy_jax

def _jax_config(args, dada_recipe):
    from configs import cub200_proxy_anchor_resnet50, dada_cub200

    if dada_recipe:
        config = dada_cub200.get_config()
        config.dada.d_warmup_epochs = 0  # time the full step, not the warm-up
    else:
        config = cub200_proxy_anchor_resnet50.get_config()
        config.model.embedding_dim = 512
    config.optimizer.warmup_epochs = 0
    config.model.backbone, config.model.pretrained = "resnet50", ""
    config.model.pooling = "gap+gmp"
    config.data.input_size = config.data.resize = args.size
    config.data.batch_size = args.batch
    config.num_devices = 1
    return config


def _plan(config, mesh):
    """The model and the data-parallel step of ``config``'s method, as ``train.build`` makes
    them (without data: the batch is random)."""
    from proxy_jax import methods, parallel

    method = methods.get_method(config.method)
    model = methods.create_model(config, **method.model_overrides(config))
    plan = method.setup(config, model, num_classes=NUM_CLASSES, steps_per_epoch=100)
    return model, plan, parallel.parallelize(plan.step_fn, mesh)


def _jax_steps(args):
    import jax
    import numpy as np

    from proxy_jax import parallel
    from proxy_jax.methods import network_params

    mesh = parallel.make_mesh(1)
    images, labels = _batch(args)
    batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
    steps, holder = {}, {}

    # Plain Proxy-Anchor.
    _, plan, pa = _plan(_jax_config(args, dada_recipe=False), mesh)
    holder["pa"] = parallel.replicate(plan.state, mesh)

    def run_pa():
        holder["pa"], metrics = pa(holder["pa"], batch)
        jax.block_until_ready(metrics["loss"])
    steps["PA"] = run_pa

    # DADA.
    model, plan, dada = _plan(_jax_config(args, dada_recipe=True), mesh)
    # A copy: the state is donated to the step.
    variables = jax.device_get({"params": network_params(plan.state.params),
                                "batch_stats": plan.state.batch_stats})
    holder["dada"] = parallel.replicate(plan.state, mesh)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True))

    def run_dada():
        holder["dada"], metrics = dada(holder["dada"], batch)
        jax.block_until_ready(metrics["loss"])
        assert np.isfinite(float(metrics["gen_loss"])) and float(metrics["gen_loss"]) != 0.0

    def run_forward():
        jax.block_until_ready(forward(variables, batch["image"]))
    steps["DADA"] = run_dada
    steps["forward"] = run_forward
    return steps


# ---------------------------------------------------------------------------------- torch

class _TorchNet:
    """torchvision ResNet-50 (BatchNorm frozen) → GAP + GMP → Linear(2048, 512) → head."""

    def __init__(self, head):
        import torch
        import torchvision

        resnet = torchvision.models.resnet50()
        self.body = torch.nn.Sequential(*list(resnet.children())[:-2])
        for m in self.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        self.linear = torch.nn.Linear(2048, 512)
        self.head = head

    def parameters(self):
        return list(self.body.parameters()) + list(self.linear.parameters())

    def __call__(self, x):
        f = self.body(x)
        return self.head(self.linear(f.mean((2, 3)) + f.amax((2, 3))))


def _torch_steps(args):
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    images, labels = _batch(args)
    x = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.long)
    steps = {}

    # Plain Proxy-Anchor (transcribed: logsumexp with a zero appended, as proxy_jax).
    net = _TorchNet(lambda z: F.normalize(z, dim=1))
    proxies = torch.nn.Parameter(torch.randn(NUM_CLASSES, 512) * (2.0 / NUM_CLASSES) ** 0.5)
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": 1e-4},
                             {"params": [proxies], "lr": 1e-2}], weight_decay=1e-4)

    def run_pa():
        cos = net(x) @ F.normalize(proxies, dim=1).T
        pos = F.one_hot(y, NUM_CLASSES).bool()
        zero = torch.zeros(1, NUM_CLASSES)
        pos_lse = torch.logsumexp(torch.cat([torch.where(pos, -32 * (cos - 0.1), -torch.inf),
                                             zero]), 0)
        neg_lse = torch.logsumexp(torch.cat([torch.where(~pos, 32 * (cos + 0.1), -torch.inf),
                                             zero]), 0)
        with_pos = pos.any(0)
        loss = pos_lse[with_pos].sum() / with_pos.sum() + neg_lse.sum() / NUM_CLASSES
        opt.zero_grad()
        loss.backward()
        opt.step()
    steps["PA"] = run_pa

    lnorm = torch.nn.LayerNorm(512, elementwise_affine=False)
    dnet = _TorchNet(lnorm)

    def run_forward():
        with torch.no_grad():
            dnet(x)
    steps["forward"] = run_forward

    if not os.path.isdir(os.path.join(args.official, "criteria")):
        print(f"no official DADA clone at {args.official}: torch DADA row skipped")
        return steps
    sys.path.insert(0, args.official)
    from criteria import dadaproxy  # the official criterion, unchanged

    # parameters.py defaults + configs/cub200.yaml.
    opt_ns = types.SimpleNamespace(
        n_classes=NUM_CLASSES, embed_dim=512, mix_alpha=3.0, mix_beta=0.5,
        loss_oproxy_pos_alpha=40.0, loss_oproxy_neg_alpha=100.0, loss_oproxy_pos_delta=0.1,
        loss_oproxy_neg_delta=-0.1, proxy_init_mode="norm", loss_adv_proxy_lr=0.04,
        active_func="relu", dropout=0.5, fd_fc1_dim=512, fc_fc1_dim=512, fc_fc2_dim=128,
        fd2_bn=True, fc2_bn=True, loss_adv_classifier_lr=5e-4, dis_decay=4e-4,
        mix_mode="random", pos_class_mix=True, samples_per_class=2, device=torch.device("cpu"),
        oproxy_ratio=0.0075, dis_gamma=1.0, d_dis_ratio=0.005, d_discrepancy_ratio=0.5,
        normal=True, mix_extension=False, shift_scale=1.0, dis_mode="nwd", save_results=False,
        proxy_dim=0)
    criterion = dadaproxy.Criterion(opt_ns)
    criterion.train()
    optimizer = torch.optim.Adam([{"params": dnet.parameters(), "lr": 1.2e-4,
                                   "weight_decay": 1e-4}])
    dis_optimizer = torch.optim.Adam(criterion.dis_optim_dict_list)
    proxy_optimizer = torch.optim.Adam(criterion.proxy_optim_dict_list)

    def run_dada():  # the official main.py loop body, d_step 3, g_step 1, after warm-up
        with torch.no_grad():
            emb = dnet(x)
        for _ in range(3):
            dis_optimizer.zero_grad()
            criterion.discriminator_forward(batch=emb, labels=y).backward()
            dis_optimizer.step()
        optimizer.zero_grad()
        proxy_optimizer.zero_grad()
        emb = dnet(x)
        loss = criterion(batch=emb, labels=y, batch_t=emb)
        loss.backward()
        proxy_optimizer.step()
        optimizer.step()
        assert np.isfinite(float(loss.detach()))
    steps["DADA"] = run_dada
    return steps


if __name__ == "__main__":
    args = _parse()
    if args.batch % 2:
        raise ValueError(f"--batch must be even (2 images per class), got {args.batch}")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    import torch

    torch.set_num_threads(args.threads)
    import jax

    print(f"devices: {jax.devices()}  threads: {args.threads}  batch {args.batch}, "
          f"{args.size}x{args.size}; load {os.getloadavg()}")
    impls = {f"proxy_jax {k}": v for k, v in _jax_steps(args).items()}
    impls.update({f"torch {k}": v for k, v in _torch_steps(args).items()})
    med, note, dropped = timed_blocks(impls, args)

    def cell(side, what):
        return f"{med[f'{side} {what}']:.3f}" if f"{side} {what}" in med else "n/a"

    def ratio(side, num, den):
        a, b = f"{side} {num}", f"{side} {den}"
        return f"{med[a] / med[b]:.2f}×" if a in med and b in med else "n/a"

    print()
    print(f"| ResNet-50, batch {args.batch}, {args.size}², CPU {args.threads} threads "
          "| proxy_jax s/step | torch s/step |")
    print("|---|---|---|")
    print(f"| Proxy-Anchor step | {cell('proxy_jax', 'PA')} | {cell('torch', 'PA')} |")
    print(f"| DADA step (d_step 3, g_step 1) | {cell('proxy_jax', 'DADA')} | "
          f"{cell('torch', 'DADA')} |")
    print(f"| network forward alone (the official extra pass) | "
          f"{cell('proxy_jax', 'forward')} | {cell('torch', 'forward')} |")
    print(f"| DADA / Proxy-Anchor | {ratio('proxy_jax', 'DADA', 'PA')} | "
          f"{ratio('torch', 'DADA', 'PA')} |")
    print("| forwards per DADA step | 1 (vjp reused) | 2 (no_grad + grad) |")
    print(f"blocks kept {args.blocks - dropped}/{args.blocks}{note}; load {os.getloadavg()}")
