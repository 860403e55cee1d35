"""Map-style image datasets for the four DML benchmarks, read from the layouts users already have.

Every dataset here follows the torch/grain map-style protocol: ``len(ds)`` and
``ds[i] -> (PIL.Image in mode 'RGB', int label)``, plus ``.targets`` (int labels, one per
sample), ``.classes`` (class names, index = label) and ``.class_to_idx``. Anything else with
``__len__``/``__getitem__`` returning ``(image, label)`` (a ``torch.utils.data.Dataset``
included) can stand in for them: nothing downstream checks the type.

Layouts ``load_benchmark`` reads as they are (the split is chosen by ``split``):

* class folders, as proxy-synthesis / MemVir (``dataset/prepare_cars.py``) and
  ``python -m proxy_jax.data.prepare`` write them: ``ROOT/train/<class>/*.jpg``,
  ``ROOT/test/<class>/*.jpg``; In-shop ``ROOT/test/query/<item>/*``, ``ROOT/test/gallery/<item>/*``
  (or ``ROOT/query``, ``ROOT/gallery``).
* the official raw files, as Proxy-Anchor (``code/dataset/*.py``) reads them: Cars196
  ``cars_annos.mat`` + ``car_ims/``; CUB ``images.txt`` + ``image_class_labels.txt`` + ``images/``;
  SOP ``Ebay_train.txt``/``Ebay_test.txt`` (in ROOT or ``ROOT/Info_Files`` with images under
  ``ROOT/images``, DADA's layout); In-shop ``list_eval_partition.txt`` (in ROOT or ``ROOT/Eval``)
  with ``img/`` under ROOT or ``ROOT/Img``.
* a single folder of classes, ``ROOT/images/<class>/*``: the sorted class names are split in
  halves (first half train). With CUB's ``001.Black_footed_Albatross`` names that is the
  standard 1-100/101-200 split; with Cars196 folders named after the car models it is the
  split of whatever order the names sort in (see :func:`load_dada_folder`).

:func:`load_dada_folder` reads that layout exactly as DADA's loaders do
(``config.data.dataset`` 'cars196_dada' / 'cub200_dada', the DADA configs' default).

Zero-shot splits follow ../shared/METHODS.md: Cars196 classes 1-98 train / 99-196 test, CUB
1-100 / 101-200, SOP and In-shop as their official files say. Labels are 0..C-1 within a split
(In-shop query and gallery share one index so that their labels compare).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS, so the same files count as images in both libraries.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

SPLITS = ("train", "test", "query", "gallery")

# Number of classes of each benchmark that belong to the training split (1-based ids <= this).
CARS196_TRAIN_CLASSES = 98
CUB200_TRAIN_CLASSES = 100


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated or not an image)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # Pickling rebuilds an exception as type(e)(*e.args), and args holds only the message:
        # unpickling (how an error leaves a loader worker process) would call __init__ without
        # `reason`. Rebuild from (path, reason); the state keeps any other attribute and notes.
        return type(self), (self.path, self.reason), self.__dict__


# ----------------------------------------------------------------------------- image decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 'RGB' (uint8, 3 channels).

    Grayscale, palette, CMYK and YCbCr go through PIL's ``convert('RGB')``; alpha is dropped
    as torchvision's ``pil_loader`` drops it (same pixels as a PyTorch pipeline). 16/32-bit
    integer grayscale ('I;16', 'I') is rescaled to 8 bits first, because PIL would clip it.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        shift = 8 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 0
        gray = np.clip(values >> shift, 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L")
    elif image.mode == "F":
        gray = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L")
    return image.convert("RGB")


def _decode(fp, name: str) -> Image.Image:
    try:
        with Image.open(fp) as image:
            # load() decodes every pixel now, so a truncated file fails here and not in a worker
            # later; PIL's LOAD_TRUNCATED_IMAGES stays off (no global switches).
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(name, f"{type(e).__name__}: {e}") from e


def load_image(path: str) -> Image.Image:
    """Reads an image file into an RGB PIL image; raises CorruptImageError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    return _decode(path, path)


def decode_image_bytes(data: bytes, *, name: str = "<bytes>") -> Image.Image:
    """Decodes encoded image bytes (JPEG, PNG, ...) into an RGB PIL image."""
    return _decode(io.BytesIO(data), name)


def is_image_file(name: str) -> bool:
    """True for names with an image extension; macOS '._' resource forks are not images."""
    base = os.path.basename(name)
    return not base.startswith("._") and base.lower().endswith(IMG_EXTENSIONS)


# ----------------------------------------------------------------------------- datasets


class ImageDataset:
    """Map-style dataset over a list of (path, label) samples.

    Attributes:
      samples: list of (path, label) pairs, label in 0..len(classes)-1.
      targets: np.ndarray int64 [N], the labels of ``samples``.
      classes: list of class names; ``classes[label]`` names a label.
      class_to_idx: dict class name -> label.
      skipped: list of (path, reason) for corrupt files left out (only with ``skip_corrupt``).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], *,
                 skip_corrupt: bool = False, num_threads: int = 8):
        """Args:
          samples: (path, label) pairs.
          classes: class names, index = label.
          skip_corrupt: decode every image once now and leave out the ones that fail (counted in
            ``skipped`` and logged); without it a corrupt image raises CorruptImageError when read.
          num_threads: threads for that check (PIL releases the GIL while decoding).
        """
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples = [(str(p), int(y)) for p, y in samples]
        for p, y in samples:
            if not 0 <= y < len(self.classes):
                raise ValueError(f"label {y} of {p!r} is outside 0..{len(self.classes) - 1}")
        self.skipped: list[tuple[str, str]] = []
        if skip_corrupt:
            samples = self._drop_corrupt(samples, num_threads)
        self.samples = samples
        self.targets = np.asarray([y for _, y in samples], dtype=np.int64)

    def _drop_corrupt(self, samples, num_threads):
        def check(path):
            try:
                load_image(path)
                return None
            except (CorruptImageError, FileNotFoundError) as e:
                return str(e)

        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            reasons = list(pool.map(check, [p for p, _ in samples]))
        kept = []
        for (path, label), reason in zip(samples, reasons):
            if reason is None:
                kept.append((path, label))
            else:
                self.skipped.append((path, reason))
        if self.skipped:
            logger.warning(
                "skipped %d corrupt image(s), e.g. %s", len(self.skipped), self.skipped[0][1]
            )
        return kept

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


def _scan_class_folder(class_dir: str) -> tuple[list[str], list[str]]:
    """Image files under class_dir (recursive, sorted, as torchvision) and the other files."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            (images if is_image_file(name) else others).append(path)
    return images, others


def _require_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a directory")


def _class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolder(ImageDataset):
    """``ROOT/<class>/**/<image>`` -> (image, label), label = index of the class in sorted order.

    Matches torchvision's ``ImageFolder`` (sorted class folders, files found recursively and
    sorted, the same image extensions), except that bad input fails early and by name: a missing
    root raises FileNotFoundError, a root without class folders or a class folder without images
    raises ValueError. Files that are not images (by extension) are left out, listed in
    ``ignored_files`` and logged.
    """

    def __init__(self, root: str, *, class_to_idx: dict[str, int] | None = None,
                 skip_corrupt: bool = False, num_threads: int = 8):
        """Args:
          root: folder holding one sub-folder per class.
          class_to_idx: fixed class name -> label map (e.g. shared by In-shop query and gallery);
            every class folder must appear in it. Default: sorted folder names -> 0..C-1.
          skip_corrupt, num_threads: see ImageDataset.
        """
        root = os.fspath(root)
        _require_dir(root, "dataset folder")
        class_names = _class_dirs(root)
        if not class_names:
            raise ValueError(f"no class folders in {root!r}: expected {root}/<class>/<image files>")
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(class_names)}
        else:
            missing = [c for c in class_names if c not in class_to_idx]
            if missing:
                raise ValueError(f"class folders {missing[:5]} in {root!r} are not in class_to_idx")
        samples, self.ignored_files = [], []
        for name in class_names:
            images, others = _scan_class_folder(os.path.join(root, name))
            if not images:
                raise ValueError(f"class folder {os.path.join(root, name)!r} holds no image files "
                                 f"(extensions {IMG_EXTENSIONS})")
            samples += [(p, class_to_idx[name]) for p in images]
            self.ignored_files += others
        if self.ignored_files:
            logger.info("%s: ignored %d non-image file(s), e.g. %r", root, len(self.ignored_files),
                        self.ignored_files[0])
        self.root = root
        classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
        super().__init__(samples, classes, skip_corrupt=skip_corrupt, num_threads=num_threads)


# ----------------------------------------------------------------------------- any map-style source


def dataset_labels(dataset) -> np.ndarray:
    """int64 [N] labels of any map-style dataset: its ``.targets`` or, lacking that, ``ds[i][1]``.

    Reading through ``__getitem__`` decodes every image once; datasets of this module and
    torchvision's carry ``.targets`` and skip that.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(targets) != len(dataset):
        raise ValueError(f"dataset has {len(dataset)} items but {len(targets)} targets")
    return targets


class ClassSubset:
    """The samples of some classes of a map-style dataset, relabelled 0..K-1 (map-style too)."""

    def __init__(self, dataset, classes: Sequence[int]):
        """Args:
          dataset: any object with ``__len__`` and ``__getitem__ -> (image, label)``.
          classes: labels of ``dataset`` to keep; the k-th becomes label k.
        """
        labels = dataset_labels(dataset)
        self.dataset = dataset
        remap = {int(c): k for k, c in enumerate(classes)}
        if len(remap) != len(classes):
            raise ValueError(f"classes must be distinct, got {list(classes)}")
        self.indices = np.asarray(
            [i for i, y in enumerate(labels) if int(y) in remap], dtype=np.int64
        )
        self.targets = np.asarray([remap[int(labels[i])] for i in self.indices], dtype=np.int64)
        names = getattr(dataset, "classes", None)
        self.classes = [names[c] if names is not None else int(c) for c in classes]
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, _ = self.dataset[int(self.indices[index])]
        return image, int(self.targets[index])


def zero_shot_split(dataset, *, num_train_classes: int) -> tuple[ClassSubset, ClassSubset]:
    """Class-disjoint (train, test) views of any map-style dataset.

    The sorted distinct labels are split: the first ``num_train_classes`` go to train, the rest
    to test (the rule behind Cars196 1-98/99-196 and CUB 1-100/101-200).
    """
    classes = np.unique(dataset_labels(dataset))
    if not 0 < num_train_classes < len(classes):
        raise ValueError(f"num_train_classes must be in 1..{len(classes) - 1} for a dataset of "
                         f"{len(classes)} classes, got {num_train_classes}")
    return (ClassSubset(dataset, classes[:num_train_classes].tolist()),
            ClassSubset(dataset, classes[num_train_classes:].tolist()))


# ----------------------------------------------------------------------------- official raw files


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One image of an official annotation file: where it is and where it belongs."""
    path: str        # absolute path of the image file
    class_name: str  # class folder name (zero-padded official id, or the official folder name)
    split: str       # 'train', 'test', 'query' or 'gallery'


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: expected {path!r}")
    return path


def _first_existing(paths: Iterable[str]) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


def read_cars196(src: str) -> list[RawSample]:
    """Cars196 from ``cars_annos.mat`` (+ ``car_ims/``): classes 1-98 train, 99-196 test.

    The .mat holds ``annotations`` (struct array: relative_im_path, bbox_x1, bbox_y1, bbox_x2,
    bbox_y2, class, test) and ``class_names``. Its ``test`` flag is the classification split
    and is ignored: the DML split is by class id. Class folders are the 1-based id, zero-padded.
    """
    import scipy.io  # only this reader needs scipy

    mat_path = _require_file(os.path.join(src, "cars_annos.mat"), "Cars196 annotation file")
    mat = scipy.io.loadmat(mat_path, squeeze_me=True)
    if "annotations" not in mat:
        raise ValueError(f'{mat_path!r} has no "annotations" variable (found {sorted(mat)})')
    annotations = np.atleast_1d(mat["annotations"])
    fields = annotations.dtype.names or ()
    for field in ("relative_im_path", "class"):
        if field not in fields:
            raise ValueError(f"{mat_path!r}: annotations lack the field {field!r} (have {fields})")
    samples = []
    for a in annotations:
        class_id = int(a["class"])
        if not 1 <= class_id <= 196:
            raise ValueError(
                f'{mat_path!r}: class {class_id} of {a["relative_im_path"]} not in 1..196'
            )
        split = "train" if class_id <= CARS196_TRAIN_CLASSES else "test"
        samples.append(
            RawSample(os.path.join(src, str(a["relative_im_path"])), f"{class_id:03d}", split)
        )
    return samples


def _read_table(path: str, *, skip: int, columns: int) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line_no <= skip or not line.strip():
                continue
            parts = line.split()
            if len(parts) != columns:
                raise ValueError(
                    f"{path!r} line {line_no}: expected {columns} columns, got {line!r}"
                )
            rows.append(parts)
    return rows


def read_cub200(src: str) -> list[RawSample]:
    """CUB-200-2011 from ``images.txt``, ``image_class_labels.txt`` and ``images/``.

    Classes 1-100 train, 101-200 test; class folders keep the official names
    ('001.Black_footed_Albatross'), which is the folder each image already sits in.
    """
    paths = dict(_read_table(_require_file(os.path.join(src, "images.txt"), "CUB image list"),
                             skip=0, columns=2))
    labels = dict(_read_table(
        _require_file(os.path.join(src, "image_class_labels.txt"), "CUB class label file"),
        skip=0, columns=2))
    if set(paths) != set(labels):
        raise ValueError(f"{src!r}: images.txt and image_class_labels.txt list different image ids")
    samples = []
    for image_id in sorted(paths, key=int):
        class_id = int(labels[image_id])
        split = "train" if class_id <= CUB200_TRAIN_CLASSES else "test"
        rel = paths[image_id]
        folder = os.path.dirname(rel) or f"{class_id:03d}"
        samples.append(RawSample(os.path.join(src, "images", rel), folder, split))
    return samples


def read_sop(src: str) -> list[RawSample]:
    """Stanford Online Products from ``Ebay_train.txt`` / ``Ebay_test.txt``.

    Each file has a header line and columns ``image_id class_id super_class_id path``; the
    files are the DML split (11,318 train / 11,316 test classes). The files sit in SRC with
    the images (official archive) or in SRC/Info_Files with the images under SRC/images (DADA).
    """
    info = _first_existing([os.path.join(src, "Ebay_train.txt"),
                            os.path.join(src, "Info_Files", "Ebay_train.txt")])
    if info is None:
        raise FileNotFoundError(f"SOP list not found: expected {src}/Ebay_train.txt "
                                f"(or {src}/Info_Files/Ebay_train.txt)")
    info_dir = os.path.dirname(info)
    image_dir = src if info_dir == src else os.path.join(src, "images")
    samples = []
    for split in ("train", "test"):
        table = _require_file(os.path.join(info_dir, f"Ebay_{split}.txt"), f"SOP {split} list")
        for _, class_id, _, rel in _read_table(table, skip=1, columns=4):
            samples.append(RawSample(os.path.join(image_dir, rel), f"{int(class_id):05d}", split))
    return samples


def read_inshop(src: str) -> list[RawSample]:
    """In-shop Clothes from ``list_eval_partition.txt`` (+ ``img/``).

    The file has two header lines (a count and the column names) and columns
    ``image_name item_id evaluation_status`` with status train / query / gallery. Image names
    start with ``img/``, relative to SRC or to SRC/Img (the layout Proxy-Anchor reads).
    """
    table = _first_existing([os.path.join(src, "list_eval_partition.txt"),
                             os.path.join(src, "Eval", "list_eval_partition.txt")])
    if table is None:
        raise FileNotFoundError(
            f"In-shop partition file not found: expected "
            f"{src}/list_eval_partition.txt (or {src}/Eval/list_eval_partition.txt)"
        )
    rows = _read_table(table, skip=2, columns=3)
    if not rows:
        raise ValueError(f"{table!r} lists no images")
    base = _first_existing([d for d in (src, os.path.join(src, "Img"))
                            if os.path.exists(os.path.join(d, rows[0][0]))]) or src
    samples = []
    for rel, item_id, status in rows:
        if status not in ("train", "query", "gallery"):
            raise ValueError(f"{table!r}: evaluation_status {status!r} of {rel!r} is not "
                             "'train', 'query' or 'gallery'")
        samples.append(RawSample(os.path.join(base, rel), item_id, status))
    return samples


RAW_READERS = {"cars196": read_cars196, "cub200": read_cub200, "sop": read_sop,
               "inshop": read_inshop}


def detect_raw_dataset(root: str) -> str | None:
    """Name of the official raw layout found in root ('cars196', ...), or None."""
    markers = {
        "cars196": ["cars_annos.mat"],
        "cub200": ["images.txt"],
        "sop": ["Ebay_train.txt", "Info_Files/Ebay_train.txt"],
        "inshop": ["list_eval_partition.txt", "Eval/list_eval_partition.txt"],
    }
    for name, files in markers.items():
        if any(os.path.isfile(os.path.join(root, f)) for f in files):
            return name
    return None


def check_raw_files(samples: Sequence[RawSample], src: str) -> None:
    """Raises FileNotFoundError naming the images an annotation file lists but SRC lacks."""
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in the annotations of {src!r} are "
                                f"missing, e.g. {missing[:3]}")


def _dataset_from_raw(samples: Sequence[RawSample], split: str, *, shared: Sequence[str] = (),
                      skip_corrupt: bool, num_threads: int) -> ImageDataset:
    """The samples of one split; classes sorted, shared with the splits in ``shared``."""
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        found = sorted({s.split for s in samples})
        raise ValueError(f"split {split!r} is empty; the annotations have splits {found}")
    classes = sorted({s.class_name for s in samples if s.split in (split, *shared)})
    index = {c: i for i, c in enumerate(classes)}
    check_raw_files(chosen, os.path.dirname(chosen[0].path))
    return ImageDataset([(s.path, index[s.class_name]) for s in chosen], classes,
                        skip_corrupt=skip_corrupt, num_threads=num_threads)


# ----------------------------------------------------------------------------- load_benchmark


def _inshop_eval_dirs(root: str) -> dict[str, str] | None:
    for base in (os.path.join(root, "test"), root):
        dirs = {s: os.path.join(base, s) for s in ("query", "gallery")}
        if all(os.path.isdir(d) for d in dirs.values()):
            return dirs
    return None


# ----------------------------------------------------------------------------- DADA's one folder

#: The datasets :func:`load_dada_folder` reads, and how each orders its class folders.
DADA_FOLDER_DATASETS = ("cars196", "cub200")


def _cub_class_id(name: str) -> int:
    """``'001.Black_footed_Albatross'`` -> 1, DADA's sort key of CUB's class folders."""
    head = name.split(".")[0]
    if not head.isdigit():
        raise ValueError(f"CUB class folder {name!r} does not start with its numeric id "
                         "('001.Black_footed_Albatross'), which DADA's loader sorts by")
    return int(head)


def dada_class_order(names: Sequence[str], dataset: str) -> list[str]:
    """The class folders in the order DADA's loader halves them.

    ``'cars196'`` (``datasets/cars196.py``): ``sorted(names)``, Python's string order
    (by code point: capitals before small letters). ``'cub200'``
    (``datasets/cub200.py``): names containing ``'._'`` dropped, then sorted by the
    integer before the first ``'.'``, the class id.
    """
    if dataset not in DADA_FOLDER_DATASETS:
        raise ValueError(f"dataset must be one of {DADA_FOLDER_DATASETS}, got {dataset!r}")
    if dataset == "cars196":
        return sorted(names)
    return sorted((n for n in names if "._" not in n), key=_cub_class_id)


def _dada_class_files(class_dir: str) -> tuple[list[str], list[str]]:
    """DADA's images of one class: the class folder's own files (not sub-folders) whose
    names hold no ``'._'``, sorted by name; other non-image files are returned apart."""
    names = sorted(n for n in os.listdir(class_dir)
                   if "._" not in n and os.path.isfile(os.path.join(class_dir, n)))
    paths = [os.path.join(class_dir, n) for n in names]
    return [p for p in paths if is_image_file(p)], [p for p in paths if not is_image_file(p)]


def load_dada_folder(root: str, split: str, *, dataset: str, skip_corrupt: bool = False,
                     num_threads: int = 8) -> ImageDataset:
    """``split`` of ``ROOT/images/<class>/<image>`` as DADA's Cars196 / CUB loaders make it.

    Official ``datasets/cars196.py`` and ``datasets/cub200.py`` (Noahsark/DADA): the class
    folders of ``ROOT/images`` in :func:`dada_class_order`, the first ``len // 2`` train,
    the rest test; labels ``0..`` in that order within each split; a class's images are its
    folder's files sorted by name (names with ``'._'`` left out, as there).

    Is it the standard split by class id? CUB: yes: the folders are named
    ``<id>.<name>`` and sorted by id, so train is classes 1-100. Cars196: only if the
    sorted folder names list the classes in id order. DADA's layout names the folders
    after the car models (``images/Acura Integra Type R 2001``), and Cars196's ids
    (``cars_meta.mat``) are not alphabetical throughout, so the two halves can differ
    from classes 1-98 / 99-196; this function reproduces DADA's halves, which is what its
    published numbers were trained and tested on. (The official raw layout,
    ``cars_annos.mat``, is split by id by :func:`load_benchmark`.)

    Args:
      root: the folder holding ``images/`` (DADA's ``<source_path>/cars196``).
      split: 'train' or 'test'.
      dataset: 'cars196' or 'cub200' (the class order).
      skip_corrupt, num_threads: as :func:`load_benchmark`.

    Returns:
      An :class:`ImageDataset` with ``classes`` the folder names of the split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for DADA's {dataset} folder, "
                         f"got {split!r}")
    images = os.path.join(os.fspath(root), "images")
    _require_dir(images, f"DADA {dataset} folder (ROOT/images/<class>)")
    names = dada_class_order([e.name for e in os.scandir(images) if e.is_dir()], dataset)
    if len(names) < 2:
        raise ValueError(f"{images!r} holds {len(names)} class folder(s); DADA's split needs "
                         "at least 2")
    half = len(names) // 2
    chosen = names[:half] if split == "train" else names[half:]
    samples, ignored = [], []
    for label, name in enumerate(chosen):
        files, others = _dada_class_files(os.path.join(images, name))
        if not files:
            raise ValueError(f"class folder {os.path.join(images, name)!r} holds no image files")
        samples += [(p, label) for p in files]
        ignored += others
    if ignored:
        logger.info("%s: ignored %d non-image file(s)", images, len(ignored))
    return ImageDataset(samples, chosen, skip_corrupt=skip_corrupt, num_threads=num_threads)


def load_benchmark(root: str, split: str, *, skip_corrupt: bool = False,
                   num_threads: int = 8) -> ImageDataset:
    """The ``split`` of the benchmark at ``root``, whichever known layout it is in.

    Args:
      root: a prepared class-folder root (``ROOT/train``, ``ROOT/test``; In-shop also
        ``ROOT/test/query``, ``ROOT/test/gallery``), an official raw folder (Cars196, CUB, SOP,
        In-shop) or a DADA-style ``ROOT/images/<class>`` folder; see the module docstring.
      split: 'train' or 'test'; In-shop 'train', 'query' or 'gallery'.
      skip_corrupt: leave out (and count) images that fail to decode instead of raising later.
      num_threads: threads for the skip_corrupt check.

    Returns:
      an ImageDataset (ImageFolder for class-folder roots). Labels are 0..C-1 within the split;
      query and gallery share one class index.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = os.fspath(root)
    _require_dir(root, "dataset root")
    opts = dict(skip_corrupt=skip_corrupt, num_threads=num_threads)

    inshop_dirs = _inshop_eval_dirs(root)
    if split in ("query", "gallery") and inshop_dirs is not None:
        names = sorted(
            set(_class_dirs(inshop_dirs["query"])) | set(_class_dirs(inshop_dirs["gallery"]))
        )
        return ImageFolder(
            inshop_dirs[split], class_to_idx={c: i for i, c in enumerate(names)}, **opts
        )
    if split in ("train", "test") and os.path.isdir(os.path.join(root, split)):
        folder = os.path.join(root, split)
        if (
            split == "test"
            and inshop_dirs is not None
            and set(_class_dirs(folder)) == {"query", "gallery"}
        ):
            raise ValueError(f'{folder!r} is an In-shop evaluation folder: load split "query" or '
                             '"gallery" instead of "test"')
        return ImageFolder(folder, **opts)

    raw = detect_raw_dataset(root)
    if raw is not None:
        samples = RAW_READERS[raw](root)
        shared = {"query": ("gallery",), "gallery": ("query",)}.get(split, ())
        if raw == "inshop" and split == "test":
            raise ValueError(
                f'{root!r} is In-shop: load split "query" or "gallery" instead of "test"'
            )
        return _dataset_from_raw(samples, split, shared=shared, **opts)

    images = os.path.join(root, "images")
    if split in ("train", "test") and os.path.isdir(images) and _class_dirs(images):
        names = _class_dirs(images)
        half = len(names) // 2
        chosen = names[:half] if split == "train" else names[half:]
        samples, ignored = [], []
        for label, name in enumerate(chosen):
            files, others = _scan_class_folder(os.path.join(images, name))
            if not files:
                raise ValueError(
                    f"class folder {os.path.join(images, name)!r} holds no image files"
                )
            samples += [(p, label) for p in files]
            ignored += others
        if ignored:
            logger.info("%s: ignored %d non-image file(s)", images, len(ignored))
        return ImageDataset(samples, chosen, **opts)

    raise ValueError(
        f"no {split!r} split found under {root!r}: expected {root}/{split}/<class>/<images> "
        "(In-shop: test/query and test/gallery), the official raw files (cars_annos.mat, "
        "images.txt + image_class_labels.txt, Ebay_train.txt/Ebay_test.txt, "
        "list_eval_partition.txt) or images/<class>/<images>")
