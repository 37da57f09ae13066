"""A source's listing and the dataset version it fingerprints to.

The listing holds what identifies the inputs (key, size, ETag or mtime), not their contents:
the version is a hash of it together with the preprocessing settings, so re-running the stage on
unchanged input finds the version already committed. The helpers below find the files under a
source location and read those fields, the same whichever file system listed them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field

from tasks.datasets import DataConfig
from tasks.errors import PreprocessError
from tasks.storage import Location, call

FINGERPRINT_VERSION = 1
# Raised when decoding files changes what a version holds (2: 16-bit greyscale is converted, any
# per-file failure skips the file, links out of the source are not followed, the byte cap).
DECODER_REVISION = 2


@dataclass
class Listing:
    """What the driver found at ``data.source``: the fingerprinted entries and the work items."""

    kind: str  # digits | images | parquet
    uri: str  # redacted source URL
    entries: list[tuple]  # (key, size, etag-or-mtime): the fingerprinted listing
    units: list[dict]  # work items for Ray Data
    class_names: list[str] | None
    skipped: list[dict] = field(default_factory=list)  # inputs refused while listing

    @functools.cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.entries, default=str).encode()).hexdigest()


def version_of(listing: Listing, cfg: DataConfig) -> str:
    """The dataset version: 16 hex digits of the listing's fingerprint and the settings."""
    payload = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "source": {"kind": listing.kind, "uri": listing.uri, "listing": listing.fingerprint},
        "preprocessing": cfg.preprocessing(),
    }
    if listing.kind != "digits":  # what decides which files become rows, and how
        payload["decoder"] = {"revision": DECODER_REVISION, "max_file_bytes": cfg.max_file_bytes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _absolute(url: str) -> str:
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def _find(loc: Location) -> dict[str, dict]:
    """{path: info} of every file under ``loc`` (or ``loc`` itself if it is a file)."""
    if loc.is_local and os.path.isdir(loc.path):
        return _find_local(loc.path)
    try:
        found = call(loc, loc.fs.find, loc.path, detail=True, withdirs=False)
    except FileNotFoundError:
        found = {}
    if not found:
        try:
            info = call(loc, loc.fs.info, loc.path)
        except FileNotFoundError:
            raise PreprocessError(f"data.source {loc.describe()} does not exist") from None
        if info.get("type") == "file":
            found = {loc.path: info}
    return found


def _find_local(root: str) -> dict[str, dict]:
    """``fs.find(detail=True)`` for a local folder by os.scandir (4× faster on 20k files).

    Same keys, sizes and mtimes as fsspec's, so versions do not depend on which path listed.
    Symbolic links are followed only where they stay inside the source folder (a link loop is
    not walked twice); a link that leads outside it is listed with ``"outside": True`` and
    nothing behind it is read (the listing's consumers skip it with the reason).
    """
    out: dict[str, dict] = {}
    real_root = os.path.realpath(root)
    todo, seen = [root], set()
    while todo:
        d = todo.pop()
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            for e in it:
                if e.is_symlink() and not _inside(os.path.realpath(e.path), real_root):
                    out[e.path] = {"name": e.path, "size": 0, "type": "file", "outside": True,
                                   "mtime": e.stat(follow_symlinks=False).st_mtime}
                elif e.is_dir():
                    todo.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    out[e.path] = {"name": e.path, "size": st.st_size, "type": "file",
                                   "mtime": st.st_mtime}
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


OUTSIDE = "a symbolic link to outside data.source (not followed)"


def _visible(rel: str) -> bool:
    return not any(seg.startswith(".") for seg in rel.split("/"))


def _stamp(info: dict) -> str:
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "md5Hash", "generation"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


def _rel(base: Location, path: str) -> str:
    if path == base.path:
        return posixpath.basename(path)
    return path[len(base.path):].lstrip("/")
