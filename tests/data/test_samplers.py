"""Samplers: class balance, distinct neighbours, determinism, resume and host sharding.

The official samplers' statistics in tests/fixtures/samplers_official.json were computed
by a scratch script outside the repository (/tmp/scratch/make_sampler_stats.py) that runs
Noahsark/DADA ``datasampler/class_random_sampler.py`` (torch installed, Python's
``random`` seeded with ``seed + epoch`` per epoch as ``main.py`` does) and
clovaai/embedding-expansion ``dataset/sampler.py`` (``mxnet`` stubbed: the class only
subclasses ``mx.gluon.data.Sampler``; ``max_num_examples_per_iter = num_instances ×
classes`` and ``last_batch='discard'`` as its ``dataset/__init__.py``) unchanged, 4000
epochs each, on the label sets the fixture names.
"""

import itertools
import json
import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy_jax.data.samplers import (
    PAD_INDEX,
    SAMPLERS,
    ClassBalancedSampler,
    ClassesByImageCountSampler,
    ClassesWithReplacementSampler,
    ShuffleSampler,
    expected_distinct_classes,
    make_sampler,
)

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                       "samplers_official.json")

FAST = settings(max_examples=40, deadline=None)


# Label lists: a few classes of uneven sizes, some smaller than any n_instance.
labels_strategy = st.lists(st.integers(0, 11), min_size=12, max_size=80).map(np.asarray)


# --- ShuffleSampler ---------------------------------------------------------------------

def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch():
    s = ShuffleSampler(50)
    a = s.epoch_order(3, batch_size=8, seed=1)
    assert sorted(a) == list(range(50))
    np.testing.assert_array_equal(a, s.epoch_order(3, batch_size=8, seed=1))
    assert not np.array_equal(a, s.epoch_order(4, batch_size=8, seed=1))
    assert not np.array_equal(a, s.epoch_order(3, batch_size=8, seed=2))
    np.testing.assert_array_equal(ShuffleSampler(50, shuffle=False).epoch_order(0, batch_size=8, seed=0),
                                  np.arange(50))


def test_shuffle_remainder_dropped_or_padded():
    s = ShuffleSampler(10)
    assert s.num_batches(batch_size=4) == 2
    assert s.num_batches(batch_size=4, drop_remainder=False) == 3
    full = s.epoch_batches(0, batch_size=4, seed=0, drop_remainder=False)
    assert full.shape == (3, 4)
    np.testing.assert_array_equal(full[-1, 2:], [PAD_INDEX, PAD_INDEX])
    assert sorted(full[full != PAD_INDEX]) == list(range(10))
    np.testing.assert_array_equal(s.epoch_batches(0, batch_size=4, seed=0), full[:2])


# --- ClassBalancedSampler ---------------------------------------------------------------

@FAST
@given(labels=labels_strategy, n_instance=st.sampled_from([2, 3, 4]), groups=st.integers(1, 4),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5), policy=st.sampled_from(["replace", "skip"]))
def test_class_balanced_batches(labels, n_instance, groups, seed, epoch, policy):
    sizes = np.bincount(labels)
    eligible = np.flatnonzero(sizes >= (n_instance if policy == "skip" else 1))
    batch_size = groups * n_instance
    if eligible.size == 0:
        with pytest.raises(ValueError, match="no class"):
            ClassBalancedSampler(labels, n_instance=n_instance, small_classes=policy)
        return
    if groups > eligible.size:
        with pytest.raises(ValueError, match="distinct classes"):
            ClassBalancedSampler(labels, n_instance=n_instance, small_classes=policy).num_batches(
                batch_size=batch_size)
        return
    s = ClassBalancedSampler(labels, n_instance=n_instance, small_classes=policy)
    batches = s.epoch_batches(epoch, batch_size=batch_size, seed=seed)
    assert batches.shape == (max(1, labels.size // batch_size), batch_size)
    for batch in batches:
        groups_of = batch.reshape(groups, n_instance)
        group_labels = labels[groups_of]
        # n_instance images of one class per group, all groups different classes.
        assert np.all(group_labels == group_labels[:, :1])
        assert len(set(group_labels[:, 0])) == groups
        assert set(group_labels[:, 0]) <= set(eligible)
        for members, cls in zip(groups_of, group_labels[:, 0]):
            # Distinct images whenever the class has enough; otherwise every image first.
            assert len(set(members)) == min(n_instance, sizes[cls])
    np.testing.assert_array_equal(batches, s.epoch_batches(epoch, batch_size=batch_size, seed=seed))


def test_even_n_instance_gives_embedding_expansion_pairs():
    labels = np.repeat(np.arange(10), 6)
    s = ClassBalancedSampler(labels, n_instance=2)
    for batch in s.epoch_batches(0, batch_size=12, seed=0):
        y = labels[batch]
        np.testing.assert_array_equal(y[0::2], y[1::2])


def test_class_images_used_evenly_over_an_epoch():
    # 4 classes of 30 images, 2 classes per batch of 4 images each: over an epoch every
    # class is drawn ~7.5 times (30 images) and its queue gives each image at most twice.
    labels = np.repeat(np.arange(4), 30)
    order = ClassBalancedSampler(labels, n_instance=4).epoch_order(0, batch_size=8, seed=3)
    uses = np.bincount(order, minlength=labels.size)
    for cls in range(4):
        drawn = uses[labels == cls]
        assert drawn.max() - drawn.min() <= 1


def test_n_instance_one_is_plain_shuffling():
    labels = np.arange(37) % 5
    a = ClassBalancedSampler(labels, n_instance=1).epoch_batches(2, batch_size=6, seed=9)
    b = ShuffleSampler(37).epoch_batches(2, batch_size=6, seed=9)
    np.testing.assert_array_equal(a, b)


def test_class_balanced_bad_arguments():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(ValueError, match="multiple of n_instance"):
        ClassBalancedSampler(labels, n_instance=4).num_batches(batch_size=6)
    with pytest.raises(ValueError, match="small_classes"):
        ClassBalancedSampler(labels, n_instance=2, small_classes="drop")
    with pytest.raises(ValueError, match="no class"):
        ClassBalancedSampler(labels, n_instance=5, small_classes="skip")
    with pytest.raises(ValueError, match="integers"):
        ClassBalancedSampler(np.array([0.5, 1.0]), n_instance=1)


# --- the official samplers of DADA and Embedding Expansion -------------------------------

def _official():
    with open(FIXTURE) as f:
        return json.load(f)


def _statistics(batches, labels, n_instance):
    """The fixture's statistics of ``batches`` (int [steps, B]) over ``labels``."""
    y = labels[batches]
    groups = batches.reshape(batches.shape[0], -1, n_instance)
    heads = labels[groups[..., 0]].ravel()
    distinct = np.array([len(set(row)) for row in y])
    return {
        "mean_distinct": distinct.mean(),
        "repeat_fraction": np.mean(distinct < groups.shape[1]),
        "group_has_duplicate_image": np.mean([len(set(g)) < n_instance
                                              for g in groups.reshape(-1, n_instance)]),
        "class_frequency": np.bincount(heads, minlength=labels.max() + 1) / heads.size,
    }


def _official_cases(prefix):
    ref = _official()
    for key, case in ref.items():
        if key.startswith(prefix):
            batch, n = (int(part[1:]) for part in key.split("_")[1:3])
            sizes = case.get("sizes", ref["sizes"])
            yield pytest.param(case, np.repeat(np.arange(len(sizes)), sizes), batch, n, id=key)


def _check_against_official(sampler, case, labels, batch, n):
    epochs = case["epochs"]
    batches = np.concatenate([sampler.epoch_batches(e, batch_size=batch, seed=0)
                              for e in range(epochs)])
    assert np.all(labels[batches.reshape(-1, n)] == labels[batches.reshape(-1, n)][:, :1])
    ours = _statistics(batches, labels, n)
    # Both sides are estimates from 4000 epochs: a few standard errors of a proportion.
    groups = batches.size // n
    for name in ("repeat_fraction", "group_has_duplicate_image"):
        p, count = case[name], (batches.shape[0] if name == "repeat_fraction" else groups)
        tol = 5 * np.sqrt(2 * max(p * (1 - p), 1e-4) / count)
        assert abs(ours[name] - p) <= tol, (name, ours[name], p)
    assert abs(ours["mean_distinct"] - case["mean_distinct"]) <= 0.03
    np.testing.assert_allclose(ours["class_frequency"], case["class_frequency"], atol=0.012)
    return ours


@pytest.mark.parametrize("case, labels, batch, n", list(_official_cases("dada")))
def test_classes_with_replacement_matches_official_sampler(case, labels, batch, n):
    s = ClassesWithReplacementSampler(labels, n_instance=n)
    # Official __len__: len(image_list) // batch_size batches.
    assert s.num_batches(batch_size=batch) == case["len"] == labels.size // batch
    assert s.num_batches(batch_size=batch, drop_remainder=False) == case["len"]
    ours = _check_against_official(s, case, labels, batch, n)
    # Uniform classes drawn with replacement: the birthday numbers.
    groups = batch // n
    assert abs(ours["mean_distinct"] - expected_distinct_classes(labels.max() + 1, groups)) < 0.03
    np.testing.assert_allclose(ours["class_frequency"], 0.1, atol=0.01)


@pytest.mark.parametrize("case, labels, batch, n", list(_official_cases("ee")))
def test_classes_by_image_count_matches_official_sampler(case, labels, batch, n):
    s = ClassesByImageCountSampler(labels, n_instance=n)
    # An epoch is num_instances × classes images, the last partial batch discarded.
    assert case["len"] == n * (labels.max() + 1)
    assert s.num_batches(batch_size=batch) == case["batches_per_epoch"] == case["len"] // batch
    ours = _check_against_official(s, case, labels, batch, n)
    # Not uniform: the class of 5 images among singletons starts ~45% of the groups.
    assert ours["class_frequency"].max() > 1.5 / (labels.max() + 1)


def test_classes_by_image_count_groups_and_pairs():
    labels = np.repeat(np.arange(6), [2, 9, 3, 1, 5, 4])
    s = ClassesByImageCountSampler(labels, n_instance=2)
    for epoch in range(20):
        for batch in s.epoch_batches(epoch, batch_size=6, seed=1):
            y = labels[batch]
            np.testing.assert_array_equal(y[0::2], y[1::2])  # EE's pairs (2i, 2i + 1)
            assert len(set(y[0::2])) == 3  # distinct classes unless the image list ran out
    # A class with fewer than n_instance - 1 images repeats them; others never within a group.
    s4 = ClassesByImageCountSampler(labels, n_instance=4)
    groups = s4.epoch_order(0, batch_size=8, seed=0).reshape(-1, 4)
    for g in groups:
        size = np.sum(labels == labels[g[0]])
        assert len(set(g[1:])) == 3 or size < 3


def test_classes_with_replacement_repeats_classes_and_images():
    labels = np.repeat(np.arange(5), 3)
    s = ClassesWithReplacementSampler(labels, n_instance=2)
    b = np.concatenate([s.epoch_batches(e, batch_size=6, seed=0) for e in range(200)])
    y = labels[b]
    np.testing.assert_array_equal(y[:, 0::2], y[:, 1::2])
    assert any(len(set(row)) < 3 for row in y)  # some batch holds a class twice
    assert any(row[0] == row[1] for row in b)  # some group holds an image twice


def test_official_samplers_are_deterministic_and_bad_arguments():
    labels = np.repeat(np.arange(6), 4)
    for cls in (ClassesWithReplacementSampler, ClassesByImageCountSampler):
        s = cls(labels, n_instance=2)
        a = s.epoch_order(3, batch_size=4, seed=5)
        np.testing.assert_array_equal(a, s.epoch_order(3, batch_size=4, seed=5))
        assert not np.array_equal(a, s.epoch_order(4, batch_size=4, seed=5))
        assert not np.array_equal(a, s.epoch_order(3, batch_size=4, seed=6))
        with pytest.raises(ValueError, match="multiple of n_instance"):
            s.num_batches(batch_size=5)
        with pytest.raises(ValueError, match="n_instance"):
            cls(labels, n_instance=0)


def test_make_sampler_names():
    labels = np.repeat(np.arange(6), 4)
    assert set(SAMPLERS) == {"shuffle", "class_balanced", "classes_with_replacement",
                             "classes_by_image_count"}
    for name, cls in SAMPLERS.items():
        assert type(make_sampler(name, labels, n_instance=2)) is cls
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_sampler("balanced", labels, n_instance=2)


# --- resume and sharding -------------------------------------------------------------------

def _samplers(labels):
    return [ShuffleSampler(labels.size), ClassBalancedSampler(labels, n_instance=2),
            ClassesWithReplacementSampler(labels, n_instance=2),
            ClassesByImageCountSampler(labels, n_instance=2)]


@FAST
@given(labels=st.lists(st.integers(0, 9), min_size=24, max_size=60).map(np.asarray), seed=st.integers(0, 1000),
       stop=st.integers(0, 12), which=st.integers(0, 3), drop=st.booleans())
def test_resume_from_epoch_and_position(labels, seed, stop, which, drop):
    sampler = _samplers(labels)[which]
    kwargs = dict(batch_size=6, seed=seed, drop_remainder=drop)
    assume(sampler.num_batches(batch_size=6) > 0)  # EE: 2 × classes images per epoch
    full = list(itertools.islice(sampler.batches(**kwargs), 16))
    epoch, position, _ = full[stop]
    resumed = list(itertools.islice(
        sampler.batches(start_epoch=epoch, start_position=position, **kwargs), 16 - stop))
    for (e1, p1, b1), (e2, p2, b2) in zip(full[stop:], resumed):
        assert (e1, p1) == (e2, p2)
        np.testing.assert_array_equal(b1, b2)


@FAST
@given(labels=st.lists(st.integers(0, 9), min_size=24, max_size=60).map(np.asarray), seed=st.integers(0, 1000),
       shards=st.sampled_from([1, 2, 3, 6]), which=st.integers(0, 3), drop=st.booleans())
def test_host_shards_concatenate_to_the_global_batch(labels, seed, shards, which, drop):
    sampler = _samplers(labels)[which]
    kwargs = dict(batch_size=6, seed=seed, drop_remainder=drop)
    assume(sampler.num_batches(batch_size=6) > 0)
    whole = sampler.epoch_batches(1, **kwargs)
    parts = [sampler.epoch_batches(1, shard_index=h, shard_count=shards, **kwargs) for h in range(shards)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    # Disjoint: no slot of a global batch is given to two hosts.
    assert all(p.shape[1] == 6 // shards for p in parts)


def test_batches_stop_after_num_epochs_and_bad_shards():
    s = ShuffleSampler(10)
    got = list(s.batches(batch_size=5, seed=0, num_epochs=2))
    assert [(e, p) for e, p, _ in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="divisible by shard_count"):
        s.epoch_batches(0, batch_size=5, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        s.epoch_batches(0, batch_size=4, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="start_position"):
        next(s.batches(batch_size=5, seed=0, start_position=2))
    with pytest.raises(ValueError, match="seed"):
        s.epoch_batches(0, batch_size=5, seed=-1)
