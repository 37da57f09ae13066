"""The stage run: list the source, version it, decode on Ray, commit the manifest.

How it runs: the driver lists the source (names, sizes, mtimes or ETags), fingerprints the
listing together with the preprocessing settings (→ the version), and returns at once if that
version is already committed. Otherwise Ray Data maps the listing through Pillow (decode,
mode conversion, EXIF orientation, center-crop, resize) and a :class:`ray.data.Datasink` writes
train/val/test part files and per-part statistics; the driver then commits ``_manifest.json``, last
and exclusively (see :func:`tasks.storage.commit_bytes`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tasks.datasets import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    SPLITS,
    DataConfig,
    DatasetRef,
    dataset_dir,
    load_manifest,
    manifest_json,
)
from tasks.decode import merge_split
from tasks.errors import PreprocessError
from tasks.faults import maybe_die
from tasks.preprocess.listing import Listing, version_of
from tasks.preprocess.parts import _discard_run, write_parts
from tasks.preprocess.sources import list_source
from tasks.runtime import RuntimeConfig, ensure_ray
from tasks.storage import check_bucket, commit_bytes, exists, redact

Echo = Callable[[str], None]


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
            # a version written before the test split existed has none
            "test": m["splits"].get("test", {}).get("rows", 0),
            "skipped": len(m["skipped"]),
            "shape": m["shape"],
            "class_names": m["class_names"],
        }


def preprocess(cfg: DataConfig, runtime: RuntimeConfig, *, echo: Echo = print) -> PreprocessResult:
    """Run the stage. Returns at once, doing no work, if the version is already committed."""
    t0 = time.perf_counter()
    root = runtime.root_location()
    check_bucket(root)
    echo(f"listing {redact(cfg.source)}")
    listing = list_source(cfg, runtime)
    version = version_of(listing, cfg)
    vdir = dataset_dir(root, cfg.name, version)
    ref = DatasetRef(cfg.name, version, vdir.describe())
    manifest_loc = vdir.child(MANIFEST)
    echo(f"{len(listing.units)} input(s) ({listing.kind}); dataset {cfg.name} version {version}")

    if exists(manifest_loc):
        m = load_manifest(vdir)
        if cfg.strict and m["skipped"]:
            raise _strict_error(m["skipped"], listing.uri)
        echo(f"version {version} is already committed; nothing to do")
        return PreprocessResult(ref, m, True, time.perf_counter() - t0)
    _check_listing(listing, cfg)

    ray_s = ensure_ray(runtime, echo=echo)
    run_id = uuid.uuid4().hex[:8]
    results, work_s = write_parts(listing, cfg, runtime, vdir, run_id, echo=echo)
    skipped = sorted(listing.skipped + [s for r in results for s in r["skipped"]],
                     key=lambda s: s["key"])
    splits = {s: merge_split(results, s, listing.class_names, cfg.channels) for s in SPLITS}
    error = _merged_error(splits, skipped, listing, cfg)
    if error is not None:
        _discard_run(vdir, run_id)
        raise error

    writer = {"run_id": run_id, "seconds": round(work_s, 3)}
    manifest = _manifest(cfg, listing, version, splits, skipped, writer)
    maybe_die("preprocess-before-commit")
    if not commit_bytes(manifest_loc, manifest_json(manifest)):
        # Another run committed this version first: same inputs, same settings. Keep theirs;
        # our part files go only if the manifest that won is not ours (it lists them).
        manifest = load_manifest(vdir)
        if manifest.get("writer", {}).get("run_id") != run_id:
            _discard_run(vdir, run_id)
        echo(f"version {version} was committed by a concurrent run; using it")
        return PreprocessResult(ref, manifest, True, time.perf_counter() - t0, ray_s)
    echo(f"committed {manifest_loc.describe()}: {splits['train']['rows']} train, "
         f"{splits['val']['rows']} val, {splits['test']['rows']} test, {len(skipped)} skipped")
    return PreprocessResult(ref, manifest, False, time.perf_counter() - t0, ray_s)


def _strict_error(skipped: list[dict], source: str) -> PreprocessError:
    shown = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:20])
    more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
    return PreprocessError(
        f"data.strict is set and {len(skipped)} input(s) of {source} are bad: {shown}{more}. "
        "Fix or remove them, or unset data.strict to skip them."
    )


def _check_listing(listing: Listing, cfg: DataConfig) -> None:
    """PreprocessError before any work if the source holds nothing usable or, with
    ``data.strict``, anything the listing refused."""
    if not listing.units:
        reasons = f"; {len(listing.skipped)} file(s) skipped, e.g. {listing.skipped[0]}" if (
            listing.skipped) else ""
        raise PreprocessError(f"data.source {listing.uri} holds no usable input{reasons}")
    if cfg.strict and listing.skipped:
        raise _strict_error(listing.skipped, listing.uri)


def _merged_error(splits: dict, skipped: list[dict], listing: Listing,
                  cfg: DataConfig) -> PreprocessError | None:
    """Why the decoded splits cannot be committed (no rows, strict and skips, empty train), or
    None."""
    total = sum(s["rows"] for s in splits.values())
    if total == 0:
        return PreprocessError(
            f"every input of {listing.uri} is bad ({len(skipped)} skipped), e.g. "
            f"{skipped[0]['key']}: {skipped[0]['reason']}; no dataset version was committed")
    if cfg.strict and skipped:
        return _strict_error(skipped, listing.uri)
    if splits["train"]["rows"] == 0:
        return PreprocessError(
            f"the train split is empty ({total} row(s), data.val_fraction={cfg.val_fraction}, "
            f"data.test_fraction={cfg.test_fraction})")
    return None


def _manifest(cfg: DataConfig, listing: Listing, version: str, splits: dict,
              skipped: list[dict], writer: dict) -> dict:
    """The ``_manifest.json`` of a version; ``writer`` is the run id and its seconds of work."""
    return {
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
        "rows": sum(s["rows"] for s in splits.values()),
        "splits": splits,
        "stats_scale": "mean/std of pixels/255, per channel",
        "skipped": skipped,
        "writer": writer,
    }
