"""Proxy-Anchor on CUB-200-2011 with ResNet-50, 512-d.

Seed command (tjddus9597/Proxy-Anchor-CVPR2020 README, CUB-200-2011, ResNet-50)::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model resnet50 \
    --embedding-size 512 --batch-size 120 --lr 1e-4 --dataset cub \
    --warm 5 --bn-freeze 1 --lr-decay-step 5

Everything else as cub200_proxy_anchor_bn_inception (ResNet-50 takes RGB ImageNet-normalized
input). Published (README): Recall@1 69.9 (R@2 79.6, R@4 86.6, R@8 91.4).
"""

from configs import cub200_proxy_anchor_bn_inception


def get_config():
    config = cub200_proxy_anchor_bn_inception.get_config()
    config.name = "cub200_proxy_anchor_resnet50"
    config.model.backbone = "resnet50"
    config.model.bn_momentum = 0.1  # torchvision's resnet50: torch's default momentum
    config.model.pretrained = "resnet50.npz"  # python -m proxy_jax.convert --arch resnet50
    config.data.batch_size = 120
    config.data.eval_batch_size = 120
    config.optimizer.warmup_epochs = 5
    config.optimizer.decay_step = 5
    return config
