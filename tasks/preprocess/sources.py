"""Listing ``data.source``: which kind of source it is; the digits and image-folder listings.

An image folder follows the ImageFolder convention: the first level of sub-folders names the
class, files directly in the root are unlabelled, hidden files and folders are ignored, and files
that are not images are skipped with the reason (the manifest keeps it). Parquet sources are
listed by :mod:`tasks.preprocess.parquet_source`.
"""

from __future__ import annotations

import hashlib
import posixpath

from tasks.datasets import DataConfig
from tasks.decode import IMAGE_EXTENSIONS
from tasks.preprocess.listing import (
    OUTSIDE,
    Listing,
    _absolute,
    _find,
    _rel,
    _stamp,
    _visible,
)
from tasks.preprocess.parquet_source import _list_parquet
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, check_bucket, storage_options


def list_source(cfg: DataConfig, runtime: RuntimeConfig) -> Listing:
    """List ``data.source``: the digits, an image folder or Parquet (``data.format``, or guessed
    from the files when it is ``auto``)."""
    if cfg.source == "digits":
        return _list_digits()
    loc = Location.of(_absolute(cfg.source), storage_options(cfg.source, runtime))
    check_bucket(loc)
    kind = cfg.format
    found = None
    if kind == "auto":
        found = None if loc.path.endswith(".parquet") else _find(loc)
        kind = "parquet" if _looks_parquet(loc, found) else "images"
    if kind == "parquet":
        return _list_parquet(loc, cfg)
    return _list_images(loc, cfg, found)


def _looks_parquet(loc: Location, found: dict | None = None) -> bool:
    """True if ``loc`` is a .parquet file or a folder whose visible files are all Parquet."""
    if loc.path.endswith(".parquet"):
        return True
    if found is None:
        found = _find(loc)
    any_parquet = False
    for p in found:
        rel = _rel(loc, p)
        if not _visible(rel) or rel.startswith("_"):
            continue
        if not p.endswith(".parquet"):
            return False
        any_parquet = True
    return any_parquet


def _list_digits() -> Listing:
    from tasks.digits import CLASS_NAMES, load_digits_uint8

    images, labels, keys = load_digits_uint8()
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    units = [
        {"key": k, "label": int(y), "pixels": img.tobytes(), "shape": list(img.shape)}
        for k, y, img in zip(keys, labels, images, strict=True)
    ]
    return Listing("digits", "digits", [("sklearn.datasets.load_digits", digest)], units,
                   list(CLASS_NAMES))


def _list_images(loc: Location, cfg: DataConfig, found: dict | None = None) -> Listing:
    files = found if found is not None else _find(loc)
    entries, candidates, skipped = [], [], []
    for path, info in sorted(files.items()):
        rel = _rel(loc, path)
        if not _visible(rel):
            continue
        entries.append((rel, int(info.get("size") or 0), _stamp(info)))
        if info.get("outside"):
            skipped.append({"key": rel, "reason": OUTSIDE})
            continue
        ext = posixpath.splitext(rel)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            skipped.append({"key": rel, "reason": f"not an image file (extension {ext or 'none'!r};"
                            f" expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})"})
            continue
        size = int(info.get("size") or 0)
        if size > cfg.max_file_bytes:  # refused from the listing: never read
            skipped.append({"key": rel, "reason": f"{size} bytes, over data.max_file_bytes="
                            f"{cfg.max_file_bytes}"})
            continue
        candidates.append((rel, path, size))
    class_names = sorted({rel.split("/", 1)[0] for rel, _, _ in candidates if "/" in rel})
    index = {c: i for i, c in enumerate(class_names)}
    units = [
        {"key": rel, "path": path, "label": index[rel.split("/", 1)[0]] if "/" in rel else None,
         "size": size}
        for rel, path, size in candidates
    ]
    return Listing("images", loc.describe(), entries, units, class_names or None, skipped)
