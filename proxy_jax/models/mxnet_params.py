"""Reads MXNet ``.params`` files (``mx.nd.save``, Gluon ``save_parameters``) without MXNet.

The file is MXNet's NDArray list format (``src/ndarray/ndarray.cc``, ``NDArray::Save``),
little-endian::

  u64 0x112 (list magic), u64 0, u64 n, then n arrays, then u64 n, n names (u64 len, bytes)
  array: u32 0xF993FAC9 (V2) or 0xF993FACA (V3), i32 storage type (0 = dense),
         u32 ndim, i64 dims[ndim], i32 dev_type, i32 dev_id, i32 dtype flag, the data

Only dense arrays are read (what Gluon writes for parameters). Names written by
``HybridBlock.export`` carry an ``arg:``/``aux:`` prefix, which is removed.
"""
from __future__ import annotations

import struct

import numpy as np

__all__ = ["read_mxnet_params"]

_LIST_MAGIC = 0x112
_ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)
# mshadow type flags
_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
           5: np.int8, 6: np.int64}


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated MXNet .params file at byte {self.pos}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def array(self, index: int) -> np.ndarray:
        magic, stype = self.take("<Ii")
        if magic not in _ARRAY_MAGICS:
            raise ValueError(f"{self.path}: array {index} has magic {magic:#x}, expected one of "
                             f"{[hex(m) for m in _ARRAY_MAGICS]} (MXNet >= 1.0 files)")
        if stype != 0:
            raise ValueError(f"{self.path}: array {index} is sparse (storage type {stype}); "
                             "only dense arrays are supported")
        (ndim,) = self.take("<I")
        shape = self.take(f"<{ndim}q")
        self.take("<ii")  # the context it was saved from
        (flag,) = self.take("<i")
        if flag not in _DTYPES:
            raise ValueError(f"{self.path}: array {index} has dtype flag {flag}, expected one "
                             f"of {sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[flag]).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64))
        if self.pos + count * dtype.itemsize > len(self.data):
            raise ValueError(f"{self.path}: truncated MXNet .params file in array {index}")
        out = np.frombuffer(self.data, dtype, count, self.pos).reshape(shape)
        self.pos += count * dtype.itemsize
        return out.astype(dtype.newbyteorder("="))


def read_mxnet_params(path: str) -> dict:
    """``{name: np.ndarray}`` of an MXNet ``.params`` file, in file order.

    Args:
      path: a file written by ``mx.nd.save`` with a dict, or by Gluon's
        ``save_parameters`` (structural names such as ``conv1.0.weight``).

    Raises:
      ValueError: not an MXNet NDArray list, a sparse or unknown-dtype array, no names, or
        a truncated file.
    """
    with open(path, "rb") as f:
        reader = _Reader(f.read(), path)
    magic, _ = reader.take("<QQ")
    if magic != _LIST_MAGIC:
        raise ValueError(f"{path}: not an MXNet .params file (magic {magic:#x}, "
                         f"expected {_LIST_MAGIC:#x})")
    (count,) = reader.take("<Q")
    arrays = [reader.array(i) for i in range(count)]
    (num_names,) = reader.take("<Q")
    if num_names != count:
        raise ValueError(f"{path}: {count} arrays but {num_names} names; expected a named "
                         "list (mx.nd.save with a dict, or save_parameters)")
    names = []
    for _ in range(num_names):
        (length,) = reader.take("<Q")
        names.append(bytes(reader.take(f"<{length}s")[0]).decode("utf-8"))
    return {name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name: array
            for name, array in zip(names, arrays)}
