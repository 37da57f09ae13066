"""The same source → dataset round trip against an S3-compatible server on loopback (moto)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.datasets import MANIFEST, SPLITS, DataConfig, open_dataset, part_files
from tasks.errors import StorageError
from tasks.preprocess import preprocess
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, check_exclusive_create, commit_bytes, storage_options
from tests.helpers import make_folder


def upload(s3, tmp_path) -> tuple[str, dict]:
    files = make_folder(tmp_path / "src")
    bucket = s3.bucket()
    for rel, data in files.items():
        s3.client.pipe(f"{bucket}/raw/{rel}", data)
    return f"s3://{bucket}/raw", files


def rows_of(root: Location, manifest: dict) -> dict:
    out = {}
    for split in SPLITS:
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
    check_exclusive_create(loc)  # the store's probe, once, before its answers are tampered with
    put = loc.fs.pipe_file

    def answer_lost(path, data, **kw):
        put(path, data, **kw)  # the PUT lands ...
        return put(path, data, **kw)  # ... and its retry gets 412 Precondition Failed

    monkeypatch.setattr(loc.fs, "pipe_file", answer_lost)
    assert commit_bytes(loc, b"mine")
    assert not commit_bytes(loc, b"another writer's")
    assert s3.client.cat(f"{bucket}/d/_manifest.json") == b"mine"


def _refusal(code: str, status: int, condition: str | None = None) -> OSError:
    """What s3fs raises for an S3 error answer (its own translation of botocore's error)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = {"Code": code, "Message": f"{code} answer"}
    if condition:
        error["Condition"] = condition
    return translate_boto_error(ClientError(
        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))


def test_every_form_of_already_exists_is_recognised(s3, monkeypatch):
    """AWS's 412 naming If-None-Match (s3fs: FileExistsError), another store's bare 412 (s3fs: an
    OSError) and AWS's 409 ConditionalRequestConflict (a concurrent conditional write: retried
    until it resolves) all mean "not published by this call"; any other error propagates."""
    bucket = s3.bucket()
    url = f"s3://{bucket}/d/_manifest.json"
    loc = Location.of(url, storage_options(url, RuntimeConfig(s3_endpoint_url=s3.endpoint)))
    check_exclusive_create(loc)
    assert commit_bytes(loc, b"theirs")
    put = loc.fs.pipe_file
    answers: list[OSError] = []

    def refusing(path, data, **kw):
        if answers:
            raise answers.pop(0)
        return put(path, data, **kw)

    monkeypatch.setattr(loc.fs, "pipe_file", refusing)
    for refusal in (_refusal("PreconditionFailed", 412, "If-None-Match"),
                    _refusal("PreconditionFailed", 412), _refusal("412", 412)):
        answers[:] = [refusal]
        assert not commit_bytes(loc, b"mine"), refusal
    answers[:] = [_refusal("ConditionalRequestConflict", 409)] * 2  # then the real 412
    assert not commit_bytes(loc, b"mine") and answers == []
    answers[:] = [_refusal("InternalError", 500)]
    with pytest.raises(OSError, match="InternalError"):
        commit_bytes(loc, b"mine")
    assert s3.client.cat(f"{bucket}/d/_manifest.json") == b"theirs"


def test_a_store_that_overwrites_on_create_is_refused_before_any_commit(s3, monkeypatch):
    """A store (or an s3fs before its exclusive-write release) that ignores If-None-Match
    would let two runs both "commit": the probe writes one key twice create-only and refuses
    to go on when the second write is not refused, naming the store and the fix."""
    import tasks.storage
    from tasks.errors import StorageError

    bucket = s3.bucket()
    url = f"s3://{bucket}/d/_manifest.json"
    loc = Location.of(url, storage_options(url, RuntimeConfig(s3_endpoint_url=s3.endpoint)))
    put = loc.fs.pipe_file
    monkeypatch.setattr(loc.fs, "pipe_file", lambda path, data, **kw: put(path, data))
    monkeypatch.setattr(tasks.storage, "_EXCLUSIVE_CHECKED", set())
    with pytest.raises(StorageError, match=rf"S3 store at {s3.endpoint} \(bucket '{bucket}'\) "
                                           r"overwrote an object on a create-only write"):
        commit_bytes(loc, b"mine")
    assert s3.client.find(bucket) == []  # nothing committed; the probe cleaned up after itself


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
