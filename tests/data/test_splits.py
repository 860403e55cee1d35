"""load_splits: the data sets each ``config.data.dataset`` names (tfds: test_tfds_sources.py)."""
import os

import numpy as np
import pytest
from PIL import Image

from proxy_jax.data import ImageFolder, load_splits
from proxy_jax.data.splits import default_embedded_root


def _folder(root, classes, per_class=2):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(os.path.join(root, c, f"{i}.jpg"))


def test_class_folder_benchmarks(tmp_path):
    _folder(str(tmp_path / "train"), ["a", "b", "c"])
    _folder(str(tmp_path / "test"), ["d", "e"])
    for dataset in ("folder", "cars196", "cub200", "sop"):
        train, test, gallery = load_splits(dataset, str(tmp_path))
        assert isinstance(train, ImageFolder) and train.classes == ["a", "b", "c"]
        assert test.classes == ["d", "e"] and len(test) == 4 and gallery is None


def test_dada_one_folder_datasets(tmp_path):
    # DADA's loaders: Cars196 folders halved in name order, CUB folders in id order.
    _folder(str(tmp_path / "images"), ["10.x", "9.y", "2.z", "1.w"])
    cars = load_splits("cars196_dada", str(tmp_path))
    assert cars.train.classes == ["1.w", "10.x"] and cars.test.classes == ["2.z", "9.y"]
    cub = load_splits("cub200_dada", str(tmp_path))
    assert cub.train.classes == ["1.w", "2.z"] and cub.test.classes == ["9.y", "10.x"]
    assert cub.gallery is None and len(cub.train) == 4 and cub.num_classes == 2


def test_inshop_has_query_and_gallery_with_one_class_index(tmp_path):
    _folder(str(tmp_path / "train"), ["a", "b"])
    _folder(str(tmp_path / "test" / "query"), ["x", "y"], per_class=1)
    _folder(str(tmp_path / "test" / "gallery"), ["x", "z"], per_class=3)
    train, query, gallery = load_splits("inshop", str(tmp_path))
    assert len(train) == 4 and len(query) == 2 and len(gallery) == 6
    assert query.class_to_idx == gallery.class_to_idx == {"x": 0, "y": 1, "z": 2}
    np.testing.assert_array_equal(sorted(set(gallery.targets)), [0, 2])


def test_embedded_is_written_where_asked_and_reused(tmp_path):
    root = str(tmp_path / "embedded")
    train, test, gallery = load_splits("embedded", root)
    assert os.path.isdir(os.path.join(root, "train")) and gallery is None
    assert len(train.classes) == len(test.classes) == 100
    assert set(train.classes).isdisjoint(test.classes)  # zero-shot
    mtime = os.path.getmtime(train.paths[0])
    again = load_splits("embedded", root)
    assert again.train.paths == train.paths
    assert os.path.getmtime(train.paths[0]) == mtime  # not rewritten
    assert default_embedded_root().endswith(os.path.join(".cache", "proxy_jax", "embedded"))


def test_a_user_folder_is_never_replaced_by_the_embedded_set(tmp_path):
    _folder(str(tmp_path / "train"), ["mine"])
    _folder(str(tmp_path / "test"), ["yours"])
    before = sorted(os.listdir(tmp_path / "train" / "mine"))
    with pytest.raises(ValueError, match="dataset=folder"):
        load_splits("embedded", str(tmp_path))
    assert sorted(os.listdir(tmp_path / "train" / "mine")) == before


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_splits("imagenet", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        load_splits("folder", str(tmp_path / "absent"))
