"""PS + Proxy-NCA on Cars196: Proxy Synthesis (α 0.4, μ 1.0) on cars196_proxy_nca.

Seed command (navervision/proxy-synthesis README, "PS + Proxy-NCA")::

  python main.py --gpu=0 --save_path=./logs/CARS196_PS_proxy_nca \
    --data=./dataset/carDB --data_name=cars196 \
    --dim=512 --batch_size=128 --epochs=130 \
    --freeze_BN --loss=Proxy_NCA \
    --decay_step=50 --decay_stop=50 --n_instance=1 \
    --scale=12.0 --check_epoch=5 \
    --ps_alpha=0.40 --ps_mu=1.0

Published: Recall@1 84.21 ± 0.21 (8 runs).
"""

from configs import cars196_proxy_nca


def get_config():
    config = cars196_proxy_nca.get_config()
    config.name = "cars196_ps_proxy_nca"
    config.regularizer.name = "ps"
    config.regularizer.ps_alpha = 0.4
    config.regularizer.ps_mu = 1.0
    return config
