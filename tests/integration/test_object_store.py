"""The object store's contract, the same tests over a local directory and a real S3-protocol
server (moto_server in its own process, tests/support/s3_server.py), plus each store's own
traits."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from infra.object_store import (
    Area,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    S3ObjectStore,
    content_disposition,
    object_store_from_settings,
)
from infra.settings import Settings
from tests.support.processes import free_port
from tests.support.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    server: S3Server = request.getfixturevalue("s3_server")
    return server.store()


def _file(path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    return path, data


def test_round_trip_keeps_bytes_size_and_sha256(store: ObjectStore, tmp_path: Path) -> None:
    src, data = _file(tmp_path / "in.fits", 1_500_000)
    digest = hashlib.sha256(data).hexdigest()

    stored = store.put_file(Area.RAW, "night-1/frame 001.fits", src, "application/fits")

    assert (stored.area, stored.key, stored.size, stored.sha256) == (
        Area.RAW, "night-1/frame 001.fits", len(data), digest)
    assert stored.uri.startswith("s3://" if isinstance(store, S3ObjectStore) else "file:///")
    assert store.exists(Area.RAW, "night-1/frame 001.fits")
    assert store.stat(Area.RAW, "night-1/frame 001.fits") == stored
    fetched = store.fetch_to(Area.RAW, "night-1/frame 001.fits", tmp_path / "out" / "copy.fits")
    assert fetched == tmp_path / "out" / "copy.fits"
    assert fetched.read_bytes() == data
    chunks = list(store.open_stream(Area.RAW, "night-1/frame 001.fits"))
    assert len(chunks) >= 2  # streamed in chunks, not one buffer
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == digest

    store.delete(Area.RAW, "night-1/frame 001.fits")
    assert not store.exists(Area.RAW, "night-1/frame 001.fits")
    assert store.stat(Area.RAW, "night-1/frame 001.fits") is None
    store.delete(Area.RAW, "night-1/frame 001.fits")  # deleting twice is fine


def test_missing_objects_are_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    assert store.stat(Area.PRODUCTS, "nothing/here.fits") is None
    assert not store.exists(Area.PRODUCTS, "nothing/here.fits")
    with pytest.raises(ObjectNotFound, match=r"nothing/here\.fits"):
        store.fetch_to(Area.PRODUCTS, "nothing/here.fits", tmp_path / "x")
    with pytest.raises(FileNotFoundError):  # ObjectNotFound is one
        store.open_stream(Area.PRODUCTS, "nothing/here.fits")
    assert not (tmp_path / "x").exists()


def test_areas_are_separate_and_a_put_replaces(store: ObjectStore, tmp_path: Path) -> None:
    first, _ = _file(tmp_path / "a", 1000)
    second, data = _file(tmp_path / "b", 2000)
    store.put_file(Area.INTERMEDIATE, "job/master_bias.fits", first)
    assert not store.exists(Area.PRODUCTS, "job/master_bias.fits")
    assert not store.exists(Area.RAW, "job/master_bias.fits")

    replaced = store.put_file(Area.INTERMEDIATE, "job/master_bias.fits", second)

    assert replaced.size == 2000
    assert store.stat(Area.INTERMEDIATE, "job/master_bias.fits") == replaced
    assert b"".join(store.open_stream(Area.INTERMEDIATE, "job/master_bias.fits")) == data


def test_a_20_mb_file_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    src, data = _file(tmp_path / "big.fits", 20 * MiB)

    stored = store.put_file(Area.PRODUCTS, "big/combined.fits", src, "application/fits")

    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    copy = store.fetch_to(Area.PRODUCTS, "big/combined.fits", tmp_path / "big-copy.fits")
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == stored.sha256
    if isinstance(store, S3ObjectStore):
        # went up in 8 MiB parts: S3's ETag of a multipart object is "<md5 of md5s>-<parts>"
        bucket = store.buckets[Area.PRODUCTS]
        head = store.client.head_object(Bucket=bucket, Key="big/combined.fits")
        assert head["ETag"].strip('"').endswith("-3")
        assert head["ContentType"] == "application/fits"


def test_download_urls(store: ObjectStore, tmp_path: Path) -> None:
    src, data = _file(tmp_path / "cat.ecsv", 300_000)
    store.put_file(Area.PRODUCTS, "job-7/sources.ecsv", src, "text/x-ecsv")

    url = store.presigned_url(Area.PRODUCTS, "job-7/sources.ecsv", expires_s=60)

    if isinstance(store, S3ObjectStore):
        assert url is not None
        assert store.local_path(Area.PRODUCTS, "job-7/sources.ecsv") is None
        # a plain HTTP GET, no credentials: the signature in the URL is the permission
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["content-type"] == "text/x-ecsv"
        named = store.presigned_url(Area.PRODUCTS, "job-7/sources.ecsv",
                                    download_name="M51 sources ä.ecsv")
        assert named is not None
        response = httpx.get(named, timeout=10)
        assert response.content == data
        assert response.headers["content-disposition"] == (
            'attachment; filename="M51 sources _.ecsv"; '
            "filename*=UTF-8''M51%20sources%20%C3%A4.ecsv")
        with pytest.raises(ValueError, match="presigned URL lasts"):
            store.presigned_url(Area.PRODUCTS, "job-7/sources.ecsv", expires_s=0)
    else:
        assert url is None
        path = store.local_path(Area.PRODUCTS, "job-7/sources.ecsv")
        assert path is not None and path.read_bytes() == data


@pytest.mark.parametrize(("name", "header"), [
    ("combined.fits", 'attachment; filename="combined.fits"'),
    ('a"b/c.fits', 'attachment; filename="a_b_c.fits"; filename*=UTF-8\'\'a%22b_c.fits'),
])
def test_content_disposition(name: str, header: str) -> None:
    assert content_disposition(name) == header


@pytest.mark.parametrize("key", [
    "", "/etc/passwd", "../outside.fits", "a/../../b", "a/./b", "a//b", "a/", "a\\b",
    "bad\x00name", "line\nbreak", "x" * 1025,
])
def test_bad_keys_are_refused(store: ObjectStore, tmp_path: Path, key: str) -> None:
    src, _ = _file(tmp_path / "f", 10)
    with pytest.raises(ValueError, match="key"):
        store.put_file(Area.RAW, key, src)
    with pytest.raises(ValueError, match="key"):
        store.stat(Area.RAW, key)
    with pytest.raises(ValueError, match="key"):
        store.fetch_to(Area.RAW, key, tmp_path / "out")
    with pytest.raises(ValueError, match="key"):
        store.presigned_url(Area.RAW, key)
    with pytest.raises(ValueError, match="key"):
        store.delete(Area.RAW, key)
    with pytest.raises(ValueError, match="key"):
        store.local_path(Area.RAW, key)
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.name != "f")


def test_a_missing_source_file_is_the_callers_error(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file(Area.RAW, "a.fits", tmp_path / "not-there.fits")
    assert not store.exists(Area.RAW, "a.fits")


def test_check_passes_on_a_usable_store(store: ObjectStore) -> None:
    store.check()
    store.check()


# -- S3: the endpoint down ----------------------------------------------------------------

def test_unreachable_endpoint_is_object_store_unavailable(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3ObjectStore(endpoint_url=endpoint, access_key_id=ACCESS_KEY_ID,
                          secret_access_key=SECRET_ACCESS_KEY, max_attempts=1,
                          connect_timeout_s=1.0)
    src, _ = _file(tmp_path / "f.fits", 1000)

    with pytest.raises(ObjectStoreUnavailable, match=f"{endpoint} cannot be reached"):
        store.check()
    with pytest.raises(ObjectStoreUnavailable, match="cannot be reached"):
        store.put_file(Area.RAW, "f.fits", src)
    with pytest.raises(ObjectStoreUnavailable):
        store.stat(Area.RAW, "f.fits")
    with pytest.raises(ObjectStoreUnavailable):
        store.fetch_to(Area.RAW, "f.fits", tmp_path / "copy")


@pytest.fixture
def own_s3_server(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path)
    yield server
    server.stop()


def test_server_outage_and_recovery(own_s3_server: S3Server, tmp_path: Path) -> None:
    store = own_s3_server.store(connect_timeout_s=1.0)
    src, data = _file(tmp_path / "f.fits", 5000)
    store.put_file(Area.RAW, "f.fits", src)

    own_s3_server.stop()
    with pytest.raises(ObjectStoreUnavailable):
        store.check()
    with pytest.raises(ObjectStoreUnavailable):
        store.put_file(Area.RAW, "g.fits", src)

    own_s3_server.start()  # moto keeps nothing: the store creates its buckets again
    stored = store.put_file(Area.RAW, "g.fits", src)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    store.check()

    own_s3_server.stop()
    own_s3_server.start()
    store.check()  # a health check after a reset creates them too
    assert all(store.client.head_bucket(Bucket=b) for b in store.buckets.values())


def test_areas_sharing_one_bucket_get_prefixes(s3_server: S3Server, tmp_path: Path) -> None:
    store = s3_server.store(buckets={area: "t-shared-one-bucket" for area in Area})
    src, _ = _file(tmp_path / "f", 100)
    store.put_file(Area.RAW, "x.fits", src)
    store.put_file(Area.PRODUCTS, "x.fits", src)
    names = {o["Key"] for o in store.client.list_objects_v2(
        Bucket="t-shared-one-bucket")["Contents"]}
    assert names == {"raw/x.fits", "products/x.fits"}
    store.delete(Area.RAW, "x.fits")
    assert store.exists(Area.PRODUCTS, "x.fits") and not store.exists(Area.RAW, "x.fits")


def test_objects_put_by_other_tools_are_hashed_on_stat(s3_server: S3Server) -> None:
    store = s3_server.store()
    store.check()
    data = os.urandom(70_000)
    store.client.put_object(Bucket=store.buckets[Area.RAW], Key="from-elsewhere.fits",
                            Body=data)  # no sha256 metadata
    assert store.exists(Area.RAW, "from-elsewhere.fits")
    stored = store.stat(Area.RAW, "from-elsewhere.fits")
    assert stored is not None
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())


# -- local: atomic writes ------------------------------------------------------------------

def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    src, data = _file(tmp_path / "v1", 4000)
    store.put_file(Area.PRODUCTS, "p/combined.fits", src)

    with pytest.raises(FileNotFoundError):  # a failed put leaves the old object whole
        store.put_file(Area.PRODUCTS, "p/combined.fits", tmp_path / "gone")
    assert store.local_path(Area.PRODUCTS, "p/combined.fits").read_bytes() == data  # type: ignore[union-attr]
    assert list((tmp_path / "objects" / ".staging").iterdir()) == []
    with pytest.raises(ValueError, match="clashes"):
        store.put_file(Area.PRODUCTS, "p", src)  # "p" is a directory of other objects


def test_concurrent_local_puts_of_one_key_leave_one_whole_object(tmp_path: Path) -> None:
    # (S3 servers order concurrent PUTs themselves; moto 5.2.5's server answers some of
    # them with a 500 — its own race — so this is the local store's test)
    store = LocalObjectStore(tmp_path / "objects")
    sources = [_file(tmp_path / f"v{i}", 3 * MiB + i) for i in range(4)]
    digests = {hashlib.sha256(data).hexdigest() for _, data in sources}
    with ThreadPoolExecutor(max_workers=4) as pool:
        stored = list(pool.map(lambda s: store.put_file(Area.PRODUCTS, "race.fits", s[0]),
                               sources))
    assert {o.sha256 for o in stored} == digests
    final = store.stat(Area.PRODUCTS, "race.fits")
    assert final is not None and final.sha256 in digests
    body = b"".join(store.open_stream(Area.PRODUCTS, "race.fits"))
    assert hashlib.sha256(body).hexdigest() == final.sha256 and len(body) == final.size


def test_local_store_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    store = LocalObjectStore(tmp_path / "a-file")
    with pytest.raises(ObjectStoreUnavailable, match="not writable"):
        store.check()
    src, _ = _file(tmp_path / "f", 10)
    with pytest.raises(ObjectStoreUnavailable):
        store.put_file(Area.RAW, "f", src)


# -- settings ------------------------------------------------------------------------------

def test_object_store_from_settings(tmp_path: Path, s3_server: S3Server) -> None:
    local = object_store_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalObjectStore)
    assert local.root == (tmp_path / "objects").resolve()

    settings = Settings(
        data_dir=tmp_path, object_store="s3", s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=ACCESS_KEY_ID, s3_secret_access_key=SECRET_ACCESS_KEY,
        s3_bucket_raw="t-settings-raw", s3_bucket_intermediate="t-settings-mid",
        s3_bucket_products="t-settings-products",
        s3_public_endpoint_url=f"http://localhost:{s3_server.port}")
    s3 = object_store_from_settings(settings)
    assert isinstance(s3, S3ObjectStore)
    src, data = _file(tmp_path / "f", 100)
    assert s3.put_file(Area.PRODUCTS, "f", src).uri == "s3://t-settings-products/f"
    url = s3.presigned_url(Area.PRODUCTS, "f")
    assert url is not None and url.startswith(f"http://localhost:{s3_server.port}/")
    assert httpx.get(url, timeout=10).content == data
