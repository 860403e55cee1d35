"""Norm-SoftMax on Cars196 (Proxy Synthesis repository, BN-Inception, 512-d).

Seed command (navervision/proxy-synthesis README, "Norm-SoftMax"; the MemVir README has the
same command)::

  python main.py --gpu=0 --save_path=./logs/CARS196_norm_softmax \
    --data=./dataset/carDB --data_name=cars196 \
    --dim=512 --batch_size=128 --epochs=130 \
    --freeze_BN --loss=Norm_SoftMax \
    --decay_step=50 --decay_stop=50 --n_instance=1 \
    --scale=23.0 --check_epoch=5

Defaults of its main.py that the command keeps: backbone bninception, pooling GAP, Adam
(eps 0.01, weight decay 1e-4), model lr 1e-4 (backbone and embedding), proxy lr 1e-2,
decay rate 0.1, input 224 (RandomResizedCrop + flip; test Resize 256 + CenterCrop 224), no
warm-up, no gradient clipping, Recall@{1,2,4,8}. Proxies [C, D] kaiming_uniform(a=√5)
(fan = D); embedding layer torch.nn.Linear's default init. Learning rates ×0.1 from
(1-based) epoch 50 on. The train loader shuffles without ``drop_last`` (utils/custom_loader.py),
so an epoch of Cars196's 8,054 images is 63 Adam steps, the last of 118 images
(``data.drop_last=False``: padded to 128 and masked).

Published: Recall@1 83.08 ± 0.21 (8 runs; the MemVir README reports 83.22 ± 0.12 over 5).

Run: python main.py --config=configs/cars196_norm_softmax.py --config.data.root=/data/carDB \
       --config.model.pretrained=bn_inception.npz
"""

from proxy_jax import config_utils


def get_config():
    config = config_utils.base_config()
    config.name = "cars196_norm_softmax"
    config.num_epochs = 130
    config.log_every_steps = 10

    config.data.dataset = "cars196"
    config.data.root = "./dataset/carDB"
    config.data.input_size = 224
    config.data.resize = 256
    config.data.batch_size = 128
    config.data.n_instance = 1
    config.data.num_workers = 5
    config.data.eval_batch_size = 128
    config.data.drop_last = False  # torch DataLoader(shuffle=True), no drop_last

    config.model.backbone = "bn_inception"
    config.model.embedding_dim = 512
    config.model.pooling = "gap"
    config.model.freeze_bn = True
    config.model.embedding_init = "torch_default"
    config.model.pretrained = "bn_inception.npz"  # python -m proxy_jax.convert --arch bn_inception

    config.loss.name = "norm_softmax"
    config.loss.scale = 23.0
    config.loss.proxy_init = "kaiming_uniform"
    config.loss.proxy_init_fan = "dim"

    config.optimizer.name = "adam"
    config.optimizer.eps = 0.01
    config.optimizer.weight_decay = 1e-4
    config.optimizer.backbone_lr = 1e-4
    config.optimizer.embedding_lr = 1e-4
    config.optimizer.proxy_lr = 1e-2
    config.optimizer.schedule = "step_decay"
    config.optimizer.decay_rate = 0.1
    config.optimizer.decay_step = 50
    config.optimizer.decay_stop = 50
    config.optimizer.warmup_epochs = 0
    config.optimizer.grad_clip_value = 0.0

    config.eval.every_epochs = 5
    config.eval.ks = (1, 2, 4, 8)
    return config
