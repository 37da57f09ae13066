"""Listing a Parquet source: a ``.parquet`` file or a folder of them.

The image column holds encoded bytes, either plain binary or the Hugging Face ``{bytes, path}``
struct; the optional label column holds integers (class names from the Hugging Face metadata
when present) or strings (class names are the sorted distinct values), the same type in every
file, defining at most ``data.max_classes`` classes. Every file's schema and labels are checked
while listing, so a wrong column name or a corrupt label fails before any work starts. One work
item per row group.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.datasets import DataConfig
from tasks.errors import PreprocessError
from tasks.preprocess.listing import OUTSIDE, Listing, _find, _rel, _stamp, _visible
from tasks.storage import Location, call


def _hf_class_names(schema: pa.Schema, column: str | None) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta or not column:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(n) for n in feature["names"]]
    return None


def _list_parquet(loc: Location, cfg: DataConfig) -> Listing:
    """The Parquet files under ``loc`` (hidden and ``_``-prefixed ones left out), checked."""
    files = {
        p: i for p, i in _find(loc).items()
        if _visible(_rel(loc, p)) and p.endswith(".parquet") and not _rel(loc, p).startswith("_")
    }
    outside = sorted(_rel(loc, p) for p, i in files.items() if i.get("outside"))
    if outside:  # a Parquet source is one table: a part of it elsewhere is an error, not a skip
        raise PreprocessError(f"data.source {loc.describe()}: {outside[0]} is {OUTSIDE}; copy "
                              "the file into the source folder or point data.source at it")
    entries, units = [], []
    hf_names: tuple[str, list[str]] | None = None  # (file, the class names its metadata gives)
    label_column = cfg.label_column
    labels = _Labels(label_column or "", cfg.max_classes)
    for path, info in sorted(files.items()):
        rel = _rel(loc, path)
        entries.append((rel, int(info.get("size") or 0), _stamp(info)))
        with call(loc, loc.fs.open, path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            _check_columns(rel, schema, cfg)
            if label_column and label_column in schema.names:
                names = hf_names or _hf_class_names(schema, label_column)
                hf_names = hf_names or ((rel, names) if names else None)
                labels.add(rel, pq.read_table(f, columns=[label_column]).column(0))
            units += _row_group_units(pf, rel, path)
    class_names, label_map = labels.classes(hf_names)
    for u in units:
        u["label_map"] = json.dumps(label_map) if label_map else None
    return Listing("parquet", loc.describe(), entries, units, class_names)


def _check_columns(rel: str, schema: pa.Schema, cfg: DataConfig) -> None:
    """PreprocessError unless the image (and key) columns exist and the images are bytes."""
    names = set(schema.names)
    if cfg.image_column not in names:
        raise PreprocessError(
            f"{rel}: no image column {cfg.image_column!r} (columns: "
            f"{', '.join(schema.names)}); set data.image_column"
        )
    itype = schema.field(cfg.image_column).type
    if not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)
            or (pa.types.is_struct(itype) and itype.get_field_index("bytes") >= 0)):
        raise PreprocessError(
            f"{rel}: column {cfg.image_column!r} has type {itype}; expected encoded image "
            "bytes (binary) or a struct with a 'bytes' field (Hugging Face Image)"
        )
    if cfg.key_column and cfg.key_column not in names:
        raise PreprocessError(f"{rel}: no key column {cfg.key_column!r}; set "
                              "data.key_column to an existing column or to null")


def _row_group_units(pf: pq.ParquetFile, rel: str, path: str) -> list[dict]:
    """One work item per row group, with the row offset of its first row in the file."""
    units = []
    offset = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        units.append({"key": rel, "path": path, "row_group": g, "row_offset": offset})
        offset += n
    return units


class _Labels:
    """The label values of a Parquet source, checked file by file as they are read: integers
    or strings, one type in every file, defining at most ``data.max_classes`` classes (integer
    labels are class indices, so one corrupt value must not become billions of classes)."""

    def __init__(self, column: str, max_classes: int):
        self.column, self.max_classes = column, max_classes
        self.values: set = set()
        self.first: dict[str, str] = {}  # "integers" / "strings" → the first file holding them

    def add(self, rel: str, values: pa.ChunkedArray) -> None:
        """One file's label column (nulls are unlabelled rows)."""
        col, top = self.column, self.max_classes
        if pa.types.is_integer(values.type):
            kind = "integers"
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            kind = "strings"
        else:
            raise PreprocessError(f"{rel}: label column {col!r} has type {values.type}; "
                                  "expected integers or strings")
        self.first.setdefault(kind, rel)
        if len(self.first) > 1:
            raise PreprocessError(
                f"label column {col!r} holds integers in {self.first['integers']} and strings "
                f"in {self.first['strings']}; every file must hold the same type (class "
                "indices or class names)")
        if kind == "integers":
            lo, hi = (v.as_py() for v in pc.min_max(values).values())
            if lo is not None and lo < 0:
                raise PreprocessError(f"{rel}: label {lo} in column {col!r} is negative; "
                                      f"labels are class indices 0..{top - 1}")
            if hi is not None and hi >= top:
                raise PreprocessError(
                    f"{rel}: label {hi} in column {col!r} is not below data.max_classes={top} "
                    f"(labels are class indices, so it would make {hi + 1} classes); fix the "
                    "file, or raise data.max_classes if the dataset has that many classes")
        self.values.update(v for v in pc.unique(values).to_pylist() if v is not None)
        if kind == "strings" and len(self.values) > top:
            raise PreprocessError(
                f"{rel}: label column {col!r} brings the distinct labels to {len(self.values)}, "
                f"more than data.max_classes={top}; set data.label_column to the column that "
                "holds the classes, or raise data.max_classes if the dataset has that many")

    def classes(self, hf_names: tuple[str, list[str]] | None
                ) -> tuple[list[str] | None, dict | None]:
        """(class names, string label → index map or None); (None, None) without labels.

        String labels are numbered in sorted order. Integer labels keep the Hugging Face class
        names when there are enough of them, else are named by their number.
        """
        if not self.values:
            return None, None
        if "strings" in self.first:
            names = sorted(self.values)
            return names, {c: i for i, c in enumerate(names)}
        top = max(self.values)
        if hf_names is not None and len(hf_names[1]) > top:
            rel, names = hf_names
            if len(names) > self.max_classes:
                raise PreprocessError(
                    f"{rel}: its Hugging Face metadata names {len(names)} classes for column "
                    f"{self.column!r}, more than data.max_classes={self.max_classes}; raise "
                    "data.max_classes if the dataset has that many")
            return names, None
        return [str(i) for i in range(top + 1)], None
