"""Pictures written at every evaluation: a retrieval grid and a 2-D map of the embeddings.

Both work on host NumPy arrays and PIL images and write PNG files; matplotlib runs with the
non-interactive Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from proxy_jax import evaluation

__all__ = ["retrieval_grid", "save_retrieval_grid", "pca_2d",
           "save_embedding_map"]

_GREEN = (40, 170, 60)
_RED = (220, 40, 40)
_BLUE = (40, 90, 220)


def _thumbnail(image: Image.Image, size: int, border: int, colour) -> Image.Image:
    """The image scaled (up or down, aspect kept) into a ``size`` tile with a coloured border."""
    inner = size - 2 * border
    image = image.convert("RGB")
    scale = inner / max(image.width, image.height)
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (size, size), colour)
    tile.paste(thumb, (border + (inner - thumb.width) // 2, border + (inner - thumb.height) // 2))
    return tile


def retrieval_grid(queries: Sequence[Image.Image], neighbours: Sequence[Sequence[Image.Image]],
                   correct: np.ndarray, *, thumb_size: int = 72, border: int = 4,
                   gap: int = 12) -> Image.Image:
    """One row per query: the query (blue border), a gap, then its top-k neighbours.

    Args:
      queries: Q query images.
      neighbours: Q lists of k retrieved images, most similar first.
      correct: [Q, k] bool, whether each neighbour has the query's label: green border when
        true, red when false.
    """
    correct = np.asarray(correct, bool)
    num_queries = len(queries)
    if len(neighbours) != num_queries or correct.shape[0] != num_queries:
        raise ValueError(f"neighbours ({len(neighbours)}) and correct ({correct.shape}) must "
                         f"have one row per query ({num_queries})")
    k = correct.shape[1] if correct.ndim == 2 else 0
    width = thumb_size * (k + 1) + gap
    canvas = Image.new("RGB", (width, max(1, thumb_size * num_queries)), (255, 255, 255))
    for row, (query, retrieved) in enumerate(zip(queries, neighbours)):
        if len(retrieved) != k:
            raise ValueError(f"query {row} has {len(retrieved)} neighbours, expected {k}")
        y = row * thumb_size
        canvas.paste(_thumbnail(query, thumb_size, border, _BLUE), (0, y))
        for col, image in enumerate(retrieved):
            colour = _GREEN if correct[row, col] else _RED
            canvas.paste(_thumbnail(image, thumb_size, border, colour),
                         (thumb_size + gap + col * thumb_size, y))
    return canvas


def save_retrieval_grid(path: str, embeddings: np.ndarray, labels: np.ndarray,
                        load_image: Callable[[int], Image.Image], *, num_queries: int, k: int,
                        seed: int = 0, gallery_embeddings: np.ndarray | None = None,
                        gallery_labels: np.ndarray | None = None,
                        load_gallery_image: Callable[[int], Image.Image] | None = None) -> float:
    """Picks ``num_queries`` random queries, retrieves their top-k and writes the grid PNG.

    Args:
      path: output PNG path.
      embeddings: [N, D] l2-normalized query embeddings (all-vs-all when no gallery given).
      labels: [N] int labels.
      load_image: index -> PIL image of the query set.
      gallery_embeddings, gallery_labels, load_gallery_image: a separate gallery (In-shop).

    Returns:
      The fraction of correct neighbours shown (a sanity number for the logs).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    num_queries = min(num_queries, len(embeddings))
    picked = np.sort(rng.choice(len(embeddings), size=num_queries, replace=False))
    if gallery_embeddings is None:
        gallery, gallery_y, load_g = embeddings, labels, load_image
        k = min(k, len(embeddings) - 1)
        neighbours = evaluation.nearest_neighbours(embeddings[picked], gallery, k=k, query_indices=picked)
    else:
        gallery, gallery_y = gallery_embeddings, np.asarray(gallery_labels)
        load_g = load_gallery_image
        k = min(k, len(gallery))
        neighbours = evaluation.nearest_neighbours(embeddings[picked], gallery, k=k)
    correct = gallery_y[neighbours] == labels[picked][:, None]
    grid = retrieval_grid([load_image(int(i)) for i in picked],
                          [[load_g(int(j)) for j in row] for row in neighbours], correct)
    grid.save(path, format="PNG")
    return float(correct.mean()) if correct.size else 0.0


def pca_2d(embeddings: np.ndarray) -> np.ndarray:
    """[N, 2] projection of [N, D] embeddings on their two principal axes (SVD).

    Signs are fixed (the largest-magnitude coordinate of each axis positive) so that the
    picture does not flip between evaluations for no reason.
    """
    x = np.asarray(embeddings, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:  # D == 1
        axes = np.concatenate([axes, np.zeros_like(axes)], axis=0)
    signs = np.sign(axes[np.arange(2), np.argmax(np.abs(axes), axis=1)])
    signs[signs == 0] = 1.0
    return x @ (axes * signs[:, None]).T


def save_embedding_map(path: str, embeddings: np.ndarray, labels: np.ndarray, *,
                       max_points: int = 2000, seed: int = 0, title: str = "") -> None:
    """Writes a PNG scatter of the PCA projection of the embeddings, coloured by class."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state
    embeddings, labels = np.asarray(embeddings), np.asarray(labels)
    if len(embeddings) != len(labels):
        raise ValueError(f"embeddings ({len(embeddings)}) and labels ({len(labels)}) must have "
                         "the same length")
    if len(embeddings) > max_points > 0:
        keep = np.random.default_rng(seed).choice(len(embeddings), max_points, replace=False)
        embeddings, labels = embeddings[np.sort(keep)], labels[np.sort(keep)]
    points = pca_2d(embeddings)
    classes, colour_index = np.unique(labels, return_inverse=True)
    figure = Figure(figsize=(6, 6), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    if len(classes) <= 20:  # a qualitative map: one distinct colour per class
        colours = matplotlib.colormaps["tab20"](colour_index % 20)
    else:  # many classes: spread them around the hue circle
        colours = matplotlib.colormaps["hsv"](colour_index / len(classes))
    axes.scatter(points[:, 0], points[:, 1], c=colours, s=6, linewidths=0)
    axes.set_title(title or f"test embeddings (PCA), {len(classes)} classes")
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, format="png")
