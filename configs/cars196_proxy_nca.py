"""Proxy-NCA on Cars196 (Proxy Synthesis repository, BN-Inception, 512-d).

Seed command (navervision/proxy-synthesis README, "Proxy-NCA"; same in the MemVir README)::

  python main.py --gpu=0 --save_path=./logs/CARS196_proxy_nca \
    --data=./dataset/carDB --data_name=cars196 \
    --dim=512 --batch_size=128 --epochs=130 \
    --freeze_BN --loss=Proxy_NCA \
    --decay_step=50 --decay_stop=50 --n_instance=1 \
    --scale=12.0 --check_epoch=5

All other settings as cars196_norm_softmax. Published: Recall@1 83.28 ± 0.36 (8 runs; the
MemVir README reports 83.49 ± 0.29 over 5).
"""

from configs import cars196_norm_softmax


def get_config():
    config = cars196_norm_softmax.get_config()
    config.name = "cars196_proxy_nca"
    config.loss.name = "proxy_nca"
    config.loss.scale = 12.0
    return config
