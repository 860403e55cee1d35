"""Samplers: class balance, distinct neighbours, determinism, resume and host sharding."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_jax.data.samplers import (
    PAD_INDEX,
    ClassBalancedSampler,
    ShuffleSampler,
)

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


# --- resume and sharding -------------------------------------------------------------------

def _samplers(labels):
    return [ShuffleSampler(labels.size), ClassBalancedSampler(labels, n_instance=2)]


@FAST
@given(labels=st.lists(st.integers(0, 9), min_size=24, max_size=60).map(np.asarray), seed=st.integers(0, 1000),
       stop=st.integers(0, 12), which=st.integers(0, 1), drop=st.booleans())
def test_resume_from_epoch_and_position(labels, seed, stop, which, drop):
    sampler = _samplers(labels)[which]
    kwargs = dict(batch_size=6, seed=seed, drop_remainder=drop)
    full = list(itertools.islice(sampler.batches(**kwargs), 16))
    epoch, position, _ = full[stop]
    resumed = list(itertools.islice(
        sampler.batches(start_epoch=epoch, start_position=position, **kwargs), 16 - stop))
    for (e1, p1, b1), (e2, p2, b2) in zip(full[stop:], resumed):
        assert (e1, p1) == (e2, p2)
        np.testing.assert_array_equal(b1, b2)


@FAST
@given(labels=st.lists(st.integers(0, 9), min_size=24, max_size=60).map(np.asarray), seed=st.integers(0, 1000),
       shards=st.sampled_from([1, 2, 3, 6]), which=st.integers(0, 1), drop=st.booleans())
def test_host_shards_concatenate_to_the_global_batch(labels, seed, shards, which, drop):
    sampler = _samplers(labels)[which]
    kwargs = dict(batch_size=6, seed=seed, drop_remainder=drop)
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
