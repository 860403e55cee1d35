"""Proxy-Anchor on CUB-200-2011 with BN-Inception, 512-d (the base of every Proxy-Anchor config).

Seed command (tjddus9597/Proxy-Anchor-CVPR2020 README, CUB-200-2011, Inception-BN)::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model bn_inception \
    --embedding-size 512 --batch-size 180 --lr 1e-4 --dataset cub \
    --warm 1 --bn-freeze 1 --lr-decay-step 10

Defaults of its code/train.py that the command keeps: 60 epochs, AdamW (weight decay 1e-4,
PyTorch's eps 1e-8), lr-decay-gamma 0.5 (StepLR per epoch), α 32, δ (mrg) 0.1, random
sampling with drop_last (no --IPC), l2-normalized output, evaluation every epoch with
Recall@{1,2,4,8,16,32}. Parameter groups: backbone and embedding at lr, proxies at 100·lr;
gradients clipped element-wise at 10 (clip_grad_value_) on all of them. Pooling GAP+GMP
(summed); embedding layer kaiming_normal(fan_out), bias 0; proxies [C, D]
kaiming_normal(mode='fan_out'), whose fan is C. ``--warm 1``: the first epoch trains only
the embedding layer and the proxies. ``--bn-freeze 1`` keeps BatchNorm in inference mode;
it also sets requires_grad=False on the BatchNorm affine parameters, but the warm-up switch
turns requires_grad back on for every backbone parameter after the warm-up, so they train
from epoch ``warm`` on (freeze_bn_affine=False reproduces that). Its own BN-Inception
(``code/net/bn_inception.py``) builds every BatchNorm with torch ``momentum=0.9``:
bn_momentum 0.9 (it matters where BatchNorm trains: the SOP and In-shop commands).

Published (README): Recall@1 69.1 (R@2 78.9, R@4 86.1, R@8 91.2).
"""

from proxy_jax import config_utils


def get_config():
    config = config_utils.base_config()
    config.name = "cub200_proxy_anchor_bn_inception"
    config.num_epochs = 60
    config.log_every_steps = 10

    config.data.dataset = "cub200"
    config.data.root = "./data/CUB_200_2011"
    config.data.input_size = 224
    config.data.resize = 256
    config.data.batch_size = 180
    config.data.n_instance = 1
    config.data.num_workers = 4
    config.data.eval_batch_size = 180

    config.model.backbone = "bn_inception"
    config.model.embedding_dim = 512
    config.model.pooling = "gap+gmp"
    config.model.l2_normalize = True
    config.model.freeze_bn = True
    config.model.bn_momentum = 0.9  # code/net/bn_inception.py: nn.BatchNorm2d(..., momentum=0.9)
    config.model.freeze_bn_affine = False
    config.model.embedding_init = "kaiming_fan_out"
    config.model.pretrained = "bn_inception.npz"  # python -m proxy_jax.convert --arch bn_inception

    config.loss.name = "proxy_anchor"
    config.loss.alpha = 32.0
    config.loss.margin = 0.1
    config.loss.proxy_init = "kaiming_normal"
    config.loss.proxy_init_fan = "classes"

    config.optimizer.name = "adamw"
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 1e-4
    config.optimizer.backbone_lr = 1e-4
    config.optimizer.embedding_lr = 1e-4
    config.optimizer.proxy_lr = 1e-2  # 100 × lr
    config.optimizer.schedule = "step_lr"
    config.optimizer.decay_rate = 0.5
    config.optimizer.decay_step = 10
    config.optimizer.warmup_epochs = 1
    config.optimizer.grad_clip_value = 10.0

    config.eval.every_epochs = 1
    config.eval.ks = (1, 2, 4, 8, 16, 32)
    return config
