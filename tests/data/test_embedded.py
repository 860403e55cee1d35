"""The embedded default data set: layout, determinism, reuse, partial-write recovery, difficulty."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from proxy_jax.data import datasets as D
from proxy_jax.data import embedded as E

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(num_train_classes=12, num_test_classes=10, images_per_class=6, image_size=24)


def _tree_hash(root):
    digest = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_default_layout(tmp_path):
    root = E.ensure_embedded_dataset(str(tmp_path / "embedded"))
    train, test = D.load_benchmark(root, "train"), D.load_benchmark(root, "test")
    assert len(train.classes) == len(test.classes) == 100
    assert len(train) == len(test) == 100 * 30
    assert set(train.classes).isdisjoint(test.classes)                 # zero-shot
    assert np.bincount(test.targets).tolist() == [30] * 100
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 0
    assert all(p.endswith(".png") for p in train.paths)
    with open(os.path.join(root, E.MARKER)) as f:
        marker = json.load(f)
    assert marker["config"]["format_version"] == E.FORMAT_VERSION and len(marker["sha256"]) == 64


def test_deterministic_and_seeded(tmp_path):
    a = E.ensure_embedded_dataset(str(tmp_path / "a"), seed=3, **SMALL)
    b = E.ensure_embedded_dataset(str(tmp_path / "b"), seed=3, **SMALL)
    c = E.ensure_embedded_dataset(str(tmp_path / "c"), seed=4, **SMALL)
    assert _tree_hash(a) == _tree_hash(b) != _tree_hash(c)


def test_reused_not_rewritten(tmp_path):
    root = E.ensure_embedded_dataset(str(tmp_path / "e"), **SMALL)
    probe = os.path.join(root, "train", "class_0000", "0000.png")
    stamp = os.stat(probe).st_mtime_ns
    os.utime(probe, ns=(stamp - 10**9, stamp - 10**9))
    assert E.ensure_embedded_dataset(root, **SMALL) == root
    assert os.stat(probe).st_mtime_ns == stamp - 10**9               # untouched


@pytest.mark.parametrize("damage", ["missing_class", "missing_image", "only_marker",
                                    "old_version", "other_args", "marker_without_contents"])
def test_damaged_or_outdated_set_of_ours_is_regenerated(tmp_path, damage):
    """A root holding our complete marker and only files it lists is ours: rewritten in place."""
    root = E.ensure_embedded_dataset(str(tmp_path / "e"), **SMALL)
    reference = _tree_hash(root)
    marker = os.path.join(root, E.MARKER)
    with open(marker) as f:
        content = json.load(f)
    args = dict(SMALL)
    if damage == "missing_class":
        shutil.rmtree(os.path.join(root, "test", "class_0013"))
    elif damage == "missing_image":
        os.remove(os.path.join(root, "train", "class_0002", "0005.png"))
    elif damage == "only_marker":
        shutil.rmtree(os.path.join(root, "train"))
        shutil.rmtree(os.path.join(root, "test"))
    elif damage == "old_version":
        content["config"]["format_version"] = E.FORMAT_VERSION - 1
    elif damage == "marker_without_contents":   # as the generator wrote it before the listing
        content.pop("contents", None)
        args["images_per_class"] = 4
    else:
        args["images_per_class"] = 4
    with open(marker, "w") as f:
        json.dump(content, f)
    assert E.ensure_embedded_dataset(root, **args) == root
    if args != SMALL:
        assert len(os.listdir(os.path.join(root, "train", "class_0000"))) == 4
    else:
        assert _tree_hash(root) == reference
    assert E._inspect(root, E._config(0, **args)) == "complete"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".embedded-")]   # no temp left


def test_current_marker_without_listing_is_reused(tmp_path):
    """A complete set whose marker predates the file listing is still recognised and reused."""
    root = E.ensure_embedded_dataset(str(tmp_path / "e"), **SMALL)
    marker = os.path.join(root, E.MARKER)
    with open(marker) as f:
        content = json.load(f)
    del content["contents"]
    with open(marker, "w") as f:
        json.dump(content, f)
    probe = os.path.join(root, "test", "class_0012", "0000.png")
    stamp = os.stat(probe).st_mtime_ns - 10**9
    os.utime(probe, ns=(stamp, stamp))
    assert E.ensure_embedded_dataset(root, **SMALL) == root
    assert os.stat(probe).st_mtime_ns == stamp


def test_refuses_foreign_folder_and_bad_args(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match=r"refusing .*/mine': it holds 1 entry \('thesis.tex'\) "
                       r"and no EMBEDDED.json.*new or empty --config.data.root") as info:
        E.ensure_embedded_dataset(str(tmp_path / "mine"), **SMALL)
    assert "--config.data.dataset" not in str(info.value)   # not a layout: no dataset advice
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(ValueError, match="it is a file, not a folder"):
        E.ensure_embedded_dataset(str(tmp_path / "file"), **SMALL)
    assert (tmp_path / "file").read_text() == "a file"
    with pytest.raises(ValueError, match="images_per_class"):
        E.ensure_embedded_dataset(str(tmp_path / "x"), images_per_class=1)


# ----------------------------------------------------------------------------- never delete
# Every layout datasets.load_benchmark reads, tiny, each with whatever marker a user's folder
# might carry: none, one of ours copied in (outdated or even matching), a truncated one, one
# missing fields. All must be refused with one line and left byte-identical.


def _jpeg(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _class_folders(root, splits, classes=("001", "002")):
    for split in splits:
        for i, c in enumerate(classes):
            for k in range(2):
                _jpeg(os.path.join(root, *split.split("/"), c, f"{c}_{k}.jpg"), i * 10 + k)


def _cardb(root):
    _class_folders(root, ["train"], ("001", "002"))
    _class_folders(root, ["test"], ("099", "100"))
    return "train"


def _inshop_folders(root):
    _class_folders(root, ["train", "test/query", "test/gallery"])
    return "query"


def _inshop_folders_at_root(root):
    _class_folders(root, ["train", "query", "gallery"])
    return "gallery"


def _cars196_raw(root):
    import scipy.io
    dtype = [("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    rows = []
    for i, c in enumerate([1, 98, 99, 196]):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _jpeg(os.path.join(root, rel), i)
        rows.append((rel, np.array([[c]], np.uint8), np.array([[0]], np.uint8)))
    scipy.io.savemat(os.path.join(root, "cars_annos.mat"),
                     {"annotations": np.array([rows], dtype=dtype)})
    return "test"


def _cub200_raw(root):
    images, labels = [], []
    for i, c in enumerate([1, 100, 101, 200]):
        rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
        _jpeg(os.path.join(root, "images", rel), i)
        images.append(f"{i + 1} {rel}\n")
        labels.append(f"{i + 1} {c}\n")
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.write("".join(images))
    with open(os.path.join(root, "image_class_labels.txt"), "w") as f:
        f.write("".join(labels))
    return "train"


def _sop_raw(root, info="", images=""):
    image_id = 0
    for split, classes in (("train", [1, 2]), ("test", [11319, 11320])):
        lines = ["image_id class_id super_class_id path\n"]
        for c in classes:
            image_id += 1
            rel = f"bicycle_final/{100000 + c}_0.JPG"
            _jpeg(os.path.join(root, images, rel), image_id)
            lines.append(f"{image_id} {c} 1 {rel}\n")
        os.makedirs(os.path.join(root, info), exist_ok=True)
        with open(os.path.join(root, info, f"Ebay_{split}.txt"), "w") as f:
            f.write("".join(lines))
    return "test"


def _inshop_raw(root, eval_dir="", img_dir=""):
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Skirts/id_00000008/01_1_front.jpg", "id_00000008", "query"),
            ("img/WOMEN/Skirts/id_00000008/01_2_side.jpg", "id_00000008", "gallery")]
    lines = [f"{len(rows)}\n", "image_name item_id evaluation_status\n"]
    for i, (rel, item, status) in enumerate(rows):
        _jpeg(os.path.join(root, img_dir, rel), i)
        lines.append(f"{rel} {item} {status}\n")
    os.makedirs(os.path.join(root, eval_dir), exist_ok=True)
    with open(os.path.join(root, eval_dir, "list_eval_partition.txt"), "w") as f:
        f.write("".join(lines))
    return "gallery"


def _dada_images(root):
    _class_folders(root, ["images"], ("001.A", "002.B", "003.C", "004.D"))
    return "test"


# name: (builder returning a split load_benchmark reads, the dataset to suggest)
LAYOUTS = {
    "class_folders": (_cardb, "folder"),
    "inshop_class_folders": (_inshop_folders, "inshop"),
    "inshop_query_gallery_at_root": (_inshop_folders_at_root, "inshop"),
    "cars196_raw": (_cars196_raw, "folder"),
    "cub200_raw": (_cub200_raw, "folder"),
    "sop_raw": (_sop_raw, "folder"),
    "sop_info_files": (lambda r: _sop_raw(r, info="Info_Files", images="images"), "folder"),
    "inshop_raw": (_inshop_raw, "inshop"),
    "inshop_raw_eval_img": (lambda r: _inshop_raw(r, eval_dir="Eval", img_dir="Img"), "inshop"),
    "dada_images": (_dada_images, "folder"),
}


@pytest.fixture(scope="module")
def our_markers(tmp_path_factory):
    """Marker texts as the generator writes them: for SMALL, and outdated (other args, version)."""
    base = tmp_path_factory.mktemp("markers")
    read = lambda root: open(os.path.join(root, E.MARKER)).read()
    current = read(E.ensure_embedded_dataset(str(base / "current"), **SMALL))
    other = read(E.ensure_embedded_dataset(str(base / "other"), num_train_classes=2,
                                           num_test_classes=2, images_per_class=2, image_size=8))
    old = json.loads(current)
    old["config"]["format_version"] = E.FORMAT_VERSION - 1
    old.pop("contents", None)
    missing = json.loads(current)
    del missing["config"]["seed"]
    return {"current": current, "other_args": other, "old_version": json.dumps(old),
            "truncated": current[:len(current) // 2], "empty_file": "",
            "missing_keys": json.dumps(missing), "no_sha256": json.dumps(
                {k: v for k, v in json.loads(current).items() if k != "sha256"})}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_fixtures_are_read_by_load_benchmark(tmp_path, layout):
    build, _ = LAYOUTS[layout]
    split = build(str(tmp_path))
    assert len(D.load_benchmark(str(tmp_path), split)) > 0


@pytest.mark.parametrize("marker", [None, "current", "other_args", "old_version", "truncated",
                                    "empty_file", "missing_keys", "no_sha256"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_benchmark_folder_is_refused_and_untouched(tmp_path, our_markers, layout, marker):
    build, suggested = LAYOUTS[layout]
    root = str(tmp_path / "data")
    build(root)
    if marker is not None:
        with open(os.path.join(root, E.MARKER), "w") as f:
            f.write(our_markers[marker])
    before = _tree_hash(root)
    with pytest.raises(ValueError) as info:
        E.ensure_embedded_dataset(root, **SMALL)
    message = str(info.value)
    assert "\n" not in message and message.startswith("refusing")
    assert repr(root) in message and "nothing was changed" in message
    assert f"pass --config.data.dataset={suggested};" in message
    assert "new or empty --config.data.root" in message
    if marker is None:
        assert f"no {E.MARKER}" in message
    elif marker in ("current", "other_args", "old_version"):
        assert "that does not list" in message
    else:
        assert f"unreadable or incomplete {E.MARKER}" in message
    assert _tree_hash(root) == before
    assert sorted(os.listdir(tmp_path)) == ["data"]           # no temporary folder either


def test_cardb_message(tmp_path):
    root = str(tmp_path / "carDB")
    _cardb(root)
    with pytest.raises(ValueError) as info:
        E.ensure_embedded_dataset(root)
    assert str(info.value) == (
        f"refusing to write the embedded data set into {root!r}: it holds a class-folder data set "
        "(train/: 2 class folders, test/: 2 class folders) and no EMBEDDED.json, so the generator "
        "did not write it; nothing was changed. To train on it, pass --config.data.dataset=folder; "
        "for the embedded data set, pass a new or empty --config.data.root.")


def test_our_layout_without_marker_is_refused(tmp_path):
    """Our own file names but no marker: indistinguishable from a user's copy, so refused."""
    root = E.ensure_embedded_dataset(str(tmp_path / "e"), **SMALL)
    os.remove(os.path.join(root, E.MARKER))
    before = _tree_hash(root)
    with pytest.raises(ValueError, match=r"no EMBEDDED\.json.*--config\.data\.dataset=folder"):
        E.ensure_embedded_dataset(root, **SMALL)
    assert _tree_hash(root) == before


@pytest.mark.parametrize("extra", ["top_file", "class_folder", "image", "symlink"])
@pytest.mark.parametrize("outdated", [False, True])
def test_set_of_ours_with_foreign_files_is_refused(tmp_path, extra, outdated):
    """Files the marker does not list make the folder not only ours: neither reused nor replaced."""
    root = E.ensure_embedded_dataset(str(tmp_path / "e"), **SMALL)
    if extra == "top_file":
        path = os.path.join(root, "notes.txt")
    elif extra == "class_folder":
        path = os.path.join(root, "train", "my_class", "photo.jpg")
    else:
        path = os.path.join(root, "test", "class_0012", "photo.jpg")
    if extra == "symlink":
        (tmp_path / "elsewhere").write_text("precious")
        os.symlink(tmp_path / "elsewhere", path)
    else:
        _jpeg(path)
    before = _tree_hash(root)
    args = dict(SMALL, seed=1) if outdated else SMALL
    with pytest.raises(ValueError, match=r"with an EMBEDDED\.json that does not list 1 entry"):
        E.ensure_embedded_dataset(root, **args)
    assert _tree_hash(root) == before
    assert (tmp_path / "elsewhere").read_text() == "precious" if extra == "symlink" else True


def test_empty_folder_and_symlinked_root(tmp_path):
    (tmp_path / "empty").mkdir()
    root = E.ensure_embedded_dataset(str(tmp_path / "empty"), **SMALL)
    assert E._inspect(root, E._config(0, **SMALL)) == "complete"
    os.symlink(root, tmp_path / "link")
    assert E.ensure_embedded_dataset(str(tmp_path / "link"), **SMALL) == str(tmp_path / "link")
    # Outdated behind the link: the folder it names is replaced, the link stays.
    E.ensure_embedded_dataset(str(tmp_path / "link"), **dict(SMALL, seed=2))
    assert os.path.islink(tmp_path / "link")
    with open(os.path.join(root, E.MARKER)) as f:
        assert json.load(f)["config"]["seed"] == 2


_CRASH = """
import os, sys
from proxy_jax.data import embedded as E
write = E._write
def crash(folder, config):
  os.makedirs(os.path.join(folder, 'train', 'class_0000'))
  open(os.path.join(folder, 'train', 'class_0000', '0000.png'), 'wb').write(b'half')
  os._exit(3)   # killed mid-write: no finally runs
E._write = crash
E.ensure_embedded_dataset(sys.argv[1], num_train_classes=12, num_test_classes=10,
                          images_per_class=6, image_size=24)
"""


def test_crashed_write_leaves_root_alone_and_its_temporary_is_removed_later(tmp_path):
    root = str(tmp_path / "e")
    result = subprocess.run([sys.executable, "-c", _CRASH, root], cwd=REPO)
    assert result.returncode == 3
    assert not os.path.exists(root)
    (left,) = [n for n in os.listdir(tmp_path) if n.startswith(".embedded-")]
    # Temporaries that are not clearly a dead writer's of this root are kept.
    keep = {".embedded-user": None,                                     # no owner file
            ".embedded-live": dict(pid=os.getpid()),                    # a running process
            ".embedded-other-root": dict(root=str(tmp_path / "other")),
            ".embedded-other-host": dict(host="elsewhere"),
            ".embedded-extra-file": dict(extra=True)}
    with open(os.path.join(tmp_path, left, E._OWNER)) as f:
        owner = json.load(f)
    for name, change in keep.items():
        os.makedirs(tmp_path / name / "train" / "class_0000")
        if change is None or change.pop("extra", False):
            (tmp_path / name / "train" / "class_0000" / "x.jpg").write_text("not written by us")
        if change is not None:
            (tmp_path / name / E._OWNER).write_text(json.dumps(dict(owner, **change)))
    assert E.ensure_embedded_dataset(root, **SMALL) == root
    assert E._inspect(root, E._config(0, **SMALL)) == "complete"
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".embedded-")) == sorted(keep)


_RACE = """
import os, sys, time
from proxy_jax.data import embedded as E
install = E._install
def install_and_tell(tmp, root, config):
  print('install', flush=True)   # this process wrote a copy and now competes to put it in place
  install(tmp, root, config)
E._install = install_and_tell
open(sys.argv[2] + '.ready-' + sys.argv[3], 'w').close()
while not os.path.exists(sys.argv[2]):   # start together
  time.sleep(0.005)
E.ensure_embedded_dataset(sys.argv[1], num_train_classes=30, num_test_classes=30,
                          images_per_class=10, image_size=24)
"""


@pytest.mark.parametrize("start", ["absent", "empty", "outdated"])
def test_racing_processes_end_with_one_complete_copy(tmp_path, start):
    root, go = str(tmp_path / "e"), str(tmp_path / "go")
    args = dict(num_train_classes=30, num_test_classes=30, images_per_class=10, image_size=24)
    if start == "outdated":
        E.ensure_embedded_dataset(root, **dict(args, seed=5))
    elif start == "empty":
        os.mkdir(root)
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, root, go, str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 60
    while len([n for n in os.listdir(tmp_path) if n.startswith("go.ready-")]) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    open(go, "w").close()
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sum(o.count("install") for o in outputs) >= 2, outputs   # they did race
    assert E._inspect(root, E._config(0, **args)) == "complete"
    reference = E.ensure_embedded_dataset(str(tmp_path / "ref"), **args)
    assert _tree_hash(root) == _tree_hash(reference)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".embedded-")]


def _recall_at_1(features, labels):
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(labels[similarity.argmax(1)] == labels))


def test_unseen_classes_are_separable_but_not_trivially(tmp_path):
    """Hand-made features beat chance on the test classes; raw pixels stay far from perfect.

    This bounds the difficulty from both sides without training: a colour histogram (the
    class colours are a real factor) retrieves above chance, and neither it nor raw pixels
    come near the ceiling, because pose, background, distractors and noise vary within a class.
    """
    root = E.ensure_embedded_dataset(str(tmp_path / "e"), num_train_classes=2,
                                     num_test_classes=40, images_per_class=10)
    test = D.load_benchmark(root, "test")
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in test.paths])
    labels = test.targets
    chance = 1 / 40
    raw = _recall_at_1(pixels.reshape(len(pixels), -1) - 0.5, labels)
    bins = np.minimum((pixels * 4).astype(int), 3)
    codes = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(len(pixels), -1)
    hist = np.stack([np.bincount(c, minlength=64) for c in codes]).astype(np.float64)
    colour = _recall_at_1(np.sqrt(hist), labels)
    # Measured at seed 0: colour 0.13, raw 0.10 (chance 0.025); a trained CNN reaches ~0.5 R@1
    # on the default set after four epochs (see the README section of the embedded data set).
    assert colour > 3 * chance and raw > 2 * chance
    assert raw < 0.5 and colour < 0.5
