"""Data layer that PyTorch users recognise.

* datasets: map-style ``ds[i] -> (PIL RGB image, int label)`` readers of the benchmark
  layouts (:func:`load_benchmark`, :class:`ImageFolder`), tensorflow-datasets sources
  (:class:`TfdsDataset`), preparation from the official archives (:func:`prepare`) and the
  embedded default data set (:func:`ensure_embedded_dataset`); :func:`load_splits` gives the
  train/test(/gallery) sets a config's ``data.dataset`` names;
* samplers: which images form each global batch, deterministic from (seed, epoch);
* transforms: torchvision's PIL path (with AutoAugment) and Embedding Expansion's MXNet/OpenCV
  transforms, pixel for pixel, plus each backbone's normalization;
* pipeline: :func:`make_loader`, grain worker processes feeding fixed-shape numpy batches
  with an exactly restorable iterator state.
"""
from proxy_jax.data.datasets import (
    IMG_EXTENSIONS, ClassSubset, CorruptImageError, ImageDataset, ImageFolder, dataset_labels,
    decode_image_bytes, load_benchmark, load_dada_folder, load_image, to_rgb, zero_shot_split)
from proxy_jax.data.embedded import ensure_embedded_dataset
from proxy_jax.data.pipeline import DatasetItemError, Loader, make_loader
from proxy_jax.data.prepare import prepare
from proxy_jax.data.samplers import (
    PAD_INDEX, SAMPLERS, ClassBalancedSampler, ClassesByImageCountSampler,
    ClassesWithReplacementSampler, Sampler, ShuffleSampler, make_sampler)
from proxy_jax.data.splits import Splits, load_splits
from proxy_jax.data.tfds_sources import TFDS_BENCHMARKS, TfdsDataset
from proxy_jax.data.transforms import (
    UNIT_RANGE, AutoAugment, CenterCrop, Compose, InputNormalization, Random2DTranslation,
    RandomHorizontalFlip, RandomResizedCrop, Resize, SquashResize, eval_transform, normalize,
    train_transform, transform_from_config)
