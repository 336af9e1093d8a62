"""Where raw data, intermediate results and data products live (docs/PROCESSING.md, "Storage").

Three areas (``Area``): ``raw`` (raw data files brought in for processing), ``intermediate``
(master frames and other by-products of a run) and ``products`` (what users download). Two
stores behind one interface (``ObjectStore``):

- ``LocalObjectStore``: a directory, ``<root>/<area>/<key>`` — the embedded default. Writes are
  atomic: a temporary file below ``<root>/.staging``, fsynced, renamed into place, and the
  directory fsynced, so a crash leaves the old object or the new one, never a torn file.
- ``S3ObjectStore``: any S3-protocol server (MinIO, AWS S3, ...) through boto3; one bucket per
  area, created when missing. Large files go up in parts (boto3's transfer manager); each
  object carries its sha256 as user metadata (``x-amz-meta-sha256``); downloads are presigned
  GET URLs.

Keys are relative, ``/``-separated paths (``products/<job id>/combined.fits``): no absolute
paths, no ``.``/``..`` segments, no empty segments, no backslashes or control characters, at
most 1024 bytes (S3's limit) — anything else is a ``ValueError``. A missing object is an
``ObjectNotFound`` (a ``FileNotFoundError``); a store that cannot be reached (or refuses our
credentials) is an ``ObjectStoreUnavailable``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from infra.fits_check import sha256_of

if TYPE_CHECKING:
    from infra.settings import Settings

CHUNK_BYTES = 1024 * 1024
MAX_KEY_BYTES = 1024
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit


class Area(StrEnum):
    RAW = "raw"
    INTERMEDIATE = "intermediate"
    PRODUCTS = "products"


@dataclass(frozen=True)
class StoredObject:
    area: Area
    key: str
    size: int
    sha256: str
    uri: str  # file:///… or s3://bucket/key


class ObjectStoreUnavailable(Exception):
    """The object store cannot be reached or used (endpoint down, credentials refused, ...)."""


class ObjectNotFound(FileNotFoundError):
    """No object under this area and key."""

    def __init__(self, area: Area, key: str) -> None:
        super().__init__(f"no object {key!r} in the {area.value} area")
        self.area = area
        self.key = key


def validate_key(key: str) -> str:
    """``key`` if it is a safe relative object key, else ``ValueError`` saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError("an object key must be a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"an object key is at most {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} is absolute: keys are relative paths")
    if "\\" in key:
        raise ValueError(f"object key {key!r} contains a backslash: separate with '/'")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"object key {key!r} contains a control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def content_disposition(filename: str) -> str:
    """``attachment`` with ``filename`` (RFC 6266: an ASCII fallback, and ``filename*`` in
    UTF-8 when the name is not plain ASCII) — for presigned URLs and streamed downloads."""
    name = filename.replace("\\", "_").replace("/", "_")
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"%' else "_" for c in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


class ObjectStore(ABC):
    """Objects by (area, key): the same behaviour over a directory and over S3."""

    @abstractmethod
    def put_file(self, area: Area, key: str, path: Path,
                 media_type: str | None = None) -> StoredObject:
        """Store the file at ``path`` under ``key`` (replacing an object already there)."""

    @abstractmethod
    def fetch_to(self, area: Area, key: str, dest: Path) -> Path:
        """A local copy of the object at ``dest`` (parents created); returns ``dest``."""

    @abstractmethod
    def local_path(self, area: Area, key: str) -> Path | None:
        """The object's file when the store is a local directory (it may not exist yet);
        ``None`` for a remote store."""

    @abstractmethod
    def stat(self, area: Area, key: str) -> StoredObject | None:
        """Size, sha256 and URI of the object, ``None`` when there is none. The local store
        hashes a file it has not written itself once per process (then caches the digest by
        size, mtime and inode); S3 reads the digest from the object's metadata."""

    @abstractmethod
    def exists(self, area: Area, key: str) -> bool:
        """Whether there is an object (cheap: never reads the object's bytes)."""

    @abstractmethod
    def delete(self, area: Area, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abstractmethod
    def open_stream(self, area: Area, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks. The object is opened before this returns, so a
        missing object raises ``ObjectNotFound`` here, not on the first chunk."""

    @abstractmethod
    def presigned_url(self, area: Area, key: str, expires_s: int = 3600,
                      download_name: str | None = None) -> str | None:
        """A URL that GETs the object without credentials for ``expires_s`` seconds (with
        ``Content-Disposition: attachment; filename=<download_name>`` when given);
        ``None`` when the store has none (local: stream the file instead)."""

    @abstractmethod
    def check(self) -> None:
        """Raises ``ObjectStoreUnavailable`` unless the store can be read and written."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_durably(src: Path, dest: Path, staging: Path) -> tuple[str, os.stat_result]:
    """Copy ``src`` to ``dest`` atomically (temp file in ``staging`` + fsync + rename +
    directory fsync); returns the sha256 of the bytes written and the file's stat (taken
    before the rename: another writer may replace ``dest`` right after)."""
    staging.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=staging, prefix=".part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while data := inp.read(CHUNK_BYTES):
                digest.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
            st = os.fstat(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return digest.hexdigest(), st


class LocalObjectStore(ObjectStore):
    """Objects as files: ``<root>/<area>/<key>``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._staging = self.root / ".staging"
        # sha256 by (path, size, mtime_ns, inode): stat() need not re-read an unchanged file
        self._digests: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()

    def _path(self, area: Area, key: str) -> Path:
        return self.root / Area(area).value / validate_key(key)

    def _file(self, area: Area, key: str) -> Path:
        path = self._path(area, key)
        if not path.is_file():
            raise ObjectNotFound(Area(area), key)
        return path

    def _remember(self, path: Path, digest: str, st: os.stat_result) -> None:
        with self._lock:
            self._digests[(str(path), st.st_size, st.st_mtime_ns, st.st_ino)] = digest

    def put_file(self, area: Area, key: str, path: Path,
                 media_type: str | None = None) -> StoredObject:
        dest = self._path(area, key)
        if not Path(path).is_file():
            raise FileNotFoundError(f"no file to store at {path}")
        area_dir = self.root / Area(area).value
        if dest.is_dir() or any(p.is_file() for p in dest.parents if p.is_relative_to(area_dir)
                                and p != area_dir):
            raise ValueError(f"object key {key!r} clashes with another key in the local "
                             "store (one is a directory of the other)")
        try:
            digest, st = _copy_durably(Path(path), dest, self._staging)
        except OSError as e:
            raise ObjectStoreUnavailable(f"cannot write below {self.root}: {e}") from e
        self._remember(dest, digest, st)
        return StoredObject(Area(area), key, st.st_size, digest, dest.as_uri())

    def fetch_to(self, area: Area, key: str, dest: Path) -> Path:
        src = self._file(area, key)
        dest = Path(dest)
        _copy_durably(src, dest, dest.parent)
        return dest

    def local_path(self, area: Area, key: str) -> Path | None:
        return self._path(area, key)

    def exists(self, area: Area, key: str) -> bool:
        return self._path(area, key).is_file()

    def stat(self, area: Area, key: str) -> StoredObject | None:
        path = self._path(area, key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        cache_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            digest = self._digests.get(cache_key)
        if digest is None:
            digest = sha256_of(path)
            with self._lock:
                self._digests[cache_key] = digest
        return StoredObject(Area(area), key, st.st_size, digest, path.as_uri())

    def delete(self, area: Area, key: str) -> None:
        path = self._path(area, key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def open_stream(self, area: Area, key: str) -> Iterator[bytes]:
        f = open(self._file(area, key), "rb")  # noqa: SIM115 (closed by the generator)

        def chunks() -> Iterator[bytes]:
            with f:
                while data := f.read(CHUNK_BYTES):
                    yield data

        return chunks()

    def presigned_url(self, area: Area, key: str, expires_s: int = 3600,
                      download_name: str | None = None) -> str | None:
        validate_key(key)
        return None

    def check(self) -> None:
        try:
            for area in Area:
                (self.root / area.value).mkdir(parents=True, exist_ok=True)
            self._staging.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self._staging) as probe:
                probe.write(b"ok")
        except OSError as e:
            raise ObjectStoreUnavailable(f"the object directory {self.root} is not "
                                         f"writable: {e}") from e


def _buckets_default() -> dict[Area, str]:
    return {Area.RAW: "obsledger-raw", Area.INTERMEDIATE: "obsledger-intermediate",
            Area.PRODUCTS: "obsledger-products"}


class S3ObjectStore(ObjectStore):
    """Objects in S3 buckets, one per area (areas that share a bucket get an ``<area>/``
    key prefix in it)."""

    def __init__(self, *, endpoint_url: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 region: str = "us-east-1", buckets: Mapping[Area, str] | None = None,
                 public_endpoint_url: str | None = None,
                 multipart_chunk_bytes: int = 8 * 1024 * 1024, max_concurrency: int = 4,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
                 max_attempts: int = 3) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.endpoint_url = endpoint_url
        self.region = region
        self.buckets = {Area(a): b for a, b in (buckets or _buckets_default()).items()}
        if set(self.buckets) != set(Area):
            raise ValueError("S3ObjectStore needs a bucket for each area: "
                             + ", ".join(a.value for a in Area))
        shared = {b for b in self.buckets.values()
                  if list(self.buckets.values()).count(b) > 1}
        self._prefix = {a: (f"{a.value}/" if b in shared else "") for a, b in self.buckets.items()}
        config = Config(
            signature_version="s3v4", region_name=region,
            # path-style for MinIO and other servers; virtual-hosted for AWS itself
            s3={"addressing_style": "path" if endpoint_url else "virtual"},
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # checksums only where the operation needs them (MinIO and older servers)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(aws_access_key_id=access_key_id,
                                        aws_secret_access_key=secret_access_key,
                                        region_name=region)
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        # presigned URLs are signed for the host that will fetch them (e.g. the browser's
        # http://localhost:9000 rather than the compose network's http://minio:9000)
        self._presign_client: Any = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url else self.client)
        self.transfer = TransferConfig(multipart_threshold=multipart_chunk_bytes,
                                       multipart_chunksize=multipart_chunk_bytes,
                                       max_concurrency=max_concurrency)
        self._buckets_ready = False
        self._lock = threading.Lock()

    # -- errors -------------------------------------------------------------------------
    def _unavailable(self, e: Exception) -> ObjectStoreUnavailable:
        where = self.endpoint_url or "AWS S3"
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            return ObjectStoreUnavailable(
                f"the object store at {where} refused the request: "
                f"{err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": "))
        return ObjectStoreUnavailable(f"the object store at {where} cannot be reached: {e}")

    def _call(self, fn: Any, *args: Any, missing: tuple[Area, str] | None = None,
              **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with boto's failures translated: not found →
        ``ObjectNotFound`` (when ``missing`` names the object), the rest → unavailable."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if missing is not None and (code in ("404", "NoSuchKey", "NotFound")
                                        or status == 404):
                raise ObjectNotFound(*missing) from None
            raise self._unavailable(e) from e
        except (BotoCoreError, S3UploadFailedError) as e:
            raise self._unavailable(e) from e

    # -- buckets ------------------------------------------------------------------------
    def ensure_buckets(self) -> None:
        """Create the areas' buckets that do not exist yet (once per store)."""
        if self._buckets_ready:
            return
        from botocore.exceptions import ClientError

        with self._lock:
            if self._buckets_ready:
                return
            for bucket in sorted(set(self.buckets.values())):
                try:
                    self._call(self.client.head_bucket, Bucket=bucket,
                               missing=(Area.RAW, bucket))
                    continue
                except ObjectNotFound:
                    pass
                kwargs: dict[str, Any] = {"Bucket": bucket}
                if self.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                try:
                    self._call(self.client.create_bucket, **kwargs)
                except ObjectStoreUnavailable as e:
                    cause = e.__cause__
                    if not (isinstance(cause, ClientError) and cause.response.get(
                            "Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",
                                                         "BucketAlreadyExists")):
                        raise
            self._buckets_ready = True

    def _where(self, area: Area, key: str) -> tuple[str, str]:
        area = Area(area)
        return self.buckets[area], self._prefix[area] + validate_key(key)

    def _uri(self, bucket: str, name: str) -> str:
        return f"s3://{bucket}/{name}"

    # -- the interface ------------------------------------------------------------------
    def put_file(self, area: Area, key: str, path: Path,
                 media_type: str | None = None) -> StoredObject:
        bucket, name = self._where(area, key)
        path = Path(path)
        size = path.stat().st_size  # a missing source file is the caller's FileNotFoundError
        digest = sha256_of(path)
        self.ensure_buckets()
        extra: dict[str, Any] = {"Metadata": {"sha256": digest}}
        if media_type:
            extra["ContentType"] = media_type
        try:
            self._call(self.client.upload_file, str(path), bucket, name, ExtraArgs=extra,
                       Config=self.transfer)
        except ObjectStoreUnavailable as e:
            if "NoSuchBucket" not in str(e):
                raise
            # the bucket went away (a server reset): create the buckets again, once
            self._buckets_ready = False
            self.ensure_buckets()
            self._call(self.client.upload_file, str(path), bucket, name, ExtraArgs=extra,
                       Config=self.transfer)
        return StoredObject(Area(area), key, size, digest, self._uri(bucket, name))

    def fetch_to(self, area: Area, key: str, dest: Path) -> Path:
        bucket, name = self._where(area, key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # the transfer manager writes a temporary file beside dest and renames it when done
        self._call(self.client.download_file, bucket, name, str(dest), Config=self.transfer,
                   missing=(Area(area), key))
        return dest

    def local_path(self, area: Area, key: str) -> Path | None:
        validate_key(key)
        return None

    def _head(self, area: Area, key: str) -> dict[str, Any] | None:
        bucket, name = self._where(area, key)
        try:
            head: dict[str, Any] = self._call(self.client.head_object, Bucket=bucket, Key=name,
                                              missing=(Area(area), key))
        except ObjectNotFound:
            return None
        return head

    def exists(self, area: Area, key: str) -> bool:
        return self._head(area, key) is not None

    def stat(self, area: Area, key: str) -> StoredObject | None:
        bucket, name = self._where(area, key)
        head = self._head(area, key)
        if head is None:
            return None
        digest = (head.get("Metadata") or {}).get("sha256")
        if not digest:  # put there by another tool: hash the bytes once and say so
            h = hashlib.sha256()
            for chunk in self.open_stream(area, key):
                h.update(chunk)
            digest = h.hexdigest()
        return StoredObject(Area(area), key, int(head["ContentLength"]), digest,
                            self._uri(bucket, name))

    def delete(self, area: Area, key: str) -> None:
        bucket, name = self._where(area, key)
        try:
            self._call(self.client.delete_object, Bucket=bucket, Key=name,
                       missing=(Area(area), key))
        except ObjectNotFound:  # the bucket itself is missing: nothing to delete
            return

    def open_stream(self, area: Area, key: str) -> Iterator[bytes]:
        bucket, name = self._where(area, key)
        body = self._call(self.client.get_object, Bucket=bucket, Key=name,
                          missing=(Area(area), key))["Body"]

        def chunks() -> Iterator[bytes]:
            from botocore.exceptions import BotoCoreError

            try:
                while True:
                    try:
                        data = body.read(CHUNK_BYTES)
                    except (BotoCoreError, OSError) as e:
                        raise self._unavailable(e) from e
                    if not data:
                        return
                    yield data
            finally:
                body.close()

        return chunks()

    def presigned_url(self, area: Area, key: str, expires_s: int = 3600,
                      download_name: str | None = None) -> str | None:
        bucket, name = self._where(area, key)
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"a presigned URL lasts 1 to {MAX_PRESIGN_S} seconds")
        params = {"Bucket": bucket, "Key": name}
        if download_name:
            params["ResponseContentDisposition"] = content_disposition(download_name)
        url: str = self._presign_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires_s)
        return url

    def check(self) -> None:
        if self._buckets_ready:
            bucket = self.buckets[Area.PRODUCTS]
            try:
                self._call(self.client.head_bucket, Bucket=bucket, missing=(Area.PRODUCTS, bucket))
                return
            except ObjectNotFound:  # the server lost its buckets: create them again
                self._buckets_ready = False
        self.ensure_buckets()


def object_store_from_settings(settings: Settings) -> ObjectStore:
    """The configured store: ``OBSLEDGER_OBJECT_STORE=local`` (a directory, default) or
    ``s3`` (``OBSLEDGER_S3_*``)."""
    if settings.object_store == "local":
        return LocalObjectStore(settings.object_store_root)
    secret = settings.s3_secret_access_key
    return S3ObjectStore(
        endpoint_url=settings.s3_endpoint_url,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        region=settings.s3_region,
        buckets={Area.RAW: settings.s3_bucket_raw,
                 Area.INTERMEDIATE: settings.s3_bucket_intermediate,
                 Area.PRODUCTS: settings.s3_bucket_products},
        public_endpoint_url=settings.s3_public_endpoint_url,
        multipart_chunk_bytes=settings.s3_multipart_chunk_bytes,
        connect_timeout_s=settings.s3_connect_timeout_s,
    )


__all__ = ["Area", "LocalObjectStore", "ObjectNotFound", "ObjectStore",
           "ObjectStoreUnavailable", "S3ObjectStore", "StoredObject", "content_disposition",
           "object_store_from_settings", "validate_key"]
