"""Proxy-Anchor on Stanford Online Products with ResNet-50, 512-d (no official command).

The Proxy-Anchor README gives no ResNet-50 command for SOP and publishes no ResNet-50 SOP
number. This config is the SOP BN-Inception command with only the model changed::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model resnet50 \
    --embedding-size 512 --batch-size 180 --lr 6e-4 --dataset SOP \
    --warm 1 --bn-freeze 0 --lr-decay-step 20 --lr-decay-gamma 0.25

Published: none in the official README.
"""

from configs import sop_proxy_anchor_bn_inception


def get_config():
    config = sop_proxy_anchor_bn_inception.get_config()
    config.name = "sop_proxy_anchor_resnet50"
    config.model.backbone = "resnet50"
    config.model.bn_momentum = 0.1  # torchvision's resnet50: torch's default momentum
    config.model.pretrained = "resnet50.npz"  # python -m proxy_jax.convert --arch resnet50
    return config
