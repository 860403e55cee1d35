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
byte-identical PNG files. The set is written into a temporary folder next to ``root`` and
renamed into place after a marker file (``EMBEDDED.json``: format version, generation
arguments, pixel hash and the names of every class folder and image file) is written and
flushed. A root holding a complete marker of this module and nothing the marker does not list
is reused (same arguments, nothing missing) or regenerated (outdated or damaged); any other
non-empty folder is refused, never deleted (the rules: the comment 'ownership' below).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
MARKER = "EMBEDDED.json"
NUM_SHAPES = 8

logger = logging.getLogger(__name__)


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
        "shape": int(rng.integers(NUM_SHAPES)),
        "hue": rng.uniform(0, 1, size=2),
        "sat": rng.uniform(0.45, 1.0, size=2),
        "val": rng.uniform(0.45, 1.0, size=2),
        "freq": rng.uniform(0.6, 2.6),         # grating cycles per shape radius
        "orient": rng.uniform(0, np.pi),       # grating orientation in the shape frame
    }


def render_class(factors: dict, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` images of one class, uint8 [count, size, size, 3]."""
    n = count
    # float32 throughout: half the memory traffic of float64, and 8 bits of output need no more.
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
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

    inside = _shape_inside(factors["shape"], u, v)[..., None]           # [n, H, W, 1]
    o = factors["orient"]
    phase = rng.uniform(0, 2 * np.pi, n)
    grating = 0.5 + 0.5 * np.cos(2 * np.pi * factors["freq"] * (u * np.cos(o) + v * np.sin(o))
                                 + col(phase))
    hue_jitter = rng.normal(0, 0.04, n)
    sat_jitter = rng.uniform(0.75, 1.1, n)[:, None]
    bright = rng.uniform(0.7, 1.2, n)
    colours = _hsv_to_rgb(factors["hue"][None, :] + hue_jitter[:, None],
                          np.clip(factors["sat"][None, :] * sat_jitter, 0, 1),
                          factors["val"][None, :])                     # [n, 2, 3]
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
    return {"format_version": FORMAT_VERSION, "seed": seed, "num_train_classes": num_train_classes,
            "num_test_classes": num_test_classes, "images_per_class": images_per_class,
            "image_size": image_size}


def _write(folder: str, config: dict) -> str:
    """Writes train/ and test/ into folder; returns a sha256 over every image's pixels."""
    digest = hashlib.sha256()
    num_classes = config["num_train_classes"] + config["num_test_classes"]
    for c in range(num_classes):
        # One generator per class from (seed, class): classes do not depend on each other's draws.
        rng = np.random.default_rng([config["seed"], c])
        factors = _class_factors(rng)
        images = render_class(factors, config["images_per_class"], config["image_size"], rng)
        split = "train" if c < config["num_train_classes"] else "test"
        class_dir = os.path.join(folder, split, f"class_{c:04d}")
        os.makedirs(class_dir)
        for i, pixels in enumerate(images):
            # Level 0 (stored): encoding dominates the write time, and 32x32 files fit one disk
            # block however they are compressed.
            Image.fromarray(pixels).save(os.path.join(class_dir, f"{i:04d}.png"), compress_level=0)
        digest.update(images.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- ownership
#
# The generator removes or replaces only what it can show it wrote:
#
# * ``root`` is reused when its marker matches the requested arguments and the folder holds
#   exactly the files the marker lists (nothing missing, nothing else).
# * ``root`` is replaced (by a fresh write, renamed into place) only when it does not exist, is
#   empty, or holds a complete marker of ours (any format version or arguments) and nothing
#   that marker does not list: missing files are fine (a damaged set of ours), extra ones are
#   not.
# * Anything else is refused with a ValueError of one line, and left untouched: a folder without
#   the marker (a write of ours never leaves one: it is renamed into place after the marker is
#   written and flushed), a marker that does not parse or lacks fields (not one we wrote), or a
#   marker next to files it does not list (e.g. a marker copied into a user's data set).
# * Temporary folders (``.embedded-*`` next to root) carry an owner file (root, host, pid, the
#   files they may hold). One left by a crashed call is removed by a later call for the same root
#   when it was made on this host by a process that no longer runs and holds nothing else; any
#   other ``.embedded-*`` folder (a live writer's, another host's, one without an owner file) is
#   left alone.

_TMP_PREFIX = ".embedded-"
_OWNER = ".embedded-owner.json"  # only inside temporary folders, never in a finished root
_SPLITS = ("train", "test")
_CONFIG_KEYS = frozenset(_config(0, 0, 0, 0, 0))


def _contents_of(config: dict) -> dict:
    """The names the generator writes for config: class folders per split and image files."""
    num_train, num_test = config["num_train_classes"], config["num_test_classes"]
    return {"train": [f"class_{c:04d}" for c in range(num_train)],
            "test": [f"class_{c:04d}" for c in range(num_train, num_train + num_test)],
            "images": [f"{i:04d}.png" for i in range(config["images_per_class"])]}


def _valid_contents(contents) -> bool:
    return (isinstance(contents, dict) and set(contents) == {"train", "test", "images"}
            and all(isinstance(v, list) and all(isinstance(n, str) and n and "/" not in n
                                                and n not in (".", "..") for n in v)
                    for v in contents.values()))


def _read_marker(folder: str) -> tuple[str, dict | None, str]:
    """('absent' | 'partial' | 'ok', the marker if ok, why it is partial)."""
    path = os.path.join(folder, MARKER)
    if not os.path.lexists(path):
        return "absent", None, ""
    if os.path.islink(path) or not os.path.isfile(path):
        return "partial", None, "not a regular file"
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "partial", None, f"{type(e).__name__}"
    if not isinstance(marker, dict):
        return "partial", None, "not a JSON object"
    config = marker.get("config")
    if not isinstance(config, dict) or set(config) != _CONFIG_KEYS or not all(
        type(v) is int for v in config.values()):
        return "partial", None, f'no valid "config" (keys {sorted(_CONFIG_KEYS)})'
    digest = marker.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        return "partial", None, 'no valid "sha256"'
    if "contents" in marker and not _valid_contents(marker["contents"]):
        return "partial", None, 'no valid "contents"'
    if "contents" not in marker:  # format 1 markers before the listing: its names follow config
        marker = dict(marker, contents=_contents_of(config))
    return "ok", marker, ""


def _compare(folder: str, contents: dict, *, allowed_top=(MARKER,)) -> tuple[list[str], bool]:
    """(entries under folder that contents does not list, whether everything listed is there).

    Entries are paths relative to folder, sorted; a symbolic link is never ours.
    """
    def kind(path):
        return "link" if os.path.islink(path) else "dir" if os.path.isdir(path) else "file"

    foreign, complete = [], True
    top = set(os.listdir(folder))
    for name in sorted(top - set(_SPLITS) - set(allowed_top)):
        foreign.append(name)
    for name in set(allowed_top) & top:
        if kind(os.path.join(folder, name)) != "file":
            foreign.append(name)
    images = set(contents["images"])
    for split in _SPLITS:
        split_dir = os.path.join(folder, split)
        if split not in top:
            complete = complete and not contents[split]
            continue
        if kind(split_dir) != "dir":
            foreign.append(split)
            continue
        classes = set(contents[split])
        present = sorted(os.listdir(split_dir))
        complete = complete and classes <= set(present)
        for name in present:
            class_dir = os.path.join(split_dir, name)
            if name not in classes or kind(class_dir) != "dir":
                foreign.append(f"{split}/{name}")
                continue
            files = os.listdir(class_dir)
            complete = complete and len(files) == len(images)
            foreign += sorted(f"{split}/{name}/{f}" for f in files
                              if f not in images or kind(os.path.join(class_dir, f)) != "file")
    return foreign, complete and not foreign


def _benchmark_layout(root: str) -> tuple[str, str] | None:
    """(description, config.data.dataset value) of a layout ``datasets.load_benchmark`` reads."""
    from proxy_jax.data import datasets  # a light module; imported here to keep this one standalone

    def has_dirs(*parts):
        return all(os.path.isdir(os.path.join(root, *p.split("/"))) for p in parts)

    if has_dirs("test/query", "test/gallery") or has_dirs("query", "gallery"):
        return "an In-shop class-folder layout (query/ and gallery/)", "inshop"
    splits = [s for s in _SPLITS if has_dirs(s)]
    if splits:
        counts = ", ".join(f"{s}/: {len(os.listdir(os.path.join(root, s)))} class folders"
                           for s in splits)
        return f"a class-folder data set ({counts})", "folder"
    raw = datasets.detect_raw_dataset(root)
    if raw is not None:
        files = {"cars196": "cars_annos.mat", "cub200": "images.txt",
                 "sop": "Ebay_train.txt", "inshop": "list_eval_partition.txt"}[raw]
        return f"the official {raw} files ({files})", "inshop" if raw == "inshop" else "folder"
    if has_dirs("images") and any(e.is_dir() for e in os.scandir(os.path.join(root, "images"))):
        return "a folder of classes (images/<class>/)", "folder"
    return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f'{len(names)} entr{"y" if len(names) == 1 else "ies"} ({shown})'


def _refusal(root: str, entries: list[str], problem: str) -> ValueError:
    """The one-line error for a root the generator may not replace; root is left as it is.

    Args:
      root: the folder.
      entries: its top-level names.
      problem: why it is not ours, completing "it holds <what is there> <problem>".
    """
    layout = _benchmark_layout(root)
    what = layout[0] if layout is not None else _listing(entries)
    advice = "for the embedded data set, pass a new or empty --config.data.root"
    if layout is not None:
        advice = f"to train on it, pass --config.data.dataset={layout[1]}; {advice}"
    return ValueError(f"refusing to write the embedded data set into {root!r}: it holds {what} "
                      f"{problem}; nothing was changed. {advice[0].upper()}{advice[1:]}.")


def _inspect(root: str, config: dict) -> str:
    """'absent', 'empty', 'complete' (reuse) or 'ours' (replaceable); raises the refusal."""
    if not os.path.lexists(root):
        return "absent"
    if not os.path.isdir(root):
        raise ValueError(
            f"refusing to write the embedded data set into {root!r}: it is a file, not "
            "a folder; nothing was changed. Pass a new or empty --config.data.root."
        )
    entries = sorted(os.listdir(root))
    if not entries:
        return "empty"
    state, marker, why = _read_marker(root)
    if state == "absent":
        raise _refusal(root, entries, f"and no {MARKER}, so the generator did not write it")
    if state == "partial":
        raise _refusal(
            root,
            entries,
            f"and an unreadable or incomplete {MARKER} ({why}), which the "
            "generator never leaves",
        )
    foreign, complete = _compare(root, marker["contents"])
    if foreign:
        raise _refusal(root, entries, f"with an {MARKER} that does not list {_listing(foreign)}")
    return "complete" if complete and marker["config"] == config else "ours"


def _write_owner(folder: str, root: str, contents: dict) -> None:
    with open(os.path.join(folder, _OWNER), "w") as f:
        json.dump({"root": root, "host": socket.gethostname(), "pid": os.getpid(),
                   "contents": contents}, f)


def _process_gone(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it runs under another user
        return False
    return False


def _remove_stale_temporaries(parent: str, root: str) -> None:
    """Removes ``.embedded-*`` folders a crashed call for root left (see the rules above)."""
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(_TMP_PREFIX))
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(_TMP_PREFIX) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, _OWNER), encoding="utf-8") as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if not (isinstance(owner, dict) and owner.get("root") == root
                and owner.get("host") == socket.gethostname() and _process_gone(owner.get("pid"))
                and _valid_contents(owner.get("contents"))):
            continue
        foreign, _ = _compare(path, owner["contents"], allowed_top=(MARKER, _OWNER))
        if not foreign:
            shutil.rmtree(path, ignore_errors=True)


def _install(tmp: str, root: str, config: dict) -> None:
    """Moves the finished tmp to root, if root (looked at again now) may still be replaced."""
    state = _inspect(root, config)  # the folder may have changed while tmp was written
    if state == "complete":         # another process finished first
        return
    aside = None
    if state == "empty":
        try:
            os.rmdir(root)              # removes only an empty folder, whatever happened meanwhile
        except OSError:
            pass
    elif state == "ours":
        # Move the old set aside (one rename, so root is missing only between two renames), then
        # delete it from there; a crash in between leaves a temporary folder a later call removes.
        try:
            os.rename(root, tmp + ".old")
            aside = tmp + ".old"
        except FileNotFoundError:     # a racing process moved it first
            pass
        if aside is not None:
            state, marker, _ = _read_marker(aside)
            contents = marker["contents"] if state == "ok" else _contents_of(config)
            _write_owner(aside, root, contents)
    try:
        os.rename(tmp, root)
    except OSError:
        if _inspect(root, config) != "complete":  # anyone but a racing copy of ours: refused
            raise
    finally:
        if aside is not None:
            # Looked at once more: whatever reached the folder between the check and the rename
            # is not deleted (the folder is then left where it is, and named in the log).
            try:
                foreign, _ = _compare(aside, contents, allowed_top=(MARKER, _OWNER))
            except OSError:           # gone already
                foreign = []
            if foreign:
                logger.warning(
                    "left %r in place: it holds %s that the generator did not write",
                    aside,
                    _listing(foreign),
                )
            else:
                shutil.rmtree(aside, ignore_errors=True)


def ensure_embedded_dataset(root: str, *, seed: int = 0, num_train_classes: int = 100,
                            num_test_classes: int = 100, images_per_class: int = 30,
                            image_size: int = 32) -> str:
    """Makes sure ``root`` holds the embedded data set; writes it if absent, damaged or outdated.

    Args:
      root: output folder. It must not exist, be empty, or hold an embedded data set this
        module wrote (its marker, and no file that the marker does not list). Anything else,
        e.g. a benchmark folder, raises a one-line ValueError naming what is there and is left
        untouched.
      seed: generation seed; the same arguments give byte-identical files.
      num_train_classes, num_test_classes: class-disjoint splits (zero-shot).
      images_per_class: images of every class.
      image_size: height = width of the RGB PNG images.

    Returns:
      root, holding ``train/class_XXXX/NNNN.png``, ``test/class_XXXX/NNNN.png`` and the marker.
    """
    for name, value, low in (("num_train_classes", num_train_classes, 2),
                             ("num_test_classes", num_test_classes, 2),
                             ("images_per_class", images_per_class, 2),
                             ("image_size", image_size, 8)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    root = os.path.abspath(os.fspath(root))
    # A symbolic link is followed: the folder it names is the one looked at and replaced.
    real = os.path.realpath(root)
    config = _config(int(seed), int(num_train_classes), int(num_test_classes),
                     int(images_per_class), int(image_size))
    if _inspect(real, config) == "complete":
        return root
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, real)
    # Write next to root and rename into place, so a crash leaves no half-written root and two
    # processes racing here both end with one complete copy.
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent)
    try:
        contents = _contents_of(config)
        _write_owner(tmp, real, contents)
        digest = _write(tmp, config)
        os.remove(os.path.join(tmp, _OWNER))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"config": config, "sha256": digest, "contents": contents}, f, indent=2)
            f.flush()
            os.fsync(
                f.fileno()
            )  # the marker is the proof of a finished write: on disk before rename
        _install(tmp, real, config)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return root
