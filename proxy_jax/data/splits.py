"""The train, query and gallery sets a config's ``data.dataset`` names.

=============== ============================================================================
``dataset``     where the images come from
=============== ============================================================================
``embedded``    the generated default set at ``root`` (written there when absent)
``folder``,     :func:`proxy_jax.data.load_benchmark` on ``root``: a ``train/`` + ``test/``
``cars196``,    class-folder root or an official raw layout
``cub200``,
``sop``
``inshop``      the same, with the test split as ``query`` and ``gallery``
``cars196_dada``, :func:`proxy_jax.data.load_dada_folder`: ``root/images/<class>`` split as
``cub200_dada``   DADA's loaders split it (sorted class folders halved; Cars196 by name,
                CUB by id; see there whether that is the split by class id)
``tfds``        :class:`proxy_jax.data.TfdsDataset` ``tfds_name`` (``root``: the tfds
                data directory; empty: tfds' default)
=============== ============================================================================

Example::

    train, test, gallery = load_splits("cars196", "/data/cars196")
    train, test, gallery = load_splits("tfds", "", tfds_name="cars196")
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

from proxy_jax.data.datasets import load_benchmark, load_dada_folder
from proxy_jax.data.embedded import ensure_embedded_dataset
from proxy_jax.data.tfds_sources import TfdsDataset

__all__ = ["DATASETS", "Splits", "load_splits", "default_embedded_root"]

#: The values of ``config.data.dataset``: the rows of the module docstring's table.
DATASETS = ("embedded", "folder", "cub200", "cars196", "sop", "inshop", "tfds",
            "cars196_dada", "cub200_dada")


class Splits(NamedTuple):
    """Map-style data sets ``ds[i] -> (PIL image, label)``, each with ``classes``."""

    train: Any
    test: Any  # the queries for In-shop
    gallery: Optional[Any]  # None: the test set is searched against itself

    @property
    def num_classes(self) -> int:
        """The training classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.train.classes)


def default_embedded_root() -> str:
    """``~/.cache/proxy_jax/embedded``: where the embedded set goes when no root is given."""
    return os.path.join(os.path.expanduser("~"), ".cache", "proxy_jax", "embedded")


def load_splits(dataset: str, root: str, *, tfds_name: str = "") -> Splits:
    """The splits of ``dataset`` (one of the names in the module docstring).

    Args:
      dataset: the kind of source, as ``config.data.dataset``.
      root: its folder (``embedded``: empty means :func:`default_embedded_root`; ``tfds``:
        the tfds data directory, empty means tfds' default).
      tfds_name: the tfds builder, for ``dataset="tfds"`` ('cars196', 'caltech_birds2011' or
        'stanford_online_products').

    Raises:
      ValueError: an unknown ``dataset``, a ``root`` in no known layout, or one the embedded
        set may not replace (one line naming the folder and what to pass instead).
      FileNotFoundError: ``root`` does not exist.
    """
    if dataset == "tfds":
        if not tfds_name:
            raise ValueError('dataset "tfds" needs tfds_name (e.g. "cars196")')
        data_dir = root or None
        return Splits(TfdsDataset(tfds_name, "train", data_dir=data_dir),
                      TfdsDataset(tfds_name, "test", data_dir=data_dir), None)
    if dataset in ("cars196_dada", "cub200_dada"):
        name = dataset[:-len("_dada")]
        return Splits(load_dada_folder(root, "train", dataset=name),
                      load_dada_folder(root, "test", dataset=name), None)
    if dataset == "embedded":
        root = ensure_embedded_dataset(root or default_embedded_root())
    elif dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    train = load_benchmark(root, "train")
    if dataset == "inshop":
        return Splits(train, load_benchmark(root, "query"), load_benchmark(root, "gallery"))
    return Splits(train, load_benchmark(root, "test"), None)
