"""proxy_jax.models.mxnet_params and the googlenet_gluon backbone against MXNet / gluoncv.

Fixture tests/fixtures/googlenet_gluon.npz, made in a scratch venv outside the repository
(Python 3.8, MXNet 1.9.1 CPU, gluoncv 0.10.5's ``model_zoo/googlenet.py`` loaded from its
file): ``GoogLeNet()`` initialised and run once on a 224×224 input to create its parameters;
parameter i of ``net._collect_params_with_prefix()`` (names and shapes stored as ``names``,
``shapes``) set to :func:`_random_weight` ``(i, name, shape)``; ``input`` = RandomState(1234)
``randn(2, 3, 48, 48)`` float32 (NCHW); ``features`` [2, 1024, 1, 1] the output of the
blocks conv1 … inception5b (the backbone of the official ``model/basenet.py``) in inference
mode. At 48×48 the map entering maxpool4 is 3×3, where gluon's floor rounding (1×1) and
torchvision's ceil rounding (2×2) differ. ``tiny_params``: the bytes of
``save_parameters`` of ``HybridSequential(Conv2D(4, 3, in_channels=2), BatchNorm(4),
Dense(3, in_units=5))`` (Normal(1) init, gamma set to arange(4) + 0.5), its arrays as
``tiny/<name>``; ``tiny_f16_params``: ``mx.nd.save`` of {'a': float16 arange(6) [2, 3],
'arg:b': float64 [1.5, -2]}.
"""
import functools
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxy_jax import convert
from proxy_jax.models import create_model, load_pretrained, load_weights, save_weights
from proxy_jax.models.mxnet_params import read_mxnet_params

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "googlenet_gluon.npz"


@functools.lru_cache(maxsize=None)
def _fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _random_weight(index, name, shape):
    """The fixture's random value of gluon parameter ``index`` (``name``, ``shape``)."""
    rng = np.random.RandomState(index)
    leaf = name.rsplit(".", 1)[1]
    if leaf in ("gamma", "running_var"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if leaf in ("beta", "running_mean", "bias"):
        return (0.1 * rng.randn(*shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.randn(*shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _write_params(path, arrays):
    """Writes ``{name: float32/float16/float64 array}`` in MXNet's format (checked below)."""
    flags = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}
    out = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
    for a in arrays.values():
        out.append(struct.pack(f"<IiI{a.ndim}qiii", 0xF993FAC9, 0, a.ndim, *a.shape, 1, 0,
                               flags[a.dtype]))
        out.append(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        out.append(struct.pack("<Q", len(name.encode())) + name.encode())
    pathlib.Path(path).write_bytes(b"".join(out))


def _gluon_random_params():
    data = _fixture()
    shapes = [tuple(int(d) for d in s.strip("()").split(",") if d.strip())
              for s in data["shapes"]]
    return {str(n): _random_weight(i, str(n), s) for i, (n, s) in enumerate(zip(data["names"],
                                                                                  shapes))}


# ----------------------------------------------------------------- the file format


def test_reads_files_written_by_mxnet(tmp_path):
    data = _fixture()
    path = tmp_path / "tiny.params"
    path.write_bytes(data["tiny_params"].tobytes())
    arrays = read_mxnet_params(str(path))
    expected = {k[len("tiny/"):]: v for k, v in data.items() if k.startswith("tiny/")}
    assert sorted(arrays) == sorted(expected)
    for name, value in expected.items():
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], value)

    path.write_bytes(data["tiny_f16_params"].tobytes())
    arrays = read_mxnet_params(str(path))
    assert list(arrays) == ["a", "b"]  # 'arg:' is removed
    assert arrays["a"].dtype == np.float16 and arrays["b"].dtype == np.float64
    np.testing.assert_array_equal(arrays["a"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(arrays["b"], [1.5, -2.0])


def test_test_writer_reproduces_mxnet_bytes(tmp_path):
    data = _fixture()
    tiny = {k[len("tiny/"):]: v for k, v in data.items() if k.startswith("tiny/")}
    order = _file_order(tmp_path, data["tiny_params"])
    _write_params(tmp_path / "mine.params", {k: tiny[k] for k in order})
    assert (tmp_path / "mine.params").read_bytes() == data["tiny_params"].tobytes()


def _file_order(tmp_path, raw):
    path = tmp_path / "order.params"
    path.write_bytes(raw.tobytes())
    return list(read_mxnet_params(str(path)))


def test_bad_files_raise_value_errors(tmp_path):
    data = _fixture()
    raw = data["tiny_params"].tobytes()
    cases = {"not an MXNet .params file": b"\x00" * 24, "truncated": raw[:200],
             "has magic": raw[:24] + b"\x00" * 4 + raw[28:]}
    for match, content in cases.items():
        path = tmp_path / "bad.params"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            read_mxnet_params(str(path))


# ----------------------------------------------------------------- googlenet_gluon


def test_gluon_names_map_to_torchvision_names():
    renamed = convert.gluon_googlenet_to_torch(
        {"conv1.0.weight": 0, "conv1.1.gamma": 1, "conv3.1.running_var": 2,
         "inception3a.0.0.0.weight": 3, "inception3a.1.1.1.beta": 4,
         "inception4e.2.0.1.running_mean": 5, "inception5b.3.1.0.weight": 6,
         "output.weight": 7, "head.2.bias": 8})
    assert renamed == {"conv1.conv.weight": 0, "conv1.bn.weight": 1, "conv3.bn.running_var": 2,
                       "inception3a.branch1.conv.weight": 3, "inception3a.branch2.1.bn.bias": 4,
                       "inception4e.branch3.0.bn.running_mean": 5,
                       "inception5b.branch4.1.conv.weight": 6, "output.weight": 7,
                       "head.2.bias": 8}


def _features(backbone, weights_path, images):
    model = create_model(backbone=backbone, embedding_dim=4, pooling="gap")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables = load_pretrained(zeros, str(weights_path), backbone)
    out = jax.jit(lambda v, x: model.apply(v, x, method="outputs"))(variables, images)
    return out["features"]


def test_converted_gluon_googlenet_matches_gluoncv(tmp_path, capsys):
    data = _fixture()
    src, dst = tmp_path / "googlenet.params", tmp_path / "googlenet_gluon.npz"
    _write_params(src, _gluon_random_params())
    assert convert.main(["--arch", "googlenet_gluon", "--src", str(src),
                         "--dst", str(dst)]) == 0
    assert "googlenet_gluon" in capsys.readouterr().out
    images = jnp.asarray(data["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    features = _features("googlenet_gluon", dst, images)
    expected = data["features"].transpose(0, 2, 3, 1)
    assert features.shape == expected.shape == (2, 1, 1, 1024)
    err = float(np.max(np.abs(np.asarray(features) - expected)) / np.max(np.abs(expected)))
    assert err < 1e-4
    # torchvision's GoogLeNet with the same weights rounds maxpool4 up: 2x2 here
    save_weights(str(tmp_path / "as_torchvision.npz"), load_weights(str(dst))[1], arch="googlenet")
    assert _features("googlenet", tmp_path / "as_torchvision.npz", images).shape == (2, 2, 2, 1024)


def test_params_file_needs_the_gluon_arch(tmp_path):
    src = tmp_path / "x.params"
    _write_params(src, {"a": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="only --arch googlenet_gluon reads those"):
        convert.main(["--arch", "googlenet", "--src", str(src), "--dst", str(tmp_path / "o")])
