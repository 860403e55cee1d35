"""Turns the official raw files of a benchmark into the class-folder layout of the seeds.

    python -m proxy_jax.data.prepare --dataset cars196 --src RAW --dst ROOT [--link auto]

writes ``ROOT/train/<class>/<file>`` and ``ROOT/test/<class>/<file>`` (In-shop:
``ROOT/train/<item>/``, ``ROOT/test/query/<item>/``, ``ROOT/test/gallery/<item>/``, the layout
proxy-synthesis' ``main.py`` reads for In-shop), with the zero-shot class splits of
../shared/METHODS.md:

| dataset | reads | class folders |
|---|---|---|
| cars196 | ``cars_annos.mat`` + ``car_ims/`` | ``001``..``098`` train, ``099``..``196`` test |
| cub200 | ``images.txt``, ``image_class_labels.txt``, ``images/`` | ``001.Black_footed_Albatross``.. (1-100 train) |
| sop | ``Ebay_train.txt``, ``Ebay_test.txt`` | ``00001``..``11318`` train, ``11319``..``22634`` test |
| inshop | ``list_eval_partition.txt`` + ``img/`` | item ids ``id_00000001``.. |

Files are hard-linked to the raw ones where the file system allows it, else symlinked, else
copied (``--link`` picks one; ``auto`` tries them in that order); the summary printed and
written to ``ROOT/prepare_summary.json`` says how many files each method produced. The raw
folder is left untouched.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
from typing import Sequence

from proxy_jax.data.datasets import RAW_READERS, RawSample, check_raw_files

LINK_METHODS = ("auto", "hardlink", "symlink", "copy")


def _place(src: str, dst: str, method: str) -> str:
    """Creates dst from src with ``method``; returns the method that worked."""
    tries = {"auto": ("hardlink", "symlink", "copy")}.get(method, (method,))
    error = None
    for m in tries:
        try:
            if m == "hardlink":
                os.link(src, dst)
            elif m == "symlink":
                os.symlink(os.path.abspath(src), dst)
            else:
                shutil.copy2(src, dst)
            return m
        except OSError as e:  # cross-device link, no link support, permissions: try the next one
            error = e
    raise OSError(f'could not {"/".join(tries)} {src!r} to {dst!r}: {error}')


def _target_dir(dst: str, sample: RawSample) -> str:
    if sample.split in ("query", "gallery"):
        return os.path.join(dst, "test", sample.split, sample.class_name)
    return os.path.join(dst, sample.split, sample.class_name)


def prepare(dataset: str, src: str, dst: str, *, link: str = "auto") -> dict:
    """Writes the class-folder layout of ``dataset`` from its raw files in ``src`` into ``dst``.

    Args:
      dataset: 'cars196', 'cub200', 'sop' or 'inshop'.
      src: folder with the official raw files.
      dst: output root; must not exist or be empty.
      link: 'auto' (hard link, else symlink, else copy), 'hardlink', 'symlink' or 'copy'.

    Returns:
      a summary dict: per split the number of classes and images, and the number of files per
      link method.
    """
    if dataset not in RAW_READERS:
        raise ValueError(f"dataset must be one of {sorted(RAW_READERS)}, got {dataset!r}")
    if link not in LINK_METHODS:
        raise ValueError(f"link must be one of {LINK_METHODS}, got {link!r}")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"raw dataset folder not found: {src!r}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"destination {dst!r} exists and is not an empty folder")
    samples = RAW_READERS[dataset](src)
    if not samples:
        raise ValueError(f"the annotations in {src!r} list no images")
    check_raw_files(samples, src)

    classes = collections.defaultdict(set)
    images = collections.Counter()
    for s in samples:
        classes[s.split].add(s.class_name)
        images[s.split] += 1
    if dataset == "inshop":
        overlap = classes["train"] & (classes["query"] | classes["gallery"])
    else:
        overlap = classes["train"] & classes["test"]
    if overlap:  # the official splits are class-disjoint; anything else is a broken file
        raise ValueError(f"train and test share classes {sorted(overlap)[:5]} in {src!r}")

    methods = collections.Counter()
    taken = set()
    for s in samples:
        folder = _target_dir(dst, s)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, os.path.basename(s.path))
        if target in taken:
            # Two images of one class with one file name (In-shop items listed under two
            # categories): keep both, the later one named after its whole relative path.
            target = os.path.join(folder, os.path.relpath(s.path, src).replace(os.sep, "__"))
        taken.add(target)
        methods[_place(s.path, target, link)] += 1

    summary = {
        "dataset": dataset,
        "src": os.path.abspath(src),
        "splits": {k: {"classes": len(classes[k]), "images": images[k]} for k in sorted(images)},
        "files_by_method": dict(methods),
    }
    with open(os.path.join(dst, "prepare_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy_jax.data.prepare",
        description="Write the class-folder layout of a DML benchmark from its official raw files.")
    parser.add_argument("--dataset", required=True, choices=sorted(RAW_READERS))
    parser.add_argument("--src", required=True, help="folder with the official raw files")
    parser.add_argument("--dst", required=True, help="output root (new or empty folder)")
    parser.add_argument("--link", default="auto", choices=LINK_METHODS,
                        help="how files are placed: auto = hard link, else symlink, else copy")
    args = parser.parse_args(argv)
    summary = prepare(args.dataset, args.src, args.dst, link=args.link)
    for split, counts in summary["splits"].items():
        print(f'{split:8s} {counts["classes"]:6d} classes {counts["images"]:8d} images')
    print(
        "files placed by " + ", ".join(f"{m}: {n}" for m, n in summary["files_by_method"].items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
