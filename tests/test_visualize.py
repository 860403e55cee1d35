"""proxy_jax.visualize: the t-SNE embedding map of a subset of classes with train points, and
the retrieval grid with its title, ranks and legend."""

import numpy as np
from PIL import Image

from proxy_jax import visualize


def _clusters(num_classes, per_class, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    x = rng.normal(size=(num_classes, dim))[labels] * 3 + rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_class_subset_keeps_whole_classes_within_the_budget():
    _, labels = _clusters(30, 5)
    keep = visualize.class_subset(labels, num_classes=10, max_points=1000, seed=1)
    assert len(np.unique(labels[keep])) == 10 and len(keep) == 50
    assert np.all(np.diff(keep) > 0)
    keep = visualize.class_subset(labels, num_classes=10, max_points=20, seed=1)
    assert len(keep) == 20 and len(np.unique(labels[keep])) <= 10


def test_tsne_keeps_neighbourhoods():
    x, labels = _clusters(4, 15)
    points = visualize.tsne_2d(x, seed=0)
    assert points.shape == (60, 2)
    nearest = np.argsort(((points[:, None] - points[None]) ** 2).sum(-1), axis=1)[:, 1]
    assert np.mean(labels[nearest] == labels) > 0.9


def test_embedding_map_with_train_points(tmp_path):
    x, labels = _clusters(20, 6)
    train, train_labels = _clusters(12, 6, seed=1)
    path = str(tmp_path / "map.png")
    visualize.save_embedding_map(path, x, labels, title="default, step 40: test Recall@1 50%",
                                 train_embeddings=train, train_labels=train_labels,
                                 class_names=[f"c{i}" for i in range(20)])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (750, 600)


def test_retrieval_grid_has_a_title_ranks_and_a_legend():
    tile = Image.new("RGB", (16, 16), (128, 128, 128))
    correct = np.array([[True, False, True], [False, False, True]])
    plain = visualize.retrieval_grid([tile] * 2, [[tile] * 3] * 2, correct)
    titled = visualize.retrieval_grid([tile] * 2, [[tile] * 3] * 2, correct, title="step 3")
    assert titled.height == plain.height + 14  # one more text line above the rows
    pixels = np.asarray(titled)
    assert (pixels == visualize._GREEN).all(-1).any() and (pixels == visualize._RED).all(-1).any()
    assert (np.asarray(titled)[:14] != 255).any()  # the title is drawn
