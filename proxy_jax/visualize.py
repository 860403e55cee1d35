"""Pictures written at every evaluation: a retrieval grid and a 2-D map of the embeddings.

Both work on host NumPy arrays and PIL images and write PNG files; matplotlib runs with the
non-interactive Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from proxy_jax import evaluation

__all__ = ["retrieval_grid", "save_retrieval_grid", "pca_2d", "class_subset", "tsne_2d",
           "save_embedding_map", "MAP_CLASSES"]

_GREEN = (40, 170, 60)
_RED = (220, 40, 40)
_BLUE = (40, 90, 220)
# Test classes in the embedding map (and as many training classes).
MAP_CLASSES = 10


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
                   gap: int = 12, title: str = "") -> Image.Image:
    """One row per query: the query (blue border), a gap, then its top-k neighbours.

    Above the rows: ``title`` and the rank of every column (1 = most similar); below them, a
    legend of the border colours.

    Args:
      queries: Q query images.
      neighbours: Q lists of k retrieved images, most similar first.
      correct: [Q, k] bool, whether each neighbour has the query's label: green border (a
        hit) when true, red (a miss) when false.
    """
    from PIL import ImageDraw

    correct = np.asarray(correct, bool)
    num_queries = len(queries)
    if len(neighbours) != num_queries or correct.shape[0] != num_queries:
        raise ValueError(f"neighbours ({len(neighbours)}) and correct ({correct.shape}) must "
                         f"have one row per query ({num_queries})")
    k = correct.shape[1] if correct.ndim == 2 else 0
    line = 14  # one text line of PIL's default font
    top = (2 if title else 1) * line + 4
    width = max(thumb_size * (k + 1) + gap, 330)
    canvas = Image.new("RGB", (width, top + max(1, thumb_size * num_queries) + line + 8),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0))
    draw.text((4, top - line), "query", fill=_BLUE)
    for col in range(k):
        draw.text((thumb_size + gap + col * thumb_size + thumb_size // 2 - 8, top - line),
                  f"#{col + 1}", fill=(0, 0, 0))
    for row, (query, retrieved) in enumerate(zip(queries, neighbours)):
        if len(retrieved) != k:
            raise ValueError(f"query {row} has {len(retrieved)} neighbours, expected {k}")
        y = top + row * thumb_size
        canvas.paste(_thumbnail(query, thumb_size, border, _BLUE), (0, y))
        for col, image in enumerate(retrieved):
            colour = _GREEN if correct[row, col] else _RED
            canvas.paste(_thumbnail(image, thumb_size, border, colour),
                         (thumb_size + gap + col * thumb_size, y))
    y, x = canvas.height - line - 4, 4
    for colour, text in ((_BLUE, "query"), (_GREEN, "hit: same class"),
                         (_RED, "miss: other class")):
        draw.rectangle((x, y + 2, x + 9, y + 11), fill=colour)
        draw.text((x + 13, y), text, fill=(0, 0, 0))
        x += 20 + 7 * len(text)
    return canvas


def save_retrieval_grid(path: str, embeddings: np.ndarray, labels: np.ndarray,
                        load_image: Callable[[int], Image.Image], *, num_queries: int, k: int,
                        seed: int = 0, gallery_embeddings: np.ndarray | None = None,
                        gallery_labels: np.ndarray | None = None,
                        load_gallery_image: Callable[[int], Image.Image] | None = None,
                        title: str = "") -> float:
    """Picks ``num_queries`` random queries, retrieves their top-k and writes the grid PNG.

    Args:
      path: output PNG path.
      embeddings: [N, D] l2-normalized query embeddings (all-vs-all when no gallery given).
      labels: [N] int labels.
      load_image: index -> PIL image of the query set.
      title: the grid's title (the ranks and a legend are always drawn).
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
                          [[load_g(int(j)) for j in row] for row in neighbours], correct,
                          title=title)
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


def class_subset(labels: np.ndarray, *, num_classes: int, max_points: int,
                 seed: int = 0) -> np.ndarray:
    """Sorted indices [M] of at most ``max_points`` items of ``num_classes`` classes drawn
    with ``seed`` (every class kept whole when they fit)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    picked = rng.choice(classes, min(num_classes, len(classes)), replace=False)
    keep = np.flatnonzero(np.isin(labels, picked))
    if len(keep) > max_points > 0:
        keep = rng.choice(keep, max_points, replace=False)
    return np.sort(keep)


def tsne_2d(embeddings: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """[N, 2] t-SNE (scikit-learn, cosine distances: the embeddings are l2-normalized) of
    [N, D] embeddings; neighbourhoods are kept, distances between clusters are not."""
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, np.float64)
    if len(x) < 4:  # too few points for a neighbourhood: their PCA
        return pca_2d(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                random_state=seed).fit_transform(x)


def save_embedding_map(path: str, embeddings: np.ndarray, labels: np.ndarray, *,
                       max_points: int = 2000, seed: int = 0, title: str = "",
                       num_classes: int = MAP_CLASSES,
                       train_embeddings: np.ndarray | None = None,
                       train_labels: np.ndarray | None = None,
                       class_names: Sequence[str] | None = None) -> None:
    """Writes a PNG of a t-SNE of ``num_classes`` test classes (coloured dots, a legend
    entry each) and, if given, training embeddings (grey crosses), projected together.

    Args:
      embeddings: [N, D] test embeddings; labels [N] their classes (named by
        ``class_names[label]`` in the legend when given).
      max_points: at most this many test points (and as many training points).
      train_embeddings, train_labels: [M, D], [M] embeddings of training classes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state
    embeddings, labels = np.asarray(embeddings), np.asarray(labels)
    if len(embeddings) != len(labels):
        raise ValueError(f"embeddings ({len(embeddings)}) and labels ({len(labels)}) must have "
                         "the same length")
    keep = class_subset(labels, num_classes=num_classes, max_points=max_points, seed=seed)
    embeddings, labels = embeddings[keep], labels[keep]
    train = np.zeros((0, embeddings.shape[1]), embeddings.dtype)
    if train_embeddings is not None and len(train_embeddings):
        train_keep = class_subset(train_labels, num_classes=num_classes,
                                  max_points=max_points, seed=seed)
        train = np.asarray(train_embeddings)[train_keep]
    points = tsne_2d(np.concatenate([embeddings, train]), seed=seed)
    test_points, train_points = points[:len(embeddings)], points[len(embeddings):]
    figure = Figure(figsize=(7.5, 6), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    if len(train_points):
        axes.scatter(train_points[:, 0], train_points[:, 1], c="0.6", marker="x", s=12,
                     linewidths=0.8, label=f"train ({len(train_points)} points)")
    colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    for i, c in enumerate(np.unique(labels)):
        at = labels == c
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else c
        axes.scatter(test_points[at, 0], test_points[at, 1], color=colours(i % colours.N),
                     marker="o", s=14, linewidths=0, label=f"test {name}")
    axes.set_title((title + "\n" if title else "")
                   + f"t-SNE of {len(np.unique(labels))} test classes (dots)"
                   + (", train (grey crosses)" if len(train_points) else ""), fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.tight_layout()
    figure.savefig(path, format="png")
