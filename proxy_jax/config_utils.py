"""The training configuration: every field, its default, and the checks of its values.

Every config in ``configs/`` is a *locked* ``ml_collections.ConfigDict`` built from
:func:`base_config` (a variant imports the config it varies: ``from configs import
cars196_norm_softmax``). Being locked, it refuses a field it does not have, a value of the
wrong type and a delete, naming the key, whether in a config file or in a
``--config.x.y=…`` override (``config_flags``); ``config.update_from_flattened_dict`` sets
dotted fields the same way (sweeps, tests). :func:`validate` checks what types cannot:
choices and ranges.

The sections of the losses, the regularizers and the methods are not written here: each
comes from the declaration next to its code (``proxy_jax.objective.LOSSES`` and
``REGULARIZERS``, ``proxy_jax.methods.METHODS``), so adding one adds its fields.

Field reference (epochs are counted from 0 inside proxy_jax; docstrings of the configs
quote the seeds' own 1-based flags):

* ``method``: a name of ``proxy_jax.methods.METHODS`` ('proxy': a loss with its
  regularizer chain; 'dada': DADA's game, with its ``dada`` section).
* ``seed``: initialisation, data order and the per-step PRNG key.
* ``num_epochs``; ``steps_per_epoch`` (``-1``: ⌊train images / batch⌋ with
  ``data.drop_last``, ⌈train images / batch⌉ without, as the seed's loader);
  ``num_train_steps`` (``-1``: ``num_epochs · steps_per_epoch``; a smaller
  number stops early, e.g. for tests). Schedules are functions of the epoch, so a run
  stopped early and resumed follows exactly the same learning rates.
* ``num_devices``: devices of the data-parallel mesh (``-1``: all local devices).
* ``log_every_steps``; ``checkpoint_every_steps`` (``0``: only at evaluations, the end,
  and on SIGINT/SIGTERM).
* ``data``: ``dataset`` ('embedded', 'folder', 'cub200', 'cars196', 'sop', 'inshop',
  'tfds', 'cars196_dada', 'cub200_dada': see ``proxy_jax.data.splits``),
  ``root`` (for 'embedded': where the generated set is written; '' means
  ``~/.cache/proxy_jax/embedded``), ``input_size``, ``resize``, ``crop_scale_min``,
  ``train_augment`` (the crop before the flip: 'random_resized_crop',
  RandomResizedCrop(input_size, scale=(crop_scale_min, 1)), the torchvision seeds'; or
  'ee_random_2d_translation', Embedding Expansion's Random2DTranslation(input_size)),
  ``autoaugment`` (True: torchvision's ImageNet AutoAugment on the whole image first, as
  DADA's ``augmentation: auto``), ``eval_resize_mode`` ('short_side_center_crop':
  Resize(resize) of the shorter side + CenterCrop(input_size); 'squash': a resize to
  input_size x input_size with OpenCV's bilinear, Embedding Expansion's); see
  ``proxy_jax.data.transforms.transform_from_config``,
  ``batch_size`` (the global batch over all devices and hosts), ``n_instance``
  (images per class in a batch; 1 = plain shuffling), ``sampler`` (a name of
  ``proxy_jax.data.samplers.SAMPLERS``: 'class_balanced', distinct uniform classes of
  ``n_instance`` images, plain shuffling when ``n_instance`` is 1; 'shuffle';
  'classes_with_replacement', DADA's official sampler; 'classes_by_image_count',
  Embedding Expansion's), ``num_workers``, ``eval_batch_size``, ``drop_last`` (True: an
  epoch is the full batches; False: also the partial last one, padded to ``batch_size``
  with masked rows, as torch's DataLoader without ``drop_last`` in the Proxy Synthesis,
  MemVir and SoftTriple code; needs method 'proxy' and frozen BatchNorm).
* ``model``: ``backbone`` (a name of ``proxy_jax.models``), ``embedding_dim`` (0: no
  linear layer, the embeddings are the pooled features), ``pooling`` ('gap', 'gmp',
  'gap+gmp' for a CNN; 'cls', 'mean', 'cls+mean' for a ViT, see
  ``proxy_jax.models.token_pool``), ``drop_path_rate`` (a ViT's stochastic depth, the
  last block's rate, growing linearly from 0; drawn from its own 'drop_path' stream),
  ``l2_normalize``, ``freeze_bn``, ``bn_momentum`` and
  ``bn_running_var`` (when BatchNorm trains: torch's momentum, the weight of the new batch
  in the running statistics, and 'unbiased' (torch) or 'biased' (MXNet) batch variance in
  them; see ``proxy_jax.models.layers.BatchNormRule``), ``pretrained`` (a file
  written by ``python -m proxy_jax.convert``; '' trains from scratch), ``dtype``
  ('float32' or 'bfloat16': the compute dtype; parameters and the loss stay float32),
  ``embedding_init`` (a key of ``proxy_jax.models.EMBEDDING_INITS``),
  ``freeze_bn_affine`` (BatchNorm scale/bias get no update at all, as Proxy-Anchor's
  ``--bn-freeze`` does when it has no warm-up epochs).
* ``loss``: ``name`` (see ``proxy_jax.objective.LOSSES``), ``scale`` (Norm-SoftMax,
  Proxy-NCA), ``alpha`` and ``margin`` (Proxy-Anchor α, δ; ``margin`` is also the HPHN
  margin), ``soft_margin``, ``reduction`` and ``tie_gradient`` (HPHN: 'each' or 'split', the
  gradient of tied hardest examples), ``centers_per_class``, ``la``,
  ``gamma``, ``tau``, ``delta`` (SoftTriple K, λ, γ, τ, δ), ``proxy_init`` ('kaiming_uniform':
  U(±1/√fan), PyTorch's default ``kaiming_uniform_(a=√5)``; 'kaiming_normal':
  N(0, 2/fan)) and ``proxy_init_fan`` ('dim' or 'classes': which proxy dimension PyTorch
  took as the fan for the official parameter layout).
* ``regularizer``: ``name``, a chain of ``proxy_jax.objective.REGULARIZERS`` joined by
  '+' ('' none, 'ps', 'memvir', 'ee', 'ps+memvir'), ``ps_alpha``, ``ps_mu``, ``ps_reorder``
  (the batch order before synthesis: 'neighbour_swaps', the official loop's, or
  'distinct_neighbours', random),
  ``memvir_num_steps`` (N), ``memvir_step_gap`` (M), ``memvir_warm_epochs`` (memory used
  from this 0-based epoch on, i.e. after the official ``--warm_epoch`` epochs),
  ``ee_num_inner``, ``ee_l2_norm``.
* ``optimizer``: ``name`` ('adam': L2 penalty added to the gradient, as torch.optim.Adam
  and MXNet's adam; 'adamw': decoupled decay), ``eps``, ``weight_decay``, learning rates
  ``backbone_lr``, ``embedding_lr``, ``proxy_lr``, ``schedule`` (see
  ``proxy_jax.optim.SCHEDULES``) with ``decay_rate``, ``decay_step``, ``decay_stop``,
  ``decay_epochs``; ``warmup_epochs`` (the backbone receives no update, and its optimizer
  state does not advance, for that many epochs); ``grad_clip_value`` (element-wise, as
  ``torch.nn.utils.clip_grad_value_``; 0 = off), ``grad_clip_norm`` (global norm; 0 = off);
  for schedule 'warmup_cosine': ``lr_warmup_epochs`` (linear warm-up of the learning rate
  from 0; not the backbone freeze of ``warmup_epochs``), ``cosine_epochs`` (where the
  cosine ends, warm-up included) and ``final_lr_ratio``; ``layer_decay`` (a ViT's
  layer-wise learning-rate decay, ``proxy_jax.optim.layer_decay_scales``; 1 = off) and
  ``freeze_patch_embed_epochs`` (a ViT's patch embedding receives no update for that many
  epochs); these two need method 'proxy'.
* ``eval``: ``every_epochs``, ``ks`` (Recall@K), ``nmi`` (also compute NMI/F1), ``ap_at``
  (K > 0: also the average precision within the top K, DADA's In-shop "MAP"),
  ``num_queries`` and ``top_k`` of the retrieval picture, ``map_points`` (points in the
  2-D embedding map).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import ml_collections

from proxy_jax import losses, methods, models, objective, optim
from proxy_jax.data import samplers, transforms
from proxy_jax.data.splits import DATASETS

__all__ = ["base_config", "validate", "load_config_file", "field_paths",
           "unknown_field_message"]

_DTYPES = ("float32", "bfloat16")
_BN_RUNNING_VARS = ("unbiased", "biased")
_OPTIMIZERS = ("adam", "adamw")
_PROXY_INITS = ("kaiming_uniform", "kaiming_normal")
_PROXY_FANS = ("dim", "classes")
_REDUCTIONS = ("mean", "sum")


def _merged(section: str, first: dict, declarations: dict) -> ml_collections.ConfigDict:
    """One config section from the fields every registry entry declares (equal defaults)."""
    fields, owner = dict(first), {}
    for name, entry in declarations.items():
        for field, default in entry.fields.items():
            if field in fields and fields[field] != default:
                raise ValueError(f"config.{section}.{field}: {name!r} declares the default "
                                 f"{default!r}, {owner.get(field, 'the base')!r} {fields[field]!r}")
            fields[field], owner[field] = default, name
    return ml_collections.ConfigDict(fields)


def base_config(method: str = "proxy") -> ml_collections.ConfigDict:
    """Every field the trainer reads for ``method``, with neutral defaults; locked."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.method = method
    c.seed = 0
    c.num_epochs = 1
    c.steps_per_epoch = -1
    c.num_train_steps = -1
    c.num_devices = -1
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "folder"
    c.data.root = ""
    c.data.tfds_name = ""
    c.data.input_size = 224
    c.data.resize = 256
    c.data.crop_scale_min = 0.08
    c.data.train_augment = "random_resized_crop"
    c.data.autoaugment = False
    c.data.eval_resize_mode = "short_side_center_crop"
    c.data.batch_size = 128
    c.data.n_instance = 1
    c.data.sampler = "class_balanced"
    c.data.num_workers = 4
    c.data.eval_batch_size = 128
    # False: every epoch ends with the partial batch, padded to batch_size with masked rows
    # (ceil(N / B) steps, as torch's DataLoader without drop_last); True: it is dropped.
    c.data.drop_last = True

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "bn_inception"
    c.model.embedding_dim = 512
    c.model.pooling = "gap"
    c.model.l2_normalize = True
    c.model.freeze_bn = True
    c.model.bn_momentum = 0.1
    c.model.bn_running_var = "unbiased"
    c.model.pretrained = ""
    c.model.dtype = "float32"
    c.model.embedding_init = "torch_default"
    c.model.freeze_bn_affine = False
    c.model.drop_path_rate = 0.0

    c.loss = _merged("loss", objective.LOSS_FIELDS, objective.LOSSES)
    c.regularizer = _merged("regularizer", {"name": ""}, objective.REGULARIZERS)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.eps = 0.01
    c.optimizer.weight_decay = 1e-4
    c.optimizer.backbone_lr = 1e-4
    c.optimizer.embedding_lr = 1e-4
    c.optimizer.proxy_lr = 1e-2
    c.optimizer.schedule = "constant"
    c.optimizer.decay_rate = 0.1
    c.optimizer.decay_step = 1
    c.optimizer.decay_stop = -1
    c.optimizer.decay_epochs = (0,)
    c.optimizer.warmup_epochs = 0
    c.optimizer.grad_clip_value = 0.0
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.lr_warmup_epochs = 0
    c.optimizer.cosine_epochs = 0
    c.optimizer.final_lr_ratio = 0.0
    c.optimizer.layer_decay = 1.0
    c.optimizer.freeze_patch_embed_epochs = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 1
    c.eval.ks = (1, 2, 4, 8)
    c.eval.nmi = False
    c.eval.ap_at = 0
    c.eval.num_queries = 8
    c.eval.top_k = 5
    c.eval.map_points = 2000

    for name, section in methods.get_method(method).sections().items():
        c[name] = section
    c.lock()
    return c


def _one_of(path: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"config.{path} must be one of {list(options)}, got {value!r}")


def _at_least(config, paths, minimum, *, allow_minus_one: bool = False) -> None:
    for path in paths:
        value = config
        for part in path.split("."):
            value = value[part]
        if value < minimum and not (allow_minus_one and value == -1):
            extra = " (or -1)" if allow_minus_one else ""
            raise ValueError(f"config.{path} must be >= {minimum}{extra}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """The choices and ranges of a config (its fields and types are the locked ConfigDict's).

    Then the method's own checks (``proxy_jax.methods``), which include the loss and the
    regularizer chain for the proxy method.

    Raises:
      ValueError: naming the first field out of range or not among its choices, and what
        was expected.
    """
    c = config
    method = methods.get_method(c.method)
    _one_of("data.dataset", c.data.dataset, DATASETS)
    _one_of("data.train_augment", c.data.train_augment, transforms.TRAIN_AUGMENTS)
    _one_of("data.eval_resize_mode", c.data.eval_resize_mode, transforms.EVAL_RESIZE_MODES)
    _one_of("data.sampler", c.data.sampler, samplers.SAMPLERS)
    _one_of("model.dtype", c.model.dtype, _DTYPES)
    _one_of("model.bn_running_var", c.model.bn_running_var, _BN_RUNNING_VARS)
    if not 0 < c.model.bn_momentum <= 1:
        raise ValueError(f"config.model.bn_momentum must lie in (0, 1] (torch's convention: the "
                         f"weight of the new batch), got {c.model.bn_momentum}")
    _one_of("model.embedding_init", c.model.embedding_init, sorted(models.EMBEDDING_INITS))
    _one_of("optimizer.name", c.optimizer.name, _OPTIMIZERS)
    _one_of("optimizer.schedule", c.optimizer.schedule, optim.SCHEDULES)
    _one_of("loss.name", c.loss.name, sorted(objective.LOSSES))
    _one_of("loss.proxy_init", c.loss.proxy_init, _PROXY_INITS)
    _one_of("loss.proxy_init_fan", c.loss.proxy_init_fan, _PROXY_FANS)
    _one_of("loss.reduction", c.loss.reduction, _REDUCTIONS)
    if c.loss.name == "hphn_triplet":
        _one_of("loss.tie_gradient", c.loss.tie_gradient, losses.TIE_GRADIENTS)
    spec = models.get_backbone(c.model.backbone)
    _one_of("model.pooling", c.model.pooling,
            models.TOKEN_POOLINGS if spec.is_transformer else models.POOLINGS)
    if not 0 <= c.model.drop_path_rate < 1 or (c.model.drop_path_rate > 0
                                                and not spec.is_transformer):
        raise ValueError(f"config.model.drop_path_rate must lie in [0, 1) and be 0 for the "
                         f"CNN {c.model.backbone!r}, got {c.model.drop_path_rate}")
    if c.data.dataset not in ("embedded", "tfds") and not c.data.root:
        raise ValueError(f"config.data.root must name the {c.data.dataset} folder, got ''")
    if c.data.dataset == "tfds" and not c.data.tfds_name:
        raise ValueError("config.data.tfds_name must name the tfds builder with "
                         "config.data.dataset='tfds'")
    _at_least(c, ("num_epochs", "log_every_steps", "data.input_size", "data.resize",
                  "data.batch_size", "data.n_instance", "data.eval_batch_size",
                  "eval.every_epochs", "eval.top_k",
                  "optimizer.decay_step", "loss.centers_per_class"), 1)
    _at_least(c, ("steps_per_epoch", "num_train_steps", "num_devices"), 1, allow_minus_one=True)
    _at_least(c, ("checkpoint_every_steps", "data.num_workers", "optimizer.warmup_epochs",
                  "optimizer.weight_decay", "optimizer.grad_clip_value",
                  "optimizer.grad_clip_norm", "optimizer.backbone_lr", "optimizer.embedding_lr",
                  "optimizer.proxy_lr", "eval.num_queries", "eval.map_points",
                  "regularizer.memvir_warm_epochs", "model.embedding_dim"), 0)
    _check_vit_optimizer(c, spec)
    if not c.data.drop_last and c.method != "proxy":
        raise ValueError(f"config.data.drop_last=False (a padded, masked last batch) is only "
                         f"supported by method 'proxy', got method {c.method!r}")
    if not c.data.drop_last and not c.model.freeze_bn:
        raise ValueError("config.data.drop_last=False pads the last batch of an epoch, whose "
                         "padded rows would enter BatchNorm's batch statistics; it needs "
                         "config.model.freeze_bn=True")
    if c.data.batch_size % c.data.n_instance:
        raise ValueError(f"config.data.batch_size ({c.data.batch_size}) must be a multiple of "
                         f"config.data.n_instance ({c.data.n_instance})")
    if not 0 < c.data.crop_scale_min <= 1:
        raise ValueError(f"config.data.crop_scale_min must lie in (0, 1], got "
                         f"{c.data.crop_scale_min}")
    if not c.optimizer.eps > 0:
        raise ValueError(f"config.optimizer.eps must be > 0, got {c.optimizer.eps}")
    if c.eval.ap_at < 0:
        raise ValueError(f"config.eval.ap_at must be >= 0 (0: off), got {c.eval.ap_at}")
    if not c.eval.ks or min(c.eval.ks) < 1:
        raise ValueError(f"config.eval.ks must be positive integers, got {c.eval.ks!r}")
    if c.data.eval_resize_mode == "short_side_center_crop" and c.data.input_size > c.data.resize:
        raise ValueError(f"config.data.input_size ({c.data.input_size}) must be <= "
                         f"config.data.resize ({c.data.resize}): the test crop is taken from "
                         "the resized image")
    method.validate(c)


def _check_vit_optimizer(c, spec) -> None:
    """The ViT training fields of ``config.optimizer``: ranges, and what they need."""
    o = c.optimizer
    _at_least(c, ("optimizer.lr_warmup_epochs", "optimizer.cosine_epochs",
                  "optimizer.freeze_patch_embed_epochs"), 0)
    if o.schedule == "warmup_cosine" and not o.lr_warmup_epochs < o.cosine_epochs:
        raise ValueError(f"config.optimizer.cosine_epochs ({o.cosine_epochs}) must exceed "
                         f"config.optimizer.lr_warmup_epochs ({o.lr_warmup_epochs}) with "
                         "schedule 'warmup_cosine'")
    if not 0 <= o.final_lr_ratio <= 1:
        raise ValueError(f"config.optimizer.final_lr_ratio must lie in [0, 1], got "
                         f"{o.final_lr_ratio}")
    if not 0 < o.layer_decay <= 1:
        raise ValueError(f"config.optimizer.layer_decay must lie in (0, 1] (1: off), got "
                         f"{o.layer_decay}")
    for field, active in (("layer_decay", o.layer_decay < 1),
                          ("freeze_patch_embed_epochs", o.freeze_patch_embed_epochs > 0)):
        if active and not spec.is_transformer:
            raise ValueError(f"config.optimizer.{field} needs a ViT backbone, got "
                             f"{c.model.backbone!r}")
        if active and c.method != "proxy":
            raise ValueError(f"config.optimizer.{field} is only supported by method 'proxy', "
                             f"got method {c.method!r}")


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted path of ``config``, sections and fields: ['data', 'data.batch_size', …]."""
    paths = []
    for key, value in config.items():
        paths.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            paths += field_paths(value, prefix + key + ".")
    return paths


def unknown_field_message(config: ml_collections.ConfigDict, path: str, *,
                          source: str = "the config") -> Optional[str]:
    """One line for a ``--config.<path>`` override that names no field, or None if it does.

    Names the full dotted path, the first part that does not exist, and the closest valid
    paths (``difflib``), e.g. "config.data.batchsize is not a field of configs/default.py
    (config.data has no 'batchsize'); closest: config.data.batch_size".
    """
    parts = path.split(".")
    node = config
    for i, name in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and name in node:
            node = node[name]
            continue
        parent = "config" + "".join("." + p for p in parts[:i])
        if not isinstance(node, ml_collections.ConfigDict):
            why = f"{parent} is a {type(node).__name__} field, not a section"
        else:
            why = f"{parent} has no {name!r}"
        known = field_paths(config)
        close = difflib.get_close_matches(path, known, n=3, cutoff=0.6)
        hint = "; closest: " + ", ".join(f"config.{c}" for c in close) if close else ""
        if not close and isinstance(node, ml_collections.ConfigDict):
            hint = f"; {parent} has: " + ", ".join(sorted(node.keys()))
        return f"config.{path} is not a field of {source} ({why}){hint}"
    return None


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path`` (what ``--config=path`` loads)."""
    return _load_module(path).get_config()


def _load_module(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_name = "proxy_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
