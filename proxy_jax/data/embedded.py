"""The embedded default data set: procedural images, many classes, a zero-shot split, no download.

``ensure_embedded_dataset(root)`` writes (once) ``root/train/<class>/*.png`` and
``root/test/<class>/*.png`` in the class-folder layout of the real benchmarks, so the default
training run goes through the same file reading, sampling and augmentation path.

Each class is a random draw of five factors, fixed by (seed, class index):
  * a shape out of eight (disk, square, diamond, triangle, cross, ring, five-point star, bar),
  * two colours (hue, saturation, value) whose mix paints the shape,
  * a sinusoidal grating inside the shape: spatial frequency and orientation relative to the
    shape, so the pattern turns with the shape.
Each image draws its own nuisances: rotation (any angle), scale, translation, grating phase,
a hue/saturation/brightness jitter, a background of a random colour with a linear gradient and
low-frequency blobs, a smaller distractor shape of random kind and colour behind the object,
and pixel noise. Train and test classes are disjoint draws from the same
factor distribution, so retrieval on the test classes is learnable (the factors transfer) but
not trivial: neighbouring classes differ by small hue or frequency steps that the nuisances
blur.

Everything comes from ``numpy.random.default_rng`` keyed by the seed: the same arguments write
byte-identical PNG files. A marker file written last (``EMBEDDED.json``, holding the format
version and the generation arguments) tells a finished folder from a partial or outdated one,
which is regenerated.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
MARKER = 'EMBEDDED.json'
NUM_SHAPES = 8


def _hsv_to_rgb(h, s, v):
  """Vectorized HSV -> RGB, all in [0, 1]; broadcasting arrays."""
  h = np.mod(h, 1.0) * 6.0
  i = np.floor(h)
  f = h - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(np.int64) % 6
  r = np.choose(i, [v, q, p, p, t, v])
  g = np.choose(i, [t, v, v, q, p, p])
  b = np.choose(i, [p, p, t, v, v, q])
  return np.stack([r, g, b], axis=-1)


def _shape_inside(shape: int, u, v):
  """Soft inside-ness in [0, 1] of the shape at shape-frame coordinates (u, v) (radius ~1)."""
  r = np.sqrt(u * u + v * v)
  if shape == 0:    # disk
    d = r - 0.9
  elif shape == 1:  # square
    d = np.maximum(np.abs(u), np.abs(v)) - 0.75
  elif shape == 2:  # diamond
    d = (np.abs(u) + np.abs(v)) / 1.25 - 0.85
  elif shape == 3:  # triangle (max of three half-planes)
    angles = np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
    d = np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - 0.45
  elif shape == 4:  # cross
    d = np.minimum(np.maximum(np.abs(u) - 0.9, np.abs(v) - 0.32),
                   np.maximum(np.abs(u) - 0.32, np.abs(v) - 0.9))
  elif shape == 5:  # ring
    d = np.abs(r - 0.65) - 0.28
  elif shape == 6:  # five-point star
    theta = np.arctan2(v, u)
    d = r - (0.62 + 0.3 * np.cos(5 * theta))
  else:             # bar (elongated rectangle)
    d = np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.4)
  return np.clip(0.5 - d * 12.0, 0.0, 1.0)  # ~1/12 of the radius of anti-aliased edge


def _class_factors(rng: np.random.Generator) -> dict:
  return {
      'shape': int(rng.integers(NUM_SHAPES)),
      'hue': rng.uniform(0, 1, size=2),
      'sat': rng.uniform(0.45, 1.0, size=2),
      'val': rng.uniform(0.45, 1.0, size=2),
      'freq': rng.uniform(0.6, 2.6),         # grating cycles per shape radius
      'orient': rng.uniform(0, np.pi),       # grating orientation in the shape frame
  }


def render_class(factors: dict, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """``count`` images of one class, uint8 [count, size, size, 3]."""
  n = count
  # float32 throughout: half the memory traffic of float64, and 8 bits of output need no more.
  axis = np.linspace(-1, 1, size, dtype=np.float32)
  y, x = np.meshgrid(axis, axis, indexing='ij')
  x, y = x[None], y[None]                                # [1, H, W]
  col = lambda a: np.asarray(a, np.float32)[:, None, None]   # per-image scalar -> [n, 1, 1]

  angle = rng.uniform(0, 2 * np.pi, n)
  scale = rng.uniform(0.45, 0.75, n)
  cx, cy = rng.uniform(-0.22, 0.22, n), rng.uniform(-0.22, 0.22, n)
  # Image -> shape frame: translate, rotate by -angle, divide by scale.
  dx, dy = x - col(cx), y - col(cy)
  ca, sa = col(np.cos(angle)), col(np.sin(angle))
  u = (ca * dx + sa * dy) / col(scale)
  v = (-sa * dx + ca * dy) / col(scale)

  inside = _shape_inside(factors['shape'], u, v)[..., None]           # [n, H, W, 1]
  o = factors['orient']
  phase = rng.uniform(0, 2 * np.pi, n)
  grating = 0.5 + 0.5 * np.cos(2 * np.pi * factors['freq'] * (u * np.cos(o) + v * np.sin(o))
                               + col(phase))
  hue_jitter = rng.normal(0, 0.04, n)
  sat_jitter = rng.uniform(0.75, 1.1, n)[:, None]
  bright = rng.uniform(0.7, 1.2, n)
  colours = _hsv_to_rgb(factors['hue'][None, :] + hue_jitter[:, None],
                        np.clip(factors['sat'][None, :] * sat_jitter, 0, 1),
                        factors['val'][None, :])                     # [n, 2, 3]
  c0, c1 = colours[:, 0][:, None, None], colours[:, 1][:, None, None]
  g = grating[..., None]
  fg = (c0 * g + c1 * (1 - g)) * bright[:, None, None, None]

  bg_hsv = rng.uniform([0, 0, 0.15], [1, 0.5, 0.85], size=(n, 3))
  bg = _hsv_to_rgb(bg_hsv[:, 0], bg_hsv[:, 1], bg_hsv[:, 2])[:, None, None, :]
  grad_dir = rng.uniform(0, 2 * np.pi, n)
  grad = (col(np.cos(grad_dir)) * x + col(np.sin(grad_dir)) * y) * col(rng.uniform(0, 0.25, n))
  blobs = np.zeros((n, size, size), np.float32)
  for _ in range(3):  # low-frequency clutter so the background is not a flat colour
    bx, by = rng.uniform(-1, 1, (2, n))
    amp, width = rng.uniform(-0.25, 0.25, n), rng.uniform(0.2, 0.5, n)
    blobs += col(amp) * np.exp(-((x - col(bx)) ** 2 + (y - col(by)) ** 2) / col(width) ** 2)
  background = bg + (grad + blobs)[..., None]

  # A distractor behind the object: a smaller random shape in random colours, so that the
  # embedding has to pick the main object rather than summarize every coloured pixel.
  d_shape = rng.integers(NUM_SHAPES, size=n)
  d_scale = rng.uniform(0.2, 0.32, n)
  d_angle = rng.uniform(0, 2 * np.pi, n)
  d_x, d_y = rng.uniform(-0.75, 0.75, (2, n))
  ddx, ddy = x - col(d_x), y - col(d_y)
  dca, dsa = col(np.cos(d_angle)), col(np.sin(d_angle))
  du = (dca * ddx + dsa * ddy) / col(d_scale)
  dv = (-dsa * ddx + dca * ddy) / col(d_scale)
  d_inside = np.zeros((n, size, size), np.float32)
  for k in range(NUM_SHAPES):
    chosen = d_shape == k
    if chosen.any():
      d_inside[chosen] = _shape_inside(k, du[chosen], dv[chosen])
  d_colour = _hsv_to_rgb(*rng.uniform([0, 0.4, 0.4], [1, 1, 1], size=(n, 3)).T)[:, None, None]
  d_inside = d_inside[..., None]
  background = d_inside * d_colour + (1 - d_inside) * background

  image = inside * fg + (1 - inside) * background
  image += 0.06 * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _config(seed, num_train_classes, num_test_classes, images_per_class, image_size) -> dict:
  return {'format_version': FORMAT_VERSION, 'seed': seed, 'num_train_classes': num_train_classes,
          'num_test_classes': num_test_classes, 'images_per_class': images_per_class,
          'image_size': image_size}


def _write(folder: str, config: dict) -> str:
  """Writes train/ and test/ into folder; returns a sha256 over every image's pixels."""
  digest = hashlib.sha256()
  num_classes = config['num_train_classes'] + config['num_test_classes']
  for c in range(num_classes):
    # One generator per class from (seed, class): classes do not depend on each other's draws.
    rng = np.random.default_rng([config['seed'], c])
    factors = _class_factors(rng)
    images = render_class(factors, config['images_per_class'], config['image_size'], rng)
    split = 'train' if c < config['num_train_classes'] else 'test'
    class_dir = os.path.join(folder, split, f'class_{c:04d}')
    os.makedirs(class_dir)
    for i, pixels in enumerate(images):
      # Level 0 (stored): encoding dominates the write time, and 32x32 files fit one disk
      # block however they are compressed.
      Image.fromarray(pixels).save(os.path.join(class_dir, f'{i:04d}.png'), compress_level=0)
    digest.update(images.tobytes())
  return digest.hexdigest()


def _is_complete(root: str, config: dict) -> bool:
  try:
    with open(os.path.join(root, MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return False
  if marker.get('config') != config:
    return False
  counts = {'train': config['num_train_classes'], 'test': config['num_test_classes']}
  for split, num in counts.items():
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir) or len(os.listdir(split_dir)) != num:
      return False
  return True


def ensure_embedded_dataset(root: str, *, seed: int = 0, num_train_classes: int = 100,
                            num_test_classes: int = 100, images_per_class: int = 30,
                            image_size: int = 32) -> str:
  """Makes sure ``root`` holds the embedded data set; writes it if absent, partial or outdated.

  Args:
    root: output folder; it must not exist, be empty, or hold an earlier embedded data set
      (anything else raises ValueError rather than being deleted).
    seed: generation seed; the same arguments give byte-identical files.
    num_train_classes, num_test_classes: class-disjoint splits (zero-shot).
    images_per_class: images of every class.
    image_size: height = width of the RGB PNG images.

  Returns:
    root, holding ``train/class_XXXX/NNNN.png``, ``test/class_XXXX/NNNN.png`` and the marker.
  """
  for name, value, low in (('num_train_classes', num_train_classes, 2),
                           ('num_test_classes', num_test_classes, 2),
                           ('images_per_class', images_per_class, 2),
                           ('image_size', image_size, 8)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'{name} must be an int >= {low}, got {value!r}')
  root = os.path.abspath(os.fspath(root))
  config = _config(int(seed), int(num_train_classes), int(num_test_classes),
                   int(images_per_class), int(image_size))
  if _is_complete(root, config):
    return root
  if os.path.exists(root):
    entries = set(os.listdir(root))
    if entries - {'train', 'test', MARKER}:
      raise ValueError(f'{root!r} exists and holds other files {sorted(entries)[:5]}; expected a '
                       'new or empty folder or an embedded data set')
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  # Write next to root and move into place, so a crash leaves no half-written root and two
  # processes racing here both end with one complete copy.
  tmp = tempfile.mkdtemp(prefix='.embedded-', dir=parent)
  try:
    digest = _write(tmp, config)
    with open(os.path.join(tmp, MARKER), 'w') as f:
      json.dump({'config': config, 'sha256': digest}, f, indent=2)
    if os.path.exists(root):
      if _is_complete(root, config):  # another process finished first
        return root
      shutil.rmtree(root)
    try:
      os.rename(tmp, root)
    except OSError:
      if not _is_complete(root, config):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return root
