"""tensorflow-datasets builders as zero-shot DML datasets with the map-style protocol.

tfds has builders for three of the four benchmarks; In-shop has none (use its folder reader).

| builder | tfds splits | label feature (0-based) | DML train / test classes |
|---|---|---|---|
| ``cars196`` | train/test by image (classification) | ``label`` = official class - 1 | 0-97 / 98-195 |
| ``caltech_birds2011`` | train/test by image (classification) | ``label`` = official class - 1 | 0-99 / 100-199 |
| ``stanford_online_products`` | train/test by class (the DML split) | ``class_id`` = official id - 1 | 0-11317 / 11318-22633 |

For the first two, the tfds train and test splits are concatenated and re-split by class; for
SOP the split is kept and the records outside its class range (none, in the real data) dropped.
Labels are shifted to 0..C-1 within the split (SOP test: class_id - 11318).

Records are read at random through tfds' ``as_data_source`` (ArrayRecord files), so a
TfdsDataset is a map-style source like ImageFolder: ``ds[i] -> (RGB PIL image, label)``. The
image bytes are decoded with PIL, the same way files on disk are (RGB conversion, corrupt data
raises CorruptImageError). The labels of all records are read once at construction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from proxy_jax.data.datasets import decode_image_bytes


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How one tfds builder maps onto a zero-shot DML split."""
    label_key: str
    merge_splits: bool           # True: the tfds splits are by image; concatenate and re-split
    class_ranges: dict           # DML split -> range of tfds (0-based) labels


TFDS_BENCHMARKS = {
    "cars196": TfdsSpec("label", True, {"train": range(0, 98), "test": range(98, 196)}),
    "caltech_birds2011": TfdsSpec("label", True, {"train": range(0, 100), "test": range(100, 200)}),
    "stanford_online_products": TfdsSpec(
        "class_id", False, {"train": range(0, 11318), "test": range(11318, 22634)}),
}

_SCAN_CHUNK = 1024


def import_tfds():
    """``tensorflow_datasets``, imported with TensorFlow kept off every GPU.

    TensorFlow is an optional extra (``requirements-tfds.txt``), used only here. Left alone it
    would claim the GPUs' memory beside JAX, so before tfds loads it, it is told to see no GPU
    (as flax's examples do); it reads records on the CPU. Raises ImportError in one line, naming
    the extra, when tensorflow-datasets is not installed.
    """
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"data.dataset='tfds' needs TensorFlow and tensorflow-datasets ({e}); install them "
            "with: pip install -r requirements-tfds.txt") from None
    tf.config.set_visible_devices([], "GPU")
    return tfds


def _read_many(source, keys):
    """Batched read (ArrayRecord reads a batch in parallel), one by one where unsupported."""
    try:
        return source.__getitems__(keys)
    except (AttributeError, TypeError):
        # tfds.testing.mock_data installs an unbound __getitems__; plain sequences have none.
        return [source[k] for k in keys]


class TfdsDataset:
    """One DML split ('train' or 'test') of a tfds benchmark, as a map-style dataset.

    Attributes:
      targets: np.ndarray int64 [N], labels 0..C-1 within the split.
      classes: class names (tfds ClassLabel names) of labels 0..C-1.
      class_to_idx: name -> label.
      records: np.ndarray int64 [N, 2] of (tfds split index, record index) per sample.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None,
                 download: bool = False):
        """Args:
          name: 'cars196', 'caltech_birds2011' or 'stanford_online_products'.
          split: 'train' or 'test' (the zero-shot split, not tfds' split).
          data_dir: tfds data directory (tfds' default if None).
          download: download and prepare the builder in ArrayRecord format first.
        """
        if name not in TFDS_BENCHMARKS:
            raise ValueError(f"name must be one of {sorted(TFDS_BENCHMARKS)}, got {name!r} "
                             "(In-shop has no tfds builder: use load_benchmark on its folder)")
        spec = TFDS_BENCHMARKS[name]
        if split not in spec.class_ranges:
            raise ValueError(f"split must be one of {sorted(spec.class_ranges)}, got {split!r}")
        tfds = import_tfds()
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare(file_format="array_record")
        # Only the label and the still-encoded image bytes are read: bboxes and segmentation
        # masks stay undecoded, and PIL decodes the image like any file.
        decoders = tfds.decode.PartialDecoding(
            {"image": True, spec.label_key: True}, decoders={"image": tfds.decode.SkipDecoding()})
        tfds_splits = ["train", "test"] if spec.merge_splits else [split]
        try:
            self._sources = [
                builder.as_data_source(split=s, decoders=decoders) for s in tfds_splits
            ]
        except (NotImplementedError, ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"tfds {name!r} is not available as ArrayRecord files under {builder.data_dir!r} ({e}); "
                f"prepare it with tfds.builder({name!r}).download_and_prepare(file_format='array_record') "
                "or TfdsDataset(..., download=True)"
            ) from e

        wanted = spec.class_ranges[split]
        records, labels = [], []
        for s, source in enumerate(self._sources):
            for start in range(0, len(source), _SCAN_CHUNK):
                keys = list(range(start, min(start + _SCAN_CHUNK, len(source))))
                for key, example in zip(keys, _read_many(source, keys)):
                    label = int(example[spec.label_key])
                    if label in wanted:
                        records.append((s, key))
                        labels.append(label - wanted.start)
        self.name, self.split, self._label_key = name, split, spec.label_key
        self.records = np.asarray(records, dtype=np.int64).reshape(-1, 2)
        self.targets = np.asarray(labels, dtype=np.int64)
        names = builder.info.features[spec.label_key].names
        self.classes = [names[c] for c in wanted]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        s, key = self.records[index]
        example = self._sources[s][int(key)]
        image = decode_image_bytes(example["image"], name=f"{self.name}/{s}/{key}")
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"TfdsDataset({self.name!r}, {self.split!r}: {len(self)} images, {len(self.classes)} classes)"
