"""The embedded default data set: layout, determinism, reuse, partial-write recovery, difficulty."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from proxy_jax.data import datasets as D
from proxy_jax.data import embedded as E

SMALL = dict(num_train_classes=12, num_test_classes=10, images_per_class=6, image_size=24)


def _tree_hash(root):
  digest = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_default_layout(tmp_path):
  root = E.ensure_embedded_dataset(str(tmp_path / 'embedded'))
  train, test = D.load_benchmark(root, 'train'), D.load_benchmark(root, 'test')
  assert len(train.classes) == len(test.classes) == 100
  assert len(train) == len(test) == 100 * 30
  assert set(train.classes).isdisjoint(test.classes)                 # zero-shot
  assert np.bincount(test.targets).tolist() == [30] * 100
  image, label = test[0]
  assert image.mode == 'RGB' and image.size == (32, 32) and label == 0
  assert all(p.endswith('.png') for p in train.paths)
  with open(os.path.join(root, E.MARKER)) as f:
    marker = json.load(f)
  assert marker['config']['format_version'] == E.FORMAT_VERSION and len(marker['sha256']) == 64


def test_deterministic_and_seeded(tmp_path):
  a = E.ensure_embedded_dataset(str(tmp_path / 'a'), seed=3, **SMALL)
  b = E.ensure_embedded_dataset(str(tmp_path / 'b'), seed=3, **SMALL)
  c = E.ensure_embedded_dataset(str(tmp_path / 'c'), seed=4, **SMALL)
  assert _tree_hash(a) == _tree_hash(b) != _tree_hash(c)


def test_reused_not_rewritten(tmp_path):
  root = E.ensure_embedded_dataset(str(tmp_path / 'e'), **SMALL)
  probe = os.path.join(root, 'train', 'class_0000', '0000.png')
  stamp = os.stat(probe).st_mtime_ns
  os.utime(probe, ns=(stamp - 10**9, stamp - 10**9))
  assert E.ensure_embedded_dataset(root, **SMALL) == root
  assert os.stat(probe).st_mtime_ns == stamp - 10**9               # untouched


@pytest.mark.parametrize('damage', ['no_marker', 'missing_class', 'old_version', 'other_args'])
def test_partial_or_outdated_is_regenerated(tmp_path, damage):
  root = E.ensure_embedded_dataset(str(tmp_path / 'e'), **SMALL)
  reference = _tree_hash(root)
  marker = os.path.join(root, E.MARKER)
  args = dict(SMALL)
  if damage == 'no_marker':            # a write interrupted before the marker
    os.remove(marker)
  elif damage == 'missing_class':
    import shutil
    shutil.rmtree(os.path.join(root, 'test', 'class_0013'))
  elif damage == 'old_version':
    with open(marker) as f:
      content = json.load(f)
    content['config']['format_version'] = E.FORMAT_VERSION - 1
    with open(marker, 'w') as f:
      json.dump(content, f)
  else:
    args['images_per_class'] = 4
  assert E.ensure_embedded_dataset(root, **args) == root
  if damage == 'other_args':
    assert len(os.listdir(os.path.join(root, 'train', 'class_0000'))) == 4
  else:
    assert _tree_hash(root) == reference
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.embedded-')]   # no temp left


def test_refuses_foreign_folder_and_bad_args(tmp_path):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'thesis.tex').write_text('keep me')
  with pytest.raises(ValueError, match='other files'):
    E.ensure_embedded_dataset(str(tmp_path / 'mine'), **SMALL)
  assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'keep me'
  with pytest.raises(ValueError, match='images_per_class'):
    E.ensure_embedded_dataset(str(tmp_path / 'x'), images_per_class=1)


def _recall_at_1(features, labels):
  features = features / np.linalg.norm(features, axis=1, keepdims=True)
  similarity = features @ features.T
  np.fill_diagonal(similarity, -np.inf)
  return float(np.mean(labels[similarity.argmax(1)] == labels))


def test_unseen_classes_are_separable_but_not_trivially(tmp_path):
  """Hand-made features beat chance on the test classes; raw pixels stay far from perfect.

  This bounds the difficulty from both sides without training: a colour histogram (the
  class colours are a real factor) retrieves above chance, and neither it nor raw pixels
  come near the ceiling, because pose, background, distractors and noise vary within a class.
  """
  root = E.ensure_embedded_dataset(str(tmp_path / 'e'), num_train_classes=2,
                                   num_test_classes=40, images_per_class=10)
  test = D.load_benchmark(root, 'test')
  pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in test.paths])
  labels = test.targets
  chance = 1 / 40
  raw = _recall_at_1(pixels.reshape(len(pixels), -1) - 0.5, labels)
  bins = np.minimum((pixels * 4).astype(int), 3)
  codes = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(len(pixels), -1)
  hist = np.stack([np.bincount(c, minlength=64) for c in codes]).astype(np.float64)
  colour = _recall_at_1(np.sqrt(hist), labels)
  # Measured at seed 0: colour 0.13, raw 0.10 (chance 0.025); a trained CNN reaches ~0.5 R@1
  # on the default set after four epochs (see the README section of the embedded data set).
  assert colour > 3 * chance and raw > 2 * chance
  assert raw < 0.5 and colour < 0.5
