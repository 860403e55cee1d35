"""Default: Norm-SoftMax on the embedded data set with the tiny CNN (no download, 2 CPU cores).

The out-of-the-box run of ``python main.py``: it writes the embedded data set (procedural
32×32 images of 100 train and 100 disjoint test classes, see ``proxy_jax.data.embedded``)
to ``~/.cache/proxy_jax/embedded`` on first use, trains ``tiny_cnn`` from scratch with
Norm-SoftMax and evaluates zero-shot retrieval on the unseen test classes.

Run:
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/python main.py

Not a published experiment: the seed recipes (configs named after data set, method and
loss) need ImageNet-pretrained backbones and a GPU.
"""

from proxy_jax import config_utils


def get_config():
    config = config_utils.base_config()
    config.name = "default"
    config.seed = 0
    config.num_epochs = 16
    config.log_every_steps = 20

    config.data.dataset = "embedded"
    config.data.root = ""  # ~/.cache/proxy_jax/embedded
    config.data.input_size = 32
    config.data.resize = 32
    config.data.batch_size = 64
    config.data.n_instance = 1
    config.data.num_workers = 2
    config.data.eval_batch_size = 256

    config.model.backbone = "tiny_cnn"
    config.model.embedding_dim = 64
    config.model.pooling = "gap+gmp"
    config.model.freeze_bn = False  # trained from scratch: BatchNorm learns its statistics

    config.loss.name = "norm_softmax"
    config.loss.scale = 16.0

    config.optimizer.name = "adam"
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 1e-4
    config.optimizer.backbone_lr = 2e-3
    config.optimizer.embedding_lr = 2e-3
    config.optimizer.proxy_lr = 1e-2
    config.optimizer.schedule = "step_decay"
    config.optimizer.decay_rate = 0.1
    config.optimizer.decay_step = 12
    config.optimizer.decay_stop = 12

    config.eval.every_epochs = 4
    config.eval.ks = (1, 2, 4, 8)
    config.eval.nmi = True
    return config
