"""The preprocessing stage: raw images → a versioned, training-ready Parquet dataset.

Sources (``data.source``):

- ``digits``: scikit-learn's embedded 8×8 digits, labels kept.
- an image folder (local, ``file://`` or ``s3://``): PNG / JPEG / WebP / BMP files; the first
  level of sub-folders names the class (the ImageFolder convention), files directly in the root
  are unlabelled. Hidden files and folders (``.name``) are ignored.
- Parquet (a ``.parquet`` file or a folder of them) with an image column holding encoded bytes,
  either plain binary or the Hugging Face ``{bytes, path}`` struct, and an optional label
  column (integers, with class names from the Hugging Face metadata when present, or strings).

How it runs: the driver lists the source (names, sizes, mtimes or ETags), fingerprints the
listing together with the preprocessing settings (→ the version), and returns at once if that
version is already committed. Otherwise Ray Data maps the listing through Pillow (decode,
mode conversion, EXIF orientation, center-crop, resize) and a :class:`ray.data.Datasink` writes
train/val part files and per-part statistics; the driver then commits ``_manifest.json``, last
and exclusively (see :func:`tasks.storage.commit_bytes`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.datasets import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    DataConfig,
    DatasetRef,
    dataset_dir,
    load_manifest,
    manifest_json,
)
from tasks.decode import IMAGE_EXTENSIONS, VersionPartsDatasink, decode_batch, merge_split
from tasks.errors import PreprocessError, StorageError
from tasks.faults import maybe_die
from tasks.runtime import RuntimeConfig, ensure_ray
from tasks.storage import (
    Location,
    call,
    check_bucket,
    commit_bytes,
    exists,
    redact,
    storage_options,
)

FINGERPRINT_VERSION = 1

Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Listing the source
# --------------------------------------------------------------------------------------------


@dataclass
class Listing:
    kind: str  # digits | images | parquet
    uri: str  # redacted source URL
    entries: list[tuple]  # (key, size, etag-or-mtime): the fingerprinted listing
    units: list[dict]  # work items for Ray Data
    class_names: list[str] | None
    skipped: list[dict] = field(default_factory=list)  # inputs refused while listing

    @functools.cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.entries, default=str).encode()).hexdigest()


def list_source(cfg: DataConfig, runtime: RuntimeConfig) -> Listing:
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
    return _list_images(loc, found)


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
    Symlinked folders are followed once (a link loop is not walked twice).
    """
    out: dict[str, dict] = {}
    todo, seen = [root], set()
    while todo:
        d = todo.pop()
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir():
                    todo.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    out[e.path] = {"name": e.path, "size": st.st_size, "type": "file",
                                   "mtime": st.st_mtime}
    return out


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


def _list_images(loc: Location, found: dict | None = None) -> Listing:
    files = found if found is not None else _find(loc)
    entries, candidates, skipped = [], [], []
    for path, info in sorted(files.items()):
        rel = _rel(loc, path)
        if not _visible(rel):
            continue
        entries.append((rel, int(info.get("size") or 0), _stamp(info)))
        ext = posixpath.splitext(rel)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            skipped.append({"key": rel, "reason": f"not an image file (extension {ext or 'none'!r};"
                            f" expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})"})
            continue
        candidates.append((rel, path, int(info.get("size") or 0)))
    class_names = sorted({rel.split("/", 1)[0] for rel, _, _ in candidates if "/" in rel})
    index = {c: i for i, c in enumerate(class_names)}
    units = [
        {"key": rel, "path": path, "label": index[rel.split("/", 1)[0]] if "/" in rel else None}
        for rel, path, _ in candidates
    ]
    return Listing("images", loc.describe(), entries, units, class_names or None, skipped)


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
    files = {
        p: i for p, i in _find(loc).items()
        if _visible(_rel(loc, p)) and p.endswith(".parquet") and not _rel(loc, p).startswith("_")
    }
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
            if label_column and label_column in names:
                class_names = class_names or _hf_class_names(schema, label_column)
                labels = pq.read_table(f, columns=[label_column]).column(0)
                ltype = labels.type
                if not (pa.types.is_integer(ltype) or pa.types.is_string(ltype)
                        or pa.types.is_large_string(ltype)):
                    raise PreprocessError(f"{rel}: label column {label_column!r} has type "
                                          f"{ltype}; expected integers or strings")
                label_values.update(v for v in labels.to_pylist() if v is not None)
            offset = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                units.append({"key": rel, "path": path, "row_group": g, "row_offset": offset})
                offset += n
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
    for u in units:
        u["label_map"] = json.dumps(label_map) if label_map else None
    return Listing("parquet", loc.describe(), entries, units, class_names if label_values else None)


def version_of(listing: Listing, cfg: DataConfig) -> str:
    payload = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "source": {"kind": listing.kind, "uri": listing.uri, "listing": listing.fingerprint},
        "preprocessing": cfg.preprocessing(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PreprocessResult:
    ref: DatasetRef
    manifest: dict
    reused: bool  # True: the version was already committed, no work done
    seconds: float
    ray_init_seconds: float = 0.0

    def summary(self) -> dict:
        m = self.manifest
        return {
            **self.ref.to_dict(),
            "reused": self.reused,
            "train": m["splits"]["train"]["rows"],
            "val": m["splits"]["val"]["rows"],
            "skipped": len(m["skipped"]),
            "shape": m["shape"],
            "class_names": m["class_names"],
        }


def _strict_error(skipped: list[dict], source: str) -> PreprocessError:
    shown = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:20])
    more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
    return PreprocessError(
        f"data.strict is set and {len(skipped)} input(s) of {source} are bad: {shown}{more}. "
        "Fix or remove them, or unset data.strict to skip them."
    )


def _num_blocks(n_units: int, cfg: DataConfig, kind: str) -> int:
    if kind == "parquet":
        return n_units  # one row group per task
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    by_size = math.ceil(n_units / cfg.rows_per_file)
    # ≥ 4 blocks per CPU once there is enough work (≥ 64 inputs each), in whole waves
    blocks = max(by_size, min(4 * cpus, n_units // 64))
    if blocks > cpus:
        blocks = math.ceil(blocks / cpus) * cpus
    return max(1, min(n_units, blocks))


def _discard_run(vdir: Location, run_id: str) -> None:
    """Best-effort removal of the part files one run wrote (they were never visible)."""
    try:
        paths = call(vdir, vdir.fs.glob, f"{vdir.path}/*/part-{run_id}-*.parquet")
        if paths:
            call(vdir, vdir.fs.rm, paths)
    except (OSError, StorageError):
        pass


def preprocess(cfg: DataConfig, runtime: RuntimeConfig, *, echo: Echo = print) -> PreprocessResult:
    """Run the stage. Returns at once, doing no work, if the version is already committed."""
    t0 = time.perf_counter()
    root = runtime.root_location()
    check_bucket(root)
    echo(f"listing {redact(cfg.source)}")
    listing = list_source(cfg, runtime)
    version = version_of(listing, cfg)
    vdir = dataset_dir(root, cfg.name, version)
    manifest_loc = vdir.child(MANIFEST)
    echo(f"{len(listing.units)} input(s) ({listing.kind}); dataset {cfg.name} version {version}")

    if exists(manifest_loc):
        m = load_manifest(vdir)
        if cfg.strict and m["skipped"]:
            raise _strict_error(m["skipped"], listing.uri)
        echo(f"version {version} is already committed; nothing to do")
        return PreprocessResult(DatasetRef(cfg.name, version, vdir.describe()), m, True,
                                time.perf_counter() - t0)
    if not listing.units:
        reasons = f"; {len(listing.skipped)} file(s) skipped, e.g. {listing.skipped[0]}" if (
            listing.skipped) else ""
        raise PreprocessError(f"data.source {listing.uri} holds no usable input{reasons}")
    if cfg.strict and listing.skipped:
        raise _strict_error(listing.skipped, listing.uri)

    ray_s = ensure_ray(runtime, echo=echo)
    import ray

    run_id = uuid.uuid4().hex[:8]
    options = storage_options(root.url, runtime)
    source_options = storage_options(cfg.source, runtime)
    sink = VersionPartsDatasink(vdir.url, options, run_id, cfg.channels)
    blocks = _num_blocks(len(listing.units), cfg, listing.kind)
    echo(f"decoding on Ray Data in {blocks} task(s) → {vdir.describe()}")
    t_work = time.perf_counter()
    # The plan is one fused operator (decode → write), so Ray Data's per-operator resource
    # reservation has nothing to share out; left on, it admits a single task until its first
    # cluster-resource refresh (~1 s, measured in benchmarks/results/preprocess.md). The
    # dataset copies the context when it is created, so the switch is scoped to this dataset.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(listing.units, override_num_blocks=blocks)
    finally:
        ctx.op_resource_reservation_enabled = saved
    try:
        (
            ds
            .map_batches(
                decode_batch,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={
                    "resolution": cfg.resolution, "channels": cfg.channels,
                    "max_pixels": cfg.max_image_pixels, "val_fraction": cfg.val_fraction,
                    "image_column": cfg.image_column, "label_column": cfg.label_column,
                    "key_column": cfg.key_column, "options": source_options,
                    "source": _absolute(cfg.source),
                },
            )
            .write_datasink(sink)
        )
    except BaseException:
        _discard_run(vdir, run_id)
        raise
    work_s = time.perf_counter() - t_work
    results = sink.results
    skipped = sorted(listing.skipped + [s for r in results for s in r["skipped"]],
                     key=lambda s: s["key"])

    def discard(reason: Exception) -> Exception:
        _discard_run(vdir, run_id)
        return reason

    splits = {s: merge_split(results, s, listing.class_names, cfg.channels)
              for s in ("train", "val")}
    total = splits["train"]["rows"] + splits["val"]["rows"]
    if total == 0:
        raise discard(PreprocessError(
            f"every input of {listing.uri} is bad ({len(skipped)} skipped), e.g. "
            f"{skipped[0]['key']}: {skipped[0]['reason']}; no dataset version was committed"))
    if cfg.strict and skipped:
        raise discard(_strict_error(skipped, listing.uri))
    if splits["train"]["rows"] == 0:
        raise discard(PreprocessError(
            f"the train split is empty ({total} row(s), data.val_fraction={cfg.val_fraction})"))

    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": cfg.name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "source": {"uri": listing.uri, "kind": listing.kind, "inputs": len(listing.entries),
                   "listing_sha256": listing.fingerprint},
        "preprocessing": cfg.preprocessing(),
        "schema": {
            "key": "string: the source key (path relative to the source, '<file>#<row>' for "
                   "Parquet sources, 'digits/<index>')",
            "label": "int32, nullable: index into class_names; null = unlabelled",
            "pixels": f"fixed_size_binary[{cfg.channels * cfg.resolution**2}]: uint8, C×H×W, "
                      "row-major",
        },
        "shape": [cfg.channels, cfg.resolution, cfg.resolution],
        "dtype": "uint8",
        "layout": "CHW",
        "num_classes": len(listing.class_names) if listing.class_names else 0,
        "class_names": listing.class_names or [],
        "rows": total,
        "splits": splits,
        "stats_scale": "mean/std of pixels/255, per channel",
        "skipped": skipped,
        "writer": {"run_id": run_id, "seconds": round(work_s, 3)},
    }
    maybe_die("preprocess-before-commit")
    if not commit_bytes(manifest_loc, manifest_json(manifest)):
        # Another run committed this version first: same inputs, same settings. Keep theirs.
        _discard_run(vdir, run_id)
        manifest = load_manifest(vdir)
        echo(f"version {version} was committed by a concurrent run; using it")
        return PreprocessResult(DatasetRef(cfg.name, version, vdir.describe()), manifest, True,
                                time.perf_counter() - t0, ray_s)
    echo(f"committed {manifest_loc.describe()}: {splits['train']['rows']} train, "
         f"{splits['val']['rows']} val, {len(skipped)} skipped")
    return PreprocessResult(DatasetRef(cfg.name, version, vdir.describe()), manifest, False,
                            time.perf_counter() - t0, ray_s)
