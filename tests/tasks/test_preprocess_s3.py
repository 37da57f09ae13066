"""The same source → dataset round trip against an S3-compatible server on loopback (moto)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.datasets import MANIFEST, DataConfig, open_dataset, part_files
from tasks.errors import StorageError
from tasks.preprocess import preprocess
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, commit_bytes, storage_options
from tests.helpers import make_folder


def upload(s3, tmp_path) -> tuple[str, dict]:
    files = make_folder(tmp_path / "src")
    bucket = s3.bucket()
    for rel, data in files.items():
        s3.client.pipe(f"{bucket}/raw/{rel}", data)
    return f"s3://{bucket}/raw", files


def rows_of(root: Location, manifest: dict) -> dict:
    out = {}
    for split in ("train", "val"):
        for path in part_files(root, manifest, split):
            with root.fs.open(path, "rb") as f:
                t = pq.read_table(f)
            for k, lab, px in zip(*(t.column(c).to_pylist() for c in ("key", "label", "pixels")),
                                  strict=True):
                out[k] = (lab, px, split)
    return out


def test_s3_round_trip_matches_local(ray_local, s3, tmp_path):
    source, files = upload(s3, tmp_path)
    out_bucket = s3.bucket()
    rt = RuntimeConfig(root=f"s3://{out_bucket}/pipeline", s3_endpoint_url=s3.endpoint)
    cfg = DataConfig(name="pets", source=source, channels=3)
    res = preprocess(cfg, rt, echo=lambda s: None)
    m = res.manifest
    assert res.ref.uri == f"s3://{out_bucket}/pipeline/datasets/pets/{m['version']}"
    assert s3.client.exists(f"{out_bucket}/pipeline/datasets/pets/{m['version']}/{MANIFEST}")
    assert m["rows"] == 15 and len(m["skipped"]) == 6 and m["class_names"] == ["cat", "dog"]

    local = preprocess(cfg.model_copy(update={"source": str(tmp_path / "src")}),
                       RuntimeConfig(root=str(tmp_path / "local")), echo=lambda s: None)
    assert rows_of(rt.root_location(), m) == rows_of(
        RuntimeConfig(root=str(tmp_path / "local")).root_location(), local.manifest)
    assert m["splits"]["train"]["mean"] == local.manifest["splits"]["train"]["mean"]

    # unchanged objects (same ETags): no work, same version
    again = preprocess(cfg, rt, echo=lambda s: None)
    assert again.reused and again.manifest == m
    # a replaced object is a new version
    s3.client.pipe(f"{source[5:]}/dog/img000.png", files["dog/img001.jpg"])
    assert preprocess(cfg, rt, echo=lambda s: None).ref.version != m["version"]
    ref, latest = open_dataset(rt.root_location(), "pets")
    assert ref.version != m["version"] and latest["source"]["uri"] == source


def test_endpoint_from_aws_endpoint_url(ray_local, s3, tmp_path, monkeypatch):
    source, _ = upload(s3, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    rt = RuntimeConfig(root=f"s3://{s3.bucket()}/p")
    res = preprocess(DataConfig(name="x", source=source, channels=3), rt, echo=lambda s: None)
    assert res.manifest["rows"] == 15
    assert s3.endpoint not in str(res.manifest)  # endpoints are config, not data


def test_missing_bucket_is_a_clear_error(ray_local, s3, tmp_path):
    rt = RuntimeConfig(root=f"s3://{s3.bucket()}/p", s3_endpoint_url=s3.endpoint)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-1' does not exist"):
        preprocess(DataConfig(source="s3://no-such-bucket-1/imgs"), rt, echo=lambda s: None)
    bad_root = RuntimeConfig(root="s3://no-such-bucket-2/p", s3_endpoint_url=s3.endpoint)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-2' does not exist"):
        preprocess(DataConfig(), bad_root, echo=lambda s: None)


def test_unreachable_endpoint_fails_after_bounded_retries(tmp_path):
    rt = RuntimeConfig(root="s3://bucket/p", s3_endpoint_url="http://127.0.0.1:9",
                       storage_retries=2, storage_connect_timeout=1)
    with pytest.raises(StorageError, match=r"cannot reach http://127\.0\.0\.1:9.*AWS_ENDPOINT_URL"):
        preprocess(DataConfig(), rt, echo=lambda s: None)


def test_manifest_commit_is_exclusive_on_s3(s3):
    bucket = s3.bucket()
    url = f"s3://{bucket}/d/_manifest.json"
    loc = Location.of(url, storage_options(url, RuntimeConfig(s3_endpoint_url=s3.endpoint)))
    assert commit_bytes(loc, b"first")
    assert not commit_bytes(loc, b"second")
    assert s3.client.cat(f"{bucket}/d/_manifest.json") == b"first"


def test_a_commit_whose_answer_was_lost_is_still_its_own(s3, monkeypatch):
    """The create-only PUT lands but its answer is lost; botocore's retry is refused with 412.
    That refusal is this writer's own commit, not a concurrent winner's (preprocessing used to
    take it for one and delete the part files its own committed manifest lists)."""
    bucket = s3.bucket()
    url = f"s3://{bucket}/d/_manifest.json"
    loc = Location.of(url, storage_options(url, RuntimeConfig(s3_endpoint_url=s3.endpoint)))
    put = loc.fs.pipe_file

    def answer_lost(path, data, **kw):
        put(path, data, **kw)  # the PUT lands ...
        return put(path, data, **kw)  # ... and its retry gets 412 Precondition Failed

    monkeypatch.setattr(loc.fs, "pipe_file", answer_lost)
    assert commit_bytes(loc, b"mine")
    assert not commit_bytes(loc, b"another writer's")
    assert s3.client.cat(f"{bucket}/d/_manifest.json") == b"mine"


def test_manifest_commit_is_exclusive_locally(tmp_path):
    loc = Location.of(str(tmp_path / "v" / "_manifest.json"))
    assert commit_bytes(loc, b"first") and not commit_bytes(loc, b"second")
    assert (tmp_path / "v" / "_manifest.json").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "v").iterdir()] == ["_manifest.json"]  # no temp left


def test_part_files_hold_fixed_size_pixels(ray_local, s3, tmp_path):
    source, _ = upload(s3, tmp_path)
    rt = RuntimeConfig(root=f"s3://{s3.bucket()}/p", s3_endpoint_url=s3.endpoint)
    res = preprocess(DataConfig(name="x", source=source, channels=1, resolution=4), rt,
                     echo=lambda s: None)
    root = rt.root_location()
    with root.fs.open(part_files(root, res.manifest, "train")[0], "rb") as f:
        schema = pq.read_schema(f)
    assert schema.field("pixels").type == pa.binary(16)
    assert schema.names == ["key", "label", "pixels"]
