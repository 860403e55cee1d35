"""The training configuration: its schema, its checks, and loading config files by path.

Every config in ``configs/`` is an ``ml_collections.ConfigDict`` built from
:func:`base_config`, the one schema of all fields the trainer reads (with neutral defaults),
so that a field the trainer does not know, or a value of the wrong type, is an error that
names it (:func:`validate`), whether it comes from a config file or from a
``--config.x.y=…`` override (ml_collections' ``config_flags`` checks those).

Field reference (epochs are counted from 0 inside proxy_jax; docstrings of the configs
quote the seeds' own 1-based flags):

* ``seed``: initialisation, data order and the per-step PRNG key.
* ``num_epochs``; ``steps_per_epoch`` (``-1``: ⌊train images / batch⌋, drop-last as in
  every seed); ``num_train_steps`` (``-1``: ``num_epochs · steps_per_epoch``; a smaller
  number stops early, e.g. for tests). Schedules are functions of the epoch, so a run
  stopped early and resumed follows exactly the same learning rates.
* ``num_devices``: devices of the data-parallel mesh (``-1``: all local devices).
* ``log_every_steps``; ``checkpoint_every_steps`` (``0``: only at evaluations, the end,
  and on SIGINT/SIGTERM).
* ``data``: ``dataset`` ('embedded', 'folder', 'cub200', 'cars196', 'sop', 'inshop'),
  ``root`` (for 'embedded': where the generated set is written; '' means
  ``~/.cache/proxy_jax/embedded``), ``input_size`` and ``resize`` (train
  RandomResizedCrop(input_size, scale=(crop_scale_min, 1)) + flip; test Resize(resize) +
  CenterCrop(input_size)),
  ``batch_size`` (the global batch over all devices and hosts), ``n_instance``
  (images per class in a batch; 1 = plain shuffling), ``num_workers``,
  ``eval_batch_size``.
* ``model``: ``backbone`` (a name of ``proxy_jax.models``), ``embedding_dim``, ``pooling``
  ('gap', 'gmp', 'gap+gmp'), ``l2_normalize``, ``freeze_bn``, ``pretrained`` (a file
  written by ``python -m proxy_jax.convert``; '' trains from scratch), ``dtype``
  ('float32' or 'bfloat16': the compute dtype; parameters and the loss stay float32),
  ``embedding_init`` (a key of ``proxy_jax.models.EMBEDDING_INITS``),
  ``freeze_bn_affine`` (BatchNorm scale/bias get no update at all, as Proxy-Anchor's
  ``--bn-freeze`` does when it has no warm-up epochs).
* ``loss``: ``name`` (see ``proxy_jax.objective.LOSSES``), ``scale`` (Norm-SoftMax,
  Proxy-NCA), ``alpha`` and ``margin`` (Proxy-Anchor α, δ; ``margin`` is also the HPHN
  margin), ``soft_margin`` and ``reduction`` (HPHN), ``proxy_init`` ('kaiming_uniform':
  U(±1/√fan), PyTorch's default ``kaiming_uniform_(a=√5)``; 'kaiming_normal':
  N(0, 2/fan)) and ``proxy_init_fan`` ('dim' or 'classes': which proxy dimension PyTorch
  took as the fan for the official parameter layout).
* ``regularizer``: ``name`` ('' none, 'ps', 'memvir', 'ee'), ``ps_alpha``, ``ps_mu``,
  ``memvir_num_steps`` (N), ``memvir_step_gap`` (M), ``memvir_warm_epochs`` (memory used
  from this 0-based epoch on, i.e. after the official ``--warm_epoch`` epochs),
  ``ee_num_inner``, ``ee_l2_norm``.
* ``optimizer``: ``name`` ('adam': L2 penalty added to the gradient, as torch.optim.Adam
  and MXNet's adam; 'adamw': decoupled decay), ``eps``, ``weight_decay``, learning rates
  ``backbone_lr``, ``embedding_lr``, ``proxy_lr``, ``schedule`` (see
  ``proxy_jax.train.SCHEDULES``) with ``decay_rate``, ``decay_step``, ``decay_stop``,
  ``decay_epochs``; ``warmup_epochs`` (the backbone receives no update, and its optimizer
  state does not advance, for that many epochs); ``grad_clip_value`` (element-wise, as
  ``torch.nn.utils.clip_grad_value_``; 0 = off), ``grad_clip_norm`` (global norm; 0 = off).
* ``eval``: ``every_epochs``, ``ks`` (Recall@K), ``nmi`` (also compute NMI/F1),
  ``num_queries`` and ``top_k`` of the retrieval picture, ``map_points`` (points in the
  2-D embedding map).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from types import ModuleType
from typing import Any, Mapping, Optional

import ml_collections

__all__ = ["base_config", "validate", "load_config_file", "load_sibling", "DATASETS",
           "field_paths", "unknown_field_message"]

DATASETS = ("embedded", "folder", "cub200", "cars196", "sop", "inshop")
_POOLINGS = ("gap", "gmp", "gap+gmp")
_DTYPES = ("float32", "bfloat16")
_OPTIMIZERS = ("adam", "adamw")
_PROXY_INITS = ("kaiming_uniform", "kaiming_normal")
_PROXY_FANS = ("dim", "classes")
_REDUCTIONS = ("mean", "sum")


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with neutral defaults (no data set chosen)."""
    c = ml_collections.ConfigDict()
    c.name = "base"
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
    c.data.input_size = 224
    c.data.resize = 256
    c.data.crop_scale_min = 0.08
    c.data.batch_size = 128
    c.data.n_instance = 1
    c.data.num_workers = 4
    c.data.eval_batch_size = 128

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "bn_inception"
    c.model.embedding_dim = 512
    c.model.pooling = "gap"
    c.model.l2_normalize = True
    c.model.freeze_bn = True
    c.model.pretrained = ""
    c.model.dtype = "float32"
    c.model.embedding_init = "torch_default"
    c.model.freeze_bn_affine = False

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "norm_softmax"
    c.loss.scale = 23.0
    c.loss.alpha = 32.0
    c.loss.margin = 0.1
    c.loss.soft_margin = False
    c.loss.reduction = "mean"
    c.loss.proxy_init = "kaiming_uniform"
    c.loss.proxy_init_fan = "dim"

    c.regularizer = ml_collections.ConfigDict()
    c.regularizer.name = ""
    c.regularizer.ps_alpha = 0.4
    c.regularizer.ps_mu = 1.0
    c.regularizer.memvir_num_steps = 45
    c.regularizer.memvir_step_gap = 10
    c.regularizer.memvir_warm_epochs = 0
    c.regularizer.ee_num_inner = 2
    c.regularizer.ee_l2_norm = True

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

    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 1
    c.eval.ks = (1, 2, 4, 8)
    c.eval.nmi = False
    c.eval.num_queries = 8
    c.eval.top_k = 5
    c.eval.map_points = 2000
    return c


def _walk(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, path + ".")
        else:
            yield path, value


def _type_ok(value, expected) -> bool:
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(expected, str):
        return isinstance(value, str)
    if isinstance(expected, tuple):
        return isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
    return True


def _one_of(path: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"config.{path} must be one of {list(options)}, got {value!r}")


def _positive(path: str, value, *, allow_zero: bool = False, allow_minus_one: bool = False):
    if allow_minus_one and value == -1:
        return
    if value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        extra = " (or -1)" if allow_minus_one else ""
        raise ValueError(f"config.{path} must be {expected}{extra}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config against the schema of :func:`base_config` and the value ranges.

    Registry names that live in other modules (loss, regularizer, backbone, schedule) are
    checked where the registry is (``proxy_jax.objective``, ``proxy_jax.train``,
    ``proxy_jax.models``), with the same kind of message.

    Raises:
      ValueError: naming the first unknown or missing field, the wrong type, or the value
        out of range, and what was expected.
    """
    schema = dict(_walk(base_config()))
    given = dict(_walk(config))
    for path in given:
        if path not in schema:
            raise ValueError(
                f"config.{path} is not a field the trainer reads; known fields are listed in "
                "proxy_jax/config_utils.py (base_config)")
    for path, expected in schema.items():
        if path not in given:
            raise ValueError(f"config.{path} is missing; build configs from "
                             "proxy_jax.config_utils.base_config()")
        if not _type_ok(given[path], expected):
            raise ValueError(f"config.{path} must be of type {type(expected).__name__}, got "
                             f"{given[path]!r} ({type(given[path]).__name__})")
    c = config
    _one_of("data.dataset", c.data.dataset, DATASETS)
    _one_of("model.pooling", c.model.pooling, _POOLINGS)
    _one_of("model.dtype", c.model.dtype, _DTYPES)
    _one_of("optimizer.name", c.optimizer.name, _OPTIMIZERS)
    _one_of("loss.proxy_init", c.loss.proxy_init, _PROXY_INITS)
    _one_of("loss.proxy_init_fan", c.loss.proxy_init_fan, _PROXY_FANS)
    _one_of("loss.reduction", c.loss.reduction, _REDUCTIONS)
    if c.data.dataset != "embedded" and not c.data.root:
        raise ValueError(f"config.data.root must name the {c.data.dataset} folder, got ''")
    for path in ("num_epochs", "log_every_steps", "data.input_size", "data.resize",
                 "data.batch_size", "data.n_instance", "data.eval_batch_size",
                 "model.embedding_dim", "eval.every_epochs", "eval.top_k", "optimizer.decay_step"):
        _positive(path, given[path])
    for path in ("steps_per_epoch", "num_train_steps", "num_devices"):
        _positive(path, given[path], allow_minus_one=True)
    for path in ("checkpoint_every_steps", "data.num_workers", "optimizer.warmup_epochs",
                 "optimizer.weight_decay", "optimizer.grad_clip_value",
                 "optimizer.grad_clip_norm", "optimizer.backbone_lr", "optimizer.embedding_lr",
                 "optimizer.proxy_lr", "eval.num_queries", "eval.map_points",
                 "regularizer.memvir_warm_epochs"):
        _positive(path, given[path], allow_zero=True)
    if c.data.batch_size % c.data.n_instance:
        raise ValueError(f"config.data.batch_size ({c.data.batch_size}) must be a multiple of "
                         f"config.data.n_instance ({c.data.n_instance})")
    if not 0 < c.data.crop_scale_min <= 1:
        raise ValueError(f"config.data.crop_scale_min must lie in (0, 1], got "
                         f"{c.data.crop_scale_min}")
    if not c.optimizer.eps > 0:
        raise ValueError(f"config.optimizer.eps must be > 0, got {c.optimizer.eps}")
    if not c.eval.ks or min(c.eval.ks) < 1:
        raise ValueError(f"config.eval.ks must be positive integers, got {c.eval.ks!r}")
    if c.data.input_size > c.data.resize:
        raise ValueError(f"config.data.input_size ({c.data.input_size}) must be <= "
                         f"config.data.resize ({c.data.resize}): the test crop is taken from "
                         "the resized image")


def override(config: ml_collections.ConfigDict, changes: Mapping[str, Any]
             ) -> ml_collections.ConfigDict:
    """Sets dotted fields in place, as ``--config.x.y=…`` does; returns ``config``.

    ``override(config, {"data.batch_size": 64, "loss.scale": 23.0})``: for sweeps and tests.

    Raises:
      KeyError: a path that is not a field, naming it.
      TypeError: ml_collections' error for a value of the wrong type.
    """
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = config
        for i, name in enumerate(parents + [leaf]):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise KeyError(f"config has no field {'.'.join(parents[:i] + [name])!r} "
                               f"(setting {path!r})")
            if i < len(parents):
                node = node[name]
        node[leaf] = value
    return config


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


def load_sibling(config_file: str, name: str) -> ModuleType:
    """Imports ``<dir of config_file>/<name>.py``: how a config variant imports its base.

    Config files are read by path (``--config=configs/x.py``) and are not a package, so a
    variant finds its base next to itself rather than through ``sys.path``, which works
    whatever the working directory.
    """
    return _load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                     name + ".py"))


def _load_module(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_name = "proxy_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
