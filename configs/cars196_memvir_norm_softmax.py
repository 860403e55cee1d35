"""MemVir + Norm-SoftMax on Cars196 (MemVir repository, BN-Inception, 512-d).

Seed command (navervision/MemVir README, "MemVir + Norm-SoftMax")::

  python main.py --gpu=0 --save_path=./logs/CARS196_memvir_norm_softmax \
    --data=./dataset/carDB --data_name=cars196 \
    --dim=512 --batch_size=128 --epochs=2000 \
    --freeze_BN --loss=NormSoftmax \
    --decay_step=2000 --decay_stop=2000 --n_instance=1 \
    --scale=23.0 --check_epoch=10 --memvir=1 \
    --mem_num_step=45 --mem_step_gap=10 --warm_epoch=40

MemVir with N = 45 virtual steps M = 10 steps apart, memory used after 40 warm-up epochs
(0-based epoch 40 on). MemVir's own defaults differ from Proxy Synthesis' in one place that
matters here: its NormSoftmax weight is stored [D, C], so kaiming_uniform(a=√5) takes C as
the fan (proxy_init_fan='classes'). The embedding is l2-normalized before the loss
(train_with_l2norm=True). Learning rates ×0.1 only in the last (1-based 2000th) epoch.

Published: Recall@1 86.11 ± 0.19 (5 runs).
"""

from configs import cars196_norm_softmax


def get_config():
    config = cars196_norm_softmax.get_config()
    config.name = "cars196_memvir_norm_softmax"
    config.num_epochs = 2000
    config.optimizer.decay_step = 2000
    config.optimizer.decay_stop = 2000
    config.eval.every_epochs = 10
    config.loss.proxy_init = "kaiming_uniform"
    config.loss.proxy_init_fan = "classes"
    config.regularizer.name = "memvir"
    config.regularizer.memvir_num_steps = 45
    config.regularizer.memvir_step_gap = 10
    config.regularizer.memvir_warm_epochs = 40
    return config
