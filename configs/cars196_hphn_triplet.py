"""HPHN triplet on Cars196 with GoogLeNet, 512-d (Embedding Expansion repository, no EE).

Seed command (clovaai/embedding-expansion README, "HPHN-triplet (n_inner_points=0)")::

  python3 main.py --gpu_idx=0 --data_name=cars196 \
    --backbone=googlenet --embed_dim=512 \
    --loss=hphn_triplet --n_inner_pts=0 --ee_l2norm=True \
    --seed=0 --batch_size=128 --image_size=227 \
    --optim=adam --lr=0.0001 --lr_decay_factor=0.5 --lr_decay_epochs=400,800,1200,1600 \
    --epochs=4000 --eval_epoch_term=5 --save_dir=results/inner-0

Defaults of its main.py that the command keeps, and what they mean here:

* margin 1e-5: main.py passes ``--margin`` (default 1e-5) to HPHNTripletLoss, whose own
  default 0.2 is therefore never used; soft_margin False (hard-coded).
* num_instances 32: batches of 4 classes × 32 images from the official ``RandomSampler``
  (``dataset/sampler.py``; ``data.sampler='classes_by_image_count'``): each group starts at
  the next image of a shuffled image list whose class is not yet in the batch, so classes
  are picked in proportion to their image counts ('class_balanced' picks them uniformly);
  an "epoch" is 32 × 98 images, i.e. 24 steps of 128 (the sampler's epoch; last partial
  batch discarded), so 4000 epochs = 96,000 steps.
* Adam (MXNet: eps 1e-8, weight decay 5e-4 added to the gradient), one learning rate for
  all parameters (base_lr_mult 1.0), ×0.5 once the step count passes 400, 800, 1200, 1600
  epochs (MultiFactorScheduler).
* The trainer back-propagates the sum of the per-anchor losses (reduction 'sum').
* Tied hardest examples (a point present twice) each get the full gradient, as MXNet's
  min/max backward gives it (loss/hphn_triplet.py:74-83): tie_gradient 'each'
  ('split', which divides it among them, is the jnp.min/jnp.max rule).
* MXNet Gluon runs BatchNorm in training mode under autograd.record: freeze_bn=False.
  gluoncv's GoogLeNet keeps Gluon's BatchNorm momentum 0.9 (torch's 0.1) and MXNet updates
  the moving variance with the biased batch variance: bn_running_var 'biased'.
* Embedding layer Xavier(magnitude=2), bias 0; GAP; l2-normalized output.
* Backbone: gluoncv's GoogLeNet (model/basenet.py: model_zoo.get_model('googlenet',
  pretrained=True), blocks conv1 … inception5b) = ``googlenet_gluon``, its weights imported
  from gluoncv's googlenet-c7c89366.params by ``python -m proxy_jax.convert``.

* Augmentation (``transforms/transforms.py``): train ``Random2DTranslation(227, 227)`` (p=0.5
  a squash resize to 227×227, otherwise a squash resize to round(227·1.125)=255 and a random
  227×227 window) + ``RandomFlipLeftRight``; test ``Resize((227, 227))``; MXNet's resizes are
  OpenCV bilinear (``interpolation=1``): ``data.train_augment='ee_random_2d_translation'``,
  ``data.eval_resize_mode='squash'`` (``'random_resized_crop'`` and
  ``'short_side_center_crop'`` give the torchvision seeds' transforms instead).

Differences that remain: images are decoded by PIL, not by MXNet's OpenCV ``imread``, and
MXNet's flip leaves the middle column of the (odd, 227-wide) image unwritten
(apache/mxnet#18911); ours mirrors it.

Published: no HPHN-only number in the README text (its figure plots the curve).
"""

from proxy_jax import config_utils


def get_config():
    config = config_utils.base_config()
    config.name = "cars196_hphn_triplet"
    config.seed = 0
    config.num_epochs = 4000
    config.steps_per_epoch = -1  # the sampler's: 32 instances × 98 classes // 128 = 24
    config.log_every_steps = 10

    config.data.dataset = "cars196"
    config.data.root = "./data/CARS_196"
    config.data.input_size = 227
    config.data.resize = 227  # unused by the 'squash' test resize
    config.data.train_augment = "ee_random_2d_translation"
    config.data.eval_resize_mode = "squash"
    config.data.batch_size = 128
    config.data.n_instance = 32
    config.data.sampler = "classes_by_image_count"  # the official RandomSampler
    config.data.num_workers = 10
    config.data.eval_batch_size = 128

    config.model.backbone = "googlenet_gluon"  # gluoncv's model_zoo googlenet (basenet.py)
    config.model.embedding_dim = 512
    config.model.pooling = "gap"
    config.model.l2_normalize = True
    config.model.freeze_bn = False
    config.model.bn_running_var = "biased"  # MXNet's BatchNorm (see the docstring)
    config.model.embedding_init = "xavier_mxnet"
    # python -m proxy_jax.convert --arch googlenet_gluon --src googlenet-c7c89366.params \
    #     --dst googlenet_gluon.npz   (gluoncv's ImageNet weights, top-1 about 72.9%)
    config.model.pretrained = "googlenet_gluon.npz"

    config.loss.name = "hphn_triplet"
    config.loss.margin = 1e-5
    config.loss.soft_margin = False
    config.loss.reduction = "sum"
    config.loss.tie_gradient = "each"  # MXNet's min/max backward; "split" divides it

    config.regularizer.name = ""

    config.optimizer.name = "adam"
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 5e-4
    config.optimizer.backbone_lr = 1e-4
    config.optimizer.embedding_lr = 1e-4
    config.optimizer.proxy_lr = 0.0  # no proxies
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_rate = 0.5
    config.optimizer.decay_epochs = (400, 800, 1200, 1600)

    config.eval.every_epochs = 5
    config.eval.ks = (1, 2, 4, 8)
    return config
