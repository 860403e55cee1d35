"""Proxy-Anchor on Cars196 with ResNet-50, 512-d.

Seed command (tjddus9597/Proxy-Anchor-CVPR2020 README, Cars-196, ResNet-50)::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model resnet50 \
    --embedding-size 512 --batch-size 120 --lr 1e-4 --dataset cars \
    --warm 5 --bn-freeze 1 --lr-decay-step 10

Published (README): Recall@1 87.7 (R@2 92.7, R@4 95.5, R@8 97.3).
"""

from configs import cars196_proxy_anchor_bn_inception


def get_config():
    config = cars196_proxy_anchor_bn_inception.get_config()
    config.name = "cars196_proxy_anchor_resnet50"
    config.model.backbone = "resnet50"
    config.model.bn_momentum = 0.1  # torchvision's resnet50: torch's default momentum
    config.model.pretrained = "resnet50.npz"  # python -m proxy_jax.convert --arch resnet50
    config.data.batch_size = 120
    config.data.eval_batch_size = 120
    config.optimizer.warmup_epochs = 5
    config.optimizer.decay_step = 10
    return config
