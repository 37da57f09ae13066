"""Storage by URL (local path, ``file://``, ``s3://``) through fsspec/s3fs.

Everything the pipeline writes goes through here, so the rules hold in one place:

- Endpoints and credentials come from :class:`StorageConfig` or the usual AWS variables
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...),
  which botocore reads itself. Credentials are never copied into a manifest, a log line or a
  returned value: :func:`redact` strips them from URLs.
- S3 calls are retried a bounded number of times (botocore "standard" mode) with a short
  connect timeout, and failures surface as :class:`StorageError` naming the endpoint and
  what to check.
- :func:`commit_bytes` publishes a file exactly once: local files by hard-linking a fully
  written temporary file into place, S3 objects by a conditional PUT (``If-None-Match: *``).
  A second writer of the same name learns that it lost instead of overwriting.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from pydantic import BaseModel, Field

from tasks.bounds import SECTION, Seconds
from tasks.errors import StorageError, StorageUnavailable


class StorageConfig(BaseModel):
    """How to reach object storage (the ``runtime.*`` storage keys)."""

    model_config = SECTION

    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, moto...). Default: AWS_ENDPOINT_URL "
        "or AWS itself.",
    )
    storage_retries: int = Field(3, ge=1, le=20, description="Attempts per S3 request.")
    storage_connect_timeout: Seconds = Field(5.0, description="Seconds per S3 connect.")


def storage_options(url: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for ``url``; only non-secret settings (safe to ship to workers).

    Credentials stay where they are (environment, instance profile, ~/.aws) and are read by
    botocore in whichever process opens the file system.
    """
    cfg = cfg or StorageConfig()
    if protocol_of(url) != "s3":
        return {}
    endpoint = cfg.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    opts: dict[str, Any] = {
        # A long-lived process (a Prefect worker running weekly retrains) must see new objects:
        # no directory-listing cache.
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": cfg.storage_connect_timeout,
            "read_timeout": 120,
            "retries": {"max_attempts": cfg.storage_retries, "mode": "standard"},
        }
    }
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def protocol_of(url: str) -> str:
    proto = fsspec.utils.get_protocol(url)
    return "s3" if proto in ("s3", "s3a") else proto


# Query parameters that carry a credential (presigned URLs, tokens, connection strings).
SECRET_PARAM = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|sig|signature|token|access_token|"
    r"auth|authorization|api[-_]?key|key|secret|password|passwd|pwd|sas|code)$")
_STORAGE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "file", "local", "memory")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _credentials(url: str) -> tuple[str, str | None, str] | None:
    """``url`` as (``scheme://``, the ``user:password`` it carries or None, the rest), or None
    when it has no ``scheme://``.

    Fails closed: a password typed raw may hold '/', '?', '#', '@' or ':', so where the
    authority ends cannot be known, and everything from ``://`` to the *last* '@' in the URL is
    taken for credentials (an '@' in a path or query is written ``%40``). Storage URLs are the
    exception their names allow: a bucket or container name holds no ':', so without one before
    the first '/' an '@' in ``s3://bucket/models@v1`` is part of the key."""
    m = _SCHEME.match(url)
    if not m:
        return None
    scheme, rest = m.group(1).lower(), url[m.end():]
    first = re.split(r"[/?#]", rest, maxsplit=1)[0]
    # a storage URL without ':' before its first '/': only an '@' there (abfs://container@...)
    at = first.rfind("@") if scheme in _STORAGE and ":" not in first else rest.rfind("@")
    if at < 0:
        return m.group(0), None, rest
    return m.group(0), rest[:at], rest[at + 1:]


def _params(text: str) -> str:
    return "&".join(f"{k}=***" if SECRET_PARAM.match(k) and sep else k + sep + v
                    for k, sep, v in (p.partition("=") for p in text.split("&")))


def redact(url: str) -> str:
    """``url`` without the credentials it may carry: the ``user:password@`` part (everything
    from ``://`` to the last '@', see :func:`_credentials`), and the values of query or
    fragment parameters that hold one (``token=``, ``X-Amz-Signature=``, ``password=``...).
    Storage URLs (``s3://bucket/key@v1``) carry no user part, so an '@' in their keys is kept;
    so are ``models:/name@alias`` references, which have no ``://``."""
    parts = _credentials(url)
    if parts is None:
        return url
    head, _, rest = parts
    rest, hash_, fragment = rest.partition("#")
    rest, q, query = rest.partition("?")
    return f"{head}{rest}{q}{_params(query) if query else ''}{hash_}" + \
        (_params(fragment) if fragment else "")


def scrub(text: str, *urls: str | None) -> str:
    """``text`` (an error message, a log line) with the credentials of each of ``urls`` taken
    out wherever they appear: as typed, percent-decoded, and the password alone. For messages
    built by others (a Ray job's failure message, an SDK's error) that quote an address this
    process holds with its credentials."""
    from urllib.parse import unquote

    secrets: set[str] = set()
    for url in urls:
        parts = _credentials(url) if url else None
        if parts is None or parts[1] is None:
            continue
        userinfo = parts[1]
        password = userinfo.partition(":")[2]
        secrets |= {userinfo, unquote(userinfo), password, unquote(password)}
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# MLflow's database stores (mlflow.store.db.db_types), with or without a +driver.
_DATABASES = ("postgresql", "mysql", "mssql", "sqlite")


def is_database_uri(uri: str) -> bool:
    m = _SCHEME.match(uri)
    return bool(m) and m.group(1).lower().split("+", 1)[0] in _DATABASES


def credentials_to_mlflow(uri: str) -> str:
    """``uri`` without its ``user:password@`` (see :func:`redact`), the credentials kept where
    MLflow reads them in this process, which every MLflow client here and the local Ray workers
    it starts inherit:

    - an MLflow server (http/https): MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD
      (percent-decoded);
    - a database store (``postgresql://``, ``mysql://``, ``mssql://``): MLflow has no password
      variable, so the whole URI goes to MLFLOW_TRACKING_URI, and
      :func:`tasks.tracking.connect_uri` hands it to MLflow's clients in place of the URI
      without credentials that configs, logs and messages carry."""
    from urllib.parse import unquote

    parts = _credentials(uri)
    if parts is None or parts[1] is None:
        return redact(uri)
    user, sep, password = parts[1].partition(":")
    if is_database_uri(uri):
        os.environ["MLFLOW_TRACKING_URI"] = uri
    elif sep:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return redact(uri)


def redact_all(value: Any) -> Any:
    """``value`` (JSON data) with :func:`redact` applied to every string in it."""
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_all(v) for v in value]
    return redact(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Location:
    """A file system and a path on it, built from a URL."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def of(cls, url: str, options: dict[str, Any] | None = None) -> Location:
        url = str(url)
        try:
            fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        except ImportError as e:  # e.g. gcs:// without gcsfs
            raise StorageError(f"no file system for {redact(url)!r}: {e}") from e
        return cls(url=url.rstrip("/"), fs=fs, path=path.rstrip("/") or path)

    @property
    def is_local(self) -> bool:
        return protocol_of(self.url) in ("file", "local")

    def child(self, *parts: str) -> Location:
        for p in parts:
            check_relative(p)
        rel = posixpath.join(*parts)
        return Location(self.url + "/" + rel, self.fs, posixpath.join(self.path, rel))

    def describe(self) -> str:
        return redact(self.url)


def check_relative(part: str) -> None:
    """Refuse path pieces that could leave the directory they are joined to."""
    if not part or part.startswith("/") or "\\" in part:
        raise ValueError(f"bad relative path {part!r}")
    if any(seg in ("", ".", "..") for seg in part.split("/")):
        raise ValueError(f"bad relative path {part!r}: empty, '.' or '..' segment")


def explain(e: BaseException, where: Location | str) -> StorageError:
    """Turn an fsspec/botocore exception into one clear :class:`StorageError`."""
    where_s = where.describe() if isinstance(where, Location) else redact(str(where))
    name = type(e).__name__
    msg = str(e)
    if "EndpointConnectionError" in name or "ConnectTimeout" in name or "Could not connect" in msg:
        endpoint = getattr(getattr(where, "fs", None), "endpoint_url", None) or "the S3 endpoint"
        return StorageUnavailable(
            f"cannot reach {endpoint} for {where_s} (gave up after bounded retries): {msg}. "
            "Check runtime.s3_endpoint_url / AWS_ENDPOINT_URL and the network."
        )
    if isinstance(e, FileNotFoundError) and "bucket" in msg.lower():
        bucket = where_s.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(
            f"bucket {bucket!r} does not exist ({where_s}); create it or point the URL elsewhere"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in msg or "Forbidden" in msg:
        return StorageError(
            f"access denied to {where_s}: {msg}. Check the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_PROFILE) and the bucket policy."
        )
    return StorageError(f"storage error at {where_s}: {name}: {msg}")


def call(where: Location, fn, *args, **kwargs):
    """Run ``fn`` (an fsspec call) and translate storage failures into StorageError."""
    try:
        return fn(*args, **kwargs)
    except StorageError:
        raise
    except FileNotFoundError as e:
        if "bucket" in str(e).lower():
            raise explain(e, where) from e
        raise
    except Exception as e:  # botocore/aiohttp errors have no common base worth naming
        if _is_storage_failure(e):
            raise explain(e, where) from e
        raise


def _is_storage_failure(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return (
        mod.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3"))
        or isinstance(e, (PermissionError, ConnectionError, TimeoutError))
    )


def check_bucket(loc: Location) -> None:
    """For s3:// locations: fail early and clearly if the bucket is missing or unreachable."""
    if protocol_of(loc.url) != "s3":
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        loc.fs.ls(bucket, refresh=True)
    except Exception as e:
        raise explain(e, loc) from e


def read_json(loc: Location) -> dict:
    with call(loc, loc.fs.open, loc.path, "rb") as f:
        return json.load(f)


def exists(loc: Location) -> bool:
    return bool(call(loc, loc.fs.exists, loc.path))


def _local_temp_copy(path: str, data: bytes) -> str:
    """``data`` written and fsynced to a fresh temporary file beside ``path``; returns its name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def commit_bytes(loc: Location, data: bytes) -> bool:
    """Publish ``data`` at ``loc`` only if nothing is there yet. True if this call published it.

    Readers never see a partial file: locally the bytes go to a temporary file that is fsynced
    and then hard-linked into place (``link`` fails if the name exists); on S3 a single PUT is
    atomic and ``If-None-Match: *`` makes it fail if the key exists. Other stores fall back to
    check-then-write. A refusal where the key already holds these very bytes is this call's own
    earlier attempt (a retried PUT whose first answer was lost), so it counts as published.
    """
    if loc.is_local:
        tmp = _local_temp_copy(loc.path, data)
        try:
            os.link(tmp, loc.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if protocol_of(loc.url) == "s3":
        check_exclusive_create(loc)
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                call(loc, loc.fs.pipe_file, loc.path, data, mode="create")
                return True
            except OSError as e:
                answer = _create_refused(e)
                if answer == "exists":
                    return _holds(loc, data)
                if answer != "conflict" or attempt == CONFLICT_RETRIES:
                    raise
                time.sleep(0.2 * 2**attempt)  # another conditional write to the key is in flight
    if exists(loc):
        return _holds(loc, data)
    call(loc, loc.fs.pipe_file, loc.path, data)
    return True


# How S3-compatible stores refuse a create-only PUT (If-None-Match: *). s3fs makes AWS's 412
# that names the If-None-Match condition a FileExistsError; other stores answer 412 without the
# condition (s3fs: a bare OSError), and AWS answers 409 ConditionalRequestConflict while another
# conditional write to the same key is in flight (retry: it turns into a success or a 412).
EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409"})
CONFLICT_RETRIES = 4


def _create_refused(e: OSError) -> str | None:
    """"exists" if ``e`` says the key already exists, "conflict" for a concurrent conditional
    write, else None (some other failure)."""
    if isinstance(e, FileExistsError):
        return "exists"
    response = getattr(e.__cause__, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code", ""))
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    if code in EXISTS_CODES or status == "412":
        return "exists"
    if code in CONFLICT_CODES or status == "409":
        return "conflict"
    return None


_EXCLUSIVE_CHECKED: set[tuple[str, str]] = set()


def check_exclusive_create(loc: Location) -> None:
    """StorageError unless the S3 store holding ``loc`` refuses a second create-only write of one
    key (checked once per process, endpoint and bucket). Exactly-once commits, the training
    lease and generation jobs rely on it; a store (or an s3fs older than its exclusive-write
    release) that ignores If-None-Match would silently overwrite."""
    if protocol_of(loc.url) != "s3":
        return
    bucket = loc.path.split("/", 1)[0]
    seen = (str(getattr(loc.fs, "endpoint_url", None) or ""), bucket)
    if seen in _EXCLUSIVE_CHECKED:
        return
    # beside the key about to be written: the same prefix, so the same permissions
    name = f"_create_probe-{uuid.uuid4().hex}"
    probe = Location(f"s3://{posixpath.dirname(loc.path)}/{name}", loc.fs,
                     f"{posixpath.dirname(loc.path)}/{name}")
    call(probe, loc.fs.pipe_file, probe.path, b"first", mode="create")
    try:
        try:
            call(probe, loc.fs.pipe_file, probe.path, b"second", mode="create")
            refused = False
        except OSError as e:
            if _create_refused(e) != "exists":
                raise explain(e, probe) from e
            refused = True
        if not refused or call(probe, loc.fs.cat_file, probe.path) != b"first":
            endpoint = seen[0] or "AWS S3"
            raise StorageError(
                f"the S3 store at {endpoint} (bucket {bucket!r}) overwrote an object on a "
                "create-only write (If-None-Match: *): the pipeline's exactly-once commits, "
                "training lease and generation jobs need it refused. Use a store that honours "
                "conditional writes (AWS S3, or an S3-compatible server with If-None-Match "
                "support) and s3fs >= 2024.12.0 with botocore >= 1.35.2")
    finally:
        with contextlib.suppress(Exception):  # best effort: a leftover probe is harmless
            loc.fs.rm_file(probe.path)
    _EXCLUSIVE_CHECKED.add(seen)


def _holds(loc: Location, data: bytes) -> bool:
    """True if ``loc`` holds exactly ``data``: a create-only write refused because this very
    write landed before (its answer was lost and botocore's retry got 412 Precondition Failed).
    Every caller's payload is unique to its writer (a run id, a timestamp), so equal bytes mean
    the same writer."""
    try:
        return call(loc, loc.fs.cat_file, loc.path) == data
    except FileNotFoundError:  # removed since: not ours either way
        return False


def atomic_write_bytes(loc: Location, data: bytes) -> None:
    """Replace ``loc`` with ``data`` so readers see the old or the new bytes, never a mix."""
    if loc.is_local:
        os.replace(_local_temp_copy(loc.path, data), loc.path)
    else:
        call(loc, loc.fs.pipe_file, loc.path, data)
