"""Listing a Parquet source: a ``.parquet`` file or a folder of them.

The image column holds encoded bytes, either plain binary or the Hugging Face ``{bytes, path}``
struct; the optional label column holds integers (class names from the Hugging Face metadata
when present) or strings (class names are the sorted distinct values). Every file's schema is
checked while listing, so a wrong column name fails before any work starts. One work item per
row group.
"""

from __future__ import annotations

import json

import pyarrow as pa
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
    class_names: list[str] | None = None
    label_column = cfg.label_column
    label_values: set = set()
    for path, info in sorted(files.items()):
        rel = _rel(loc, path)
        entries.append((rel, int(info.get("size") or 0), _stamp(info)))
        with call(loc, loc.fs.open, path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            _check_columns(rel, schema, cfg)
            if label_column and label_column in schema.names:
                class_names = class_names or _hf_class_names(schema, label_column)
                label_values.update(_read_labels(f, rel, label_column))
            units += _row_group_units(pf, rel, path)
    class_names, label_map = _label_classes(label_values, class_names, label_column)
    for u in units:
        u["label_map"] = json.dumps(label_map) if label_map else None
    return Listing("parquet", loc.describe(), entries, units, class_names if label_values else None)


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


def _read_labels(f, rel: str, label_column: str) -> list:
    """The non-null values of one file's label column, which must hold integers or strings."""
    labels = pq.read_table(f, columns=[label_column]).column(0)
    ltype = labels.type
    if not (pa.types.is_integer(ltype) or pa.types.is_string(ltype)
            or pa.types.is_large_string(ltype)):
        raise PreprocessError(f"{rel}: label column {label_column!r} has type "
                              f"{ltype}; expected integers or strings")
    return [v for v in labels.to_pylist() if v is not None]


def _row_group_units(pf: pq.ParquetFile, rel: str, path: str) -> list[dict]:
    """One work item per row group, with the row offset of its first row in the file."""
    units = []
    offset = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        units.append({"key": rel, "path": path, "row_group": g, "row_offset": offset})
        offset += n
    return units


def _label_classes(label_values: set, class_names: list[str] | None,
                   label_column: str | None) -> tuple[list[str] | None, dict | None]:
    """(class names, string label → index map or None) for the label values seen.

    String labels are numbered in sorted order. Integer labels keep the Hugging Face class
    names when there are enough of them, else are named by their number.
    """
    label_map: dict | None = None
    if label_values:
        if all(isinstance(v, str) for v in label_values):
            class_names = sorted(label_values)
            label_map = {c: i for i, c in enumerate(class_names)}
        else:
            top = max(label_values)
            if min(label_values) < 0:
                raise PreprocessError(f"label column {label_column!r} holds negative labels")
            if class_names is None or len(class_names) <= top:
                class_names = [str(i) for i in range(top + 1)]
    return class_names, label_map
