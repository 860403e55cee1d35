"""tfds sources on tfds' mock data (random examples from each builder's features, no download).

The mock fills 'label'/'class_id' with random class indices over the builder's whole
ClassLabel range (both tfds splits yield the same records), so the expected zero-shot split is
recomputed here from the raw mocked records with the class ranges written out by hand.
"""
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from proxy_jax.data.tfds_sources import TFDS_BENCHMARKS, TfdsDataset  # noqa: E402

NUM_EXAMPLES = 24


def _raw_labels(name, split):
    """Labels of the mocked records of one tfds split, read straight from tfds.

    The mock draws its random records from the decoded feature set, so it is asked for the
    same two features (label, undecoded image) that TfdsDataset reads.
    """
    key = TFDS_BENCHMARKS[name].label_key
    decoders = tfds.decode.PartialDecoding(
        {"image": True, key: True}, decoders={"image": tfds.decode.SkipDecoding()})
    source = tfds.builder(name).as_data_source(split=split, decoders=decoders)
    return [int(source[i][key]) for i in range(len(source))]


@pytest.mark.parametrize("name,first_test_class,num_classes", [
    ("cars196", 98, 196),
    ("caltech_birds2011", 100, 200),
    ("stanford_online_products", 11318, 22634),
])
def test_zero_shot_split_on_mock_data(name, first_test_class, num_classes):
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        builder = tfds.builder(name)
        label_feature = builder.info.features[TFDS_BENCHMARKS[name].label_key]
        assert label_feature.num_classes == num_classes          # tfds labels are 0-based ids
        train, test = TfdsDataset(name, "train"), TfdsDataset(name, "test")
        merged = TFDS_BENCHMARKS[name].merge_splits
        raw = {s: _raw_labels(name, s) for s in ("train", "test")}

    # Expected records: cars/cub concatenate tfds train+test; SOP keeps its own split.
    for ds, dml_split in ((train, "train"), (test, "test")):
        expected = []
        for s, tfds_split in enumerate(["train", "test"] if merged else [dml_split]):
            for key, label in enumerate(raw[tfds_split]):
                if (label < first_test_class) == (dml_split == "train"):
                    offset = 0 if dml_split == "train" else first_test_class
                    expected.append((s, key, label - offset))
        assert [
            tuple(r) + (y,) for r, y in zip(ds.records.tolist(), ds.targets.tolist())
        ] == expected
        assert len(ds) == len(expected) > 0

    assert len(train.classes) == first_test_class
    assert len(test.classes) == num_classes - first_test_class
    assert train.classes[0] == label_feature.names[0]
    assert test.classes[0] == label_feature.names[first_test_class]
    assert test.class_to_idx[label_feature.names[first_test_class]] == 0
    assert train.targets.min() >= 0 and train.targets.max() < first_test_class
    assert test.targets.min() >= 0 and test.targets.max() < num_classes - first_test_class

    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        for ds in (train, test):
            image, label = ds[len(ds) - 1]
            assert isinstance(image, Image.Image) and image.mode == "RGB" and min(image.size) > 0
            assert label == ds.targets[-1] and isinstance(label, int)


def test_cars_labels_follow_tfds_zero_based_ids():
    """tfds cars196 label = official class - 1: label 97 is class 98 (train), 98 is class 99."""
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        names = tfds.builder("cars196").info.features["label"].names
    assert TFDS_BENCHMARKS["cars196"].class_ranges["train"] == range(0, 98)
    assert names[0] == "AM General Hummer SUV 2000"   # official class 1
    assert names[195] == "smart fortwo Convertible 2012"  # official class 196


def test_bad_arguments():
    with pytest.raises(ValueError, match="In-shop has no tfds builder"):
        TfdsDataset("inshop", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        TfdsDataset("cars196", "query")


def test_unprepared_builder_explains(tmp_path):
    with pytest.raises(ValueError, match="download_and_prepare\\(file_format='array_record'\\)"):
        TfdsDataset("cars196", "train", data_dir=str(tmp_path))


def test_a_config_trains_on_a_tfds_source(tmp_path, tiny_config):
    """config.data.dataset='tfds' with tfds_name reaches TfdsDataset through train.build and
    trains and evaluates end to end (tfds' mock data: no download)."""
    from proxy_jax import train
    from proxy_jax.data import load_splits

    config = tiny_config("", num_train_steps=2, **{"data.dataset": "tfds",
                                                   "data.tfds_name": "cars196"})
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        splits = load_splits("tfds", "", tfds_name="cars196")
        run = train.build(config)
        assert isinstance(run.data.train, TfdsDataset) and run.data.train.split == "train"
        assert isinstance(run.data.test, TfdsDataset) and run.data.test.split == "test"
        assert run.data.gallery is None and splits.gallery is None
        assert run.data.num_classes == len(splits.train.classes) == 98
        np.testing.assert_array_equal(run.data.test.targets, splits.test.targets)
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 2 and 0.0 <= result["recall@1"] <= 1.0
    with pytest.raises(ValueError, match="needs tfds_name"):
        load_splits("tfds", "")
