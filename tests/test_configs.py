"""configs/*.py: every config validates, builds and trains one step on tiny shapes; bad
configs and bad overrides fail naming the field."""

import glob
import os
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from proxy_jax import config_utils, models, parallel, train
from proxy_jax.data import pipeline, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every experiment config (the package's __init__ and the shared bases are not runs).
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("__") and not p.endswith("_base.py"))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in CONFIGS]

SEED_CONFIGS = {
    "cars196_norm_softmax", "cars196_ps_norm_softmax", "cars196_memvir_norm_softmax",
    "cars196_proxy_nca", "cars196_ps_proxy_nca", "cars196_memvir_proxy_nca",
    "cub200_proxy_anchor_bn_inception", "cub200_proxy_anchor_resnet50",
    "cars196_proxy_anchor_bn_inception", "cars196_proxy_anchor_resnet50",
    "sop_proxy_anchor_bn_inception", "sop_proxy_anchor_resnet50",
    "inshop_proxy_anchor_bn_inception", "inshop_proxy_anchor_resnet50",
    "cars196_hphn_triplet", "cars196_ee_hphn_triplet", "cars196_soft_triple",
}


pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_every_seed_command_has_a_config():
    assert SEED_CONFIGS | {"default"} <= set(NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_is_valid_and_documented(path):
    config = config_utils.load_config_file(path)
    assert config.is_locked  # unknown fields, wrong types and deletes are refused
    config_utils.validate(config)
    name = os.path.splitext(os.path.basename(path))[0]
    assert config.name == name
    module = config_utils._load_module(path)
    doc = module.__doc__ or ""
    if name != "default":
        assert "Published" in doc, "the docstring must state the published number (or none)"
        assert "--" in doc and ("train.py" in doc or "main.py" in doc), "seed command missing"


# The BatchNorm rule of the code each recipe reproduces (it matters where BatchNorm trains).
BATCHNORM_RULES = {  # config name part -> (bn_momentum, bn_running_var)
    "proxy_anchor_bn_inception": (0.9, "unbiased"),  # Proxy-Anchor's own net/bn_inception.py
    "hphn_triplet": (0.1, "biased"),  # gluoncv GoogLeNet: MXNet momentum 0.9, biased variance
}


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_batchnorm_rule_is_the_official_codes(path):
    config = config_utils.load_config_file(path)
    name = os.path.splitext(os.path.basename(path))[0]
    expected = next((rule for part, rule in BATCHNORM_RULES.items() if part in name),
                    (0.1, "unbiased"))  # torch's default (torchvision, pretrainedmodels)
    assert (config.model.bn_momentum, config.model.bn_running_var) == expected


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_trains_one_step_on_tiny_shapes(path, tiny_root):
    config = config_utils.load_config_file(path)
    # Tiny shapes: the real loss, regularizer, optimizer, schedule, warm-up, BatchNorm mode,
    # pooling and initialisations of the config; only the network and the data shrink.
    config.data.dataset, config.data.root = "folder", tiny_root
    config.data.input_size = config.data.resize = 16
    config.data.batch_size = 8
    config.data.n_instance = min(config.data.n_instance, 2)
    config.data.num_workers = 0
    vit = models.get_backbone(config.model.backbone).is_transformer  # keeps its pooling
    config.model.backbone = "vit_tiny_test" if vit else "tiny_cnn"
    config.model.pretrained = ""
    config.model.embedding_dim = 8
    config.num_devices = 1
    run = train.build(config)
    loader = pipeline.make_loader(
        run.data.train, batch_size=8, sampler=run.sampler,
        transform=transforms.transform_from_config(
            run.config.data, models.input_normalization(run.config.model.backbone), training=True),
        num_workers=0, seed=0)
    batch = next(loader)
    run.plan.check_batch(np.asarray(batch["label"]))
    step = parallel.parallelize(run.plan.step_fn, run.mesh)
    state, metrics = step(run.state, parallel.shard_batch(batch, run.mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1


def _bad(config, **changes):
    config.update_from_flattened_dict(changes)
    return config


@pytest.mark.parametrize("changes, message", [
    ({"data.dataset": "imagenet"}, "config.data.dataset must be one of"),
    ({"model.pooling": "avg"}, "config.model.pooling must be one of"),
    ({"data.batch_size": 0}, "config.data.batch_size must be >= 1"),
    ({"data.batch_size": 6, "data.n_instance": 4}, "multiple of config.data.n_instance"),
    ({"optimizer.name": "sgd"}, "config.optimizer.name must be one of"),
    ({"loss.name": "hphn_triplet", "loss.tie_gradient": "even"},
     "config.loss.tie_gradient must be one of \\['each', 'split'\\], got 'even'"),
    ({"eval.ks": (0, 1)}, "config.eval.ks"),
    ({"model.bn_momentum": 0.0}, "config.model.bn_momentum must lie in"),
    ({"model.bn_running_var": "sample"}, "config.model.bn_running_var must be one of"),
    ({"data.train_augment": "ee"}, r"config.data.train_augment must be one of \['random_resized_crop'"),
    ({"data.eval_resize_mode": "crop"}, "config.data.eval_resize_mode must be one of"),
    ({"data.drop_last": False, "model.freeze_bn": False}, "needs config.model.freeze_bn=True"),
    ({"data.drop_last": False, "model.freeze_bn": True, "method": "dada"},
     "only supported by method 'proxy'"),
    ({"data.drop_last": False, "model.freeze_bn": True, "loss.name": "hphn_triplet"},
     "cannot take the padded last batch"),
    ({"model.pooling": "cls"}, r"config.model.pooling must be one of \['gap'"),
    ({"model.backbone": "vit_tiny_test", "model.pooling": "gap"},
     r"config.model.pooling must be one of \['cls', 'mean', 'cls\+mean'\]"),
    ({"model.drop_path_rate": 0.1}, "must lie in \\[0, 1\\) and be 0 for the CNN"),
    ({"model.backbone": "vit_tiny_test", "model.pooling": "cls", "model.drop_path_rate": 1.0},
     "config.model.drop_path_rate must lie in"),
    ({"model.embedding_dim": -1}, "config.model.embedding_dim must be >= 0"),
])
def test_validate_names_the_bad_field(changes, message):
    config = config_utils.load_config_file(os.path.join(REPO, "configs", "default.py"))
    with pytest.raises(ValueError, match=message):
        config_utils.validate(_bad(config, **changes))


def test_recipes_take_their_official_transforms():
    # Embedding Expansion's repository (both its configs): Random2DTranslation + flip, test
    # squash resize; DADA: AutoAugment only where its yaml says 'augmentation: auto' (Cars).
    def load(name):
        return config_utils.load_config_file(os.path.join(REPO, "configs", f"{name}.py")).data

    for name in ("cars196_hphn_triplet", "cars196_ee_hphn_triplet"):
        data = load(name)
        assert (data.train_augment, data.eval_resize_mode, data.autoaugment) == (
            "ee_random_2d_translation", "squash", False)
    for name, auto in [("dada_cars196", True), ("dada_cub200", False), ("dada_sop", False),
                       ("dada_inshop", False)]:
        data = load(name)
        assert (data.train_augment, data.eval_resize_mode, data.autoaugment) == (
            "random_resized_crop", "short_side_center_crop", auto)
    assert load("default").train_augment == "random_resized_crop"


def test_locked_config_refuses_unknown_deleted_and_mistyped_fields():
    config = config_utils.base_config()
    with pytest.raises(AttributeError, match=r'"dropout" does not exist'):
        config.model.dropout = 0.5
    with pytest.raises(KeyError, match="locked"):
        del config.loss["scale"]
    with pytest.raises(TypeError, match="batch_size"):
        config.data.batch_size = "128"
    with pytest.raises(KeyError, match='"batchsize" does not exist'):
        config.update_from_flattened_dict({"data.batchsize": 32})
    config.update_from_flattened_dict({"data.batch_size": 64, "loss.scale": 23, "seed": 3})
    assert (config.data.batch_size, config.loss.scale, config.seed) == (64, 23.0, 3)


def test_sections_come_from_the_declarations():
    from proxy_jax import objective

    config = config_utils.base_config()
    for entry in list(objective.LOSSES.values()) + list(objective.REGULARIZERS.values()):
        section = config.loss if entry in objective.LOSSES.values() else config.regularizer
        for field, default in entry.fields.items():
            assert section[field] == default
    assert "dada" not in config and config.method == "proxy"
    dada = config_utils.base_config("dada")
    assert dada.method == "dada" and dada.dada.d_step == 3
    with pytest.raises(ValueError, match="config.method must be one of"):
        config_utils.base_config("gan")


def test_registry_names_are_checked_before_reading_data():
    config = config_utils.load_config_file(os.path.join(REPO, "configs", "default.py"))
    config.data.dataset, config.data.root = "folder", "/nonexistent"  # names fail first
    config.model.backbone = "vgg16"
    with pytest.raises(ValueError, match="backbone must be one of"):
        train.build(config)
    config.model.backbone, config.loss.name = "tiny_cnn", "arcface"
    with pytest.raises(ValueError, match="config.loss.name must be one of"):
        train.build(config)
    config.loss.name, config.optimizer.schedule = "norm_softmax", "cosine"
    with pytest.raises(ValueError, match="config.optimizer.schedule must be one of"):
        train.build(config)


def _parse(*args):
    """Parses main.py-style flags with a fresh FlagValues (as main.py defines --config)."""
    values = flags.FlagValues()
    default = os.path.join(REPO, "configs", "default.py")
    config_flags.DEFINE_config_file("config", default, flag_values=values, lock_config=True)
    if not any(a.startswith("--config=") for a in args):
        args = ("--config=" + default, *args)
    argv = ["main.py", *args]
    saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    try:
        values(argv)
    finally:
        sys.argv = saved
    return values.config


def test_command_line_overrides():
    config = _parse("--config.data.batch_size=32", "--config.loss.scale=8",
                    "--config.eval.ks=(1,5)")
    assert config.data.batch_size == 32 and config.loss.scale == 8.0
    assert tuple(config.eval.ks) == (1, 5)
    config = _parse("--config=" + os.path.join(REPO, "configs", "cars196_ps_norm_softmax.py"),
                    "--config.data.root=/data/carDB")
    config_utils.validate(config)
    assert config.regularizer.name == "ps" and config.data.root == "/data/carDB"


@pytest.mark.parametrize("arg, message", [
    ("--config.data.batchsize=32", "batchsize"),
    ("--config.data.batch_size=many", "batch_size"),
    ("--config.model.freeze_bn=maybe", "freeze_bn"),
])
def test_bad_overrides_name_the_key(arg, message):
    with pytest.raises(Exception, match=message):
        _parse(arg)
