"""Map-style datasets: the layouts of the seed repositories, image modes, bad input, torch sources."""

import io
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from proxy_jax.data import datasets as D


def _write_image(path, *, mode="RGB", size=(6, 5), value=120, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new(mode, size, value if mode != "RGB" else (value, 50, 200))
    image.save(path, format=fmt)


def _folder(root, classes, per_class=2, ext=".jpg"):
    for c in classes:
        for i in range(per_class):
            _write_image(os.path.join(root, c, f"{c}_{i}{ext}"), value=10 * i + 40)


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_matches_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    root = str(tmp_path / "train")
    _folder(root, ["b", "a", "10", "9"], per_class=3)
    _write_image(os.path.join(root, "a", "nested", "deep.png"))   # torchvision walks sub-folders
    ours = D.ImageFolder(root)
    ref = torchvision.datasets.ImageFolder(root)
    assert ours.classes == ref.classes == ["10", "9", "a", "b"]
    assert ours.class_to_idx == ref.class_to_idx
    assert [(os.path.normpath(p), y) for p, y in ours.samples] == \
        [(os.path.normpath(p), y) for p, y in ref.samples]
    assert ours.targets.tolist() == list(ref.targets)
    image, label = ours[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == ref[4][1]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(ref[4][0]))


def test_non_image_files_are_ignored_and_counted(tmp_path, caplog):
    root = str(tmp_path)
    _folder(root, ["x", "y"])
    for junk in ("x/notes.txt", "x/._x_0.jpg", "y/Thumbs.db", "y/labels.csv"):
        (tmp_path / junk).write_bytes(b"not an image")
    with caplog.at_level(logging.INFO, logger="proxy_jax.data.datasets"):
        ds = D.ImageFolder(root)
    assert len(ds) == 4
    assert sorted(os.path.basename(p) for p in ds.ignored_files) == \
        ["._x_0.jpg", "Thumbs.db", "labels.csv", "notes.txt"]
    assert "ignored 4 non-image" in caplog.text


# ----------------------------------------------------------------------------- image modes


@pytest.mark.parametrize("mode,value,fmt,expected", [
    ("L", 77, "PNG", (77, 77, 77)),
    ("LA", (77, 10), "PNG", (77, 77, 77)),
    ("RGBA", (200, 100, 50, 0), "PNG", (200, 100, 50)),      # alpha dropped, as torchvision
    ("1", 1, "PNG", (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), "JPEG", None),                 # checked against PIL below
    ("I;16", 40000, "PNG", (156, 156, 156)),                  # 16-bit: >> 8, not clipped
])
def test_modes_are_converted_to_rgb(tmp_path, mode, value, fmt, expected):
    path = str(tmp_path / f"img.{fmt.lower()}")
    Image.new(mode, (4, 4), value).save(path, format=fmt)
    image = D.load_image(path)
    assert image.mode == "RGB" and image.size == (4, 4)
    pixel = tuple(int(v) for v in np.asarray(image)[1, 1])
    if expected is None:  # CMYK JPEG: PIL's own conversion, and red stays red
        with Image.open(path) as raw:
            assert raw.mode == "CMYK"
            assert pixel == raw.convert("RGB").getpixel((1, 1))
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60
    else:
        assert pixel == expected


def test_palette_image_is_converted(tmp_path):
    path = str(tmp_path / "p.png")
    image = Image.new("P", (3, 3), 1)
    image.putpalette([0, 0, 0, 10, 220, 30] + [0] * 762)
    image.save(path)
    assert D.load_image(path).getpixel((0, 0)) == (10, 220, 30)


def test_decode_image_bytes():
    buf = io.BytesIO()
    Image.new("L", (5, 2), 9).save(buf, format="PNG")
    image = D.decode_image_bytes(buf.getvalue())
    assert image.mode == "RGB" and image.size == (5, 2)
    with pytest.raises(D.CorruptImageError, match="record-7"):
        D.decode_image_bytes(b"garbage", name="record-7")


# ----------------------------------------------------------------------------- corrupt images


def _corrupt_folder(tmp_path):
    root = str(tmp_path / "train")
    _folder(root, ["a", "b"], per_class=3)
    good = open(os.path.join(root, "a", "a_0.jpg"), "rb").read()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.path.join(root, "b", "big.jpg"), quality=95)
    full = open(os.path.join(root, "b", "big.jpg"), "rb").read()
    with open(os.path.join(root, "b", "big.jpg"), "wb") as f:
        f.write(full[: len(full) // 2])                               # truncated JPEG
    with open(os.path.join(root, "a", "zz_garbage.jpg"), "wb") as f:
        f.write(b"\x00" * 50)                                         # not an image at all
    assert good  # the intact files stay readable
    return root


def test_corrupt_image_raises_naming_the_file(tmp_path):
    ds = D.ImageFolder(_corrupt_folder(tmp_path))
    assert len(ds) == 8
    bad = {
        i: p for i, p in enumerate(ds.paths) if os.path.basename(p) in ("big.jpg", "zz_garbage.jpg")
    }
    assert len(bad) == 2
    for index, path in bad.items():
        with pytest.raises(D.CorruptImageError) as info:
            ds[index]
        assert path in str(info.value) and info.value.path == path
    # The good images still read.
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)) if i not in bad)


def test_skip_corrupt_counts_and_drops(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="proxy_jax.data.datasets"):
        ds = D.ImageFolder(_corrupt_folder(tmp_path), skip_corrupt=True, num_threads=2)
    assert len(ds) == 6 and len(ds.skipped) == 2
    assert sorted(os.path.basename(p) for p, _ in ds.skipped) == ["big.jpg", "zz_garbage.jpg"]
    assert "skipped 2 corrupt" in caplog.text
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        assert ds[i][0].mode == "RGB"


def test_missing_image_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        D.load_image(str(tmp_path / "nope.jpg"))


def test_corrupt_image_error_survives_pickling():
    """Loader workers send their errors to the main process by pickling."""
    with pytest.raises(D.CorruptImageError) as info:
        D.decode_image_bytes(b"garbage", name="record-7")
    error = info.value
    error.add_note("while reading shard 3")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is D.CorruptImageError and str(clone) == str(error)
    assert (clone.path, clone.reason) == ("record-7", error.reason) and "record-7" in str(clone)
    assert clone.__notes__ == ["while reading shard 3"]


# The loader with worker processes: each error crosses the process boundary by pickling.

def _loader(ds, **kwargs):
    from proxy_jax.data import ShuffleSampler, eval_transform, make_loader
    return make_loader(ds, batch_size=kwargs.pop("batch_size", len(ds)), seed=0,
                       sampler=ShuffleSampler(len(ds), shuffle=False),
                       transform=eval_transform(8, 8), num_workers=2, **kwargs)


@pytest.mark.parametrize("bad", ["garbage", "truncated", "missing"])
def test_bad_image_is_named_through_worker_processes(tmp_path, bad):
    root = _corrupt_folder(tmp_path)
    path = {"garbage": os.path.join(root, "a", "zz_garbage.jpg"),
            "truncated": os.path.join(root, "b", "big.jpg"),
            "missing": os.path.join(root, "b", "gone.jpg")}[bad]
    good = [os.path.join(root, c, f"{c}_{i}.jpg") for c in "ab" for i in range(3)]
    ds = D.ImageDataset([(p, 0) for p in good[:3]] + [(path, 1)], ["a", "b"])
    with _loader(ds) as loader:
        with pytest.raises(FileNotFoundError if bad == "missing" else D.CorruptImageError) as info:
            next(loader)
    assert path in str(info.value), str(info.value)
    if bad != "missing":
        assert info.value.path == path and info.value.reason


def test_skip_corrupt_through_worker_processes(tmp_path):
    ds = D.ImageFolder(_corrupt_folder(tmp_path), skip_corrupt=True, num_threads=2)
    assert len(ds) == 6
    with _loader(ds, batch_size=3, num_epochs=1) as loader:
        batches = list(loader)
    assert len(batches) == 2
    assert np.concatenate([b["label"] for b in batches]).tolist() == ds.targets.tolist()


# ----------------------------------------------------------------------------- bad layouts


def test_missing_root(tmp_path):
    missing = str(tmp_path / "carDB")
    with pytest.raises(FileNotFoundError, match="carDB"):
        D.load_benchmark(missing, "train")
    with pytest.raises(FileNotFoundError, match="carDB"):
        D.ImageFolder(missing)


def test_wrong_layout_names_root_and_expectation(tmp_path):
    _folder(str(tmp_path / "somewhere"), ["a"])
    with pytest.raises(
        ValueError, match=r"no 'train' split found under .*expected .*train/<class>"
    ):
        D.load_benchmark(str(tmp_path), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_benchmark(str(tmp_path), "val")


def test_empty_class_and_no_classes(tmp_path):
    root = tmp_path / "train"
    _folder(str(root), ["a"])
    os.makedirs(root / "empty")
    (root / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*empty.* holds no image files"):
        D.load_benchmark(str(tmp_path), "train")
    os.makedirs(tmp_path / "bare")
    with pytest.raises(ValueError, match="no class folders"):
        D.ImageFolder(str(tmp_path / "bare"))


def test_labels_outside_classes_rejected(tmp_path):
    with pytest.raises(ValueError, match="label 3"):
        D.ImageDataset([("x.jpg", 3)], ["a", "b"])


# ----------------------------------------------------------------------------- seed layouts


def test_proxy_synthesis_cardb_layout(tmp_path):
    """dataset/prepare_cars.py of proxy-synthesis/MemVir: carDB/{train,test}/<1-based class id>."""
    root = tmp_path / "carDB"
    _folder(str(root / "train"), ["1", "2", "10", "98"])
    _folder(str(root / "test"), ["99", "100", "196"], per_class=3)
    train, test = D.load_benchmark(str(root), "train"), D.load_benchmark(str(root), "test")
    assert (len(train), len(train.classes)) == (8, 4)
    assert (len(test), len(test.classes)) == (9, 3)
    assert set(train.classes).isdisjoint(test.classes)
    assert sorted(set(test.targets.tolist())) == [0, 1, 2]


def test_proxy_synthesis_inshop_layout_shares_labels(tmp_path):
    """proxy-synthesis main.py reads In-shop as test/{gallery,query}/<item id>/*."""
    root = tmp_path / "inshop"
    _folder(str(root / "train"), ["id_1", "id_2"])
    _folder(str(root / "test" / "query"), ["id_3", "id_5"])
    _folder(str(root / "test" / "gallery"), ["id_4", "id_5"], per_class=3)
    query = D.load_benchmark(str(root), "query")
    gallery = D.load_benchmark(str(root), "gallery")
    assert query.classes == gallery.classes == ["id_3", "id_4", "id_5"]
    assert query.targets.tolist() == [0, 0, 2, 2]
    assert gallery.targets.tolist() == [1, 1, 1, 2, 2, 2]
    assert len(D.load_benchmark(str(root), "train").classes) == 2
    with pytest.raises(ValueError, match='"query" or "gallery"'):
        D.load_benchmark(str(root), "test")


def test_dada_images_folder_split_in_halves(tmp_path):
    """DADA datasets/cub200.py, cars196.py: <root>/images/<class>, sorted classes halved."""
    classes = [f"{i:03d}.Bird_{i}" for i in range(1, 7)]
    _folder(str(tmp_path / "images"), classes)
    train, test = D.load_benchmark(str(tmp_path), "train"), D.load_benchmark(str(tmp_path), "test")
    assert train.classes == classes[:3] and test.classes == classes[3:]
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]


# Cars196-style model-name folders with illustrative ids ordered as a meta file may order them
# (not alphabetical within a make; capitals sort before small letters).
CARS_IDS = {"AM General Hummer SUV 2000": 1, "Acura RL Sedan 2012": 2, "Acura TL Sedan 2012": 3,
            "Acura Integra Type R 2001": 4, "Aston Martin V8 Vantage Coupe 2012": 5,
            "smart fortwo Convertible 2012": 6}


def test_dada_cars_folder_halves_the_names_sorted_not_the_ids(tmp_path):
    """DADA datasets/cars196.py: sorted(os.listdir(images)) halved, first half train."""
    _folder(str(tmp_path / "images"), list(CARS_IDS))
    _write_image(str(tmp_path / "images" / "Acura RL Sedan 2012" / "._0.jpg"))  # macOS shadow
    _write_image(str(tmp_path / "images" / "Acura RL Sedan 2012" / "sub" / "deep.jpg"))
    train = D.load_dada_folder(str(tmp_path), "train", dataset="cars196")
    test = D.load_dada_folder(str(tmp_path), "test", dataset="cars196")
    by_name = sorted(CARS_IDS)
    assert train.classes == by_name[:3] == ["AM General Hummer SUV 2000",
                                            "Acura Integra Type R 2001", "Acura RL Sedan 2012"]
    assert test.classes == by_name[3:]
    # Not the split by id: class 4 trains, class 3 is tested.
    assert sorted(CARS_IDS[c] for c in train.classes) == [1, 2, 4] != [1, 2, 3]
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]  # '._' and sub-folder files left out
    assert [os.path.basename(p) for p, _ in train.samples[4:]] == [
        "Acura RL Sedan 2012_0.jpg", "Acura RL Sedan 2012_1.jpg"]


def test_dada_cub_folder_sorts_by_class_id(tmp_path):
    """DADA datasets/cub200.py: folders sorted by int(name.split('.')[0]), then halved."""
    names = ["1.Albatross", "10.Cowbird", "11.Crow", "12.Finch", "2.Auklet", "3.Blackbird"]
    _folder(str(tmp_path / "images"), names)
    train = D.load_dada_folder(str(tmp_path), "train", dataset="cub200")
    test = D.load_dada_folder(str(tmp_path), "test", dataset="cub200")
    assert train.classes == ["1.Albatross", "2.Auklet", "3.Blackbird"]  # ids 1-3, not "1","10","11"
    assert test.classes == ["10.Cowbird", "11.Crow", "12.Finch"]
    # With CUB's zero-padded names this is the standard 1-100 split, as by load_benchmark.
    assert D.dada_class_order(["002.b", "001.a", "010.c"], "cub200") == ["001.a", "002.b", "010.c"]
    _folder(str(tmp_path / "bad" / "images"), ["1.a", "Unnumbered"])
    with pytest.raises(ValueError, match="does not start with its numeric id"):
        D.load_dada_folder(str(tmp_path / "bad"), "train", dataset="cub200")


def test_dada_folder_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="DADA cars196 folder"):
        D.load_dada_folder(str(tmp_path), "train", dataset="cars196")
    _folder(str(tmp_path / "images"), ["a", "b"])
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        D.load_dada_folder(str(tmp_path), "query", dataset="cars196")
    with pytest.raises(ValueError, match="dataset must be one of"):
        D.load_dada_folder(str(tmp_path), "train", dataset="sop")
    os.makedirs(tmp_path / "images" / "c_empty")
    with pytest.raises(ValueError, match="holds no image files"):
        D.load_dada_folder(str(tmp_path), "test", dataset="cars196")


# ----------------------------------------------------------------------------- any map-style source


def test_torch_dataset_works_as_a_source(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")

    class Squares(torch.utils.data.Dataset):  # no .targets: labels must be read through __getitem__
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return Image.new("RGB", (4, 4), (i, 0, 0)), i % 5

    source = Squares()
    np.testing.assert_array_equal(D.dataset_labels(source), [i % 5 for i in range(10)])
    train, test = D.zero_shot_split(source, num_train_classes=3)
    assert isinstance(source, torch.utils.data.Dataset)
    assert len(train) == 6 and len(test) == 4
    assert train.targets.tolist() == [0, 1, 2, 0, 1, 2] and test.targets.tolist() == [0, 1, 0, 1]
    image, label = test[3]
    assert label == 1 and image.getpixel((0, 0)) == (9, 0, 0)     # source index 9, class 4 -> 1
    assert train.classes == [0, 1, 2] and test.class_to_idx == {3: 0, 4: 1}

    # A torchvision dataset (with .targets) in place of ours: same split, same samples.
    root = str(tmp_path / "all")
    _folder(root, ["a", "b", "c", "d"])
    tv_train, tv_test = D.zero_shot_split(
        torchvision.datasets.ImageFolder(root), num_train_classes=2
    )
    our_train, our_test = D.zero_shot_split(D.ImageFolder(root), num_train_classes=2)
    assert tv_test.targets.tolist() == our_test.targets.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(np.asarray(tv_test[2][0]), np.asarray(our_test[2][0]))
    with pytest.raises(ValueError, match="num_train_classes"):
        D.zero_shot_split(source, num_train_classes=5)


def test_datasets_pickle_for_worker_processes(tmp_path):
    """Loader workers receive the dataset by pickling; it must come back equal and readable."""
    import pickle
    root = str(tmp_path / "train")
    _folder(root, ["a", "b"])
    for ds in (D.ImageFolder(root), D.zero_shot_split(D.ImageFolder(root), num_train_classes=1)[1]):
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds) and clone.targets.tolist() == ds.targets.tolist()
        assert clone.classes == ds.classes
        np.testing.assert_array_equal(np.asarray(clone[1][0]), np.asarray(ds[1][0]))
