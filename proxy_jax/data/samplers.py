"""Batch samplers: which dataset indices form each global batch, host-side and in NumPy.

A sampler describes an *epoch order*: a flat ``int64`` array of dataset indices whose
consecutive chunks of ``batch_size`` are the global batches of that epoch. The order is a
pure function of ``(seed, epoch)``, so any batch can be recomputed from ``(epoch,
position)`` alone: that is what makes the loader resumable and lets every host compute the
same global batch and keep only its own part of it.

Samplers (all share :class:`Sampler`'s methods):

* :class:`ShuffleSampler` -- a permutation per epoch (``shuffle=False``: dataset order,
  for evaluation).
* :class:`ClassBalancedSampler` -- ``batch_size // n_instance`` distinct classes per batch
  with ``n_instance`` images each, at positions ``[k * n_instance, (k + 1) * n_instance)``.
  With an even ``n_instance`` the pairs ``(2i, 2i + 1)`` share a class, which is the batch
  contract of Embedding Expansion (clovaai/embedding-expansion ``dataset/sampler.py``).
  ``n_instance=1`` is plain shuffling, as in the seed repositories.
* :class:`ClassesWithReplacementSampler` -- DADA's ``class_random`` sampler
  (Noahsark/DADA ``datasampler/class_random_sampler.py``): classes drawn uniformly *with*
  replacement, images of a class drawn with replacement, ``len(labels) // batch_size``
  batches; a batch may hold a class twice.
* :class:`ClassesByImageCountSampler` -- Embedding Expansion's ``RandomSampler``
  (clovaai/embedding-expansion ``dataset/sampler.py``): each group starts at the next
  image of a shuffled list of *images* whose class is not yet in the batch, so classes are
  picked in proportion to their image counts; an epoch is ``n_instance × classes`` images.

:data:`SAMPLERS` maps the names of ``config.data.sampler`` to these classes.

Proxy Synthesis needs cyclic neighbours of different classes; that order is made inside
the step (``proxy_jax.regularizers.distinct_neighbours``), not here.

Sharding: host ``shard_index`` of ``shard_count`` keeps the contiguous slice
``[shard_index * b, (shard_index + 1) * b)`` of every global batch, ``b = batch_size //
shard_count``, so concatenating the hosts' batches in host order gives the single-host
global batch.

Example::

    sampler = ClassBalancedSampler(dataset.targets, n_instance=4)
    for epoch, position, indices in sampler.batches(batch_size=120, seed=0):
        ...  # indices: int64 [120]
"""

from __future__ import annotations

import abc
from typing import Iterator, Optional, Sequence

import numpy as np

__all__ = [
    "Sampler",
    "ShuffleSampler",
    "ClassBalancedSampler",
    "ClassesWithReplacementSampler",
    "ClassesByImageCountSampler",
    "SAMPLERS",
    "make_sampler",
    "expected_distinct_classes",
    "PAD_INDEX",
]

# Index used to pad the last, partial batch of an epoch when drop_remainder=False.
PAD_INDEX = -1

# Distinct streams for the different random decisions made from one (seed, epoch).
_SHUFFLE_STREAM = 0
_BALANCED_STREAM = 1
_WITH_REPLACEMENT_STREAM = 2
_BY_IMAGE_COUNT_STREAM = 3


def _check_nonnegative_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, stream]))


def _as_labels(labels, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of int labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


class Sampler(abc.ABC):
    """Base class: subclasses define :meth:`epoch_order` and :meth:`num_batches`.

    Attributes:
      num_examples: size of the dataset the indices refer to.
    """

    num_examples: int

    @abc.abstractmethod
    def epoch_order(self, epoch: int, *, batch_size: int, seed: int) -> np.ndarray:
        """Dataset indices of one epoch, int64 ``[n]``; batch ``k`` is ``order[k*B:(k+1)*B]``.

        ``n`` is a multiple of ``batch_size`` except for samplers that visit every example
        once (:class:`ShuffleSampler`), whose last chunk may be partial.
        """

    @abc.abstractmethod
    def num_batches(self, *, batch_size: int, drop_remainder: bool = True) -> int:
        """Global batches per epoch."""

    def epoch_batches(self, epoch: int, *, batch_size: int, seed: int, drop_remainder: bool = True,
                      shard_index: int = 0, shard_count: int = 1) -> np.ndarray:
        """This host's part of every global batch of ``epoch``.

        Returns:
          int64 ``[num_batches, batch_size // shard_count]``. With ``drop_remainder=False``
          the last global batch is padded to ``batch_size`` with ``PAD_INDEX`` (-1) before
          it is split between hosts, so shapes stay fixed.
        """
        batch_size = _check_positive_int(batch_size, "batch_size")
        local = _local_batch_size(batch_size, shard_index, shard_count)
        order = self.epoch_order(_check_nonnegative_int(epoch, "epoch"), batch_size=batch_size,
                                 seed=_check_nonnegative_int(seed, "seed"))
        steps = self.num_batches(batch_size=batch_size, drop_remainder=drop_remainder)
        padded = np.full(steps * batch_size, PAD_INDEX, np.int64)
        used = min(order.size, padded.size)
        padded[:used] = order[:used]
        batches = padded.reshape(steps, batch_size)
        return batches[:, shard_index * local:(shard_index + 1) * local]

    def batches(self, *, batch_size: int, seed: int, start_epoch: int = 0, start_position: int = 0,
                num_epochs: Optional[int] = None, drop_remainder: bool = True, shard_index: int = 0,
                shard_count: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yields ``(epoch, position, indices)`` from ``(start_epoch, start_position)`` on.

        ``indices`` is int64 ``[batch_size // shard_count]`` (see :meth:`epoch_batches`).
        ``num_epochs=None`` runs forever; otherwise it stops after epoch
        ``num_epochs - 1``. Resuming from a saved ``(epoch, position)`` continues the same
        sequence exactly.
        """
        steps = self.num_batches(batch_size=batch_size, drop_remainder=drop_remainder)
        epoch = _check_nonnegative_int(start_epoch, "start_epoch")
        position = _check_nonnegative_int(start_position, "start_position")
        if position >= steps:
            raise ValueError(f"start_position must be < {steps} (batches per epoch), got {position}")
        while num_epochs is None or epoch < num_epochs:
            rows = self.epoch_batches(epoch, batch_size=batch_size, seed=seed,
                                      drop_remainder=drop_remainder, shard_index=shard_index,
                                      shard_count=shard_count)
            for k in range(position, steps):
                yield epoch, k, rows[k]
            epoch, position = epoch + 1, 0


def _local_batch_size(batch_size: int, shard_index: int, shard_count: int) -> int:
    shard_count = _check_positive_int(shard_count, "shard_count")
    shard_index = _check_nonnegative_int(shard_index, "shard_index")
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count={shard_count}, got {shard_index}")
    if batch_size % shard_count:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by shard_count={shard_count}")
    return batch_size // shard_count


class ShuffleSampler(Sampler):
    """Every example once per epoch, in a fresh random order (or in order, ``shuffle=False``).

    Args:
      num_examples: dataset size.
      shuffle: permute per ``(seed, epoch)``; False keeps ``0..num_examples-1`` (evaluation).
    """

    def __init__(self, num_examples: int, *, shuffle: bool = True):
        self.num_examples = _check_positive_int(num_examples, "num_examples")
        self.shuffle = bool(shuffle)

    def epoch_order(self, epoch: int, *, batch_size: int, seed: int) -> np.ndarray:
        del batch_size
        if not self.shuffle:
            return np.arange(self.num_examples, dtype=np.int64)
        return _rng(seed, epoch, _SHUFFLE_STREAM).permutation(self.num_examples).astype(np.int64)

    def num_batches(self, *, batch_size: int, drop_remainder: bool = True) -> int:
        batch_size = _check_positive_int(batch_size, "batch_size")
        if drop_remainder:
            return self.num_examples // batch_size
        return -(-self.num_examples // batch_size)


class ClassBalancedSampler(Sampler):
    """``batch_size // n_instance`` distinct classes per batch, ``n_instance`` images each.

    Per epoch there are ``max(1, len(labels) // batch_size)`` batches (the seeds'
    ``len(dataset) // batch_size``). Each batch draws its classes uniformly without
    replacement; each class hands out its images from a per-epoch shuffled queue that is
    refilled (reshuffled) when it runs out, so within a group the images are distinct
    whenever the class has at least ``n_instance`` of them, and over an epoch a class's
    images are used evenly.

    Classes with fewer than ``n_instance`` images: ``small_classes='replace'`` (default)
    keeps them and repeats their images within the group (each image at least once before
    any repeats); ``'skip'`` never samples them.

    ``n_instance=1`` is plain shuffling: the same order as :class:`ShuffleSampler` for the
    same seed (incomplete last batch dropped or padded by the loader, as there).

    Args:
      labels: int ``[num_examples]``, the dataset's ``targets``.
      n_instance: images per class in a batch; must divide the batch size.
      small_classes: ``'replace'`` or ``'skip'``.
    """

    def __init__(self, labels: Sequence[int], *, n_instance: int, small_classes: str = "replace"):
        self.labels = _as_labels(labels)
        self.num_examples = int(self.labels.size)
        self.n_instance = _check_positive_int(n_instance, "n_instance")
        if small_classes not in ("replace", "skip"):
            raise ValueError(f"small_classes must be 'replace' or 'skip', got {small_classes!r}")
        self.small_classes = small_classes
        classes, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
        # Indices grouped by class in one sort (a mask per class would be O(N * C)).
        members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
        if small_classes == "skip":
            keep = [k for k, m in enumerate(members) if m.size >= self.n_instance]
            classes, members = classes[keep], [members[k] for k in keep]
        self.classes = classes
        self._members = members
        if self.n_instance > 1 and not members:
            raise ValueError(
                f"labels has no class with n_instance={self.n_instance} images (small_classes='skip')")

    def _groups_per_batch(self, batch_size: int) -> int:
        batch_size = _check_positive_int(batch_size, "batch_size")
        if batch_size % self.n_instance:
            raise ValueError(f"batch_size={batch_size} must be a multiple of n_instance={self.n_instance}")
        groups = batch_size // self.n_instance
        if groups > len(self._members):
            raise ValueError(
                f"batch_size={batch_size} needs {groups} distinct classes of n_instance="
                f"{self.n_instance} images, but only {len(self._members)} classes are available")
        return groups

    def num_batches(self, *, batch_size: int, drop_remainder: bool = True) -> int:
        if self.n_instance == 1:
            return ShuffleSampler(self.num_examples).num_batches(
                batch_size=batch_size, drop_remainder=drop_remainder)
        self._groups_per_batch(batch_size)
        return max(1, self.num_examples // batch_size)

    def epoch_order(self, epoch: int, *, batch_size: int, seed: int) -> np.ndarray:
        if self.n_instance == 1:
            return ShuffleSampler(self.num_examples).epoch_order(epoch, batch_size=batch_size, seed=seed)
        groups = self._groups_per_batch(batch_size)
        steps = self.num_batches(batch_size=batch_size)
        rng = _rng(seed, epoch, _BALANCED_STREAM)
        queues = [rng.permutation(m) for m in self._members]
        heads = np.zeros(len(queues), np.int64)
        order = np.empty((steps, groups, self.n_instance), np.int64)
        for step in range(steps):
            for g, k in enumerate(rng.choice(len(queues), size=groups, replace=False)):
                order[step, g] = self._take(k, queues, heads, rng)
        return order.reshape(-1)

    def _take(self, k: int, queues: list, heads: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The next ``n_instance`` images of class ``k``, refilling its queue as needed."""
        members, n = self._members[k], self.n_instance
        if members.size < n:  # small class ('replace'): every image once, then repeats
            reps = -(-n // members.size)
            return np.concatenate([rng.permutation(members) for _ in range(reps)])[:n]
        head = heads[k]
        taken = queues[k][head:head + n]
        if taken.size == n:
            heads[k] = head + n
            return taken
        # The queue ran out mid-group: reshuffle, and move the images the group already
        # holds to the back of the new queue so that the group's images stay distinct.
        fresh = rng.permutation(members)
        held = np.isin(fresh, taken)
        queues[k] = np.concatenate([fresh[~held], fresh[held]])
        heads[k] = n - taken.size
        return np.concatenate([taken, queues[k][:heads[k]]])


def _class_members(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(classes [C], counts [C], by_class [N])``: the distinct labels, their image counts,
    and the dataset indices sorted by class (class ``k``'s images are
    ``by_class[offsets[k]:offsets[k] + counts[k]]`` with ``offsets`` the exclusive cumsum)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return classes, counts.astype(np.int64), np.argsort(inverse, kind="stable").astype(np.int64)


def _groups_of(batch_size: int, n_instance: int) -> int:
    batch_size = _check_positive_int(batch_size, "batch_size")
    if batch_size % n_instance:
        raise ValueError(f"batch_size={batch_size} must be a multiple of n_instance={n_instance}")
    return batch_size // n_instance


class ClassesWithReplacementSampler(Sampler):
    """DADA's batches: ``batch_size // n_instance`` classes drawn *with* replacement.

    The official ``class_random`` sampler (Noahsark/DADA
    ``datasampler/class_random_sampler.py``, the ``main.py`` default with
    ``samples_per_class=2`` and ``internal_split=1``): for every group of a batch a class
    is drawn uniformly from all training classes, independently of the other groups, then
    ``n_instance`` of its images uniformly and independently (with replacement, so a group
    may hold one image twice). A batch holds ``C · (1 − (1 − 1/C)^G)`` distinct classes on
    average (G groups, C classes; :func:`expected_distinct_classes`): for CUB and Cars
    (G = 45, C = 100 or 98) about 36.4, so about 19% of a batch's groups repeat a class
    already in it, and nearly every batch holds some class twice.

    Groups occupy positions ``[k * n_instance, (k + 1) * n_instance)``, as in the official
    batch. An epoch is ``len(labels) // batch_size`` batches (the official ``__len__``);
    ``drop_remainder`` changes nothing, every batch is full. The draws come from
    ``(seed, epoch)`` (the official code seeds Python's global ``random`` with
    ``seed + epoch`` each epoch), so resuming at ``(epoch, position)`` repeats them.

    Args:
      labels: int ``[num_examples]``, the dataset's ``targets``.
      n_instance: images per group [samples_per_class]; must divide the batch size.
    """

    def __init__(self, labels: Sequence[int], *, n_instance: int):
        self.labels = _as_labels(labels)
        self.num_examples = int(self.labels.size)
        self.n_instance = _check_positive_int(n_instance, "n_instance")
        self.classes, self._counts, self._by_class = _class_members(self.labels)
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)

    def num_batches(self, *, batch_size: int, drop_remainder: bool = True) -> int:
        del drop_remainder  # every batch is full
        _groups_of(batch_size, self.n_instance)
        return self.num_examples // batch_size

    def epoch_order(self, epoch: int, *, batch_size: int, seed: int) -> np.ndarray:
        groups = _groups_of(batch_size, self.n_instance)
        steps = self.num_batches(batch_size=batch_size)
        rng = _rng(seed, epoch, _WITH_REPLACEMENT_STREAM)
        drawn = rng.integers(0, self.classes.size, size=(steps, groups))  # class positions
        counts = self._counts[drawn][..., None]  # [steps, groups, 1]
        pick = rng.integers(0, counts, size=(steps, groups, self.n_instance))
        return self._by_class[self._offsets[drawn][..., None] + pick].reshape(-1)


def expected_distinct_classes(num_classes: int, groups: int) -> float:
    """Mean number of distinct classes among ``groups`` uniform draws with replacement
    from ``num_classes``: ``C · (1 − (1 − 1/C)^G)``."""
    return float(num_classes * (1.0 - (1.0 - 1.0 / num_classes) ** groups))


class ClassesByImageCountSampler(Sampler):
    """Embedding Expansion's batches: classes picked in proportion to their image counts.

    The official ``RandomSampler`` (clovaai/embedding-expansion ``dataset/sampler.py``, as
    ``dataset/__init__.py`` builds it with ``max_num_examples_per_iter = num_instances ×
    classes``): images are visited in a random order; an image whose class is not yet in
    the current batch starts a group: that image, then ``n_instance − 1`` images of its
    class drawn *without* replacement from all of the class's images (the starting one
    included, so it can occur twice), with replacement when the class has fewer than
    ``n_instance − 1`` images. Images of classes already in the batch are passed over.
    Whenever the list is used up a new random order starts, and with it the set of classes
    "in the batch" is emptied (mid-batch too, so a batch can then hold a class twice). A
    class's chance to start a group is therefore proportional to its image count, not
    uniform as in :class:`ClassBalancedSampler`.

    An epoch is ``n_instance × classes`` images, the first ``(n_instance × classes) //
    batch_size`` full batches (the official loader's ``last_batch='discard'``;
    ``drop_remainder`` changes nothing). Groups occupy ``[k * n_instance, (k + 1) *
    n_instance)``, so with an even ``n_instance`` the pairs ``(2i, 2i + 1)`` share a class.

    Args:
      labels: int ``[num_examples]``, the dataset's ``targets``.
      n_instance: images per group [num_instances]; must divide the batch size.
    """

    def __init__(self, labels: Sequence[int], *, n_instance: int):
        self.labels = _as_labels(labels)
        self.num_examples = int(self.labels.size)
        self.n_instance = _check_positive_int(n_instance, "n_instance")
        self.classes, counts, by_class = _class_members(self.labels)
        self._members = np.split(by_class, np.cumsum(counts)[:-1])
        self._class_of = np.searchsorted(self.classes, self.labels)  # [N] class positions

    def _epoch_size(self) -> int:
        return self.n_instance * min(self.classes.size, self.num_examples)

    def num_batches(self, *, batch_size: int, drop_remainder: bool = True) -> int:
        del drop_remainder  # the official loader discards the last partial batch
        _groups_of(batch_size, self.n_instance)
        return self._epoch_size() // batch_size

    def epoch_order(self, epoch: int, *, batch_size: int, seed: int) -> np.ndarray:
        _groups_of(batch_size, self.n_instance)
        rng = _rng(seed, epoch, _BY_IMAGE_COUNT_STREAM)
        target, extra = self._epoch_size(), self.n_instance - 1
        order: list[int] = []
        while len(order) < target:
            in_batch: set[int] = set()  # emptied with each new random order, as officially
            for i in rng.permutation(self.num_examples):
                k = int(self._class_of[i])
                if k in in_batch:
                    continue
                in_batch.add(k)
                members = self._members[k]
                rest = rng.choice(members, size=extra, replace=members.size < extra)
                order.append(int(i))
                order.extend(rest.tolist())
                if len(order) >= target:
                    break
                if len(order) % batch_size == 0:
                    in_batch = set()
        steps = self.num_batches(batch_size=batch_size)
        return np.asarray(order[:steps * batch_size], np.int64)


#: ``config.data.sampler`` -> sampler class (see the module docstring).
SAMPLERS = {
    "shuffle": ShuffleSampler,
    "class_balanced": ClassBalancedSampler,
    "classes_with_replacement": ClassesWithReplacementSampler,
    "classes_by_image_count": ClassesByImageCountSampler,
}


def make_sampler(name: str, labels: Sequence[int], *, n_instance: int) -> Sampler:
    """The training sampler ``name`` (a key of :data:`SAMPLERS`) over ``labels``.

    'shuffle' ignores ``n_instance``; 'class_balanced' with ``n_instance=1`` is the same
    order as 'shuffle'.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")
    if name == "shuffle":
        return ShuffleSampler(len(labels))
    return SAMPLERS[name](labels, n_instance=n_instance)
