"""proxy_jax.convert and the weight files: key mapping, both BN-Inception formats, errors.

The state_dicts are those of randomly initialised torchvision / pretrainedmodels models (the
forward-pass parity of converted weights is tested in tests/models/test_models.py).
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from proxy_jax import convert
from proxy_jax.models import (backbone_shapes, create_model, load_pretrained, load_weights,
                              save_weights)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def bninception_state():
    torch.manual_seed(0)
    module = importlib.import_module("pretrainedmodels.models.bninception")
    return module.BNInception(num_classes=1000).state_dict()


def test_cli_converts_a_torchvision_file(resnet18_state, tmp_path, capsys):
    src, dst = tmp_path / "resnet18.pth", tmp_path / "out" / "resnet18.weights"
    torch.save(resnet18_state, src)
    assert convert.main(["--arch", "resnet18", "--src", str(src), "--dst", str(dst)]) == 0
    assert "resnet18" in capsys.readouterr().out

    arch, weights = load_weights(str(dst))
    assert arch == "resnet18"
    assert {k: v.shape for k, v in weights.items()} == backbone_shapes("resnet18")
    s = {k: v.numpy() for k, v in resnet18_state.items()}
    np.testing.assert_array_equal(weights["params/conv1/kernel"],
                                  s["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights["params/layer2/0/downsample/0/kernel"],
                                  s["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights["params/layer3/1/bn2/scale"], s["layer3.1.bn2.weight"])
    np.testing.assert_array_equal(weights["params/layer3/1/bn2/bias"], s["layer3.1.bn2.bias"])
    np.testing.assert_array_equal(weights["batch_stats/bn1/mean"], s["bn1.running_mean"])
    np.testing.assert_array_equal(weights["batch_stats/layer4/1/bn1/var"],
                                  s["layer4.1.bn1.running_var"])
    assert not any("fc" in k for k in weights)  # the ImageNet classifier is dropped


def test_checkpoint_wrappers_are_unwrapped(resnet18_state, tmp_path):
    # A DataParallel training checkpoint: {'state_dict': {'module.<key>': ...}}.
    src = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in resnet18_state.items()}},
               src)
    convert.main(["--arch", "resnet18", "--src", str(src), "--dst", str(tmp_path / "a.npz")])
    _, wrapped = load_weights(str(tmp_path / "a.npz"))
    plain = convert.convert_state_dict(resnet18_state, "resnet18")
    assert wrapped.keys() == plain.keys()
    for k in plain:
        np.testing.assert_array_equal(wrapped[k], plain[k])


def test_pretrainedmodels_resnet_head_name_is_dropped_too(resnet18_state):
    # pretrainedmodels' ResNets (DADA's backbone) name torchvision's 'fc' 'last_linear'.
    renamed = {k.replace("fc.", "last_linear."): v for k, v in resnet18_state.items()}
    assert "last_linear.weight" in renamed
    converted = convert.convert_state_dict(renamed, "resnet18")
    assert converted.keys() == backbone_shapes("resnet18").keys()


def test_both_bn_inception_formats_convert_identically(bninception_state):
    new = convert.convert_state_dict(bninception_state, "bn_inception")
    assert {k: v.shape for k, v in new.items()} == backbone_shapes("bn_inception")
    # The older file stores every BatchNorm tensor as [1, C].
    old_state = {k: (v.reshape(1, -1) if "_bn." in k and v.ndim == 1 else v)
                 for k, v in bninception_state.items()}
    assert old_state["inception_4a_1x1_bn.running_var"].shape == (1, 224)
    old = convert.convert_state_dict(old_state, "bn_inception")
    assert old.keys() == new.keys()
    for k in new:
        np.testing.assert_array_equal(old[k], new[k])
    np.testing.assert_array_equal(new["params/inception_5b_pool_proj/bias"],
                                  bninception_state["inception_5b_pool_proj.bias"].numpy())
    np.testing.assert_array_equal(new["batch_stats/conv1_7x7_s2_bn/mean"],
                                  bninception_state["conv1_7x7_s2_bn.running_mean"].numpy())


def test_mismatched_keys_are_all_listed(resnet18_state):
    state = dict(resnet18_state)
    del state["layer1.0.bn2.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ValueError) as info:
        convert.convert_state_dict(state, "resnet18")
    message = str(info.value)
    assert "missing (1): batch_stats/layer1/0/bn2/var" in message
    assert "unexpected (1): layer5.0.conv1.weight" in message
    assert "wrong shape (1): conv1.weight -> params/conv1/kernel: got (5, 5, 3, 64)" in message


def test_a_state_dict_of_another_architecture_is_rejected(bninception_state):
    with pytest.raises(ValueError, match="does not match resnet18"):
        convert.convert_state_dict(bninception_state, "resnet18")


def test_load_pretrained_replaces_only_the_backbone(resnet18_state, tmp_path):
    path = str(tmp_path / "r18.npz")
    save_weights(path, convert.convert_state_dict(resnet18_state, "resnet18"), arch="resnet18")
    model = create_model(backbone="resnet18", embedding_dim=4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    variables = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)
    loaded = load_pretrained(variables, path, "resnet18")
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    np.testing.assert_array_equal(loaded["params"]["embedding"]["kernel"],
                                  variables["params"]["embedding"]["kernel"])
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["var"],
                                  resnet18_state["bn1.running_var"].numpy())
    np.testing.assert_array_equal(loaded["params"]["backbone"]["layer1"]["0"]["conv2"]["kernel"],
                                  resnet18_state["layer1.0.conv2.weight"].numpy()
                                  .transpose(2, 3, 1, 0))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(loaded))


def test_load_pretrained_errors(resnet18_state, tmp_path):
    weights = convert.convert_state_dict(resnet18_state, "resnet18")
    model = create_model(backbone="resnet34", embedding_dim=4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    good = str(tmp_path / "r18.npz")
    save_weights(good, weights, arch="resnet18")
    with pytest.raises(ValueError, match="backbone is 'resnet34' but .* holds 'resnet18'"):
        load_pretrained(variables, good, "resnet34")

    # A resnet18 file relabelled as resnet34: resnet34's extra blocks are missing.
    relabelled = str(tmp_path / "fake34.npz")
    np.savez(relabelled, __arch__=np.asarray("resnet34"), **weights)
    with pytest.raises(ValueError, match=r"missing \(\d+\): .*params/layer1/2/conv1/kernel"):
        load_pretrained(variables, relabelled, "resnet34")

    not_ours = str(tmp_path / "plain.npz")
    np.savez(not_ours, w=np.zeros(3))
    with pytest.raises(ValueError, match="not a proxy_jax weight file"):
        load_pretrained(variables, not_ours, "resnet34")

    bad = dict(weights)
    bad["params/bn1/scale"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"wrong shape \(1\): params/bn1/scale"):
        save_weights(str(tmp_path / "bad.npz"), bad, arch="resnet18")


def test_cli_rejects_unknown_architectures(tmp_path):
    with pytest.raises(SystemExit):
        convert.main(["--arch", "vgg16", "--src", "x.pth", "--dst", str(tmp_path / "y.npz")])
