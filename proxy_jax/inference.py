"""Embedding data sets with a trained network, their retrieval metrics and pictures.

The network runs data-parallel over the mesh (inputs sharded on the batch, outputs
replicated); the metrics are computed once, on process 0's host, from every embedding
(``proxy_jax.evaluation``), then shared with the other processes.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from proxy_jax import evaluation, models, multihost, parallel, visualize
from proxy_jax.data import datasets, pipeline, samplers, transforms
from proxy_jax.methods.base import network_params

__all__ = ["make_embed_fn", "embed_dataset", "network_variables", "evaluate", "images_under"]


def make_embed_fn(model, mesh: Mesh) -> Callable:
    """jit of ``(variables, batch) -> (embeddings, labels, mask)``, inputs sharded on the
    batch, outputs replicated (so every process holds the whole batch)."""
    replicated = parallel.replicated_sharding(mesh)
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def embed(variables, batch):
        embeddings = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
        return embeddings, batch["label"], batch["mask"]
    return jax.jit(embed, in_shardings=(replicated, sharded), out_shardings=replicated)


def embed_dataset(embed_fn: Callable, variables: dict, dataset, config, mesh: Mesh
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [N, D] float32 (l2-normalized) and labels [N] of a whole data set.

    Batches of ``config.data.eval_batch_size`` rounded up to a multiple of the device
    count, in dataset order; the last one is padded by the loader and its padding dropped.
    """
    norm = models.input_normalization(config.model.backbone)
    devices = mesh.devices.size
    batch_size = -(-config.data.eval_batch_size // devices) * devices
    loader = pipeline.make_loader(
        dataset, batch_size=batch_size,
        sampler=samplers.ShuffleSampler(len(dataset), shuffle=False),
        transform=transforms.transform_from_config(config.data, norm, training=False),
        num_workers=config.data.num_workers, seed=0, drop_remainder=False, num_epochs=1,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    outputs, labels = [], []
    with loader:
        for batch in loader:
            emb, label, mask = jax.device_get(embed_fn(variables, parallel.shard_batch(batch, mesh)))
            mask = np.asarray(mask, bool)
            outputs.append(np.asarray(emb)[mask])
            labels.append(np.asarray(label)[mask])
    embeddings = np.concatenate(outputs).astype(np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12), np.concatenate(labels).astype(np.int64)


def network_variables(state) -> dict:
    """The network's variables of a train state (no proxies, no method state)."""
    return {"params": network_params(state.params), "batch_stats": state.batch_stats}


def evaluate(embed_fn: Callable, state, data, config, mesh: Mesh,
             *, workdir: Optional[str] = None, tag: str = "", step: Optional[int] = None) -> dict:
    """Retrieval (and optionally clustering) metrics of the test set; pictures if workdir.

    The pictures are ``retrieval{tag}_step{step}.png`` and ``embedding_map{tag}_step{step}.png``
    (one pair per evaluation; without ``step``, ``retrieval{tag}.png`` …), titled with the
    config's name, the step and the test Recall@1.

    ``data``: a :class:`~proxy_jax.data.splits.Splits`; ``test`` holds the queries,
    ``gallery`` None means all-vs-all.

    Returns metrics as floats, keys as :func:`proxy_jax.evaluation.retrieval_metrics`
    ('recall@1', …, 'r_precision', 'map@r'; 'ap@K' with ``config.eval.ap_at`` = K; 'nmi',
    'f1' with ``config.eval.nmi``). With
    several processes all must call it; process 0 computes, all return the same metrics.
    """
    variables = network_variables(state)
    query, query_y = embed_dataset(embed_fn, variables, data.test, config, mesh)
    gallery = gallery_y = None
    if data.gallery is not None:
        gallery, gallery_y = embed_dataset(embed_fn, variables, data.gallery, config, mesh)
    train_part = None
    if workdir is not None and config.eval.map_points > 0:  # training classes for the map
        train_part = embed_dataset(embed_fn, variables, _class_subset(
            data.train, visualize.MAP_CLASSES, config.seed), config, mesh)
    metrics = None
    if multihost.is_primary():  # computed once; every process holds all the embeddings
        metrics = evaluation.retrieval_metrics(query, query_y, ks=tuple(config.eval.ks),
                                               gallery_embeddings=gallery, gallery_labels=gallery_y)
        if config.eval.ap_at > 0:
            metrics[f"ap@{config.eval.ap_at}"] = evaluation.top_k_average_precision(
                query, query_y, k=config.eval.ap_at, gallery_embeddings=gallery,
                gallery_labels=gallery_y)
        if config.eval.nmi:
            metrics.update(evaluation.clustering_metrics(query, query_y, seed=config.seed))
        metrics = {k: float(v) for k, v in metrics.items()}
        if workdir is not None:
            suffix = tag if step is None else f"{tag}_step{step}"
            title = (f"{config.name}{tag.replace('_', ' ')}"
                     + ("" if step is None else f", step {step}")
                     + f": test Recall@1 {100 * metrics['recall@1']:.1f}%")
            _save_pictures(workdir, suffix, title, query, query_y, gallery, gallery_y, data,
                           config, train_part)
    return multihost.broadcast_json(metrics)


def _class_subset(dataset, num_classes: int, seed: int) -> datasets.ClassSubset:
    """``num_classes`` classes of ``dataset`` drawn with ``seed`` (all their images)."""
    classes = np.unique(datasets.dataset_labels(dataset))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(classes, min(num_classes, len(classes)), replace=False))
    return datasets.ClassSubset(dataset, picked.tolist())


def _save_pictures(workdir, suffix, title, query, query_y, gallery, gallery_y, data, config,
                   train_part) -> None:
    def loader(dataset):
        return lambda i: dataset[i][0]

    if config.eval.num_queries > 0:
        visualize.save_retrieval_grid(
            os.path.join(workdir, f"retrieval{suffix}.png"), query, query_y, loader(data.test),
            num_queries=config.eval.num_queries, k=config.eval.top_k, seed=config.seed,
            gallery_embeddings=gallery, gallery_labels=gallery_y,
            load_gallery_image=loader(data.gallery) if data.gallery is not None else None,
            title=title)
    if config.eval.map_points > 0:
        visualize.save_embedding_map(
            os.path.join(workdir, f"embedding_map{suffix}.png"), query, query_y,
            max_points=config.eval.map_points, seed=config.seed, title=title,
            train_embeddings=train_part[0], train_labels=train_part[1],
            class_names=getattr(data.test, "classes", None))


def images_under(folder: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Every image file under ``folder`` (recursively, sorted) with a label.

    The label of a file is the index of the top-level sub-folder it lies in, among the sorted
    names of the sub-folders that hold images (its class, as in ``folder/<class>/**``), and
    -1 for a file directly in ``folder``.

    Returns:
      ([(path, label)], class names).

    Raises:
      ValueError: ``folder`` is not a folder or holds no image files.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"embed folder {folder!r} is not a folder")
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(parent, folder)
        top = "" if rel == "." else rel.split(os.sep)[0]
        found += [(os.path.join(parent, f), top) for f in sorted(files)
                  if datasets.is_image_file(f)]
    if not found:
        raise ValueError(f"embed folder {folder!r} holds no image files (extensions "
                         f"{', '.join(datasets.IMG_EXTENSIONS)})")
    classes = sorted({top for _, top in found if top})
    index = {c: i for i, c in enumerate(classes)}
    return [(path, index.get(top, -1)) for path, top in found], classes
