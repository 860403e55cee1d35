"""prepare: tiny raw archives in the exact official formats -> the seeds' class-folder layout.

Each fixture writes the files the official archives ship, with their real structure:
Cars196 ``cars_annos.mat`` (scipy.io.savemat of a 1xN ``annotations`` struct with the fields
relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test, and a 1x196 ``class_names``
cell); CUB ``images.txt`` / ``image_class_labels.txt``; SOP ``Ebay_{train,test}.txt`` (a header
line, then ``image_id class_id super_class_id path``); In-shop ``list_eval_partition.txt`` (a
count line, a header line, then ``image_name item_id evaluation_status``).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from proxy_jax.data import datasets as D
from proxy_jax.data.prepare import main, prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


# Classes at both edges of each split, so an off-by-one in the split rule shows.
CARS_CLASSES = [1, 2, 98, 99, 150, 196]
CUB_CLASSES = [1, 2, 100, 101, 200]


@pytest.fixture
def cars_raw(tmp_path):
    src = tmp_path / "cars196"
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
             ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    rows = []
    image_id = 0
    for c in CARS_CLASSES:
        for k in range(2):
            image_id += 1
            rel = f"car_ims/{image_id:06d}.jpg"
            _jpeg(str(src / rel), image_id)
            # MATLAB stores every number as a 1x1 matrix; 'test' is the classification split flag.
            rows.append((rel, np.array([[3]], np.uint8), np.array([[4]], np.uint8),
                         np.array([[60]], np.uint16), np.array([[40]], np.uint16),
                         np.array([[c]], np.uint8), np.array([[k]], np.uint8)))
    annotations = np.array([rows], dtype=dtype)                       # 1 x N struct array
    class_names = np.empty((1, 196), dtype=object)
    for i in range(196):
        class_names[0, i] = f"Make Model {i + 1} 2012"
    scipy.io.savemat(str(src / "cars_annos.mat"),
                     {"annotations": annotations, "class_names": class_names})
    return str(src)


@pytest.fixture
def cub_raw(tmp_path):
    src = tmp_path / "CUB_200_2011"
    images, labels = [], []
    image_id = 0
    for c in CUB_CLASSES:
        folder = f"{c:03d}.Bird_{c}"
        for k in range(3):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{k:04d}_{image_id}.jpg"
            _jpeg(str(src / "images" / rel), image_id)
            images.append(f"{image_id} {rel}\n")
            labels.append(f"{image_id} {c}\n")
    (src / "images.txt").write_text("".join(images))
    (src / "image_class_labels.txt").write_text("".join(labels))
    return str(src)


@pytest.fixture
def sop_raw(tmp_path):
    src = tmp_path / "Stanford_Online_Products"
    splits = {"train": [(1, "bicycle", 2), (2, "bicycle", 1), (11318, "toaster", 2)],
              "test": [(11319, "bicycle", 2), (22634, "toaster", 3)]}
    image_id = 0
    for split, classes in splits.items():
        lines = ["image_id class_id super_class_id path\n"]
        for class_id, superclass, count in classes:
            super_id = {"bicycle": 1, "toaster": 12}[superclass]
            for k in range(count):
                image_id += 1
                rel = f"{superclass}_final/{100000 + class_id}_{k}.JPG"
                _jpeg(str(src / rel), image_id)
                lines.append(f"{image_id} {class_id} {super_id} {rel}\n")
        (src / f"Ebay_{split}.txt").write_text("".join(lines))
    return str(src)


INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "train"),
    ("img/WOMEN/Skirts/id_00000008/01_1_front.jpg", "id_00000008", "query"),
    ("img/WOMEN/Skirts/id_00000008/01_2_side.jpg", "id_00000008", "gallery"),
    ("img/WOMEN/Skirts/id_00000008/01_4_full.jpg", "id_00000008", "gallery"),
    # The same item and file name under a second category: both files must survive.
    ("img/MEN/Tees_Tanks/id_00000008/01_4_full.jpg", "id_00000008", "gallery"),
    ("img/MEN/Tees_Tanks/id_00000011/03_1_front.jpg", "id_00000011", "query"),
    ("img/MEN/Tees_Tanks/id_00000012/01_7_additional.jpg", "id_00000012", "gallery"),
]


@pytest.fixture
def inshop_raw(tmp_path):
    src = tmp_path / "Inshop_Clothes"
    lines = [f"{len(INSHOP_ROWS)}\n", "image_name item_id evaluation_status\n"]
    for i, (rel, item, status) in enumerate(INSHOP_ROWS):
        _jpeg(str(src / rel), i)
        lines.append(f"{rel:<60s} {item:<14s} {status}\n")   # the official file pads columns
    (src / "list_eval_partition.txt").write_text("".join(lines))
    return str(src)


def _layout(root):
    """{split: {class: sorted file names}} of a prepared root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if files and dirpath != root:
            rel = os.path.relpath(dirpath, root).split(os.sep)
            out.setdefault("/".join(rel[:-1]), {})[rel[-1]] = sorted(files)
    return out


def test_fixture_mat_has_the_official_structure(cars_raw):
    """Proxy-Anchor's code/dataset/cars.py indexing must read our .mat as it reads the real one."""
    cars = scipy.io.loadmat(os.path.join(cars_raw, "cars_annos.mat"))
    assert cars["annotations"].shape == (1, 12) and cars["class_names"].shape == (1, 196)
    assert cars["annotations"].dtype.names == (
        "relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    # Proxy-Anchor reads int(a[5][0] - 1) and a[0][0]: numbers are 1x1 matrices, paths char rows.
    assert all(a[5].shape == (1, 1) and a[0].shape == (1,) for a in cars["annotations"][0])
    ys = [int(a[5][0][0]) - 1 for a in cars["annotations"][0]]
    paths = [a[0][0] for a in cars["annotations"][0]]
    assert ys[:4] == [0, 0, 1, 1] and paths[0] == "car_ims/000001.jpg"


def test_cars196(cars_raw, tmp_path):
    dst = str(tmp_path / "carDB")
    summary = prepare("cars196", cars_raw, dst)
    layout = _layout(dst)
    assert sorted(layout["train"]) == ["001", "002", "098"]
    assert sorted(layout["test"]) == ["099", "150", "196"]
    assert layout["train"]["001"] == ["000001.jpg", "000002.jpg"]
    assert summary["splits"] == {"train": {"classes": 3, "images": 6},
                                 "test": {"classes": 3, "images": 6}}
    # Hard links on one file system: the same file, no copy.
    assert summary["files_by_method"] == {"hardlink": 12}
    assert os.path.samefile(os.path.join(dst, "test/196/000012.jpg"),
                            os.path.join(cars_raw, "car_ims/000012.jpg"))
    assert os.path.isfile(os.path.join(cars_raw, "car_ims/000012.jpg"))   # raw untouched
    with open(os.path.join(dst, "prepare_summary.json")) as f:
        assert json.load(f)["files_by_method"] == {"hardlink": 12}
    _same_as_raw(dst, cars_raw, ["train", "test"])


def _same_as_raw(prepared, raw, splits):
    """The prepared folders and the raw files load as the same datasets."""
    for split in splits:
        a, b = D.load_benchmark(prepared, split), D.load_benchmark(raw, split)
        assert a.classes == b.classes and len(a) == len(b)
        # Same file contents in the same classes (names may differ where prepare renamed a clash).
        key = lambda ds: sorted((open(p, "rb").read(), ds.classes[y]) for p, y in ds.samples)
        assert key(a) == key(b)
        np.testing.assert_array_equal(
            np.asarray(a[0][0]), np.asarray(D.load_image(a.samples[0][0]))
        )


def test_cub200(cub_raw, tmp_path):
    dst = str(tmp_path / "cub")
    summary = prepare("cub200", cub_raw, dst, link="symlink")
    layout = _layout(dst)
    assert sorted(layout["train"]) == ["001.Bird_1", "002.Bird_2", "100.Bird_100"]
    assert sorted(layout["test"]) == ["101.Bird_101", "200.Bird_200"]
    assert summary["files_by_method"] == {"symlink": 15}
    assert os.path.islink(os.path.join(dst, "test/200.Bird_200/Bird_200_0000_13.jpg"))
    _same_as_raw(dst, cub_raw, ["train", "test"])
    test = D.load_benchmark(dst, "test")
    assert test.targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_sop(sop_raw, tmp_path):
    dst = str(tmp_path / "sop")
    summary = prepare("sop", sop_raw, dst, link="copy")
    layout = _layout(dst)
    assert sorted(layout["train"]) == ["00001", "00002", "11318"]
    assert sorted(layout["test"]) == ["11319", "22634"]
    assert layout["test"]["22634"] == ["122634_0.JPG", "122634_1.JPG", "122634_2.JPG"]
    assert summary["files_by_method"] == {"copy": 10}
    assert not os.path.samefile(os.path.join(dst, "train/00001/100001_0.JPG"),
                                os.path.join(sop_raw, "bicycle_final/100001_0.JPG"))
    _same_as_raw(dst, sop_raw, ["train", "test"])
    assert D.load_benchmark(dst, "test").targets.tolist() == [0, 0, 1, 1, 1]


def test_sop_dada_layout_reads_as_is(sop_raw, tmp_path):
    """DADA: Info_Files/Ebay_*.txt with the images under images/."""
    root = tmp_path / "online_products"
    os.makedirs(root / "Info_Files")
    os.rename(os.path.join(sop_raw, "Ebay_train.txt"), root / "Info_Files" / "Ebay_train.txt")
    os.rename(os.path.join(sop_raw, "Ebay_test.txt"), root / "Info_Files" / "Ebay_test.txt")
    os.rename(sop_raw, root / "images")
    train = D.load_benchmark(str(root), "train")
    assert train.classes == ["00001", "00002", "11318"] and len(train) == 5


def test_inshop(inshop_raw, tmp_path):
    dst = str(tmp_path / "inshop")
    summary = prepare("inshop", inshop_raw, dst)
    layout = _layout(dst)
    assert sorted(layout["train"]) == ["id_00000002", "id_00000007"]
    assert sorted(layout["test/query"]) == ["id_00000008", "id_00000011"]
    assert sorted(layout["test/gallery"]) == ["id_00000008", "id_00000012"]
    assert layout["test/gallery"]["id_00000008"] == [
        "01_2_side.jpg", "01_4_full.jpg", "img__MEN__Tees_Tanks__id_00000008__01_4_full.jpg"]
    assert summary["splits"] == {"gallery": {"classes": 2, "images": 4},
                                 "query": {"classes": 2, "images": 2},
                                 "train": {"classes": 2, "images": 3}}
    query, gallery = D.load_benchmark(dst, "query"), D.load_benchmark(dst, "gallery")
    assert query.classes == gallery.classes == ["id_00000008", "id_00000011", "id_00000012"]
    assert query.targets.tolist() == [0, 1] and gallery.targets.tolist() == [0, 0, 0, 2]
    _same_as_raw(dst, inshop_raw, ["train", "query", "gallery"])


def test_inshop_proxy_anchor_layout_reads_as_is(inshop_raw, tmp_path):
    """Proxy-Anchor: Inshop_Clothes/Eval/list_eval_partition.txt and Inshop_Clothes/Img/img/..."""
    root = tmp_path / "pa" / "Inshop_Clothes"
    os.makedirs(root / "Eval")
    os.makedirs(root / "Img")
    os.rename(
        os.path.join(inshop_raw, "list_eval_partition.txt"),
        root / "Eval" / "list_eval_partition.txt",
    )
    os.rename(os.path.join(inshop_raw, "img"), root / "Img" / "img")
    gallery = D.load_benchmark(str(root), "gallery")
    assert len(gallery) == 4 and gallery.targets.tolist() == [0, 0, 0, 2]
    with pytest.raises(ValueError, match='"query" or "gallery"'):
        D.load_benchmark(str(root), "test")


def test_hardlink_failure_falls_back_to_symlink(cars_raw, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_link)
    summary = prepare("cars196", cars_raw, str(tmp_path / "out"))
    assert summary["files_by_method"] == {"symlink": 12}
    assert os.path.islink(str(tmp_path / "out" / "train" / "001" / "000001.jpg"))


def test_errors(cars_raw, cub_raw, tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        prepare("cars", cars_raw, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare("cars196", str(tmp_path / "nowhere"), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat"):
        prepare("cars196", cub_raw, str(tmp_path / "a"))
    os.remove(os.path.join(cars_raw, "car_ims", "000003.jpg"))
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*000003\.jpg"):
        prepare("cars196", cars_raw, str(tmp_path / "a"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="full"):
        prepare("cub200", cub_raw, str(tmp_path / "full"))
    with open(os.path.join(cub_raw, "images.txt"), "a") as f:
        f.write("99 a b c\n")
    with pytest.raises(ValueError, match="expected 2 columns"):
        prepare("cub200", cub_raw, str(tmp_path / "b"))


def test_cli(sop_raw, tmp_path, capsys):
    dst = str(tmp_path / "cli")
    assert main(["--dataset", "sop", "--src", sop_raw, "--dst", dst, "--link", "hardlink"]) == 0
    out = capsys.readouterr().out
    assert "train         3 classes        5 images" in out and "hardlink: 10" in out
    # The module entry point as users call it.
    result = subprocess.run(
        [sys.executable, "-m", "proxy_jax.data.prepare", "--dataset", "sop", "--src", sop_raw,
         "--dst", str(tmp_path / "cli2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test          2 classes        5 images" in result.stdout
