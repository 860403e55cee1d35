"""SoftTriple on Cars196 (Qian et al., ICCV 2019; BN-Inception, K = 10 centres per class).

Seed command (idstcv/SoftTriple README, "Learn 64-dimensional embeddings")::

  python train.py --gpu 0 --dim 64 -C 98 --freeze_BN [folder with train and test folders]

Defaults of its train.py that the command keeps: BN-Inception (BGR, 0-255, mean
[104, 117, 128]), GAP, a linear embedding, l2-normalized output; SoftTriple λ (--la) 20,
γ 0.1, τ 0.2, δ (--margin) 0.01, K 10; the centres a [D, C·K] tensor with
kaiming_uniform(a=√5), i.e. U(±1/√(C·K)) (``proxy_init_fan='classes'``); Adam (eps 0.01,
weight decay 1e-4 on every parameter, centres included), model lr 1e-4, centre lr 1e-2,
every rate ×0.1 at the start of 0-based epochs 19 and 39 (``adjust_learning_rate``:
``(epoch + 1) % 20 == 0``, our 'step_decay' with decay_step 20 and no stop); batch 32,
plain shuffling, 50 epochs; RandomResizedCrop(224) + flip, test Resize(256) +
CenterCrop(224); one evaluation, after the last epoch, Recall@{1,2,4,8} and NMI. Its train loader shuffles
without ``drop_last`` (train.py:106-107): 252 steps per Cars196 epoch, the last of 22
images (``data.drop_last=False``, inherited).

Published (the paper's Cars196 table, BN-Inception): Recall@1 78.6 at 64-d and 84.5 at
512-d (``--config.model.embedding_dim=512``). These are quoted from the paper; no copy of
it could be read here to re-check them.

The Proxy Synthesis code base (configs/cars196_norm_softmax.py) grew out of this train.py,
so this config is that one with SoftTriple's differences: the loss, 64-d, batch 32, 50
epochs, ×0.1 every 20 epochs, one evaluation at the end.

Run: python main.py --config=configs/cars196_soft_triple.py --config.data.root=/data/carDB \
       --config.model.pretrained=bn_inception.npz
"""

from configs import cars196_norm_softmax


def get_config():
    config = cars196_norm_softmax.get_config()
    config.name = "cars196_soft_triple"
    config.num_epochs = 50
    config.log_every_steps = 20

    config.data.batch_size = 32
    config.data.num_workers = 2
    config.data.eval_batch_size = 32
    config.model.embedding_dim = 64

    config.loss.name = "soft_triple"
    config.loss.centers_per_class = 10
    config.loss.la = 20.0
    config.loss.gamma = 0.1
    config.loss.tau = 0.2
    config.loss.delta = 0.01
    config.loss.proxy_init_fan = "classes"

    config.optimizer.decay_step = 20
    config.optimizer.decay_stop = -1

    config.eval.every_epochs = 50  # the official script evaluates once, at the end
    config.eval.nmi = True
    return config
