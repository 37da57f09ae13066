"""Versioned datasets: the ``data.*`` config section, the manifest contract and its readers.

A dataset version lives at ``<root>/datasets/<name>/<version>/``::

    train/part-<run>-<task>.parquet   rows: key (string), label (int32, null = unlabelled),
    val/part-<run>-<task>.parquet           pixels (binary: uint8, C×H×W, row-major)
    test/part-<run>-<task>.parquet
    _manifest.json                    written last; readers trust only this file

Three splits by the key's hash (:func:`split_of`): ``train`` (what training reads), ``val``
(the selection split: the evaluation's reference, the default sampler, the promotion gate and
every benchmark choice) and ``test`` (locked: only a report reads it, never a decision).
Versions written before the test split existed list only train and val; they still open, and
asking them for ``test`` says how to get one (:func:`part_files`).

Readers open a dataset only through its manifest (:func:`open_dataset`); part files that the
manifest does not list (left by a run that was killed, or that lost a race) are ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.bounds import SECTION
from tasks.errors import DatasetNotFound, StorageError
from tasks.storage import Location, call, read_json

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = "diffusion-pipeline/dataset"
MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")


class DataConfig(BaseModel):
    """The ``data`` section: which source becomes which dataset, and how it is preprocessed."""

    model_config = SECTION

    name: str = Field("digits", description="Dataset name: datasets/<name>/<version>/ under root.")
    source: str = Field(
        "digits",
        description="'digits' (embedded), an image folder or a Parquet file/folder: local path, "
        "file:// or s3:// URL.",
    )
    format: Literal["auto", "images", "parquet"] = Field(
        "auto", description="Source format; 'auto' detects Parquet by extension."
    )
    resolution: int = Field(8, ge=4, le=1024, description="Target height = width in pixels.")
    channels: Literal[1, 3] = Field(1, description="1 (grayscale, mode L) or 3 (RGB).")
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Held-out share (by key hash): the evaluation's "
        "reference set, so its size sets how small a difference the promotion gate can tell "
        "from noise. The digits: 0.2 holds out 324 images, and the default model beats a "
        "200-step one in all 56 paired decisions; at 0.1 (165 images) in 11 of 16 "
        "(benchmarks/gate_rates.py). A large dataset needs only a few thousand (0.05 of CIFAR-10).")
    test_fraction: float = Field(
        0.15, ge=0.0, lt=1.0, description="Locked test share (by key hash, disjoint from val): "
        "read only to report a model (evaluate.split: test), never by a decision (the gate, "
        "the default sampler, benchmark choices). The digits: 0.15 holds out 271 images, taken "
        "from train; val is unchanged. 0: no test split.")
    strict: bool = Field(False, description="Fail on any bad input instead of skipping it.")
    image_column: str = Field("image", description="Parquet sources: the image column.")
    label_column: str | None = Field("label", description="Parquet sources: the label column.")
    key_column: str | None = Field(
        None, description="Parquet sources: a unique key column (default: '<file>#<row>')."
    )
    max_classes: int = Field(
        10_000, ge=1, le=1_000_000,
        description="Parquet sources: most classes a label column may define (integer labels "
        "are class indices below it, strings at most this many distinct values); a corrupt "
        "label such as 4294967295 is refused instead of becoming four billion classes.",
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Refuse images declaring more pixels (decompression bombs)."
    )
    max_file_bytes: int = Field(
        64 * 2**20, ge=1,
        description="Image sources: skip files larger than this (bytes, from the listing) "
        "before reading them.",
    )
    fetch_bytes: int = Field(
        256 * 2**20, ge=1,
        description="Image sources: at most this many bytes of encoded files are held at once "
        "per decoding task (files are fetched in groups of this size).",
    )
    rows_per_file: int = Field(4096, ge=1, description="Target rows per written part file.")
    version: str | None = Field(
        None, description="Readers: which committed version to use (default: the latest)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v) or ".." in v:
            raise ValueError(
                f"data.name {v!r} must be 1-128 letters, digits, '.', '_' or '-', start with a "
                "letter or digit and contain no '..'"
            )
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None and not VERSION_RE.match(v):
            raise ValueError(f"data.version {v!r} is not a dataset version (16 hex digits)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data.source is empty; use 'digits', a folder or a Parquet URL")
        return v.strip()

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction ({self.val_fraction}) + data.test_fraction "
                             f"({self.test_fraction}) must be below 1 to leave train rows")
        return self

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def preprocessing(self) -> dict[str, Any]:
        """The settings that change the output bytes (part of the version fingerprint)."""
        return {
            "resolution": self.resolution,
            "channels": self.channels,
            "mode": self.mode,
            "resize": "exif-transpose, alpha over white, center-crop to square, bicubic",
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "max_image_pixels": self.max_image_pixels,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "key_column": self.key_column,
        }


def split_of(key: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """A key's split from u = the first 8 bytes of its SHA-256 / 2⁶⁴, uniform on [0, 1): 'val'
    for u < ``val_fraction``, 'test' for u ≥ 1 − ``test_fraction``, else 'train'. Each key's
    side depends on the key alone; val does not move with test_fraction nor test with
    val_fraction, and a larger fraction holds out a superset."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= test_fraction < 1 - val_fraction:
        raise ValueError(f"test_fraction must be in [0, 1 - val_fraction) = [0, "
                         f"{1 - val_fraction:g}), got {test_fraction}")
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    return "test" if u >= 1 - test_fraction else "train"


@dataclass(frozen=True)
class DatasetRef:
    """A small, serialisable handle on one committed dataset version."""

    name: str
    version: str
    uri: str  # the version directory, credentials redacted

    @property
    def manifest_uri(self) -> str:
        return f"{self.uri}/{MANIFEST}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "uri": self.uri,
                "manifest_uri": self.manifest_uri}


def dataset_dir(root: Location, name: str, version: str | None = None) -> Location:
    loc = root.child("datasets", name)
    return loc.child(version) if version else loc


def load_manifest(version_dir: Location) -> dict:
    """Read and sanity-check one manifest."""
    m = read_json(version_dir.child(MANIFEST))
    if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"{version_dir.describe()}/{MANIFEST} is not a version-{MANIFEST_FORMAT_VERSION} "
            f"dataset manifest (format={m.get('format')!r}, version={m.get('format_version')!r})"
        )
    return m


def list_versions(root: Location, name: str) -> list[dict]:
    """Manifests of every committed version of ``name``, oldest first."""
    base = dataset_dir(root, name)
    try:
        paths = call(base, base.fs.glob, f"{base.path}/*/{MANIFEST}")
    except FileNotFoundError:
        return []
    out = []
    for p in paths:
        version = p.rstrip("/").split("/")[-2]
        if VERSION_RE.match(version):
            out.append(load_manifest(base.child(version)))
    return sorted(out, key=lambda m: (m["created_at"], m["version"]))


def open_dataset(root: Location, name: str, version: str | None = None) -> tuple[DatasetRef, dict]:
    """The ref and manifest of ``name`` at ``version`` (default: the latest committed one)."""
    if version is None:
        versions = list_versions(root, name)
        if not versions:
            raise DatasetNotFound(_missing_message(root, name))
        m = versions[-1]
    else:
        vdir = dataset_dir(root, name, version)
        try:
            m = load_manifest(vdir)
        except FileNotFoundError:
            existing = [v["version"] for v in list_versions(root, name)]
            raise DatasetNotFound(
                f"dataset {name!r} has no committed version {version!r} under "
                f"{root.describe()}; committed versions: {', '.join(existing) or 'none'}"
            ) from None
    vdir = dataset_dir(root, name, m["version"])
    return DatasetRef(name=name, version=m["version"], uri=vdir.describe()), m


def _missing_message(root: Location, name: str) -> str:
    base = root.child("datasets")
    try:
        names = sorted(p.rstrip("/").split("/")[-1] for p in base.fs.ls(base.path, detail=False))
    except (FileNotFoundError, StorageError):
        names = []
    return (
        f"no committed version of dataset {name!r} under {root.describe()}; datasets there: "
        f"{', '.join(names) or 'none'}. Run `diffusion-pipeline preprocess` first."
    )


def part_files(root: Location, manifest: dict, split: str) -> list[str]:
    """Full paths (on ``root.fs``) of the part files of one split, as the manifest lists them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split not in manifest["splits"]:
        raise DatasetNotFound(
            f"dataset {manifest['name']}@{manifest['version']} has no {split} split (written "
            f"before it existed); preprocess the source again with data.{split}_fraction > 0 "
            "for a version that has one")
    vdir = dataset_dir(root, manifest["name"], manifest["version"])
    return [vdir.child(f["path"]).path for f in manifest["splits"][split]["files"]]


def manifest_json(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
