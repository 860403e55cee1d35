"""2-D convolutions on the CPU through oneDNN, the library behind PyTorch's CPU convolutions.

XLA's CPU backend computes convolutions with its own generic kernels. On ResNet-50 layers
(batch 32, 2 cores) they ran at 0.4-0.65x oneDNN's speed forward and 0.1-0.3x on the weight
gradient, which made a ResNet-50 training step half as fast as PyTorch's. Here the three
convolutions of a training step (forward, input gradient, weight gradient) are oneDNN
primitives called from XLA through its FFI (``csrc/onednn_conv.cc``), tied together by a
``jax.custom_vjp``, so jit, grad and the rest of the graph stay XLA's.

The same library also computes dense layers (:func:`dense`: ``x @ kernel + bias`` and its
two gradients as oneDNN matmuls, used by ``proxy_jax.models.layers.Dense``, i.e. every
linear layer of a ViT): on ViT-S/16 forward+backward (batch 32, 2 cores, a Xeon with AMX)
they took the speed from 0.68x to 0.84x timm's, where XLA's dots ran at 230-370 GFLOP/s
and oneDNN's at 240-360 with no XLA thread pool running beside them.

The forward call also adds a bias and a residual and applies a ReLU inside oneDNN's loop
(post-ops). The backbones fold each frozen BatchNorm into its convolution's kernel and bias
(proxy_jax.models.layers.conv_bn), so conv → BN → (+ shortcut) → ReLU is one call, not a
call and a pass over the activations: on ResNet-50 forward+backward (batch 32) this took
the speed from 0.97x to 1.09x PyTorch's.

Which implementation a convolution or a dense layer uses is decided when it is traced, by
the environment variable ``PROXY_JAX_CONV``:

* ``auto`` (default): oneDNN for float32 convolutions when JAX computes on the CPU with a
  single device and the library can be built; XLA otherwise (GPUs, bfloat16, several
  devices: XLA cannot split a foreign call over a device mesh, so it would run it whole on
  every device).
* ``xla``: always XLA's convolution and dot, e.g. for forward-mode or higher-order
  derivatives, which the custom VJPs do not define.
* ``onednn``: oneDNN for every float32 convolution and dense layer, or an error saying why
  it is unavailable.

The library is compiled on first use with the system C++ compiler (``$CXX`` or ``c++``)
against oneDNN's headers and library (the ``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp``
wheels in requirements.txt, or ``$DNNLROOT``) and jaxlib's FFI headers, and cached under
``$PROXY_JAX_CACHE_DIR`` (default ``~/.cache/proxy_jax``), keyed by the source, jaxlib's
version and oneDNN's version: a few seconds once per machine and version.
"""
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["conv2d", "dense", "use_onednn", "unavailable_reason", "ENV_VAR"]

ENV_VAR = "PROXY_JAX_CONV"
_MODES = ("auto", "xla", "onednn")
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "onednn_conv.cc")
_TARGETS = {"forward": "PjOnednnConvForward", "backward_data": "PjOnednnConvBackwardData",
            "backward_weights": "PjOnednnConvBackwardWeights", "backward": "PjOnednnConvBackward",
            "matmul": "PjOnednnMatmul"}
_FFI_NAMES = {k: "proxy_jax_onednn_conv_" + k for k in _TARGETS}


def _find_onednn() -> tuple[Optional[str], Optional[str]]:
    """(include dir, library dir) of a oneDNN installation, or (None, None)."""
    roots = [os.environ.get("DNNLROOT"), sys.prefix, sys.base_prefix, "/usr/local", "/usr"]
    for root in filter(None, roots):
        include = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")):
            continue
        for lib in (os.path.join(root, "lib"), os.path.join(root, "lib64"),
                    os.path.join(root, "lib", "x86_64-linux-gnu")):
            if glob.glob(os.path.join(lib, "libdnnl.so*")):
                return include, lib
    return None, None


def _cache_dir() -> str:
    return os.environ.get("PROXY_JAX_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "proxy_jax"))


def _build(cxx: str, include: str, libdir: str) -> str:
    """Compiles the FFI library once per (source, jaxlib, oneDNN) and returns its path."""
    import jaxlib

    with open(_SOURCE, "rb") as f:
        source = f.read()
    with open(os.path.join(include, "oneapi", "dnnl", "dnnl_version.h"), "rb") as f:
        dnnl_version = f.read()
    digest = hashlib.sha256(source + dnnl_version + jaxlib.__version__.encode()
                            + libdir.encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"onednn_conv_{digest}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Compile to a private name, then rename: concurrent builders (test workers, processes
    # of one job) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
           f"-I{include}", _SOURCE, f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}", "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE} failed ({' '.join(cmd)}):\n"
                               + proc.stderr[-2000:])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None once the oneDNN library is built, loaded and registered with XLA; otherwise why
    it cannot be (no compiler, no oneDNN, a failed build). Runs once per process."""
    import ctypes

    compiler = os.environ.get("CXX", "c++")
    cxx = shutil.which(compiler)
    if cxx is None:
        return f"no C++ compiler ({compiler!r} not on PATH)"
    include, libdir = _find_onednn()
    if include is None:
        return ("oneDNN not found: pip install onednn-cpu-gomp onednn-devel-cpu-gomp "
                "(requirements.txt) or set DNNLROOT")
    try:
        library = ctypes.cdll.LoadLibrary(_build(cxx, include, libdir))
        for kind, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                _FFI_NAMES[kind], jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        return str(e)
    return None


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    logging.warning("oneDNN convolutions unavailable, using XLA's (slower on the CPU): %s",
                    reason)


def use_onednn(dtype) -> bool:
    """Whether a convolution computing in ``dtype`` and traced now should use oneDNN (see the
    module docstring for ``PROXY_JAX_CONV``)."""
    mode = _mode()
    if mode == "xla" or jnp.dtype(dtype) != jnp.float32:
        return False
    if mode == "auto" and (jax.default_backend() != "cpu" or jax.device_count() != 1):
        return False
    reason = unavailable_reason()
    if reason is None:
        return True
    if mode == "onednn":
        raise RuntimeError(f"{ENV_VAR}=onednn but oneDNN convolutions are unavailable: {reason}")
    _warn_fallback(reason)
    return False


def _attributes(stride: int, padding: int) -> dict:
    s, p = np.int64(stride), np.int64(padding)
    return dict(stride_h=s, stride_w=s, pad_top=p, pad_bottom=p, pad_left=p, pad_right=p)


def _call(kind: str, shapes, *operands: jax.Array, stride: int, padding: int, **attributes):
    """One oneDNN call; ``shapes`` is the result shape or a tuple of them."""
    out = (tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
           if isinstance(shapes[0], tuple) else jax.ShapeDtypeStruct(shapes, jnp.float32))
    return jax.ffi.ffi_call(_FFI_NAMES[kind], out, vmap_method="sequential")(
        *operands, **_attributes(stride, padding), **attributes)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, *,
           bias: Optional[jax.Array] = None, residual: Optional[jax.Array] = None,
           relu: bool = False) -> jax.Array:
    """``relu(conv2d(x, kernel) + bias + residual)`` in NHWC, computed by one oneDNN call.

    torch.nn.functional.conv2d semantics; the bias, the residual and the ReLU are optional
    and applied inside the convolution's loop (no extra pass over the output). With a frozen
    BatchNorm folded into ``kernel`` and ``bias`` this is a whole conv → BN → (+ shortcut) →
    ReLU (see proxy_jax.models.layers.conv_bn).

    Args:
      x: float32 [B, H, W, C].
      kernel: float32 [K, K, C, O] (HWIO).
      stride, padding: the same on both spatial axes; symmetric zero padding.
      bias: float32 [O], or None.
      residual: float32 [B, H', W', O] (the output's shape), or None.
      relu: apply max(0, .) last.

    Returns:
      float32 [B, H', W', O] with H' = (H + 2p - K) // s + 1, W' likewise.

    Call :func:`use_onednn` first: this assumes the library is registered.
    """
    k, o = kernel.shape[0], kernel.shape[3]
    if kernel.shape[1] != k or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape}")
    out_shape = _output_shape(x.shape, kernel.shape, stride, padding)
    if bias is not None and bias.shape != (o,):
        raise ValueError(f"bias {bias.shape} does not fit {o} output channels")
    if residual is not None and residual.shape != out_shape:
        raise ValueError(f"residual {residual.shape} does not fit the output {out_shape}")
    operands = [a for a in (x, kernel, bias, residual) if a is not None]
    if any(a.dtype != jnp.float32 for a in operands):
        raise TypeError("oneDNN convolutions are float32, got "
                        + ", ".join(str(a.dtype) for a in operands))
    return _conv(x, kernel, bias, residual, stride, padding, relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _conv(x, kernel, bias, residual, stride, padding, relu):
    operands = [a for a in (x, kernel, bias, residual) if a is not None]
    return _call("forward", _output_shape(x.shape, kernel.shape, stride, padding), *operands,
                 stride=stride, padding=padding, bias=bias is not None, relu=bool(relu))


def _output_shape(x_shape, kernel_shape, stride, padding) -> tuple:
    """[B, H', W', O] of a convolution of x [B, H, W, C] with a [K, K, C, O] kernel."""
    k = kernel_shape[0]
    spatial = tuple((n + 2 * padding - k) // stride + 1 for n in x_shape[1:3])
    return (x_shape[0], *spatial, kernel_shape[3])


def _conv_forward(x, kernel, bias, residual, stride, padding, relu):
    """With symbolic zeros: each operand says whether it is differentiated."""
    y = _conv(x.value, kernel.value, None if bias is None else bias.value,
              None if residual is None else residual.value, stride, padding, relu)
    need = (x.perturbed, kernel.perturbed, bias is not None and bias.perturbed,
            residual is not None and residual.perturbed)
    # The output is kept only for the ReLU's mask.
    return y, (x.value, kernel.value, y if relu else None, need)


def _conv_backward(stride, padding, relu, saved, dy):
    x, kernel, y, (need_dx, need_dkernel, need_dbias, need_dresidual) = saved
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    if relu:
        dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
    dbias = jnp.sum(dy, axis=(0, 1, 2)) if need_dbias else None
    dresidual = dy if need_dresidual else None
    kw = dict(stride=stride, padding=padding)
    dx = dkernel = None
    if need_dx and need_dkernel:  # one call: see csrc/onednn_conv.cc
        dx, dkernel = _call("backward", (x.shape, kernel.shape), x, kernel, dy, **kw)
    elif need_dx:
        dx = _call("backward_data", x.shape, dy, kernel, **kw)
    elif need_dkernel:  # e.g. the first layer, whose input (the images) needs no gradient
        dkernel = _call("backward_weights", kernel.shape, x, dy, **kw)
    return dx, dkernel, dbias, dresidual


_conv.defvjp(_conv_forward, _conv_backward, symbolic_zeros=True)


# ------------------------------------------------------------------------ dense layers

def _matmul(a: jax.Array, b: jax.Array, bias: Optional[jax.Array] = None, *,
            trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) · op(b) (+ bias) by one oneDNN call, op = transpose where asked (read in place).

    Args:
      a: float32 [M, K], or [K, M] with trans_a.
      b: float32 [K, N], or [N, K] with trans_b.
      bias: float32 [N], added to every row, or None.

    Returns:
      float32 [M, N].
    """
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    operands = (a, b) if bias is None else (a, b, bias)
    return jax.ffi.ffi_call(_FFI_NAMES["matmul"], out, vmap_method="sequential")(
        *operands, trans_a=bool(trans_a), trans_b=bool(trans_b), bias=bias is not None)


def dense(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of x, by oneDNN's matmul (forward and both
    gradients), like :func:`conv2d` for convolutions; ``flax.linen.Dense`` semantics.

    Args:
      x: float32 [..., K].
      kernel: float32 [K, N].
      bias: float32 [N], or None.

    Returns:
      float32 [..., N].

    Call :func:`use_onednn` first: this assumes the library is registered.
    """
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape}")
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise ValueError(f"bias {bias.shape} does not fit {kernel.shape[1]} outputs")
    y = _dense(x.reshape(-1, x.shape[-1]), kernel, bias)
    return y.reshape(x.shape[:-1] + (kernel.shape[1],))


@jax.custom_vjp
def _dense(x, kernel, bias):
    return _matmul(x, kernel, bias)


def _dense_forward(x, kernel, bias):
    return _dense(x, kernel, bias), (x, kernel, bias is not None)


def _dense_backward(saved, dy):
    x, kernel, has_bias = saved
    dx = _matmul(dy, kernel, trans_b=True)
    dkernel = _matmul(x, dy, trans_a=True)
    return dx, dkernel, (jnp.sum(dy, axis=0) if has_bias else None)


_dense.defvjp(_dense_forward, _dense_backward)


