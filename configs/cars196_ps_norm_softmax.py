"""PS + Norm-SoftMax on Cars196: Proxy Synthesis (α 0.4, μ 1.0) on cars196_norm_softmax.

Seed command (navervision/proxy-synthesis README, "PS + Norm-SoftMax")::

  python main.py --gpu=0 --save_path=./logs/CARS196_PS_norm_softmax \
    --data=./dataset/carDB --data_name=cars196 \
    --dim=512 --batch_size=128 --epochs=130 \
    --freeze_BN --loss=Norm_SoftMax \
    --decay_step=50 --decay_stop=50 --n_instance=1 \
    --scale=23.0 --check_epoch=5 \
    --ps_alpha=0.40 --ps_mu=1.0

Every batch is reordered so that neighbouring labels differ (as the official loop does)
before the synthesis. Published: Recall@1 84.25 ± 0.31 (8 runs).
"""

from configs import cars196_norm_softmax


def get_config():
    config = cars196_norm_softmax.get_config()
    config.name = "cars196_ps_norm_softmax"
    config.regularizer.name = "ps"
    config.regularizer.ps_alpha = 0.4
    config.regularizer.ps_mu = 1.0
    return config
