"""Worker-side code of the preprocessing stage: decoding inputs and writing part files.

Kept apart from :mod:`tasks.preprocess` so that Ray workers import only what they run (numpy,
pyarrow, Pillow, fsspec), not Prefect.
"""

from __future__ import annotations

import io
import json
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from tasks.datasets import SPLITS, split_of
from tasks.errors import StorageError
from tasks.faults import maybe_die
from tasks.storage import Location, call

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# Modes Pillow converts to L / RGB faithfully, and the 16-bit greyscale modes of a 16-bit PNG,
# which are rescaled here (Pillow's own "I;16" -> "L" conversion clips at 255 instead). Float
# ("F") and other modes are refused rather than guessed at.
SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I": how older Pillow opens them


class SkipInput(Exception):
    """This input cannot be used; the message is the reason recorded in the manifest."""


def decode_image(data: bytes | None, *, resolution: int, mode: str, max_pixels: int) -> np.ndarray:
    """Encoded image bytes → uint8 array [C, resolution, resolution]; SkipInput if unusable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise SkipInput("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        except UnidentifiedImageError:
            raise SkipInput("not a decodable PNG, JPEG, WebP or BMP image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SkipInput(f"refused as a decompression bomb: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise SkipInput(f"corrupt image header: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise SkipInput(
                f"refused as a decompression bomb: declares {w}x{h} = {w * h} pixels, over "
                f"data.max_image_pixels={max_pixels}"
            )
        if w == 0 or h == 0:
            raise SkipInput(f"empty image ({w}x{h})")
        if img.mode not in SUPPORTED_MODES | SIXTEEN_BIT_GREY:
            raise SkipInput(f"unsupported mode {img.mode!r} (supported: L, LA, P, RGB, RGBA, "
                            "CMYK, YCbCr and 16-bit greyscale)")
        if img.format == "JPEG":
            img.draft(mode, (resolution, resolution))  # decode at the smallest scale ≥ target
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise SkipInput(f"corrupt or truncated image data: {e}") from None
    if "exif" in img.info:  # JPEG APP1, PNG eXIf, WebP EXIF; parsing it costs ~6% otherwise
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # Pillow raises SyntaxError, ValueError, struct.error, ...
            raise SkipInput(f"unreadable EXIF metadata: {type(e).__name__}: {e}") from None
    try:
        return _to_array(img, resolution=resolution, mode=mode)
    except MemoryError:
        raise
    except Exception as e:  # about this one image, whatever Pillow raises
        raise SkipInput(f"could not convert the image: {type(e).__name__}: {e}") from None


def _to_array(img, *, resolution: int, mode: str) -> np.ndarray:
    """A loaded image → uint8 [C, resolution, resolution]: alpha over white, ``mode``, fit."""
    from PIL import Image, ImageOps

    if img.mode in SIXTEEN_BIT_GREY:  # 0..65535 -> 0..255, rounded: v / 257
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert(mode)
    img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def output_schema(channels: int, resolution: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("pixels", pa.binary(channels * resolution * resolution)),
        pa.field("split", pa.string()),
        pa.field("error", pa.string()),
    ])


def decode_batch(batch: pa.Table, *, resolution: int, channels: int, max_pixels: int,
                 val_fraction: float, image_column: str, label_column: str | None,
                 key_column: str | None, source: str, options: dict,
                 max_file_bytes: int = 64 * 2**20, fetch_bytes: int = 256 * 2**20,
                 test_fraction: float = 0.0) -> pa.Table:
    """One batch of listing units → rows of (key, label, pixels, split, error).

    ``source`` is the source URL and ``options`` its fsspec options; unit paths are paths on
    that file system. Image files are fetched in groups of at most ``fetch_bytes`` (by their
    listed sizes), so a task holds that much encoded data at a time, not its whole batch; a
    file over ``max_file_bytes`` when read (it grew since the listing) is skipped.
    """
    mode = "L" if channels == 1 else "RGB"
    units = batch.to_pylist()
    rows: list[tuple] = []  # (key, label, pixels bytes | None, error | None)

    def add(key, label, data):
        try:
            arr = decode_image(data, resolution=resolution, mode=mode, max_pixels=max_pixels)
            rows.append((key, label, arr.tobytes(), None))
        except SkipInput as e:
            rows.append((key, label, None, str(e)))
        except MemoryError:
            raise
        except Exception as e:  # any other failure decoding this file skips this file only
            rows.append((key, label, None, f"could not decode: {type(e).__name__}: {e}"))

    if units and "pixels" in units[0]:  # digits: raw uint8 [1, 8, 8]
        for u in units:
            arr = np.frombuffer(u["pixels"], np.uint8).reshape(u["shape"])
            if arr.shape[1:] != (resolution, resolution) or channels != arr.shape[0]:
                from PIL import Image, ImageOps

                img = Image.fromarray(arr[0]).convert(mode)
                img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
                arr = np.asarray(img, np.uint8)
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            rows.append((u["key"], u["label"], arr.tobytes(), None))
    elif units and "row_group" in units[0]:  # parquet row groups
        loc = Location.of(source, options)
        for u in units:
            _decode_row_group(u, loc.fs, add, image_column, label_column, key_column)
    elif units:  # image files: fetch each group concurrently (s3fs runs the GETs in parallel)
        loc = Location.of(source, options)
        for group in _groups(units, fetch_bytes):
            paths = [u["path"] for u in group]
            if loc.is_local:
                blobs = {p: _read_local(p, max_file_bytes) for p in paths}
            else:
                blobs = call(loc, loc.fs.cat, paths, on_error="return") if len(paths) > 1 else {
                    paths[0]: _cat_one(loc, paths[0])}
            for u in group:
                data = blobs.pop(u["path"], _MISSING)
                if data is _MISSING:
                    data = FileNotFoundError(u["path"])
                if isinstance(data, BaseException):
                    rows.append((u["key"], u["label"], None, f"unreadable: "
                                 f"{type(data).__name__}: {data}"))
                elif len(data) > max_file_bytes:
                    rows.append((u["key"], u["label"], None, f"over data.max_file_bytes="
                                 f"{max_file_bytes} when read (it grew after the listing)"))
                else:
                    add(u["key"], u["label"], data)
            del blobs
    keys = [r[0] for r in rows]
    return pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array([r[1] for r in rows], pa.int32()),
            pa.array([r[2] for r in rows], pa.binary(channels * resolution * resolution)),
            pa.array([split_of(k, val_fraction, test_fraction) for k in keys], pa.string()),
            pa.array([r[3] for r in rows], pa.string()),
        ],
        schema=output_schema(channels, resolution),
    )


_MISSING = object()


def _groups(units: list[dict], budget: int) -> Iterable[list[dict]]:
    """``units`` in order, in groups whose listed sizes add up to at most ``budget`` (a file
    larger than the budget is a group of its own)."""
    group: list[dict] = []
    size = 0
    for u in units:
        n = int(u.get("size") or 0)
        if group and size + n > budget:
            yield group
            group, size = [], 0
        group.append(u)
        size += n
    if group:
        yield group


def _read_local(path: str, limit: int):
    """A local file's bytes, at most ``limit + 1`` of them (more means it is over the cap)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:  # unreadable file: recorded, not fatal
        return e


def _cat_one(loc: Location, path: str):
    try:
        return call(loc, loc.fs.cat_file, path)
    except StorageError:
        raise
    except Exception as e:  # unreadable file: recorded, not fatal
        return e


def _decode_row_group(u, fs, add, image_column, label_column, key_column) -> None:
    label_map = json.loads(u["label_map"]) if u["label_map"] else None
    with fs.open(u["path"], "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in (image_column, label_column, key_column)
                if c and c in pf.schema_arrow.names]
        t = pf.read_row_group(u["row_group"], columns=cols)
    images = t.column(image_column).to_pylist()
    labels = t.column(label_column).to_pylist() if label_column in t.column_names else None
    keys = t.column(key_column).to_pylist() if key_column else None
    for j, img in enumerate(images):
        key = str(keys[j]) if keys else f"{u['key']}#{u['row_offset'] + j}"
        data = img.get("bytes") if isinstance(img, dict) else img
        label = labels[j] if labels else None
        if label is not None and label_map is not None:
            label = label_map[label]
        add(key, label, data)


class VersionPartsDatasink(Datasink):
    """Writes each task's rows to train/, val/ and test/ part files and returns their statistics.

    File names are ``part-<run>-<task>.parquet``: a retried task overwrites its own file and
    files of other runs never collide. Nothing is visible to readers until the driver commits
    the manifest, which lists exactly the files this run wrote (:attr:`results`).
    """

    def __init__(self, version_dir: str, options: dict, run_id: str, channels: int):
        self.version_dir = version_dir
        self.options = options
        self.run_id = run_id
        self.channels = channels
        self.results: list[dict] = []

    def write(self, blocks: Iterable, ctx) -> dict:
        maybe_die("preprocess-write")
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        out: dict[str, Any] = {"files": [], "skipped": [], "stats": {}}
        if not tables:
            return out
        t = pa.concat_tables(tables)
        err = t.column("error")
        bad = t.filter(err.is_valid())
        out["skipped"] = [
            {"key": k, "reason": r}
            for k, r in zip(bad.column("key").to_pylist(), bad.column("error").to_pylist(),
                            strict=True)
        ]
        good = t.filter(err.is_null())
        loc = Location.of(self.version_dir, self.options)
        for split in SPLITS:
            part = good.filter(pc.equal(good.column("split"), split))
            if not part.num_rows:
                continue
            part = part.select(["key", "label", "pixels"])
            rel = f"{split}/part-{self.run_id}-{ctx.task_idx:05d}.parquet"
            dest = loc.child(rel)
            call(dest, loc.fs.makedirs, posixpath.dirname(dest.path), exist_ok=True)
            with call(dest, loc.fs.open, dest.path, "wb") as f:
                pq.write_table(part, f, compression="zstd")
            out["files"].append({"path": rel, "split": split, "rows": part.num_rows,
                                 "bytes": int(call(dest, loc.fs.size, dest.path))})
            out["stats"][split] = part_stats(part, self.channels)
        return out

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)


def part_stats(part: pa.Table, channels: int) -> dict:
    buf = part.column("pixels").combine_chunks()
    n = len(buf)
    data = np.frombuffer(buf.buffers()[1], np.uint8)[buf.offset * (buf.type.byte_width):]
    px = data[: n * buf.type.byte_width].reshape(n, channels, -1).astype(np.float64) / 255.0
    labels = Counter(part.column("label").to_pylist())
    return {
        "rows": n,
        "sum": px.sum(axis=(0, 2)).tolist(),
        "sumsq": np.square(px).sum(axis=(0, 2)).tolist(),
        "pixels_per_channel": int(n * px.shape[2]),
        "labels": {str(k): v for k, v in labels.items()},
    }


def merge_split(results: list[dict], split: str, class_names: list[str] | None,
                 channels: int) -> dict:
    files = sorted((f for r in results for f in r["files"] if f["split"] == split),
                   key=lambda f: f["path"])
    stats = [r["stats"][split] for r in results if split in r["stats"]]
    rows = sum(s["rows"] for s in stats)
    count = sum(s["pixels_per_channel"] for s in stats)
    s1 = np.sum([s["sum"] for s in stats], axis=0) if stats else np.zeros(channels)
    s2 = np.sum([s["sumsq"] for s in stats], axis=0) if stats else np.zeros(channels)
    mean = s1 / max(count, 1)
    std = np.sqrt(np.maximum(s2 / max(count, 1) - mean**2, 0.0))
    labels: Counter = Counter()
    for s in stats:
        labels.update(s["labels"])
    unlabelled = labels.pop("None", 0)
    per_class = {}
    if class_names:
        per_class = {name: labels.get(str(i), 0) for i, name in enumerate(class_names)}
    return {
        "rows": rows,
        "class_counts": per_class,
        "unlabelled": unlabelled,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "files": [{k: f[k] for k in ("path", "rows", "bytes")} for f in files],
    }
